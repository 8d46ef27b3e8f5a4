"""Export to a Hugging Face ``tokenizer.json`` (loadable by `tokenizers` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``).

The export is a Unigram model in which every token scores -1, so Viterbi picks the
fewest tokens, as fsqtok does; ``byte_fallback`` covers anything else with the same
``<0xNN>`` tokens at the same ids; the pre-tokenizer is fsqtok's piece regex; the decoder
fuses byte tokens back into text. Each side decodes the other's ids exactly, and on
ordinary text both produce the same ids except where fsqtok uses a multi-piece span (a
pre-tokenizer cannot express spans, so the export segments piece by piece there and
needs more tokens). They can also differ where the regex engines
disagree (Unicode combining marks are word characters for Oniguruma, not for Python's
``re``), on runs over 16 bytes (fsqtok cuts them first), and by Hugging Face's own
convention that special-token strings typed in the text are parsed as specials
(fsqtok's ``parse_special=True``). A byte token's name typed as text ("<0x41>") stays
text: the pre-tokenizer cuts it into several pieces, so Unigram never matches the name.
"""
from __future__ import annotations

import os

from fsqtok import pieces as pieces_lib
from fsqtok import workdir as workdir_lib
from fsqtok.tokenizer import Tokenizer


def to_hf_tokenizer(tok: Tokenizer):
  """The equivalent `tokenizers.Tokenizer`."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top

  vocab = [(tok.id_to_token(i), -1.0) for i in range(len(tok))]
  unk = tok.token_to_id("[UNK]")
  hf = HFTokenizer(models.Unigram(vocab, unk_id=unk if unk is not None else 0,
                                  byte_fallback=True))
  hf.pre_tokenizer = pre_tokenizers.Split(Regex(pieces_lib.PIECE_PATTERN), behavior="isolated")
  hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  hf.add_special_tokens([AddedToken(s, special=True, normalized=False)
                         for s in tok.special_tokens])
  return hf


def export_hf(tok: Tokenizer, path: str) -> str:
  """Writes ``tokenizer.json`` atomically to ``path`` (a file, or a directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  workdir_lib.atomic_write_text(path, to_hf_tokenizer(tok).to_str(pretty=False))
  return path
