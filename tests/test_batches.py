import numpy as np
import pytest

from fsqtok.data.batches import PieceBatcher, PieceSet


@pytest.fixture
def pieces():
  return PieceSet.from_texts(["the cat and the dog and the bird", "the end\n"])


def test_piece_set_counts_sorted_by_frequency(pieces):
  strings = [pieces.piece_bytes(i).decode() for i in range(pieces.num_distinct)]
  # Ties in count are ordered by bytes.
  assert strings[:3] == [" and", " the", "the"] and pieces.counts_N[:3].tolist() == [2, 2, 2]
  assert pieces.num_occurrences == 11
  assert np.all(np.diff(pieces.counts_N) <= 0)


def test_piece_set_distinguishes_trailing_nul():
  ps = PieceSet.from_texts(["a\x00 a"])
  assert sorted(ps.piece_bytes(i) for i in range(ps.num_distinct)) == [b"\x00", b" a", b"a"]


def test_epoch_visits_every_occurrence_once(pieces):
  b = PieceBatcher(pieces, 1, seed=3)
  seen = [bytes(next(b)["bytes"][0, :]).rstrip(b"\0") for _ in range(b.batches_per_epoch)]
  expected = [pieces.piece_bytes(i) for i in range(pieces.num_distinct)
              for _ in range(pieces.counts_N[i])]
  assert sorted(seen) == sorted(expected)


def test_weightings(pieces):
  assert PieceBatcher(pieces, 1, seed=0, weighting="distinct").batches_per_epoch == pieces.num_distinct
  assert PieceBatcher(pieces, 1, seed=0, weighting="sqrt").batches_per_epoch == int(
      np.ceil(np.sqrt(pieces.counts_N)).sum())
  with pytest.raises(ValueError, match="weighting"):
    PieceBatcher(pieces, 1, seed=0, weighting="zipf")


def test_state_restores_the_exact_next_batches(pieces):
  a = PieceBatcher(pieces, 3, seed=7)
  for _ in range(5):  # crosses an epoch boundary (3 batches per epoch)
    next(a)
  state = a.get_state()
  expected = [next(a) for _ in range(6)]
  b = PieceBatcher(pieces, 3, seed=7)
  b.set_state(state)
  for want in expected:
    got = next(b)
    np.testing.assert_array_equal(got["bytes"], want["bytes"])
    np.testing.assert_array_equal(got["lengths"], want["lengths"])


def test_same_seed_same_stream_other_seed_other_stream(pieces):
  first = lambda seed: np.concatenate([next(PieceBatcher(pieces, 8, seed=seed))["lengths"]])
  np.testing.assert_array_equal(first(1), first(1))
  assert any(not np.array_equal(first(1), first(s)) for s in range(2, 6))


def test_batch_larger_than_corpus_is_a_clear_error(pieces):
  with pytest.raises(ValueError, match="Lower the batch size"):
    PieceBatcher(pieces, 1000, seed=0)


def test_seen_byte_share():
  from fsqtok.codec.evaluate import seen_byte_share  # pylint: disable=g-import-not-at-top
  train = PieceSet.from_texts(["the cat"])
  val = PieceSet.from_texts(["the dog the"])  # "the"(3) " dog"(4) " the"(4): "the" seen
  assert seen_byte_share(val, train) == pytest.approx(3 / 11)
  assert seen_byte_share(train, train) == 1.0
