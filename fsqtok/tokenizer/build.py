"""From a corpus to a saved tokenizer.

``config.tokenizer.vocabulary`` picks the order of the two steps:

* ``"unigram"`` (default): **vocabulary first, codec second.** A unigram-LM vocabulary is
  trained on the corpus (`fsqtok.tokenizer.unigram`: EM and likelihood pruning to the
  requested size; on a corpus small for it the strings its search never uses are
  dropped, ``tokenizer.unused``); then the codec is trained on exactly those strings
  (`fsqtok.train.recon`), and every string gets its own FSQ code: the code its encoder gives,
  or, where two strings share one, the nearest free code for the one the decoder does not
  reconstruct (`distinct_codes`). How many strings decode exactly is reported; encoding
  never depends on it (the tokenizer works on strings, `fsqtok.tokenizer.tokenizer`).
* ``"codec_exact"`` (the first design, kept for comparison): the codec is trained on
  candidate strings and the vocabulary is chosen for compression among those it
  reconstructs exactly (`fsqtok.tokenizer.vocab`); segmentation by the fewest tokens.

The saved directory holds ``tokenizer.json`` (all that encoding and decoding need), the
codec's parameters and model config (``codec.msgpack``, ``codec_config.json``: the code
vectors of the tokens) and the build report (``vocab_report.json``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np
from etils import epath
from flax import serialization
from tqdm.auto import tqdm

from fsqtok.codec import evaluate as evaluate_lib
from fsqtok.codec import fsq as fsq_lib
from fsqtok.data import corpus as corpus_lib
from fsqtok.data import hosts
from fsqtok.data.batches import PieceSet
from fsqtok.tokenizer import candidates as candidates_lib
from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer import unigram as unigram_lib
from fsqtok.tokenizer import vocab as vocab_lib
from fsqtok.tokenizer.tokenizer import DEFAULT_SPECIALS, Tokenizer
from fsqtok.train import recon
from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib

VOCABULARY_FILE = "vocabulary.json"  # the unigram vocabulary, kept in the build's workdir
VOCABULARIES = ("unigram", "codec_exact")


def learned_size(vocab_size: int) -> int:
  """Learned strings in a vocabulary of ``vocab_size`` ids (specials and bytes included)."""
  learned = vocab_size - len(DEFAULT_SPECIALS) - 256
  if learned < 1:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for learned strings beside the "
                     f"{len(DEFAULT_SPECIALS)} special and 256 byte tokens every vocabulary "
                     f"has: use at least {len(DEFAULT_SPECIALS) + 257}.")
  return learned


def check_vocabulary_config(t) -> None:
  """A clear error for a unigram vocabulary setting of ``t`` (``config.tokenizer``) that
  cannot work, before any text is counted."""
  if t.unused not in unigram_lib.UNUSED_POLICIES:
    raise ValueError(f"tokenizer.unused={t.unused!r} is unknown: use one of "
                     f"{unigram_lib.UNUSED_POLICIES}.")
  pieces_lib.run_pattern(t.runs)  # an unknown style names the ones there are
  if not 0 <= t.phrase_fraction < 1:
    raise ValueError(f"tokenizer.phrase_fraction must be in [0, 1), got {t.phrase_fraction}.")
  if t.max_distinct_runs and t.max_distinct_runs < 1000:
    raise ValueError(f"tokenizer.max_distinct_runs={t.max_distinct_runs} would leave too "
                     f"little to learn from; use 0 (no bound) or at least 1000.")


def unigram_vocabulary(config, workdir: str, train_texts: Sequence[str], size: int
                       ) -> tuple[unigram_lib.UnigramVocab, dict[str, Any]]:
  """The unigram vocabulary of ``config.tokenizer`` for ``train_texts``, trained once and
  kept in ``workdir`` (a build that resumes reuses it when the settings are the same), and
  what counting saw: the characters sampled (`fsqtok.data.corpus.sample_blocks`), the distinct
  runs kept and those the bound dropped."""
  t, d = config.tokenizer, config.data
  settings = {"source": d.source, "size": size, "max_token_bytes": config.model.max_len,
              # what decides the training texts (`fsqtok.data.corpus.load_split`)
              "split": {"val_fraction": d.val_fraction, "split_seed": d.split_seed,
                        "block_chars": d.block_chars, "text_key": d.get("text_key", "text"),
                        "invalid_utf8": d.get("invalid_utf8", "error")},
              **{k: t[k] for k in ("seed_size", "shrink", "em_iterations", "char_coverage",
                                   "max_piece_chars", "phrase_fraction", "max_phrase_words",
                                   "sample_chars", "sample_seed", "max_distinct_runs",
                                   "unused", "runs")}}
  path = os.path.join(workdir, VOCABULARY_FILE)
  saved = workdir_lib.read_saved_json(path)
  # Every process decides alike: counting below is a collective (only process 0 writes
  # the file, and another may look before it is there).
  if hosts.all_true(saved is not None and saved.get("settings") == settings):
    return unigram_lib.UnigramVocab.from_json(saved), saved.get("counting", {})
  check_vocabulary_config(t)
  progress, max_bytes, workers = config.train.progress_bar, config.model.max_len, t.num_workers
  if not isinstance(train_texts, corpus_lib.BlockStream):
    train_texts = list(train_texts)
  # With several processes each reads and counts its share of the corpus and the counts
  # are pooled: every process trains the same vocabulary on all of it (fsqtok/data/hosts.py).
  texts = hosts.process_share(train_texts)
  train_chars = hosts.total_chars(texts)
  texts = corpus_lib.sample_blocks(texts, t.sample_chars, t.sample_seed, total=train_chars)
  bound = t.max_distinct_runs
  n_phrases = round(t.phrase_fraction * size)
  if n_phrases:
    candidates = hosts.sum_counts(unigram_lib.count_phrases(
        texts, max_bytes, t.max_phrase_words, progress=progress, num_workers=workers,
        max_distinct=bound))
    n_phrases = unigram_lib.phrase_budget(candidates, n_phrases)
  report = unigram_lib.CountReport()
  counts = hosts.sum_counts(unigram_lib.count_pieces(
      texts, progress=progress, num_workers=workers, max_distinct=bound, report=report,
      runs=t.runs))
  report = _pooled(report, counts)
  vocab = unigram_lib.train_unigram(
      counts, size - n_phrases, max_token_bytes=max_bytes, seed_size=t.seed_size,
      shrink=t.shrink, em_iterations=t.em_iterations, char_coverage=t.char_coverage,
      max_piece_chars=t.max_piece_chars, progress=progress)
  vocab = dataclasses.replace(vocab, runs=t.runs)
  if n_phrases:
    vocab = unigram_lib.add_phrases(vocab, texts, candidates, n_phrases,
                                    max_token_bytes=max_bytes, em_iterations=t.em_iterations,
                                    max_piece_chars=t.max_piece_chars, progress=progress,
                                    num_workers=workers, max_distinct=bound,
                                    pool=hosts.sum_counts)
  if t.unused == "fill":
    vocab = unigram_lib.fill_unused(vocab, counts, max_token_bytes=max_bytes,
                                    max_piece_chars=t.max_piece_chars)
  elif t.unused == "drop":
    vocab = unigram_lib.drop_unused(vocab, counts, max_token_bytes=max_bytes)
  counting = {"train_chars": train_chars, "sampled_chars": report.chars,
              "sampled_blocks": report.blocks, "distinct_runs": report.distinct,
              "pruned_runs": report.pruned_strings,
              "pruned_occurrences": report.pruned_occurrences}
  workdir_lib.makedirs(workdir)
  workdir_lib.write_json(path, {"settings": settings, "counting": counting, **vocab.to_json()})
  return vocab, counting


def _pooled(report: unigram_lib.CountReport, counts) -> unigram_lib.CountReport:
  """What every process's counting saw, added up (``counts``: the pooled counts)."""
  parts = hosts.all_gather_objects(report)
  return unigram_lib.CountReport(
      chars=sum(r.chars for r in parts), blocks=sum(r.blocks for r in parts),
      distinct=len(counts), pruned_strings=sum(r.pruned_strings for r in parts),
      pruned_occurrences=sum(r.pruned_occurrences for r in parts))


def unigram_tokenizer(config, train_texts: Sequence[str], vocab_size: int,
                      workdir: str | None = None) -> Tokenizer:
  """A unigram tokenizer of ``vocab_size`` ids without a codec (no codes): all that
  encoding and decoding need, for comparisons that use a table embedding."""
  size = learned_size(vocab_size)
  if workdir is None:
    with tempfile.TemporaryDirectory() as tmp:
      vocab, _ = unigram_vocabulary(config, tmp, train_texts, size)
  else:
    vocab, _ = unigram_vocabulary(config, workdir, train_texts, size)
  return Tokenizer(vocab.strings, scores=vocab.scores, phrases=vocab.phrases,
                   max_piece_bytes=config.model.max_len, runs=vocab.runs)


def vocabulary_pieces(vocab: unigram_lib.UnigramVocab, max_bytes: int) -> PieceSet:
  """The vocabulary's strings as the codec's training set (count = expected uses, >= 1)."""
  return PieceSet.from_counts({s: max(1, round(n)) for s, n in zip(vocab.strings, vocab.counts)},
                              max_bytes)


def distinct_codes(codes_K: np.ndarray, order_K: Sequence[int], levels: Sequence[int]
                   ) -> np.ndarray:
  """One distinct FSQ code per string: in ``order_K`` (first = first served) each string
  keeps its code if it is free, else takes the nearest free code (fewest digit steps of
  +-1; ties by digit, then down before up), so the code stays near what the encoder gave."""
  levels = [int(l) for l in levels]
  out = np.asarray(codes_K, np.int64).copy()
  taken: set[int] = set()
  for k in order_K:
    code = int(out[k])
    frontier, seen = [code], {code}
    while code in taken:
      nxt = []
      for c in frontier:
        for n in fsq_lib.neighbour_codes(c, levels, 1):
          if n not in seen:
            seen.add(n)
            nxt.append(n)
      if not nxt:
        raise ValueError(f"{len(out)} strings do not fit the {int(np.prod(levels))} codes "
                         f"of FSQ levels {tuple(levels)}.")
      frontier = nxt
      free = [c for c in frontier if c not in taken]
      if free:
        code = free[0]
    out[k] = code
    taken.add(code)
  return out


@workdir_lib.exclusive_workdir
def train_tokenizer(config, workdir: str, vocab_size: int, out_dir: str, *,
                    texts=None, pieces=None) -> tuple[Tokenizer, dict[str, Any]]:
  """Builds the tokenizer of ``config`` (resuming its codec in ``workdir``), saves it.

  ``vocab_size`` counts every id: specials, the 256 byte tokens and the learned strings.
  ``texts``: the corpus split, if the caller has it (else the unigram build streams a
  ``files:`` corpus from disk, `fsqtok.data.corpus.stream_split`); ``pieces``: the codec-exact
  build's candidates, if the caller has them (the unigram build makes its own).
  """
  size = learned_size(vocab_size)
  kind = config.tokenizer.vocabulary
  if kind not in VOCABULARIES:
    raise ValueError(f"Unknown tokenizer.vocabulary {kind!r}: use one of {VOCABULARIES}.")
  mesh = sharding_lib.data_mesh(config.train.num_devices)
  if kind == "codec_exact":
    texts = texts or corpus_lib.load_split(config.data)
    tok, analysis, params = _codec_exact(config, workdir, size, texts, pieces, mesh)
  else:
    d = config.data
    train_blocks = texts[0] if texts else corpus_lib.stream_split(
        d.source, data_dir=d.tfds_data_dir or None, text_key=d.text_key,
        val_fraction=d.val_fraction, seed=d.split_seed, block_chars=d.block_chars,
        invalid_utf8=d.get("invalid_utf8", "error"))[0]
    if not corpus_lib.total_chars(train_blocks):
      raise ValueError(f"Corpus {d.source!r} has no training text (empty files, or every "
                       f"block held out): add text or lower data.val_fraction.")
    config = codec_config(config)  # the codec's config, also saved with the tokenizer
    tok, analysis, params = _unigram_build(config, workdir, size, train_blocks, mesh)
  analysis = {**analysis, "requested_vocab_size": vocab_size, "vocab_size": len(tok),
              "source": config.data.source,
              "invalid_utf8": corpus_lib.invalid_utf8_counts(
                  config.data.source, config.data.get("invalid_utf8", "error"))}
  tok.save(out_dir, extra_files={
      CODEC_FILE: serialization.to_bytes(params),
      "codec_config.json": json.dumps(config.model.to_dict(), indent=2).encode(),
      "vocab_report.json": json.dumps(analysis).encode(),
  })
  return tok, analysis


CODEC_FILE = "codec.msgpack"


def load_codec_params(tok_dir: str, template):
  """The codec parameters saved with the tokenizer in ``tok_dir`` (its decoder trained on
  the assigned codes when ``tokenizer.decoder_steps`` > 0), in the structure of
  ``template``; None if the tokenizer was saved without its codec."""
  path = epath.Path(tok_dir) / CODEC_FILE
  if not path.exists():
    return None
  try:
    return serialization.from_bytes(template, path.read_bytes())
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} does not fit the codec of this config ({e}): build the "
                     f"tokenizer again with this config, or use the config it was built "
                     f"with.") from None


def _codec_exact(config, workdir, size, texts, pieces, mesh):
  pieces = pieces or candidates_lib.load_pieces(config, texts)
  recon.train_recon(config, workdir, pieces)
  model, params = recon.load_trained_codec(config, workdir)
  table, analysis = vocab_lib.build_code_vocabulary(
      model, params, pieces[0], texts[0], size, batch_size=config.train.eval_batch_size,
      mesh=mesh, max_piece_bytes=config.model.max_len, progress=config.train.progress_bar)
  tok = Tokenizer([s.decode("utf-8") for s in table.strings], codes=table.codes_K.tolist(),
                  max_piece_bytes=config.model.max_len)
  return tok, {"vocabulary": "codec_exact", **analysis}, params


def _learn_assigned_codes(config, model, params, strings: PieceSet, rows, codes):
  """The decoder trained alone on the strings' assigned codes until each decodes exactly
  (`fsqtok.codec.memorize.learn_by_heart`: ``tokenizer.decoder_steps`` at peak rate
  ``tokenizer.decoder_learning_rate``, then ``tokenizer.decoder_rounds``); returns its
  parameters, the codes (some moved to a free code that decodes to their string) and the
  share that decodes exactly, before and after."""
  from fsqtok.codec import memorize  # pylint: disable=g-import-not-at-top
  t = config.tokenizer
  codes_by_row = np.zeros(strings.num_distinct, np.int64)
  codes_by_row[rows] = codes
  before = memorize.decodes_exactly(model, params, codes_by_row, strings)
  optim = config.optim.copy_and_resolve_references()
  optim.learning_rate = t.get("decoder_learning_rate", 1e-2)
  params, codes_by_row, report = memorize.learn_by_heart(
      model, params, codes_by_row, strings, optim=optim, num_steps=t.decoder_steps,
      batch_size=config.data.batch_size, seed=config.seed,
      rounds=t.decoder_rounds, progress=config.train.progress_bar)
  return params, codes_by_row[rows], {  # rows: every string once
      "decoder_steps": int(t.decoder_steps),
      "assigned_codes_exact_before": float(before.mean()),
      "assigned_codes_exact": report["exact"],
      "assigned_codes_not_exact": int(report["not_exact"].size),
      "decoder_rounds": report["rounds"],
      "assigned_not_exact_examples": [
          strings.piece_bytes(int(r)).decode("utf-8") for r in report["not_exact"][:20]]}


def codec_config(config):
  """The config the unigram build trains and loads its codec with: ``config`` with the
  peak learning rate ``tokenizer.codec_learning_rate`` (0: ``optim.learning_rate``), the
  decoder's periodic code features ``tokenizer.codec_fourier_octaves`` (0: those of
  ``model``) and ``tokenizer.codec_steps`` steps (0: ``train.num_steps``). Learning a
  fixed set of strings by heart takes a higher rate and sharper decoder inputs than
  generalising to held-out pieces, which ``optim`` and ``model`` are tuned for, and fewer
  codec steps when the decoder then learns the assigned codes (``decoder_steps``;
  docs/codec.md, "Exactness at large vocabularies"). Whoever loads the build's codec from
  its work directory builds it from this config."""
  t = config.tokenizer
  lr = t.get("codec_learning_rate", 0.0) or config.optim.learning_rate
  model_octaves = config.model.get("dec_fourier_octaves", 0)
  octaves = t.get("codec_fourier_octaves", 0) or model_octaves
  steps = t.get("codec_steps", 0) or config.train.num_steps
  if (lr, octaves, steps) == (config.optim.learning_rate, model_octaves,
                              config.train.num_steps):
    return config
  config = copy.deepcopy(config)
  config.optim.learning_rate, config.model.dec_fourier_octaves = lr, octaves
  if steps != config.train.num_steps:
    config.train.num_steps = steps
    config.train.eval_every = min(config.train.eval_every, steps)
    config.train.checkpoint_every = min(config.train.checkpoint_every, steps)
  return config


def _unigram_build(config, workdir, size, train_blocks, mesh):
  vocab, counting = unigram_vocabulary(config, workdir, train_blocks, size)
  strings = vocabulary_pieces(vocab, config.model.max_len)
  recon.train_recon(config, workdir, (strings, strings))
  model, params = recon.load_trained_codec(config, workdir)
  stats = evaluate_lib.compute_piece_stats(model, params, strings,
                                           batch_size=config.train.eval_batch_size, mesh=mesh)
  row = {strings.piece_bytes(i).decode("utf-8"): i for i in range(strings.num_distinct)}
  rows = np.array([row[s] for s in vocab.strings])
  exact = np.asarray(stats["exact"])[rows]
  counts = np.asarray(vocab.counts)
  # Exact strings first (a code decodes to at most one string), then the most used.
  order = np.lexsort((np.arange(len(rows)), -counts, ~exact))
  encoder_codes = np.asarray(stats["code"])[rows]
  codes = distinct_codes(encoder_codes, order, config.model.levels)
  codes_moved = int(np.sum(codes != encoder_codes))
  decoder = {}
  if config.tokenizer.get("decoder_steps", 0):
    params, decoded_codes, decoder = _learn_assigned_codes(config, model, params, strings,
                                                           rows, codes)
    decoder["codes_moved_to_decode"] = int(np.sum(decoded_codes != codes))
    codes = decoded_codes
  tok = Tokenizer(vocab.strings, scores=vocab.scores, codes=codes.tolist(),
                  phrases=vocab.phrases, max_piece_bytes=config.model.max_len,
                  runs=vocab.runs)
  train_tokens = train_bytes = 0
  with tqdm(total=corpus_lib.total_chars(train_blocks), desc="encode the training text",
            unit="char", unit_scale=True, disable=not config.train.progress_bar) as bar:
    for chunk in corpus_lib.chunk_blocks(train_blocks, unigram_lib.CHUNK_CHARS):
      ids = tok.encode_batch(chunk, return_offsets_mapping=False)["input_ids"]
      train_tokens += sum(map(len, ids))
      train_bytes += sum(len(t.encode("utf-8")) for t in chunk)
      bar.update(sum(map(len, chunk)))
  analysis = {
      "vocabulary": "unigram", "learned_tokens": len(vocab),
      "single_characters": sum(len(s) == 1 for s in vocab.strings),
      "phrases": len(vocab.phrases),
      "codec_exact_strings": float(exact.mean()),
      "codec_exact_uses": float(np.dot(exact, counts) / counts.sum()),
      "codes_moved": codes_moved,
      **decoder,
      "not_exact_examples": [s for s, e in zip(vocab.strings, exact) if not e][:20],
      # (the last EM round's: filling or dropping unused strings adds a record after it)
      "train_tokens_per_piece": next(h["tokens_per_piece"] for h in reversed(vocab.history)
                                     if "tokens_per_piece" in h),
      "unused_dropped": sum(h.get("dropped", 0) for h in vocab.history),
      "train_bytes_per_token": train_bytes / max(1, train_tokens),
      "counting": counting, "rounds": list(vocab.history)}
  return tok, analysis, params
