"""The unigram-LM vocabulary (fsqtok/tokenizer/unigram.py) and the tokenizer's Viterbi search."""
import collections
import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import SHAKESPEARE_SNIPPET
from fsqtok.data import corpus
from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer import unigram
from fsqtok.tokenizer.tokenizer import UNK_PENALTY, Tokenizer


def _segmentations(s, vocab):
  """Every way to write ``s`` with ``vocab`` strings (brute force)."""
  if not s:
    yield ()
    return
  for j in range(1, len(s) + 1):
    if s[:j] in vocab:
      for rest in _segmentations(s[j:], vocab):
        yield (s[:j], *rest)


VOCAB = ["a", "b", "c", "ab", "bc", "abc", "ca", "cab"]
LOGP = np.log(np.array([0.2, 0.15, 0.1, 0.2, 0.1, 0.1, 0.1, 0.05]))


@given(st.lists(st.text("abc", min_size=1, max_size=7), min_size=1, max_size=5))
def test_lattice_sums_and_maxima_match_brute_force(strings):
  index = {s: i for i, s in enumerate(VOCAB)}
  lattice = unigram.Lattice(strings, index, max_bytes=16)
  weights = np.arange(1, len(strings) + 1, dtype=np.float64)
  counts, loglik = lattice.expected_counts(LOGP, weights)
  best = lattice.forward(LOGP, reduce_max=True)[np.arange(len(strings)), lattice.lengths_N]
  want_counts = np.zeros(len(VOCAB))
  want_loglik = 0.0
  for s, w in zip(strings, weights):
    segs = list(_segmentations(s, index))
    probs = np.array([math.exp(sum(LOGP[index[t]] for t in seg)) for seg in segs])
    want_loglik += w * math.log(probs.sum())
    for seg, p in zip(segs, probs):
      for t in seg:
        want_counts[index[t]] += w * p / probs.sum()
    np.testing.assert_allclose(best[strings.index(s)], math.log(probs.max()), rtol=1e-9)
  np.testing.assert_allclose(counts, want_counts, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(loglik, want_loglik, rtol=1e-9)
  # the Viterbi pass: the best score and the token count of a best segmentation
  score, tokens = lattice.viterbi(LOGP)
  np.testing.assert_allclose(score, best, rtol=1e-12)
  for s, n in zip(strings, tokens):
    segs = list(_segmentations(s, index))
    logps = [sum(LOGP[index[t]] for t in seg) for seg in segs]
    assert n in {len(seg) for seg, lp in zip(segs, logps) if lp >= max(logps) - 1e-12}


def test_lattice_without_the_whole_string_and_after_pruning():
  index = {s: i for i, s in enumerate(VOCAB)}
  lattice = unigram.Lattice(["abc", "cab"], index, max_bytes=16, exclude_whole=True)
  best = lattice.forward(LOGP, reduce_max=True)[[0, 1], lattice.lengths_N]
  np.testing.assert_allclose(best, [LOGP[3] + LOGP[2], LOGP[2] + LOGP[3]])  # ab|c, c|ab
  # Dropping "ab" and renumbering leaves the same sums over what remains.
  new_id = np.array([0, 1, 2, -1, 3, 4, 5, 6])
  lattice.keep_tokens(new_id)
  logp = LOGP[new_id >= 0]
  best = lattice.forward(logp, reduce_max=True)[[0, 1], lattice.lengths_N]
  np.testing.assert_allclose(best, [LOGP[0] + LOGP[4], LOGP[6] + LOGP[1]])  # a|bc, ca|b


@pytest.fixture(scope="module")
def trained(doc_files):
  texts = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))]
  counts = unigram.count_pieces(texts[:150])
  return texts, counts, unigram.train_unigram(counts, 1500, seed_size=30_000)


def test_vocabulary_is_filled_distinct_and_usable(trained):
  texts, counts, vocab = trained
  assert len(vocab) == 1500 == len(set(vocab.strings)) == len(vocab.scores)
  # Every string is part of a training run (runs are the tokenizer's only search space).
  runs = "\0".join(counts)
  assert all(s in runs for s in vocab.strings)
  assert all(1 <= len(s.encode("utf-8")) <= 16 for s in vocab.strings)
  assert list(vocab.scores) == sorted(vocab.scores, reverse=True)
  assert all(math.isfinite(x) and x < 0 for x in vocab.scores)
  # Frequent words are single strings; characters of the text are all there (coverage).
  assert {" the", " of", " to", " is"} <= set(vocab.strings)
  char_counts = {}
  for p, n in counts.items():
    for ch in p:
      char_counts[ch] = char_counts.get(ch, 0) + n
  left_out = set(char_counts) - set(vocab.strings)
  assert sum(char_counts[c] for c in left_out) <= 1e-4 * sum(char_counts.values())
  # Pruning rounds shrink to the size; the likelihood is measured each round.
  sizes = [h["strings"] for h in vocab.history]
  assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1500


def test_unused_strings_give_their_places_to_pieces_that_save_tokens(doc_files):
  """A corpus small for the size: EM leaves strings no segmentation uses; `fill_unused`
  puts whole runs in their places, each one token of itself, and the text takes fewer
  tokens, while the used strings keep their scores."""
  texts = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))][:20]
  counts = unigram.count_pieces(texts)
  vocab = unigram.train_unigram(counts, 2500, seed_size=30_000)
  unused = {s for s, n in zip(vocab.strings, vocab.counts) if n < 0.5 and len(s) > 1}
  assert len(unused) > 100
  filled = unigram.fill_unused(vocab, counts)
  assert len(filled) == len(vocab) == len(set(filled.strings))
  assert filled.history[-1]["filled"] > 100
  before = dict(zip(vocab.strings, vocab.scores))
  after = dict(zip(filled.strings, filled.scores))
  assert all(after[s] == before[s] for s in before if s not in unused)  # used: as they were
  new = set(filled.strings) - set(vocab.strings)
  assert len(new) > 100 and new <= set(counts)  # whole runs of the text
  tok = lambda v: Tokenizer(v.strings, scores=v.scores)
  old_tok, new_tok = tok(vocab), tok(filled)
  for piece in sorted(new)[:200]:
    assert new_tok.encode(piece) == [new_tok.token_to_id(piece)]
  text = "".join(texts)
  assert len(new_tok.encode(text)) < 0.97 * len(old_tok.encode(text))
  assert new_tok.decode(new_tok.encode(text)) == text
  # nothing unused, nothing changed
  all_used = unigram.UnigramVocab(("a", "b", "ab"), (-1.0, -2.0, -3.0), (4.0, 2.0, 1.0))
  assert unigram.fill_unused(all_used, {"ab": 1, "abab": 3}) is all_used


def test_strings_the_search_never_uses_are_dropped_and_the_training_runs_keep_their_tokens(
    doc_files):
  """A corpus small for the size: `drop_unused` leaves out every learned string of 2+
  characters that the best segmentation of no training run uses; every run is
  segmented into the same strings as before, and every string left (but characters and
  phrases) is used by some run."""
  texts = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))][:20]
  counts = unigram.count_pieces(texts)
  vocab = unigram.train_unigram(counts, 2500, seed_size=30_000)
  vocab = dataclasses.replace(vocab, phrases=("no such phrase",),
                              strings=vocab.strings + ("no such phrase",),
                              scores=vocab.scores + (min(vocab.scores) - 1,),
                              counts=vocab.counts + (0.0,))
  dropped = unigram.drop_unused(vocab, counts)
  n = dropped.history[-1]["dropped"]
  assert n > 100 and len(dropped) == len(vocab) - n
  assert set(dropped.strings) < set(vocab.strings)
  assert {s for s in vocab.strings if len(s) == 1} <= set(dropped.strings)
  assert "no such phrase" in dropped.strings  # phrases stay (counted on runs of their own)
  before = dict(zip(vocab.strings, vocab.scores))
  assert all(before[s] == v for s, v in zip(dropped.strings, dropped.scores))
  old_tok = Tokenizer(vocab.strings, scores=vocab.scores)
  new_tok = Tokenizer(dropped.strings, scores=dropped.scores)
  used = set()
  for run in counts:
    tokens = [new_tok.id_to_token(i) for i in new_tok.encode(run)]
    assert tokens == [old_tok.id_to_token(i) for i in old_tok.encode(run)], run
    used.update(tokens)
  assert {s for s in dropped.strings if len(s) > 1} - used == {"no such phrase"}
  held_out = SHAKESPEARE_SNIPPET + "naïve 🙂 qwertyuiop"
  assert new_tok.decode(new_tok.encode(held_out)) == held_out
  # nothing unused, nothing changed
  all_used = unigram.UnigramVocab(("a", "b", "ab"), (-1.0, -2.0, -3.0), (4.0, 2.0, 1.0))
  assert unigram.drop_unused(all_used, {"ab": 1, "a": 3, "b": 2}) is all_used


def test_dropping_keeps_the_lowest_score_that_prices_uncovered_characters():
  """A character no string covers is scored below the lowest score: dropping the
  lowest-scored string would raise it and tip a tie in a run that holds such a character
  ("éabc": [unk] a bc against [unk] ab c, equal to the sixth decimal). `drop_unused`
  keeps that string, drops the other unused one, and the run is cut as before."""
  strings = ("b", "ab", "bc", "a", "c", "qq", "zzz")
  scores = (-2.023576, -7.28346, -8.337533, -9.173241, -10.227314, -11.0, -20.0)
  vocab = unigram.UnigramVocab(strings, scores, (9.0, 3.0, 2.0, 1.0, 1.0, 0.0, 0.0))
  run = "éabc"

  def tokens(v):
    tok = Tokenizer(v.strings, scores=v.scores)
    return [tok.id_to_token(i) for i in tok.encode(run)]

  without_lowest = dataclasses.replace(vocab, strings=strings[:-1], scores=scores[:-1],
                                       counts=vocab.counts[:-1])
  assert tokens(without_lowest) != tokens(vocab)  # the hazard is real
  dropped = unigram.drop_unused(vocab, {run: 1})
  assert "zzz" in dropped.strings and "qq" not in dropped.strings
  assert tokens(dropped) == tokens(vocab)


def test_a_character_used_only_inside_pruned_strings_still_segments():
  """"q", "u", "k" occur only inside "quack" and "quit": EM gives them no use while those
  exist. Once a small vocabulary prunes the long strings, the characters must still
  segment them (they once fell to log p = -inf, and EM to NaN)."""
  counts = {"quack": 300, "quit": 200, "ab": 100, "a": 40, "b": 30, "c": 5, "k": 2,
            "t": 3, "i": 4, "u": 1}
  for size in (8, 9):
    vocab = unigram.train_unigram(counts, size, em_iterations=4)
    assert len(vocab.strings) == size and np.all(np.isfinite(vocab.scores))
    tok = Tokenizer(vocab.strings, scores=vocab.scores)
    for piece in counts:
      assert tok.decode(tok.encode(piece)) == piece


def test_prune_counts_keeps_the_most_frequent():
  counts = collections.Counter({"a": 9, "b": 5, "c": 5, "d": 2, "e": 1})
  assert unigram.prune_counts(counts, 2) == 10 + 3  # b and c tie at the cut: both go
  assert counts == {"a": 9}
  assert unigram.prune_counts(counts, 5) == 0


def test_bounded_counting_is_bounded_and_the_same_for_any_workers(trained, monkeypatch):
  texts, counts, _ = trained
  monkeypatch.setattr(unigram, "CHUNK_CHARS", 20_000)  # many chunks, pruned between them
  monkeypatch.setattr(unigram, "PARALLEL_MIN_CHARS", 1)
  bound = len(counts) // 3
  one_report, two_report = unigram.CountReport(), unigram.CountReport()
  one = unigram.count_pieces(texts[:150], max_distinct=bound, report=one_report)
  two = unigram.count_pieces(texts[:150], max_distinct=bound, num_workers=2,
                             report=two_report)
  assert one == two and one_report == two_report
  assert len(one) <= bound and one_report.distinct == len(one)
  assert one_report.pruned_strings > 0 and one_report.pruned_occurrences > 0
  assert one_report.chars == sum(map(len, texts[:150]))
  # What stays are the frequent runs, counted at most as often as they occur.
  assert all(one[r] <= counts[r] for r in one)
  assert all(r in one for r, _ in counts.most_common(50))
  assert unigram.count_pieces(texts[:150], max_distinct=0) == counts  # no bound: exact
  stream_report = unigram.CountReport()  # blocks read as they are counted: the same
  stream = corpus.BlockStream(lambda: iter(texts[:150]))
  assert unigram.count_pieces(stream, max_distinct=bound, num_workers=2,
                              report=stream_report) == one and stream_report == one_report
  assert one_report.blocks == 150


def test_seed_counting_bounded_keeps_the_frequent_substrings(trained):
  _, counts, _ = trained
  pieces = sorted(counts)
  counts_N = np.array([counts[p] for p in pieces], np.float64)
  full = unigram._substring_counts(pieces, counts_N, 16)  # pylint: disable=protected-access
  bounded = unigram._substring_counts(pieces, counts_N, 16, max_distinct=len(full) // 4)  # pylint: disable=protected-access
  assert len(bounded) <= len(full) // 4
  top = [s for s, _ in full.most_common(500)]
  assert sum(s in bounded for s in top) >= 490


def test_training_is_deterministic_and_beats_characters(trained):
  texts, counts, vocab = trained
  again = unigram.train_unigram(counts, 1500, seed_size=30_000)
  assert again == vocab
  tok = Tokenizer(vocab.strings, scores=vocab.scores)
  held_out = "".join(texts[150:])
  ids = tok.encode(held_out)
  assert tok.decode(ids) == held_out
  # Bytes per token on unseen text: characters alone would give about 1 (2.46 on the
  # documentation of Python 3.11, 2.07 on 3.12's).
  assert len(held_out.encode("utf-8")) / len(ids) > 2.0


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="size >= 1"):
    unigram.train_unigram({"ab": 3}, 0)
  with pytest.raises(ValueError, match="corpus is empty"):
    unigram.train_unigram({}, 10)
  with pytest.raises(ValueError, match="shrink"):
    unigram.train_unigram({"ab": 3}, 10, shrink=1.0)


# ---- the tokenizer's unigram search -------------------------------------------------

SMALL = Tokenizer(["a", "b", "ab", "abc", " a", "é", "bc", " ab", "c"],
                  scores=[-2.0, -2.5, -3.0, -4.5, -2.0, -6.0, -3.5, -5.0, -2.2])


def _best(run, tok):
  """The highest-scoring segmentation by brute force (uncovered characters cost the
  lowest score minus 10), and its score."""
  scores = {tok.id_to_token(i): tok.id_to_score(i) for i in tok.learned_ids}
  unk = min(scores.values()) - UNK_PENALTY
  best = None
  for cut in itertools.product([0, 1], repeat=max(len(run) - 1, 0)):
    parts, start = [], 0
    for k, c in enumerate(cut, 1):
      if c:
        parts.append(run[start:k])
        start = k
    parts.append(run[start:])
    if any(p not in scores and len(p) > 1 for p in parts):
      continue
    total = sum(scores.get(p, unk) for p in parts)
    best = total if best is None else max(best, total)
  return best


@given(st.text(" abcé", max_size=9))
def test_viterbi_finds_the_best_segmentation(text):
  ids = SMALL.encode(text)
  assert SMALL.decode(ids) == text
  unk = min(SMALL.id_to_score(i) for i in SMALL.learned_ids) - UNK_PENALTY
  for run in pieces_lib.split_runs(text):
    # The only character outside the vocabulary is the one-byte space: one byte token.
    score = sum(unk if SMALL.id_to_score(i) is None else SMALL.id_to_score(i)
                for i in SMALL.encode(run))
    assert math.isclose(score, _best(run, SMALL), abs_tol=1e-9)


def test_unigram_save_load_and_errors(tmp_path):
  SMALL.save(str(tmp_path / "t"))
  loaded = Tokenizer.load(str(tmp_path / "t"))
  assert loaded.model == "unigram"
  assert [loaded.id_to_score(i) for i in loaded.learned_ids] == [
      SMALL.id_to_score(i) for i in SMALL.learned_ids]
  assert loaded.encode("abc ab é!") == SMALL.encode("abc ab é!")
  # Strings are matched inside runs: part of a contraction is usable, a span never is.
  tok = Tokenizer(["'r", "e", "a b", "b"], scores=[-1.0, -1.0, -0.5, -1.0])
  assert [tok.id_to_token(i) for i in tok.encode("'re a b")][:2] == ["'r", "e"]
  assert tok.token_to_id("a b") not in tok.encode("'re a b")
  with pytest.raises(ValueError, match="finite"):
    Tokenizer(["ab"], scores=[float("-inf")])
  with pytest.raises(ValueError, match="1 scores for 2"):
    Tokenizer(["ab", "cd"], scores=[-1.0])


def test_seeds_given_are_scored_not_replaced(trained):
  from fsqtok.tokenizer import baselines  # pylint: disable=g-import-not-at-top
  texts, counts, _ = trained
  bpe = baselines.HFBPETokenizer.train(texts[:150], 800)
  strings = bpe.strings()
  assert all(bpe.decode(bpe.encode(s)) == s for s in strings[:50])
  multi = [s for s in strings if len(s) >= 2 and len(s.encode("utf-8")) <= 16]
  vocab = unigram.train_unigram(counts, 2000, seeds=strings)
  assert set(multi) <= set(vocab.strings)  # only scored: every BPE string stays
  assert set(vocab.strings) - set(multi) == {s for s in vocab.strings if len(s) == 1}


def test_phrase_candidates_are_counted_word_sequences():
  counts = unigram.count_phrases(["Return the list of the items. Return the list, 42 of the"],
                                 max_bytes=16, max_words=3)
  assert counts["Return the"] == counts[" Return the"] == 1 and counts[" of the"] == 2
  assert counts[" the list"] == 2 and counts[" the list of"] == 1
  assert " list of the" in counts and "Return the list of" not in counts  # max_words
  assert not any("," in p or "42" in p or "." in p for p in counts)  # words only
  assert all(len(p.encode("utf-8")) <= 16 for p in counts)
  short = unigram.count_phrases(["Return the list of the items."], max_bytes=9, max_words=3)
  assert set(short) == {" the list", " list of", " of the"}  # " the items": 10 bytes


def test_phrases_fill_their_share_and_compress_the_training_text(trained):
  texts, counts, plain = trained  # 1500 subword strings
  candidates = unigram.count_phrases(texts[:150], max_bytes=16)
  n = unigram.phrase_budget(candidates, 150)
  assert n == 150
  subwords = unigram.train_unigram(counts, 1500 - n, seed_size=30_000)
  vocab = unigram.add_phrases(subwords, texts[:150], candidates, n)
  assert len(vocab) == 1500 == len(set(vocab.strings)) and len(vocab.phrases) == n
  assert set(vocab.phrases) <= set(vocab.strings) and " of the" in vocab.phrases
  assert set(vocab.strings) - set(vocab.phrases) == set(subwords.strings)
  assert vocab.history[-1]["phrases_used"] > 0.9 * n  # EM gives them their uses
  assert unigram.add_phrases(subwords, texts[:150], candidates, n) == vocab  # deterministic
  assert unigram.UnigramVocab.from_json(vocab.to_json()) == vocab
  with_phrases = Tokenizer(vocab.strings, scores=vocab.scores, phrases=vocab.phrases)
  without = Tokenizer(plain.strings, scores=plain.scores)
  # The same size, fewer tokens on the text the phrases were chosen from (on the 50
  # held-out documents it depends on which they are: the built-in corpus is the
  # running Python's documentation; the benchmarks measure held-out compression).
  train, held_out = "".join(texts[:150]), "".join(texts[150:])
  assert len(with_phrases.encode(train)) < len(without.encode(train))
  ids = with_phrases.encode(held_out)
  assert with_phrases.decode(ids) == held_out
  assert with_phrases.token_to_id(" of the") in ids


def test_phrase_tokenizer_saves_loads_and_checks_its_phrases(tmp_path):
  tok = Tokenizer(["a", "b", " a", " b", "a b"], scores=[-1.0, -1.0, -1.0, -1.0, -0.5],
                  phrases=["a b"])
  assert [tok.id_to_token(i) for i in tok.encode("a b ab a ba b")] == [
      "a b", " a", "b", " a", " b", "a", " b"]
  tok.save(str(tmp_path / "t"))
  loaded = Tokenizer.load(str(tmp_path / "t"))
  assert loaded.phrases == ("a b",) and loaded.encode("a b a b") == tok.encode("a b a b")
  with pytest.raises(ValueError, match="not learned"):
    Tokenizer(["a", "b"], scores=[-1.0, -1.0], phrases=["a b"])
  with pytest.raises(ValueError, match="unigram"):
    Tokenizer(["ab", "a b"], phrases=["a b"])
  with pytest.raises(ValueError, match="two or more words"):
    Tokenizer(["ab"], scores=[-1.0], phrases=["ab"])
