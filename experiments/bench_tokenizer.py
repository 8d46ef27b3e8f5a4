"""fsqtok against the classic tokenizers, trained on the same split, same vocabulary size.

  python experiments/bench_tokenizer.py --fsqtok_workdirs=runs/builtin,runs/ts \
      --corpora=builtin,files:../shared/data/tinyshakespeare.txt --vocab_size=32768

For each corpus: the train/validation split of configs/recon.py; every tokenizer is
trained on the training blocks and measured on the held-out blocks in this run:
bytes per token, lossless (share of held-out blocks with decode(encode(x)) == x),
single-threaded encode and decode throughput, training time, artifact size on disk and
memory (the resident memory a fresh process gains by loading the artifact and encoding
the held-out text, after its libraries are imported).

fsqtok's tokenizer is built as ``fsqtok train-tokenizer`` builds it (configs/recon.py,
``tokenizer.vocabulary``: the unigram vocabulary by default). Without --fsqtok_workdirs
only its vocabulary is built (what encoding needs; the codec only adds code vectors);
with them, the whole build resumes the codec run there and its training time includes
that run's wall time from report.json. ``fsqtok-subword`` and ``fsqtok-phrases`` are its
vocabulary without multi-word phrases and with ``--phrase_fraction`` of them;
``fsqtok-filled`` is it without phrases and with the strings EM leaves unused filled
(``tokenizer.unused="fill"``), ``fsqtok-kept`` without phrases and with the strings the
search never uses on the training runs kept (``tokenizer.unused="keep"``: exactly the
size asked; the default drops them since stop 50); ``fsqtok-lines`` without phrases on
the runs whose punctuation keeps the newlines after it (``tokenizer.runs="line_ends"``,
the default since stop 48), ``fsqtok-gpt2`` without phrases on GPT-2's runs (newlines
apart; the default before), ``fsqtok-blank`` without phrases on the line-end runs with
whitespace whole but for a last space (``tokenizer.runs="blank_lines"``).
--json_out writes every row (corpus, vocabulary size, tokenizer, figures) as JSON.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-threaded Hugging Face tokenizers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import recon as recon_config  # noqa: E402
from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

_CORPORA = flags.DEFINE_list("corpora", ["builtin"], "Corpus specs.")
_WORKDIRS = flags.DEFINE_list("fsqtok_workdirs", [], "Trained codec run per corpus.")
_CONFIG = flags.DEFINE_string("fsqtok_config", "", "configs/recon.py argument of those runs.")
_VOCAB = flags.DEFINE_list("vocab_size", ["32768"], "Vocabulary sizes for every tokenizer.")
_TOKENIZERS = flags.DEFINE_list("tokenizers", [], "Tokenizers to measure (default: all).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write every row here as JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes over the held-out text.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data dir for files: corpora.")
_INVALID_UTF8 = flags.DEFINE_enum("invalid_utf8", "error", corpus_lib.INVALID_UTF8,
                                  "Bytes of a files: corpus that are not UTF-8 (data.invalid_utf8).")
_PHRASES = flags.DEFINE_list("phrase_fraction", ["0.01"], "tokenizer.phrase_fraction of the "
                             "fsqtok-phrases row; several: one row each, named "
                             "fsqtok-phrases@F (fsqtok-subword: none; fsqtok: the config's).")


# ---- the tokenizers: train(ctx, out_dir) -> (encode, decode, ids in the vocabulary) ------

def train_fsqtok(ctx, out_dir):
  from fsqtok.tokenizer import build as tokenizer_build  # pylint: disable=g-import-not-at-top
  if ctx["workdir"]:  # the whole build: vocabulary, then the codec (resumed or finished)
    tok, _ = tokenizer_build.train_tokenizer(ctx["config"], ctx["workdir"], ctx["vocab"],
                                             out_dir)
  else:  # the vocabulary alone: all that encoding needs (no codes)
    tok = tokenizer_build.unigram_tokenizer(ctx["config"], ctx["train_texts"], ctx["vocab"])
    tok.save(out_dir)
  return tok.encode, tok.decode, len(tok)


def _fsqtok_vocabulary(phrase_fraction, unused=None, runs=None):
  """fsqtok's vocabulary with ``tokenizer.phrase_fraction`` set (None: --phrase_fraction),
  ``tokenizer.unused`` and ``tokenizer.runs`` (None: the config's)."""
  def train(ctx, out_dir):
    from fsqtok.tokenizer import build as tokenizer_build  # pylint: disable=g-import-not-at-top
    config = ctx["config"].copy_and_resolve_references()
    config.tokenizer.phrase_fraction = (float(_PHRASES.value[0]) if phrase_fraction is None
                                        else phrase_fraction)
    config.tokenizer.unused = unused or config.tokenizer.unused
    config.tokenizer.runs = runs or config.tokenizer.runs
    tok = tokenizer_build.unigram_tokenizer(config, ctx["train_texts"], ctx["vocab"])
    tok.save(out_dir)
    return tok.encode, tok.decode, len(tok)
  return train


def _hf_bpe(ctx, out_dir):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.train([ctx["train_file"]], trainers.BpeTrainer(
      vocab_size=ctx["vocab"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  return (lambda t: tok.encode(t).ids), tok.decode, tok.get_vocab_size()


def _hf_word(ctx, out_dir):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece()
  tok.train([ctx["train_file"]], trainers.WordLevelTrainer(
      vocab_size=ctx["vocab"], special_tokens=["[UNK]"], show_progress=False))
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  return (lambda t: tok.encode(t).ids), tok.decode, tok.get_vocab_size()


def _sentencepiece(model_type):
  """SentencePiece as `fsqtok.tokenizer.baselines` trains it for the LM comparison: one
  block a sentence with its newlines as U+2028, no dummy prefix (lossless, and newlines
  are text it learns from, as they are to the other tokenizers)."""
  def train(ctx, out_dir):
    from fsqtok.tokenizer import baselines  # pylint: disable=g-import-not-at-top
    tok = baselines.SentencePieceTokenizer.train(ctx["train_texts"], ctx["vocab"], model_type)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sp.model"), "wb") as f:
      f.write(tok.model_proto)
    return tok.encode, tok.decode, tok.vocab_size
  return train


def _raw_bytes(ctx, out_dir):
  del ctx
  os.makedirs(out_dir, exist_ok=True)
  return ((lambda t: list(t.encode("utf-8"))),
          (lambda ids: bytes(ids).decode("utf-8", "replace")), 256)


TOKENIZERS = {
    "fsqtok": train_fsqtok,
    "fsqtok-subword": _fsqtok_vocabulary(0.0),
    "fsqtok-phrases": _fsqtok_vocabulary(None),
    "fsqtok-filled": _fsqtok_vocabulary(0.0, unused="fill"),
    "fsqtok-kept": _fsqtok_vocabulary(0.0, unused="keep"),
    "fsqtok-lines": _fsqtok_vocabulary(0.0, runs="line_ends"),
    "fsqtok-gpt2": _fsqtok_vocabulary(0.0, runs="gpt2"),
    "fsqtok-blank": _fsqtok_vocabulary(0.0, runs="blank_lines"),
    "hf-bpe-bytelevel": _hf_bpe,
    "sentencepiece-unigram": _sentencepiece("unigram"),
    "sentencepiece-bpe": _sentencepiece("bpe"),
    "word-level": _hf_word,
    "raw-bytes": _raw_bytes,
}

# How a fresh process loads each saved artifact (for the memory column).
_LOADERS = {
    **dict.fromkeys((name for name in TOKENIZERS if name.startswith("fsqtok")),
                    "from fsqtok.tokenizer.tokenizer import Tokenizer; t = Tokenizer.load(D); enc = t.encode"),
    "hf-bpe-bytelevel": "from tokenizers import Tokenizer; t = Tokenizer.from_file(D + '/tokenizer.json'); enc = lambda s: t.encode(s).ids",
    "word-level": "from tokenizers import Tokenizer; t = Tokenizer.from_file(D + '/tokenizer.json'); enc = lambda s: t.encode(s).ids",
    # (the newline mapping of `baselines.to_sentencepiece_text` inline, so that the
    # process holds SentencePiece alone; its escapes matter only to text with U+2028/9)
    **dict.fromkeys(("sentencepiece-unigram", "sentencepiece-bpe"),
                    "import sentencepiece as s; t = s.SentencePieceProcessor(model_file=D + '/sp.model'); enc = lambda x: t.encode(x.replace(chr(10), chr(0x2028)))"),
    "raw-bytes": "import sys; enc = lambda s: list(s.encode())",
}


def _memory_mb(loader: str, directory: str, text_file: str) -> float:
  """Resident memory a fresh process gains by loading the artifact and encoding the
  held-out text, measured after the libraries are imported (imports are not counted)."""
  imports, _, load = loader.partition(";") if loader.startswith(("from", "import")) else (
      "pass", "", loader)
  code = ("import sys\n"
          "def rss():\n"
          "  return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0]"
          ".split()[1]) / 1024\n"
          f"{imports}\n"
          "D, text = sys.argv[1], open(sys.argv[2], encoding='utf-8').read()\n"
          "before = rss()\n"
          f"{load.strip()}\n"
          "ids = enc(text)\n"
          "print(rss() - before)\n")
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  out = subprocess.run([sys.executable, "-c", code, directory, text_file],
                       capture_output=True, text=True, env=env, check=True)
  return float(out.stdout.strip().splitlines()[-1])


def _dir_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2**20


def _tokenizer_names() -> list[str]:
  """--tokenizers (default: all), fsqtok-phrases once per --phrase_fraction when several."""
  names = list(_TOKENIZERS.value or TOKENIZERS)
  unknown = set(names) - set(TOKENIZERS)
  if unknown:
    raise app.UsageError(f"Unknown --tokenizers {sorted(unknown)}: use {list(TOKENIZERS)}.")
  try:
    fractions = [float(f) for f in _PHRASES.value]
  except ValueError:
    raise app.UsageError(f"--phrase_fraction takes numbers, got {_PHRASES.value}.") from None
  if len(fractions) > 1 and "fsqtok-phrases" in names:
    at = names.index("fsqtok-phrases")
    names[at:at + 1] = [f"fsqtok-phrases@{f:g}" for f in fractions]
  return names


def measure(name, ctx, val_blocks, val_file, root):
  out_dir = os.path.join(root, name)
  base, _, fraction = name.partition("@")
  train = _fsqtok_vocabulary(float(fraction)) if fraction else TOKENIZERS[name]
  tic = time.perf_counter()
  encode, decode, n_ids = train(ctx, out_dir)
  train_s = time.perf_counter() - tic + (ctx["codec_seconds"] if name == "fsqtok" else 0.0)
  n_bytes = sum(len(b.encode()) for b in val_blocks)
  ids = [encode(b) for b in val_blocks]  # warm-up (caches), and the token count
  n_tokens = sum(map(len, ids))
  lossless = sum(decode(i) == b for i, b in zip(ids, val_blocks)) / len(val_blocks)
  tic = time.perf_counter()
  for _ in range(_REPEATS.value):
    for b in val_blocks:
      encode(b)
  enc_s = (time.perf_counter() - tic) / _REPEATS.value
  tic = time.perf_counter()
  for _ in range(_REPEATS.value):
    for i in ids:
      decode(i)
  dec_s = (time.perf_counter() - tic) / _REPEATS.value
  return {"tokenizer": name, "ids": n_ids, "bytes_per_token": n_bytes / n_tokens,
          "lossless": lossless,
          "encode_mb_s": n_bytes / enc_s / 1e6, "decode_mb_s": n_bytes / dec_s / 1e6,
          "train_s": train_s, "disk_mb": _dir_mb(out_dir),
          "memory_mb": _memory_mb(_LOADERS[base], out_dir, val_file)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _WORKDIRS.value and len(_WORKDIRS.value) != len(_CORPORA.value):
    raise app.UsageError("Give one --fsqtok_workdirs entry per corpus.")
  all_rows = []
  for k, spec in enumerate(_CORPORA.value):
    config = recon_config.get_config(_CONFIG.value)
    config.data.source = spec
    config.data.tfds_data_dir = _TFDS_DIR.value
    config.data.invalid_utf8 = _INVALID_UTF8.value
    d = config.data
    docs = corpus_lib.load_documents(spec, data_dir=d.tfds_data_dir or None, text_key=d.text_key,
                                     invalid_utf8=d.invalid_utf8)
    train, val = corpus_lib.split_documents(docs, val_fraction=d.val_fraction,
                                            seed=d.split_seed, block_chars=d.block_chars)
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as root:  # copies, outputs
      train_file, val_file = os.path.join(root, "train.txt"), os.path.join(root, "val.txt")
      with open(train_file, "w", encoding="utf-8") as f:
        f.write("".join(train))
      with open(val_file, "w", encoding="utf-8") as f:
        f.write("".join(val))
      names = _tokenizer_names()
      workdir = _WORKDIRS.value[k] if _WORKDIRS.value else ""
      codec_seconds = 0.0
      if workdir:
        with open(os.path.join(workdir, "recon", "report.json"), encoding="utf-8") as f:
          codec_seconds = json.load(f).get("train_wall_seconds", float("nan"))
      for vocab in map(int, _VOCAB.value):
        ctx = {"train_file": train_file, "train_texts": train, "vocab": vocab, "config": config,
               "workdir": workdir, "codec_seconds": codec_seconds}
        rows = [measure(n, ctx, val, val_file, os.path.join(root, str(vocab))) for n in names]
        print(f"\n## {spec}: vocabulary {vocab}, training {len(''.join(train).encode()) / 1e6:.1f}"
              f" MB, held-out {sum(len(b.encode()) for b in val) / 1e3:.0f} KB in {len(val)} "
              f"blocks\n")
        print("| tokenizer | ids | bytes/token | lossless | encode MB/s | decode MB/s | train s "
              "| disk MB | memory MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
          print(f"| {r['tokenizer']} | {r['ids']} | {r['bytes_per_token']:.3f} | "
                f"{r['lossless']:.1%} | {r['encode_mb_s']:.2f} | {r['decode_mb_s']:.2f} | "
                f"{r['train_s']:.1f} | {r['disk_mb']:.2f} | {r['memory_mb']:.1f} |", flush=True)
          all_rows.append({"corpus": spec, "vocab_size": vocab, **r})
        if _JSON_OUT.value:
          workdir_lib.write_json(_JSON_OUT.value, all_rows)


if __name__ == "__main__":
  app.run(main)
