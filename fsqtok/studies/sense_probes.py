"""Probes of how much word sense a vector holds, on sense-labelled example sentences.

Two probes over `fsqtok.studies.wordnet.SenseExample`s and one vector per example (the
target word's representation in its sentence):

* **Nearest sense centroid** (`split_by_sense`, `centroid_accuracy`): per sense, a third
  of its examples held out; each held-out example is given the sense whose training
  centroid is closest by cosine, among the senses of its own lemma.
* **Word in context** (`context_pairs`, `pair_accuracy`): pairs of examples of one lemma,
  same sense or not (balanced per lemma); "same" when the cosine of the two vectors
  reaches a threshold chosen on the training lemmas; accuracy on the other lemmas (no
  lemma in both halves). With pairs only between examples whose word has the same token
  ids (``forms``), a representation that does not depend on the sentence (a static
  table) gives every pair cosine 1 and sits at chance, 50%.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fsqtok.studies.wordnet import SenseExample


def unit_rows(vectors_NxD: np.ndarray) -> np.ndarray:
  v = np.asarray(vectors_NxD, np.float64)
  return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def context_bag(table_VxD: np.ndarray, encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
                tokens: int) -> np.ndarray:
  """Per example ``(ids, where)`` (the sentence's token ids and the indices of the word's
  tokens): the mean of ``table_VxD``'s rows of the ``tokens`` tokens on each side of the
  word, the word's own tokens left out (zeros for a sentence that is the word alone)."""
  if tokens < 1:
    raise ValueError(f"context_bag needs at least one token of context, got {tokens}.")
  table = np.asarray(table_VxD)
  out = np.zeros((len(encoded), table.shape[1]), table.dtype)
  for n, (ids, where) in enumerate(encoded):
    if not len(where):
      raise ValueError(f"Example {n} marks no token of its word.")
    ids, own = np.asarray(ids), set(where)
    lo, hi = max(0, min(where) - tokens), min(len(ids), max(where) + 1 + tokens)
    near = [k for k in range(lo, hi) if k not in own]
    if near:
      out[n] = table[ids[near]].mean(0)
  return out


# ---- nearest sense centroid ----------------------------------------------------------

def split_by_sense(examples: Sequence[SenseExample], seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per (word, sense): a third (at least one) held out, the rest for the centroids."""
  rng = np.random.default_rng(seed)
  by_sense: dict = {}
  for i, e in enumerate(examples):
    by_sense.setdefault((e.word, e.sense), []).append(i)
  train, test = [], []
  for key in sorted(by_sense):
    idx = list(rng.permutation(by_sense[key]))
    k = max(1, len(idx) // 3)
    test += idx[:k]
    train += idx[k:]
  return np.asarray(train, np.int64), np.asarray(test, np.int64)


def centroid_accuracy(vectors_NxD: np.ndarray, examples: Sequence[SenseExample],
                      train: np.ndarray, test: np.ndarray) -> float:
  """Nearest sense centroid by cosine, among the senses of the example's own lemma; ties
  (a representation constant per word) go to the sense with most training examples."""
  unit = unit_rows(vectors_NxD)
  cents: dict = {}
  for i in train:
    cents.setdefault(examples[i].word, {}).setdefault(examples[i].sense, []).append(unit[i])
  correct = 0
  for i in test:
    senses = cents[examples[i].word]
    names = sorted(senses)
    sims = np.asarray([np.mean(senses[s], 0) @ unit[i] for s in names])
    counts = np.asarray([len(senses[s]) for s in names])
    best = np.flatnonzero(np.isclose(sims, sims.max(), rtol=0, atol=1e-6))
    pick = names[best[np.argmax(counts[best])]]
    correct += pick == examples[i].sense
  return correct / len(test)


def majority_accuracy(examples: Sequence[SenseExample], train: np.ndarray,
                      test: np.ndarray) -> float:
  """Each held-out example given its lemma's most frequent training sense."""
  counts: dict = {}
  for i in train:
    counts.setdefault(examples[i].word, {}).setdefault(examples[i].sense, 0)
    counts[examples[i].word][examples[i].sense] += 1
  return float(np.mean([max(counts[examples[i].word], key=lambda s: (
      counts[examples[i].word][s], s)) == examples[i].sense for i in test]))


# ---- word in context ------------------------------------------------------------------

def context_pairs(examples: Sequence[SenseExample], seed: int, *, test_share: float = 0.5,
                  max_pairs_per_word: int = 0, forms: Sequence | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Balanced word-in-context pairs, split by lemma: ``(train, test)``, each an int array
  of rows ``(i, j, same)`` (indices into ``examples``; ``same`` 1 if one sense).

  Per lemma (and per form, when ``forms`` gives one hashable per example: pairs only
  between examples of equal form, e.g. the word's token ids, so that a representation
  without context cannot tell them apart): as many same-sense as different-sense pairs
  (the smaller count of the two, drawn at random; at most ``max_pairs_per_word`` of each,
  0 = no cap); groups without both kinds give none. A share ``test_share`` of the lemmas
  (at least one, and at least one left for training) goes to the test half.
  """
  if not 0 < test_share < 1:
    raise ValueError(f"test_share must be in (0, 1), got {test_share}.")
  if forms is not None and len(forms) != len(examples):
    raise ValueError(f"forms has {len(forms)} entries for {len(examples)} examples.")
  rng = np.random.default_rng(seed)
  groups: dict = {}
  for i, e in enumerate(examples):
    groups.setdefault((e.word, None if forms is None else forms[i]), []).append(i)
  pairs: dict = {}
  for key in sorted(groups, key=repr):
    idx = groups[key]
    same = [(a, b) for k, a in enumerate(idx) for b in idx[k + 1:]
            if examples[a].sense == examples[b].sense]
    diff = [(a, b) for k, a in enumerate(idx) for b in idx[k + 1:]
            if examples[a].sense != examples[b].sense]
    n = min(len(same), len(diff))
    if max_pairs_per_word:
      n = min(n, max_pairs_per_word - len(pairs.get(key[0], ())) // 2)
    if n <= 0:
      continue
    pick = lambda ps: [ps[k] for k in sorted(rng.choice(len(ps), n, replace=False))]
    pairs.setdefault(key[0], []).extend([(a, b, 1) for a, b in pick(same)]
                                        + [(a, b, 0) for a, b in pick(diff)])
  words = sorted(pairs)
  if len(words) < 2:
    raise ValueError(f"Word-in-context pairs need two lemmas with both same-sense and "
                     f"different-sense pairs; found {len(words)}: give more examples "
                     f"(eval.min_examples_per_sense >= 2, more parts of speech).")
  order = rng.permutation(len(words))
  k = min(len(words) - 1, max(1, int(round(test_share * len(words)))))
  test_words = {words[w] for w in order[:k]}
  rows = lambda keep: np.asarray([p for w in words if keep(w) for p in pairs[w]],
                                 np.int64).reshape(-1, 3)
  return rows(lambda w: w not in test_words), rows(lambda w: w in test_words)


def pair_cosines(vectors_NxD: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  unit = unit_rows(vectors_NxD)
  return np.einsum("pd,pd->p", unit[pairs[:, 0]], unit[pairs[:, 1]])


def best_threshold(cosines: np.ndarray, same: np.ndarray) -> float:
  """The threshold t maximising the accuracy of "same sense iff cosine >= t" (the
  midpoint between neighbouring distinct cosines; the smallest such on ties)."""
  c = np.round(np.asarray(cosines, np.float64), 9)
  same = np.asarray(same, bool)
  values = np.unique(c)
  cuts = np.concatenate([[values[0]], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
  accuracy = [np.mean((c >= t) == same) for t in cuts]
  return float(cuts[int(np.argmax(accuracy))])


def pair_accuracy(vectors_NxD: np.ndarray, train: np.ndarray, test: np.ndarray
                  ) -> tuple[float, float]:
  """``(test accuracy, threshold)``: the threshold is fit on the training pairs."""
  t = best_threshold(pair_cosines(vectors_NxD, train), train[:, 2])
  return float(np.mean((np.round(pair_cosines(vectors_NxD, test), 9) >= t)
                       == test[:, 2].astype(bool))), t
