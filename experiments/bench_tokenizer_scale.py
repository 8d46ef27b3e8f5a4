"""Tokenizer training at scale: wall time, peak memory and held-out bytes per token for
fsqtok, Hugging Face BPE and SentencePiece unigram, on growing amounts of real text, in
one run.

  python experiments/bench_tokenizer_scale.py --sources=/work/corpora/docs.txt,/work/corpora/books.txt \
      --sizes_mb=10,100 --json_out=experiments/results/bench_tokenizer_scale.json

The sources are cut into blocks (the split of configs/recon.py, 2% held out); a training
set of S MB is the training blocks in order, repeated from the start when S is more than
the sources hold (the ``repeats`` column says how often: repeated text adds no new
strings, so it measures time, not what a larger corpus would teach; the repeats are the
same string objects, so ``loaded`` memory stops growing with them). Every
tokenizer trains in a fresh child process; its peak memory is the largest resident set of
that process and its worker processes together (sampled from /proc every 50 ms), and
``loaded`` is what the child held after reading the text, before training. fsqtok's rows
read the training set as ``fsqtok train-tokenizer`` reads a ``files:`` corpus: written to
a file first (outside the clock), then streamed from disk (`fsqtok.data.corpus.stream_split`;
``loaded`` is then the child without the text). They are its vocabulary (what encoding
needs: `fsqtok.tokenizer.build.unigram_vocabulary`; the codec adds a fixed number of steps
whatever the corpus size); ``fsqtok-sampled`` trains it on a ``--sample_mb`` sample
(`tokenizer.sample_chars`). SentencePiece loads every sentence and builds a suffix array
over them; above ``--sp_max_mb`` it trains on its own seeded sample of that many MB of
sentences (``input_sentence_size``, as its documentation advises for large corpora; the
row says so). Held-out bytes per token are measured on the same held-out blocks for every
row, each checked lossless.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SOURCES = flags.DEFINE_list("sources", ["/work/corpora/docs.txt", "/work/corpora/books.txt"],
                             "Text files to build the training sets from.")
_SIZES = flags.DEFINE_list("sizes_mb", ["10", "100"], "Training set sizes in MB.")
_TOKENIZERS = flags.DEFINE_list("tokenizers", ["fsqtok", "fsqtok-sampled", "hf-bpe",
                                               "sp-unigram"], "Tokenizers to train.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32768, "Vocabulary size of every tokenizer.")
_SAMPLE_MB = flags.DEFINE_float("sample_mb", 20.0, "fsqtok-sampled: MB of training text "
                                "the vocabulary is trained on.")
_HELD_OUT_MB = flags.DEFINE_float("held_out_mb", 1.0, "MB of held-out blocks measured.")
_SP_MAX_MB = flags.DEFINE_float("sp_max_mb", 200.0, "SentencePiece trains on a sample of "
                                "this many MB of larger training sets.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the rows here as JSON.")
_CHILD = flags.DEFINE_string("child", "", "Internal: tokenizer,size_mb,result_path.")


def _texts(size_mb: float):
  """(training blocks of ``size_mb`` MB, held-out blocks, repeats)."""
  from configs import recon as recon_config  # pylint: disable=g-import-not-at-top
  from fsqtok.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  d = recon_config.get_config("").data
  docs = []
  for path in _SOURCES.value:
    with open(path, encoding="utf-8") as f:
      docs.append(f.read())
  pool, held = corpus_lib.split_documents(docs, val_fraction=0.02, seed=d.split_seed,
                                          block_chars=d.block_chars)
  del docs
  held_out, size = [], 0
  for b in held:
    if size >= _HELD_OUT_MB.value * 1e6:
      break
    held_out.append(b)
    size += len(b.encode("utf-8"))
  pool_bytes = sum(len(b.encode("utf-8")) for b in pool)
  train, size, want = [], 0, size_mb * 1e6
  while size < want:
    for b in pool:
      train.append(b)
      size += len(b.encode("utf-8"))
      if size >= want:
        break
  return train, held_out, size / pool_bytes


def _rss_mb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def _tree(pid: int) -> list[int]:
  """``pid`` and its descendants (from /proc/*/stat)."""
  parents = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        pass
  out, frontier = [pid], [pid]
  while frontier:
    frontier = [p for p, pp in parents.items() if pp in frontier]
    out += frontier
  return out


def _child(spec: str) -> None:
  name, size_mb, result_path = spec.split(",")
  from fsqtok.tokenizer import baselines  # pylint: disable=g-import-not-at-top
  train, held_out, repeats = _texts(float(size_mb))
  train_mb = sum(len(b.encode("utf-8")) for b in train) / 1e6
  vocab = _VOCAB.value
  counting, extra = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    if name.startswith("fsqtok"):  # streamed from disk, as train-tokenizer reads files:
      path = os.path.join(tmp, "train.txt")
      with open(path, "w", encoding="utf-8") as f:
        f.writelines(train)
      del train
    loaded = _rss_mb(os.getpid())
    tic = time.perf_counter()
    if name.startswith("fsqtok"):
      from configs import recon as recon_config  # pylint: disable=g-import-not-at-top
      from fsqtok.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
      from fsqtok.tokenizer import build as tokenizer_build  # pylint: disable=g-import-not-at-top
      config = recon_config.get_config("")
      config.train.progress_bar = False
      config.data.source = f"bench:{size_mb}MB"
      if name == "fsqtok-sampled":
        config.tokenizer.sample_chars = int(_SAMPLE_MB.value * 1e6)
      blocks, _ = corpus_lib.stream_split(f"files:{path}", val_fraction=0.0, seed=0,
                                          block_chars=config.data.block_chars)
      vocab_, counting = tokenizer_build.unigram_vocabulary(
          config, tmp, blocks, tokenizer_build.learned_size(vocab))
      from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
      tok = Tokenizer(vocab_.strings, scores=vocab_.scores, phrases=vocab_.phrases,
                      max_piece_bytes=config.model.max_len)
      encode, decode = tok.encode, tok.decode
    elif name == "hf-bpe":
      tok = baselines.HFBPETokenizer.train(train, vocab)
      encode, decode = tok.encode, tok.decode
    elif name == "sp-unigram":
      max_sentences = 0
      if train_mb > _SP_MAX_MB.value:
        max_sentences = round(len(train) * _SP_MAX_MB.value / train_mb)
        extra = {"sp_sampled_sentences": max_sentences}
      tok = baselines.SentencePieceTokenizer.train(train, vocab, max_sentences=max_sentences)
      encode, decode = tok.encode, tok.decode
    else:
      raise ValueError(f"Unknown tokenizer {name!r}.")
    seconds = time.perf_counter() - tic
  n_bytes = sum(len(b.encode("utf-8")) for b in held_out)
  ids = [encode(b) for b in held_out]
  lossless = all(decode(i) == b for i, b in zip(ids, held_out))
  row = {"tokenizer": name, "size_mb": float(size_mb), "repeats": repeats, **extra,
         "train_mb": train_mb,
         "train_seconds": seconds, "loaded_mb": loaded,
         "held_out_bytes_per_token": n_bytes / sum(map(len, ids)), "lossless": lossless,
         "vocab_size": len(tok), **({"counting": counting} if counting else {})}
  with open(result_path, "w") as f:
    json.dump(row, f)


def _run(name: str, size_mb: str) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    result_path = f.name
  argv = [sys.executable, os.path.abspath(__file__), f"--child={name},{size_mb},{result_path}",
          f"--vocab_size={_VOCAB.value}", f"--sample_mb={_SAMPLE_MB.value}",
          f"--held_out_mb={_HELD_OUT_MB.value}", f"--sp_max_mb={_SP_MAX_MB.value}", f"--sources={','.join(_SOURCES.value)}"]
  tic = time.perf_counter()
  proc = subprocess.Popen(argv)
  peak = 0.0
  while proc.poll() is None:
    peak = max(peak, sum(_rss_mb(p) for p in _tree(proc.pid)))
    time.sleep(0.05)
  if proc.returncode:
    raise RuntimeError(f"{name} at {size_mb} MB failed (exit {proc.returncode}).")
  with open(result_path) as f:
    row = json.load(f)
  os.unlink(result_path)
  return {**row, "peak_rss_mb": peak, "wall_seconds": time.perf_counter() - tic}


def main(argv):
  del argv
  if _CHILD.value:
    _child(_CHILD.value)
    return
  rows = []
  print(f"\nvocabulary {_VOCAB.value}; sources {_SOURCES.value}; {os.cpu_count()} cores\n")
  print("| MB | repeats | tokenizer | train s | peak RSS MB (loaded) | held-out bytes/token | lossless |")
  print("|---|---|---|---|---|---|---|")
  for size in _SIZES.value:
    for name in _TOKENIZERS.value:
      r = _run(name, size)
      rows.append(r)
      label = (f"{name} (sample of {_SP_MAX_MB.value:g} MB)" if "sp_sampled_sentences" in r
               else name)
      print(f"| {r['train_mb']:.0f} | {r['repeats']:.2f} | {label} | {r['train_seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} ({r['loaded_mb']:.0f}) | "
            f"{r['held_out_bytes_per_token']:.3f} | {r['lossless']} |", flush=True)
      if _JSON_OUT.value:
        tmp = _JSON_OUT.value + ".tmp"
        with open(tmp, "w") as f:
          json.dump(rows, f, indent=1)
        os.replace(tmp, _JSON_OUT.value)


if __name__ == "__main__":
  app.run(main)
