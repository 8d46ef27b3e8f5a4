"""fsqtok.models.bespoke: bucket assignment, exact parameter counts, gradients, tied output
layers; and a tiny run of experiments/bespoke_study.py."""
import json
import os

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import bespoke_study as study_config
from experiments import bespoke_study
from fsqtok.models import bespoke
from fsqtok.train import optimizer as optimizer_lib

D = 8


def _mass_before(counts):
  """Share of all occurrences taken by the tokens before each one (frequency order)."""
  counts = np.asarray(counts, np.int64)
  order = bespoke.frequency_order(counts)
  before = np.empty(counts.size)
  before[order] = (np.cumsum(counts[order]) - counts[order]) / max(counts.sum(), 1)
  before[counts == 0] = 1.0
  return before


def _zipf_counts(vocab=40, total=2000, zeros=5):
  counts = np.floor(total / np.arange(1, vocab + 1)).astype(np.int64)
  counts[-zeros:] = 0
  return np.random.default_rng(0).permutation(counts)  # ids are not frequency ranks


def test_buckets_follow_cumulative_mass():
  # 100 occurrences; masses before each token (frequency order): 0, .5, .8, .9, .95, .98, 1.
  counts = np.array([5, 0, 50, 3, 10, 2, 30])
  a = bespoke.assign_buckets(counts, (0.8, 0.95))
  assert a.bucket == (1, 2, 0, 2, 1, 2, 0)
  assert a.row == (1, 2, 0, 0, 0, 1, 1)
  assert a.rows == (2, 2, 3) and a.hashed == ()


@hypothesis.given(
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=60),
    thresholds=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=3).map(sorted))
def test_every_token_in_exactly_one_bucket_with_contiguous_rows(counts, thresholds):
  a = bespoke.assign_buckets(counts, thresholds)
  bucket_V, row_V = a.arrays()
  assert bucket_V.shape == row_V.shape == (len(counts),)
  assert sum(a.rows) == len(counts)  # one row per token: nothing shared, nothing unused
  before = _mass_before(counts)
  edges = [0.0] + list(thresholds)
  for b in range(a.num_buckets):
    members = np.flatnonzero(bucket_V == b)
    assert sorted(row_V[members]) == list(range(a.rows[b]))
    # The bucket is the first whose threshold exceeds the mass before the token.
    assert (before[members] >= edges[b]).all()
    if b < len(thresholds):
      assert (before[members] < thresholds[b]).all()
    # Within a bucket, rows follow frequency.
    by_row = members[np.argsort(row_V[members])]
    assert (np.diff(np.asarray(counts)[by_row]) <= 0).all()
  assert bucket_V[np.argmax(counts)] == 0 or max(counts) == 0
  np.testing.assert_array_equal(np.sort(a.flat_index()), np.arange(len(counts)))


@hypothesis.given(counts=st.lists(st.integers(0, 500), min_size=2, max_size=60),
                  hash_rows=st.integers(1, 8), hash_from=st.floats(0.95, 1.0))
def test_hashing_maps_the_rarest_tokens_into_the_shared_rows(counts, hash_rows, hash_from):
  a = bespoke.assign_buckets(counts, (0.8, 0.95), hash_rows=hash_rows, hash_from=hash_from)
  bucket_V, row_V = a.arrays()
  before = _mass_before(counts)
  hashed = np.asarray(a.hashed, np.int64)
  np.testing.assert_array_equal(hashed, np.flatnonzero(before >= hash_from))
  own = np.setdiff1d(np.arange(len(counts)), hashed)
  if hashed.size:
    assert (bucket_V[hashed] == a.num_buckets - 1).all()
    shared = min(hash_rows, hashed.size)
    own_last = int((bucket_V[own] == a.num_buckets - 1).sum())
    assert a.rows[-1] == own_last + shared
    assert set(row_V[hashed]) <= set(range(own_last, own_last + shared))
    if own.size:  # the hashed tokens are the rarest
      assert np.asarray(counts)[hashed].max() <= np.asarray(counts)[own].min()
  for b in range(a.num_buckets):  # own rows stay one per token, contiguous from 0
    members = own[bucket_V[own] == b]
    assert sorted(row_V[members]) == list(range(members.size))


def test_hashing_shares_rows():
  counts = _zipf_counts(vocab=40, zeros=12)
  a = bespoke.assign_buckets(counts, hash_rows=3, hash_from=0.99)
  assert len(a.hashed) >= 12 and sum(a.rows) == 40 - len(a.hashed) + 3


def test_assignment_errors():
  with pytest.raises(ValueError, match="increase"):
    bespoke.assign_buckets([3, 2, 1], (0.9, 0.5))
  with pytest.raises(ValueError, match="non-negative"):
    bespoke.assign_buckets([3, -2, 1])
  with pytest.raises(ValueError, match="hash_from"):
    bespoke.assign_buckets([3, 2, 1], (0.8, 0.95), hash_rows=2, hash_from=0.5)


def _embeddings(counts, hash_rows=0):
  a = bespoke.assign_buckets(counts, hash_rows=hash_rows, hash_from=0.97)
  widths = bespoke.bucket_widths(D)
  b = bespoke.BespokeEmbed(assignment=a, widths=widths, d_model=D)
  vocab = len(counts)
  return {"standard": bespoke.StandardEmbed(vocab_size=vocab, d_model=D), "bespoke": b,
          "matched": bespoke.FactorizedEmbed(
              vocab_size=vocab, d_model=D,
              width=bespoke.matched_width(vocab, D, b.param_count()))}


@pytest.mark.parametrize("hash_rows", [0, 4])
def test_shapes_and_exact_param_counts(hash_rows):
  counts = _zipf_counts()
  ids_BxT = jnp.arange(40).reshape(4, 10)
  modules = _embeddings(counts, hash_rows)
  for name, module in modules.items() if not hash_rows else [("bespoke", modules["bespoke"])]:
    params = module.init(jax.random.PRNGKey(0), ids_BxT)
    x_BxTxD = module.apply(params, ids_BxT)
    chex.assert_shape(x_BxTxD, (4, 10, D))
    chex.assert_shape(module.apply(params, x_BxTxD, method=module.attend), (4, 10, 40))
    assert optimizer_lib.count_params(params) == module.param_count(), name


def test_param_count_formula_and_empty_bucket():
  # One token holds 99% of the mass: the middle bucket is empty and gets no parameters.
  counts = np.array([990, 5, 3, 2])
  a = bespoke.assign_buckets(counts)
  assert a.rows == (1, 0, 3)
  widths = bespoke.bucket_widths(D)
  assert widths == (10, 8, 3)
  module = bespoke.BespokeEmbed(assignment=a, widths=widths, d_model=D)
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  assert set(params["params"]) == {"table_0", "proj_0", "table_2", "proj_2"}
  assert module.param_count() == optimizer_lib.count_params(params) == 1 * 10 + 10 * D + 3 * 3 + 3 * D


def test_matched_width_is_the_closest():
  for target in (100, 1234, 5000, 66_799):
    w = bespoke.matched_width(200, 128, target)
    best = min(range(1, 400),
               key=lambda v: abs(bespoke.factorized_param_count(200, v, 128) - target))
    assert abs(bespoke.factorized_param_count(200, w, 128) - target) == abs(
        bespoke.factorized_param_count(200, best, 128) - target)


@pytest.mark.parametrize("hash_rows", [0, 4])
def test_gradients_reach_every_bucket(hash_rows):
  counts = _zipf_counts()
  module = _embeddings(counts, hash_rows)["bespoke"]
  bucket_V, _ = module.assignment.arrays()
  ids_BxT = jnp.asarray([[np.flatnonzero(bucket_V == b)[0] for b in range(3)] * 2])
  params = module.init(jax.random.PRNGKey(0), ids_BxT)

  def input_loss(p, method):  # the embedding alone: only the batch's rows get gradient
    return jnp.sum(module.apply(p, ids_BxT, method=method) ** 2)

  def lm_loss(p):  # embed, then the tied output layer
    x_BxTxD = module.apply(p, ids_BxT)
    logits = module.apply(p, jnp.tanh(x_BxTxD), method=module.attend)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids_BxT[:, ::-1]).mean()

  for loss in (lambda p: input_loss(p, None),
               lambda p: input_loss(p, bespoke.BespokeEmbed.embed_per_token), lm_loss):
    grads = jax.grad(loss)(params)["params"]
    assert set(grads) == {f"{k}_{b}" for k in ("table", "proj") for b in range(3)}
    for name, g in grads.items():
      assert float(jnp.abs(g).max()) > 0, name
  # Through the embedding alone, rows of tokens not in the batch get no gradient.
  g0 = jax.grad(lambda p: input_loss(p, None))(params)["params"]["table_0"]
  _, row_V = module.assignment.arrays()
  used = {int(row_V[t]) for t in np.asarray(ids_BxT[0]) if bucket_V[t] == 0}
  for r in range(g0.shape[0]):
    assert (float(jnp.abs(g0[r]).max()) > 0) == (r in used)


@pytest.mark.parametrize("hash_rows", [0, 4, 6])
def test_two_ways_of_embedding_and_attending_agree(hash_rows):
  counts = _zipf_counts()
  module = _embeddings(counts, hash_rows)["bespoke"]
  if hash_rows == 6:  # 9 hashed tokens leave shared rows unused, the first among them
    _, row_V = module.assignment.arrays()
    first_shared = module.assignment.rows[-1] - hash_rows
    assert first_shared not in set(row_V[list(module.assignment.hashed)])
  ids_BxT = jnp.arange(40).reshape(2, 20)
  params = module.init(jax.random.PRNGKey(1), ids_BxT)
  x_BxTxD = jax.random.normal(jax.random.PRNGKey(2), (2, 20, D))
  chex.assert_trees_all_close(module.apply(params, ids_BxT),
                              module.apply(params, ids_BxT, method=module.embed_per_token),
                              atol=1e-6)
  chex.assert_trees_all_close(module.apply(params, x_BxTxD, method=module.attend),
                              module.apply(params, x_BxTxD, method=module.attend_per_bucket),
                              atol=1e-5)
  # ... and their gradients (the custom row gather against XLA's own scatter).
  def loss(p, method):
    return jnp.sum(jnp.sin(module.apply(p, x_BxTxD, method=method)))
  chex.assert_trees_all_close(jax.grad(loss)(params, module.attend),
                              jax.grad(loss)(params, module.attend_per_bucket), atol=1e-5)


def test_standard_attend_is_x_times_table_transposed():
  module = bespoke.StandardEmbed(vocab_size=30, d_model=D)
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  x_BxTxD = jax.random.normal(jax.random.PRNGKey(1), (3, 5, D))
  table = params["params"]["embed"]["embedding"]
  chex.assert_trees_all_close(module.apply(params, x_BxTxD, method=module.attend),
                              x_BxTxD @ table.T, atol=1e-6)


def test_unknown_embedding_and_config_argument():
  with pytest.raises(ValueError, match="Unknown embedding"):
    bespoke.embedding_from_config("huge", np.ones(5), D, None)
  with pytest.raises(ValueError, match="Unknown configs/bespoke_study.py argument"):
    study_config.get_config("huge")


def test_mean_ci95_uses_the_t_distribution():
  mean, half = bespoke_study.mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
  assert mean == 3.0 and half == pytest.approx(2.776 * np.sqrt(2.5) / np.sqrt(5), rel=1e-6)


def test_tiny_study_held_out_loss_falls(tmp_path):
  config = study_config.get_config("tiny")
  config.embeddings = ("bespoke",)  # one is enough here; each costs a compilation
  result = bespoke_study.run_study(config, str(tmp_path / "work"),
                                   publish_dir=str(tmp_path / "pub"), log=lambda *_: None)
  rows = result["rows"]
  assert [r["embedding"] for r in rows] == ["bespoke"]
  for r in rows:
    curve = np.asarray(r["val_curve"])  # evaluations x seeds, step 0 first
    assert curve.shape == (config.train.num_steps // config.train.eval_every + 1, 2)
    assert (curve.min(axis=0) < curve[0] - 0.3).all()
    assert (np.asarray(r["test_loss"]) < np.log(config.synthetic.vocab_size) - 0.3).all()
    assert r["embed_params"] == r["embed_params_initialised"]
  for d in ("work", "pub"):
    assert os.path.getsize(tmp_path / d / "bespoke_loss_vs_corpus.png") > 0
    with open(tmp_path / d / "bespoke_study.json", encoding="utf-8") as f:
      assert json.load(f)["rows"][0]["seeds"] == [0, 1]
  assert "| 1,000 | bespoke |" in (tmp_path / "work" / "bespoke_study.md").read_text()
