import itertools
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer.pieces import array_to_pieces, pieces_to_array, split_pieces

# Any Python string that can be UTF-8 (no lone surrogates): every plane, controls, NUL.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@given(TEXT)
def test_pieces_concatenate_to_the_text_and_fit(text):
  pieces = split_pieces(text)
  assert "".join(pieces) == text
  for p in pieces:
    assert 1 <= len(p.encode("utf-8")) <= 16


@given(TEXT, st.integers(4, 32))
def test_any_max_bytes_is_respected(text, max_bytes):
  pieces = split_pieces(text, max_bytes)
  assert "".join(pieces) == text
  assert all(len(p.encode("utf-8")) <= max_bytes for p in pieces)


@given(st.lists(TEXT.filter(bool), max_size=30))
def test_array_round_trip(texts):
  pieces = [p for t in texts for p in split_pieces(t)]
  arr, lengths = pieces_to_array(pieces)
  assert arr.dtype == np.uint8 and arr.shape == (len(pieces), 16)
  assert [b.decode("utf-8") for b in array_to_pieces(arr, lengths)] == pieces
  # Padding beyond each length is zero.
  assert not (arr * (np.arange(16)[None] >= lengths[:, None])).any()


def test_piece_classes():
  assert split_pieces("Hello, world!  It's 42x\n\n") == [
      "Hello", ",", " world", "!", " ", " It", "'", "s", " 42", "x", "\n\n"]
  assert split_pieces("snake_case") == ["snake", "_", "case"]
  assert split_pieces("") == []


def test_long_runs_are_cut_at_character_boundaries():
  word = " " + "é" * 20  # 41 bytes
  pieces = split_pieces(word)
  assert "".join(pieces) == word
  assert [len(p.encode()) for p in pieces] == [15, 16, 10]
  for p in pieces:
    p.encode("utf-8").decode("utf-8")  # each piece is valid UTF-8 alone


def test_bad_arguments():
  with pytest.raises(ValueError, match="max_bytes"):
    split_pieces("x", 2)
  with pytest.raises(ValueError, match="1..16 bytes"):
    pieces_to_array(["x" * 17])


@given(TEXT)
def test_runs_cover_the_text_and_keep_contractions(text):
  runs = pieces_lib.split_runs(text)
  assert "".join(runs) == text and all(runs)


@given(TEXT)
def test_line_end_runs_cover_the_text_and_differ_only_where_punctuation_meets_a_newline(text):
  runs = pieces_lib.split_runs(text, style="line_ends")
  assert "".join(runs) == text and all(runs)
  if not re.search(r"[^\w\s]\n|_\n", text):
    assert runs == pieces_lib.split_runs(text)


def test_line_end_runs_keep_the_newlines_after_punctuation():
  text = "Citizen:\nBefore we proceed,\n\nhear me.\n  x = f(a)\n"
  assert pieces_lib.split_runs(text, style="line_ends") == [
      "Citizen", ":\n", "Before", " we", " proceed", ",\n\n", "hear", " me", ".\n", " ", " x",
      " =", " f", "(", "a", ")\n"]
  with pytest.raises(ValueError, match="tokenizer.runs='bpe' is unknown"):
    pieces_lib.split_runs(text, style="bpe")


@given(TEXT)
def test_blank_line_runs_differ_from_line_end_runs_only_where_whitespace_ends_in_no_space(text):
  runs = pieces_lib.split_runs(text, style="blank_lines")
  assert "".join(runs) == text and all(runs)
  for a, b in zip(runs, runs[1:]):  # whitespace is cut only to give a space to what follows
    assert not (a.isspace() and b[0].isspace()) or (b[0] == " " and not b[1:2].isspace())
  if not re.search(r"\s[^\S ]\S", text):
    assert runs == pieces_lib.split_runs(text, style="line_ends")


def test_blank_line_runs_keep_newline_and_indent_runs_whole():
  text = "Intro\n\nThe end.\n\n  x = 1\n\t\tfoo  \nbar   baz\n"
  assert pieces_lib.split_runs(text, style="blank_lines") == [
      "Intro", "\n\n", "The", " end", ".\n\n", " ", " x", " =", " 1", "\n\t\t", "foo", "  \n",
      "bar", "  ", " baz", "\n"]
  assert pieces_lib.split_runs(text, style="line_ends")[1:3] == ["\n", "\n"]


def test_runs_are_pieces_with_english_contractions_whole():
  assert pieces_lib.split_runs("Call'd it's we'll") == ["Call", "'d", " it", "'s", " we", "'ll"]
  assert pieces_lib.split_runs("x" * 40) == ["x" * 40]  # never cut


PHRASES = (" of the", " of the same", "Return the", " is a", " it is")
WORDS = st.lists(st.sampled_from(["of", "the", "same", "them", "is", "a", "an", "it", "Return",
                                  " ", "  ", ".", "'s", "\n", "1", "é", "x"]),
                 max_size=30).map(lambda ws: "".join(
                     w if w in {" ", "  ", ".", "'s", "\n", "1", "é"} else " " + w for w in ws))


@given(st.one_of(WORDS, TEXT))
def test_phrase_runs_are_whole_runs_joined(text):
  """With phrases, every run is a run of the plain pre-tokenizer or a phrase made of
  consecutive plain runs: phrases never cut a word."""
  runs = pieces_lib.split_runs(text, PHRASES)
  assert "".join(runs) == text
  plain = pieces_lib.split_runs(text)
  edges = lambda rs: set(itertools.accumulate(map(len, rs)))
  assert edges(runs) <= edges(plain)
  assert all(r in PHRASES or r in plain for r in runs)


def test_phrases_match_longest_first_at_word_boundaries():
  split = lambda t: pieces_lib.split_runs(t, PHRASES)
  assert split("x of the end") == ["x", " of the", " end"]
  assert split(" of them") == [" of", " them"]
  assert split(" of the same thing") == [" of the same", " thing"]
  assert split(" of the samely") == [" of the", " samely"]
  assert split("Return the x. Return them") == ["Return the", " x", ".", " Return", " them"]
  assert split("  of the's") == [" ", " of the", "'s"]
  assert pieces_lib.is_phrase(" of the") and not pieces_lib.is_phrase(" of")
  for bad in (" of", "of the.", "of  the", " 1 2"):
    with pytest.raises(ValueError, match="two or more words"):
      pieces_lib.run_regex((bad,))
