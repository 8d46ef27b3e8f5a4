"""Held-out evaluation of the codec on a `PieceSet`.

Per distinct piece the device computes its code, whether each byte is right, whether
the whole piece is, and its cross-entropy; the host weights them by occurrence.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fsqtok.codec import model as codec_lib
from fsqtok.data.batches import PieceSet
from fsqtok.train import sharding as sharding_lib


@functools.partial(jax.jit, static_argnums=0)
def piece_stats(model: codec_lib.Codec, params, bytes_BxL, lengths_B) -> dict[str, jax.Array]:
  """Per-piece reconstruction statistics (compiled once per codec and batch shape)."""
  logits, codes = model.apply({"params": params}, bytes_BxL, lengths_B)
  targets, weights = codec_lib.targets_and_weights(bytes_BxL, lengths_B)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  pred = jnp.argmax(logits, -1)
  byte_mask = codec_lib.length_mask(lengths_B, bytes_BxL.shape[1])
  right = pred == targets
  return {
      "code": model.fsq.codes_to_indices(codes),
      "bytes_right": jnp.sum(right & byte_mask, 1),
      "exact": jnp.all(right | (weights == 0), 1),
      "ce_sum": jnp.sum(ce * weights, 1),
      "positions": jnp.sum(weights, 1),
  }


def compute_piece_stats(model, params, pieces: PieceSet, *, batch_size: int, mesh
                        ) -> dict[str, np.ndarray]:
  """`piece_stats` over every distinct piece, batched over the mesh."""
  sharding_lib.check_batch_size(batch_size, mesh)
  n = pieces.num_distinct
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, n, batch_size):
    b = pieces.bytes_NxL[start:start + batch_size]
    l = pieces.lengths_N[start:start + batch_size]
    pad = batch_size - len(l)
    if pad:  # fixed shapes: one compilation; padded rows are dropped below
      b = np.concatenate([b, np.zeros((pad, b.shape[1]), b.dtype)])
      l = np.concatenate([l, np.ones(pad, l.dtype)])
    batch = sharding_lib.shard_batch({"bytes": b, "lengths": l}, mesh)
    # The batch arrives split on the mesh; jit follows its placement.
    out = sharding_lib.to_host(piece_stats(model, params, batch["bytes"], batch["lengths"]))
    for k, v in out.items():
      chunks.setdefault(k, []).append(np.asarray(v)[: batch_size - pad])
  return {k: np.concatenate(v) for k, v in chunks.items()}


def reconstruction_metrics(stats: dict[str, np.ndarray], pieces: PieceSet,
                           codebook_size: int) -> dict[str, float]:
  """Byte accuracy, exact match, perplexity, utilization and collisions."""
  w = pieces.counts_N.astype(np.float64)
  lengths = pieces.lengths_N.astype(np.float64)
  codes = stats["code"]
  uniq_codes, inverse, code_counts = np.unique(codes, return_inverse=True, return_counts=True)
  shared = code_counts[inverse] > 1
  code_mass = np.bincount(inverse, weights=w)
  p = code_mass / code_mass.sum()
  return {
      "byte_accuracy": float((w * stats["bytes_right"]).sum() / (w * lengths).sum()),
      "exact_match": float((w * stats["exact"]).sum() / w.sum()),
      "exact_match_distinct": float(stats["exact"].mean()),
      "perplexity": float(np.exp((w * stats["ce_sum"]).sum() / (w * stats["positions"]).sum())),
      "codes_used": int(uniq_codes.size),
      # Distinct codes over the most that could be distinct: one per distinct piece.
      "code_utilization": float(uniq_codes.size / min(pieces.num_distinct, codebook_size)),
      "codebook_fraction": float(uniq_codes.size / codebook_size),
      "code_perplexity": float(np.exp(-(p * np.log(p)).sum())),
      "collision_rate": float(shared.mean()),
      "collision_mass": float((w * shared).sum() / w.sum()),
      "distinct_pieces": int(pieces.num_distinct),
      "occurrences": int(pieces.num_occurrences),
  }


def seen_byte_share(val: PieceSet, train: PieceSet) -> float:
  """Share of ``val``'s bytes (by occurrence) in pieces that also occur in ``train``:
  what a codec that only memorised its training pieces could reconstruct."""
  seen = {train.piece_bytes(i) for i in range(train.num_distinct)}
  in_train = np.array([val.piece_bytes(i) in seen for i in range(val.num_distinct)])
  mass = val.counts_N * val.lengths_N
  return float((mass * in_train).sum() / mass.sum())


def evaluate(model, params, pieces: PieceSet, *, batch_size: int, mesh) -> dict[str, float]:
  stats = compute_piece_stats(model, params, pieces, batch_size=batch_size, mesh=mesh)
  return reconstruction_metrics(stats, pieces, model.fsq.codebook_size)


def reconstruct(model, params, bytes_BxL, lengths_B) -> list[bytes]:
  """Greedy reconstructions of a few pieces (for reports and notebooks)."""
  logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(bytes_BxL),
                                   jnp.asarray(lengths_B))
  out, lens = sharding_lib.to_host(codec_lib.greedy_decode(logits))
  return [bytes(r[:n]) for r, n in zip(out, lens)]
