"""Encoding speed, one core and several: fsqtok's compiled search (`fsqtok.tokenizer.native_encode`)
and its pure-Python reference, beside SentencePiece unigram and Hugging Face BPE (their own
batch encoders), in one run.

  python experiments/bench_encode_batch.py --corpus=files:/work/corpora/docs.txt --mb=10

Every tokenizer is trained on the corpus's training split (fsqtok: its vocabulary, which is
all encoding needs) at ``--vocab_size``; the held-out and training blocks are repeated up
to ``--mb`` megabytes of documents. fsqtok encodes them with a freshly loaded tokenizer
("cold": empty run caches; the compiled search built by one ``encode("")`` before the
clock starts, as SentencePiece's model is loaded before its clock starts; that one-time
load is printed below the table) and then again with the same one ("warm"). Each setting is timed ``--repeats`` times and the fastest counts (this machine's
noise only ever slows a run). Printed: MB/s and the speedup over the same tokenizer on
one thread/process;
every fsqtok setting's ids are checked equal to the pure-Python reference's.
"""
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import recon as recon_config  # noqa: E402
from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.tokenizer import baselines  # noqa: E402
from fsqtok.tokenizer import build as tokenizer_build  # noqa: E402
from fsqtok.tokenizer import pieces  # noqa: E402
from fsqtok.tokenizer.tokenizer import Tokenizer  # noqa: E402

_CORPUS = flags.DEFINE_string("corpus", "builtin", "Corpus spec.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32768, "Vocabulary size of every tokenizer.")
_MB = flags.DEFINE_float("mb", 10.0, "Megabytes of documents to encode.")
_WORKERS = flags.DEFINE_list("workers", [], "Worker counts (default: 2 and every core).")
_RUNS = flags.DEFINE_enum("runs", None, list(pieces.RUN_STYLES), "fsqtok's pre-tokenizer runs "
                          "(default: the config's).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Each setting is timed this many times (cold: "
                                "a freshly loaded tokenizer each time); the fastest counts.")


def _timed(fn):
  tic = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - tic


def _fastest(fn):
  """(output, seconds) of the fastest of ``--repeats`` calls (machine noise only slows)."""
  runs = [_timed(fn) for _ in range(_REPEATS.value)]
  return runs[0][0], min(s for _, s in runs)


def main(argv):
  del argv
  config = recon_config.get_config("")
  config.data.source = _CORPUS.value
  config.train.progress_bar = False
  if _RUNS.value:
    config.tokenizer.runs = _RUNS.value
  d = config.data
  docs = corpus_lib.load_documents(_CORPUS.value)
  train, val = corpus_lib.split_documents(docs, val_fraction=d.val_fraction,
                                          seed=d.split_seed, block_chars=d.block_chars)
  blocks, size = [], 0
  while size < _MB.value * 1e6:
    for b in val + train:
      blocks.append(b)
      size += len(b.encode("utf-8"))
      if size >= _MB.value * 1e6:
        break
  mb = size / 1e6
  tok = tokenizer_build.unigram_tokenizer(config, train, _VOCAB.value)
  sp = baselines.SentencePieceTokenizer.train(train, _VOCAB.value)
  bpe = baselines.HFBPETokenizer.train(train, _VOCAB.value)
  workers = [int(w) for w in _WORKERS.value] or sorted({2, os.cpu_count() or 1})
  print(f"\n{mb:.1f} MB in {len(blocks)} documents of {_CORPUS.value}; vocabulary "
        f"{_VOCAB.value}; fsqtok's runs: {config.tokenizer.runs}; {os.cpu_count()} cores\n")
  print("| tokenizer | how | MB/s | vs one process |")
  print("|---|---|---|---|")
  scratch = tempfile.TemporaryDirectory(prefix="bench_encode_batch_")  # removed at exit
  saved = scratch.name
  tok.save(saved)

  def load(native):
    t = Tokenizer.load(saved)
    t.native = native
    t.encode("")  # builds the compiled search (numba's cached machine code, the tries)
    return t

  _, load_seconds = _timed(lambda: load(True))

  base = {}  # one thread/process's seconds per setting
  reference = load(False).encode_batch(blocks, num_workers=1, return_offsets_mapping=False)
  for native, what, unit in ((True, "compiled", "thread"), (False, "pure Python", "process")):
    for offsets in (False, True):  # ids alone (ragged lists); ids and offsets, padded arrays
      how = "ids and offsets, padded" if offsets else "ids"
      pad = "longest" if offsets else False
      for n in [1, *workers]:
        for state in ("cold", "warm") if native else ("cold",):

          def run(n=n, o=offsets, pad=pad, state=state):
            t = load(native)
            if state == "warm":
              t.encode_batch(blocks, num_workers=n, return_offsets_mapping=o, padding=pad)
            return _timed(lambda: t.encode_batch(blocks, num_workers=n,
                                                 return_offsets_mapping=o, padding=pad))

          runs = [run() for _ in range(_REPEATS.value)]
          out, s = runs[0][0], min(s for _, s in runs)
          ids = ([row[m > 0].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
                 if pad else out["input_ids"])
          assert ids == reference["input_ids"], "ids differ from the pure-Python reference's"
          if n == 1:
            base[native, offsets, state] = s
          units = unit if n == 1 else unit + ("s" if native else "es")
          print(f"| fsqtok {what} | encode_batch ({how}), {n} {units}, {state} | "
                f"{mb / s:.2f} | {base[native, offsets, state] / s:.2f}x |", flush=True)
  lines = [baselines.to_sentencepiece_text(b) for b in blocks]  # as its encode does
  _, s1 = _fastest(lambda: [sp._sp.encode(line) for line in lines])  # pylint: disable=protected-access
  print(f"| SentencePiece unigram | encode, 1 thread | {mb / s1:.2f} | 1.00x |")
  for n in workers:
    _, s = _fastest(lambda n=n, lines=lines: sp._sp.encode(lines, num_threads=n))  # pylint: disable=protected-access
    print(f"| SentencePiece unigram | encode(list), {n} threads | {mb / s:.2f} | "
          f"{s1 / s:.2f}x |", flush=True)
  _, s1 = _fastest(lambda: [bpe.encode(b) for b in blocks])
  print(f"| HF BPE | encode, 1 thread | {mb / s1:.2f} | 1.00x |")
  _, s = _fastest(lambda: bpe._tok.encode_batch(blocks))  # pylint: disable=protected-access
  print(f"| HF BPE | encode_batch, every core | {mb / s:.2f} | {s1 / s:.2f}x |", flush=True)
  print(f"\nLoading fsqtok's tokenizer and building its compiled search (once a process): "
        f"{load_seconds:.2f} s.")
  scratch.cleanup()


if __name__ == "__main__":
  app.run(main)
