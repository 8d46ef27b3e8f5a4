import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsqtok.train import optimizer as optimizer_lib


def _params():
  return {"codec": {"w": jnp.ones((3, 4))}, "lm": {"w": jnp.ones((2,)), "b": jnp.ones((5,))}}


def test_frozen_parts_get_no_update_and_no_state_the_rest_trains():
  params = _params()
  tx = optimizer_lib.make_optimizer(optimizer_lib.adamw_config(1e-1, 0), 10, params, ("codec",))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert np.all(np.asarray(updates["codec"]["w"]) == 0)
  assert np.all(np.asarray(updates["lm"]["w"]) != 0)
  # no Adam moments for the frozen part
  sizes = sum(x.size for x in jax.tree.leaves(state))
  full = sum(x.size for x in jax.tree.leaves(optimizer_lib.make_optimizer(
      optimizer_lib.adamw_config(1e-1, 0), 10).init(params)))
  assert sizes == full - 2 * 12
  with pytest.raises(ValueError, match="needs the parameters"):
    optimizer_lib.make_optimizer(optimizer_lib.adamw_config(1e-1, 0), 10, None, ("codec",))


def test_count_params_with_and_without_frozen_parts():
  assert optimizer_lib.count_params(_params()) == 12 + 2 + 5
  assert optimizer_lib.count_params(_params(), ("codec",)) == 7


def test_warmup_then_cosine_to_the_end_ratio():
  c = optimizer_lib.adamw_config(1.0, 10, end_lr_ratio=0.1)
  schedule = optimizer_lib.learning_rate_schedule(c, 100)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
