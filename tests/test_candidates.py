import pytest
from hypothesis import given, strategies as st

from fsqtok.tokenizer import candidates
from fsqtok.tokenizer import pieces as pieces_lib

TEXT = "the cat sat on the mat. the cat sat on the mat.\n\nthe end"


def test_counts_of_pieces_spans_and_sub_pieces():
  c = candidates.count_candidates([TEXT], max_span_pieces=3)
  assert c["piece"][" the"] == 3 and c["piece"]["the"] == 2 and c["piece"][" cat"] == 2
  assert c["span"][" cat sat on"] == 2 and c["span"][" mat."] == 2
  assert " cat sat on the" not in c["span"]  # 4 pieces: more than max_span_pieces
  # A sub-piece counts once per occurrence of each piece containing it; strings that are
  # pieces themselves ("the") are counted as pieces only.
  assert c["sub"]["at"] == 6 and c["sub"]["th"] == 5 and "the" not in c["sub"]
  assert all(len(s.encode()) >= 2 for s in c["sub"])


def test_selection_keeps_every_piece_then_the_most_bytes_covered():
  c = candidates.count_candidates([TEXT], max_span_pieces=3)
  chosen = candidates.select_candidates(c, min_count=2, max_candidates=len(c["piece"]) + 3)
  assert set(c["piece"]) <= set(chosen) and len(chosen) == len(c["piece"]) + 3
  extra = set(chosen) - set(c["piece"])
  assert " cat sat on" in extra  # 2 uses x 11 bytes: the most bytes covered
  assert all(c["span"].get(s, 0) >= 2 or c["sub"].get(s, 0) >= 2 for s in extra)
  with pytest.raises(ValueError, match="must include 'piece'"):
    candidates.select_candidates(c, min_count=1, max_candidates=10, kinds=("span",))


@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60), max_size=4),
       st.integers(1, 4))
def test_every_candidate_occurs_in_the_text_and_fits(texts, max_span):
  c = candidates.count_candidates(texts, max_span_pieces=max_span)
  joined = "\x00".join(texts)
  for kind, counter in c.items():
    for s in counter:
      assert s in joined and 1 <= len(s.encode()) <= pieces_lib.MAX_PIECE_BYTES
      if kind == "span":  # recognisable out of context: splitting gives its pieces back
        assert 2 <= len(pieces_lib.split_pieces(s)) <= max_span


def test_candidate_set_is_a_piece_set_with_counts():
  ps = candidates.candidate_set([TEXT] * 3, max_bytes=16, max_span_pieces=4, min_count=3,
                                max_candidates=40)
  assert ps.num_distinct == 40
  assert ps.counts_N.tolist() == sorted(ps.counts_N.tolist(), reverse=True)
  assert ps.piece_bytes(0) == b"at" and ps.counts_N[0] == 18  # the most frequent
