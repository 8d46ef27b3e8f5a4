"""Data parallelism: a 1-D ``data`` mesh, batches split on it, parameters replicated."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(num_devices: int = 0) -> Mesh:
  """A mesh over the first ``num_devices`` devices (0: all of them, on every host)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} devices "
                       f"are visible ({jax.default_backend()}).")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "") -> None:
  """A ``ValueError`` (prefixed by the config ``field``, if given) unless the batch
  splits evenly over the mesh."""
  if batch_size % mesh.size:
    raise ValueError(f"{field + ': ' if field else ''}Batch size {batch_size} must be "
                     f"divisible by the {mesh.size} devices of the data mesh.")


def shard_batch(batch, mesh: Mesh):
  """Places a global batch (a pytree of arrays, the same on every host) on the mesh,
  split along axis 0; with several processes each contributes its own slice of rows."""
  sharding = batch_sharded(mesh)
  count, index = jax.process_count(), jax.process_index()

  def place(v):
    v = np.asarray(v)
    if count > 1:
      rows = v.shape[0] // count
      v = v[index * rows:(index + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, v)

  return jax.tree.map(place, batch)
