import json

import pytest
import tokenizers
from hypothesis import given, strategies as st

from conftest import SHAKESPEARE_SNIPPET
from fsqtok.data import PieceSet
from fsqtok.hf_export import export_hf, to_hf_tokenizer
from fsqtok.tokenizer import Tokenizer

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
