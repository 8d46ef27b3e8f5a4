"""The contextual fuser: shapes, gate capacity, causality, losses, training, the cache;
both designs (``per_id``, the default, and ``per_position``)."""
import dataclasses
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import fuser as fuser_config
from fsqtok.models import fuser as F
from fsqtok.train import fuser_train as FT

TEXT = ("the bank of the river was steep. the bank lent money to the river town. "
        "we sat on the bank and counted the money of the bank. ") * 3
SPEC = F.FuserSpec(window_left=2, window_right=2, context_bytes=8, char_dim=16, hidden_dim=16,
                   transformer_layers=1, transformer_heads=2, fragment_dim=16, fusion_heads=2,
                   fused_dim=16, doc_dim=8, image_dim=4, audio_dim=4, gate_hidden=8,
                   mixer_dim=8)
OLD = dataclasses.replace(SPEC, design="per_position")


def _setup(spec):
  tok = FT.counted_tokenizer([TEXT], 300)
  bank = tok.token_to_id(" bank")
  model = F.ContextualFuser(len(tok), 16, tuple(tok.token_bytes(i) for i in range(len(tok))),
                            spec, (bank, tok.token_to_id("[MASK]")))
  ids = jnp.asarray(np.asarray(tok.encode(TEXT)[:32], np.int32).reshape(2, 16))
  params = jax.jit(lambda r: F.init_params(model, r, 16))(jax.random.PRNGKey(0))
  return types.SimpleNamespace(tok=tok, model=model, ids=ids, params=params, bank=bank)


@pytest.fixture(scope="module")
def setup():
  """The default design, per_id."""
  return _setup(SPEC)


@pytest.fixture(scope="module")
def two_layer():
  """per_id with the two-layer mixer (contextual queries and keys)."""
  return _setup(dataclasses.replace(SPEC, mixer_layers=2))


@pytest.fixture(scope="module")
def deep():
  """per_id with a three-layer mixer whose layers over the window have feed-forward
  blocks (``mixer_layers=3, mixer_mlp=True``)."""
  return _setup(dataclasses.replace(SPEC, mixer_layers=3, mixer_mlp=True))


@pytest.fixture(scope="module")
def with_static():
  """per_id whose rows add a projection of the id's static row (``static_in_rows``)."""
  return _setup(dataclasses.replace(SPEC, static_in_rows=True))


@pytest.fixture(scope="module")
def old():
  """The first design, per_position (chosen by config)."""
  return _setup(OLD)


def test_shapes_and_gate(setup):
  s = setup
  x, aux = jax.jit(lambda p, i: s.model.apply({"params": p}, i))(s.params, s.ids)
  chex.assert_shape(x, (2, 16, 16))
  chex.assert_tree_all_finite(x)
  is_bank = np.asarray(s.ids) == s.bank
  assert is_bank.any() and np.all(np.asarray(aux["gate"])[is_bank])
  # where the gate is off the output is exactly the static table row
  table = np.asarray(s.params["static"]["embedding"])
  off = ~np.asarray(aux["computed"])
  np.testing.assert_array_equal(np.asarray(x)[off], table[np.asarray(s.ids)[off]])


def test_signals_are_masked(setup):
  s = setup
  apply = jax.jit(lambda p, i, sig: s.model.apply({"params": p}, i, sig, force_dynamic=True)[0])
  absent = F.empty_signals(2, SPEC)
  noisy = {**absent, "image": jnp.ones((2, SPEC.image_dim)) * 5.0,
           "author": jnp.asarray([3, 4])}
  chex.assert_trees_all_close(apply(s.params, s.ids, absent), apply(s.params, s.ids, noisy))
  given = F.make_signals(2, SPEC, image=jnp.ones((2, SPEC.image_dim)), author=jnp.asarray([3, 4]))
  assert not np.allclose(apply(s.params, s.ids, absent), apply(s.params, s.ids, given))
  with pytest.raises(ValueError, match="Unknown signals"):
    F.make_signals(2, SPEC, video=jnp.ones((2, 3)))
  for name, count in (("author", SPEC.num_authors), ("domain", SPEC.num_domains)):
    with pytest.raises(ValueError, match=f"Signal '{name}' has ids 3..{count}; the model has"):
      F.make_signals(2, SPEC, **{name: jnp.asarray([3, count])})
    with pytest.raises(ValueError, match=f"Signal '{name}' has ids -1..0"):
      F.make_signals(2, SPEC, **{name: jnp.asarray([0, -1])})


def test_timestamps_of_any_scale_give_bounded_features_and_a_working_signal(setup):
  s = setup
  years = jnp.asarray([1850.0, 1851.0])
  for t in (years, jnp.asarray([1.7e9, 1.7e9 + 86400.0])):  # years, or Unix seconds
    feats = F.timestamp_features(t)
    chex.assert_shape(feats, (2, 2 * len(F.TIMESTAMP_PERIODS)))
    assert bool(jnp.all(jnp.abs(feats) <= 1.0))
  # a year apart: the same phase at the one-year period, apart at the longer ones
  feats = np.asarray(F.timestamp_features(years))
  np.testing.assert_allclose(feats[0, [0, 10]], feats[1, [0, 10]], atol=1e-3)
  assert not np.allclose(feats[0, 1:10], feats[1, 1:10], atol=1e-3)
  apply = jax.jit(lambda p, i, sig: s.model.apply({"params": p}, i, sig, force_dynamic=True)[0])
  out = apply(s.params, s.ids, F.make_signals(2, SPEC, timestamp=years))
  assert bool(jnp.all(jnp.isfinite(out)))
  assert not np.allclose(out, apply(s.params, s.ids, F.empty_signals(2, SPEC)))
  with pytest.raises(ValueError, match="Signal 'timestamp' has a NaN"):
    F.make_signals(2, SPEC, timestamp=jnp.asarray([1850.0, jnp.nan]))


def test_info_nce_matches_hand_computation():
  a = np.array([[1.0, 0.0], [0.0, 2.0]])
  k = np.array([[1.0, 1.0], [0.0, 1.0]])
  sh = np.array([[0.0, 1.0], [1.0, 0.0]])
  tau = 0.5
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  sim = unit(a) @ unit(k).T / tau
  extra = np.sum(unit(sh) * unit(k), -1) / tau
  expected = 0.0
  for i in range(2):
    row = np.concatenate([sim[i], [extra[i]]])
    expected += -(row[i] - np.log(np.sum(np.exp(row))))
  got = F.info_nce(jnp.asarray(a), jnp.asarray(k), jnp.asarray(sh), tau)
  np.testing.assert_allclose(float(got), expected / 2, rtol=1e-6)


def test_info_nce_leaves_out_samples_from_padding():
  rng = np.random.default_rng(0)
  a, k, sh = (jnp.asarray(rng.normal(size=(5, 3))) for _ in range(3))
  valid = jnp.asarray([True, False, True, True, False])
  keep = np.flatnonzero(valid)
  masked = F.info_nce(a, k, sh, 0.3, valid)
  # the same as the loss over the valid rows alone: padding is no anchor and no negative
  alone = F.info_nce(a[keep], k[keep], sh[keep], 0.3)
  np.testing.assert_allclose(float(masked), float(alone), rtol=1e-6)
  assert float(F.info_nce(a, k, sh, 0.3, jnp.zeros(5, bool))) == 0.0


def test_capacity_has_static_shapes_and_agrees_with_compute_all(old):
  s = old
  run = lambda spec: jax.jit(lambda p, i: s.model.clone(spec=spec).apply({"params": p}, i))(
      s.params, s.ids)
  x_all, aux_all = run(dataclasses.replace(OLD, capacity=0.0))
  gated = int(np.sum(aux_all["gate"]))
  n = s.ids.size
  assert 0 < gated < n
  # capacity >= number gated: identical outputs
  x_cap, aux_cap = run(dataclasses.replace(OLD, capacity=math.ceil(gated * 1.0) / n))
  chex.assert_trees_all_close(x_cap, x_all, atol=1e-5)
  np.testing.assert_array_equal(aux_cap["computed"], aux_all["computed"])
  # a smaller capacity: the same shapes, exactly ceil(capacity * n) computed
  small = dataclasses.replace(OLD, capacity=2 / n)
  x_small, aux_small = run(small)
  chex.assert_equal_shape([x_small, x_all])
  assert int(np.sum(aux_small["computed"])) == 2


def test_per_position_capacity_goes_to_real_tokens_not_padding(old):
  s = old
  spec = dataclasses.replace(OLD, gate_mode="always", capacity=0.5)
  valid = jnp.ones((2, 16), bool).at[1, 4:].set(False)  # 20 real tokens, 16 slots
  _, aux = jax.jit(lambda p, i, v: s.model.clone(spec=spec).apply(
      {"params": p}, i, valid_BxT=v))(s.params, s.ids, valid)
  computed = np.asarray(aux["computed"])
  assert computed.sum() == 16 and not (computed & ~np.asarray(valid)).any()


def test_context_bytes_cut_the_window(old):
  s = old
  windows = F.context_windows(s.ids, 2, 2).reshape(-1, 5)
  chars, seg, mask = s.model.apply({"params": s.params}, windows, method=F.ContextualFuser.pack)
  chars, seg, mask = map(np.asarray, (chars, seg, mask))
  for r in range(windows.shape[0]):
    assert np.sum(mask[r] & (seg[r] == 0)) <= 8 and np.sum(mask[r] & (seg[r] == 2)) <= 8
    own = bytes(int(c) - 1 for c in chars[r][mask[r] & (seg[r] == 1)])
    tid = int(windows[r, 2])
    assert own == (s.tok.token_bytes(tid) or own)


def _lm_embedding(s, **spec_changes):
  """The LM embedding of ``s``'s fuser (its weights) and its variables."""
  lm = types.SimpleNamespace(vocab_size=s.model.vocab_size, d_model=16,
                             token_bytes=s.model.token_bytes,
                             fuser=dataclasses.replace(s.model.spec, **spec_changes),
                             ambiguous_ids=s.model.ambiguous_ids)
  emb = F.lm_embedding(lm)
  fuser = {k: v for k, v in s.params.items() if k != "mlm_head"}
  if emb.spec.design == "per_position":  # the causal window packs fewer byte positions
    frag = dict(fuser["fragment"])
    frag["positions"] = frag["positions"][:emb.spec.packed_len]
    fuser = {**fuser, "fragment": frag}
  else:  # per-slot parameters: the left slots and the token's
    w = emb.spec.window
    fuser = {**fuser, "slot_bias": fuser["slot_bias"][:, :w],
             "slot_value": fuser["slot_value"][:w]}
    if "slot_bias_all" in fuser:
      fuser["slot_bias_all"] = fuser["slot_bias_all"][:, :w, :w]
    for name in [k for k in fuser if k.startswith("mix_deep_")]:
      fuser[name] = {**fuser[name], "slot_bias": fuser[name]["slot_bias"][:, :w, :w]}
  return lm, emb, {"params": {"fuser": fuser}}


@pytest.mark.parametrize("design", ["per_position", "per_id"])
def test_lm_embedding_is_causal(setup, old, design):
  s = old if design == "per_position" else setup
  _, emb, params = _lm_embedding(s)
  assert emb.spec.window_right == 0
  f = jax.jit(lambda p, i: emb.apply(p, i))
  x = f(params, s.ids)
  changed = s.ids.at[:, 9].set(s.bank)
  y = f(params, changed)
  chex.assert_trees_all_close(x[:, :9], y[:, :9])
  assert not np.allclose(x[:, 9:], y[:, 9:])
  # generation with a key/value cache: the previous ids come as the prefix
  tail = jax.jit(lambda p, i, pre: emb.apply(p, i, prefix_BxP=pre))(params, s.ids[:, 9:],
                                                                      s.ids[:, :9])
  chex.assert_trees_all_close(tail, x[:, 9:], atol=1e-6)


def test_ema_and_drift():
  ref = jnp.zeros((3, 2))
  seen = jnp.asarray([False, True, False])
  means = jnp.asarray([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
  counts = jnp.asarray([1.0, 1.0, 0.0])
  new, new_seen = F.ema_update(ref.at[1].set(1.0), seen, means, counts, 0.5)
  np.testing.assert_allclose(new, [[1, 1], [1.5, 1.5], [0, 0]])
  np.testing.assert_array_equal(new_seen, [True, True, False])
  d = F.drift_penalty(jnp.asarray([[1.0, 0.0], [3.0, 3.0]]), jnp.asarray([1, 0]),
                      jnp.ones(2), new, new_seen)
  np.testing.assert_allclose(float(d), ((1 - 1.5) ** 2 + 1.5 ** 2 + 4 + 4) / 2)


@pytest.mark.slow
def test_a_step_on_8_devices_equals_1(setup):
  """The fuser phase trains on the data mesh like every phase: the state replicated, the
  batch split; the masks, negatives and token means are those of the global batch."""
  from fsqtok.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  s = setup
  config = fuser_config.get_config("tiny")
  c = FT.step_config(config.fuser.loss, s.tok)
  tx = FT.optimizer_lib.make_optimizer(config.fuser.optim, 10)
  ids = jnp.tile(s.ids, (4, 1))  # 8 rows
  batch = {"inputs": np.asarray(ids), "valid": np.ones(ids.shape, bool)}
  results = []
  for n in (1, 8):
    mesh = sharding_lib.data_mesh(n)
    state = jax.device_put(FT.create_state(s.model, jax.tree.map(jnp.copy, s.params), tx),
                           sharding_lib.replicated(mesh))
    step = FT.make_step(s.model, c, mesh, donate=False)
    for i in range(2):
      state, m = step(state, sharding_lib.shard_batch(batch, mesh), jax.random.PRNGKey(i))
    results.append((jax.device_get(state.params), jax.device_get(state.reference_VxD),
                    float(m["loss"])))
  # Attention key biases get no true gradient (softmax ignores them); Adam scales their
  # rounding noise, which differs by device count, up to steps of ~lr size (7.8e-5 seen).
  # Every other parameter agrees to ~3e-8.
  one, eight = (traverse_util.flatten_dict(r[0], sep="/") for r in results)
  assert one.keys() == eight.keys()
  for name in one:
    atol = 1e-4 if name.endswith("key/bias") else 2e-5
    np.testing.assert_allclose(eight[name], one[name], rtol=2e-4, atol=atol, err_msg=name)
  chex.assert_trees_all_close(results[0][1], results[1][1], rtol=2e-4, atol=2e-5)
  assert results[0][2] == pytest.approx(results[1][2], rel=1e-4)


def _train(s, num_steps: int, **loss):
  """``num_steps`` steps of the tiny config's fuser (``loss`` overrides) on ``s.ids``,
  keys 0, 1, 0, ...: the final state and every step's metrics."""
  config = fuser_config.get_config("tiny")
  config.fuser.loss.update(loss)
  tx = FT.optimizer_lib.make_optimizer(config.fuser.optim, 100)
  state = FT.create_state(s.model, jax.tree.map(jnp.copy, s.params), tx)
  step = FT.make_step(s.model, FT.step_config(config.fuser.loss, s.tok))
  batch = {"inputs": s.ids, "valid": jnp.ones_like(s.ids, bool)}
  metrics = []
  for i in range(num_steps):
    state, m = step(state, batch, jax.random.PRNGKey(i % 2))
    metrics.append(jax.tree.map(float, m))
  return state, metrics


@pytest.mark.slow
def test_loss_falls_and_reference_updates(setup):
  state, metrics = _train(setup, 8)
  losses = [m["loss"] for m in metrics]
  m = metrics[-1]
  assert all(np.isfinite(losses)) and m["neighbour_loss"] == 0.0  # off by default
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  assert bool(np.any(state.seen_V)) and float(jnp.abs(state.reference_VxD).sum()) > 0
  assert 0.0 < float(m["activation_rate"]) <= 1.0


def test_hide_neighbour_hides_one_ordinary_neighbour_never_the_centre():
  win = jnp.array([[F.OUTSIDE, 7, 9, 8, 2],      # 2 < first_ordinary: a special
                   [F.OUTSIDE, F.OUTSIDE, 9, 1, F.OUTSIDE],  # no ordinary neighbour
                   [5, 6, 9, 7, 8]])
  seen = set()
  for seed in range(20):
    hidden, ids, has = FT.hide_neighbour(jax.random.PRNGKey(seed), win, 2, first_ordinary=4)
    np.testing.assert_array_equal(has, [True, False, True])
    for r in (0, 2):
      changed = np.flatnonzero(np.asarray(hidden[r] != win[r]))
      assert len(changed) == 1 and changed[0] != 2 and hidden[r, changed[0]] == F.OUTSIDE
      assert ids[r] == win[r, changed[0]] >= 4
      seen.add((r, int(changed[0])))
  assert {(0, 1), (0, 3), (2, 0), (2, 1), (2, 3), (2, 4)} <= seen  # every slot drawn


@pytest.mark.slow
def test_the_neighbour_loss_falls(setup):
  """The contextual skip-gram (``neighbour_weight``): its loss is reported, has a
  gradient and falls."""
  _, metrics = _train(setup, 10, neighbour_weight=1.0, neighbour_samples=8)
  losses = [m["neighbour_loss"] for m in metrics]
  assert all(np.isfinite(losses)) and losses[0] > 0
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("design", ["per_position", "per_id"])
def test_encoder_cache_gives_the_same_vectors(setup, old, design):
  s = old if design == "per_position" else setup
  texts = ["the bank of the river", "money in the bank", "the bank of the river"]
  cached = F.FuserEncoder(s.model, s.params, s.tok, cache_size=1000, chunk=16)
  plain = F.FuserEncoder(s.model, s.params, s.tok, cache_size=0, chunk=16)
  a, b = cached.encode(texts), plain.encode(texts)
  again = cached.encode(texts)
  for u, v, w in zip(a, b, again):
    np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(u, w)
  assert cached.metrics["hit_rate"] > 0.5 and plain.metrics["hits"] == 0
  # the same vectors as the batched forward pass (compute-all)
  ids = jnp.asarray([s.tok.encode(texts[0])])
  x, _ = jax.jit(lambda p, i: s.model.apply({"params": p}, i, compute_all=True))(s.params, ids)
  np.testing.assert_allclose(a[0], np.asarray(x[0]), atol=1e-5)
  # without context every occurrence of a token gets one vector
  nc = cached.encode(["the bank", "a bank"], context=False)
  np.testing.assert_array_equal(nc[0][-1], nc[1][-1])


def test_bad_config_is_explained(setup):
  with pytest.raises(ValueError, match="use_cnn or use_transformer"):
    F.FuserSpec(use_cnn=False, use_transformer=False).validate()
  with pytest.raises(ValueError, match="Unknown fuser.model fields"):
    F.FuserSpec.from_config({"windows": 3})
  with pytest.raises(ValueError, match="max_token_bytes"):
    F.char_layout([b"x" * 20], 16)
  lm = types.SimpleNamespace(vocab_size=3, d_model=8, token_bytes=None)
  with pytest.raises(ValueError, match="token_bytes"):
    F.lm_embedding(lm)
  with pytest.raises(ValueError, match="design must be one of"):
    F.FuserSpec(design="per_token").validate()
  with pytest.raises(ValueError, match="mixer must be one of"):
    F.FuserSpec(mixer="mlp").validate()
  with pytest.raises(ValueError, match="mixer_heads"):
    F.FuserSpec(mixer_dim=30, mixer_heads=4).validate()
  with pytest.raises(ValueError, match="mixer_layers must be >= 1"):
    F.FuserSpec(mixer="conv", mixer_layers=2).validate()
  with pytest.raises(ValueError, match="mixer_layers must be >= 1"):
    F.FuserSpec(mixer_layers=0).validate()
  with pytest.raises(ValueError, match="mixer_mlp .* needs mixer_layers >= 2"):
    F.FuserSpec(mixer_mlp=True).validate()
  with pytest.raises(ValueError, match="static_in_rows needs design='per_id'"):
    F.FuserSpec(design="per_position", static_in_rows=True).validate()
  with pytest.raises(ValueError, match="allows no computed token"):
    F.FuserSpec(window_left=4, capacity=0.1).validate()   # floor(0.1 * 5) = 0
  with pytest.raises(ValueError, match="Only the per_id design"):
    F.precompute_table(setup.model.clone(spec=OLD), setup.params)


def test_padding_is_never_context(setup):
  s = setup
  apply = jax.jit(lambda p, i, v: s.model.apply({"params": p}, i, valid_BxT=v,
                                               force_dynamic=True)[0])
  ids = s.ids[:1, :10]
  padded = jnp.concatenate([ids, jnp.full((1, 6), s.bank, jnp.int32)], 1)  # 6 "pads"
  valid = jnp.arange(16)[None] < 10
  plain = apply(s.params, ids, jnp.ones_like(ids, bool))
  chex.assert_trees_all_close(apply(s.params, padded, valid)[:, :10], plain, atol=1e-6)
  # without the mask the right context of the last tokens would see the fake tokens
  assert not np.allclose(apply(s.params, padded, jnp.ones_like(padded, bool))[:, :10], plain,
                         atol=1e-6)


# ---- the per-id design ------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["setup", "two_layer", "deep", "with_static"])
def test_per_id_table_is_the_encoder_output(request, fixture):
  """The precomputed table is the per-id encoder's output (exactly, computed with one
  shape; to rounding in chunks), and the fuser gives the same vectors with it as when it
  encodes the batch's ids itself, or every id."""
  s = request.getfixturevalue(fixture)
  v = s.model.vocab_size
  rows = jax.jit(lambda p: s.model.apply({"params": p}, jnp.arange(v),
                                         method=F.ContextualFuser.id_rows))(s.params)
  chex.assert_shape(rows, (v, SPEC.table_width))
  np.testing.assert_array_equal(F.precompute_table(s.model, s.params, chunk=v), rows)
  np.testing.assert_allclose(F.precompute_table(s.model, s.params, chunk=64), rows,
                             rtol=1e-6, atol=1e-6)
  fwd = jax.jit(lambda var, i: s.model.apply(var, i, force_dynamic=True)[0])
  from_batch = fwd({"params": s.params}, s.ids)
  chex.assert_trees_all_close(fwd(F.table_variables(s.model, s.params), s.ids), from_batch,
                              atol=1e-6)
  every = s.model.clone(spec=dataclasses.replace(s.model.spec, fragment_ids="all"))
  chex.assert_trees_all_close(
      jax.jit(lambda p, i: every.apply({"params": p}, i, force_dynamic=True)[0])(
          s.params, s.ids), from_batch, atol=1e-6)


@pytest.mark.parametrize("fixture", ["setup", "two_layer", "deep", "with_static"])
def test_per_id_gradients_reach_the_fragment_encoder(request, fixture):
  s = request.getfixturevalue(fixture)
  def loss(p):
    x, _ = s.model.apply({"params": p}, s.ids, force_dynamic=True)
    return jnp.sum(x ** 2)
  grads = jax.jit(jax.grad(loss))(s.params)
  names = ["fragment", "mix_out", "mix_key", "slot_value"]
  if fixture in ("two_layer", "deep"):
    names += ["mix_query", "slot_bias_all", "mix_out_all", "mix_norm", "mix_query_2",
              "mix_key_2"]
  if fixture == "deep":
    names += ["mix_deep_0", "mix_mlp_0", "mix_mlp_1"]
  if fixture == "with_static":
    names += ["static_to_fragment"]
  for name in names:
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[name]))
    assert norm > 0, name


@pytest.mark.parametrize("fixture,shallower,extra", [
    ("two_layer", "setup", ("slot_bias_all", "mix_out_all", "mix_norm", "mix_query_2",
                            "mix_key_2")),
    ("deep", "two_layer", ("mix_deep_0", "mix_mlp_0", "mix_mlp_1"))])
def test_deeper_mixers_read_context_beyond_the_first_layer(request, fixture, shallower,
                                                           extra):
  """Each added layer changes the vectors (they are not the shallower mixer's with the
  same parameters less the new ones), and every layer reads the window only: a changed
  token moves the vectors within window_left/window_right (2) of it, and no other (the
  per-id table stays exact at inference)."""
  s, less = request.getfixturevalue(fixture), request.getfixturevalue(shallower)
  fwd = jax.jit(lambda p, i: s.model.apply({"params": p}, i, force_dynamic=True)[0])
  x = fwd(s.params, s.ids)
  chex.assert_shape(x, (2, 16, 16))
  chex.assert_tree_all_finite(x)
  assert set(extra) <= set(s.params)
  fewer = {k: v for k, v in s.params.items() if k not in extra}
  shallow = jax.jit(lambda p, i: less.model.apply({"params": p}, i,
                                                  force_dynamic=True)[0])(fewer, s.ids)
  assert not np.allclose(x, shallow, atol=1e-4)
  changed = s.ids.at[:, 6].set(s.bank)
  y = fwd(s.params, changed)
  assert not np.allclose(x[:, 8], y[:, 8])                 # 2 tokens away: in the window
  chex.assert_trees_all_close(x[:, 9:], y[:, 9:])          # beyond the window: unchanged
  chex.assert_trees_all_close(x[:, :4], y[:, :4])


def test_static_in_rows_lets_the_mixer_read_the_neighbours_static_rows(setup, with_static):
  """With ``static_in_rows`` a neighbour's static row moves the centre's dynamic vector
  (through its per-id row, in the window only); without it the static rows reach the
  dynamic vectors only through the ambiguity score, which is per id (so not at all
  under ``gate_mode="set"`` and forced dynamic vectors)."""
  def moved(s):
    model = s.model.clone(spec=dataclasses.replace(s.model.spec, gate_mode="set"))
    fwd = jax.jit(lambda p: model.apply({"params": p}, s.ids, force_dynamic=True)[0])
    neighbour = int(s.ids[0, 6])
    params = dict(s.params, static={"embedding": s.params["static"]["embedding"].at[
        neighbour].add(1.0)})
    return np.abs(np.asarray(fwd(params)) - np.asarray(fwd(s.params))).max(-1), neighbour
  moved_by, neighbour = moved(with_static)
  in_window = np.zeros((2, 16), bool)
  for b, t in np.argwhere(np.asarray(with_static.ids) == neighbour):
    in_window[b, max(0, t - 2):t + 3] = True
  assert (moved_by[in_window] > 1e-4).all()
  np.testing.assert_allclose(moved_by[~in_window], 0.0, atol=1e-6)
  np.testing.assert_allclose(moved(setup)[0], 0.0, atol=1e-6)


@pytest.mark.parametrize("fixture,mixer", [("setup", "attention"), ("setup", "conv"),
                                           ("two_layer", "attention"),
                                           ("deep", "attention")])
def test_per_id_capacity_is_causal_and_within_its_budget(request, fixture, mixer):
  """The causal capacity: at most m = floor(capacity * (window_left + 1)) computed tokens
  in any window_left + 1; only the budget's windows go through the dynamic path; a later
  token changes no earlier vector; token by token with the previous ids as the prefix
  (what the LM's key/value cache keeps) equals the whole sequence; the computed vectors
  are those of the compute-all path."""
  s = request.getfixturevalue(fixture)
  ids = jnp.tile(s.ids, (1, 2))  # 2 x 32
  _, emb, params = _lm_embedding(s, capacity=0.67, mixer=mixer)
  spec = emb.spec
  m, w = spec.per_window, spec.window_left + 1
  assert (m, w) == (2, 3)
  if mixer == "conv":  # the conv mixer's weights instead of the attention's
    p = {k: v for k, v in params["params"]["fuser"].items()
         if k not in ("slot_bias", "slot_value", "mix_query", "mix_key")}
    p["slot_weight"] = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (w, SPEC.fragment_dim))
    params = {"params": {"fuser": p}}
  run = jax.jit(lambda p, i: emb.apply(p, i, mutable=["intermediates"]))
  x, state = run(params, ids)
  budget = spec.budget(32)
  assert budget == m * math.ceil(32 / w) < 32
  assert int(state["intermediates"]["fuser"]["dynamic_rows"][0]) == 2 * budget
  fuser = F.ContextualFuser(emb.vocab_size, 16, emb.token_bytes, spec, emb.ambiguous_ids)
  inner = {"params": params["params"]["fuser"]}
  aux, x_all = jax.jit(lambda p, i: (fuser.apply(p, i)[1],
                                     fuser.apply(p, i, compute_all=True)[0]))(inner, ids)
  computed = np.asarray(aux["computed"])
  for start in range(32 - w + 1):
    assert computed[:, start:start + w].sum(1).max() <= m
  assert computed.sum(1).min() > 0 and (np.asarray(aux["gate"]) & ~computed).any()
  # computed: the compute-all vectors; elsewhere the static rows
  np.testing.assert_allclose(np.asarray(x)[computed], np.asarray(x_all)[computed], atol=1e-6)
  table = np.asarray(inner["params"]["static"]["embedding"])
  np.testing.assert_array_equal(np.asarray(x)[~computed], table[np.asarray(ids)[~computed]])
  # causal
  changed = ids.at[:, 20].set(s.bank)
  y, _ = run(params, changed)
  chex.assert_trees_all_close(x[:, :20], y[:, :20])
  assert not np.allclose(x[:, 20:], y[:, 20:])
  # one token at a time, the previous window_left ids as the prefix
  step = jax.jit(lambda p, i, pre: emb.apply(p, i, prefix_BxP=pre))
  prefix = jnp.full((2, spec.window_left), F.OUTSIDE, jnp.int32)
  outs = []
  for t in range(32):
    outs.append(step(params, ids[:, t:t + 1], prefix))
    prefix = jnp.concatenate([prefix, ids[:, t:t + 1]], 1)[:, 1:]
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), x, atol=1e-6)


def test_per_id_signals_none_equals_absent_signals(setup):
  s = setup
  apply = jax.jit(lambda p, i, sig: s.model.apply({"params": p}, i, sig, force_dynamic=True)[0])
  fast = jax.jit(lambda p, i: s.model.apply({"params": p}, i, force_dynamic=True)[0])
  chex.assert_trees_all_close(fast(s.params, s.ids),
                              apply(s.params, s.ids, F.empty_signals(2, SPEC)), atol=1e-6)


def _fuser_lm(design: str = "per_id", **fuser_changes):
  from fsqtok.models import lm as lm_lib  # pylint: disable=g-import-not-at-top
  token_bytes = tuple([None] * 3 + [bytes([i]) for i in range(97, 123)] + [b"the", b"an"])
  c = fuser_config.get_config("tiny").lm.model
  c.embedding, c.fuser = "fuser", fuser_config.model_config(tiny=True)
  c.fuser.update(window_left=3, gate_mode="learned", threshold=0.3, design=design,
                 **fuser_changes)
  c.d_model = 16
  model = lm_lib.lm_from_config(c, len(token_bytes), token_bytes=token_bytes,
                                ambiguous_ids=(29,))
  ids = jnp.asarray([[1, 5, 29, 7, 30, 2, 8, 9]], jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
  return model, params, ids


@pytest.mark.slow
@pytest.mark.parametrize("design", ["per_id", "per_position"])
def test_the_lm_fuser_embedding_follows_its_config_and_is_causal(design):
  model, params, ids = _fuser_lm(design)
  assert model.fuser.window_left == 3 and model.ambiguous_ids == (29,)
  assert model.fuser.design == design
  emb = F.lm_embedding(model)
  assert emb.spec.window_right == 0 and emb.spec.window_left == 3   # made causal
  apply = jax.jit(lambda p, i, v: model.apply({"params": p}, i, v)[0])
  logits = apply(params, ids, jnp.ones_like(ids, bool))
  chex.assert_shape(logits, (1, 8, model.vocab_size))
  changed = apply(params, ids.at[0, 4].set(9), jnp.ones_like(ids, bool))
  chex.assert_trees_all_close(logits[:, :4], changed[:, :4])   # causal through the fuser
  assert not np.allclose(logits[:, 4:], changed[:, 4:])
  # left padding: the same outputs as the unpadded sequence (pads are no context)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], 1)
  valid = jnp.arange(11)[None] >= 3
  chex.assert_trees_all_close(apply(params, padded, valid)[:, 3:], logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"static_in_rows": True},
                                     {"mixer_layers": 3, "mixer_mlp": True}],
                         ids=["default", "static_in_rows", "deep_mixer"])
def test_the_lm_fuser_embedding_generates_with_the_cache_exactly(changes):
  from fsqtok.models import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from fsqtok.models import lm as lm_lib  # pylint: disable=g-import-not-at-top
  model, params, ids = _fuser_lm(**changes)
  fuser = params["embed"]["fuser"]
  assert ("static_to_fragment" in fuser) == bool(changes.get("static_in_rows"))
  assert ("mix_deep_0" in fuser) == ("mixer_layers" in changes)
  whole = jax.jit(lambda p, i, v: model.apply({"params": p}, i, v)[0])
  full = whole(params, ids, jnp.ones_like(ids, bool))
  # one token at a time through the key/value cache (which keeps the previous ids)
  cache = lm_lib.init_cache(model, 1, 8)
  step = jax.jit(lambda p, i, c: model.apply({"params": p}, i, cache=c))
  outs = []
  for t in range(8):
    out, cache = step(params, ids[:, t:t + 1], cache)
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=1e-5)
  # greedy generation (left-padded batch, with the precomputed per-id table) == argmax by
  # recomputing the whole sequence
  assert "fuser_table" in generate_lib.inference_variables(model, params)
  prompts = [[1, 5, 29, 7], [1]]
  got = generate_lib.generate(model, params, prompts, jax.random.PRNGKey(0), max_new_tokens=5,
                              eos_id=-1, pad_id=0, top_k=1)
  for prompt, new in zip(prompts, got):
    seq = list(prompt)
    for _ in range(5):
      padded = jnp.asarray([seq + [0] * (10 - len(seq))], jnp.int32)  # one compiled shape
      logits = whole(params, padded, jnp.arange(10)[None] < len(seq))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert new == seq[len(prompt):]


@pytest.mark.slow
def test_the_lm_trains_with_the_per_id_fuser_embedding():
  """A few Adam steps on one batch: the loss falls, and the precomputed table gives the
  trained LM's outputs."""
  import optax  # pylint: disable=g-import-not-at-top
  model, params, ids = _fuser_lm()
  assert F.lm_spec(model).design == "per_id"
  valid = jnp.ones_like(ids, bool)
  targets = jnp.roll(ids, -1, 1)
  def loss(p):
    return -jnp.mean(model.apply({"params": p}, ids, valid, targets,
                                 method=model.target_log_probs))
  tx = optax.adam(1e-2)
  @jax.jit
  def step(p, o):
    value, g = jax.value_and_grad(loss)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, value, g
  opt = tx.init(params)
  losses = []
  for _ in range(6):
    params, opt, value, g = step(params, opt)
    losses.append(float(value))
  assert losses[-1] < losses[0] - 0.1, losses
  frag = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g["embed"]["fuser"]["fragment"]))
  assert frag > 0
  with_table = jax.jit(lambda v, i: model.apply(v, i, valid)[0])
  chex.assert_trees_all_close(with_table(F.lm_table_variables(model, params), ids),
                              with_table({"params": params}, ids), atol=1e-5)


def test_the_ambiguous_set_counts_the_pairs_of_windows_as_of_their_stream():
  """Token pairs counted on the windows of a stream (in shards, as processes hold them)
  are the stream's, so every way of reading the data picks the same ambiguous set."""
  from fsqtok.data import lm_data  # pylint: disable=g-import-not-at-top
  texts = ["the cat sat on the mat. the dog sat on the log. " * 3, "a cat and a dog. " * 5]
  tok = FT.counted_tokenizer(texts, 300)
  stream = lm_data.token_stream(tok, texts)
  want = FT.next_token_pairs([stream], len(tok))
  rows = lm_data.training_rows(lm_data.windows(stream, 7, tok.pad_id, tok.bos_id))
  shards = [rows[:3], rows[3:]]  # the pairs of a stream split between two processes
  parts = [FT.next_token_pairs([part], len(tok), pad_id=tok.pad_id) for part in shards]
  got = FT.add_pairs(parts)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert got[1].sum() == stream.size - 1
  kw = dict(corpus_top_k=4, min_count=2)
  chosen = FT.ambiguous_ids(tok, [stream], **kw)
  assert FT.ambiguous_ids(tok, pairs=got, **kw) == chosen
  assert tok.token_to_id("[MASK]") in chosen and 1 < len(chosen) <= 5
  the = tok.encode(" the")
  assert len(the) == 1 and the[0] in chosen  # " the" is followed by 3 different words

