"""The vocabulary phase: from a trained codec to a table ``code <-> string``.

Every candidate string (`fsqtok.tokenizer.candidates`) is encoded; a code whose decoder output is
exactly the candidate that maps to it is *exact*, and only exact codes can enter the
vocabulary. Among them the vocabulary is chosen for compression, like a unigram
tokenizer's pruning but with the token count itself as the objective: segment the
training texts with every remaining candidate, score each one by the tokens its removal
would add (uses x (tokens its string needs without it - 1)), drop the lowest-scoring
part, and repeat until ``size`` remain. Because each code decodes to one string,
encoding text with the table needs no neural forward pass.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from fsqtok.codec import evaluate as evaluate_lib
from fsqtok.data.batches import PieceSet
from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class CodeVocabulary:
  """Codes with their FSQ index, exact string and count (most used first)."""

  codes_K: np.ndarray      # int64 FSQ indices, distinct
  strings: tuple[bytes, ...]
  counts_K: np.ndarray     # candidates: occurrences; a selected vocabulary: uses

  def __len__(self) -> int:
    return len(self.strings)

  def take(self, rows: Sequence[int], counts_K: np.ndarray | None = None) -> "CodeVocabulary":
    rows = np.asarray(rows, np.int64)
    return CodeVocabulary(self.codes_K[rows], tuple(self.strings[i] for i in rows),
                          self.counts_K[rows] if counts_K is None else counts_K)


def exact_candidates(codes_N: np.ndarray, exact_N: np.ndarray, pieces: PieceSet
                     ) -> CodeVocabulary:
  """The candidates of ``pieces`` of two or more bytes that reconstruct exactly (single
  bytes have their own tokens), by decreasing count.

  ``codes_N`` / ``exact_N`` are each candidate's code and exact-reconstruction flag. A
  decoder is deterministic, so at most one candidate per code can be exact; that
  candidate is the code's string.
  """
  rows = np.flatnonzero(np.asarray(exact_N) & (pieces.lengths_N >= 2))
  codes = np.asarray(codes_N, np.int64)[rows]
  if len(np.unique(codes)) != len(codes):
    raise ValueError("Two distinct pieces reconstruct exactly through one code: the "
                     "codec outputs are not deterministic per code.")
  counts = pieces.counts_N[rows]
  order = np.lexsort((codes, -counts))
  keep = rows[order]
  return CodeVocabulary(codes_K=codes[order], counts_K=counts[order],
                        strings=tuple(pieces.piece_bytes(i) for i in keep))


def _usage(tok: Tokenizer, piece_lists: Sequence[list[str]]) -> np.ndarray:
  counts = np.zeros(tok.vocab_size, np.int64)
  for ps in piece_lists:
    counts += np.bincount(tok.encode_pieces(ps), minlength=tok.vocab_size)
  return counts


def select_vocabulary(candidates: CodeVocabulary, texts: Sequence[str], size: int, *,
                      max_piece_bytes: int = pieces_lib.MAX_PIECE_BYTES, shrink: float = 0.75,
                      progress: bool = False) -> tuple[CodeVocabulary, list[dict]]:
  """At most ``size`` candidates chosen for the fewest tokens on ``texts``.

  Returns the vocabulary (most used first; ``counts_K`` = uses in ``texts``) and the
  pruning history (candidates left and bytes per token on ``texts`` at each round).
  """
  if size < 0:
    raise ValueError(f"vocabulary size must be >= 0, got {size}.")
  if not 0 < shrink < 1:
    raise ValueError(f"shrink must be in (0, 1), got {shrink}.")
  piece_lists = [pieces_lib.split_pieces(t, max_piece_bytes) for t in texts]
  total_bytes = sum(len(t.encode("utf-8")) for t in texts)
  keep = np.arange(len(candidates))
  history: list[dict] = []
  bar = tqdm(desc="vocab", disable=not progress, unit=" rounds")
  while True:
    tok = Tokenizer([candidates.strings[i].decode("utf-8") for i in keep],
                    max_piece_bytes=max_piece_bytes)
    usage = _usage(tok, piece_lists)
    learned = usage[tok.learned_ids.start:tok.learned_ids.stop]
    history.append({"candidates": int(keep.size),
                    "bytes_per_token": total_bytes / max(int(usage.sum()), 1)})
    bar.update()
    bar.set_postfix(candidates=keep.size, bytes_per_token=f"{history[-1]['bytes_per_token']:.3f}")
    if keep.size <= size:
      used = learned > 0
      order = np.lexsort((np.arange(int(used.sum())), -learned[used]))
      bar.close()
      return candidates.take(keep[used][order], learned[used][order]), history
    target = max(size, int(keep.size * shrink))
    loss = np.full(keep.size, -1.0)
    for k in np.flatnonzero(learned):
      extra = tok.fewest_tokens_without(tok.learned_ids.start + int(k)) - 1
      loss[k] = learned[k] * extra
    # Highest loss first; ties: the more frequent candidate, then the earlier one.
    order = np.lexsort((np.arange(keep.size), -candidates.counts_K[keep], -loss))
    keep = np.sort(keep[order[:target]])


def kind_of(s: str, pieces: set[str]) -> str:
  """``piece`` (a training piece), ``span`` (several pieces) or ``sub`` (part of one)."""
  if s in pieces:
    return "piece"
  return "span" if len(pieces_lib.split_pieces(s, pieces_lib.MAX_PIECE_BYTES)) > 1 else "sub"


def composition(vocab: CodeVocabulary, pieces: set[str]) -> dict[str, int]:
  """How many vocabulary strings are whole pieces, parts of pieces and multi-piece spans."""
  out = {"piece": 0, "sub": 0, "span": 0}
  for b in vocab.strings:
    out[kind_of(b.decode("utf-8"), pieces)] += 1
  return out


def codebook_analysis(codes_N: np.ndarray, exact_N: np.ndarray, pieces: PieceSet,
                      codebook_size: int) -> dict:
  """Utilization, collisions and the code-frequency curve over the candidates."""
  counts = pieces.counts_N.astype(np.float64)
  uniq, inverse, per_code = np.unique(codes_N, return_inverse=True, return_counts=True)
  mass = np.sort(np.bincount(inverse, weights=counts))[::-1]
  return {
      "distinct_candidates": pieces.num_distinct,
      "codes_used": int(uniq.size),
      "code_utilization": float(uniq.size / min(pieces.num_distinct, codebook_size)),
      "collision_rate": float((per_code[inverse] > 1).mean()),
      "exact_candidates": int(np.count_nonzero(exact_N)),
      "code_frequency_curve": mass.tolist(),
  }


def build_code_vocabulary(model, params, pieces: PieceSet, texts: Sequence[str], size: int, *,
                          batch_size: int, mesh, max_piece_bytes: int, progress: bool = False
                          ) -> tuple[CodeVocabulary, dict]:
  """Runs the codec over the candidates ``pieces`` (batched, jit, on the mesh), keeps the
  exact ones and selects ``size`` of them for compression on ``texts``."""
  stats = evaluate_lib.compute_piece_stats(model, params, pieces, batch_size=batch_size,
                                           mesh=mesh)
  exact = exact_candidates(stats["code"], stats["exact"], pieces)
  vocab, history = select_vocabulary(exact, texts, size, max_piece_bytes=max_piece_bytes,
                                     progress=progress)
  piece_set = {p for t in texts for p in pieces_lib.split_pieces(t, max_piece_bytes)}
  analysis = {**codebook_analysis(stats["code"], stats["exact"], pieces,
                                  model.fsq.codebook_size),
              "exact_candidates_2plus_bytes": len(exact),
              "learned_tokens": len(vocab),
              "composition": composition(vocab, piece_set),
              "train_bytes_per_token": history[-1]["bytes_per_token"],
              "pruning": history}
  return vocab, analysis
