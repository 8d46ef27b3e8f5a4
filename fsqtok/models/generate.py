"""Sampling from the language model: temperature, top-k, top-p, a length limit, EOS.

Prompts are left-padded into one batch; one call fills the key/value cache with them, then
a ``lax.while_loop`` decodes one token per step (static shapes, one compilation per
batch/prompt/length shape) until every row has produced EOS or the limit is reached.
`generate` samples vocabulary tokens (a ``factorized_vocab`` head digit by digit when
nothing reshapes its distribution); `generate_open` samples a factorized head's whole
code space and decodes codes outside the vocabulary through the codec decoder.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fsqtok.codec import model as codec_lib
from fsqtok.models import embeddings as embeddings_lib
from fsqtok.models import fuser as fuser_lib
from fsqtok.models import lm as lm_lib


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


def inference_variables(model: lm_lib.TransformerLM, params) -> dict:
  """The variables an LM samples with: ``{"params": params}``, plus, for a ``per_id``
  fuser embedding, its per-id table computed once (`fsqtok.models.fuser.lm_table_variables`)
  so that no decode step runs the fragment encoder."""
  if model.embedding == "fuser" and fuser_lib.lm_spec(model).design == "per_id":
    return fuser_lib.lm_table_variables(model, params)
  return {"params": params}


def samples_digit_by_digit(model, temperature: float, top_k: int, top_p: float) -> bool:
  """Whether `generate` draws from a ``factorized_vocab`` head digit by digit (its
  `FactorizedHead.sample`: one small softmax per FSQ dimension) instead of scoring every
  vocabulary token each step. The two are the same distribution over the vocabulary, so
  it does so whenever nothing reshapes that distribution (temperature 1, no top-k/top-p)."""
  return (model.head == "factorized_vocab" and temperature == 1.0 and top_k == 0
          and not 0.0 < top_p < 1.0)


def _code_lookup(codes_V) -> tuple[jax.Array, jax.Array]:
  """``(codes_C, ids_C)``: the codes of the ids that have one (>= 0), sorted (for
  ``searchsorted``), and those ids."""
  codes_V = np.asarray(codes_V, np.int64)
  has = np.flatnonzero(codes_V >= 0)
  order = np.argsort(codes_V[has])
  return jnp.asarray(codes_V[has][order], jnp.int32), jnp.asarray(has[order], jnp.int32)


def _spelled_vocabulary(model):
  """`_code_lookup` of the codes a factorized head's digits spell (its flat ids have none)."""
  codes = np.array(model.token_codes, np.int64)
  codes[list(embeddings_lib.flat_ids(model))] = -1
  return _code_lookup(codes)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id", "pad_id"))
def _generate(model, variables, prompt_BxP, valid_BxP, rng, *, max_new_tokens, temperature,
              top_k, top_p, eos_id, pad_id):
  b, p = prompt_BxP.shape
  by_digits = samples_digit_by_digit(model, temperature, top_k, top_p)
  if by_digits:
    codes_C, ids_C = _spelled_vocabulary(model)
    pick = lambda logits, r: sample_next(logits, r, temperature, top_k, top_p)

  def next_from(out):  # what the next draw needs: the head's outputs, or log p of every id
    if by_digits:
      return jax.tree_util.tree_map(lambda x: x[:, -1], out)
    return model.apply(variables, out, method=lm_lib.TransformerLM.next_token_log_probs)

  def draw(last, rng):
    if not by_digits:
      return sample_next(last, rng, temperature, top_k, top_p)
    token, code = model.apply(variables, last, rng, pick,
                              method=lambda m, o, r, f: m.output_head.sample(o, r, f))
    slot = jnp.clip(jnp.searchsorted(codes_C, code), 0, codes_C.shape[0] - 1)
    return jnp.where(code >= 0, ids_C[slot], token)

  cache = lm_lib.init_cache(model, b, p + max_new_tokens)
  out, cache = model.apply(variables, prompt_BxP, valid_BxP, cache=cache)
  last = next_from(out)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, last, done, tokens, rng = carry
    rng, sub = jax.random.split(rng)
    nxt = jnp.where(done, pad_id, draw(last, sub))
    tokens = tokens.at[:, i].set(nxt)
    out, cache = model.apply(variables, nxt[:, None], ~done[:, None], cache=cache)
    done = done | (nxt == eos_id)
    last = next_from(out)
    return i + 1, cache, last, done, tokens, rng

  carry = (jnp.int32(0), cache, last, jnp.zeros((b,), bool), tokens, rng)
  return jax.lax.while_loop(cond, body, carry)[4]


def _left_padded(model, prompts, max_new_tokens: int, pad_id: int, *, tokens_per_step: int):
  """Checks the model and the request; the prompts left-padded: ``(ids_BxP, valid_BxP)``."""
  if not prompts or any(len(q) == 0 for q in prompts):
    raise ValueError("Each prompt needs at least one token (e.g. [BOS]).")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  p = max(len(q) for q in prompts)
  r = model.num_registers
  if model.positions == "learned" and r + p + max_new_tokens * tokens_per_step > model.max_len:
    raise ValueError(f"{r} registers + prompt ({p}) + {max_new_tokens} steps of up to "
                     f"{tokens_per_step} tokens exceeds the model's learned positions "
                     f"({model.max_len}).")
  ids = np.full((len(prompts), p), pad_id, np.int32)
  valid = np.zeros((len(prompts), p), bool)
  for i, q in enumerate(prompts):
    ids[i, p - len(q):], valid[i, p - len(q):] = q, True
  return ids, valid


def generate(model: lm_lib.TransformerLM, params, prompts: Sequence[Sequence[int]], rng, *,
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
  """New token ids per prompt (without the prompt), stopping after EOS (included)."""
  ids, valid = _left_padded(model, prompts, max_new_tokens, pad_id, tokens_per_step=1)
  out = np.asarray(_generate(model, inference_variables(model, params), jnp.asarray(ids),
                             jnp.asarray(valid), rng,
                             max_new_tokens=max_new_tokens, temperature=float(temperature),
                             top_k=int(top_k), top_p=float(top_p), eos_id=int(eos_id),
                             pad_id=int(pad_id)))
  result = []
  for row in out.tolist():
    result.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
  return result


# ---- sampling in the open code space (factorized head) -----------------------------------


@functools.partial(jax.jit, static_argnames=(
    "model", "codec", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id",
    "byte_base"))
def _generate_open(model, variables, codec, codec_params, prompt_BxP, valid_BxP, rng,
                   vocab_codes_C, vocab_ids_C, *, max_new_tokens, temperature, top_k, top_p,
                   eos_id, pad_id, byte_base):
  pick = lambda logits, r: sample_next(logits, r, temperature, top_k, top_p)
  b, p = prompt_BxP.shape
  width = codec.max_len  # an open code enters the LM as up to max_len byte tokens
  cache = lm_lib.init_cache(model, b, p + max_new_tokens * width)
  out, cache = model.apply(variables, prompt_BxP, valid_BxP, cache=cache)
  last = jax.tree_util.tree_map(lambda x: x[:, -1], out)
  chunks = jnp.full((b, max_new_tokens, width), pad_id, jnp.int32)
  chunk_valid = jnp.zeros((b, max_new_tokens, width), bool)
  kinds = jnp.full((b, max_new_tokens), -1, jnp.int32)  # 0 plain, 1 vocabulary code, 2 open
  codes = jnp.full((b, max_new_tokens), -1, jnp.int32)

  def cond(carry):
    i, done = carry[0], carry[3]
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, last, done, chunks, chunk_valid, kinds, codes, rng = carry
    rng, sub = jax.random.split(rng)
    token, code = model.apply(variables, last, sub, pick,
                              method=lambda m, o, r, f: m.output_head.sample(o, r, f))
    # A code of the vocabulary is that token; any other code is decoded by the codec.
    slot = jnp.clip(jnp.searchsorted(vocab_codes_C, code), 0, vocab_codes_C.shape[0] - 1)
    in_vocab = (code >= 0) & (vocab_codes_C[slot] == code)
    logits = codec.apply({"params": codec_params},
                         codec.fsq.indices_to_codes(jnp.maximum(code, 0)),
                         method=codec_lib.Codec.decode)
    bytes_BxW, lengths_B = codec_lib.greedy_decode(logits)
    lengths_B = jnp.maximum(lengths_B, 1)  # a code decoded to nothing still emits a byte
    single = jnp.where(in_vocab, vocab_ids_C[slot], token)
    open_code = (code >= 0) & ~in_vocab
    ids = jnp.where(open_code[:, None], byte_base + bytes_BxW.astype(jnp.int32),
                    jnp.full((b, width), pad_id, jnp.int32).at[:, 0].set(single))
    valid = jnp.where(open_code[:, None], jnp.arange(width)[None] < lengths_B[:, None],
                      jnp.arange(width)[None] == 0) & ~done[:, None]
    ids = jnp.where(valid, ids, pad_id)
    chunks = chunks.at[:, i].set(ids)
    chunk_valid = chunk_valid.at[:, i].set(valid)
    kinds = kinds.at[:, i].set(jnp.where(done, -1, jnp.where(
        open_code, 2, jnp.where(in_vocab, 1, 0))))
    codes = codes.at[:, i].set(jnp.where(done, -1, code))
    out, cache = model.apply(variables, ids, valid, cache=cache)
    last_index = jnp.where(open_code, lengths_B - 1, 0)
    last = jax.tree_util.tree_map(
        lambda x: jnp.take_along_axis(
            x, last_index.reshape((b,) + (1,) * (x.ndim - 1)), axis=1)[:, 0], out)
    done = done | (~open_code & (single == eos_id))
    return i + 1, cache, last, done, chunks, chunk_valid, kinds, codes, rng

  carry = (jnp.int32(0), cache, last, jnp.zeros((b,), bool), chunks, chunk_valid, kinds,
           codes, rng)
  return jax.lax.while_loop(cond, body, carry)[4:8]


def generate_open(model: lm_lib.TransformerLM, params, tok, codec, codec_params,
                  prompts: Sequence[Sequence[int]], rng, *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                  ) -> list[dict]:
  """Samples from a ``factorized``-head LM over its whole output space: plain tokens and
  any of the FSQ codes. A sampled code of the vocabulary is that token; any other code is
  decoded to bytes by the codec decoder and fed back as byte-fallback tokens, so the text
  stays exact UTF-8 bytes. Temperature, top-k and top-p apply to each factor of the head
  (the plain/code choice and every digit). Per prompt: ``{"bytes", "text", "ids", "steps",
  "codes", "open_codes"}``: ``ids`` the tokens fed back (``tok.decode(ids)`` gives
  ``bytes``); ``steps`` one ``(kind, code, bytes)`` per step, kind ``"token"`` (a plain
  token: special or byte), ``"vocab_code"`` or ``"open_code"``."""
  if not model.head.startswith("factorized"):
    raise ValueError(f"generate_open samples codes from a factorized head; this model's "
                     f"head is {model.head!r} (use generate()).")
  ids, valid = _left_padded(model, prompts, max_new_tokens, tok.pad_id,
                            tokens_per_step=codec.max_len)
  vocab_codes_C, vocab_ids_C = _code_lookup([tok.id_to_code(i) for i in range(len(tok))])
  chunks, chunk_valid, kinds, codes = jax.device_get(_generate_open(
      model, inference_variables(model, params), codec, codec_params, jnp.asarray(ids),
      jnp.asarray(valid), rng, vocab_codes_C, vocab_ids_C,
      max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
      top_p=float(top_p), eos_id=int(tok.eos_id),
      pad_id=int(tok.pad_id), byte_base=int(tok.token_to_id("<0x00>"))))
  results = []
  names = ("token", "vocab_code", "open_code")
  for row_chunks, row_valid, row_kinds, row_codes in zip(chunks, chunk_valid, kinds, codes):
    fed = [int(x) for x in row_chunks[row_valid]]
    data = b"".join(tok.token_bytes(i) or b"" for i in fed)
    steps = [(names[k], int(c), b"".join(tok.token_bytes(int(i)) or b"" for i in ch[v]))
             for k, c, ch, v in zip(row_kinds, row_codes, row_chunks, row_valid) if k >= 0]
    results.append({"bytes": data, "text": data.decode("utf-8", "replace"), "ids": fed,
                    "steps": steps, "codes": int((row_kinds >= 1).sum()),
                    "open_codes": int((row_kinds == 2).sum())})
  return results
