"""Candidate vocabulary strings at adaptive granularity.

A tokenizer that only knows whole pieces cannot give a common phrase one token
(" of the", ".\\n\\n") nor split a rare word into common parts ("un" + "speak" + "able").
The candidates are therefore three kinds of strings of at most ``max_bytes`` UTF-8 bytes,
counted in the training texts:

* ``piece``: a piece of the pre-tokenizer (`fsqtok.tokenizer.pieces`);
* ``span``: 2..``max_span_pieces`` consecutive pieces, kept only when splitting the
  joined string gives back the same pieces (the tokenizer matches spans piece by piece,
  so a span must be recognisable out of context);
* ``sub``: a substring (at character boundaries, >= 2 bytes) of a piece, counted once per
  occurrence of every piece that contains it.

The codec is trained on the candidates and the vocabulary is chosen among the ones it
reconstructs exactly (`fsqtok.tokenizer.vocab`).
"""
from __future__ import annotations

import collections
from typing import Iterable, Sequence

from fsqtok.data import corpus as corpus_lib
from fsqtok.data.batches import PieceSet
from fsqtok.tokenizer import pieces as pieces_lib

KINDS = ("piece", "span", "sub")


def count_candidates(texts: Iterable[str], *, max_bytes: int = pieces_lib.MAX_PIECE_BYTES,
                     max_span_pieces: int = 4, sub_pieces: bool = True
                     ) -> dict[str, collections.Counter]:
  """Occurrence counts of every candidate string, per kind (a sub-piece that is also a
  piece is counted under ``piece`` only)."""
  if max_span_pieces < 1:
    raise ValueError(f"max_span_pieces must be >= 1, got {max_span_pieces}.")
  piece_counts: collections.Counter = collections.Counter()
  span_counts: collections.Counter = collections.Counter()
  for text in texts:
    ps = pieces_lib.split_pieces(text, max_bytes)
    piece_counts.update(ps)
    sizes = [len(p.encode("utf-8")) for p in ps]
    for i in range(len(ps)):
      total = sizes[i]
      for j in range(i + 1, min(i + max_span_pieces, len(ps))):
        total += sizes[j]
        if total > max_bytes:
          break
        span_counts[tuple(ps[i:j + 1])] += 1
  spans: collections.Counter = collections.Counter()
  for parts, n in span_counts.items():
    joined = "".join(parts)
    if pieces_lib.split_pieces(joined, max_bytes) == list(parts):
      spans[joined] += n
  subs: collections.Counter = collections.Counter()
  if sub_pieces:
    for piece, n in piece_counts.items():
      for a in range(len(piece)):
        for b in range(a + 1, len(piece) + 1):
          if (a, b) != (0, len(piece)) and len(piece[a:b].encode("utf-8")) >= 2:
            subs[piece[a:b]] += n
    for piece in piece_counts:
      subs.pop(piece, None)
  return {"piece": piece_counts, "span": spans, "sub": subs}


def select_candidates(counts: dict[str, collections.Counter], *, min_count: int,
                      max_candidates: int, kinds: Sequence[str] = KINDS) -> dict[str, int]:
  """Every piece, then the spans and sub-pieces seen at least ``min_count`` times with
  the most bytes covered (count x length), up to ``max_candidates`` strings in all."""
  unknown = set(kinds) - set(KINDS)
  if unknown or "piece" not in kinds:
    raise ValueError(f"candidate kinds must include 'piece' and be among {KINDS}, got "
                     f"{tuple(kinds)}.")
  chosen = dict(counts["piece"])
  extra = [(n * len(s.encode("utf-8")), s, n) for k in kinds if k != "piece"
           for s, n in counts[k].items() if n >= min_count]
  extra.sort(key=lambda t: (-t[0], t[1]))
  for _, s, n in extra[:max(0, max_candidates - len(chosen))]:
    chosen[s] = n
  return chosen


def candidate_set(texts: Sequence[str], *, max_bytes: int, max_span_pieces: int,
                  min_count: int, max_candidates: int, kinds: Sequence[str] = KINDS
                  ) -> PieceSet:
  """The candidates of ``texts`` as a `PieceSet` (count = occurrences)."""
  counts = count_candidates(texts, max_bytes=max_bytes, max_span_pieces=max_span_pieces,
                            sub_pieces="sub" in kinds)
  chosen = select_candidates(counts, min_count=min_count, max_candidates=max_candidates,
                             kinds=kinds)
  return PieceSet.from_counts(chosen, max_bytes)


def pieces_of(config, texts: list[str]) -> PieceSet:
  """What the codec learns from ``texts`` under ``config.data.candidates``: their pieces
  (``"pieces"``) or the adaptive-granularity candidates of `candidate_set`
  (``"adaptive"``)."""
  d, max_len = config.data, config.model.max_len
  if d.candidates == "pieces":
    return PieceSet.from_texts(texts, max_len)
  if d.candidates == "adaptive":
    return candidate_set(texts, max_bytes=max_len, max_span_pieces=d.max_span_pieces,
                         min_count=d.min_count, max_candidates=d.max_candidates)
  raise ValueError(f"Unknown data.candidates {d.candidates!r}: use 'pieces' or 'adaptive'.")


def load_pieces(config, texts: tuple[list[str], list[str]] | None = None
                ) -> tuple[PieceSet, PieceSet]:
  """Train and validation `PieceSet` of ``config`` (``texts``: its split, if loaded)."""
  train_texts, val_texts = texts if texts is not None else corpus_lib.load_split(config.data)
  return pieces_of(config, train_texts), pieces_of(config, val_texts)
