"""Bits per byte of the same transformer on fsqtok, Hugging Face BPE, SentencePiece
unigram and raw-byte tokens.

  python experiments/compare_tokenizers_lm.py --config=configs/compare_lm.py --workdir=runs/compare
  python experiments/compare_tokenizers_lm.py --config=configs/compare_lm.py:dev --workdir=runs/dev

The ``dev`` setting (one corpus, 4096 ids, equal FLOPs, 3 seeds) is the one to iterate
with. One process per corpus, side by side, then merged:

  python experiments/compare_tokenizers_lm.py --config=configs/compare_lm.py \
      --config.corpora=ts=files:data/ts.txt --workdir=runs/compare_ts &  # and builtin, then:
  python experiments/compare_tokenizers_lm.py --config=configs/compare_lm.py \
      --merge=runs/compare_ts,runs/compare_builtin --workdir=runs/compare

For each corpus and vocabulary size, every tokenizer is trained on the same training split:
fsqtok as configured (``tokenizer.*`` of configs/recon.py: the unigram vocabulary by
default; its codec only for the factorized heads, from the codec run named in
``codec_workdirs``, e.g. ``ts=runs/ts``, which the build resumes or trains), byte-level
BPE, SentencePiece unigram; then every variant is trained under each budget with each
seed:

* ``bytes``: the same number of training bytes (``train_bytes``) for every model; a
  tokenizer with longer tokens takes fewer steps (and FLOPs).
* ``flops``: the same training FLOPs for every model: those the BPE model spends on
  ``train_bytes``; a tokenizer with longer tokens then sees more bytes.

Printed: held-out bits per byte (mean +- std over seeds), bytes per token, training steps,
training FLOPs per byte, training and generation bytes per second, and what in the data
differs (ids the tokenizer really uses, the share of held-out tokens that are one byte),
and a second table: held-out bits per token by how often the target id is a training
target (does a code-based embedding help rare tokens?) with the per-token loss spread.
The factorized head generates in the open code space (`generate.generate_open`: codes
outside the vocabulary decoded by the codec); its share of such codes is printed.
Written: WORKDIR/results.json and WORKDIR/bpb_vs_bytes.png (bits per byte against training
bytes and against training FLOPs).
"""
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.data import lm_data  # noqa: E402
from fsqtok.models import embeddings as embeddings_lib  # noqa: E402
from fsqtok.models import generate as generate_lib  # noqa: E402
from fsqtok.tokenizer import baselines  # noqa: E402
from fsqtok.tokenizer import build as tokenizer_build  # noqa: E402
from fsqtok.tokenizer import candidates as candidates_lib  # noqa: E402
from fsqtok.tokenizer import pieces as pieces_lib  # noqa: E402
from fsqtok.tokenizer import unigram as unigram_lib  # noqa: E402
from fsqtok.tokenizer.build import train_tokenizer  # noqa: E402
from fsqtok.tokenizer.tokenizer import VOCAB_FILE, Tokenizer  # noqa: E402
from fsqtok.train import curriculum  # noqa: E402
from fsqtok.train import lm_train  # noqa: E402
from fsqtok.train import recon  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/compare_lm.py",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_STATS_ONLY = flags.DEFINE_bool(
    "data_stats_only", False, "Only build the tokenizers and print what differs in their "
    "token streams (no training).")
_MERGE = flags.DEFINE_list(
    "merge", [], "Work directories of finished runs (e.g. one per corpus, run side by side): "
    "only merge their results.json into --workdir, print the table and plot.")
flags.mark_flags_as_required(["config", "workdir"])

VARIANTS = {  # name -> (tokenizer kind, embedding, head)
    "fsqtok-table": ("fsqtok", "table", "tied"),
    "fsqtok-factorized": ("fsqtok", "table", "factorized"),
    "fsqtok-factorized-vocab": ("fsqtok", "table", "factorized_vocab"),
    # The input-embedding cell: a table row plus the code's digit vectors (does the code
    # help rare tokens? see the loss by frequency).
    "fsqtok-table-code": ("fsqtok", "table_code", "tied"),
    # The codec itself as the embedding (bytes -> the frozen codec encoder -> an MLP; the
    # codec run of the corpus), beside the table with the same untied head.
    "fsqtok-codec": ("fsqtok", "codec", "dense"),
    "fsqtok-table-dense": ("fsqtok", "table", "dense"),
    # fsqtok's vocabulary segmented by the fewest tokens (ties: longest last token)
    # instead of the unigram LM's Viterbi: the segmentation cell of the decomposition.
    "fsqtok-fewest-table": ("fsqtok-fewest", "table", "tied"),
    # The multi-word cell: fsqtok's unigram vocabulary with phrases added after the
    # subwords (``phrase_fraction`` of the learned strings) and without any.
    "fsqtok-phrases-table": ("fsqtok-phrases", "table", "tied"),
    "fsqtok-subword-table": ("fsqtok-subword", "table", "tied"),
    # The pre-tokenizer cell, whatever the config says: runs whose punctuation keeps the
    # newlines after it (``tokenizer.runs="line_ends"``, the default since stop 48: ":\n",
    # ".\n\n" can be tokens), and GPT-2's runs (newlines apart; the default before).
    "fsqtok-lines-table": ("fsqtok-lines", "table", "tied"),
    "fsqtok-lines-ranked-vocab": ("fsqtok-lines", "table", "factorized_vocab"),
    "fsqtok-gpt2-table": ("fsqtok-gpt2", "table", "tied"),
    # The line-end runs with whitespace whole but for a last space (``"blank_lines"``:
    # "\n\n" before a word is one run, not two).
    "fsqtok-blank-table": ("fsqtok-blank", "table", "tied"),
    # BPE's strings scored by unigram EM on the same runs, Viterbi segmentation: the
    # vocabulary cell of the decomposition (BPE's vocabulary, fsqtok's segmentation).
    "bpe-vocab-unigram": ("bpe-vocab-unigram", "table", "tied"),
    "hf-bpe": ("hf-bpe", "table", "tied"),
    # The factorized head with codes of frequency rank instead of the codec's
    # (`fsqtok.models.embeddings.frequency_codes`: an adaptive softmax by frequency bands),
    # on BPE's, SentencePiece's and fsqtok's tokens: do the codec's codes matter, or the
    # head's shape?
    "hf-bpe-ranked-vocab": ("hf-bpe", "table", "factorized_vocab"),
    "fsqtok-ranked-vocab": ("fsqtok", "table", "factorized_vocab"),
    "sp-unigram": ("sp-unigram", "table", "tied"),
    "sp-unigram-ranked-vocab": ("sp-unigram", "table", "factorized_vocab"),
    "raw-bytes": ("raw-bytes", "table", "tied"),
}
# fsqtok's tokenizer kinds that fix the run style whatever the config says (tokenizer.runs)
RUNS_OF_KIND = {"fsqtok-lines": "line_ends", "fsqtok-gpt2": "gpt2", "fsqtok-blank": "blank_lines"}
FLAT_SUFFIX = "-flat"  # "<a factorized variant>-flatK": its head keeps K tokens flat


def variant(name: str) -> tuple[str, str, str, int | None]:
  """``(tokenizer kind, embedding, head, head_flat_tokens)`` of a variant name: one of
  `VARIANTS` (``head_flat_tokens`` None: the config's ``lm.model.head_flat_tokens``), or a
  factorized one with ``-flatK`` (the K most frequent coded tokens get their own row in
  the head's first softmax)."""
  base, flat = name, None
  if FLAT_SUFFIX in name:
    base, _, k = name.rpartition(FLAT_SUFFIX)
    if not k.isdigit() or base not in VARIANTS or not VARIANTS[base][2].startswith("factorized"):
      raise ValueError(f"Variant {name!r}: '-flatK' (K a number) follows a factorized "
                       f"variant, e.g. fsqtok-factorized-vocab-flat1024.")
    flat = int(k)
  if base not in VARIANTS:
    raise ValueError(f"Unknown variant {name!r}: choose from {sorted(VARIANTS)} (factorized "
                     f"ones optionally with '-flatK').")
  return (*VARIANTS[base], flat)


# Heads and embeddings over FSQ codes need the codec.
NEEDS_CODES = ("factorized", "factorized_vocab", "table_code", "code_factorized", "codec")
RANKED = "-ranked-vocab"  # variants whose factorized head uses frequency-rank codes
TOKENIZER_SETTINGS = "compare_settings.json"  # beside a kept fsqtok tokenizer: what made it


def _tokenizer(kind, config, corpus, spec, vocab, texts, pieces, codec_dir, out):
  """The tokenizer of ``kind``; fsqtok's is built as configured (``tokenizer.*``) and kept
  in ``out``: the whole build with the codec run in ``codec_dir`` if one is given, else
  the unigram vocabulary alone (all a table embedding needs)."""
  if kind == "raw-bytes":
    return baselines.ByteTokenizer()
  if kind == "hf-bpe":
    return baselines.HFBPETokenizer.train(texts[0], vocab)
  if kind == "sp-unigram":
    return baselines.SentencePieceTokenizer.train(texts[0], vocab)
  if kind == "bpe-vocab-unigram":
    size = tokenizer_build.learned_size(vocab)
    bpe_strings = baselines.HFBPETokenizer.train(texts[0], vocab).strings()
    v = unigram_lib.train_unigram(unigram_lib.count_pieces(texts[0]), size, seeds=bpe_strings,
                                  max_token_bytes=config.model.max_len)
    return Tokenizer(v.strings[:size], scores=v.scores[:size])
  phrase_fraction = {"fsqtok-phrases": config.phrase_fraction, "fsqtok-subword": 0.0}.get(
      kind, config.tokenizer.phrase_fraction)
  runs = RUNS_OF_KIND.get(kind, config.tokenizer.runs)
  configured = (phrase_fraction == config.tokenizer.phrase_fraction
                and runs == config.tokenizer.runs)
  tok_dir = os.path.join(out, f"tok_{corpus}_{vocab}" + (
      "" if phrase_fraction == config.tokenizer.phrase_fraction else
      f"_phrases{phrase_fraction}") + ("" if runs == config.tokenizer.runs else f"_{runs}"))
  c = config.copy_and_resolve_references()
  c.data.source = spec
  c.tokenizer.phrase_fraction = phrase_fraction
  c.tokenizer.runs = runs
  # what made it: a tokenizer kept from a run with other settings is never reused
  settings = json.loads(json.dumps({"corpus": spec, "vocab": vocab, "max_len": c.model.max_len,
                                    "codec": bool(codec_dir and configured),
                                    "tokenizer": c.tokenizer.to_dict()}))
  settings_path = os.path.join(tok_dir, TOKENIZER_SETTINGS)
  if not os.path.exists(os.path.join(tok_dir, VOCAB_FILE)):
    if codec_dir and configured:  # the other phrase settings are for table heads only
      train_tokenizer(c, codec_dir, vocab, tok_dir, texts=texts, pieces=pieces)
    else:
      tokenizer_build.unigram_tokenizer(c, texts[0], vocab, tok_dir + ".work").save(tok_dir)
    workdir_lib.write_json(settings_path, settings)
  kept = workdir_lib.read_saved_json(settings_path)
  if kept is not None and kept != settings:
    changed = sorted(k for k in settings if kept.get(k) != settings[k])
    raise ValueError(f"{tok_dir} was made with other settings ({', '.join(changed)} differ), "
                     f"and its runs with it: use a new --workdir (or delete that one).")
  tok = Tokenizer.load(tok_dir)
  if kind == "fsqtok-fewest":
    strings = [tok.id_to_token(i) for i in tok.learned_ids]
    return Tokenizer(strings, max_piece_bytes=tok.max_piece_bytes)
  return tok


def _generation(model, params, tok, n_tokens: int, codec_and_params=None):
  """Generation bytes per second (one sequence, after compilation) and, for the factorized
  head with the codec (``codec_and_params``), the share of steps that drew a code outside
  the vocabulary; without the codec it samples the vocabulary's distribution."""
  if model.head.startswith("factorized") and codec_and_params is not None:
    codec, codec_params = codec_and_params
    run = lambda seed: generate_lib.generate_open(
        model, params, tok, codec, codec_params, [[tok.bos_id]], jax.random.PRNGKey(seed),
        max_new_tokens=n_tokens)[0]
  else:
    run = lambda seed: {"ids": generate_lib.generate(
        model, params, [[tok.bos_id]], jax.random.PRNGKey(seed), max_new_tokens=n_tokens,
        eos_id=-1, pad_id=tok.pad_id, temperature=1.0)[0]}
  run(0)  # compile
  tic = time.perf_counter()
  out = run(1)
  seconds = time.perf_counter() - tic
  # the text without special tokens (a sampled [EOS] is not text), as the baselines decode
  text = out["text"] if "text" in out else tok.decode(out["ids"], skip_special_tokens=True)
  open_share = out["open_codes"] / max(out["codes"], 1) if "codes" in out else float("nan")
  return {"generation_bytes_per_second": len(text.encode("utf-8")) / seconds,
          "open_code_share": open_share, "sample": text[:200]}


def _token_lengths(tok) -> np.ndarray:
  """Bytes per id (0 for specials)."""
  if hasattr(tok, "token_lengths"):  # the baselines
    return np.asarray(tok.token_lengths())
  return np.array([len(tok.token_bytes(i) or b"") for i in range(len(tok))])


def segmentation_consistency(tok, texts) -> dict[str, float]:
  """How regular a tokenizer's segmentation is on ``texts``: over the word types (runs of
  `fsqtok.tokenizer.pieces.split_runs`) seen at least twice, the share whose occurrences are not all
  cut the same way (token boundaries inside the run, and whether a token crosses its
  edges), and the share of run occurrences that a token crosses."""
  lengths = _token_lengths(tok)
  cuts: dict[str, set] = {}
  seen: dict[str, int] = {}
  crossed = occurrences = 0
  for text in texts:
    bounds = set(np.cumsum(lengths[np.asarray(tok.encode(text), np.int64)]).tolist())
    start = 0
    for run in pieces_lib.split_runs(text):
      end = start + len(run.encode("utf-8"))
      inside = tuple(b - start for b in range(start + 1, end) if b in bounds)
      cross = (start > 0 and start not in bounds) or end not in bounds
      cuts.setdefault(run, set()).add((inside, cross))
      seen[run] = seen.get(run, 0) + 1
      crossed += cross
      occurrences += 1
      start = end
  repeated = [r for r, n in seen.items() if n >= 2]
  return {"inconsistent_types": float(np.mean([len(cuts[r]) > 1 for r in repeated]))
                                if repeated else 0.0,
          "crossed_runs": crossed / max(occurrences, 1)}


def _data_stats(tok, data) -> dict[str, float]:
  """What differs in the token streams: ids used in training, the share of held-out tokens
  that are one byte or rare (seen < 10 times in training), and the held-out bits per byte
  of a unigram model of the training tokens (add-one smoothed): what token frequencies
  alone predict."""
  lengths = _token_lengths(tok)
  val = data.val["targets"][data.val["weights"] > 0]
  train = data.train["targets"][data.train["weights"] > 0]
  counts = np.bincount(train, minlength=len(tok)).astype(np.float64)
  unigram_bits = -np.log2((counts[val] + 1) / (counts.sum() + len(tok))).sum()
  return {"ids_used": int((counts > 0).sum()),
          "one_byte_share": float(np.mean(lengths[val] == 1)),
          "rare_share": float(np.mean(counts[val] < 10)),
          "unigram_bits_per_byte": float(unigram_bits / data.val_bytes)}


FREQUENCY_EDGES = (10, 100, 1000)  # buckets of a target's count among the training targets


def loss_by_frequency(model, params, data, vocab_size: int, batch_size: int = 64
                      ) -> dict[str, list[float]]:
  """Held-out loss in bits per token by how often the target id is a training target
  (buckets ``< 10``, ``10-99``, ``100-999``, ``>= 1000``), each bucket's share of the
  targets, and the spread (std) of the per-token loss."""
  counts = data.token_counts(vocab_size)
  log_probs = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["valid"],
                                               b["targets"], method="target_log_probs"))
  bits, buckets = [], []
  for batch in lm_data.eval_batches(data.val, batch_size):
    keep = batch["weights"] > 0
    bits.append(-np.asarray(log_probs(params, batch))[keep] / np.log(2))
    buckets.append(np.searchsorted(FREQUENCY_EDGES, counts[batch["targets"][keep]],
                                   side="right"))
  bits, buckets = np.concatenate(bits), np.concatenate(buckets)
  n = np.bincount(buckets, minlength=len(FREQUENCY_EDGES) + 1)
  total = np.bincount(buckets, weights=bits, minlength=len(FREQUENCY_EDGES) + 1)
  return {"bits_per_token_by_frequency": (total / np.maximum(n, 1)).tolist(),
          "share_by_frequency": (n / max(n.sum(), 1)).tolist(),
          "token_loss_std": float(bits.std())}


def run_one(config, workdir, name, tok, texts, seed, *, budget, target_flops, codec_and_params):
  kind, embedding, head, flat = variant(name)
  c = config.copy_and_resolve_references()
  c.seed = seed
  c.lm.model.embedding, c.lm.model.head = embedding, head
  if flat is not None:
    c.lm.model.head_flat_tokens = flat
  data = lm_data.LMData(tok, texts, c.lm.data.seq_len)
  bytes_per_token = data.train_bytes / float(np.sum(data.train["weights"]))
  tokens_per_step = c.lm.data.batch_size * c.lm.data.seq_len
  codec, codec_params = codec_and_params or (None, None)
  if RANKED in name:
    c.lm.model.head_codes = "frequency"
  if kind == "fsqtok" or kind in RUNS_OF_KIND:
    model = curriculum.build_lm(c, tok, codec, token_counts=data.token_counts(len(tok)))
  elif RANKED in name:
    model = _ranked_lm(c, tok, data.token_counts(len(tok)))
  else:
    model = _plain_lm(c, tok)
  flops_per_token = lm_train.flops_per_token(model, c.lm.data.seq_len)
  if budget == "bytes":
    steps = round(c.train_bytes / (tokens_per_step * bytes_per_token))
  else:
    steps = round(target_flops / (tokens_per_step * flops_per_token))
  steps = max(1, steps)
  c.lm.train.num_steps = steps
  c.lm.train.eval_every = max(1, steps // c.lm.train.evals_per_run)
  def init():
    params = model.init(jax.random.PRNGKey(seed),
                        jnp.zeros((1, c.lm.data.seq_len), jnp.int32))["params"]
    return params if model.codec is None else {**params, "codec": codec_params}

  run_dir = os.path.join(workdir, "runs", f"{name}_{budget}_seed{seed}")
  report, params = lm_train.train_lm_phase("lm", c, run_dir, model, data, init,
                                           frozen=("codec",))
  curve = [(r["step"] * tokens_per_step * bytes_per_token,
            r["step"] * tokens_per_step * flops_per_token, r["bits_per_byte"])
           for r in workdir_lib.MetricsLog.read(os.path.join(run_dir, "lm", "metrics.jsonl"))
           if r["split"] == "validation"]
  return {"variant": name, "budget": budget, "seed": seed, "vocab": len(tok), "steps": steps,
          "phrases": len(getattr(tok, "phrases", ())),
          "head_flat_tokens": len(embeddings_lib.flat_ids(model)) if head.startswith(
              "factorized") else 0,
          "bits_per_byte": report["validation"]["bits_per_byte"],
          "bytes_per_token": report["validation"]["bytes_per_token"],
          "train_bytes_seen": steps * tokens_per_step * bytes_per_token,
          "train_flops": steps * tokens_per_step * flops_per_token,
          "train_bytes_per_second": report["train_tokens_per_second"] * bytes_per_token,
          "flops_per_byte": flops_per_token / bytes_per_token,
          **_generation(model, params, tok, c.generation_tokens,
                        None if RANKED in name else codec_and_params),
          **_data_stats(tok, data), **segmentation_consistency(tok, texts[1]),
          **loss_by_frequency(model, params, data, len(tok)), "curve": curve}


def _plain_lm(config, tok):
  from fsqtok.models import lm as lm_lib  # pylint: disable=g-import-not-at-top
  return lm_lib.lm_from_config(config.lm.model, tok.vocab_size)


def _ranked_lm(config, tok, token_counts):
  """A peer's LM with a factorized head over frequency-rank codes (every token but the
  specials gets one; fsqtok's: ``lm.model.head_codes='frequency'`` of the curriculum)."""
  from fsqtok.models import lm as lm_lib  # pylint: disable=g-import-not-at-top
  coded = np.ones(len(tok), bool)
  coded[[tok.pad_id, tok.bos_id, tok.eos_id]] = False
  codes = embeddings_lib.frequency_codes(token_counts, coded, config.model.levels)
  return lm_lib.lm_from_config(config.lm.model, len(tok), token_codes=codes,
                               levels=config.model.levels, token_counts=token_counts)


def _plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = sorted({(r["corpus"], r["requested_vocab"]) for r in results})
  budgets = [b for b in ("bytes", "flops") if any(r["budget"] == b for r in results)]
  labels = list(dict.fromkeys(_label(_row_key(r)) for r in results))
  fig, axes = plt.subplots(len(budgets), len(groups), figsize=(5 * len(groups), 3.8 * len(budgets)),
                           squeeze=False)
  for row, budget in enumerate(budgets):
    x_index, x_label = (0, "training MB") if budget == "bytes" else (1, "training TFLOPs")
    scale = 1e6 if budget == "bytes" else 1e12
    for ax, (corpus, vocab) in zip(axes[row], groups):
      if not any((r["corpus"], r["requested_vocab"], r["budget"]) == (corpus, vocab, budget)
                 for r in results):
        ax.set_visible(False)  # this budget was not run for this corpus
        continue
      for color, name in enumerate(labels):  # one colour per variant in every panel
        runs = [r for r in results if (r["corpus"], r["requested_vocab"], r["budget"])
                == (corpus, vocab, budget) and _label(_row_key(r)) == name]
        if runs:
          n = min(len(r["curve"]) for r in runs)
          x = np.mean([[p[x_index] for p in r["curve"][:n]] for r in runs], axis=0)
          y = np.mean([[p[2] for p in r["curve"][:n]] for r in runs], axis=0)
          ax.plot(x / scale, y, marker="o", label=name, color=f"C{color}")
      ax.set(title=f"{corpus}, vocabulary {vocab}, equal {budget}", xlabel=x_label,
             ylabel="held-out bits/byte")
      ax.legend()
  fig.tight_layout()
  workdir_lib.save_figure(fig, path)


def _reference_flops(config, tok_bpe, texts) -> float:
  """Training FLOPs of the BPE model on ``train_bytes``: the ``flops`` budget."""
  data = lm_data.LMData(tok_bpe, texts, config.lm.data.seq_len)
  tokens = config.train_bytes * float(np.sum(data.train["weights"])) / data.train_bytes
  return tokens * lm_train.flops_per_token(_plain_lm(config, tok_bpe), config.lm.data.seq_len)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config, out = _CONFIG.value, _WORKDIR.value
  os.makedirs(out, exist_ok=True)
  if _MERGE.value:
    results = []
    for d in _MERGE.value:
      path = os.path.join(d, "results.json")
      if not os.path.exists(path):
        raise app.UsageError(f"--merge: {path} does not exist (has that run finished?).")
      results += workdir_lib.read_json(path)
    # One row per run: a run merged twice (or listed twice by an older grid) counts once.
    unique = {(*_row_key(r), r["seed"]): r for r in results}
    results = list(unique.values())
    workdir_lib.write_json(os.path.join(out, "results.json"), results)
    _plot(results, os.path.join(out, "bpb_vs_bytes.png"))
    print(results_table(results))
    return
  try:
    corpora = corpus_lib.parse_named(config.corpora)
    codec_dirs = corpus_lib.parse_named(config.codec_workdirs, "codec_workdirs")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    for name in config.variants:
      variant(name)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  unknown = set(config.budgets) - {"bytes", "flops"}
  if unknown:
    raise app.UsageError(f"Unknown budgets {sorted(unknown)}: use 'bytes' and/or 'flops'.")
  results = []
  if _STATS_ONLY.value:
    print("| corpus | vocab | tokenizer | ids (used) | held-out bytes/token | 1-byte tokens "
          "| rare tokens (< 10 in training) | unigram bits/byte | word types cut "
          "inconsistently | runs crossed by a token |\n|---|---|---|---|---|---|---|---|---|---|")
  for corpus, spec in corpora.items():
    c = config.copy_and_resolve_references()
    c.data.source = spec
    texts = corpus_lib.load_split(c.data)
    codec_exact = c.tokenizer.vocabulary == "codec_exact"
    if codec_exact and corpus not in codec_dirs:
      raise app.UsageError(f"tokenizer.vocabulary='codec_exact' needs a codec run: give "
                           f"codec_workdirs={corpus}=DIR.")
    pieces = candidates_lib.load_pieces(c, texts) if codec_exact else None
    codec = None
    byte_runs = {}  # raw bytes under the bytes budget do not depend on the vocabulary size
    for vocab in config.vocab_sizes:
      toks = {"hf-bpe": _tokenizer("hf-bpe", c, corpus, spec, vocab, texts, pieces, None, out)}
      if _STATS_ONLY.value:
        _print_data_stats(c, corpus, spec, vocab, texts, pieces, codec_dirs, toks, out)
        continue
      target_flops = _reference_flops(c, toks["hf-bpe"], texts)
      for budget in config.budgets:
        for name in config.variants:
          kind, embedding, head, _ = variant(name)
          needs_codec = bool({embedding, head} & set(NEEDS_CODES)) and RANKED not in name
          if needs_codec and corpus not in codec_dirs:
            logging.warning("No codec run for %s: skipping %s.", corpus, name)
            continue
          if name == "hf-bpe" and budget == "flops" and "bytes" in config.budgets:
            continue  # the same runs: the flops budget is what BPE spends on train_bytes
          if kind not in toks:
            toks[kind] = _tokenizer(kind, c, corpus, spec, vocab, texts, pieces,
                                    codec_dirs.get(corpus), out)
          if needs_codec and (head.startswith("factorized") or embedding == "codec") \
              and codec is None:
            codec = recon.load_trained_codec(tokenizer_build.codec_config(c), codec_dirs[corpus])
          for seed in config.seeds:
            if kind == "raw-bytes" and budget == "bytes" and seed in byte_runs:
              r = byte_runs[seed]
            else:
              r = run_one(c, os.path.join(out, corpus, str(vocab)), name, toks[kind], texts,
                          seed, budget=budget, target_flops=target_flops,
                          codec_and_params=codec)
              if kind == "raw-bytes" and budget == "bytes":
                byte_runs[seed] = r
            results.append({**r, "corpus": corpus, "requested_vocab": vocab})
            if name == "hf-bpe" and budget == "bytes" and "flops" in config.budgets:
              results.append({**r, "budget": "flops", "corpus": corpus, "requested_vocab": vocab})
            print(f"{corpus} {vocab} {budget} {name} seed {seed}: {r['bits_per_byte']:.4f} "
                  f"bits/byte", flush=True)
          workdir_lib.write_json(os.path.join(out, "results.json"), results)
  if _STATS_ONLY.value:
    return
  workdir_lib.write_json(os.path.join(out, "results.json"), results)
  _plot(results, os.path.join(out, "bpb_vs_bytes.png"))
  print(results_table(results))


def _print_data_stats(c, corpus, spec, vocab, texts, pieces, codec_dirs, toks, out):
  kinds = ["hf-bpe", "sp-unigram", "raw-bytes", "fsqtok", "fsqtok-fewest", "fsqtok-gpt2"]
  for kind in kinds:
    if kind not in toks:
      toks[kind] = _tokenizer(kind, c, corpus, spec, vocab, texts, pieces,
                              codec_dirs.get(corpus), out)
    data = lm_data.LMData(toks[kind], texts, c.lm.data.seq_len)
    st = _data_stats(toks[kind], data)
    seg = segmentation_consistency(toks[kind], texts[1])
    print(f"| {corpus} | {vocab} | {kind} | {len(toks[kind])} ({st['ids_used']}) "
          f"| {data.val_bytes / float(np.sum(data.val['weights'])):.3f} "
          f"| {st['one_byte_share']:.1%} | {st['rare_share']:.2%} "
          f"| {st['unigram_bits_per_byte']:.3f} | {seg['inconsistent_types']:.2%} "
          f"| {seg['crossed_runs']:.2%} |", flush=True)


def _row_key(r) -> tuple:
  """A table row: corpus, vocabulary size, budget, variant and its number of phrases."""
  return r["corpus"], r["requested_vocab"], r["budget"], r["variant"], r.get("phrases", 0)


def _label(key) -> str:
  return key[3] + (f" ({key[4]} phrases)" if key[4] else "")


def results_table(results) -> str:
  """The markdown table of ``results`` (mean ± std over seeds per row)."""
  lines = ["| corpus | vocab | budget | tokenizer | ids (used) | bytes/token | 1-byte tokens "
           "| steps | train MB | bits/byte (mean ± std) | GFLOPs/MB | train KB/s | generate B/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  keys = []
  for r in results:
    key = _row_key(r)
    if key not in keys:
      keys.append(key)
  for key in keys:
    runs = [r for r in results if _row_key(r) == key]
    bpb = np.array([r["bits_per_byte"] for r in runs])
    mean = lambda k, runs=runs: float(np.mean([r[k] for r in runs]))
    std = bpb.std(ddof=1) if len(bpb) > 1 else 0.0
    name = _label(key) + (f" ({mean('open_code_share'):.0%} open codes)"
                          if key[3] == "fsqtok-factorized" else "")
    lines.append(
        f"| {key[0]} | {key[1]} | {key[2]} | {name} | {runs[0]['vocab']} ({runs[0]['ids_used']}) "
        f"| {mean('bytes_per_token'):.3f} | {mean('one_byte_share'):.1%} | {runs[0]['steps']} "
        f"| {mean('train_bytes_seen') / 1e6:.2f} | {bpb.mean():.4f} ± {std:.4f} "
        f"| {mean('flops_per_byte') * 1e6 / 1e9:.0f} | {mean('train_bytes_per_second') / 1e3:.1f} "
        f"| {mean('generation_bytes_per_second'):.0f} |")
  measured = [k for k in keys if all("bits_per_token_by_frequency" in r
                                     for r in results if _row_key(r) == k)]
  if measured:  # (runs of older versions did not measure it)
    edges = FREQUENCY_EDGES
    labels = [f"< {edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [
        f">= {edges[-1]}"]
    lines += ["", "Held-out bits per token by how often the target is a training target "
              "(share of targets), and the per-token loss spread:", "",
              "| corpus | vocab | budget | tokenizer | " + " | ".join(labels) + " | std |",
              "|---|---|---|---|" + "---|" * (len(labels) + 1)]
    for key in measured:
      runs = [r for r in results if _row_key(r) == key]
      bits = np.mean([r["bits_per_token_by_frequency"] for r in runs], axis=0)
      share = np.mean([r["share_by_frequency"] for r in runs], axis=0)
      cells = " | ".join(f"{b:.2f} ({s:.0%})" for b, s in zip(bits, share))
      std = np.mean([r["token_loss_std"] for r in runs])
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {_label(key)} | {cells} | {std:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
