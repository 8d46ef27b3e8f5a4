import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsqtok.codec.fsq import FSQ, neighbour_codes, round_ste

LEVEL_SETS = [(3,), (4,), (8, 5), (2, 3, 4), (5, 5, 5, 4), (8, 8, 8, 8, 8, 5, 5, 5)]


@pytest.mark.parametrize("levels", LEVEL_SETS[:-1])
def test_every_index_round_trips(levels):
  fsq = FSQ(levels)
  idx = jnp.arange(fsq.codebook_size)
  codes = fsq.indices_to_codes(idx)
  chex.assert_shape(codes, (fsq.codebook_size, len(levels)))
  np.testing.assert_array_equal(fsq.codes_to_indices(codes), idx)
  # All codes are distinct: the codebook is a bijection onto the grid.
  assert len({tuple(c) for c in np.asarray(codes).tolist()}) == fsq.codebook_size


def test_default_levels_codebook_and_sampled_round_trip():
  fsq = FSQ((8, 8, 8, 8, 8, 5, 5, 5))
  assert fsq.codebook_size == 4_096_000
  idx = jnp.asarray(np.random.default_rng(0).integers(0, fsq.codebook_size, 10_000))
  np.testing.assert_array_equal(fsq.codes_to_indices(fsq.indices_to_codes(idx)), idx)
  np.testing.assert_array_equal(fsq.codes_to_indices(fsq.indices_to_codes(jnp.asarray(
      [0, fsq.codebook_size - 1]))), [0, fsq.codebook_size - 1])


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_quantized_values_lie_on_the_grid_and_use_every_level(levels):
  fsq = FSQ(levels)
  z = jax.random.normal(jax.random.PRNGKey(0), (20_000, len(levels))) * 3
  q = fsq.quantize(z)
  half = np.asarray(levels) // 2
  scaled = np.asarray(q) * half
  np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-5)
  for d, level in enumerate(levels):
    values = np.unique(np.round(scaled[:, d]))
    # Odd L: {-(L-1)/2 .. (L-1)/2}; even L: {-L/2 .. L/2 - 1} -- exactly L values.
    expected = np.arange(level) - half[d]
    np.testing.assert_array_equal(values, expected)
  assert float(jnp.max(jnp.abs(q))) <= 1.0
  # A grid code is a fixed point of indices -> codes -> indices.
  np.testing.assert_allclose(fsq.indices_to_codes(fsq.codes_to_indices(q)), q, atol=1e-6)


@pytest.mark.parametrize("levels", [(8, 5, 4), (2, 7)])
def test_gradient_passes_straight_through(levels):
  fsq = FSQ(levels)
  z = jax.random.normal(jax.random.PRNGKey(1), (64, len(levels)))
  w = jax.random.normal(jax.random.PRNGKey(2), (64, len(levels)))
  grad_q = jax.grad(lambda z: jnp.sum(fsq.quantize(z) * w))(z)
  # Straight through: d quantize / dz == d (bound / half_width) / dz.
  grad_b = jax.grad(lambda z: jnp.sum(fsq.bound(z) / (np.asarray(levels) // 2) * w))(z)
  np.testing.assert_allclose(grad_q, grad_b, rtol=1e-5, atol=1e-7)
  assert float(jnp.min(jnp.abs(grad_q))) > 0.0


def test_round_ste_values_and_gradient():
  x = jnp.array([-1.6, -0.4, 0.49, 2.5001])
  np.testing.assert_array_equal(round_ste(x), jnp.round(x))
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(round_ste(x)))(x), jnp.ones(4))


def test_even_level_bound_is_asymmetric_and_centred():
  fsq = FSQ((4,))
  b = fsq.bound(jnp.array([[-50.0], [0.0], [50.0]]))
  # Limits -2 and +1 (rounding), with z=0 mapping to exactly 0.
  assert -2.5 < float(b[0, 0]) < -1.5 and 0.5 < float(b[2, 0]) < 1.5
  np.testing.assert_allclose(b[1, 0], 0.0, atol=1e-6)


def test_implicit_codebook_and_bad_levels():
  fsq = FSQ((3, 2))
  np.testing.assert_allclose(fsq.implicit_codebook(),
                             [[-1, -1], [0, -1], [1, -1], [-1, 0], [0, 0], [1, 0]])
  for bad in [(), (1, 4), (0,), (2.9, 3.7), (True, 4)]:
    with pytest.raises(ValueError, match="levels"):
      FSQ(bad)
  assert FSQ((8.0, np.int64(5))).levels == (8, 5)  # whole numbers of any type
  with pytest.raises(ValueError, match="int32"):
    FSQ((1000,) * 4)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_neighbour_codes_are_the_codes_within_the_radius(radius):
  levels = (4, 3, 5)
  digits = lambda c: np.array([c % 4, c // 4 % 3, c // 12])
  for code in range(60):
    got = neighbour_codes(code, levels, radius)
    want = [c for c in range(60) if c != code and np.all(np.abs(digits(c) - digits(code)) <= 1)
            and np.sum(digits(c) != digits(code)) <= radius]
    assert sorted(got) == want and len(set(got)) == len(got)
    steps = [np.sum(digits(c) != digits(code)) for c in got]
    assert steps == sorted(steps)  # nearest first
