"""The tokenizers fsqtok is compared with: exact round trips, ids in range, byte lengths."""
import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHAKESPEARE_SNIPPET
from fsqtok.tokenizer import baselines

# the characters the SentencePiece baseline rewrites, among ordinary text
_TRICKY = st.text(alphabet=st.sampled_from(list("ab \n\t\r.") + ["\u2028", "\u2029", "é",
                                                                  "日", "🙂"]),
                  max_size=40)
_TRAIN = [SHAKESPEARE_SNIPPET, "line\u2028separator\u2029 and\n\u2029\u2028 escapes\n"] * 3


@functools.lru_cache(maxsize=None)
def _trained(kind: str):
  if kind == "bytes":
    return baselines.ByteTokenizer()
  if kind == "bpe":
    return baselines.HFBPETokenizer.train(_TRAIN, 300)
  return baselines.SentencePieceTokenizer.train(_TRAIN, 300)


@pytest.mark.parametrize("text", ["", "\n", "\u2028", "\u2029", "\u2029\u2028\n\u2029",
                                  "a\u2029", "\u2029\u2029\u2028\u2028\n\n"])
def test_sentencepiece_text_mapping_is_a_bijection_onto_one_line(text):
  line = baselines.to_sentencepiece_text(text)
  assert "\n" not in line and baselines.from_sentencepiece_text(line) == text


@pytest.mark.parametrize("kind", ["bytes", "bpe", "sentencepiece"])
@settings(max_examples=60, deadline=None)
@given(text=_TRICKY)
def test_every_baseline_decodes_what_it_encodes(kind, text):
  tok = _trained(kind)
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  # the bits-per-byte denominator: the token byte lengths add up to the text's bytes
  lengths = np.asarray(tok.token_lengths())
  assert lengths.shape == (len(tok),)
  # (exact but for SentencePiece on text with U+2028/9, whose escapes pieces can split)
  if kind != "sentencepiece" or not {"\u2028", "\u2029"} & set(text):
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("kind", ["bytes", "bpe", "sentencepiece"])
def test_specials_are_distinct_and_decode_to_nothing(kind):
  tok = _trained(kind)
  specials = {tok.pad_id, tok.bos_id, tok.eos_id}
  assert len(specials) == 3 and all(0 <= i < tok.vocab_size for i in specials)
  assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id]) == "ab"
  assert all(tok.token_lengths()[i] == 0 for i in specials)
