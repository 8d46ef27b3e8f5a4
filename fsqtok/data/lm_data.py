"""Token streams for the language model and their deterministic, checkpointable batches.

Each text becomes ``[BOS] ids [EOS]``; the texts are concatenated into one stream and cut
into windows of ``seq_len + 1`` tokens (inputs and next-token targets). A target is
scored unless it is padding (the tail of the last window) or a BOS (its place is known).
Bits per byte divide the summed loss by the UTF-8 bytes of the texts, so tokenizers with
different vocabularies are compared on the same text.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from fsqtok.data.batches import EpochBatcher, PieceSet

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
                   loader: str = "epochs", field: str = "lm.data"):
  """Every window once an epoch, in a seeded order (position saved and restored exactly).
  ``loader`` (`LOADERS`): ``"epochs"`` (every process makes the whole global batch) or
  ``"grain"`` (`fsqtok.data.grain_loader`: each process draws its own rows); ``field``:
  the config that sets the batch, named in errors."""
  if loader == "grain":
    from fsqtok.data import grain_loader  # pylint: disable=g-import-not-at-top
    return grain_loader.GrainBatches(data, batch_size, seed=seed,
                                     name=f"windows of {field}")
  if loader != "epochs":
    raise ValueError(f"{field}.loader={loader!r} is unknown: use one of {LOADERS}.")
  return EpochBatcher(data, np.arange(data["inputs"].shape[0]), batch_size, seed=seed,
                      what=f"windows of training text (lower {field}.batch_size or seq_len)")


def training_rows(data: dict[str, np.ndarray]) -> np.ndarray:
  """The windows as the ``[N, seq_len + 1]`` token rows they were cut from (inputs and
  the last target; pad ids after the stream's end)."""
  return np.concatenate([data["inputs"], data["targets"][:, -1:]], axis=1)


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


class LMData:
  """A tokenizer's train and validation windows, in memory, the same on every process
  (and, for the ``joint`` phase, the codec's pieces)."""

  per_process = False  # evaluation batches are global

  def __init__(self, tok: TokenizerLike, texts: tuple[Sequence[str], Sequence[str]],
               seq_len: int, pieces: tuple[PieceSet, PieceSet] | None = None):
    train_texts, val_texts = texts
    self.train = windows(token_stream(tok, train_texts), seq_len, tok.pad_id, tok.bos_id)
    self.val = windows(token_stream(tok, val_texts), seq_len, tok.pad_id, tok.bos_id)
    self.train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
    self.val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    self.pieces = pieces

  def train_batches(self, batch_size: int, *, seed: int, loader: str = "epochs",
                    field: str = "lm.data"):
    return window_batcher(self.train, batch_size, seed=seed, loader=loader, field=field)

  def val_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    return eval_batches(self.val, batch_size)

  def train_bytes_per_token(self) -> float:
    return self.train_bytes / float(np.sum(self.train["weights"]))

  def token_counts(self, vocab_size: int) -> np.ndarray:
    """How often each id is a scored training target."""
    targets = self.train["targets"][self.train["weights"] > 0]
    return np.bincount(targets, minlength=vocab_size)

  def local_training_rows(self) -> list[np.ndarray]:
    """This process's share of the training token rows (row i to process i mod
    processes; all of them with one): the processes together hold each row once."""
    import jax  # pylint: disable=g-import-not-at-top
    return [training_rows(self.train)[jax.process_index()::jax.process_count()]]


class StoredLMData:
  """The windows prepared in a `fsqtok.data.token_store` under ``directory``: each
  process tokenizes its own shards (a barrier waits for all), draws its own training rows
  through Grain and evaluates its own validation shards (``lm.data.loader="grain"``).
  ``from_store``: the directory of another store of the same text, tokenizer and shards
  (other windows), whose shards are cut again instead of tokenizing ``texts``."""

  per_process = True  # evaluation batches are each process's rows

  def __init__(self, directory: str, tok: TokenizerLike,
               texts: tuple[Iterable[str], Iterable[str]] | None, seq_len: int, *,
               num_shards: int, pieces: tuple[PieceSet, PieceSet] | None = None,
               progress: bool = True, from_store: str | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    from fsqtok.data import token_store  # pylint: disable=g-import-not-at-top
    index, count = jax.process_index(), jax.process_count()
    self.directory = directory
    self.written = token_store.prepare(  # the shards this process prepared now
        directory, tok, None if texts is None else dict(zip(token_store.SPLITS, texts)),
        seq_len=seq_len, num_shards=num_shards, process_index=index, process_count=count,
        progress=progress, from_store=from_store)
    from fsqtok.train import sharding  # pylint: disable=g-import-not-at-top
    sharding.sync_processes(f"fsqtok token store {directory}")  # every shard written
    self.train, self.val = (token_store.open_split(directory, split, num_shards,
                                                   pad_id=tok.pad_id, bos_id=tok.bos_id)
                            for split in token_store.SPLITS)
    self.train_bytes, self.val_bytes = self.train.num_bytes, self.val.num_bytes
    self.pieces = pieces
    self._process = (index, count)

  def train_batches(self, batch_size: int, *, seed: int, loader: str = "grain",
                    field: str = "lm.data"):
    if loader != "grain":
      raise ValueError(f"Windows in a token store are read with loader='grain', not "
                       f"{loader!r}.")
    from fsqtok.data import grain_loader  # pylint: disable=g-import-not-at-top
    return grain_loader.GrainBatches(self.train.source(), batch_size, seed=seed,
                                     name=f"windows of {field}",
                                     operations=[self.train.record_row()],
                                     batch_operations=[self.train.rows_to_windows()])

  def val_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    return self.val.local_batches(batch_size, *self._process)

  def train_bytes_per_token(self) -> float:
    return self.train_bytes / float(self.train.scored_tokens)

  def token_counts(self, vocab_size: int) -> np.ndarray:
    return self.train.token_counts(vocab_size)

  def local_training_rows(self) -> Iterator[np.ndarray]:
    """The training token rows of this process's own shards (one array a shard, read as
    they are used)."""
    return self.train.local_rows(*self._process)
