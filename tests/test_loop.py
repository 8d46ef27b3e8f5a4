"""The one training loop, on a toy least-squares problem: resuming equals running
through, the data position travels with the checkpoint, a finished phase's parameters
come from its last checkpoint, a NaN stops the run, nothing is written without a
directory."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from fsqtok.data.batches import EpochBatcher
from fsqtok.train import loop as train_loop
from fsqtok.train import sharding as sharding_lib

X = np.random.RandomState(0).randn(64, 3).astype(np.float32)
Y = X @ np.array([1.0, -2.0, 0.5], np.float32)


def _step(state, batch, rng):
  def loss_fn(w):
    noise = 1e-3 * jax.random.normal(rng, batch["y"].shape)  # the step's rng is used
    return jnp.mean((batch["x"] @ w["w"] - batch["y"] + noise) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss, "count": jnp.float32(
      batch["y"].shape[0])}


def _init(lr=0.1):
  return lambda: train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)},
                                               tx=optax.sgd(lr))


def _batches(seed=0):
  return EpochBatcher({"x": X, "y": Y}, np.arange(64), 8, seed=seed, what="rows")


def _run(directory, num_steps=12, mesh=None, **kw):
  loop = train_loop.LoopConfig(num_steps, log_every=2, eval_every=4, checkpoint_every=4,
                               progress_bar=False)
  step = jax.jit(_step) if mesh is None else sharding_lib.jit_train_step(_step, mesh,
                                                                        donate=False)
  evaluate = lambda s: {"error": float(jnp.mean((X @ s.params["w"] - Y) ** 2))}
  return train_loop.run("toy", step, kw.pop("init", _init()), _batches(), loop,
                        rng=jax.random.PRNGKey(0), directory=directory, mesh=mesh,
                        evaluate=evaluate, summed=("count",), **kw)


def _records(directory):
  with open(os.path.join(directory, train_loop.METRICS)) as f:
    return [json.loads(line) for line in f]


def test_resumed_equals_uninterrupted_and_the_loss_falls(tmp_path):
  mesh = sharding_lib.data_mesh(8)
  whole = _run(str(tmp_path / "whole"), mesh=mesh)
  assert whole.start == 0 and whole.history[-1]["loss"] < 0.1 * whole.history[0]["loss"]
  assert [r["step"] for r in whole.history] == [2, 4, 6, 8, 10, 12]
  assert all(r["count"] == 16 for r in whole.history)  # summed, not averaged
  assert whole.timed_steps == 10 and whole.timed_sums["count"] == 80
  assert whole.last_eval[0] == 12
  _run(str(tmp_path / "part"), num_steps=8, mesh=mesh)  # stops at 8 ...
  resumed = _run(str(tmp_path / "part"), mesh=mesh)     # ... and goes on
  assert resumed.start == 8
  chex.assert_trees_all_close(resumed.state.params, whole.state.params, rtol=1e-6)
  assert _records(tmp_path / "part") == _records(tmp_path / "whole")
  assert sorted(int(s) for s in os.listdir(tmp_path / "whole" / "checkpoints")) == [8, 12]


def test_finished_reads_the_final_parameters_and_a_damaged_report_is_set_aside(tmp_path):
  d = str(tmp_path / "phase")
  result = _run(d)
  assert train_loop.finished(d, 12) is None  # no report yet: not finished
  train_loop.write_report(d, {"steps": 12})
  assert train_loop.finished(d, 16) is None  # more steps asked: not finished
  mesh = sharding_lib.data_mesh(1)
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32,
                                        sharding=sharding_lib.replicated(mesh))}
  report, params = train_loop.finished(d, 12, abstract)
  assert report == {"steps": 12}
  np.testing.assert_array_equal(params["w"], result.state.params["w"])
  (tmp_path / "phase" / train_loop.REPORT).write_text('{"ste')
  assert train_loop.finished(d, 12, abstract) is None
  assert (tmp_path / "phase" / (train_loop.REPORT + ".damaged")).exists()


def test_a_nan_stops_the_run_naming_the_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"toy: the loss is (nan|inf) at step \d+: "
                                               r"lower it; the last good checkpoint is in"):
    _run(str(tmp_path / "nan"), init=_init(lr=1e6), nan_hint="lower it")


def test_without_a_directory_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  result = _run(None, num_steps=4)
  assert len(result.history) == 2 and os.listdir(tmp_path) == []


def test_named_batches_draw_together_and_restore_each_position():
  named = train_loop.NamedBatches(a=_batches(0), b=_batches(1))
  next(named)
  saved = named.get_state()
  want = next(named)
  again = train_loop.NamedBatches(a=_batches(0), b=_batches(1))
  again.set_state(saved)
  chex.assert_trees_all_equal(next(again), want)
  assert set(saved) == {"a", "b"}


def _nan_at(update: int):
  """The toy step, whose update number ``update`` (0-based) turns the parameters to NaN
  while its own loss is still finite."""
  def step(state, batch, rng):
    new_state, metrics = _step(state, batch, rng)
    poison = jnp.where(state.step == update, jnp.nan, 0.0)
    return new_state.replace(params={"w": new_state.params["w"] + poison}), metrics
  return jax.jit(step)


def test_no_checkpoint_ever_holds_a_nan(tmp_path):
  """A state turned NaN by the step right before a save (its loss still finite, no log
  since) stops the run there, and every checkpoint kept is finite."""
  loop = train_loop.LoopConfig(12, log_every=4, checkpoint_every=3, progress_bar=False)
  with pytest.raises(FloatingPointError, match=r"toy: the state holds a non-finite value at "
                                               r"step 6: .*last good checkpoint is in"):
    train_loop.run("toy", _nan_at(5), _init(), _batches(), loop, rng=jax.random.PRNGKey(0),
                   directory=str(tmp_path / "nan"))
  ckpts = tmp_path / "nan" / train_loop.CHECKPOINTS
  assert sorted(p.name for p in ckpts.iterdir()) == ["3"]
  with pytest.raises(FloatingPointError, match=r"the loss is nan at step 6"):  # the loss
    train_loop.run("toy", _nan_at(4), _init(), _batches(), loop, rng=jax.random.PRNGKey(0),
                   directory=str(tmp_path / "nan_loss"))
  assert sorted(p.name for p in (tmp_path / "nan_loss" / train_loop.CHECKPOINTS).iterdir()
                ) == ["3"]


class _Interrupted(_batches().__class__):
  """The toy batches, interrupted (Ctrl-C) when batch number ``at`` is drawn."""

  def __init__(self, at: int):
    super().__init__({"x": X, "y": Y}, np.arange(64), 8, seed=0, what="rows")
    self.at, self.drawn = at, 0

  def __next__(self):
    self.drawn += 1
    if self.drawn == self.at:
      raise KeyboardInterrupt
    return super().__next__()


def test_an_interrupt_lets_the_save_in_flight_finish_and_the_run_resumes_from_it(tmp_path):
  loop = train_loop.LoopConfig(12, log_every=2, checkpoint_every=6, progress_bar=False)
  directory = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    train_loop.run("toy", jax.jit(_step), _init(), _Interrupted(at=7), loop,
                   rng=jax.random.PRNGKey(0), directory=directory)
  assert sorted(os.listdir(os.path.join(directory, train_loop.CHECKPOINTS))) == ["6"]
  resumed = train_loop.run("toy", jax.jit(_step), _init(), _batches(), loop,
                           rng=jax.random.PRNGKey(0), directory=directory)
  whole = train_loop.run("toy", jax.jit(_step), _init(), _batches(), loop,
                         rng=jax.random.PRNGKey(0), directory=str(tmp_path / "whole"))
  assert resumed.start == 6
  chex.assert_trees_all_close(resumed.state.params, whole.state.params, rtol=1e-6)


def test_log_every_0_logs_at_the_end_and_the_logged_rate_is_the_one_used():
  loop = train_loop.LoopConfig(5, log_every=0, progress_bar=False)
  result = train_loop.run("toy", jax.jit(_step), _init(), _batches(), loop,
                          rng=jax.random.PRNGKey(0), schedule=lambda count: 10.0 * count)
  # optax counts updates from 0: the fifth update used schedule(4)
  assert [(r["step"], r["learning_rate"]) for r in result.history] == [(5, 40.0)]


def test_an_evaluation_after_the_last_log_is_not_taken_from_the_training_time():
  """Throughput counts the training steps' time alone: the final evaluation (after the
  last timed moment) must not be subtracted from it."""
  import time  # pylint: disable=g-import-not-at-top
  loop = train_loop.LoopConfig(6, log_every=2, eval_every=6, progress_bar=False)
  slow_eval = lambda s: time.sleep(0.5) or {"error": 0.0}
  result = train_loop.run("toy", jax.jit(_step), _init(), _batches(), loop,
                          rng=jax.random.PRNGKey(0), evaluate=slow_eval)
  assert result.timed_steps == 4 and 0 < result.timed_seconds < 0.5
  assert np.isfinite(result.per_second())
