"""The mesh and the state shardings: FSDP and tensor parallel give the replicated step."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from conftest import tiny_recon_config
from fsqtok.codec import model as codec_lib
from fsqtok.models import lm as lm_lib
from fsqtok.train import lm_train
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import recon
from fsqtok.train import sharding as sharding_lib

VOCAB = 64


def _lm_batch(seed, b=16, t=12):
  ids = np.random.RandomState(seed).randint(3, VOCAB, (b, t + 1)).astype(np.int32)
  ids[:, 1::2] = ids[:, 0:-1:2]
  return {"lm": {"inputs": ids[:, :-1], "targets": ids[:, 1:],
                 "weights": np.ones((b, t), np.float32), "valid": np.ones((b, t), bool)}}


def _sharding(fsdp=False, model_parallel=1):
  return sharding_lib.sharding_config(fsdp=fsdp, model_parallel=model_parallel,
                                      fsdp_min_size=64)


def _run_lm(sharding, head="tied", steps=3):
  """Three LM steps on 8 devices under ``sharding``: final params, losses, state, shardings."""
  model = lm_lib.TransformerLM(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
                               mlp_dim=64, head=head)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  optim = tiny_recon_config("builtin", "").optim
  mesh = sharding_lib.data_mesh(8, sharding.model_parallel if sharding else 1)

  tx = optimizer_lib.make_optimizer(optim, 10, params, ())

  def create():
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  train = {"sharding": sharding} if sharding is not None else {}
  import ml_collections  # pylint: disable=g-import-not-at-top
  state_sh = lm_train.state_shardings(jax.eval_shape(create), mesh,
                                      ml_collections.ConfigDict(train))
  state = jax.jit(create, out_shardings=state_sh)()
  step = lm_train.compile_train_step(mesh, state_sh, donate=False)
  losses = []
  for i in range(steps):
    state, metrics = step(state, sharding_lib.shard_batch(_lm_batch(i), mesh),
                          jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), losses, state, state_sh


@pytest.mark.parametrize("head, layouts", [
    ("tied", ((True, 1), (False, 4), (True, 2))),  # (fsdp, model_parallel)
    ("dense", ((True, 2),)),  # the untied output layer split by vocabulary rows
])
def test_fsdp_and_tensor_parallel_lm_steps_equal_the_replicated_step(head, layouts):
  want_params, want_losses, state, repl_sh = _run_lm(None, head)
  repl_bytes = sharding_lib.bytes_per_device(state, repl_sh)
  for sharding in (_sharding(fsdp, tp) for fsdp, tp in layouts):
    params, losses, state, state_sh = _run_lm(sharding, head)
    chex.assert_trees_all_close(params, want_params, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    # The state is really split: fewer bytes on each device, and the leaves say where.
    assert sharding_lib.bytes_per_device(state, state_sh) < 0.7 * repl_bytes
    mlp_in = state.params["blocks_0"]["mlp_in"]["kernel"]
    assert mlp_in.sharding.spec == state_sh.params["blocks_0"]["mlp_in"]["kernel"].spec
    mu = state.opt_state  # the optimizer moments are split like their parameter
    mu_specs = {leaf.sharding.spec for leaf in jax.tree.leaves(mu) if leaf.shape == mlp_in.shape}
    assert mu_specs == {mlp_in.sharding.spec}
    if sharding.model_parallel > 1:
      assert "model" in mlp_in.sharding.spec and "model" in tuple(
          state.params["blocks_0"]["attn"]["query"]["kernel"].sharding.spec)
    if sharding.fsdp:
      assert "data" in tuple(mlp_in.sharding.spec)


def test_fsdp_codec_step_equals_the_replicated_step():
  config = tiny_recon_config("builtin", "")
  config.model.update({"enc_channels": (), "enc_strides": (), "dec_channels": (),  # an MLP:
                       "dec_strides": (), "enc_mlp_dim": 32, "dec_mlp_dim": 32})   # fast to compile
  model = codec_lib.codec_from_config(config.model)
  mesh = sharding_lib.data_mesh(8)
  results = []
  for sharding in (None, _sharding(fsdp=True)):
    tx = optimizer_lib.make_optimizer(config.optim, 10)
    create = lambda: recon.create_state(config, model, jax.random.PRNGKey(0), tx)
    state_sh = sharding_lib.state_shardings(jax.eval_shape(create), mesh, sharding)
    state = jax.jit(create, out_shardings=state_sh)()
    step = recon.compile_train_step(mesh, donate=False, state_shardings=state_sh)
    rng = np.random.RandomState(0)
    for i in range(3):
      lengths = rng.randint(1, config.model.max_len + 1, 32).astype(np.int32)
      batch = {"bytes": rng.randint(97, 123, (32, config.model.max_len)).astype(np.uint8),
               "lengths": lengths}
      state, metrics = step(state, sharding_lib.shard_batch(batch, mesh), jax.random.PRNGKey(i))
    results.append((jax.device_get(state.params), float(metrics["loss"]), state, state_sh))
  chex.assert_trees_all_close(results[1][0], results[0][0], rtol=2e-4, atol=2e-5)
  assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
  assert (sharding_lib.bytes_per_device(results[1][2], results[1][3])
          < 0.5 * sharding_lib.bytes_per_device(results[0][2], results[0][3]))


def test_leaf_specs_follow_the_rules():
  mesh = sharding_lib.data_mesh(8, 2)  # data 4 x model 2
  config = _sharding(fsdp=True, model_parallel=2)
  spec = lambda name, shape: sharding_lib.leaf_spec(name, shape, mesh, config,
                                                    lm_lib.PARAM_AXES)
  # FSDP: the largest dimension that divides by the data axis; small leaves replicated.
  assert spec("params/final_norm/scale", (32,)) == P()
  assert spec("params/x/kernel", (12, 64)) == P(None, "data")
  assert spec("params/x/kernel", (64, 30)) == P("data")
  # Tensor parallel by logical name, then FSDP on what is left.
  assert spec("params/blocks_0/mlp_in/kernel", (32, 64)) == P("data", "model")
  assert spec("params/blocks_0/attn/out/kernel", (4, 8, 32)) == P("model", None, "data")
  assert spec("opt_state/0/mu/blocks_0/mlp_out/kernel", (64, 32)) == P("model", "data")
  # A dimension that does not divide stays whole; replication without a config.
  assert spec("params/blocks_0/attn/query/kernel", (32, 3, 8)) == P("data")
  assert sharding_lib.leaf_spec("params/x/kernel", (12, 64), mesh, None) == P()


def test_mesh_shapes_and_errors():
  mesh = sharding_lib.data_mesh(8, 4)
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  assert sharding_lib.data_size(mesh) == 2
  sharding_lib.check_batch_size(2, mesh)
  with pytest.raises(ValueError, match="divisible by the 2 devices of the data axis"):
    sharding_lib.check_batch_size(3, mesh, "lm.data.batch_size")
  with pytest.raises(ValueError, match="model_parallel=3 must be >= 1 and divide the 8"):
    sharding_lib.data_mesh(8, 3)


def test_init_on_mesh_takes_captured_arrays_as_arguments():
  """A first state that closes over arrays (a trained codec's parameters, the previous
  phase's) is made sharded, equal to the plain call, with those arrays passed in rather
  than compiled in as constants."""
  trained = np.random.RandomState(0).randn(256, 64).astype(np.float32)
  init = lambda: {"kernel": jnp.asarray(trained) * 2.0,
                  "fresh": jax.random.normal(jax.random.PRNGKey(1), (64, 32))}
  hoisted, consts = sharding_lib.hoist_constants(init)
  assert [c.shape for c in consts] == [(256, 64)]
  baked_hlo = jax.jit(init).lower().as_text()
  hoisted_hlo = jax.jit(hoisted).lower(*consts).as_text()
  assert len(hoisted_hlo) < len(baked_hlo) / 5  # the 64 KB constant is gone

  mesh = sharding_lib.data_mesh(8)
  shardings = sharding_lib.state_shardings(init(), mesh, _sharding(fsdp=True))
  state = sharding_lib.init_on_mesh(init, shardings)
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(init()))
  assert state["kernel"].sharding.spec == P("data")
  assert state["fresh"].sharding.spec == P("data")


@pytest.mark.parametrize("how", ["tree", "one sharding"])
def test_init_on_host_equals_init_on_the_mesh(how):
  """The first state computed on the host's CPU and then placed (the default on a GPU)
  equals the one made in place: the same values, the same shardings, each device holding
  only its part."""
  trained = np.random.RandomState(0).randn(256, 64).astype(np.float32)
  init = lambda: {"kernel": jnp.asarray(trained) * 2.0,
                  "fresh": jax.random.normal(jax.random.PRNGKey(1), (64, 32)),
                  "step": jnp.zeros((), jnp.int32)}
  mesh = sharding_lib.data_mesh(8)
  shardings = (sharding_lib.state_shardings(init(), mesh, _sharding(fsdp=True))
               if how == "tree" else sharding_lib.replicated(mesh))
  on_mesh = sharding_lib.init_on_mesh(init, shardings, on_host=False)
  on_host = sharding_lib.init_on_mesh(init, shardings, on_host=True)
  chex.assert_trees_all_equal(jax.device_get(on_host), jax.device_get(on_mesh))
  for a, b in zip(jax.tree.leaves(on_host), jax.tree.leaves(on_mesh)):
    assert a.sharding == b.sharding and a.dtype == b.dtype
  if how == "tree":
    assert on_host["kernel"].addressable_shards[0].data.shape == (32, 64)
