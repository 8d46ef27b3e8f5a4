"""Registers, segments, pooling heads, soft prompts and token pruning (issue 7)."""
import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import token_techniques as tt_config
from fsqtok.models import classifier as clf
from fsqtok.models import generate as generate_lib
from fsqtok.models import lm as lm_lib
from fsqtok.models import soft_prompt
from fsqtok.studies import token_importance
from fsqtok.studies import token_roles
from fsqtok.tokenizer import baselines
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train.optimizer import adamw_config

V = 40


def _model(**kw):
  args = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=64)
  return lm_lib.TransformerLM(**{**args, **kw})


def _ids(b=2, t=9, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(3, V, (b, t)), jnp.int32)


def _init(model, ids=None):
  return jax.jit(model.init)(jax.random.PRNGKey(0), _ids() if ids is None else ids)["params"]


@functools.lru_cache(maxsize=None)
def _jitted(model, method, names):
  return jax.jit(lambda p, a, k: model.apply({"params": p}, *a, method=method,
                                             **dict(zip(names, k))))


def _apply(model, params, *args, method=None, **kw):
  """``model.apply`` under jit, one compilation per model, method and shapes (much faster
  than op-by-op for these tiny models)."""
  names = tuple(sorted(kw))
  return _jitted(model, method, names)(params, args, tuple(kw[n] for n in names))


# Registers ---------------------------------------------------------------------------


def test_registers_are_attended_but_never_outputs_and_cached_decoding_agrees():
  model, ids = _model(num_registers=3), _ids()
  params = _init(model, ids)
  chex.assert_shape(params["registers"], (3, 32))
  h, _, attn = _apply(model, params, ids, method=lm_lib.TransformerLM.hidden)
  chex.assert_shape(h, (2, 9, 32))
  chex.assert_shape(attn[0], (2, 4, 12, 12))  # the registers' rows and columns come first
  # The registers matter: zeroing them changes the outputs.
  zeroed = {**params, "registers": jnp.zeros_like(params["registers"])}
  assert not np.allclose(_apply(model, zeroed, ids, method=lm_lib.TransformerLM.hidden)[0], h,
                         atol=1e-4)
  # With a cache, the registers are written once (first call) and decoding step by step
  # equals the whole-sequence forward.
  full = _apply(model, params, ids, None, ids, method=lm_lib.TransformerLM.target_log_probs)
  cache = lm_lib.init_cache(model, 2, 9)
  assert cache["valid"].shape == (2, 12) and lm_lib.PREFIX_PENDING in cache

  @jax.jit
  def step(cache, tok_Bx1):
    o, cache = model.apply({"params": params}, tok_Bx1, cache=cache)
    return cache, model.apply({"params": params}, o, tok_Bx1,
                              method=lm_lib.TransformerLM.token_log_probs)

  steps = []
  for t in range(ids.shape[1]):
    cache, logp = step(cache, ids[:, t:t + 1])
    assert lm_lib.PREFIX_PENDING not in cache
    steps.append(logp)
  assert int(cache["index"]) == 12
  chex.assert_trees_all_close(jnp.concatenate(steps, 1), full, atol=1e-4)


def test_generation_with_registers_matches_recomputation_and_stops_at_eos():
  model = _model(num_registers=2)
  params = _init(model)
  prompts = [[1, 5, 6, 9], [1]]
  out = generate_lib.generate(model, params, prompts, jax.random.PRNGKey(0),
                              max_new_tokens=8, eos_id=2, pad_id=0, temperature=0.0)
  forward = jax.jit(lambda ids, valid: model.apply({"params": params}, ids, valid)[0])
  for prompt, new in zip(prompts, out):
    seq = list(prompt)
    for _ in range(8):
      ids = np.zeros((1, 12), np.int32)
      ids[0, :len(seq)] = seq
      seq.append(int(jnp.argmax(forward(ids, np.arange(12)[None] < len(seq))[0, len(seq) - 1])))
      if seq[-1] == 2:  # EOS ends generation
        break
    assert new == seq[len(prompt):]


def test_first_token_attention_share_on_known_weights():
  # One layer, one head, 3 tokens after 1 register; queries 1 and 2 (after the first real
  # token) give the first real token 0.5 and 0.25, the register 0.25 and 0.5.
  w = np.zeros((1, 1, 4, 4))
  w[0, 0, 0, 0] = 1
  w[0, 0, 1, :2] = [0.5, 0.5]
  w[0, 0, 2, :3] = [0.25, 0.5, 0.25]
  w[0, 0, 3, :4] = [0.5, 0.25, 0.125, 0.125]
  share = token_importance.first_token_attention_share([w], np.ones((1, 3), bool), 1)
  assert share["first_token"][0] == pytest.approx((0.5 + 0.25) / 2)
  assert share["prefix"][0] == pytest.approx((0.25 + 0.5) / 2)


# Special-token roles ---------------------------------------------------------------


def test_roles_are_added_to_a_tokenizer_that_lacks_them_and_mlm_spares_specials():
  tok = token_roles.WithRoles(baselines.ByteTokenizer())
  assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.vocab_size) == (259, 260, 261, 262)
  assert tok.ordinary_range == (0, 256)
  ids, valid, seg = token_roles.pack_pair(tok, [10, 11, 12], [20, 21], 9)
  assert ids.tolist() == [257, 10, 11, 12, 260, 20, 21, 259, 256]
  assert seg.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0] and valid.sum() == 8
  ids, _, _ = token_roles.pack_pair(tok, list(range(10)), [50], 8)  # the longer one is cut
  assert ids.tolist() == [257, 0, 1, 2, 3, 260, 50, 259]
  batch = token_roles.pack_batch([token_roles.pack_single(tok, list(range(40, 80)), 48)] * 64)
  inputs, chosen = token_roles.mlm_corrupt(jax.random.PRNGKey(0), tok, jnp.asarray(batch["ids"]),
                                           jnp.asarray(batch["valid"]), rate=0.5)
  special = np.isin(batch["ids"], tok.special_ids) | ~batch["valid"]
  assert not np.any(np.asarray(chosen) & special)
  frac_mask = float(np.mean(np.asarray(inputs)[np.asarray(chosen)] == tok.mask_id))
  assert 0.7 < frac_mask < 0.9  # 80% of the chosen become [MASK]
  with pytest.raises(ValueError, match="max_len"):
    token_roles.pack_single(tok, [1], 2)


def test_fsqtoks_own_tokenizer_keeps_its_role_ids_and_its_specials_are_never_masked():
  from fsqtok.tokenizer.tokenizer import Tokenizer
  base = Tokenizer(["ab", "cd"])
  tok = token_roles.WithRoles(base)
  assert tok.vocab_size == base.vocab_size  # no id added: it has [CLS] [SEP] [MASK]
  assert (tok.cls_id, tok.sep_id, tok.mask_id) == tuple(base.token_to_id(r) for r in token_roles.ROLES)
  assert set(tok.special_ids) == {base.token_to_id(s) for s in base.special_tokens}
  assert not set(range(*tok.ordinary_range)) & set(tok.special_ids)


def test_pooling_ignores_padding_whatever_is_under_it():
  rs = np.random.RandomState(0)
  h = jnp.asarray(rs.randn(2, 6, 8), jnp.float32)
  ids = jnp.asarray([[1, 5, 9, 4, 0, 0], [1, 9, 5, 5, 9, 4]])
  valid = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  junk = h.at[0, 4:].set(100.0)  # different values under the padding
  pool = clf.AttentionPool()
  pool_params = pool.init(jax.random.PRNGKey(0), h, valid)
  for f in (lambda x: clf.cls_pool(x, ids, valid, 4), lambda x: clf.mean_pool(x, valid),
            lambda x: pool.apply(pool_params, x, valid)):
    chex.assert_trees_all_close(f(h), f(junk), atol=1e-6)
  chex.assert_trees_all_close(clf.cls_pool(h, ids, valid, 4), h[jnp.arange(2), jnp.asarray([3, 5])])
  chex.assert_trees_all_close(clf.mean_pool(h, valid)[0], h[0, :4].mean(0), atol=1e-6)


def test_padding_never_changes_a_classifier_output():
  tok = token_roles.WithRoles(baselines.ByteTokenizer())
  lm = lm_lib.TransformerLM(vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=2,
                            mlp_dim=32, num_segments=2, num_registers=1)
  head = clf.SequenceClassifier(lm, 3, "attention", tok.cls_id)
  a = token_roles.pack_batch([token_roles.pack_pair(tok, [1, 2, 3], [4, 5], 8),
                              token_roles.pack_pair(tok, [7], [8, 9, 10], 8)])
  b = token_roles.pack_batch([token_roles.pack_pair(tok, [1, 2, 3], [4, 5], 13),
                              token_roles.pack_pair(tok, [7], [8, 9, 10], 13)])
  b["ids"][:, 8:] = 77  # junk under the padding: it must not matter either
  params = jax.jit(head.init)(jax.random.PRNGKey(1), a["ids"], a["valid"],
                             a["segments"])["params"]
  run = lambda d: _apply(head, params, d["ids"], d["valid"], d["segments"])
  chex.assert_trees_all_close(run(a), run(b), atol=1e-5)
  # The segments are used: swapping them changes the result.
  assert not np.allclose(run(a), run({**a, "segments": 1 - a["segments"]}), atol=1e-5)
  # The verbalizer reads the last real token: padding does not matter there either.
  lm_params = params["lm"]
  verbal = jax.jit(lambda i, v: clf.verbalizer_logits(lm, lm_params, i, v, (3, 4)))
  chex.assert_trees_all_close(verbal(a["ids"], a["valid"]), verbal(b["ids"], b["valid"]),
                              atol=1e-5)


def test_bad_settings_are_clear_errors():
  # Only traced (eval_shape): the errors come before any computation.
  shapes = lambda model: jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), _ids())["params"])
  params = shapes(_model())
  with pytest.raises(ValueError, match="num_segments"):
    jax.eval_shape(lambda p: _model().apply({"params": p}, _ids(),
                                            segments_BxT=jnp.zeros((2, 9), jnp.int32)), params)
  with pytest.raises(ValueError, match="prefix_BxKxD"):
    jax.eval_shape(lambda p: _model().apply({"params": p}, _ids(),
                                            prefix_BxKxD=jnp.zeros((2, 3, 8))), params)
  with pytest.raises(ValueError, match="cls_id"):
    jax.eval_shape(lambda: clf.SequenceClassifier(_model(), 2, "cls").init(
        jax.random.PRNGKey(0), _ids(), jnp.ones((2, 9), bool)))
  with pytest.raises(ValueError, match="prune_layer"):
    shapes(_model(prune_layer=2))
  with pytest.raises(ValueError, match="prune_keep"):
    shapes(_model(prune_layer=1, prune_keep=0.0))
  with pytest.raises(ValueError, match="Unknown configs"):
    tt_config.get_config("huge")


# Soft prompts ------------------------------------------------------------------------


def _task(n=32, t=8, seed=0):
  """Class 0: tokens 3..19; class 1: tokens 20..39."""
  rs = np.random.RandomState(seed)
  labels = rs.randint(0, 2, n).astype(np.int32)
  ids = np.where(labels[:, None] == 0, rs.randint(3, 20, (n, t)), rs.randint(20, V, (n, t)))
  return {"ids": ids.astype(np.int32), "valid": np.ones((n, t), bool), "labels": labels}


def test_soft_prompt_trains_only_the_prompt_and_round_trips(tmp_path):
  model = _model()
  base = _init(model)
  prompt = soft_prompt.init_prompt(jax.random.PRNGKey(1), 4, 32)
  params = soft_prompt.combine(base, prompt)
  apply = lambda p, b: clf.verbalizer_logits(model, p["lm"], b["ids"], b["valid"], (5, 25),
                                             soft_prompt.prefix(p, b["ids"].shape[0]))
  tx = soft_prompt.make_optimizer(adamw_config(5e-2, 2, weight_decay=0.0), 30, params)
  data = _task()
  new, losses = clf.fit(apply, params, tx, clf.batch_iterator(data, 16, 0), 30, progress=False)
  chex.assert_trees_all_equal(new["lm"], base)  # bit-identical base model
  assert not np.allclose(new["prompt"]["vectors"], prompt["vectors"])
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
  assert optimizer_lib.count_params(params, soft_prompt.FROZEN) == 4 * 32
  # Save / load: the same prompt, the same logits; clear errors when it does not fit.
  soft_prompt.save(str(tmp_path / "p"), new["prompt"], {"task": "toy"})
  loaded, meta = soft_prompt.load(str(tmp_path / "p"), d_model=32, length=4)
  assert meta["task"] == "toy" and meta["length"] == 4
  chex.assert_trees_all_equal(loaded, new["prompt"])
  with pytest.raises(ValueError, match="d_model is 64"):
    soft_prompt.load(str(tmp_path / "p"), d_model=64)
  with pytest.raises(ValueError, match="4 vectors, 8 were expected"):
    soft_prompt.load(str(tmp_path / "p"), d_model=32, length=8)
  with pytest.raises(FileNotFoundError, match="No soft prompt"):
    soft_prompt.load(str(tmp_path / "nothing"), d_model=32)
  with pytest.raises(ValueError, match="combine"):
    soft_prompt.make_optimizer(adamw_config(1e-2, 1), 2, base)


def test_a_soft_prompt_through_the_cache_equals_the_whole_forward():
  model = _model(num_registers=1)
  params = _init(model)
  ids = _ids(2, 5)
  pre = soft_prompt.prefix({"prompt": soft_prompt.init_prompt(jax.random.PRNGKey(2), 3, 32)}, 2)
  full = _apply(model, params, ids, None, ids, prefix_BxKxD=pre,
                method=lm_lib.TransformerLM.target_log_probs)

  @jax.jit
  def two_calls(ids):  # a 2-token prompt with the soft prompt, then 3 more tokens
    cache = lm_lib.init_cache(model, 2, 5, prefix_len=3)
    out, cache = model.apply({"params": params}, ids[:, :2], cache=cache, prefix_BxKxD=pre)
    out2, cache = model.apply({"params": params}, ids[:, 2:], cache=cache)
    logp = model.apply({"params": params}, jnp.concatenate([out, out2], 1), ids,
                       method=lm_lib.TransformerLM.token_log_probs)
    return logp, cache

  logp, cache = two_calls(ids)
  chex.assert_trees_all_close(logp, full, atol=1e-4)
  with pytest.raises(ValueError, match="first call"):
    model.apply({"params": params}, ids[:, 2:], cache=cache, prefix_BxKxD=pre)
  # a cache without room for the prompt would have its last slots overwritten
  with pytest.raises(ValueError, match=r"kept room for 1: make it with init_cache\(\.\.\., "
                                       r"prefix_len=3\)"):
    model.apply({"params": params}, ids[:, :2], cache=lm_lib.init_cache(model, 2, 5),
                prefix_BxKxD=pre)


# Token pruning -----------------------------------------------------------------------


def test_keeping_everything_is_the_unpruned_model():
  model = _model()
  params = _init(model)
  ids = _ids(2, 10)
  full = _apply(model, params, ids, None, ids, method=lm_lib.TransformerLM.target_log_probs)
  # (The norm score here, attention received in the next test; the study runs both.)
  kept_all = model.clone(prune_layer=1, prune_keep=1.0, prune_score="norm")
  # The head on the last 3 positions only: the same log-probs there.
  last = _apply(kept_all, params, ids, None, ids[:, -3:],
                method=lm_lib.TransformerLM.target_log_probs_last)
  chex.assert_trees_all_close(last, full[:, -3:], atol=1e-5)


def test_pruning_keeps_static_counts_the_tail_and_the_registers():
  model = _model(num_registers=2, prune_layer=1, prune_keep=0.5,
                 prune_score="attention", prune_keep_last=3)
  params = _init(model)
  ids, valid = _ids(2, 12), np.ones((2, 12), bool)
  valid[1, 9:] = False  # row 1 is right-padded: padding goes before any real token
  fn = jax.jit(lambda p, i, v: model.apply({"params": p}, i, v, mutable=["intermediates"]))
  (out, _), inter = fn(params, ids, valid)
  chex.assert_shape(out, (2, 12, V))
  kept = np.asarray(inter["intermediates"]["kept"][0])
  n_kept = token_importance.num_kept(14, 2, 0.5, 3)
  assert n_kept == 2 + 6 and kept.sum(1).tolist() == [n_kept, n_kept]
  assert kept[:, :2].all() and kept[:, -3:].all()  # registers and the scored tail
  # Row 1's forced tail is padding; the 3 other places go to real tokens, never padding.
  assert kept[1, 2:2 + 9].sum() == n_kept - 2 - 3
  # Pruning changes what the tail sees (it is not a no-op) but not the shapes.
  unpruned = _apply(model.clone(prune_layer=0), params, ids, valid)[0]
  assert not np.allclose(out[0, -1], unpruned[0, -1], atol=1e-5)
  with pytest.raises(ValueError, match="key/value cache"):
    model.apply({"params": params}, ids[:, :1], cache=lm_lib.init_cache(model, 2, 4))


def test_pruning_study_reports_the_positions_the_model_kept():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fsqtok.studies import token_techniques  # pylint: disable=g-import-not-at-top
  model = _model(num_registers=2)
  params = _init(model)
  t, tail = 12, 3
  ids = np.asarray(_ids(4, t + 1, seed=3))
  data = types.SimpleNamespace(val={"inputs": ids[:, :-1], "targets": ids[:, 1:],
                                    "valid": np.ones((4, t), bool),
                                    "weights": np.ones((4, t), np.float32)})
  config = ml_collections.ConfigDict({"progress_bar": False, "pruning": {
      "layer": 1, "keep_ratios": (1.0, 0.5), "scores": ("norm",), "tail": tail,
      "windows": 4, "batch_size": 2, "timing_rounds": 1}})
  byte_lengths = np.full(V, 2)
  rows = {r["score"]: r for r in token_techniques.pruning_study(config, model, params, data,
                                                                 byte_lengths)}
  # the model keeps its 2 registers + half of the 12 tokens: 6 token positions
  assert rows["none"]["kept_positions"] == t and rows["norm"]["kept_positions"] == 6
  assert token_importance.num_kept(t + 2, 2, 0.5, tail) - 2 == 6
  # unpruned: the tail's bits per byte of the whole forward
  logp = _apply(model, params, jnp.asarray(ids[:, :-1]), None, jnp.asarray(ids[:, 1:]),
                method=lm_lib.TransformerLM.target_log_probs)
  expected = -np.asarray(logp)[:, -tail:].sum() / np.log(2) / (4 * tail * 2)
  np.testing.assert_allclose(rows["none"]["tail_bits_per_byte"], expected, rtol=1e-5)
  assert rows["none"]["bpb_increase"] == 0.0 and rows["norm"]["time_ratio"] > 0


def test_attention_received_counts_only_the_queries_that_can_see_a_key():
  mask = np.tril(np.ones((3, 3), bool))[None]
  w = np.zeros((1, 2, 3, 3))
  w[:, :, 0, 0] = 1.0
  w[:, :, 1, :2] = 0.5
  w[:, :, 2, :] = [0.2, 0.2, 0.6]
  got = token_importance.attention_received(jnp.asarray(w), jnp.asarray(mask))
  np.testing.assert_allclose(got[0], [(1 + 0.5 + 0.2) / 3, (0.5 + 0.2) / 2, 0.6], rtol=1e-6)
  kept = token_importance.select_kept(jnp.asarray([[5.0, 1.0, 3.0, 0.0, 2.0]]),
                                      jnp.asarray([[True, True, True, True, False]]),
                                      num_prefix=0, keep=0.6, keep_last=1)
  assert kept.tolist() == [[0, 2, 4]]  # top score, next best real token, the last position


def test_tiny_config_builds_the_model_of_the_study():
  c = tt_config.get_config("tiny")
  model = lm_lib.lm_from_config(c.lm.model, 300)
  assert model.num_registers == 0 and model.prune_layer == 0
  assert c.pruning.layer < c.lm.model.num_layers
  assert len(c.task.label_words) == len(c.corpora.split(","))
