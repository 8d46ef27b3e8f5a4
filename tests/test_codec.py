import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import recon as recon_config
from fsqtok.codec import model as codec_lib
from fsqtok.tokenizer.pieces import pieces_to_array, split_pieces
from fsqtok.train import recon

_CONV = {"enc_channels": (16, 32, 32), "enc_strides": (1, 2, 2),
         "dec_channels": (32, 16, 16), "dec_strides": (2, 2, 1),
         "enc_mlp_dim": 0, "dec_mlp_dim": 0}
ARCHES = {
    "conv_flatten": _CONV,
    "conv_mean": {**_CONV, "pooling": "mean"},
    "mlp": {},  # the tiny config's own
}


def tiny_model(**overrides):
  c = recon_config.get_config("tiny").model
  for k, v in overrides.items():
    c[k] = v
  return codec_lib.codec_from_config(c), c


def sample_batch(text="The quick brown fox jumps over the lazy dog 1234, naïve 日本"):
  return pieces_to_array(split_pieces(text))


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_shapes_and_codes_on_grid(arch):
  model, c = tiny_model(**ARCHES[arch])
  b, l = sample_batch()
  params = model.init(jax.random.PRNGKey(0), b, l)
  logits, codes = model.apply(params, b, l)
  chex.assert_shape(logits, (len(l), 16, codec_lib.NUM_SYMBOLS))
  chex.assert_shape(codes, (len(l), len(c.levels)))
  idx = model.apply(params, codes, method=lambda m, c: m.fsq.codes_to_indices(c))
  assert int(idx.min()) >= 0 and int(idx.max()) < np.prod(c.levels)


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_bytes_after_the_length_do_not_matter(arch):
  model, _ = tiny_model(**ARCHES[arch])
  b, l = sample_batch()
  params = model.init(jax.random.PRNGKey(0), b, l)
  noisy = b.copy()
  noisy[np.arange(16)[None] >= l[:, None]] = 123
  np.testing.assert_allclose(model.apply(params, noisy, l, method=codec_lib.Codec.encode),
                             model.apply(params, b, l, method=codec_lib.Codec.encode))


def test_gradient_reaches_the_encoder_through_the_quantizer():
  model, _ = tiny_model()
  b, l = sample_batch()
  params = model.init(jax.random.PRNGKey(0), b, l)["params"]

  def loss(p):
    logits, _ = model.apply({"params": p}, b, l)
    return recon.reconstruction_loss(logits, b, l)[0]

  # At initialisation the latents are small and every piece rounds to the same code; the
  # encoder must still learn, which only the straight-through estimator makes possible.
  codes = model.apply({"params": params}, b, l, method=codec_lib.Codec.encode)
  assert len(np.unique(np.asarray(codes), axis=0)) == 1
  grads = jax.grad(loss)(params)
  norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g))
           for k, g in jax.tree_util.tree_leaves_with_path(grads["encoder"])}
  assert min(norms.values()) > 0.0, norms


def test_fourier_features_of_the_code():
  codes = jnp.array([[-1.0, 0.0, 0.5], [0.25, -0.5, 1.0]])
  chex.assert_trees_all_equal(codec_lib.fourier_features(codes, 0), codes)
  f = codec_lib.fourier_features(codes, 2)
  chex.assert_shape(f, (2, 3 * (1 + 2 * 2)))
  np.testing.assert_allclose(f[:, :3], codes)
  # sin(pi z), sin(2 pi z) per dimension, then the cosines, in that order.
  np.testing.assert_allclose(f[0, 3:9], np.sin(np.pi * np.array([-1, -2, 0, 0, 0.5, 1.0])),
                             atol=1e-6)
  np.testing.assert_allclose(f[1, 9:], np.cos(np.pi * np.array([0.25, 0.5, -0.5, -1, 1, 2])),
                             atol=1e-6)
  # Neighbouring grid points (levels 8: spacing 1/4) differ in more than the raw value.
  near = codec_lib.fourier_features(jnp.array([[0.0], [0.25]]), 2)
  assert float(jnp.abs(near[0] - near[1]).sum()) > 4 * 0.25


def test_a_fourier_decoder_passes_the_gradient_to_the_encoder_and_old_configs_load():
  model, c = tiny_model(**ARCHES["mlp"], dec_fourier_octaves=2)
  b, l = sample_batch()
  params = model.init(jax.random.PRNGKey(0), b, l)["params"]
  # The decoder's first layer sees the code and its 2 x 2 periodic features per dimension.
  assert params["decoder"]["mlp"]["kernel"].shape[0] == len(c.levels) * 5
  grads = jax.grad(lambda p: recon.reconstruction_loss(
      model.apply({"params": p}, b, l)[0], b, l)[0])(params)
  assert float(jnp.linalg.norm(grads["encoder"]["to_latent"]["kernel"])) > 0
  # A codec saved before the field existed (its codec_config.json lacks it) still loads.
  old = c.to_dict()
  del old["dec_fourier_octaves"]
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert codec_lib.codec_from_config(ml_collections.ConfigDict(old)).dec_fourier_octaves == 0


def test_targets_weights_and_greedy_decode():
  b, l = pieces_to_array(["ab", "x" * 16])
  targets, weights = codec_lib.targets_and_weights(jnp.asarray(b), jnp.asarray(l))
  np.testing.assert_array_equal(targets[0, :3], [97, 98, codec_lib.END])
  np.testing.assert_array_equal(weights[0], [1, 1, 1] + [0] * 13)
  np.testing.assert_array_equal(weights[1], [1] * 16)  # full piece: no END position
  logits = jax.nn.one_hot(targets, codec_lib.NUM_SYMBOLS)
  out, lens = codec_lib.greedy_decode(logits)
  np.testing.assert_array_equal(lens, [2, 16])
  np.testing.assert_array_equal(out, b)


def test_loss_falls_and_memorises_a_few_pieces():
  model, c = tiny_model()
  b, l = sample_batch()
  params = model.init(jax.random.PRNGKey(0), b, l)["params"]
  tx = optax.adam(3e-3)  # 1e-2 oscillates: its last step's accuracy depends on the JAX version
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss(p):
      logits, _ = model.apply({"params": p}, b, l)
      return recon.reconstruction_loss(logits, b, l)
    (value, acc), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, value, acc

  losses = []
  for _ in range(400):
    params, opt, value, acc = step(params, opt)
    losses.append(float(value))
  assert losses[-1] < 0.1 * losses[0]
  assert float(acc) > 0.9


def test_strides_must_divide_max_len():
  model, _ = tiny_model(**_CONV, max_len=10)
  b, l = sample_batch()
  with pytest.raises(ValueError, match="divisible"):
    model.init(jax.random.PRNGKey(0), b[:, :10], np.minimum(l, 10))
  uneven, _ = tiny_model(**{**_CONV, "dec_channels": (32, 16)})  # 3 strides, 2 layers
  with pytest.raises(ValueError, match=r"model.dec_channels=.* and model.dec_strides=\(2, 2, "
                                       r"1\) must have one entry per layer"):
    uneven.init(jax.random.PRNGKey(0), b, l)
