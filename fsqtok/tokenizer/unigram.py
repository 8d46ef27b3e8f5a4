"""The unigram-LM vocabulary: strings chosen by the likelihood of the corpus, not by a codec.

A unigram language model gives every vocabulary string a probability; a piece of text
(`fsqtok.tokenizer.pieces`) is segmented into the sequence of strings of highest probability (the
Viterbi path, `fsqtok.tokenizer.tokenizer`). Training (Kudo 2018, as SentencePiece does it):

1. *Seeds*: every single character (the most frequent ones covering ``char_coverage`` of
   the text; rarer ones fall back to bytes) and the ``seed_size`` most frequent substrings
   of the pieces (2+ characters, at most ``max_token_bytes`` UTF-8 bytes, seen twice).
2. *EM*: the E-step sums, over every distinct piece weighted by its count, each string's
   expected number of uses over all segmentations (forward-backward on the piece's lattice,
   in log space, vectorised over pieces); the M-step sets log p = digamma(count) -
   digamma(total), a sparse Bayesian estimate that drives rare strings to zero.
3. *Pruning*: each string's loss is what the corpus likelihood loses if it goes: its
   expected count times (its log p minus the log p of the best segmentation of its own
   text by the other strings). The ``shrink`` share with the highest loss stays (single
   characters always stay); EM again; until ``size`` strings remain.

Everything is numpy over arrays of lattice edges; the only Python loops run over string
positions (at most ``max_piece_chars``) and, once per round, over the vocabulary.

*Phrases* (`add_phrases`, after SuperBPE's transition point: multi-word tokens added once
the subword vocabulary is complete): the sequences of 2-``max_words`` consecutive words
(`fsqtok.tokenizer.pieces.WORD_RE`, at most ``max_token_bytes``) that save the most tokens under the
subword vocabulary (occurrences x (tokens - 1)) join it; the runs are counted again with
the phrases as runs (`fsqtok.tokenizer.pieces.run_regex`) and EM scores every string anew.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import special
from tqdm.auto import tqdm

from fsqtok.data import corpus as corpus_lib
from fsqtok.data import processes
from fsqtok.tokenizer import pieces as pieces_lib

SCORE_DECIMALS = 6  # scores are rounded so JSON readers (Python's, serde's) agree bit for bit
PARALLEL_MIN_CHARS = 1 << 22  # smaller corpora are counted in this process (workers cost ~1 s)
CHUNK_CHARS = 1 << 22  # corpora are counted in chunks of this many characters, summed in order
SEED_COUNT_FACTOR = 16  # seeds are counted among at most this x seed_size distinct substrings
CHUNKS_PER_WORKER = 4  # chunks a worker process counts before the sum is taken (and pruned)
# What a build does with the learned strings the search never uses on the training runs
# (``tokenizer.unused``): keep them, give EM's unused ones' places to runs (`fill_unused`),
# or drop them (`drop_unused`).
UNUSED_POLICIES = ("keep", "fill", "drop")
FILL_MARGIN = 0.01  # a filled piece scores this above its best segmentation (`fill_unused`)


@dataclasses.dataclass(frozen=True)
class UnigramVocab:
  """Vocabulary strings, most probable first, with their log probabilities, expected
  uses in the training pieces, and the training rounds (strings left, log likelihood)."""

  strings: tuple[str, ...]
  scores: tuple[float, ...]
  counts: tuple[float, ...]
  history: tuple[dict, ...] = ()
  phrases: tuple[str, ...] = ()  # the multi-word strings among ``strings``
  runs: str = "gpt2"  # the runs it was trained on (`fsqtok.tokenizer.pieces.RUN_STYLES`)

  def to_json(self) -> dict:
    return {"strings": list(self.strings), "scores": list(self.scores),
            "counts": list(self.counts), "history": list(self.history),
            "phrases": list(self.phrases), "runs": self.runs}

  @classmethod
  def from_json(cls, payload: dict) -> "UnigramVocab":
    return cls(tuple(payload["strings"]), tuple(payload["scores"]),
               tuple(payload["counts"]), tuple(payload["history"]),
               tuple(payload.get("phrases", ())), payload.get("runs", "gpt2"))

  def __len__(self) -> int:
    return len(self.strings)


def prune_counts(counts: collections.Counter, keep: int) -> int:
  """Keeps the at most ``keep`` most frequent strings of ``counts`` (a tie at the cut goes
  out whole); returns how many occurrences went."""
  if len(counts) <= keep:
    return 0
  values = np.fromiter(counts.values(), np.int64, len(counts))
  cut = int(np.partition(values, len(values) - keep - 1)[len(values) - keep - 1])
  gone = [s for s, n in counts.items() if n <= cut]
  return sum(counts.pop(s) for s in gone)


@dataclasses.dataclass
class CountReport:
  """What counting saw and what the bound on distinct strings dropped."""
  chars: int = 0
  blocks: int = 0
  distinct: int = 0
  pruned_strings: int = 0      # distinct strings dropped (some may have come back)
  pruned_occurrences: int = 0  # their occurrences up to then


def _count_in_parallel(count, texts: Iterable[str], num_workers: int, progress: bool,
                       desc: str, *args, max_distinct: int = 0,
                       report: CountReport | None = None) -> collections.Counter:
  """``count(None, chunk, *args)`` over chunks of ``CHUNK_CHARS`` characters of ``texts``,
  summed in order, in waves of chunks over ``num_workers`` worker processes (0: every
  core; `fsqtok.data.processes`; this process below ``PARALLEL_MIN_CHARS`` characters). With
  ``max_distinct``, whenever the sum holds more distinct strings it keeps the
  ``max_distinct // 2`` most frequent (`prune_counts`), so memory stays bounded however
  long the corpus. ``texts`` may be a `fsqtok.data.corpus.BlockStream`: only a wave of chunks
  is held at a time. Chunks and their order depend on the texts alone: the same counts
  whatever the number of workers."""
  if not isinstance(texts, corpus_lib.BlockStream):
    texts = list(texts)
  chars = corpus_lib.total_chars(texts)
  num_workers = 1 if chars < PARALLEL_MIN_CHARS else (num_workers or os.cpu_count() or 1)
  chunks = corpus_lib.chunk_blocks(texts, CHUNK_CHARS)
  wave = num_workers * CHUNKS_PER_WORKER
  report = report if report is not None else CountReport()
  report.chars += chars
  total: collections.Counter = collections.Counter()
  with tqdm(total=chars, desc=desc, unit="char", unit_scale=True,
            disable=not progress) as bar:
    while batch := list(itertools.islice(chunks, wave)):
      parts = ([count(None, c, *args) for c in batch] if num_workers == 1 else
               processes.map_chunks(count, [(c, *args) for c in batch], num_workers))
      for chunk, part in zip(batch, parts):
        total.update(part)
        if max_distinct and len(total) > max_distinct:
          before = len(total)
          report.pruned_occurrences += prune_counts(total, max_distinct // 2)
          report.pruned_strings += before - len(total)
        bar.update(sum(map(len, chunk)))
        report.blocks += len(chunk)
  report.distinct = len(total)
  return total


def count_pieces(texts: Iterable[str], progress: bool = False,
                 phrases: tuple[str, ...] = (), num_workers: int = 1, max_distinct: int = 0,
                 report: CountReport | None = None, runs: str = "gpt2") -> collections.Counter:
  """Occurrences of every piece (pre-tokenizer runs of style ``runs``, uncut, ``phrases``
  first) in ``texts`` (``num_workers`` processes, 0: every core; ``max_distinct``: a bound
  on the distinct pieces kept, 0: none; ``report`` is filled in)."""
  pieces_lib.run_pattern(runs)  # a known style, before any worker starts
  return _count_in_parallel(_count_runs, texts, num_workers, progress, "count pieces",
                            tuple(phrases), runs, max_distinct=max_distinct, report=report)


def _count_runs(_, texts: Iterable[str], phrases: tuple[str, ...], runs: str = "gpt2"
                ) -> collections.Counter:
  counts: collections.Counter = collections.Counter()
  for text in texts:
    counts.update(pieces_lib.split_runs(text, phrases, runs))
  return counts


def count_phrases(texts: Iterable[str], max_bytes: int, max_words: int = 4,
                  progress: bool = False, num_workers: int = 1, max_distinct: int = 0,
                  report: CountReport | None = None) -> collections.Counter:
  """Occurrences of every sequence of 2-``max_words`` consecutive word runs of at most
  ``max_bytes`` UTF-8 bytes (a phrase candidate) in ``texts`` (``num_workers`` processes,
  0: every core; ``max_distinct``, ``report``: as `count_pieces`)."""
  return _count_in_parallel(_count_word_sequences, texts, num_workers, progress,
                            "count phrases", max_bytes, max_words, max_distinct=max_distinct,
                            report=report)


def _count_word_sequences(_, texts: Iterable[str], max_bytes: int, max_words: int
                          ) -> collections.Counter:
  word = pieces_lib.WORD_RE.fullmatch
  counts: collections.Counter = collections.Counter()
  for text in texts:
    runs = pieces_lib.split_runs(text)
    is_word = [word(r) is not None for r in runs]
    for i in itertools.compress(range(len(runs)), is_word):
      phrase, size = runs[i], len(runs[i].encode("utf-8"))
      for k in range(i + 1, min(i + max_words, len(runs))):
        if not is_word[k] or runs[k][0] != " ":
          break
        size += len(runs[k].encode("utf-8"))
        if size > max_bytes:
          break
        phrase += runs[k]
        counts[phrase] += 1
  return counts


def _substrings(s: str, max_bytes: int, min_chars: int = 1):
  """``(start, end)`` character spans of ``s`` with ``min_chars``+ characters and at most
  ``max_bytes`` UTF-8 bytes, by start then length."""
  ascii_only = s.isascii()
  n = len(s)
  for i in range(n):
    size = 0
    for j in range(i + 1, n + 1):
      size += 1 if ascii_only else len(s[j - 1].encode("utf-8"))
      if size > max_bytes:
        break
      if j - i >= min_chars:
        yield i, j


class Lattice:
  """Every way to write each of ``strings`` with vocabulary strings: one edge per
  (string n, start, end, token) with ``text_n[start:end]`` in the vocabulary.

  ``exclude_whole``: leave out the edge that is the whole string (the segmentations of a
  vocabulary string by the *other* strings, for pruning).
  """

  def __init__(self, strings: Sequence[str], index: dict[str, int], max_bytes: int,
               exclude_whole: bool = False):
    piece, start, end, token = [], [], [], []
    for n, s in enumerate(strings):
      for i, j in _substrings(s, max_bytes):
        t = index.get(s[i:j])
        if t is not None and not (exclude_whole and i == 0 and j == len(s)):
          piece.append(n)
          start.append(i)
          end.append(j)
          token.append(t)
    self.lengths_N = np.fromiter(map(len, strings), np.int64, len(strings))
    self._set(np.asarray(piece, np.int64), np.asarray(start, np.int64),
              np.asarray(end, np.int64), np.asarray(token, np.int64))

  def _set(self, piece, start, end, token):
    self.piece_E, self.start_E, self.end_E, self.token_E = piece, start, end, token
    self._by_end = np.lexsort((piece, end))
    self._by_start = np.lexsort((piece, start))

  def keep_tokens(self, new_id_V: np.ndarray) -> None:
    """Drops the edges of removed tokens (``new_id_V[t] < 0``) and renumbers the rest."""
    keep = new_id_V[self.token_E] >= 0
    self._set(self.piece_E[keep], self.start_E[keep], self.end_E[keep],
              new_id_V[self.token_E[keep]])

  @property
  def max_len(self) -> int:
    return int(self.lengths_N.max(initial=0))

  def _sweep(self, order, position_E, other_E, table, logp_V, reduce_max, positions):
    """One pass (forward or backward): ``table[n, pos] = reduce over edges at pos of
    table[n, other end] + logp[token]``."""
    pos_sorted = position_E[order]
    bounds = np.searchsorted(pos_sorted, np.arange(table.shape[1] + 1))
    for pos in positions:
      sel = order[bounds[pos]:bounds[pos + 1]]
      if sel.size == 0:
        continue
      p = self.piece_E[sel]
      v = table[p, other_E[sel]] + logp_V[self.token_E[sel]]
      heads = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
      table[p[heads], pos] = _reduce(v, heads, reduce_max)

  def forward(self, logp_V: np.ndarray, reduce_max: bool = False) -> np.ndarray:
    """``alpha[n, i]``: log of the summed (or best, ``reduce_max``) probability of the
    segmentations of ``string_n[:i]``."""
    alpha = np.full((len(self.lengths_N), self.max_len + 1), -np.inf)
    alpha[:, 0] = 0.0
    self._sweep(self._by_end, self.end_E, self.start_E, alpha, logp_V, reduce_max,
                range(1, self.max_len + 1))
    return alpha

  def viterbi(self, logp_V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per string: the score of its best segmentation (-inf where there is none) and its
    number of tokens (ties: the edge that starts first)."""
    score = np.full((len(self.lengths_N), self.max_len + 1), -np.inf)
    score[:, 0] = 0.0
    tokens = np.zeros(score.shape, np.int64)
    order = self._by_end
    ends = self.end_E[order]
    bounds = np.searchsorted(ends, np.arange(score.shape[1] + 1))
    for pos in range(1, self.max_len + 1):
      sel = order[bounds[pos]:bounds[pos + 1]]
      if sel.size == 0:
        continue
      p, start = self.piece_E[sel], self.start_E[sel]
      v = score[p, start] + logp_V[self.token_E[sel]]
      heads = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
      best = np.maximum.reduceat(v, heads)
      first = np.minimum.reduceat(np.where(v == np.repeat(best, np.diff(np.r_[heads, len(v)])),
                                           np.arange(len(v)), len(v)), heads)
      score[p[heads], pos] = best
      tokens[p[heads], pos] = tokens[p[heads], start[np.minimum(first, len(v) - 1)]] + 1
    rows = np.arange(len(self.lengths_N))
    return score[rows, self.lengths_N], tokens[rows, self.lengths_N]

  def backward(self, logp_V: np.ndarray) -> np.ndarray:
    """``beta[n, i]``: log of the summed probability of the segmentations of
    ``string_n[i:]``."""
    beta = np.full((len(self.lengths_N), self.max_len + 1), -np.inf)
    beta[np.arange(len(self.lengths_N)), self.lengths_N] = 0.0
    self._sweep(self._by_start, self.start_E, self.end_E, beta, logp_V, False,
                range(self.max_len - 1, -1, -1))
    return beta

  def expected_counts(self, logp_V: np.ndarray, weights_N: np.ndarray
                      ) -> tuple[np.ndarray, float]:
    """Expected uses of each token over all segmentations (weighted by ``weights_N``) and
    the log likelihood of the strings."""
    alpha, beta = self.forward(logp_V), self.backward(logp_V)
    log_z = alpha[np.arange(len(self.lengths_N)), self.lengths_N]
    post = np.exp(alpha[self.piece_E, self.start_E] + logp_V[self.token_E]
                  + beta[self.piece_E, self.end_E] - log_z[self.piece_E])
    counts = np.bincount(self.token_E, weights=post * weights_N[self.piece_E],
                         minlength=len(logp_V))
    return counts, float(np.dot(weights_N, log_z))


def _reduce(v: np.ndarray, heads: np.ndarray, reduce_max: bool) -> np.ndarray:
  """Max or log-sum-exp of ``v`` over the runs starting at ``heads``."""
  m = np.maximum.reduceat(v, heads)
  if reduce_max:
    return m
  rep = np.repeat(m, np.diff(np.r_[heads, len(v)]))
  with np.errstate(invalid="ignore"):
    shifted = np.where(np.isfinite(rep), v - rep, -np.inf)
  with np.errstate(divide="ignore"):
    return m + np.log(np.add.reduceat(np.exp(shifted), heads))


def _m_step(counts_V: np.ndarray, is_char_V: np.ndarray) -> np.ndarray:
  """log p from expected counts: digamma(count) - digamma(total) (a sparse prior).

  An unused string gets log p = -inf, except a single character: it keeps the lowest
  used log p minus 1. A character that only ever occurs inside longer strings (every "q"
  inside "qu") is unused while they exist, and must still segment its pieces once they
  are pruned; at -inf those pieces would have no segmentation at all."""
  total = counts_V.sum()
  with np.errstate(divide="ignore", invalid="ignore"):
    logp = special.digamma(np.maximum(counts_V, 1e-300)) - special.digamma(total)
  used = counts_V > 0
  floor = np.min(logp[used]) - 1.0 if used.any() else 0.0
  return np.where(used, logp, np.where(is_char_V, floor, -np.inf))


def _characters(piece_counts: dict[str, int], coverage: float
                ) -> tuple[list[str], collections.Counter]:
  """The most frequent characters that together cover ``coverage`` of all characters,
  and every character's count."""
  chars: collections.Counter = collections.Counter()
  for p, n in piece_counts.items():
    for ch in p:
      chars[ch] += n
  ranked = sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))
  total = sum(chars.values())
  keep, covered = [], 0
  for ch, n in ranked:
    if keep and covered >= coverage * total:
      break
    keep.append(ch)
    covered += n
  return keep, chars


def _substring_counts(pieces: Sequence[str], counts_N: np.ndarray, max_bytes: int,
                      only: set[str] | None = None, progress: bool = False,
                      max_distinct: int = 0) -> collections.Counter:
  """Occurrences of the substrings of 2+ characters of the pieces (of ``only`` those).
  With ``max_distinct``, pieces are read most frequent first and the rarest substrings go
  whenever there are more than that (`prune_counts`): bounded memory on any corpus."""
  subs: collections.Counter = collections.Counter()
  order = np.argsort(-counts_N, kind="stable") if max_distinct else range(len(pieces))
  for k in tqdm(order, total=len(pieces), desc="unigram seeds", disable=not progress,
                unit=" pieces"):
    p, n = pieces[k], int(counts_N[k])
    for i, j in _substrings(p, max_bytes, min_chars=2):
      if only is None or p[i:j] in only:
        subs[p[i:j]] += n
    if max_distinct and len(subs) > max_distinct:
      prune_counts(subs, max_distinct // 2)
  return subs


def _seeds(pieces: Sequence[str], counts_N: np.ndarray, max_bytes: int, seed_size: int,
           progress: bool) -> list[tuple[str, int]]:
  """The ``seed_size`` most frequent substrings of 2+ characters (seen at least twice;
  counted with at most ``SEED_COUNT_FACTOR`` x ``seed_size`` distinct substrings kept)."""
  subs = _substring_counts(pieces, counts_N, max_bytes, progress=progress,
                           max_distinct=SEED_COUNT_FACTOR * seed_size)
  ranked = sorted(((s, n) for s, n in subs.items() if n >= 2),
                  key=lambda kv: (-kv[1] * len(kv[0]), kv[0]))
  return ranked[:seed_size]


def train_unigram(piece_counts: dict[str, int], size: int, *,
                  max_token_bytes: int = pieces_lib.MAX_PIECE_BYTES, seed_size: int = 200_000,
                  shrink: float = 0.75, em_iterations: int = 2,
                  char_coverage: float = 0.9999, max_piece_chars: int = 64,
                  seeds: Sequence[str] | None = None, progress: bool = False) -> UnigramVocab:
  """A vocabulary of ``size`` strings (single characters included) for ``piece_counts``.

  Pieces longer than ``max_piece_chars`` characters (long runs of spaces or symbols) are
  left out of training; the tokenizer still segments them. ``seeds``: start from these
  strings (e.g. another tokenizer's vocabulary) instead of the most frequent substrings,
  each first as likely as it is frequent; with ``size`` >= their number EM only scores them.
  """
  if size < 1:
    raise ValueError(f"A unigram vocabulary needs size >= 1, got {size}.")
  if not 0 < shrink < 1:
    raise ValueError(f"shrink must be in (0, 1), got {shrink}.")
  if not 0 < char_coverage <= 1:
    raise ValueError(f"char_coverage must be in (0, 1], got {char_coverage}.")
  chars, char_counts = _characters(piece_counts, char_coverage)
  chars = chars[:size]
  char_set = set(chars)
  kept = [(p, n) for p, n in piece_counts.items()
          if len(p) <= max_piece_chars and char_set.issuperset(p)]
  if not kept:
    raise ValueError("No text to train a unigram vocabulary on: the corpus is empty.")
  kept.sort()
  pieces = [p for p, _ in kept]
  counts_N = np.array([n for _, n in kept], np.float64)
  if seeds is None:
    seeds = [(s, n) for s, n in _seeds(pieces, counts_N, max_token_bytes, seed_size, progress)
             if char_set.issuperset(s)]
  else:  # given strings start from their frequency as substrings of the pieces
    given = [s for s in dict.fromkeys(seeds) if len(s) >= 2 and char_set.issuperset(s)
             and len(s.encode("utf-8")) <= max_token_bytes]
    frequency = _substring_counts(pieces, counts_N, max_token_bytes, set(given))
    seeds = [(s, max(frequency[s], 1)) for s in given]
  strings = chars + [s for s, _ in seeds]
  is_char = np.r_[np.ones(len(chars), bool), np.zeros(len(seeds), bool)]
  init = np.array([char_counts[c] for c in chars] + [n for _, n in seeds], np.float64)
  logp = np.log(init) - np.log(init.sum())
  lattice = Lattice(pieces, {s: i for i, s in enumerate(strings)}, max_token_bytes)
  history = []
  # Rounds at most (fewer when unused strings go early): for the progress bar's ETA.
  rounds = 1 + max(0, math.ceil(math.log((size - len(chars)) / max(1, len(seeds)))
                                / math.log(shrink))) if size > len(chars) else 1
  bar = tqdm(total=rounds, desc="unigram EM", disable=not progress, unit=" rounds")
  while True:
    for _ in range(em_iterations):
      counts, loglik = lattice.expected_counts(logp, counts_N)
      logp = _m_step(counts, is_char)
    # Strings no segmentation uses any more go first (unless that leaves too few).
    target = size - len(chars)
    keep = is_char | (counts >= 0.5)
    if int((keep & ~is_char).sum()) < target:
      unused = np.flatnonzero(~keep)
      keep[unused[np.lexsort((unused, -counts[unused]))][:target - int((keep & ~is_char).sum())]] = True
    n_multi = int((keep & ~is_char).sum())
    history.append({"strings": int(keep.sum()), "log_likelihood": loglik,
                    "tokens_per_piece": float(counts.sum() / counts_N.sum())})
    bar.update()
    bar.set_postfix(strings=int(keep.sum()), loglik=f"{loglik:.4g}")
    if n_multi > target:
      loss = _pruning_loss(strings, logp, counts, is_char, keep, max_token_bytes)
      multi = np.flatnonzero(keep & ~is_char)
      n_keep = max(target, int(n_multi * shrink))
      ranked = multi[np.lexsort((multi, -loss[multi]))]
      keep = is_char.copy()
      keep[ranked[:n_keep]] = True
    new_id = np.full(len(strings), -1, np.int64)
    new_id[keep] = np.arange(int(keep.sum()))
    strings = [s for s, k in zip(strings, keep) if k]
    is_char, logp, counts = is_char[keep], logp[keep], counts[keep]
    lattice.keep_tokens(new_id)
    if n_multi <= target:
      break
  logp, counts, loglik = _em(lattice, logp, counts_N, em_iterations, is_char)
  history.append({"strings": len(strings), "log_likelihood": loglik,
                  "tokens_per_piece": float(counts.sum() / counts_N.sum())})
  bar.close()
  return _vocab(strings, logp, counts, history)


def _em(lattice: Lattice, logp: np.ndarray, counts_N: np.ndarray, iterations: int,
        is_char: np.ndarray):
  """``iterations`` EM steps: the new log probabilities, expected counts, log likelihood."""
  for _ in range(iterations):
    counts, loglik = lattice.expected_counts(logp, counts_N)
    logp = _m_step(counts, is_char)
  return logp, counts, loglik


def _vocab(strings, logp, counts, history, phrases=(), runs="gpt2") -> UnigramVocab:
  """The vocabulary, most probable string first; a string no segmentation uses keeps a
  tiny probability (it is still a token)."""
  floor = np.min(logp[np.isfinite(logp)]) - 1.0
  logp = np.where(np.isfinite(logp), logp, floor)
  order = np.lexsort((np.arange(len(strings)), -logp))
  return UnigramVocab(tuple(strings[i] for i in order),
                      tuple(round(float(logp[i]), SCORE_DECIMALS) for i in order),
                      tuple(float(counts[i]) for i in order), tuple(history),
                      tuple(sorted(phrases)), runs)


def fill_unused(vocab: UnigramVocab, piece_counts: dict[str, int], *,
                max_token_bytes: int = pieces_lib.MAX_PIECE_BYTES, max_piece_chars: int = 64
                ) -> UnigramVocab:
  """``vocab`` with its unused strings replaced by whole pieces that save tokens.

  On a corpus small for the size asked, EM leaves strings that no segmentation of the
  training pieces uses (< 0.5 expected uses: substrings of pieces that are tokens
  themselves); their score is a floor, so held-out text never uses them either (on
  tinyshakespeare at 32768 ids, 20,603 of 32,499 strings). Their places go to the pieces
  (pre-tokenizer runs, 2+ characters) that the used strings write in 2+ tokens, most
  tokens saved first (occurrences x (tokens - 1), as BPE would merge them), each scored
  the larger of its estimate from its count and its best segmentation's score plus
  ``FILL_MARGIN``: it is the one token of its own piece. The used strings keep their
  scores, so a run that holds no new piece is segmented as before. Unused strings stay
  only where no piece is left to take their place. (``tokenizer.unused="fill"`` in
  `configs/recon.py`; not the default: the LM did worse on it, docs/tokenizer.md.)"""
  strings, counts = list(vocab.strings), np.asarray(vocab.counts, np.float64)
  logp = np.asarray(vocab.scores, np.float64)
  is_char = np.fromiter((len(s) == 1 for s in strings), bool, len(strings))
  phrases = set(vocab.phrases)
  unused = (counts < 0.5) & ~is_char & np.fromiter((s not in phrases for s in strings), bool,
                                                   len(strings))
  if not unused.any():
    return vocab
  used = np.flatnonzero(~unused)
  index = {strings[i]: k for k, i in enumerate(used)}
  pieces = sorted(p for p, n in piece_counts.items() if p not in index and
                  2 <= len(p) <= max_piece_chars and len(p.encode("utf-8")) <= max_token_bytes)
  counts_N = np.array([piece_counts[p] for p in pieces], np.float64)
  score_N, tokens_N = Lattice(pieces, index, max_token_bytes).viterbi(logp[used])
  saves = np.flatnonzero(np.isfinite(score_N) & (tokens_N > 1))
  saved = counts_N[saves] * (tokens_N[saves] - 1)
  order = saves[np.lexsort((saves, -saved))][:int(unused.sum())]
  total = counts.sum()
  fill_logp = np.maximum(special.digamma(counts_N[order]) - special.digamma(total),
                         score_N[order] + FILL_MARGIN)
  # the unused strings kept where too few pieces save tokens (the most used first; one
  # that is a piece filled in is that piece)
  filled = {pieces[i] for i in order}
  spare = np.array([i for i in np.flatnonzero(unused) if strings[i] not in filled], np.int64)
  spare = spare[np.lexsort((spare, -counts[spare]))][:int(unused.sum()) - len(order)]
  keep = np.sort(np.r_[used, spare])
  history = vocab.history + ({"filled": len(order), "unused_left": len(spare)},)
  return _vocab([strings[i] for i in keep] + [pieces[i] for i in order],
                np.r_[logp[keep], fill_logp], np.r_[counts[keep], counts_N[order]], history,
                vocab.phrases, vocab.runs)


def drop_unused(vocab: UnigramVocab, run_counts: dict[str, int], *,
                max_token_bytes: int = pieces_lib.MAX_PIECE_BYTES) -> UnigramVocab:
  """``vocab`` without the strings that the best segmentation of no training run uses.

  On a corpus small for the size asked, EM keeps strings that the search never picks:
  substrings of runs that are tokens themselves, and strings whose expected uses are
  real but always lose to another segmentation (on tinyshakespeare at 16384 ids, 4,239
  of 16,115 learned strings). Each costs a language model its embedding row and its
  share of the output layer's compute for nothing. Here they go, as SentencePiece's
  unigram trainer stops short of the size asked on such a corpus: the vocabulary is
  smaller than asked. Single characters and multi-word phrases always stay (a character
  keeps held-out text off its bytes; phrases were counted on runs of their own), and so
  does the lowest-scored string: the score of a character no string covers is set below
  the lowest score (`fsqtok.tokenizer.tokenizer.UNK_PENALTY`), and a higher one could
  tip a tie in a run that holds such a character. The strings kept keep their scores,
  so every run counted (``run_counts``' keys: the training runs as the tokenizer cuts
  them without phrases, those sampled and kept by the counting's bounds) is segmented
  exactly as before: a string off the best path of every run changes none of them. The
  search is the pure-Python one (the compiled search cuts whole texts, these are runs):
  1.9 s for the 100,174 distinct runs of 30 MB of documentation.
  (``tokenizer.unused="drop"``.)"""
  from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(vocab.strings, scores=vocab.scores, max_piece_bytes=max_token_bytes,
                  runs=vocab.runs)
  used = np.zeros(len(tok), bool)
  used[tok.encode_pieces(list(run_counts))] = True
  phrases = set(vocab.phrases)
  lowest = int(np.argmin(vocab.scores)) if vocab.strings else -1
  keep = [i for i, s in enumerate(vocab.strings)
          if len(s) == 1 or s in phrases or i == lowest or used[tok.token_to_id(s)]]
  if len(keep) == len(vocab.strings):
    return vocab
  history = vocab.history + ({"dropped": len(vocab.strings) - len(keep)},)
  return _vocab([vocab.strings[i] for i in keep], np.asarray(vocab.scores, np.float64)[keep],
                np.asarray(vocab.counts, np.float64)[keep], history, vocab.phrases, vocab.runs)


def phrase_budget(candidates: dict[str, int], n_phrases: int, min_count: int = 2) -> int:
  """How many of ``n_phrases`` the candidates can fill (those seen ``min_count``+ times)."""
  return min(n_phrases, sum(n >= min_count for n in candidates.values()))


def add_phrases(vocab: UnigramVocab, texts: Sequence[str], candidates: dict[str, int],
                n_phrases: int, *, max_token_bytes: int = pieces_lib.MAX_PIECE_BYTES,
                em_iterations: int = 2, max_piece_chars: int = 64, min_count: int = 2,
                progress: bool = False, num_workers: int = 1, max_distinct: int = 0,
                pool: Callable[[collections.Counter], collections.Counter] = lambda c: c
                ) -> UnigramVocab:
  """``vocab`` and the ``n_phrases`` candidates (`count_phrases`, seen ``min_count``+
  times) that save the most tokens under it, every string scored anew by EM on the runs
  of ``texts`` split with the phrases (`fsqtok.tokenizer.pieces.run_regex`). ``pool``: what
  to do with those counts before EM (`fsqtok.data.hosts.sum_counts` adds up every
  process's, each counting its share of ``texts``)."""
  from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  if n_phrases <= 0:
    return vocab
  subwords = Tokenizer(vocab.strings, scores=vocab.scores, max_piece_bytes=max_token_bytes,
                       runs=vocab.runs)
  known = set(vocab.strings)
  gains = sorted((-n * (len(subwords.encode(p)) - 1), p) for p, n in candidates.items()
                 if n >= min_count and p not in known)
  phrases = tuple(sorted(p for _, p in gains[:n_phrases]))
  piece_counts = pool(count_pieces(texts, progress=progress, phrases=phrases,
                                   num_workers=num_workers, max_distinct=max_distinct,
                                   runs=vocab.runs))
  strings = list(vocab.strings) + list(phrases)
  chars = {s for s in strings if len(s) == 1}
  kept = sorted((p, n) for p, n in piece_counts.items()
                if len(p) <= max_piece_chars and chars.issuperset(p))
  counts_N = np.array([n for _, n in kept], np.float64)
  init = np.array(list(vocab.counts) + [candidates[p] for p in phrases], np.float64)
  logp = np.log(np.maximum(init, 1e-3)) - np.log(np.maximum(init, 1e-3).sum())
  lattice = Lattice([p for p, _ in kept], {s: i for i, s in enumerate(strings)},
                    max_token_bytes)
  is_char = np.array([len(s) == 1 for s in strings])
  logp, counts, loglik = _em(lattice, logp, counts_N, em_iterations, is_char)
  used = counts[len(vocab):] >= 0.5
  history = [*vocab.history, {"strings": len(strings), "phrases": len(phrases),
                              "phrases_used": int(used.sum()), "log_likelihood": loglik,
                              "tokens_per_piece": float(counts.sum() / counts_N.sum())}]
  return _vocab(strings, logp, counts, history, phrases, vocab.runs)


def _pruning_loss(strings, logp, counts, is_char, keep, max_bytes) -> np.ndarray:
  """Per string: expected count x (log p - log p of its best segmentation by the other
  strings); +inf where no other segmentation exists."""
  idx = np.flatnonzero(keep)
  index = {strings[i]: k for k, i in enumerate(idx)}
  multi = np.flatnonzero(keep & ~is_char)
  alt_lattice = Lattice([strings[i] for i in multi], index, max_bytes, exclude_whole=True)
  alpha = alt_lattice.forward(logp[idx], reduce_max=True)
  alt = alpha[np.arange(len(multi)), alt_lattice.lengths_N]
  loss = np.full(len(strings), np.inf)
  with np.errstate(invalid="ignore"):
    loss[multi] = counts[multi] * (logp[multi] - alt)
  return np.nan_to_num(loss, nan=np.inf)
