import json

import pytest
import tokenizers
from hypothesis import given, strategies as st

from conftest import SHAKESPEARE_SNIPPET
from fsqtok.data.batches import PieceSet
from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer.hf_export import export_hf, to_hf_tokenizer
from fsqtok.tokenizer.tokenizer import Tokenizer

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  pieces = PieceSet.from_texts([SHAKESPEARE_SNIPPET * 2, "naïve café 日本語 🙂"])
  tok = Tokenizer([pieces.piece_bytes(i).decode() for i in range(pieces.num_distinct)]
                  + [" we proceed", ".\n\n"])  # two spans
  path = export_hf(tok, str(tmp_path_factory.mktemp("hf")))
  return tok, tokenizers.Tokenizer.from_file(path)


@given(TEXT)
def test_export_round_trips_and_decodes_fsqtok_ids(pair, text):
  tok, hf = pair
  assert hf.decode(hf.encode(text).ids, skip_special_tokens=False) == text
  assert hf.decode(tok.encode(text), skip_special_tokens=False) == text
  assert tok.decode(hf.encode(text).ids) == text


def test_same_ids_on_ordinary_text_except_spans(pair):
  tok, hf = pair
  text = "Before you proceed, 42 citizens spoke: naïve café 🙂!"
  assert hf.encode(text).ids == tok.encode(text)
  # Spans are fsqtok's own: the export segments piece by piece (one token more here).
  text = "Before we proceed, hear."
  assert len(hf.encode(text).ids) == len(tok.encode(text)) + 1
  assert tok.token_to_id(" we proceed") in tok.encode(text)


@pytest.mark.parametrize("text", ["<0x41>", "<0xC3><0xA9>", "[UNK]<0x00>"])
def test_byte_token_names_typed_as_text_stay_text(pair, text):
  tok, hf = pair
  assert hf.decode(hf.encode(text).ids, skip_special_tokens=False) == text
  assert tok.decode(tok.encode(text)) == text


def test_vocabulary_and_specials_line_up(pair, tmp_path):
  tok, hf = pair
  assert hf.get_vocab_size() == len(tok)
  for i in [0, 4, len(tok.special_tokens), len(tok) - 1]:
    assert hf.id_to_token(i) == tok.id_to_token(i)
  assert hf.encode("[CLS] hi").ids[0] == tok.token_to_id("[CLS]")
  saved = json.loads(to_hf_tokenizer(tok).to_str())
  assert saved["model"]["type"] == "Unigram" and saved["model"]["byte_fallback"]


# ---- unigram tokenizers: the export gives the same ids ------------------------------

ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
# Characters where Python's re and Oniguruma disagree on \w, \d or \s, among others.
TRICKY = st.lists(st.sampled_from(list("ab 1_\n\t\r.,'") + [":\n", ".\n\n", ",\n ", "re", "ll", "s", "'d",
    "\u0301", "\u0903", "\x1c", "\x1f", "\x85", "\xa0", "\u2028", "\u3000", "\u203f",
    "\uff3f", "\xb2", "\u2167", "\u00bd", "\u0660", "é", "日", "🙂", "<0x41>", "[PAD]"]),
    max_size=40).map("".join)


@pytest.fixture(scope="module", params=["subwords", "phrases", "line_ends", "blank_lines"])
def unigram_pair(doc_files, tmp_path_factory, request):
  """A unigram tokenizer (with 120 phrases, or none; "line_ends": with phrases, on runs
  whose punctuation keeps the newlines after it; "blank_lines": those runs with
  whitespace whole but for a last space) and its export."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer import unigram  # pylint: disable=g-import-not-at-top
  texts = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))]
  n_phrases = 120 if request.param != "subwords" else 0
  runs = request.param if request.param in ("line_ends", "blank_lines") else "gpt2"
  vocab = unigram.train_unigram(unigram.count_pieces(texts[:150], runs=runs),
                                1200 - n_phrases, seed_size=20_000)
  vocab = unigram.add_phrases(dataclasses.replace(vocab, runs=runs), texts[:150],
                              unigram.count_phrases(texts[:150], 16), n_phrases)
  tok = Tokenizer(vocab.strings, scores=vocab.scores, phrases=vocab.phrases, runs=vocab.runs)
  path = export_hf(tok, str(tmp_path_factory.mktemp("hf_unigram")))
  return tok, tokenizers.Tokenizer.from_file(path), texts[150:]


def test_unigram_export_gives_the_same_ids_on_held_out_documents(unigram_pair):
  tok, hf, held_out = unigram_pair
  assert len(held_out) == 50
  for doc in held_out:
    assert hf.encode(doc).ids == tok.encode(doc, parse_special=True)


# Sequences of frequent words of the corpus (phrases and near misses: " of them").
WORDS = st.lists(st.sampled_from(["the", "of", "a", "is", "to", "in", "them", "The", "for",
                                  "be", "function", "list", "'s", ".", ",", "\n", "é"]),
                 max_size=30).map(lambda ws: "".join(" " + w if w.isalpha() else w for w in ws))


def test_unigram_export_uses_the_phrases(unigram_pair):
  tok, hf, _ = unigram_pair
  text = "This is the value of the list of items in the function."
  assert hf.encode(text).ids == tok.encode(text)
  if tok.phrases:
    assert set(tok.phrases) & {tok.id_to_token(i) for i in tok.encode(text)}


@given(st.one_of(ANY_TEXT, TRICKY, WORDS))
def test_unigram_export_gives_the_same_ids_on_any_text(unigram_pair, text):
  tok, hf, _ = unigram_pair
  ids = tok.encode(text, parse_special=True)
  assert hf.encode(text).ids == ids
  assert hf.decode(ids, skip_special_tokens=False) == text


@given(st.one_of(ANY_TEXT, TRICKY, WORDS))
def test_exported_pre_tokenizer_splits_like_fsqtok(unigram_pair, text):
  tok, hf, _ = unigram_pair
  hf_runs = [r for r, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
  assert hf_runs == tok.split(text) == pieces_lib.split_runs(text, tok.phrases, tok.runs)
