"""Batches through Grain: each process draws its own rows of every global batch.

`GrainBatches` is the windows' loader with ``lm.data.loader = "grain"``: the rows in a
seeded order that Grain shuffles anew each epoch and carries on across epochs without a
gap (``MapDataset.shuffle(seed).repeat()``), cut into global batches of ``batch_size``
rows. Process p of P takes the p-th of the P equal parts of every global batch, so each
host reads only its ``batch_size / P`` rows and places them itself (`place`), and the
global batches are the same, row for row, whatever the number of processes: the masks and
dropout drawn per row fall on the same rows too.

The position is the number of rows drawn by all processes together, saved in the
checkpoint like every other batcher's (`get_state`/`set_state`, a JSON dict with the
source's name, so a restored position is checked against the same data): a checkpoint
written by 2 processes resumes in 1, or 4, at the same row. The order differs from the
default loader's (``"epochs"``, `fsqtok.data.batches.EpochBatcher`), so a run's numbers
depend on the loader, not on the number of hosts.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import grain.python as grain
import jax
import numpy as np

from fsqtok.train import sharding as sharding_lib


class ArraySource:
  """Rows of named arrays as a Grain data source (``repr`` names them and their
  contents, so a restored position is checked against the same data)."""

  def __init__(self, arrays: dict[str, np.ndarray], name: str):
    sizes = {v.shape[0] for v in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"{name}: arrays of different lengths {sorted(sizes)}.")
    self._arrays, self._name = arrays, name
    digest = hashlib.sha256()
    for k in sorted(arrays):
      digest.update(k.encode() + np.ascontiguousarray(arrays[k]).tobytes())
    self._digest = digest.hexdigest()[:16]

  def __len__(self) -> int:
    return next(iter(self._arrays.values())).shape[0]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self._arrays.items()}

  def __repr__(self) -> str:
    return f"ArraySource({self._name}, rows={len(self)}, sha256={self._digest})"


class GrainBatches:
  """Endless batches of this process's rows (`fsqtok.train.loop.Batches`), placed on the
  mesh as this process's slice of the global batch."""

  def __init__(self, source, batch_size: int, *, seed: int, name: str,
               operations: Sequence[grain.MapTransform] = (),
               batch_operations: Sequence[grain.MapTransform] = (),
               shard_index: int | None = None, shard_count: int | None = None,
               read_threads: int = 0):
    """``source``: named arrays (rows along axis 0) or a Grain random-access source whose
    records ``operations`` map one by one and ``batch_operations`` a batch at a time to
    named arrays (e.g. `fsqtok.data.token_store`'s); ``batch_size``: the global batch; ``shard_index``/``shard_count``: this process and
    the number of processes (default: JAX's); ``read_threads``: threads that read batches
    ahead. None by default: JAX dispatches a step and returns at once, so the next batch
    is read in this thread while the device computes; on a local disk the threads cost
    more than they save (`experiments/bench_lm_loaders.py`), on a slow network
    filesystem they can hide its latency."""
    count = jax.process_count() if shard_count is None else shard_count
    index = jax.process_index() if shard_index is None else shard_index
    if batch_size % count:
      raise ValueError(f"{name}: the batch size {batch_size} does not divide among "
                       f"{count} processes: use a multiple of {count}.")
    if isinstance(source, dict):
      source = ArraySource(source, name)
    if len(source) < batch_size:
      raise ValueError(f"{name}: {len(source)} rows make no batch of {batch_size}: lower "
                       f"the batch size or add data.")
    self._source_name = repr(source)
    self._rows = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    for op in operations:
      self._rows = self._rows.map(op)
    self._batch_operations = tuple(batch_operations)
    self._batch_size, self._index, self._count = batch_size, index, count
    self._read = grain.ReadOptions(num_threads=read_threads,
                                   prefetch_buffer_size=2 * read_threads)
    self._start(0)

  def _start(self, drawn: int) -> None:
    """Draw on from global row ``drawn`` (a whole number of global batches)."""
    parts = self._rows[drawn:].batch(self._batch_size // self._count, drop_remainder=True)
    mine = parts[self._index::self._count]
    for op in self._batch_operations:
      mine = mine.map(op)
    self._iterator = iter(mine.to_iter_dataset(self._read))
    self._drawn = drawn

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._drawn += self._batch_size
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"rows_drawn": self._drawn, "source": self._source_name}

  def set_state(self, state: dict[str, Any]) -> None:
    if "rows_drawn" not in state:
      raise ValueError("The saved data position was written by an older Grain loader of "
                       "fsqtok (a per-process sampler state, not the rows drawn by all "
                       "processes): resume with the fsqtok that wrote it, or start a new "
                       "work directory.")
    if state.get("source") != self._source_name:
      raise ValueError(f"The saved data position is for {state.get('source')!r}, "
                       f"which does not match this loader's {self._source_name}: resume "
                       f"with the same data (corpus, tokenizer, window length, shards) or "
                       f"start a new work directory.")
    drawn = int(state["rows_drawn"])
    if drawn % self._batch_size:
      raise ValueError(f"The saved position ({drawn} rows) is not a whole number of "
                       f"batches of {self._batch_size}: resume with the batch size it was "
                       f"saved with.")
    self._start(drawn)

  @staticmethod
  def place(batch, mesh):
    """This process's rows as its part of the global batch on ``mesh``."""
    return sharding_lib.shard_batch(batch, mesh, per_process=True)
