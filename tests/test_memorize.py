"""The decoder learns assigned codes by heart: exact afterwards, the encoder untouched, and
`decodes_exactly` agreeing with the codec's own exactness on the encoder's codes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_recon_config
from fsqtok.codec import evaluate as evaluate_lib
from fsqtok.codec import memorize
from fsqtok.codec import model as codec_lib
from fsqtok.data.batches import PieceSet
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import sharding as sharding_lib

STRINGS = PieceSet.from_counts({s: 10 - i for i, s in enumerate(
    ["the", " of", "ing", " and", "é", "tion", " to", "日本", "x", " quickly"])}, 16)


def _codec():
  config = tiny_recon_config("builtin", "")
  model = codec_lib.codec_from_config(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(STRINGS.bytes_NxL),
                      jnp.asarray(STRINGS.lengths_N))["params"]
  return config, model, params


def test_decodes_exactly_agrees_with_the_codecs_exactness_on_its_own_codes():
  _, model, params = _codec()
  stats = evaluate_lib.compute_piece_stats(model, params, STRINGS, batch_size=4,
                                           mesh=sharding_lib.data_mesh(1))
  np.testing.assert_array_equal(
      memorize.decodes_exactly(model, params, stats["code"], STRINGS, batch_size=4),
      stats["exact"])


def test_the_decoder_learns_assigned_codes_and_the_encoder_stays():
  config, model, params = _codec()
  codes = np.arange(STRINGS.num_distinct) * 37  # distinct, unrelated to the encoder's
  assert not memorize.decodes_exactly(model, params, codes, STRINGS).any()
  optim = optimizer_lib.adamw_config(learning_rate=1e-2, warmup_steps=10)
  trained = memorize.train_decoder(model, params, codes, STRINGS, optim=optim,
                                   num_steps=300, batch_size=5, seed=0, progress=False)
  assert memorize.decodes_exactly(model, trained, codes, STRINGS).all()
  chex.assert_trees_all_equal(trained["encoder"], params["encoder"])
  with pytest.raises(ValueError, match="3 codes for 10 strings"):
    memorize.train_decoder(model, params, codes[:3], STRINGS, optim=optim, num_steps=1,
                           batch_size=2, seed=0)
  del config
