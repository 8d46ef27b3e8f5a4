"""The device mesh and what lives where on it.

A 2-D mesh ``(data, model)``: batches are split along ``data``; the training state
(parameters and optimizer state) is replicated by default, or split by the rules of a
``train.sharding`` config (`state_shardings`):

* **FSDP** (``fsdp=True``): every leaf of at least ``fsdp_min_size`` elements is split
  along ``data`` on its largest dimension that divides evenly (ZeRO-3 style: XLA gathers
  a layer's parameters when it needs them and reduce-scatters their gradients).
* **Tensor parallel** (``model_parallel > 1``): parameters whose path matches a pattern
  of the model's logical axis names (`fsqtok.models.lm.PARAM_AXES`) are split along ``model`` on
  the dimensions whose logical name ``logical_axes`` maps to it (heads, MLP width,
  vocabulary), Megatron style.

Each gives the same step as replication, up to float summation order (tested on 8
simulated devices); `bytes_per_device` says what each costs a device.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jax_core
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def sharding_config(fsdp: bool = False, model_parallel: int = 1,
                    fsdp_min_size: int = 2 ** 14):
  """A phase's ``train.sharding`` block: replication (the default, right for small
  models), FSDP, tensor parallel, or both."""
  import ml_collections  # configs only
  return ml_collections.ConfigDict({
      "fsdp": fsdp,                    # split the state along `data`
      "fsdp_min_size": fsdp_min_size,  # leaves smaller than this stay replicated
      "model_parallel": model_parallel,  # devices on the `model` axis (1: none)
      # logical parameter axis -> mesh axis (fsqtok.models.lm.PARAM_AXES names them)
      "logical_axes": (("heads", MODEL_AXIS), ("mlp", MODEL_AXIS), ("vocab", MODEL_AXIS)),
  })


def data_mesh(num_devices: int = 0, model_parallel: int = 1) -> Mesh:
  """A ``(data, model)`` mesh over the first ``num_devices`` devices (0: all of them, on
  every host); ``model`` has ``model_parallel`` devices (neighbours), ``data`` the rest."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} devices "
                       f"are visible ({jax.default_backend()}).")
    devices = devices[:num_devices]
  if model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(f"train.sharding.model_parallel={model_parallel} must be >= 1 and "
                     f"divide the {len(devices)} devices.")
  return Mesh(np.asarray(devices).reshape(-1, model_parallel), (DATA_AXIS, MODEL_AXIS))


def mesh_from_config(train_config) -> Mesh:
  """The mesh of a phase's ``train`` config (``num_devices``, ``sharding.model_parallel``)."""
  sharding = train_config.get("sharding")
  return data_mesh(train_config.get("num_devices", 0),
                   sharding.model_parallel if sharding is not None else 1)


def describe_devices() -> str:
  """One line on what JAX runs on: backend, devices by kind, processes."""
  kinds: dict[str, int] = {}
  for d in jax.devices():
    kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
  return (f"JAX {jax.__version__} on {jax.default_backend()}: "
          + ", ".join(f"{n} x {k}" for k, n in kinds.items())
          + f" ({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")


def pick_size(cpu: str = "tiny", accelerator: str = "full") -> str:
  """The config argument for this runtime: ``accelerator`` on a GPU or TPU, else ``cpu``
  (the notebooks' sizes)."""
  return cpu if jax.default_backend() == "cpu" else accelerator


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def data_size(mesh: Mesh) -> int:
  """How many ways a batch is split (the ``data`` axis)."""
  return mesh.shape[DATA_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "") -> None:
  """A ``ValueError`` (prefixed by the config ``field``, if given) unless the batch
  splits evenly over the mesh's ``data`` axis and over the processes."""
  for parts, what in ((data_size(mesh), "devices of the data axis"),
                      (jax.process_count(), "processes")):
    if batch_size % parts:
      raise ValueError(f"{field + ': ' if field else ''}Batch size {batch_size} must be "
                       f"divisible by the {parts} {what}.")


def path_name(path) -> str:
  """``"params/blocks_0/attn/query/kernel"`` for a pytree key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def leaf_spec(name: str, shape: Sequence[int], mesh: Mesh, sharding_config=None,
              param_axes: Sequence[tuple[str, tuple[str, ...]]] = ()) -> P:
  """The PartitionSpec of one state leaf (see the module docstring for the rules)."""
  axes: list[str | None] = [None] * len(shape)
  if sharding_config is None:
    return P()
  if mesh.shape.get(MODEL_AXIS, 1) > 1:
    to_mesh = dict(sharding_config.get("logical_axes", ()))
    for pattern, logical in param_axes:
      if re.search(pattern, name) and len(logical) == len(shape):
        for d, axis in enumerate(logical):
          if to_mesh.get(axis) == MODEL_AXIS and shape[d] % mesh.shape[MODEL_AXIS] == 0:
            axes[d] = MODEL_AXIS
        break
  n = mesh.shape[DATA_AXIS]
  if (sharding_config.get("fsdp", False) and n > 1
      and math.prod(shape) >= sharding_config.get("fsdp_min_size", 2 ** 14)):
    free = [d for d in range(len(shape)) if axes[d] is None and shape[d] % n == 0]
    if free:
      axes[max(free, key=lambda d: (shape[d], -d))] = DATA_AXIS
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def state_shardings(tree: Any, mesh: Mesh, sharding_config=None,
                    param_axes: Sequence[tuple[str, tuple[str, ...]]] = ()) -> Any:
  """A NamedSharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs, e.g. a
  TrainState from ``jax.eval_shape``): replicated when ``sharding_config`` is None or asks
  for nothing, else split by its rules. Optimizer moments share their parameter's path
  suffix, so they are split like it."""
  def one(path, leaf):
    return NamedSharding(mesh, leaf_spec(path_name(path), np.shape(leaf), mesh,
                                         sharding_config, param_axes))
  return jax.tree_util.tree_map_with_path(one, tree)


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """The bytes of ``tree`` one device holds under ``shardings`` (the largest shard)."""
  def one(leaf, sharding):
    shape = np.shape(leaf)
    return math.prod(sharding.shard_shape(shape)) * np.dtype(leaf.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def hoist_constants(fn: Callable[[], Any]) -> tuple[Callable[..., Any], list[Any]]:
  """``fn`` (no arguments) as a function of the arrays it closes over, and those arrays:
  ``hoisted(*consts)`` computes ``fn()``. Under jit they are then arguments, not
  constants baked into the program."""
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)()
  treedef = jax.tree.structure(shapes)

  def hoisted(*consts):
    flat = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(closed.jaxpr, consts))()
    return jax.tree.unflatten(treedef, flat)

  return hoisted, list(closed.consts)


def init_on_mesh(init: Callable[[], Any], out_shardings: Any, on_host: bool | None = None
                 ) -> Any:
  """``init()`` computed under jit, its output placed by ``out_shardings``.

  The arrays ``init`` closes over (a trained codec's parameters put into a fresh LM, the
  LM phase's parameters that start the joint phase) are arguments of the compiled
  function (`hoist_constants`), not constants baked into it: XLA compiles large
  constants slowly (an init closing over the :full LM's 477 MB: 30 s on a CPU against
  0.1 s as arguments).

  Where it runs:

  * on the host's CPU, then copied into place (``on_host``; by default on a GPU with one
    process, whose CPU backend is on: ``JAX_PLATFORMS`` unset or naming ``cpu``). On an
    H200 the :full LM's first state had not compiled after ~100 s, where its whole
    train step compiled in 46 s; on a CPU it compiles in 5-8 s. The likely cause (not
    profiled) is that JAX inlines ThreeFry's unrolled rounds once per initialised
    parameter on a GPU and loops them on a CPU. The CPU computes the same random bits;
    the state passes through host memory once.
  * on the mesh otherwise (a sharded state is made in place, never whole on one
    device); on a GPU, ThreeFry is then lowered to its CUDA kernel
    (``jax_threefry_gpu_kernel_lowering``, the same bits) where this JAX has it.
  """
  hoisted, consts = hoist_constants(init)
  if on_host is None:
    on_host = _host_init_helps(consts)
  if on_host:
    return _init_on_host(hoisted, consts, out_shardings)
  jitted = jax.jit(hoisted, out_shardings=out_shardings)
  compiled = None
  flag = "jax_threefry_gpu_kernel_lowering"
  before = getattr(jax.config, flag, None)  # None: a JAX without the option
  if jax.default_backend() == "gpu" and before is not None:
    jax.config.update(flag, True)
    try:
      compiled = jitted.lower(*consts).compile()
    except Exception:  # pylint: disable=broad-except
      compiled = None  # no kernel in this jaxlib: the default lowering below
    finally:
      jax.config.update(flag, before)
  if compiled is None:
    compiled = jitted.lower(*consts).compile()
  return compiled(*consts)


def _host_cpu():
  """This process's CPU device, or None when JAX runs without its CPU backend."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


def _host_init_helps(consts: Sequence[Any]) -> bool:
  return (jax.default_backend() == "gpu" and jax.process_count() == 1
          and _host_cpu() is not None
          and all(getattr(c, "is_fully_addressable", True) for c in consts))


def _init_on_host(hoisted: Callable[..., Any], consts: Sequence[Any], out_shardings: Any
                  ) -> Any:
  """`init_on_mesh` on the host's CPU: computed there, each leaf then placed by its
  sharding (each device receiving only its own part)."""
  cpu = _host_cpu()
  if cpu is None:
    raise ValueError("on_host=True needs JAX's CPU backend: add cpu to JAX_PLATFORMS "
                     "(e.g. JAX_PLATFORMS=cuda,cpu).")
  with jax.default_device(cpu):
    state = jax.jit(hoisted)(*[jax.device_put(c, cpu) for c in consts])
  host = jax.device_get(state)

  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  if isinstance(out_shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: place(x, out_shardings), host)
  return jax.tree.map(place, host, out_shardings)


def jit_train_step(step, mesh: Mesh, state_sh=None, donate: bool = True):
  """``step(state, batch, rng) -> (state, metrics)`` under jit on ``mesh``: the batch
  split along ``data``, the state placed by ``state_sh`` (`state_shardings`; None:
  replicated), the rng and metrics replicated; the old state donated."""
  repl = replicated(mesh)
  state_sh = repl if state_sh is None else state_sh
  return jax.jit(step, in_shardings=(state_sh, batch_sharded(mesh), repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,) if donate else ())


def to_host(tree: Any) -> Any:
  """numpy copies of a pytree of arrays, whole: with several processes, the rows (or
  FSDP shards) other processes hold are gathered, so every process gets all of it (a
  collective: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def sync_processes(name: str) -> None:
  """Waits until every process of a multi-process run gets here (nothing with one): after
  files that one process writes and the others then read."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def shard_batch(batch, mesh: Mesh, per_process: bool = False):
  """Places a global batch (a pytree of arrays, the same on every host) on the mesh,
  split along axis 0; with several processes each contributes its own slice of rows.
  ``per_process``: ``batch`` is already this process's rows (a per-host loader,
  `fsqtok.data.grain_loader`)."""
  sharding = batch_sharded(mesh)
  count, index = jax.process_count(), jax.process_index()
  if count == 1:  # one batched transfer, not one per leaf
    return jax.device_put(jax.tree.map(np.asarray, batch), sharding)

  def place(v):
    v = np.asarray(v)
    if not per_process:
      if v.shape[0] % count:  # a remainder would be left out of every process's share
        raise ValueError(f"A batch of {v.shape[0]} rows does not split over {count} "
                         f"processes: make the batch size divisible by {count}.")
      rows = v.shape[0] // count
      v = v[index * rows:(index + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, v)

  return jax.tree.map(place, batch)
