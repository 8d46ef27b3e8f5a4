"""Sampling from the language model: temperature, top-k, top-p, a length limit, EOS.

Prompts are left-padded into one batch; one call fills the key/value cache with them, then
a ``lax.while_loop`` decodes one token per step (static shapes, one compilation per
batch/prompt/length shape) until every row has produced EOS or the limit is reached.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fsqtok import lm as lm_lib


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Masks (to -inf) what top-k and nucleus (top-p) sampling exclude."""
  if top_k > 0:
    kth = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if 0.0 < top_p < 1.0:
    sorted_desc = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the first token).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff, -jnp.inf, logits_BxV)
  return logits_BxV


def sample_next(log_probs_BxV, rng, temperature: float, top_k: int, top_p: float):
  """One token per row: greedy at temperature 0, else sampled from the filtered logits."""
  if temperature <= 0.0:
    return jnp.argmax(log_probs_BxV, axis=-1).astype(jnp.int32)
  logits = filter_logits(log_probs_BxV / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id", "pad_id"))
def _generate(model, params, prompt_BxP, valid_BxP, rng, *, max_new_tokens, temperature,
              top_k, top_p, eos_id, pad_id):
  b, p = prompt_BxP.shape
  cache = lm_lib.init_cache(model, b, p + max_new_tokens)
  variables = {"params": params}
  out, cache = model.apply(variables, prompt_BxP, valid_BxP, cache=cache)
  last = model.apply(variables, out, method=lm_lib.TransformerLM.next_token_log_probs)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, last, done, tokens, rng = carry
    rng, sub = jax.random.split(rng)
    nxt = jnp.where(done, pad_id, sample_next(last, sub, temperature, top_k, top_p))
    tokens = tokens.at[:, i].set(nxt)
    out, cache = model.apply(variables, nxt[:, None], ~done[:, None], cache=cache)
    done = done | (nxt == eos_id)
    last = model.apply(variables, out, method=lm_lib.TransformerLM.next_token_log_probs)
    return i + 1, cache, last, done, tokens, rng

  carry = (jnp.int32(0), cache, last, jnp.zeros((b,), bool), tokens, rng)
  return jax.lax.while_loop(cond, body, carry)[4]


def generate(model: lm_lib.TransformerLM, params, prompts: Sequence[Sequence[int]], rng, *,
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
  """New token ids per prompt (without the prompt), stopping after EOS (included)."""
  if not prompts or any(len(q) == 0 for q in prompts):
    raise ValueError("Each prompt needs at least one token (e.g. [BOS]).")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  p = max(len(q) for q in prompts)
  if p + max_new_tokens > model.max_len and model.positions == "learned":
    raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's learned positions ({model.max_len}).")
  ids = np.full((len(prompts), p), pad_id, np.int32)
  valid = np.zeros((len(prompts), p), bool)
  for i, q in enumerate(prompts):
    ids[i, p - len(q):], valid[i, p - len(q):] = q, True
  out = np.asarray(_generate(model, params, jnp.asarray(ids), jnp.asarray(valid), rng,
                             max_new_tokens=max_new_tokens, temperature=float(temperature),
                             top_k=int(top_k), top_p=float(top_p), eos_id=int(eos_id),
                             pad_id=int(pad_id)))
  result = []
  for row in out.tolist():
    result.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
  return result
