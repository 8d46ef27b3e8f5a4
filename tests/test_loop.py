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
