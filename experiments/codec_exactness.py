"""How much of a unigram vocabulary the codec reconstructs exactly, and what moves it.

  python experiments/codec_exactness.py --corpus=files:/work/corpora/docs.txt \
      --vocab_size=32768 --steps=4000 \
      --variants="base;optim.learning_rate=1e-2;model.embed_dim=128" \
      --json_out=experiments/results/codec_exactness.json

The vocabulary is built once (the tokenizer build's `unigram_vocabulary`, kept in
``--workdir``), then the codec of ``configs/recon.py`` trains on exactly its strings
once per variant (``;``-separated, each a ``,``-separated list of config overrides
``field=value``; ``base``: the config as it is: `configs/recon.py`'s codec, lr 3e-3 and a
plain decoder; the tokenizer build's codec is the variant
``optim.learning_rate=1e-2,model.dec_fourier_octaves=3``, what
`tokenizer_build.codec_config` makes of the default config), as the build does. Per
variant: the share of the strings its encoder's code decodes back exactly, the same
weighted by the strings' expected uses, the distinct codes among them, and the training
wall time (run one variant at a time on an otherwise idle machine to compare times).
With ``--decoder_steps``: the codes assigned as the build assigns them
(`tokenizer_build.distinct_codes`), how many decode exactly, and the same after the
decoder alone has learned them (`fsqtok.codec.memorize.learn_by_heart`, the build's
``tokenizer.decoder_steps``; ``--decoder_rounds``: the build's ``decoder_rounds.num``).
"""
import ast
import hashlib
import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import recon as recon_config  # noqa: E402
from fsqtok.codec import evaluate as evaluate_lib  # noqa: E402
from fsqtok.codec import memorize  # noqa: E402
from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.tokenizer import build as tokenizer_build  # noqa: E402
from fsqtok.train import recon  # noqa: E402
from fsqtok.train import sharding as sharding_lib  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

_CORPUS = flags.DEFINE_string("corpus", "builtin", "Corpus spec.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size (every id).")
_STEPS = flags.DEFINE_integer("steps", 4000, "Codec training steps of every variant.")
_VARIANTS = flags.DEFINE_string("variants", "base", "';'-separated override lists.")
_CONFIG = flags.DEFINE_string("config", "", "configs/recon.py argument.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data dir for files: corpora.")
_INVALID_UTF8 = flags.DEFINE_enum("invalid_utf8", "error", corpus_lib.INVALID_UTF8,
                                  "Bytes of a files: corpus that are not UTF-8 (data.invalid_utf8).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/codec_exactness", "Where runs go.")
_JSON = flags.DEFINE_string("json_out", "", "Also write the rows here.")
_DECODER_STEPS = flags.DEFINE_integer(
    "decoder_steps", 0, "Then train the decoder alone this many steps on the strings' "
    "assigned codes (fsqtok/codec/memorize.py); 0: not.")
_DECODER_LR = flags.DEFINE_float("decoder_lr", 3e-3, "Its peak learning rate.")
_DECODER_ROUNDS = flags.DEFINE_integer(
    "decoder_rounds", 0, "Then at most this many rounds of tokenizer.decoder_rounds (free "
    "codes that decode, the missed strings more often) until every string is exact.")


def apply_overrides(config, variant: str):
  """``field=value,...`` on a ConfigDict (values parsed as Python literals)."""
  for item in filter(None, variant.split(",")):
    if item == "base":
      continue
    field, _, value = item.partition("=")
    node, *path = config, *field.split(".")
    for name in path[:-1]:
      node = node[name]
    old = node[path[-1]]
    new = value if isinstance(old, str) else ast.literal_eval(value)
    same_type = isinstance(new, type(old)) and isinstance(old, bool) == isinstance(new, bool)
    widened = isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool)
    if old is not None and not (same_type or widened):
      raise ValueError(f"Variant {variant!r} sets {field}={value!r}, a "
                       f"{type(new).__name__}; the field holds a {type(old).__name__} "
                       f"({old!r}): give a value of that type.")
    node[path[-1]] = type(old)(new) if isinstance(old, float) else new
  return config


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  base = recon_config.get_config(_CONFIG.value)
  base.data.source, base.data.tfds_data_dir = _CORPUS.value, _TFDS_DIR.value
  base.train.num_steps = _STEPS.value
  base.train.eval_every = base.train.checkpoint_every = _STEPS.value
  d = base.data
  d.invalid_utf8 = _INVALID_UTF8.value
  train, _ = corpus_lib.stream_split(d.source, data_dir=d.tfds_data_dir or None,
                                     val_fraction=d.val_fraction, seed=d.split_seed,
                                     block_chars=d.block_chars, invalid_utf8=d.invalid_utf8)
  vocab, _ = tokenizer_build.unigram_vocabulary(
      base, os.path.join(_WORKDIR.value, "vocab"), train,
      tokenizer_build.learned_size(_VOCAB.value))
  rows = []
  print("| variant | strings | steps | exact strings | exact uses | distinct codes | "
        "train s |\n|---|---|---|---|---|---|---|")
  for i, variant in enumerate(v.strip() for v in _VARIANTS.value.split(";")):
    config = apply_overrides(recon_config.get_config(_CONFIG.value), variant)
    config.data.source, config.data.tfds_data_dir = d.source, d.tfds_data_dir
    config.data.invalid_utf8 = d.invalid_utf8
    config.train.num_steps = _STEPS.value
    config.train.eval_every = config.train.checkpoint_every = _STEPS.value
    strings = tokenizer_build.vocabulary_pieces(vocab, config.model.max_len)
    # a run directory per variant and vocabulary: one run of the same name and other
    # settings would otherwise be taken for finished and reported under the new name
    key = json.dumps({"variant": variant, "config": _CONFIG.value, "steps": _STEPS.value,
                      "strings": hashlib.sha256("\n".join(vocab.strings).encode()).hexdigest()},
                     sort_keys=True)
    workdir = os.path.join(_WORKDIR.value,
                           f"variant{i}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    tic = time.perf_counter()
    recon.train_recon(config, workdir, (strings, strings))
    seconds = time.perf_counter() - tic
    model, params = recon.load_trained_codec(config, workdir)
    stats = evaluate_lib.compute_piece_stats(
        model, params, strings, batch_size=config.train.eval_batch_size,
        mesh=sharding_lib.data_mesh(config.train.num_devices))
    exact, counts = np.asarray(stats["exact"]), strings.counts_N
    row = {"variant": variant, "corpus": d.source, "vocab_size": _VOCAB.value,
           "strings": int(exact.size), "steps": _STEPS.value,
           "exact_strings": float(exact.mean()),
           "exact_uses": float(np.dot(exact, counts) / counts.sum()),
           "distinct_codes": int(np.unique(stats["code"]).size), "train_seconds": seconds}
    # As the build does: one distinct code per string (exact strings first, then the most
    # used), then how many of those assigned codes decode to their string.
    order = np.lexsort((np.arange(exact.size), -counts, ~exact))
    codes = tokenizer_build.distinct_codes(np.asarray(stats["code"]), order,
                                           config.model.levels)
    row["assigned_exact_strings"] = float(memorize.decodes_exactly(model, params, codes,
                                                                   strings).mean())
    if _DECODER_STEPS.value:
      optim = config.optim.copy_and_resolve_references()
      optim.learning_rate, optim.warmup_steps = _DECODER_LR.value, 100
      rounds = config.tokenizer.decoder_rounds.copy_and_resolve_references()
      rounds.num = _DECODER_ROUNDS.value
      tic = time.perf_counter()
      params, codes, report = memorize.learn_by_heart(
          model, params, codes, strings, optim=optim, num_steps=_DECODER_STEPS.value,
          batch_size=config.data.batch_size, seed=config.seed, rounds=rounds)
      row.update(decoder_steps=_DECODER_STEPS.value, decoder_lr=_DECODER_LR.value,
                 decoder_seconds=time.perf_counter() - tic,
                 decoder_exact_strings=report["rounds"][0]["exact"],
                 decoder_rounds=report["rounds"],
                 decoder_rounds_exact_strings=report["exact"],
                 not_exact_examples=[strings.piece_bytes(int(k)).decode("utf-8")
                                     for k in report["not_exact"][:40]])
    rows.append(row)
    print(row, flush=True)
    print(f"| {variant} | {row['strings']} | {row['steps']} | {row['exact_strings']:.1%} | "
          f"{row['exact_uses']:.1%} | {row['distinct_codes']} | {seconds:.0f} |", flush=True)
  if _JSON.value:
    workdir_lib.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
