"""Export to a Hugging Face ``tokenizer.json`` (loadable by `tokenizers` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``).

The export is a ``Unigram`` model with ``byte_fallback`` (the same ``<0xNN>`` tokens at the
same ids), a ``Split`` pre-tokenizer and a decoder that fuses byte tokens back into text.

* A ``"unigram"`` tokenizer exports its scores, and Hugging Face's Viterbi search is the
  one fsqtok runs (`fsqtok.tokenizer.tokenizer`), so both give **the same ids** on every text
  (tested on real text and on arbitrary Unicode strings), with one convention to match:
  Hugging Face parses special-token strings typed in the text as specials, which is
  fsqtok's ``encode(text, parse_special=True)``.
* The pre-tokenizer's regex (`fsqtok.tokenizer.pieces.run_pattern` of its runs for a unigram tokenizer,
  ``PIECE_PATTERN`` for a fewest one) is written out with explicit code-point ranges, built from
  what Python's ``re`` counts as a letter, digit or space, so that Hugging Face's regex
  engine (Oniguruma, whose ``\\w`` and ``\\s`` differ: combining marks, ``\\x1c``-``\\x1f``,
  ...) splits every text exactly as `fsqtok.tokenizer.pieces` does.
* A unigram tokenizer's phrases (`fsqtok.tokenizer.pieces.run_regex`) lead the pre-tokenizer's regex
  as the same trie of literals and the same word-boundary look-ahead; both engines
  backtrack alike, so they pick the same phrase.
* A ``"fewest"`` tokenizer exports every token with score -1, so Viterbi picks the fewest
  tokens inside each piece; its multi-piece spans and its cut of runs over 16 bytes have
  no Hugging Face equivalent, so there the export can need more tokens.

A byte token's name typed as text ("<0x41>") stays text: the pre-tokenizer cuts it into
several runs, so Unigram never matches the name.
"""
from __future__ import annotations

import functools
import os
import re
import sys

from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer.tokenizer import Tokenizer
from fsqtok.train import workdir as workdir_lib


def _ranges(member) -> str:
  """Oniguruma character-class body with every code point for which ``member`` holds."""
  out, start = [], None
  for cp in range(sys.maxunicode + 2):
    inside = cp <= sys.maxunicode and not 0xD800 <= cp <= 0xDFFF and member(chr(cp))
    if inside and start is None:
      start = cp
    elif not inside and start is not None:
      out.append(f"\\x{{{start:X}}}" if cp - 1 == start else
                 f"\\x{{{start:X}}}-\\x{{{cp - 1:X}}}")
      start = None
  return "".join(out)


@functools.cache
def _classes() -> tuple[str, str, str]:
  """Python's letter, digit and space classes as Oniguruma ranges (about a second)."""
  letter, digit, space = (re.compile(p).fullmatch
                          for p in (pieces_lib.LETTER, r"\d", r"\s"))
  return _ranges(letter), _ranges(digit), _ranges(space)


def hf_piece_pattern(contractions: bool = True, phrases: tuple[str, ...] = (),
                     runs: str = "gpt2") -> str:
  """`fsqtok.tokenizer.pieces.run_regex` (``PIECE_PATTERN`` without ``contractions``; the
  runs of style ``runs``) for Oniguruma, with Python's character classes spelled out as
  code-point ranges."""
  pieces_lib.run_pattern(runs)  # a known style
  l, d, s = _classes()
  newlines = r"\n*" if runs in ("line_ends", "blank_lines") else ""
  spaces = f"(?= [^{s}])" if runs == "blank_lines" else f"(?![^{s}])"
  pattern = f" ?[{l}]+| ?[{d}]+| ?[^{l}{d}{s}]+{newlines}|[{s}]+{spaces}|[{s}]+"
  if not contractions:
    return pattern
  pattern = pieces_lib.RUN_PATTERN.replace(pieces_lib.PIECE_PATTERN, pattern)
  if phrases:
    trie = pieces_lib.phrase_pattern(
        phrases, escape=lambda ch: ch if ch.isascii() and ch.isalnum() else f"\\x{{{ord(ch):X}}}")
    pattern = f"(?:{trie})(?![{l}])|{pattern}"
  return pattern


def to_hf_tokenizer(tok: Tokenizer):
  """The equivalent `tokenizers.Tokenizer`."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top

  if tok.model == "unigram":
    # Specials and byte tokens are never matched by the search; 0.0 keeps them out of the
    # lowest score, from which both sides derive an uncovered character's score.
    scores = [tok.id_to_score(i) for i in range(len(tok))]
    vocab = [(tok.id_to_token(i), 0.0 if sc is None else sc) for i, sc in enumerate(scores)]
  else:
    vocab = [(tok.id_to_token(i), -1.0) for i in range(len(tok))]
  unk = tok.token_to_id("[UNK]")
  hf = HFTokenizer(models.Unigram(vocab, unk_id=unk if unk is not None else 0,
                                  byte_fallback=True))
  pattern = hf_piece_pattern(tok.model == "unigram", tok.phrases, tok.runs)
  hf.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
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

