"""The tokenizers fsqtok is compared with, behind the interface the LM needs
(`fsqtok.lm_data.TokenizerLike`): raw UTF-8 bytes, and Hugging Face byte-level BPE."""
from __future__ import annotations

import os
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

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_lengths(self) -> list[int]:
    """Bytes per id (0 for the specials): byte-level BPE spells each byte as one char."""
    specials = {self.pad_id, self.bos_id, self.eos_id}
    return [0 if i in specials else len(self._tok.id_to_token(i))
            for i in range(self.vocab_size)]

  def __len__(self) -> int:
    return self.vocab_size
