"""Orbax checkpoints of a train state together with the data iterator's position.

Saves are atomic (Orbax writes to a temporary directory and renames it), so a run
killed at any moment leaves only complete checkpoints behind. A step damaged later (a
crash while copying a work directory, a full disk, a bad sector) is reported and skipped
for the newest step that reads: `Checkpointer.restore_latest`. A finished phase's final
parameters (``params.msgpack``) carry their SHA-256 in the phase's report, so damage to
them is found too (`load_final_params`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import serialization

from fsqtok import sharding as sharding_lib
from fsqtok import workdir as workdir_lib


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


class Checkpointer:
  """Periodic saves under ``directory``, keeping the newest ``max_to_keep``."""

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int):
    _one_writer_per_array_on_cpu()
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
  """ShapeDtypeStructs of ``tree`` carrying ``sharding`` (one for every leaf, or a pytree
  of them like ``tree``): a restore target."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, sharding)


def save_final_params(path: str, params: Any) -> str:
  """Writes a finished phase's parameters to ``path`` (msgpack, atomically); returns
  their SHA-256, which the phase's report keeps."""
  data = serialization.to_bytes(sharding_lib.to_host(params))
  workdir_lib.atomic_write_bytes(path, data)
  return hashlib.sha256(data).hexdigest()


def load_final_params(path: str, like: Any, sha256: str | None = None) -> Any:
  """The parameters saved by `save_final_params` (``like``: their structure, e.g. from
  ``jax.eval_shape``). Raises `DamagedFile` (naming the path and the reason) if the file
  is missing, does not parse, does not fit ``like``, or its bytes are not the ones written
  (``sha256``, when the report has it)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
      raise ValueError("its SHA-256 is not the one recorded when it was written")
    return serialization.from_bytes(like, data)
  except Exception as e:  # pylint: disable=broad-except  (any reading error)
    raise DamagedFile(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def finished_phase(phase_dir: str, report_path: str, params_file: str,
                   init_params: Callable[[], Any]) -> tuple[dict[str, Any], Any] | None:
  """``(report, final parameters)`` of a finished phase, or None if it is not finished.

  A damaged report or parameter file is reported and set aside (``.damaged``), and the
  phase counts as unfinished: it resumes from its newest intact checkpoint (the final
  step's, normally, so nothing is trained again) and writes both anew.
  """
  report = workdir_lib.read_saved_json(report_path)
  if report is None:
    return None
  path = os.path.join(phase_dir, params_file)
  try:
    return report, load_final_params(path, jax.eval_shape(init_params),
                                     report.get("params_sha256"))
  except DamagedFile as e:
    if os.path.exists(path):
      workdir_lib.set_aside(path, str(e))
    workdir_lib.set_aside(report_path, "its parameters are damaged")
    return None
