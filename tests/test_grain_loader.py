"""The Grain loader: each process draws its own rows of the global batches of one process,
its position restores exactly (in another number of processes too), and a training loop
on it resumes to the same parameters as an uninterrupted one."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from fsqtok.data import grain_loader
from fsqtok.data import lm_data
from fsqtok.train import loop as train_loop
from fsqtok.train import sharding as sharding_lib

ROWS = {"x": np.arange(16, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),
        "row": np.arange(16)}


def _loader(index=0, count=1, seed=0, rows=ROWS, batch_size=4):
  return grain_loader.GrainBatches(rows, batch_size, seed=seed, name="test rows",
                                   shard_index=index, shard_count=count)


def test_each_process_draws_its_own_rows_and_together_they_cover_an_epoch():
  shards = []
  for index in range(2):
    loader = _loader(index, 2)
    rows = [next(loader)["row"] for _ in range(4)]  # 8 rows each: one epoch
    assert all(r.shape == (2,) for r in rows)     # per process: 4 / 2 rows
    shards.append(set(np.concatenate(rows).tolist()))
  assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(16))


@pytest.mark.parametrize("count", [2, 4])
def test_the_global_batches_are_the_same_rows_whatever_the_number_of_processes(count):
  one = _loader()
  many = [_loader(index, count) for index in range(count)]
  for _ in range(10):  # two and a half epochs, across their boundaries
    whole = next(one)
    parts = [next(loader) for loader in many]  # the global batch, part by part
    np.testing.assert_array_equal(np.concatenate([p["row"] for p in parts]), whole["row"])
    for p in parts:  # the fields of a row travel together
      np.testing.assert_array_equal(p["x"], ROWS["x"][p["row"]])


def test_the_position_restores_exactly_and_a_different_source_is_refused():
  loader = _loader()
  for _ in range(5):  # into the second epoch
    next(loader)
  saved = loader.get_state()
  assert saved["rows_drawn"] == 20
  want = [next(loader)["row"].tolist() for _ in range(4)]
  again = _loader()
  again.set_state(saved)
  assert [next(again)["row"].tolist() for _ in range(4)] == want
  # in 2 processes, the same rows from the same position
  halves = [_loader(index, 2) for index in range(2)]
  for half in halves:
    half.set_state(saved)
  for rows in want:
    assert [r for half in halves for r in next(half)["row"].tolist()] == rows
  other = _loader(rows={**ROWS, "x": ROWS["x"] + 1})
  with pytest.raises(ValueError, match="does not match"):
    other.set_state(saved)
  with pytest.raises(ValueError, match="not a whole number of batches of 8"):
    _loader(batch_size=8).set_state(saved)
  with pytest.raises(ValueError, match="older Grain loader"):  # a sampler's state
    _loader().set_state({"last_seen_indices": {"0": 19}, "last_worker_index": -1})


def test_bad_batch_sizes_and_loaders_name_the_fix():
  with pytest.raises(ValueError, match="does not divide among 3 processes"):
    _loader(0, 3)
  with pytest.raises(ValueError, match="make no batch"):
    _loader(batch_size=32)
  with pytest.raises(ValueError, match="lm.data.loader='tfrecord' is unknown"):
    lm_data.window_batcher({"inputs": np.zeros((4, 2))}, 2, seed=0, loader="tfrecord")


def _step(state, batch, rng):
  del rng
  loss_fn = lambda p: jnp.mean((batch["x"] @ p["w"] - batch["row"]) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss}


def _run(directory, num_steps):
  mesh = sharding_lib.data_mesh(2)
  init = lambda: train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)},
                                               tx=optax.sgd(1e-3))
  loop = train_loop.LoopConfig(num_steps, log_every=1, checkpoint_every=3,
                               progress_bar=False)
  return train_loop.run("grain", sharding_lib.jit_train_step(_step, mesh, donate=False),
                        init, _loader(), loop, rng=jax.random.PRNGKey(0),
                        directory=directory, mesh=mesh)


def test_a_loop_on_grain_resumes_to_the_uninterrupted_result(tmp_path):
  whole = _run(str(tmp_path / "whole"), 9)
  _run(str(tmp_path / "part"), 6)
  resumed = _run(str(tmp_path / "part"), 9)
  assert resumed.start == 6
  chex.assert_trees_all_close(resumed.state.params, whole.state.params, rtol=1e-6)
  assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[6:]]
