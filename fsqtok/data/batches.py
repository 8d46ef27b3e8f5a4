"""Piece datasets and the deterministic, checkpointable batch iterator."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

from fsqtok.tokenizer import pieces as pieces_lib


@dataclasses.dataclass(frozen=True)
class PieceSet:
  """Distinct pieces with their occurrence counts.

  ``bytes_NxL`` uint8 (zero padded), ``lengths_N`` int32, ``counts_N`` int64, sorted by
  decreasing count (ties by bytes), so row 0 is the most frequent piece.
  """

  bytes_NxL: np.ndarray
  lengths_N: np.ndarray
  counts_N: np.ndarray

  @classmethod
  def from_texts(cls, texts: Iterable[str], max_bytes: int = pieces_lib.MAX_PIECE_BYTES
                 ) -> "PieceSet":
    all_pieces: list[str] = []
    for t in texts:
      all_pieces.extend(pieces_lib.split_pieces(t, max_bytes))
    if not all_pieces:
      raise ValueError("No pieces: the texts are empty.")
    bytes_NxL, lengths_N = pieces_lib.pieces_to_array(all_pieces, max_bytes)
    # Rows are zero padded, so the bytes alone identify a piece except for trailing NULs;
    # appending the length makes the key exact.
    keys = np.concatenate([bytes_NxL, lengths_N[:, None].astype(np.uint8)], axis=1)
    uniq, counts = np.unique(keys, axis=0, return_counts=True)
    order = np.lexsort((np.arange(len(counts)), -counts))
    uniq, counts = uniq[order], counts[order]
    return cls(uniq[:, :-1].copy(), uniq[:, -1].astype(np.int32), counts.astype(np.int64))

  @classmethod
  def from_counts(cls, counts: dict[str, int], max_bytes: int = pieces_lib.MAX_PIECE_BYTES
                  ) -> "PieceSet":
    """Distinct strings with given occurrence counts (e.g. `fsqtok.tokenizer.candidates`)."""
    if not counts:
      raise ValueError("No pieces: the texts are empty.")
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].encode("utf-8")))
    bytes_NxL, lengths_N = pieces_lib.pieces_to_array([s for s, _ in items], max_bytes)
    return cls(bytes_NxL, lengths_N, np.array([n for _, n in items], np.int64))

  @property
  def num_distinct(self) -> int:
    return int(self.counts_N.size)

  @property
  def num_occurrences(self) -> int:
    return int(self.counts_N.sum())

  def piece_bytes(self, i: int) -> bytes:
    return bytes(self.bytes_NxL[i, : self.lengths_N[i]])

  def sample_weights(self, weighting: str) -> np.ndarray:
    """How many times each distinct piece appears in one training epoch."""
    if weighting == "occurrence":
      return self.counts_N
    if weighting == "sqrt":
      return np.ceil(np.sqrt(self.counts_N)).astype(np.int64)
    if weighting == "distinct":
      return np.ones_like(self.counts_N)
    raise ValueError(f"Unknown data.weighting {weighting!r}: use 'occurrence', 'sqrt' or "
                     f"'distinct'.")


class EpochBatcher:
  """An endless, deterministic stream of batches of rows of ``arrays``.

  Epoch ``e`` visits ``rows`` (row indices, repeats allowed) in a permutation drawn from
  ``(seed, e)``; a batch never straddles two epochs (the tail is dropped). The position
  is the pair ``(epoch, index)``: `get_state` / `set_state` save and restore it exactly.
  """

  def __init__(self, arrays: dict[str, np.ndarray], rows: np.ndarray, batch_size: int, *,
               seed: int, what: str = "rows"):
    if batch_size < 1 or rows.size < batch_size:
      raise ValueError(f"batch_size={batch_size} needs at least that many {what}; the "
                       f"corpus has {rows.size}. Lower the batch size.")
    self._arrays, self._rows, self._batch_size, self._seed = arrays, rows, batch_size, seed
    self._epoch, self._index = 0, 0
    self._perm = self._permutation(0)

  @property
  def batches_per_epoch(self) -> int:
    return self._rows.size // self._batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    return self._rows[np.random.default_rng([self._seed, epoch]).permutation(self._rows.size)]

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._perm = self._permutation(self._epoch)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._index + self._batch_size > self._perm.size:
      self._epoch, self._index = self._epoch + 1, 0
      self._perm = self._permutation(self._epoch)
    rows = self._perm[self._index:self._index + self._batch_size]
    self._index += self._batch_size
    return {k: v[rows] for k, v in self._arrays.items()}


class PieceBatcher(EpochBatcher):
  """Batches ``{"bytes", "lengths"}`` of pieces, each distinct piece repeated per epoch
  as ``weighting`` says (`PieceSet.sample_weights`)."""

  def __init__(self, pieces: PieceSet, batch_size: int, *, seed: int,
               weighting: str = "occurrence"):
    rows = np.repeat(np.arange(pieces.num_distinct), pieces.sample_weights(weighting))
    super().__init__({"bytes": pieces.bytes_NxL, "lengths": pieces.lengths_N}, rows,
                     batch_size, seed=seed, what="training pieces")
