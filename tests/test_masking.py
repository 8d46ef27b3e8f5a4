"""BERT-style 80/10/10 masking."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsqtok.models.masking import mask_tokens


def test_rates_and_kinds_match_the_recipe():
  ids = jnp.full((64, 512), 500, jnp.int32)
  maskable = jnp.ones_like(ids, bool).at[:, :10].set(False)
  inputs, chosen = mask_tokens(jax.random.PRNGKey(0), ids, maskable, mask_id=6,
                               random_low=13, random_high=400)
  chosen, inputs = np.asarray(chosen), np.asarray(inputs)
  assert not chosen[:, :10].any()                   # never outside maskable
  assert abs(chosen[:, 10:].mean() - 0.15) < 0.005
  picked = inputs[chosen]
  assert abs((picked == 6).mean() - 0.8) < 0.02
  random = (picked != 6) & (picked != 500)
  assert abs(random.mean() - 0.1) < 0.015
  assert ((picked[random] >= 13) & (picked[random] < 400)).all()
  np.testing.assert_array_equal(inputs[~chosen], 500)   # untouched elsewhere


def test_deterministic_and_jittable():
  ids = jnp.arange(40, dtype=jnp.int32).reshape(2, 20) + 20
  fn = jax.jit(lambda r, x: mask_tokens(r, x, x > 0, mask_id=6, random_low=13,
                                        random_high=60, rate=0.5))
  a, b = fn(jax.random.PRNGKey(3), ids), fn(jax.random.PRNGKey(3), ids)
  chex.assert_trees_all_equal(a, b)


def test_bad_fractions_are_refused():
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="sum to at most 1"):
    mask_tokens(jax.random.PRNGKey(0), ids, ids >= 0, mask_id=1, random_low=2,
                random_high=3, mask_fraction=0.9, random_fraction=0.2)
