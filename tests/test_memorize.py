"""The decoder learns assigned codes by heart: exact afterwards, the encoder untouched, and
`decodes_exactly` agreeing with the codec's own exactness on the encoder's codes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_recon_config
from fsqtok.codec import evaluate as evaluate_lib
from fsqtok.codec import fsq as fsq_lib
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


def test_a_rate_scale_is_the_learning_rate_scaled_in_one_compiled_step():
  """``rate_scale`` trains as the learning rate times it would (AdamW's update, weight
  decay and all, is proportional to the rate), and calls that share a `decoder_optimizer`
  share one compiled step whatever their scale."""
  _, model, params = _codec()
  codes = np.arange(STRINGS.num_distinct) * 37
  kw = dict(num_steps=15, batch_size=5, seed=0, progress=False)
  scaled = memorize.train_decoder(model, params, codes, STRINGS, rate_scale=0.25, **kw,
                                  optim=optimizer_lib.adamw_config(learning_rate=1e-2,
                                                                   warmup_steps=3))
  lower = memorize.train_decoder(model, params, codes, STRINGS, **kw,
                                 optim=optimizer_lib.adamw_config(learning_rate=2.5e-3,
                                                                  warmup_steps=3))
  chex.assert_trees_all_close(scaled, lower, rtol=1e-5, atol=1e-7)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                 scaled["decoder"], params["decoder"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  optim = optimizer_lib.adamw_config(learning_rate=1e-2, warmup_steps=3)
  tx = memorize.decoder_optimizer(optim, 15, params)
  memorize.train_decoder(model, params, codes, STRINGS, optim=optim, tx=tx, **kw)
  compiled = memorize._train_step._cache_size()  # pylint: disable=protected-access
  for scale in (0.5, 0.125):
    memorize.train_decoder(model, params, codes, STRINGS, optim=optim, tx=tx,
                           rate_scale=scale, **kw)
  assert memorize._train_step._cache_size() == compiled  # pylint: disable=protected-access


def _rounds(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({**dict(num=0, steps=0, learning_rate=1e-2, repeats=8,
                                           search_radius=2), **kw})


def test_a_missed_string_moves_to_a_free_code_that_decodes_to_it():
  _, model, params = _codec()
  learned = np.arange(STRINGS.num_distinct) * 4096 + 1000  # far apart
  optim = optimizer_lib.adamw_config(learning_rate=1e-2, warmup_steps=10)
  params = memorize.train_decoder(model, params, learned, STRINGS, optim=optim,
                                  num_steps=300, batch_size=5, seed=0, progress=False)
  assert memorize.decodes_exactly(model, params, learned, STRINGS).all()
  # String 3 is given a neighbour of its learned code that does not decode to it; its
  # learned code is free now.
  moved = learned.copy()
  for code in fsq_lib.neighbour_codes(int(learned[3]), model.levels, 1):
    moved[3] = code
    if not memorize.decodes_exactly(model, params, moved, STRINGS)[3]:
      break
  assert not memorize.decodes_exactly(model, params, moved, STRINGS)[3]
  codes, exact = memorize.move_to_decoding_codes(
      model, params, moved, memorize.decodes_exactly(model, params, moved, STRINGS), STRINGS,
      radius=2)
  assert exact.all() and len(set(codes.tolist())) == len(codes)
  np.testing.assert_array_equal(np.delete(codes, 3), np.delete(moved, 3))
  assert codes[3] in fsq_lib.neighbour_codes(int(moved[3]), model.levels, 2)
  np.testing.assert_array_equal(exact, memorize.decodes_exactly(model, params, codes, STRINGS))


def test_rounds_finish_what_the_first_steps_leave():
  _, model, params = _codec()
  codes = np.arange(STRINGS.num_distinct) * 37
  optim = optimizer_lib.adamw_config(learning_rate=1e-2, warmup_steps=10)
  kw = dict(optim=optim, num_steps=20, batch_size=5, seed=0, progress=False)
  _, c0, r0 = memorize.learn_by_heart(model, params, codes, STRINGS, rounds=_rounds(), **kw)
  assert r0["rounds"][0]["exact"] < 1 and len(r0["rounds"]) == 1
  np.testing.assert_array_equal(c0, codes)
  p, c, report = memorize.learn_by_heart(
      model, params, codes, STRINGS, rounds=_rounds(num=20, steps=30, learning_rate_decay=0.8),
      **kw)
  exact = [r["exact"] for r in report["rounds"]]
  rates = [r["learning_rate"] for r in report["rounds"][1:]]
  np.testing.assert_allclose(rates, 1e-2 * 0.8 ** np.arange(len(rates)))  # each round lower
  assert exact[-1] == 1.0 == report["exact"] and len(exact) < 21  # stopped once all exact
  assert memorize.decodes_exactly(model, p, c, STRINGS).all()
  assert len(set(c.tolist())) == len(c) and report["not_exact"].size == 0
  chex.assert_trees_all_equal(p["encoder"], params["encoder"])


def test_rounds_without_steps_are_a_clear_error():
  _, model, params = _codec()
  with pytest.raises(ValueError, match="decoder rounds need steps >= 1"):
    memorize.learn_by_heart(model, params, np.arange(STRINGS.num_distinct), STRINGS,
                            optim=optimizer_lib.adamw_config(1e-2, 1), num_steps=1,
                            batch_size=5, seed=0, rounds=_rounds(num=2, steps=0))
  for decay in (0.0, 1.5):
    with pytest.raises(ValueError, match="learning_rate_decay must be in"):
      memorize.learn_by_heart(model, params, np.arange(STRINGS.num_distinct), STRINGS,
                              optim=optimizer_lib.adamw_config(1e-2, 1), num_steps=1,
                              batch_size=5, seed=0,
                              rounds=_rounds(num=2, steps=1, learning_rate_decay=decay))
