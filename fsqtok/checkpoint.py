"""Orbax checkpoints of a train state together with the data iterator's position.

Saves are atomic (Orbax writes to a temporary directory and renames it), so a run
killed at any moment leaves only complete checkpoints behind. A step damaged later (a
crash while copying a work directory, a full disk, a bad sector) is reported and skipped
for the newest step that reads: `Checkpointer.restore_latest`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Periodic saves under ``directory``, keeping the newest ``max_to_keep``."""

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int):
    self.directory = os.path.abspath(directory)
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
    ``STEP.damaged`` (kept, never deleted) once an older one has been read; if none can
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
      for bad, _ in failed:
        path = os.path.join(self.directory, str(bad))
        os.replace(path, path + ".damaged")
        logging.warning("Moved the damaged checkpoint %s to %s.damaged; resuming from step %d.",
                        path, path, step)
      if failed:
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
  """ShapeDtypeStructs of ``tree`` carrying ``sharding`` (a restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
