import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsqtok.models import generate as generate_lib
from fsqtok.models import embeddings as embeddings_lib
from fsqtok.models import lm as lm_lib

V = 40
CODES = tuple([-1] * 8 + list(range(100, 100 + V - 8)))


def _model(embedding="table", head="tied", **kw):
  args = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
              embedding=embedding, head=head, token_codes=CODES, levels=(8, 5, 5, 5))
  return lm_lib.TransformerLM(**{**args, **kw})


def _ids(b=2, t=9, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(3, V, (b, t)), jnp.int32)


COMBOS = [("table", "tied"), ("table", "dense"), ("code_factorized", "factorized"),
          ("code_factorized", "dense"), ("table", "factorized"), ("table_code", "tied")]


@pytest.mark.parametrize("embedding,head", COMBOS)
def test_shapes_and_log_probs_agree(embedding, head):
  model, ids = _model(embedding, head), _ids()
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  out, cache = model.apply({"params": params}, ids)
  assert cache is None
  logp = model.apply({"params": params}, out, ids, method=lm_lib.TransformerLM.token_log_probs)
  vocab = model.apply({"params": params}, out,
                      method=lambda m, o: m.output_head.vocab_log_probs(o))
  chex.assert_shape(logp, ids.shape)
  chex.assert_shape(vocab, (*ids.shape, V))
  chex.assert_trees_all_close(jnp.take_along_axis(vocab, ids[..., None], -1)[..., 0], logp,
                              atol=1e-5)
  total = jnp.exp(vocab).sum(-1)
  # A table head is a distribution over the vocabulary; the factorized head's mass is
  # spread over the whole code space, so the vocabulary gets at most all of it.
  assert jnp.all(total <= 1 + 1e-4) and (head == "factorized" or jnp.allclose(total, 1, atol=1e-4))


def test_flat_tokens_of_the_factorized_head_are_the_most_frequent_coded_ones():
  counts = tuple(np.random.RandomState(3).randint(0, 50, V))
  model = _model("table", "factorized_vocab", head_flat_tokens=6, token_counts=counts)
  ids = _ids()
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  coded = np.flatnonzero(np.asarray(CODES) >= 0)
  want = sorted(coded[np.lexsort((coded, -np.asarray(counts)[coded]))][:6])
  flat = embeddings_lib.flat_ids(model)
  assert list(flat) == want
  # 8 plain + 6 flat rows + "a code"; the head is still a distribution over the vocabulary.
  chex.assert_shape(params["output_head"]["top"]["kernel"], (32, 8 + 6 + 1))
  out, _ = model.apply({"params": params}, ids)
  vocab = model.apply({"params": params}, out,
                      method=lambda m, o: m.output_head.vocab_log_probs(o))
  chex.assert_trees_all_close(jnp.exp(vocab).sum(-1), jnp.ones(ids.shape), atol=1e-4)
  # A flat token's probability is its top row alone: the digit layers do not touch it.
  moved = jax.tree.map(lambda x: x, params)
  moved["output_head"]["mix"]["kernel"] = params["output_head"]["mix"]["kernel"] + 1.0
  vocab_moved = model.apply({"params": moved}, out,
                            method=lambda m, o: m.output_head.vocab_log_probs(o))
  chex.assert_trees_all_close(vocab_moved[..., list(flat)], vocab[..., list(flat)], atol=1e-5)
  rest = [i for i in coded if i not in flat]
  assert not np.allclose(vocab_moved[..., rest], vocab[..., rest], atol=1e-3)
  with pytest.raises(ValueError, match="token_counts"):
    _model("table", "factorized_vocab", head_flat_tokens=6).init(jax.random.PRNGKey(0), ids)
  with pytest.raises(ValueError, match="no token for the digits"):
    _model("table", "factorized_vocab", head_flat_tokens=len(coded),
           token_counts=counts).init(jax.random.PRNGKey(0), ids)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 30), min_size=1, max_size=30),
                  st.lists(st.booleans(), min_size=30, max_size=30))
def test_frequency_codes_band_the_tokens_by_rank(counts, mask):
  levels = (3, 2, 5)
  coded = np.asarray(mask[:len(counts)])
  codes = np.asarray(embeddings_lib.frequency_codes(counts, coded, levels))
  assert np.all((codes >= 0) == coded)
  assert len(set(codes[coded])) == coded.sum()  # one code each, inside the grid
  assert np.all(codes[coded] < np.prod(levels))
  # Most frequent first (ties to the lower id): the rank written first digit first.
  ids = np.flatnonzero(coded)
  order = ids[np.lexsort((ids, -np.asarray(counts)[ids]))]
  digits = [(codes[order] // b) % l for b, l in zip((1, 3, 6), levels)]
  assert list(digits[0] * 10 + digits[1] * 5 + digits[2]) == list(range(len(order)))


def test_frequency_codes_give_a_factorized_head_over_the_vocabulary():
  counts = np.random.RandomState(4).randint(0, 50, V)
  coded = np.asarray(CODES) >= 0
  codes = embeddings_lib.frequency_codes(counts, coded, (8, 5, 5, 5))
  model = _model("table", "factorized_vocab", token_codes=codes, head_flat_tokens=4,
                 token_counts=tuple(int(c) for c in counts))
  ids = _ids()
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  out, _ = model.apply({"params": params}, ids)
  vocab = model.apply({"params": params}, out,
                      method=lambda m, o: m.output_head.vocab_log_probs(o))
  chex.assert_trees_all_close(jnp.exp(vocab).sum(-1), jnp.ones(ids.shape), atol=1e-4)
  with pytest.raises(ValueError, match="do not fit"):
    embeddings_lib.frequency_codes(counts, np.ones(V, bool), (2, 3))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_cached_decoding_equals_the_full_forward(positions):
  model, ids = _model(positions=positions, max_len=32), _ids()
  params = model.init(jax.random.PRNGKey(1), ids)["params"]
  full = model.apply({"params": params}, ids, ids, method=lambda m, a, t: m.target_log_probs(
      a, None, t))
  cache = lm_lib.init_cache(model, 2, 12)

  @jax.jit
  def step(cache, tok_Bx1):
    out, cache = model.apply({"params": params}, tok_Bx1, cache=cache)
    return cache, model.apply({"params": params}, out, tok_Bx1,
                              method=lm_lib.TransformerLM.token_log_probs)

  steps = []
  for t in range(ids.shape[1]):
    cache, logp = step(cache, ids[:, t:t + 1])
    steps.append(logp)
  chex.assert_trees_all_close(jnp.concatenate(steps, 1), full, atol=1e-4)


def test_padding_and_the_future_never_change_a_result():
  model, ids = _model(), _ids(1, 7)
  params = {"params": model.init(jax.random.PRNGKey(2), ids)["params"]}
  logp = lambda a, valid: model.apply(params, a, valid, a, method=lm_lib.TransformerLM.target_log_probs)
  base = logp(ids, None)
  # Left padding with junk tokens marked invalid: the real tokens score the same.
  padded = jnp.concatenate([jnp.full((1, 5), 7, jnp.int32), ids], 1)
  valid = jnp.concatenate([jnp.zeros((1, 5), bool), jnp.ones((1, 7), bool)], 1)
  chex.assert_trees_all_close(logp(padded, valid)[:, 5:], base, atol=1e-4)
  # Causality: changing the last token changes nothing before it.
  changed = ids.at[0, -1].set((ids[0, -1] + 1) % V)
  out_a, _ = model.apply(params, ids)
  out_b, _ = model.apply(params, changed)
  chex.assert_trees_all_close(out_a[:, :-1], out_b[:, :-1], atol=1e-5)


def test_generation_greedy_matches_recomputation_and_stops_at_eos():
  model = _model()
  params = model.init(jax.random.PRNGKey(3), _ids())["params"]
  prompts = [[1, 5, 6, 9], [1]]
  out = generate_lib.generate(model, params, prompts, jax.random.PRNGKey(0),
                              max_new_tokens=12, eos_id=2, pad_id=0, temperature=0.0)
  forward = jax.jit(lambda ids, valid: model.apply({"params": params}, ids, valid)[0])
  for prompt, new in zip(prompts, out):
    seq = list(prompt)
    for _ in range(12):  # recompute the whole (right-padded, fixed-size) sequence each step
      ids = np.zeros((1, 16), np.int32)
      ids[0, :len(seq)] = seq
      logits = forward(ids, np.arange(16)[None] < len(seq))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
      if seq[-1] == 2:
        break
    assert new == seq[len(prompt):]
  # top_k=1 sampling is greedy, whatever the temperature.
  topk1 = generate_lib.generate(model, params, prompts, jax.random.PRNGKey(5), max_new_tokens=12,
                                eos_id=2, pad_id=0, temperature=1.3, top_k=1)
  assert topk1 == out


def test_next_token_log_probs_puts_only_the_last_position_through_a_factorized_head():
  """Generation's first draw after a long prompt: the same log p as the last position of
  the whole head, with memory that does not grow with the prompt (the factorized head
  scores [B, T, V, digits] at once)."""
  model = _model("table", "factorized")
  params = model.init(jax.random.PRNGKey(0), _ids())["params"]
  def last_log_probs(ids):
    out, _ = model.apply({"params": params}, ids)
    return model.apply({"params": params}, out, method=lm_lib.TransformerLM.next_token_log_probs)
  ids = _ids(t=64)
  whole = model.apply({"params": params}, model.apply({"params": params}, ids)[0],
                      method=lambda m, o: m.output_head.vocab_log_probs(o))
  chex.assert_trees_all_close(last_log_probs(ids), whole[:, -1], atol=1e-5)
  # what grows with the prompt is its activations, not the head's [T, V, ...] scores
  temp = lambda t: jax.jit(last_log_probs).lower(_ids(t=t)).compile().memory_analysis(
      ).temp_size_in_bytes
  assert temp(64) - temp(1) < 64 * V * 32 * 4


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = jnp.isfinite(generate_lib.filter_logits(logits, 0, 0.75))
  assert kept.tolist() == [[True, True, False, False]]
  kept = jnp.isfinite(generate_lib.filter_logits(logits, 0, 0.1))
  assert kept.tolist() == [[True, False, False, False]]
  kept = jnp.isfinite(generate_lib.filter_logits(logits, 2, 1.0))
  assert kept.tolist() == [[True, True, False, False]]


def test_bad_settings_are_clear_errors():
  with pytest.raises(ValueError, match="choose one of"):
    _model(embedding="nope").init(jax.random.PRNGKey(0), _ids())
  with pytest.raises(ValueError, match="attend"):
    _model("code_factorized", "tied").init(jax.random.PRNGKey(0), _ids())
  with pytest.raises(ValueError, match="divisible"):
    _model(num_heads=5).init(jax.random.PRNGKey(0), _ids())
  with pytest.raises(ValueError, match="at least one token"):
    generate_lib.generate(_model(), {}, [[]], jax.random.PRNGKey(0), max_new_tokens=2,
                          eos_id=2, pad_id=0)
  # learned positions: registers count, and nothing past max_len is silently clamped
  short = _model(positions="learned", max_len=8, num_registers=4)
  with pytest.raises(ValueError, match=r"12 positions \(4 registers and prefix vectors \+ 8 "
                                       r"tokens\) exceed the model's 8 learned positions"):
    short.init(jax.random.PRNGKey(0), _ids(t=8))
  params = short.init(jax.random.PRNGKey(0), _ids(t=4))["params"]
  with pytest.raises(ValueError, match=r"4 registers \+ prompt \(2\) \+ 3 steps"):
    generate_lib.generate(short, params, [[1, 5]], jax.random.PRNGKey(0), max_new_tokens=3,
                          eos_id=2, pad_id=0)


def test_bespoke_embedding_plugs_into_the_lm():
  counts = tuple(int(c) for c in 1000 // (1 + np.arange(V)))  # Zipf-like training counts
  model = _model("bespoke", "tied", token_counts=counts)
  ids = _ids()
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  assert {k for k in params["embed"]} >= {"table_0", "proj_0"}
  logp = model.apply({"params": params}, ids, None, ids, method=lm_lib.TransformerLM.target_log_probs)
  chex.assert_shape(logp, ids.shape)
  with pytest.raises(ValueError, match="training count"):
    _model("bespoke", "tied").init(jax.random.PRNGKey(0), ids)
