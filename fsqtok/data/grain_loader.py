"""Batches through Grain: each process draws its own share of the rows.

`GrainBatches` is the LM's window loader with ``lm.data.loader = "grain"``: a Grain
``DataLoader`` over the windows, its ``IndexSampler`` sharded by JAX process
(``ShardByJaxProcess``), so each host makes only its ``global batch / processes`` rows
of every batch and places them itself (`place`); the loader's position travels in the
checkpoint like every other batcher's (`get_state`/`set_state`, a JSON dict). The default
loader (``"epochs"``, `fsqtok.data.batches.EpochBatcher`) has every host make the whole
global batch and keep its rows.

Grain shuffles each epoch with its own seeded permutation and carries on across epochs
without a gap, so its order differs from the default loader's: a run's numbers depend on
the loader, and 2 processes draw a different global batch than 1 (each shuffles its own
shard).
"""
from __future__ import annotations

import hashlib
import json
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
               operations: Sequence[grain.MapTransform] = (), shard_index: int | None = None,
               shard_count: int | None = None):
    """``source``: named arrays (rows along axis 0) or a Grain random-access source (with
    ``operations`` that make its records rows, e.g. `fsqtok.data.token_store`'s)."""
    count = jax.process_count() if shard_count is None else shard_count
    index = jax.process_index() if shard_index is None else shard_index
    if batch_size % count:
      raise ValueError(f"{name}: the batch size {batch_size} does not divide among "
                       f"{count} processes: use a multiple of {count}.")
    if isinstance(source, dict):
      source = ArraySource(source, name)
    per_process = batch_size // count
    if len(source) // count < per_process:
      raise ValueError(f"{name}: {len(source)} rows make no batch of {batch_size} over "
                       f"{count} processes: lower the batch size or add data.")
    sampler = grain.IndexSampler(
        num_records=len(source), shuffle=True, num_epochs=None, seed=seed,
        shard_options=grain.ShardOptions(shard_index=index, shard_count=count,
                                         drop_remainder=True))
    self._loader = grain.DataLoader(
        data_source=source, sampler=sampler, worker_count=0,
        operations=[*operations, grain.Batch(per_process, drop_remainder=True)])
    self._iterator = iter(self._loader)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return json.loads(self._iterator.get_state().decode("utf-8"))

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(json.dumps(state).encode("utf-8"))

  @staticmethod
  def place(batch, mesh):
    """This process's rows as its part of the global batch on ``mesh``."""
    return sharding_lib.shard_batch(batch, mesh, per_process=True)
