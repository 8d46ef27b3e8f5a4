"""The one training loop: every phase (codec, LM, joint, fuser, the studies' probes) plugs
its pure step into `run`.

A phase gives ``step_fn(state, batch, rng) -> (state, metrics)`` (already jitted, e.g. by
`fsqtok.train.sharding.jit_train_step`), a function that makes its first state, and its data
(an iterator with ``get_state``/``set_state``); `run` does the rest the same way for all:

* **resume**: the newest readable Orbax checkpoint under ``directory/checkpoints`` (state
  and data position together; damaged steps are set aside, `fsqtok.train.checkpoint`);
* **checkpoints** every ``checkpoint_every`` steps and at the end (Orbax, the one format:
  a finished phase's parameters are read back from its last checkpoint, `finished`);
* **metrics**: per ``log_every`` steps, the mean of each metric (the ``summed`` ones, like
  the LM's token count, are added up) to ``metrics.jsonl`` and the progress bar;
* **NaN guard**: a non-finite loss stops the run, naming the last good checkpoint; a
  state is saved only once its floats and the losses of the steps since the last log
  are checked finite, so no checkpoint holds a NaN;
* **evaluation**: ``evaluate(state)`` every ``eval_every`` steps, to ``metrics.jsonl``;
* **timing**: seconds and steps from the first synchronisation (after compilation) to the
  last, evaluations between them excluded (each starts once the steps before it have
  finished), so throughput is the training step's alone.

The report stays each phase's own (`write_report`): a report in the phase's directory
means the phase is finished.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fsqtok.train import checkpoint as checkpoint_lib
from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib

REPORT = "report.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


class Batches(Protocol):
  """Endless batches whose position can be saved and restored."""

  def __next__(self) -> dict[str, Any]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...
  # Optional: ``place(batch, mesh)`` puts a batch on the mesh (default: `place`).


def place(batches, batch, mesh):
  """``batch`` on ``mesh`` as ``batches`` says (its ``place``), else as a global batch
  every process holds whole (`fsqtok.train.sharding.shard_batch`). With one process the
  batch stays as it is: the jitted step places host arrays by its own ``in_shardings``,
  ~70 us a step faster than placing them first."""
  if jax.process_count() == 1:
    return batch
  placer = getattr(batches, "place", None)
  return placer(batch, mesh) if placer else sharding_lib.shard_batch(batch, mesh)


class NamedBatches:
  """Several `Batches` drawn together: ``{name: next(batches)}``, one position each."""

  def __init__(self, **named: Batches):
    self.named = named

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    return {k: next(b) for k, b in self.named.items()}

  def get_state(self) -> dict[str, Any]:
    return {k: b.get_state() for k, b in self.named.items()}

  def set_state(self, state: dict[str, Any]) -> None:
    for k, b in self.named.items():
      b.set_state(state[k])

  def place(self, batch: dict[str, Any], mesh) -> dict[str, Any]:
    return {k: place(b, batch[k], mesh) for k, b in self.named.items()}


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How often the loop logs, evaluates and saves (0: never, except at the end)."""

  num_steps: int
  log_every: int = 100
  eval_every: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  progress_bar: bool = True

  @classmethod
  def from_config(cls, train_config, num_steps: int | None = None) -> "LoopConfig":
    """From a config's ``train`` block (``num_steps`` overrides its own)."""
    t = train_config
    return cls(num_steps=int(num_steps or t.num_steps), log_every=int(t.log_every),
               eval_every=int(t.get("eval_every", 0)),
               checkpoint_every=int(t.get("checkpoint_every", 0)),
               keep_checkpoints=int(t.get("keep_checkpoints", 2)),
               progress_bar=bool(t.get("progress_bar", True)))


@dataclasses.dataclass
class LoopResult:
  """The final state and what the loop measured in this run (a resumed run counts only
  its own part)."""

  state: Any
  start: int                      # the step this run began at (0, or the resumed one)
  history: list[dict[str, Any]]   # this run's train records, as written to metrics.jsonl
  last_eval: tuple[int, dict[str, Any]] | None
  timed_steps: int                # steps between the first and the last synchronisation
  timed_seconds: float            # their seconds, evaluation excluded
  timed_sums: dict[str, float]    # the ``summed`` metrics over those steps
  wall_seconds: float             # the whole loop, compilation and evaluation included

  def per_second(self, amount_per_step: float = 1.0) -> float:
    """Training throughput (``amount_per_step``: e.g. the batch size); NaN if too few
    steps were timed."""
    if self.timed_steps and self.timed_seconds > 0:
      return self.timed_steps * amount_per_step / self.timed_seconds
    return float("nan")

  def sum_per_second(self, key: str) -> float:
    """A summed metric (e.g. tokens) per timed second; NaN if nothing was timed."""
    if self.timed_steps and self.timed_seconds > 0:
      return self.timed_sums.get(key, 0.0) / self.timed_seconds
    return float("nan")


def _host_record(host: list[dict[str, Any]], summed: Sequence[str]) -> dict[str, float]:
  return {k: float(np.sum([m[k] for m in host]) if k in summed
                   else np.mean([m[k] for m in host])) for k in host[0]}


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every float of ``tree`` is finite (one scalar, whatever the shardings)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else (
      jnp.bool_(True))


def run(name: str, step_fn: Callable, init_state: Callable[[], Any], batches: Batches,
        loop: LoopConfig, *, rng: jax.Array, directory: str | None = None, mesh=None,
        state_shardings=None, evaluate: Callable[[Any], dict[str, Any]] | None = None,
        schedule: Callable[[int], Any] | None = None, summed: Sequence[str] = (),
        nan_hint: str = "lower the learning rate") -> LoopResult:
  """Trains ``loop.num_steps`` steps (resuming from ``directory``'s newest checkpoint).

  ``init_state()``: the first state (placed by ``state_shardings`` on ``mesh``; without a
  mesh, as it comes). ``step_fn(state, batch, rng)`` gets each batch split along the
  mesh's ``data`` axis and ``fold_in(rng, step)``. Without ``directory`` nothing is
  written (a probe fitted in memory).
  """
  if mesh is not None and state_shardings is None:
    state_shardings = sharding_lib.replicated(mesh)
  make = ((lambda: sharding_lib.init_on_mesh(init_state, state_shardings))
          if mesh is not None else init_state)
  ckpt = metrics_log = None
  save_every = loop.checkpoint_every or loop.num_steps
  start, state = 0, None
  if directory is not None:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(directory, CHECKPOINTS),
                                       save_every=save_every,
                                       max_to_keep=loop.keep_checkpoints)
    abstract = jax.eval_shape(init_state)
    if state_shardings is not None:
      abstract = checkpoint_lib.abstract_like(abstract, state_shardings)
    restored = ckpt.restore_latest(abstract)
    if restored:
      start, state, data_state = restored
      batches.set_state(data_state)
      logging.info("Resumed %s from step %d.", directory, start)
    metrics_log = workdir_lib.MetricsLog(os.path.join(directory, METRICS), resume_step=start)
  if state is None:
    state = make()

  history: list[dict[str, Any]] = []
  last_eval = None
  pending: list[dict[str, Any]] = []
  fetched: list[dict[str, Any]] = []  # host copies of pending's first ones (a save's check)
  t_first = t_last = None
  step_first = step_last = 0
  excluded = eval_seconds = 0.0  # evaluation time: timed once a later log closes it in
  timed_sums: dict[str, float] = {k: 0.0 for k in summed}
  # Jitted, the key's fold costs the host ~30 us a step, eagerly ~110 us (on this
  # project's 2-core CPU; docs/scale.md). The same bits either way.
  fold_in = jax.jit(jax.random.fold_in)
  loop_start = time.perf_counter()
  bar = tqdm(range(start, loop.num_steps), initial=start, total=loop.num_steps, desc=name,
             disable=not loop.progress_bar, dynamic_ncols=True, leave=directory is not None)
  def stop(what: str, step: int):
    where = f"; the last good checkpoint is in {ckpt.directory}" if ckpt else ""
    raise FloatingPointError(f"{name}: {what} at step {step}: {nan_hint}{where}.")

  try:
    for step in bar:
      batch = next(batches)
      if mesh is not None:
        batch = place(batches, batch, mesh)
      state, metrics = step_fn(state, batch, fold_in(rng, step))
      pending.append(metrics)
      done = step + 1
      last = done == loop.num_steps
      if (loop.log_every and done % loop.log_every == 0) or last:
        host = fetched + sharding_lib.to_host(pending[len(fetched):])
        pending, fetched = [], []
        now = time.perf_counter()
        if t_first is None:  # the first interval includes compilation: not timed
          t_first, step_first = now, done
        else:
          for k in summed:
            timed_sums[k] += float(np.sum([m[k] for m in host]))
          excluded += eval_seconds
        eval_seconds = 0.0
        t_last, step_last = now, done
        record = {"step": done, "split": "train", **_host_record(host, summed)}
        if schedule is not None:  # the rate this interval's last update used
          record["learning_rate"] = float(schedule(done - 1))
        if not np.isfinite(record["loss"]):
          stop(f"the loss is {record['loss']}", done)
        history.append(record)
        if metrics_log is not None:
          metrics_log.write([record])
        bar.set_postfix(loss=f"{record['loss']:.3f}")
      if evaluate is not None and loop.eval_every and (done % loop.eval_every == 0 or last):
        jax.block_until_ready(state)  # the steps before it are training time, not its own
        tic = time.perf_counter()
        ev = evaluate(state)
        last_eval = (done, ev)
        if metrics_log is not None:
          metrics_log.write([{"step": done, "split": "validation", **ev}])
        if t_first is not None:
          eval_seconds += time.perf_counter() - tic
      if ckpt is not None and (done % save_every == 0 or last):  # get_state can cost
        # never save a NaN: the losses not yet logged, and the state itself
        fetched += sharding_lib.to_host(pending[len(fetched):])
        losses = [float(m["loss"]) for m in fetched]
        if not np.all(np.isfinite(losses)):
          stop(f"the loss is {next(l for l in losses if not np.isfinite(l))}", done)
        if not bool(sharding_lib.to_host(_all_finite(state))):
          stop("the state holds a non-finite value", done)
        ckpt.save(done, state, batches.get_state(), force=last)
  finally:  # an error or an interrupt still lets a save in flight finish
    bar.close()
    if ckpt is not None:
      ckpt.close()
  timed = (t_last - t_first - excluded) if t_first is not None else 0.0
  return LoopResult(state=state, start=start, history=history, last_eval=last_eval,
                    timed_steps=step_last - step_first, timed_seconds=timed,
                    timed_sums=timed_sums, wall_seconds=time.perf_counter() - loop_start)


def final_eval(result: LoopResult, num_steps: int, evaluate: Callable[[Any], dict[str, Any]]
               ) -> dict[str, Any]:
  """The evaluation at ``num_steps``: the loop's own if it made one there, else a new one."""
  if result.last_eval is not None and result.last_eval[0] == num_steps:
    return result.last_eval[1]
  return evaluate(result.state)


def finished(directory: str, num_steps: int, abstract_params: Any = None
             ) -> tuple[dict[str, Any], Any] | None:
  """``(report, final parameters)`` of a finished phase, or None if it is not finished.

  Finished: its report reads and its newest checkpoint is at ``num_steps``; the parameters
  come from that checkpoint (placed like ``abstract_params``; not read if None). A
  damaged report, or a final checkpoint whose parameters do not read, is set aside
  (``.damaged``) and the phase counts as unfinished: `run` then resumes from the newest
  checkpoint that reads and writes the report anew.
  """
  report_path = os.path.join(directory, REPORT)
  report = workdir_lib.read_saved_json(report_path)
  if report is None:
    return None
  ckpt_dir = os.path.join(directory, CHECKPOINTS)
  latest = checkpoint_lib.latest_step(ckpt_dir)
  if latest is None or latest < num_steps:  # e.g. num_steps was raised: train on
    return None
  if abstract_params is None:
    return report, None
  try:
    return report, checkpoint_lib.restore_params(ckpt_dir, latest, abstract_params)
  except checkpoint_lib.DamagedFile as e:
    workdir_lib.set_aside(report_path, str(e))
    return None


def write_report(directory: str, report: dict[str, Any]) -> None:
  """The phase's report (atomically; process 0 only): the phase is finished."""
  workdir_lib.write_json(os.path.join(directory, REPORT), report)
