"""Token streams for the language model and their deterministic, checkpointable batches.

Each text becomes ``[BOS] ids [EOS]``; the texts are concatenated into one stream and cut
into windows of ``seq_len + 1`` tokens (inputs and next-token targets). A target is
scored unless it is padding (the tail of the last window) or a BOS (its place is known).
Bits per byte divide the summed loss by the UTF-8 bytes of the texts, so tokenizers with
different vocabularies are compared on the same text.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from fsqtok.data.batches import EpochBatcher

LOADERS = ("epochs", "grain")


class TokenizerLike(Protocol):
  """What the LM needs of a tokenizer (fsqtok's, or an adapter around another one)."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...


def token_stream(tok: TokenizerLike, texts: Sequence[str]) -> np.ndarray:
  """``[BOS] ids [EOS]`` of every text, concatenated (int32)."""
  parts = []
  for t in texts:
    parts.append(np.asarray([tok.bos_id, *tok.encode(t), tok.eos_id], np.int32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def windows(stream: np.ndarray, seq_len: int, pad_id: int, bos_id: int) -> dict[str, np.ndarray]:
  """Non-overlapping windows ``[N, seq_len]``: inputs, targets and target weights."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
  if stream.size < 2:
    raise ValueError("The token stream is empty: no text to train or evaluate on.")
  n = -(-(stream.size - 1) // seq_len)
  padded = np.full(n * seq_len + 1, pad_id, np.int32)
  padded[:stream.size] = stream
  starts = np.arange(n) * seq_len
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  rows = padded[idx]
  real = idx < stream.size
  targets = rows[:, 1:]
  weights = (real[:, 1:] & (targets != bos_id)).astype(np.float32)
  return {"inputs": rows[:, :-1], "targets": targets, "weights": weights,
          "valid": real[:, :-1]}


def window_batcher(data: dict[str, np.ndarray], batch_size: int, *, seed: int,
                   loader: str = "epochs"):
  """Every window once an epoch, in a seeded order (position saved and restored exactly).
  ``loader`` (`LOADERS`): ``"epochs"`` (every process makes the whole global batch) or
  ``"grain"`` (`fsqtok.data.grain_loader`: each process draws its own rows)."""
  if loader == "grain":
    from fsqtok.data import grain_loader  # pylint: disable=g-import-not-at-top
    return grain_loader.GrainBatches(data, batch_size, seed=seed, name="LM windows")
  if loader != "epochs":
    raise ValueError(f"lm.data.loader={loader!r} is unknown: use one of {LOADERS}.")
  return EpochBatcher(data, np.arange(data["inputs"].shape[0]), batch_size, seed=seed,
                      what="windows of training text (lower lm.data.batch_size or seq_len)")


def eval_batches(data: dict[str, np.ndarray], batch_size: int):
  """Every window once, in order; the last batch padded with zero-weight rows."""
  n = data["inputs"].shape[0]
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in data.items()}
    pad = batch_size - batch["inputs"].shape[0]
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    yield batch
