"""The language model: a decoder-only, pre-norm, causal transformer over token vectors.

The token vectors come from an embedding module and the outputs go through a head, both
looked up by name in `fsqtok.embeddings` (a vocabulary table, a code-factorized table,
...). One forward function serves training (whole sequences) and generation (a key/value
cache of fixed size, written at a moving index, so every decoding step has static shapes).

Sequences may be left-padded (generation) or right-padded (training tails): ``valid_BxT``
marks real tokens; padding is never attended to, and a token's position counts only the
real tokens before it.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsqtok import embeddings as embeddings_lib

Cache = dict[str, Any]
_NEG = -1e9  # masked attention logit (finite: a fully masked row stays finite)


def rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (rotating pairs of the two halves of each head)."""
  half = x_BxTxHxD.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1xF = (positions_BxT[:, :, None, None].astype(jnp.float32) * freq)
  sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
  x1, x2 = x_BxTxHxD[..., :half].astype(jnp.float32), x_BxTxHxD[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


class Attention(nn.Module):
  num_heads: int
  rope: bool
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, layer_cache, index, deterministic):
    d_model = x_BxTxD.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={self.num_heads}.")
    head_dim = d_model // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                         name=name)
    q, k, v = dense("query")(x_BxTxD), dense("key")(x_BxTxD), dense("value")(x_BxTxD)
    if self.rope:
      q, k = rope(q, positions_BxT), rope(k, positions_BxT)
    new_cache = None
    if layer_cache is not None:  # write this call's keys/values at the cache index
      k = jax.lax.dynamic_update_slice_in_dim(layer_cache["key"], k.astype(
          layer_cache["key"].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(layer_cache["value"], v.astype(
          layer_cache["value"].dtype), index, axis=1)
      new_cache = {"key": k, "value": v}
    logits_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
    logits_BxHxTxS = logits_BxHxTxS / math.sqrt(head_dim)
    logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS, _NEG)
    weights = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
    out_BxTxHxD = jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v)
    out = nn.DenseGeneral(d_model, axis=(-2, -1), dtype=self.dtype, name="out")(out_BxTxHxD)
    return out, new_cache, weights


class Block(nn.Module):
  num_heads: int
  mlp_dim: int
  rope: bool
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, layer_cache, index, deterministic):
    h = nn.LayerNorm(dtype=self.dtype, name="attn_norm")(x_BxTxD)
    h, new_cache, weights = Attention(self.num_heads, self.rope, self.dropout, self.dtype,
                                      name="attn")(h, positions_BxT, mask_BxTxS, layer_cache,
                                                   index, deterministic)
    x_BxTxD = x_BxTxD + nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x_BxTxD)
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(h)
    h = nn.Dense(x_BxTxD.shape[-1], dtype=self.dtype, name="mlp_out")(nn.gelu(h))
    x_BxTxD = x_BxTxD + nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return x_BxTxD, new_cache, weights


class TransformerLM(nn.Module):
  """``ids_BxT -> head output``; see `fsqtok.embeddings` for embeddings and heads."""

  vocab_size: int
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  max_len: int = 512
  positions: str = "rope"        # rope | learned
  dropout: float = 0.0
  dtype: Any = jnp.float32
  embedding: str = "table"       # a name in embeddings.EMBEDDINGS
  head: str = "tied"             # tied | dense | factorized
  token_codes: tuple[int, ...] | None = None   # FSQ index per token id (-1: none)
  levels: tuple[int, ...] | None = None         # FSQ levels of those codes
  token_bytes: tuple[bytes | None, ...] | None = None  # per token id (None: a special)
  token_counts: tuple[int, ...] | None = None   # training count per token id (bespoke)
  codec: Any = None                             # a fsqtok.codec.Codec (codec embedding)

  def setup(self):
    if self.positions not in ("rope", "learned"):
      raise ValueError(f"positions must be 'rope' or 'learned', got {self.positions!r}.")
    self.embed = embeddings_lib.make_embedding(self.embedding, self)
    self.output_head = embeddings_lib.make_head(self.head, self, self.embed)
    if self.positions == "learned":
      self.position_table = nn.Embed(self.max_len, self.d_model)
    self.blocks = [Block(self.num_heads, self.mlp_dim, self.positions == "rope", self.dropout,
                         self.dtype) for _ in range(self.num_layers)]
    self.final_norm = nn.LayerNorm(dtype=self.dtype)

  def hidden(self, ids_BxT, valid_BxT=None, cache: Cache | None = None,
             deterministic: bool = True):
    """Final hidden states, the new cache (or None) and each layer's attention weights."""
    b, t = ids_BxT.shape
    valid_BxT = jnp.ones((b, t), bool) if valid_BxT is None else valid_BxT.astype(bool)
    if cache is None:
      index = 0
      start_B = jnp.zeros((b,), jnp.int32)
      valid_BxS, s = valid_BxT, t
    else:
      index = cache["index"]
      start_B = cache["length"]
      valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BxT, index, axis=1)
      s = valid_BxS.shape[1]
    positions_BxT = start_B[:, None] + jnp.cumsum(valid_BxT, axis=1) - 1
    positions_BxT = jnp.maximum(positions_BxT, 0)
    slot_T = index + jnp.arange(t)
    mask_BxTxS = (jnp.arange(s)[None, None, :] <= slot_T[None, :, None]) & valid_BxS[:, None, :]
    x = self.embed(ids_BxT).astype(self.dtype)
    if self.positions == "learned":
      x = x + self.position_table(jnp.minimum(positions_BxT, self.max_len - 1)).astype(self.dtype)
    new_layers, attn = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else cache["layers"][i]
      x, new_layer, weights = block(x, positions_BxT, mask_BxTxS, layer_cache, index,
                                    deterministic)
      new_layers.append(new_layer)
      attn.append(weights)
    new_cache = None
    if cache is not None:
      new_cache = {"layers": new_layers, "valid": valid_BxS, "index": index + t,
                   "length": start_B + jnp.sum(valid_BxT, axis=1).astype(jnp.int32)}
    return self.final_norm(x), new_cache, attn

  def __call__(self, ids_BxT, valid_BxT=None, cache: Cache | None = None,
               deterministic: bool = True):
    """Head output (logits ``[B, T, V]`` for table heads) and the new cache."""
    if self.codec is not None and self.is_initializing():  # create the decoder too
      self.codec(jnp.zeros((1, self.codec.max_len), jnp.uint8), jnp.ones((1,), jnp.int32))
    h, new_cache, _ = self.hidden(ids_BxT, valid_BxT, cache, deterministic)
    return self.output_head(h), new_cache

  def reconstruct(self, bytes_BxL, lengths_B):
    """The codec of the ``codec`` embedding (params under ``codec``): ``(logits, codes)``."""
    if self.codec is None:
      raise ValueError("This model has no codec (use embedding='codec').")
    return self.codec(bytes_BxL, lengths_B)

  def target_log_probs(self, ids_BxT, valid_BxT, targets_BxT, deterministic: bool = True):
    """log p(target) at every position of a training/evaluation window."""
    outputs, _ = self(ids_BxT, valid_BxT, deterministic=deterministic)
    return self.output_head.log_prob(outputs, targets_BxT)

  def token_log_probs(self, outputs, targets_BxT):
    """log p(target) per position, from the head output."""
    return self.output_head.log_prob(outputs, targets_BxT)

  def next_token_log_probs(self, outputs_Bx1):
    """log p over the vocabulary for the last position (generation)."""
    return self.output_head.vocab_log_probs(outputs_Bx1)[:, -1]


def init_cache(model: TransformerLM, batch_size: int, length: int) -> Cache:
  """An empty key/value cache for ``length`` positions."""
  head_dim = model.d_model // model.num_heads
  shape = (batch_size, length, model.num_heads, head_dim)
  layer = lambda: {"key": jnp.zeros(shape, model.dtype), "value": jnp.zeros(shape, model.dtype)}
  return {"layers": [layer() for _ in range(model.num_layers)],
          "valid": jnp.zeros((batch_size, length), bool), "index": jnp.int32(0),
          "length": jnp.zeros((batch_size,), jnp.int32)}


def lm_from_config(c, vocab_size: int, token_codes=None, levels=None, token_bytes=None,
                   codec=None, token_counts=None) -> TransformerLM:
  """The model of a ``config.lm.model`` ConfigDict (the token tables as the embedding and
  head need them)."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if c.dtype not in dtypes:
    raise ValueError(f"lm.model.dtype must be one of {sorted(dtypes)}, got {c.dtype!r}.")
  return TransformerLM(
      vocab_size=vocab_size, d_model=c.d_model, num_layers=c.num_layers, num_heads=c.num_heads,
      mlp_dim=c.mlp_dim, max_len=c.max_len, positions=c.positions, dropout=c.dropout,
      dtype=dtypes[c.dtype], embedding=c.embedding, head=c.head,
      token_codes=None if token_codes is None else tuple(int(x) for x in token_codes),
      levels=None if levels is None else tuple(int(x) for x in levels),
      token_bytes=None if token_bytes is None else tuple(token_bytes), codec=codec,
      token_counts=None if token_counts is None else tuple(int(x) for x in token_counts))
