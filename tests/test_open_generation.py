"""The factorized head over the whole code space, and sampling in it (generate_open)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsqtok.codec import model as codec_lib
from fsqtok.models import embeddings
from fsqtok.models import generate as generate_lib
from fsqtok.models import lm as lm_lib
from fsqtok.tokenizer.tokenizer import Tokenizer

LEVELS = (3, 2, 2)          # 12 codes: small enough to enumerate the whole code space
NUM_PLAIN = 4


def _head_over_everything():
  """A head whose vocabulary is 4 plain tokens + every one of the 12 codes."""
  codes = tuple([-1] * NUM_PLAIN + list(range(12)))
  head = embeddings.FactorizedHead(codes, LEVELS, width=8)
  h = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 8))
  return head, head.init(jax.random.PRNGKey(1), h), h


def test_the_head_is_a_distribution_over_plain_tokens_and_all_codes():
  head, variables, h = _head_over_everything()
  out = head.apply(variables, h)
  total = jnp.exp(head.apply(variables, out, method=head.vocab_log_probs)).sum(-1)
  chex.assert_trees_all_close(total, jnp.ones_like(total), atol=1e-5)


def test_digits_depend_on_the_digits_before_them():
  head, variables, h = _head_over_everything()
  out = head.apply(variables, h[:, :1])
  logp = head.apply(variables, out, method=head.vocab_log_probs)[:, 0, NUM_PLAIN:]
  # Under independent digits, p(code) would be a product of marginals: rank-1 over the
  # first digit x the rest. Conditioning makes the 3x4 table of probabilities rank > 1.
  table = np.exp(np.asarray(logp[0])).reshape(4, 3).T   # [first digit, other digits]
  assert np.linalg.matrix_rank(table, tol=1e-6) > 1


def test_samples_follow_the_head_distribution():
  head, variables, h = _head_over_everything()
  n = 20_000
  h_N = jnp.broadcast_to(h[0, 0], (n, 8))
  out = head.apply(variables, h_N)
  pick = lambda logits, r: generate_lib.sample_next(logits, r, 1.0, 0, 1.0)
  token, code = head.apply(variables, out, jax.random.PRNGKey(2), pick, method=head.sample)
  token, code = np.asarray(token), np.asarray(code)
  assert ((token >= 0) != (code >= 0)).all()           # exactly one of the two
  drawn = np.where(token >= 0, token, code + NUM_PLAIN)  # the vocabulary id drawn
  freq = np.bincount(drawn, minlength=16) / n
  probs = np.exp(np.asarray(head.apply(
      variables, jax.tree_util.tree_map(lambda x: x[:1, None], out),
      method=head.vocab_log_probs)))[0, 0]
  assert 0.5 * np.abs(freq - probs).sum() < 0.02       # total variation distance


def _setup(vocab_codes):
  learned = ["ab", "cd", "ef"]
  tok = Tokenizer(learned, codes=vocab_codes)
  codec = codec_lib.Codec(levels=LEVELS, max_len=4, embed_dim=8, enc_channels=(),
                          enc_strides=(), dec_channels=(), dec_strides=(), pooling="flatten",
                          enc_mlp_dim=16, dec_mlp_dim=16)
  codec_params = codec.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.uint8),
                            jnp.ones((1,), jnp.int32))["params"]
  model = lm_lib.TransformerLM(
      vocab_size=len(tok), d_model=16, num_layers=1, num_heads=2, mlp_dim=32, head="factorized",
      token_codes=tuple(tok.id_to_code(i) for i in range(len(tok))), levels=LEVELS)
  params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 4), jnp.int32))["params"]
  # Make codes likely, so a short run samples codes in and outside the vocabulary.
  top = params["output_head"]["top"]
  params["output_head"]["top"]["bias"] = top["bias"].at[-1].set(8.0)
  return tok, codec, codec_params, model, params


@pytest.mark.slow
def test_open_generation_decodes_codes_outside_the_vocabulary_with_the_codec():
  tok, codec, codec_params, model, params = _setup([0, 5, 11])
  prompts = [[tok.bos_id], [tok.bos_id, tok.token_to_id("ab")]]
  res = generate_lib.generate_open(model, params, tok, codec, codec_params, prompts,
                                   jax.random.PRNGKey(4), max_new_tokens=12)
  again = generate_lib.generate_open(model, params, tok, codec, codec_params, prompts,
                                     jax.random.PRNGKey(4), max_new_tokens=12)
  assert [r["ids"] for r in res] == [r["ids"] for r in again]   # seeded
  vocab_of_code = {tok.id_to_code(i): i for i in tok.learned_ids}
  kinds = set()
  for r in res:
    assert tok.decode(r["ids"]).encode("utf-8") == r["bytes"] or b"\xef\xbf\xbd" in (
        tok.decode(r["ids"]).encode("utf-8"))
    assert b"".join(s[2] for s in r["steps"]) == r["bytes"]
    for kind, code, data in r["steps"]:
      kinds.add(kind)
      if kind == "vocab_code":
        assert data == tok.token_bytes(vocab_of_code[code])
      elif kind == "open_code":
        assert code not in vocab_of_code
        logits = codec.apply({"params": codec_params}, codec.fsq.indices_to_codes(
            jnp.asarray([code])), method=codec_lib.Codec.decode)
        b, n = codec_lib.greedy_decode(logits)
        n = max(int(n[0]), 1)
        assert data == bytes(np.asarray(b[0, :n]).tolist())
    assert r["codes"] == sum(k != "token" for k, _, _ in r["steps"])
    assert r["open_codes"] == sum(k == "open_code" for k, _, _ in r["steps"])
  assert {"vocab_code", "open_code"} <= kinds


def test_open_generation_stops_at_eos_and_needs_a_factorized_head():
  tok, codec, codec_params, model, params = _setup([0, 5, 11])
  top = params["output_head"]["top"]
  plain_rows = np.flatnonzero(np.asarray(model.token_codes) < 0)
  eos_row = int(np.flatnonzero(plain_rows == tok.eos_id)[0])
  params["output_head"]["top"]["bias"] = jnp.full_like(top["bias"], -30.0).at[eos_row].set(30.0)
  res = generate_lib.generate_open(model, params, tok, codec, codec_params, [[tok.bos_id]],
                                   jax.random.PRNGKey(0), max_new_tokens=6)
  assert res[0]["ids"] == [tok.eos_id] and res[0]["steps"][0][0] == "token"
  with pytest.raises(ValueError, match="factorized head"):
    table = lm_lib.TransformerLM(vocab_size=len(tok), d_model=16, num_layers=1, num_heads=2,
                                 mlp_dim=32)
    generate_lib.generate_open(table, {}, tok, codec, codec_params, [[1]],
                               jax.random.PRNGKey(0), max_new_tokens=2)


def _partial_vocab_head(flat_ids=()):
  """4 plain tokens + 5 of the 12 codes, with vocab_only digit masks (``flat_ids``: coded
  tokens with their own top row)."""
  codes = tuple([-1] * NUM_PLAIN + [0, 5, 7, 8, 11])
  head = embeddings.FactorizedHead(codes, LEVELS, width=8, vocab_only=True, flat_ids=flat_ids)
  h = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 8))
  return head, head.init(jax.random.PRNGKey(1), h), h, codes


def test_vocab_digit_tables_match_brute_force():
  codes = np.array([-1, -1, 0, 5, 7, 8, 11])
  plain, digits = embeddings.code_layout(codes, LEVELS)
  allowed, next_token = embeddings.vocab_digit_tables(plain, digits, LEVELS)
  for t in np.flatnonzero(codes >= 0):
    for d in range(len(LEVELS)):
      for x in range(max(LEVELS)):
        match = [u for u in np.flatnonzero(codes >= 0)
                 if (digits[u, :d] == digits[t, :d]).all() and digits[u, d] == x]
        assert allowed[t, d, x] == bool(match)
        assert next_token[t, d, x] == (match[0] if match else -1)


@pytest.mark.parametrize("flat_ids", [(), (NUM_PLAIN + 1, NUM_PLAIN + 4)])
def test_vocab_only_head_is_a_distribution_over_the_vocabulary_and_samples_from_it(flat_ids):
  head, variables, h, codes = _partial_vocab_head(flat_ids)
  out = head.apply(variables, h)
  total = jnp.exp(head.apply(variables, out, method=head.vocab_log_probs)).sum(-1)
  chex.assert_trees_all_close(total, jnp.ones_like(total), atol=1e-5)
  n = 20_000
  out_n = head.apply(variables, jnp.broadcast_to(h[0, 0], (n, 8)))
  pick = lambda logits, r: generate_lib.sample_next(logits, r, 1.0, 0, 1.0)
  token, code = map(np.asarray, head.apply(variables, out_n, jax.random.PRNGKey(2), pick,
                                           method=head.sample))
  spelled = {c for i, c in enumerate(codes) if c >= 0 and i not in flat_ids}
  assert set(code[code >= 0]) <= spelled   # never a code outside it, nor a flat token's
  assert set(token[token >= 0]) <= set(range(NUM_PLAIN)) | set(flat_ids)
  id_of = {c: i for i, c in enumerate(codes) if c >= 0}
  drawn = np.array([t if t >= 0 else id_of[c] for t, c in zip(token, code)])
  freq = np.bincount(drawn, minlength=len(codes)) / n
  probs = np.exp(np.asarray(head.apply(
      variables, jax.tree_util.tree_map(lambda x: x[:1, None], out_n),
      method=head.vocab_log_probs)))[0, 0]
  assert 0.5 * np.abs(freq - probs).sum() < 0.02


def test_generate_draws_a_vocab_only_head_digit_by_digit_from_its_distribution():
  """`generate` samples a ``factorized_vocab`` head through its digits (one small softmax
  per dimension) at temperature 1 without top-k/top-p: the first tokens of 20,000 draws
  follow the distribution it would otherwise score over the whole vocabulary; anything
  that reshapes that distribution keeps the scoring path."""
  codes = tuple([-1] * NUM_PLAIN + [0, 2, 3, 5, 7, 8, 11])  # 7 of the 12 codes, 1 flat
  model = lm_lib.TransformerLM(
      vocab_size=len(codes), d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
      head="factorized_vocab", token_codes=codes, levels=LEVELS, head_flat_tokens=1,
      token_counts=tuple(range(len(codes))))
  params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 4), jnp.int32))["params"]
  assert generate_lib.samples_digit_by_digit(model, 1.0, 0, 1.0)
  assert not any(generate_lib.samples_digit_by_digit(model, *a)
                 for a in ((0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9)))
  n, prompt = 20_000, [1, 2]
  drawn = np.array(generate_lib.generate(model, params, [prompt] * n, jax.random.PRNGKey(0),
                                         max_new_tokens=1, eos_id=-1, pad_id=0))[:, 0]
  out, _ = model.apply({"params": params}, jnp.asarray([prompt]))
  probs = np.exp(np.asarray(model.apply(
      {"params": params}, jax.tree_util.tree_map(lambda x: x[:, -1:], out),
      method=lm_lib.TransformerLM.next_token_log_probs)))[0]
  assert abs(probs.sum() - 1) < 1e-4
  freq = np.bincount(drawn, minlength=len(codes)) / n
  assert 0.5 * np.abs(freq - probs).sum() < 0.02
  longer = generate_lib.generate(model, params, [prompt], jax.random.PRNGKey(1),
                                 max_new_tokens=6, eos_id=-1, pad_id=0)[0]
  assert len(longer) == 6 and all(0 <= t < len(codes) for t in longer)
