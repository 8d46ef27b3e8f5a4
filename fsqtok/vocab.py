"""The vocabulary phase: from a trained codec to a table ``code <-> string``.

Every distinct training piece is encoded; a code whose decoder output is exactly a piece
that maps to it is *exact* and represents that piece. Codes are ranked by the number of
occurrences they reconstruct exactly, and the top ``size`` are kept. Because each code
decodes to one string, encoding text with this table needs no neural forward pass.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fsqtok import evaluate as evaluate_lib
from fsqtok.data import PieceSet


@dataclasses.dataclass(frozen=True)
class CodeVocabulary:
  """Kept codes, most frequent first: their FSQ index, exact string and count."""

  codes_K: np.ndarray      # int64 FSQ indices, distinct
  strings: tuple[bytes, ...]
  counts_K: np.ndarray     # occurrences reconstructed exactly through the code

  def __len__(self) -> int:
    return len(self.strings)


def select_vocabulary(codes_N: np.ndarray, exact_N: np.ndarray, pieces: PieceSet, size: int
                      ) -> CodeVocabulary:
  """The ``size`` exact codes covering the most occurrences (ties: by code index).

  ``codes_N`` / ``exact_N`` are the code and the exact-reconstruction flag of each
  distinct piece of ``pieces``. A decoder is deterministic, so at most one piece per
  code can be exact; that piece is the code's string.
  """
  if size < 0:
    raise ValueError(f"vocabulary size must be >= 0, got {size}.")
  rows = np.flatnonzero(exact_N)
  codes = np.asarray(codes_N, np.int64)[rows]
  if len(np.unique(codes)) != len(codes):
    raise ValueError("Two distinct pieces reconstruct exactly through one code: the "
                     "codec outputs are not deterministic per code.")
  counts = pieces.counts_N[rows]
  order = np.lexsort((codes, -counts))[:size]
  keep = rows[order]
  return CodeVocabulary(codes_K=codes[order], counts_K=counts[order],
                        strings=tuple(pieces.piece_bytes(i) for i in keep))


def codebook_analysis(codes_N: np.ndarray, exact_N: np.ndarray, pieces: PieceSet,
                      vocab: CodeVocabulary, codebook_size: int) -> dict:
  """Utilization, collisions, coverage and the code-frequency curve."""
  counts = pieces.counts_N.astype(np.float64)
  uniq, inverse, per_code = np.unique(codes_N, return_inverse=True, return_counts=True)
  mass = np.sort(np.bincount(inverse, weights=counts))[::-1]
  return {
      "distinct_pieces": pieces.num_distinct,
      "codes_used": int(uniq.size),
      "code_utilization": float(uniq.size / min(pieces.num_distinct, codebook_size)),
      "collision_rate": float((per_code[inverse] > 1).mean()),
      "exact_pieces": int(np.count_nonzero(exact_N)),
      "vocab_size": len(vocab),
      "vocab_coverage": float(vocab.counts_K.sum() / counts.sum()),
      "code_frequency_curve": mass.tolist(),
  }


def build_code_vocabulary(model, params, pieces: PieceSet, size: int, *, batch_size: int,
                          mesh) -> tuple[CodeVocabulary, dict]:
  """Runs the codec over ``pieces`` (batched, jit, on the mesh) and selects the table."""
  stats = evaluate_lib.compute_piece_stats(model, params, pieces, batch_size=batch_size,
                                           mesh=mesh)
  vocab = select_vocabulary(stats["code"], stats["exact"], pieces, size)
  return vocab, codebook_analysis(stats["code"], stats["exact"], pieces, vocab,
                                  model.fsq.codebook_size)
