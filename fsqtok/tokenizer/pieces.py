"""The pre-tokenizers: text -> pieces of at most ``max_bytes`` UTF-8 bytes, or runs.

A piece is a run of letters with an optional leading space, a digit run, a punctuation
run or a whitespace run (the last space of a run attaches to the next word, as in GPT-2).
Runs longer than ``max_bytes`` are cut at character boundaries, so every piece is valid
UTF-8 and the concatenation of the pieces is the text, always.

A unigram tokenizer splits text into *runs* (`split_runs`): the same classes, uncut, after
GPT-2's English contractions, and, first of all, its *phrases*: multi-word vocabulary
strings (" of the") matched where they end at a word boundary (`run_regex`), so that a
phrase is one run and the unigram search can give it one token.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, Iterator

import numpy as np

MAX_PIECE_BYTES = 16

# Letters = word characters that are neither digits nor underscore. Every character falls
# in exactly one class (letter, digit, other non-space, space), so the alternation covers
# any string: nothing is ever dropped.
PIECE_PATTERN = r" ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+"
_PIECE_RE = re.compile(PIECE_PATTERN)
# The runs of a unigram tokenizer (`split_runs`): the same, after GPT-2's English
# contractions ("'s", "'d", "'ll", ...), which then stay whole ("Call'd" -> "Call", "'d").
RUN_PATTERN = "'(?:[stdm]|re|ve|ll)|" + PIECE_PATTERN
_RUN_RE = re.compile(RUN_PATTERN)
# How a unigram tokenizer cuts text into runs (``tokenizer.runs``): "gpt2", the classes
# above; "line_ends", the same with a punctuation run keeping the newlines right after
# it (":\n", ".\n\n", ",\n"), so a line's end can be one token; "blank_lines", line_ends
# with whitespace kept whole but for a last space, which goes with the word after it
# (GPT-2 leaves any last whitespace character apart: "\n\nThe" is "\n", "\n", "The"
# there, "\n\n", "The" here, as in tiktoken's cl100k).
RUN_STYLES = ("gpt2", "line_ends", "blank_lines")
_OTHERS = r" ?(?:[^\w\s]|_)+"
_SPACES = r"\s+(?!\S)"


def run_pattern(style: str = "gpt2") -> str:
  """The regex of the runs of ``style`` (`RUN_STYLES`), without phrases."""
  if style == "gpt2":
    return RUN_PATTERN
  if style == "line_ends":
    return RUN_PATTERN.replace(_OTHERS, _OTHERS + r"\n*")
  if style == "blank_lines":
    return run_pattern("line_ends").replace(_SPACES, r"\s+(?= \S)")
  raise ValueError(f"tokenizer.runs={style!r} is unknown: use one of {RUN_STYLES}.")
LETTER = r"[^\W\d_]"
WORD_RE = re.compile(f" ?{LETTER}+")  # a word run: what phrases are made of


def phrase_pattern(phrases: Iterable[str], escape=re.escape) -> str:
  """A regex for any of ``phrases``, written as a trie so that it costs one branch per
  character (longest phrase first, then shorter ones where the longer cannot match).
  ``escape`` writes one character (the regex engine's own escaping)."""
  trie: dict = {}
  for phrase in phrases:
    node = trie
    for ch in phrase:
      node = node.setdefault(ch, {})
    node[""] = {}

  def emit(node) -> str:
    alts = [escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
    if not alts:
      return ""
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    return f"(?:{body})?" if "" in node else body

  return emit(trie)


def is_phrase(s: str) -> bool:
  """Whether ``s`` is two or more word runs (a phrase a unigram tokenizer can match)."""
  runs = split_runs(s)
  return len(runs) >= 2 and all(WORD_RE.fullmatch(r) for r in runs) and \
      all(r.startswith(" ") for r in runs[1:])


@functools.lru_cache(maxsize=8)
def run_regex(phrases: tuple[str, ...] = (), style: str = "gpt2") -> re.Pattern:
  """The runs of a unigram tokenizer with ``phrases``: a phrase where one matches and ends
  at a word boundary, else the runs of ``style`` (`run_pattern`)."""
  pattern = run_pattern(style)
  if not phrases:
    return _RUN_RE if style == "gpt2" else re.compile(pattern)
  bad = [p for p in phrases if not is_phrase(p)]
  if bad:
    raise ValueError(f"Phrases must be two or more words (' ?letters' runs): {bad[:5]}.")
  return re.compile(f"(?:{phrase_pattern(phrases)})(?!{LETTER})|{pattern}")


def _cut(run: str, max_bytes: int) -> Iterator[str]:
  data = run.encode("utf-8")
  if len(data) <= max_bytes:
    yield run
    return
  start, size = 0, 0
  for i, ch in enumerate(run):
    n = len(ch.encode("utf-8"))
    if size + n > max_bytes:
      yield run[start:i]
      start, size = i, 0
    size += n
  yield run[start:]


def split_runs(text: str, phrases: tuple[str, ...] = (), style: str = "gpt2") -> list[str]:
  """Splits text into runs (`run_pattern` of ``style``, after ``phrases``), however long
  (no cut); ``"".join(split_runs(t)) == t`` for every string."""
  return run_regex(phrases, style).findall(text)


def split_pieces(text: str, max_bytes: int = MAX_PIECE_BYTES) -> list[str]:
  """Splits text into pieces; ``"".join(split_pieces(t)) == t`` for every string."""
  if max_bytes < 4:
    raise ValueError(f"max_bytes must be >= 4 (one UTF-8 character), got {max_bytes}.")
  runs = _PIECE_RE.findall(text)
  if not runs or max(map(len, runs)) * (1 if text.isascii() else 4) <= max_bytes:
    return runs  # the common case: no run needs cutting
  out: list[str] = []
  for run in runs:
    if len(run) * 4 <= max_bytes or len(run.encode("utf-8")) <= max_bytes:
      out.append(run)
    else:
      out.extend(_cut(run, max_bytes))
  return out


def pieces_to_array(pieces: Iterable[str | bytes], max_bytes: int = MAX_PIECE_BYTES
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Packs pieces into ``bytes_NxL`` (uint8, zero padded) and ``lengths_N`` (int32)."""
  encoded = [p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in pieces]
  lengths = np.fromiter((len(b) for b in encoded), dtype=np.int32, count=len(encoded))
  if lengths.size and (lengths.max() > max_bytes or lengths.min() < 1):
    raise ValueError(f"pieces must have 1..{max_bytes} bytes; got lengths "
                     f"{int(lengths.min())}..{int(lengths.max())}.")
  out = np.zeros((len(encoded), max_bytes), dtype=np.uint8)
  if encoded:
    flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    rows = np.repeat(np.arange(len(encoded)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(flat.size) - np.repeat(starts, lengths)
    out[rows, cols] = flat
  return out, lengths


def array_to_pieces(bytes_NxL: np.ndarray, lengths_N: np.ndarray) -> list[bytes]:
  """Inverse of `pieces_to_array` (as bytes: a cut piece need not be valid UTF-8 alone)."""
  return [bytes(row[:n]) for row, n in zip(np.asarray(bytes_NxL), np.asarray(lengths_N))]
