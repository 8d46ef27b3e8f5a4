"""The tokenizers fsqtok is compared with, behind the interface the LM needs
(`fsqtok.data.lm_data.TokenizerLike`): raw UTF-8 bytes, Hugging Face byte-level BPE and
SentencePiece unigram."""
from __future__ import annotations

import os
import re
import tempfile
from typing import Sequence

SPECIALS = ("[PAD]", "[BOS]", "[EOS]")


class ByteTokenizer:
  """Ids 0..255 are the bytes; PAD, BOS and EOS follow."""

  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    del skip_special_tokens
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

  def token_lengths(self) -> list[int]:
    """Bytes per id (0 for the specials)."""
    return [1] * 256 + [0] * 3

  def __len__(self) -> int:
    return self.vocab_size


def _byte_level_decoding() -> dict[str, int]:
  """GPT-2's byte-level alphabet: the character that stands for each byte -> the byte."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


class HFBPETokenizer:
  """Byte-level BPE (GPT-2 style pre-tokenization) trained with Hugging Face `tokenizers`;
  ``vocab_size`` counts everything, the three specials included."""

  def __init__(self, tok):
    self._tok = tok
    self.vocab_size = tok.get_vocab_size()
    self.pad_id, self.bos_id, self.eos_id = (tok.token_to_id(s) for s in SPECIALS)

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int) -> "HFBPETokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return cls(tok)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def strings(self) -> list[str]:
    """The learned tokens as text, in id order (tokens that are not whole UTF-8
    characters, and the specials, left out)."""
    byte_of = _byte_level_decoding()
    specials = {self.pad_id, self.bos_id, self.eos_id}
    out = []
    for i in range(self.vocab_size):
      if i in specials:
        continue
      try:
        out.append(bytes(byte_of[c] for c in self._tok.id_to_token(i)).decode("utf-8"))
      except UnicodeDecodeError:
        continue
    return out

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_lengths(self) -> list[int]:
    """Bytes per id (0 for the specials): byte-level BPE spells each byte as one char."""
    specials = {self.pad_id, self.bos_id, self.eos_id}
    return [0 if i in specials else len(self._tok.id_to_token(i))
            for i in range(self.vocab_size)]

  def __len__(self) -> int:
    return self.vocab_size


# SentencePiece reads one sentence a line, so a text goes to it with its newlines written
# as U+2028 (an ordinary character to SentencePiece). To keep a U+2028 of the text apart,
# U+2029 escapes: U+2029 -> U+2029 U+2029, U+2028 -> U+2029 U+2028, then "\n" -> U+2028.
_SP_NEWLINE, _SP_ESCAPE = "\u2028", "\u2029"
_SP_UNESCAPE = re.compile("\u2029([\u2028\u2029])|\u2028")


def to_sentencepiece_text(text: str) -> str:
  """``text`` as the SentencePiece baseline trains and encodes it (one line)."""
  return (text.replace(_SP_ESCAPE, _SP_ESCAPE * 2)
          .replace(_SP_NEWLINE, _SP_ESCAPE + _SP_NEWLINE).replace("\n", _SP_NEWLINE))


def from_sentencepiece_text(text: str) -> str:
  """The inverse of `to_sentencepiece_text` (a lone escape, as one piece decoded alone
  can end with, stays itself)."""
  return _SP_UNESCAPE.sub(lambda m: m.group(1) or "\n", text)


class SentencePieceTokenizer:
  """SentencePiece unigram (or BPE), trained losslessly: identity normalization, no
  dummy prefix, whitespace kept, byte fallback; ``vocab_size`` counts everything (PAD,
  BOS, EOS, UNK and the 256 byte pieces included). A corpus too small for the size gets
  fewer ids (``hard_vocab_limit=False``)."""

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int, model_type: str = "unigram",
            max_sentences: int = 0) -> "SentencePieceTokenizer":
    """``max_sentences``: train on SentencePiece's own seeded sample of this many texts
    (``input_sentence_size``; 0: all of them)."""
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "train.txt")
      with open(path, "w", encoding="utf-8") as f:  # a line per text
        f.writelines(to_sentencepiece_text(t) + "\n" for t in texts)
      spm.SentencePieceTrainer.train(
          input=path, model_prefix=os.path.join(tmp, "sp"), vocab_size=vocab_size,
          model_type=model_type, byte_fallback=True, character_coverage=0.9999,
          normalization_rule_name="identity", add_dummy_prefix=False,
          remove_extra_whitespaces=False, split_by_whitespace=True,
          max_sentence_length=1 << 20, hard_vocab_limit=False,
          allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2,
          input_sentence_size=max_sentences, shuffle_input_sentence=True)
      with open(os.path.join(tmp, "sp.model"), "rb") as f:
        return cls(f.read())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(to_sentencepiece_text(text))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    del skip_special_tokens  # SentencePiece never decodes its control ids
    return from_sentencepiece_text(self._sp.decode(list(ids)))

  def token_lengths(self) -> list[int]:
    """Bytes per id (0 for control ids): what each piece decodes to (exact but for text
    with U+2028/U+2029, whose escapes a piece boundary can split)."""
    return [0 if self._sp.is_control(i) else
            1 if self._sp.is_byte(i) else len(self.decode([i]).encode("utf-8"))
            for i in range(self.vocab_size)]

  def __len__(self) -> int:
    return self.vocab_size
