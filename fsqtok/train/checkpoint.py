"""Orbax checkpoints of a train state together with the data iterator's position.

Saves are atomic (Orbax writes to a temporary directory and renames it), so a run
killed at any moment leaves only complete checkpoints behind. A step damaged later (a
crash while copying a work directory, a full disk, a bad sector) is reported and skipped
for the newest step that reads: `Checkpointer.restore_latest`. A finished phase's final
parameters are its last checkpoint's (`restore_params` reads them without the optimizer
state).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib



class DamagedFile(ValueError):
  """A file a finished run left cannot be read back as it was written."""


_cpu_handler_registered = False


def _one_writer_per_array_on_cpu() -> None:
  """On CPU devices, saves each replicated array whole from one device. Orbax's default
  (replica-parallel: each replica writes a slice) spreads device-to-host copies across
  accelerators; CPU devices share one memory, so it would only compile a slice program
  per array and device (200 compiles in the tiny curriculum on 8 simulated devices)."""
  global _cpu_handler_registered
  if jax.default_backend() == "cpu" and not _cpu_handler_registered:
    _cpu_handler_registered = True
    absl_logger = logging.getLogger("absl")  # Orbax warns of any override
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
          override=True)
    finally:
      absl_logger.setLevel(level)


def _absolute(directory) -> str:
  directory = os.fspath(directory)
  return os.path.abspath(directory) if workdir_lib.is_local(directory) else directory


class Checkpointer:
  """Periodic saves under ``directory``, keeping the newest ``max_to_keep``."""

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int):
    _one_writer_per_array_on_cpu()
    self.directory = _absolute(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False
           ) -> bool:
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state (placed like ``abstract_state``'s shardings) and the data position."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """``(step, state, data position)`` of the newest step that can be read, or None if
    there is no step. Newer steps that cannot be read are reported and renamed
    ``STEP.damaged`` (``.damaged.1``, ... if that name is taken; kept, never deleted;
    `fsqtok.train.workdir.set_aside`) once an older one has been read; if none can
    be read, nothing is renamed and a ``ValueError`` says what to do."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    for step in steps:
      try:
        state, data = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (any reading error)
        reason = f"{type(e).__name__}: {str(e)[:200]}"
        logging.warning("Checkpoint step %d in %s cannot be read (%s); trying the one "
                        "before.", step, self.directory, reason)
        failed.append((step, reason))
        continue
      for bad, reason in failed:  # process 0 renames (.damaged, then .damaged.1, ...)
        workdir_lib.set_aside(os.path.join(self.directory, str(bad)),
                              f"{reason}; resuming from step {step}")
      if failed:
        sharding_lib.sync_processes("fsqtok damaged checkpoints set aside")
        self._manager.reload()
      return step, state, data
    if failed:
      newest, reason = failed[0]
      raise ValueError(
          f"No checkpoint in {self.directory} can be read (steps {[s for s, _ in failed]}; "
          f"step {newest}: {reason}). If the config changed since they were written, use a "
          f"new work directory; otherwise delete {self.directory} to train this phase from "
          f"the start.")
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, sharding) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``sharding`` (one for every leaf, or a pytree
  of them like ``tree``): a restore target."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, sharding)


def latest_step(directory: str) -> int | None:
  """The newest step saved under ``directory`` (None if none), without opening it."""
  if not workdir_lib.exists(directory):
    return None
  steps = [int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit()]
  return max(steps) if steps else None


def restore_params(directory: str, step: int, abstract_params: Any) -> Any:
  """The parameters alone of checkpoint ``step`` (no optimizer state is read), placed like
  ``abstract_params`` (ShapeDtypeStructs with shardings, `abstract_like`). Raises
  `DamagedFile`, naming the step and the reason, if they cannot be read."""
  _one_writer_per_array_on_cpu()
  item = {"params": abstract_params}
  manager = ocp.CheckpointManager(_absolute(directory))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return restored.state["params"]
  except Exception as e:  # pylint: disable=broad-except  (any reading error)
    raise DamagedFile(f"The parameters of checkpoint {step} in {directory} cannot be read "
                      f"({type(e).__name__}: {str(e)[:200]})") from None
  finally:
    manager.close()
