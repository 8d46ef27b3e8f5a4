"""The language model: a decoder-only, pre-norm, causal transformer over token vectors.

The token vectors come from an embedding module and the outputs go through a head, both
looked up by name in `fsqtok.models.embeddings` (a vocabulary table, a code-factorized table,
...). One forward function serves training (whole sequences) and generation (a key/value
cache of fixed size, written at a moving index, so every decoding step has static shapes).

Sequences may be left-padded (generation) or right-padded (training tails): ``valid_BxT``
marks real tokens; padding is never attended to, and a token's position counts only the
real tokens before it.

Token-level options, all off by default (the model is then exactly the plain LM):

* ``num_registers``: n learned vectors prepended to every sequence. They are attended to
  but never scored and never part of the outputs (``hidden`` drops their rows). With a
  key/value cache they are written once, by the first call on a fresh `init_cache`.
* ``prefix_BxKxD`` (a call argument): vectors prepended after the registers, e.g. a soft
  prompt (`fsqtok.models.soft_prompt`); like registers, attended to and dropped from the outputs.
* ``num_segments``: a learned segment embedding added to each token (``segments_BxT``),
  for two-segment inputs joined by ``[SEP]`` (`fsqtok.studies.token_roles`).
* ``prune_layer`` / ``prune_keep`` / ``prune_score`` / ``prune_keep_last``: token pruning
  after a layer (`fsqtok.studies.token_importance`): the later layers see only the kept positions.
  Because the LM is causal, pruning only thins the *context*: the prefix and the last
  ``prune_keep_last`` positions (the ones whose next token is predicted) are always kept,
  the kept positions keep their order and their original rotary/learned positions, and
  each attends only to kept positions at or before it. A pruned position leaves the
  network early: its output is its hidden state after layer ``prune_layer``, so every
  output keeps its shape; score only the always-kept tail (`target_log_probs_last`) to
  measure what pruning costs. Which positions were kept is sown as
  ``intermediates/kept`` (``apply(..., mutable=["intermediates"])``).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsqtok.models import embeddings as embeddings_lib
from fsqtok.models import fuser as fuser_lib
from fsqtok.studies import token_importance

Cache = dict[str, Any]
_NEG = -1e9  # masked attention logit (finite: a fully masked row stays finite)
# A fresh cache whose prefix (registers, soft prompt) the next call writes: a structural
# marker (an empty pytree node), so "first call" is known while tracing, not at run time.
PREFIX_PENDING = "prefix_pending"

# The logical axis names of the LM's parameters, by path pattern (first match wins; a
# pattern applies only to leaves of as many dimensions as it names). A sharding config's
# ``logical_axes`` says which mesh axis each name goes to (`fsqtok.train.sharding`): with
# ``heads``, ``mlp`` and ``vocab`` on ``model``, attention is split by heads, the MLP by
# its hidden width and the table and output layer by vocabulary rows (Megatron style).
# Optimizer moments have the same path suffixes, so they follow their parameters.
PARAM_AXES = (
    (r"attn/(query|key|value)/kernel$", ("embed", "heads", "head_dim")),
    (r"attn/(query|key|value)/bias$", ("heads", "head_dim")),
    (r"attn/out/kernel$", ("heads", "head_dim", "embed")),
    (r"mlp_in/kernel$", ("embed", "mlp")),
    (r"mlp_in/bias$", ("mlp",)),
    (r"mlp_out/kernel$", ("mlp", "embed")),
    (r"embed/embed/embedding$", ("vocab", "embed")),
    (r"output_head/out/kernel$", ("embed", "vocab")),
    (r"output_head/out/bias$", ("vocab",)),
)


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
  """``ids_BxT -> head output``; see `fsqtok.models.embeddings` for embeddings and heads."""

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
  head: str = "tied"             # tied | dense | factorized | factorized_vocab
  head_flat_tokens: int = 0      # factorized heads: the most frequent coded tokens kept flat
  token_codes: tuple[int, ...] | None = None   # FSQ index per token id (-1: none)
  levels: tuple[int, ...] | None = None         # FSQ levels of those codes
  token_bytes: tuple[bytes | None, ...] | None = None  # per token id (None: a special)
  token_counts: tuple[int, ...] | None = None   # training count per id (bespoke, flat head rows)
  codec: Any = None                             # a fsqtok.codec.model.Codec (codec embedding)
  fuser: Any = None                  # a fsqtok.models.fuser.FuserSpec (fuser embedding; None: default)
  ambiguous_ids: tuple[int, ...] = ()  # the fuser's precomputed ambiguous token ids
  num_registers: int = 0         # learned register vectors prepended to every sequence
  num_segments: int = 0          # segment embeddings (0: none; 2 for [SEP]-joined pairs)
  prune_layer: int = 0           # prune the context after this many layers (0: never)
  prune_keep: float = 1.0        # fraction of the positions kept by pruning
  prune_score: str = "attention"  # attention (received) | norm (of the hidden state)
  prune_keep_last: int = 1       # the last positions, always kept (their targets are scored)

  def setup(self):
    if self.positions not in ("rope", "learned"):
      raise ValueError(f"positions must be 'rope' or 'learned', got {self.positions!r}.")
    if self.num_registers < 0 or self.num_segments < 0:
      raise ValueError(f"num_registers ({self.num_registers}) and num_segments "
                       f"({self.num_segments}) must be >= 0.")
    if self.prune_layer:
      token_importance.check_pruning(self.prune_layer, self.num_layers, self.prune_keep,
                                     self.prune_score, self.prune_keep_last)
    if self.num_registers:
      self.registers = self.param("registers", nn.initializers.normal(stddev=0.02),
                                  (self.num_registers, self.d_model))
    if self.num_segments:
      self.segment_table = nn.Embed(self.num_segments, self.d_model,
                                    embedding_init=nn.initializers.normal(stddev=0.02))
    self.embed = embeddings_lib.make_embedding(self.embedding, self)
    self.output_head = embeddings_lib.make_head(self.head, self, self.embed)
    if self.positions == "learned":
      self.position_table = nn.Embed(self.max_len, self.d_model)
    self.blocks = [Block(self.num_heads, self.mlp_dim, self.positions == "rope", self.dropout,
                         self.dtype) for _ in range(self.num_layers)]
    self.final_norm = nn.LayerNorm(dtype=self.dtype)

  def _prefix(self, b: int, prefix_BxKxD, first_call: bool):
    """Registers then the given prefix vectors, ``[B, K, D]`` (None if there are none)."""
    if not first_call:
      if prefix_BxKxD is not None:
        raise ValueError("prefix_BxKxD (e.g. a soft prompt) goes in with the first call on a "
                         "fresh cache: make it with init_cache(..., prefix_len=K).")
      return None
    parts = []
    if self.num_registers:
      parts.append(jnp.broadcast_to(self.registers[None], (b, *self.registers.shape)))
    if prefix_BxKxD is not None:
      if (prefix_BxKxD.ndim != 3 or prefix_BxKxD.shape[0] != b
          or prefix_BxKxD.shape[2] != self.d_model):
        raise ValueError(f"prefix_BxKxD must have shape [batch={b}, K, "
                         f"d_model={self.d_model}], got {prefix_BxKxD.shape}.")
      parts.append(prefix_BxKxD)
    if not parts:
      return None
    return jnp.concatenate([p.astype(self.dtype) for p in parts], axis=1)

  def hidden(self, ids_BxT, valid_BxT=None, cache: Cache | None = None,
             deterministic: bool = True, *, segments_BxT=None, prefix_BxKxD=None):
    """Final hidden states, the new cache (or None) and each layer's attention weights.

    The hidden states are those of ``ids_BxT`` only (registers and ``prefix_BxKxD`` are
    dropped); the attention weights ``[B, H, N, N]`` cover the whole sequence the layer
    saw: the ``K`` prefix positions first, and after pruning only the kept positions.
    """
    b, t = ids_BxT.shape
    valid_BxT = jnp.ones((b, t), bool) if valid_BxT is None else valid_BxT.astype(bool)
    n_prev = embeddings_lib.context_len(self)
    if n_prev:  # the embedding sees the ids before each token (the cache keeps the last)
      x = self.embed(ids_BxT, valid_BxT, None if cache is None else cache["recent_ids"])
      recent_ids = None if cache is None else jnp.concatenate(
          [cache["recent_ids"], jnp.where(valid_BxT, ids_BxT, embeddings_lib.OUTSIDE)],
          axis=1)[:, -n_prev:]
    else:
      x = self.embed(ids_BxT)
    x = x.astype(self.dtype)
    if segments_BxT is not None:
      if not self.num_segments:
        raise ValueError("segments_BxT needs segment embeddings: build the model with "
                         "num_segments=2.")
      x = x + self.segment_table(segments_BxT).astype(self.dtype)
    prefix = self._prefix(b, prefix_BxKxD, cache is None or PREFIX_PENDING in cache)
    k = 0
    if prefix is not None:
      k = prefix.shape[1]
      x = jnp.concatenate([prefix, x], axis=1)
      valid_BxT = jnp.concatenate([jnp.ones((b, k), bool), valid_BxT], axis=1)
    n = k + t
    if cache is not None and PREFIX_PENDING in cache:
      reserved = cache[PREFIX_PENDING].shape[1]
      if k > reserved:  # it would overwrite the cache's last slots, silently
        raise ValueError(f"The first call writes {k} prefix vectors ({self.num_registers} "
                         f"registers + the prefix) into a cache that kept room for "
                         f"{reserved}: make it with init_cache(..., prefix_len="
                         f"{k - self.num_registers}).")
    if self.positions == "learned" and cache is None and n > self.max_len:
      raise ValueError(f"{n} positions ({k} registers and prefix vectors + {t} tokens) "
                       f"exceed the model's {self.max_len} learned positions: raise "
                       f"max_len or use positions='rope'.")
    if cache is None:
      index = 0
      start_B = jnp.zeros((b,), jnp.int32)
      valid_BxS, s = valid_BxT, n
    else:
      index = cache["index"]
      start_B = cache["length"]
      valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BxT, index, axis=1)
      s = valid_BxS.shape[1]
    positions_BxT = start_B[:, None] + jnp.cumsum(valid_BxT, axis=1) - 1
    positions_BxT = jnp.maximum(positions_BxT, 0)
    slot_T = index + jnp.arange(n)
    mask_BxTxS = (jnp.arange(s)[None, None, :] <= slot_T[None, :, None]) & valid_BxS[:, None, :]
    if self.positions == "learned":
      x = x + self.position_table(jnp.minimum(positions_BxT, self.max_len - 1)).astype(self.dtype)
    new_layers, attn = [], []
    early_BxTxD, kept_BxK = None, None
    for i, block in enumerate(self.blocks):
      if self.prune_layer and i == self.prune_layer:
        if cache is not None:
          raise ValueError("Token pruning is for whole-sequence forwards, not a key/value "
                           "cache: build the model with prune_layer=0 to generate.")
        score_BxT = token_importance.importance(self.prune_score, x, attn[-1], mask_BxTxS)
        kept_BxK = token_importance.select_kept(
            score_BxT, valid_BxT, num_prefix=k, keep=self.prune_keep,
            keep_last=self.prune_keep_last)
        self.sow("intermediates", "kept", token_importance.kept_mask(kept_BxK, n))
        early_BxTxD = x
        x, positions_BxT, valid_kept_BxK = token_importance.gather_kept(
            kept_BxK, x, positions_BxT, valid_BxT)
        mask_BxTxS = ((kept_BxK[:, None, :] <= kept_BxK[:, :, None]) &
                      valid_kept_BxK[:, None, :])
      layer_cache = None if cache is None else cache["layers"][i]
      x, new_layer, weights = block(x, positions_BxT, mask_BxTxS, layer_cache, index,
                                    deterministic)
      new_layers.append(new_layer)
      attn.append(weights)
    if kept_BxK is not None:  # a pruned position's output is its state at the pruning layer
      x = token_importance.scatter_kept(early_BxTxD, kept_BxK, x)
    new_cache = None
    if cache is not None:
      new_cache = {"layers": new_layers, "valid": valid_BxS, "index": index + n,
                   "length": start_B + jnp.sum(valid_BxT, axis=1).astype(jnp.int32)}
      if n_prev:
        new_cache["recent_ids"] = recent_ids
    return self.final_norm(x)[:, k:], new_cache, attn

  def __call__(self, ids_BxT, valid_BxT=None, cache: Cache | None = None,
               deterministic: bool = True, *, segments_BxT=None, prefix_BxKxD=None):
    """Head output (logits ``[B, T, V]`` for table heads) and the new cache."""
    if self.codec is not None and self.is_initializing():  # create the decoder too
      self.codec(jnp.zeros((1, self.codec.max_len), jnp.uint8), jnp.ones((1,), jnp.int32))
    h, new_cache, _ = self.hidden(ids_BxT, valid_BxT, cache, deterministic,
                                  segments_BxT=segments_BxT, prefix_BxKxD=prefix_BxKxD)
    return self.output_head(h), new_cache

  def reconstruct(self, bytes_BxL, lengths_B):
    """The codec of the ``codec`` embedding (params under ``codec``): ``(logits, codes)``."""
    if self.codec is None:
      raise ValueError("This model has no codec (use embedding='codec').")
    return self.codec(bytes_BxL, lengths_B)

  def target_log_probs(self, ids_BxT, valid_BxT, targets_BxT, deterministic: bool = True,
                       *, prefix_BxKxD=None):
    """log p(target) at every position of a training/evaluation window."""
    outputs, _ = self(ids_BxT, valid_BxT, deterministic=deterministic,
                      prefix_BxKxD=prefix_BxKxD)
    return self.output_head.log_prob(outputs, targets_BxT)

  def target_log_probs_last(self, ids_BxT, valid_BxT, targets_BxN, deterministic: bool = True):
    """log p(target) at the last ``N`` positions only (the head runs on those alone): what
    a pruned model is scored on."""
    n = targets_BxN.shape[1]
    h, _, _ = self.hidden(ids_BxT, valid_BxT, deterministic=deterministic)
    return self.output_head.log_prob(self.output_head(h[:, -n:]), targets_BxN)

  def token_log_probs(self, outputs, targets_BxT):
    """log p(target) per position, from the head output."""
    return self.output_head.log_prob(outputs, targets_BxT)

  def next_token_log_probs(self, outputs_BxT):
    """log p over the vocabulary for the last position (generation). Only that position
    goes through the head: a factorized head's scores are [B, T, V, ...] otherwise (GBs
    for a long prompt)."""
    last = jax.tree_util.tree_map(lambda x: x[:, -1:], outputs_BxT)
    return self.output_head.vocab_log_probs(last)[:, -1]


def init_cache(model: TransformerLM, batch_size: int, length: int,
               prefix_len: int = 0) -> Cache:
  """An empty key/value cache for ``length`` token positions, plus room for the model's
  registers and a ``prefix_len``-vector prefix, which the first call writes."""
  extra = model.num_registers + prefix_len
  length = length + extra
  head_dim = model.d_model // model.num_heads
  shape = (batch_size, length, model.num_heads, head_dim)
  layer = lambda: {"key": jnp.zeros(shape, model.dtype), "value": jnp.zeros(shape, model.dtype)}
  cache = {"layers": [layer() for _ in range(model.num_layers)],
           "valid": jnp.zeros((batch_size, length), bool), "index": jnp.int32(0),
           "length": jnp.zeros((batch_size,), jnp.int32)}
  if extra:  # the slots reserved, in the marker's shape (static while tracing)
    cache[PREFIX_PENDING] = jnp.zeros((0, extra), jnp.int32)
  n_prev = embeddings_lib.context_len(model)
  if n_prev:  # the ids before the next token, for an embedding that reads them
    cache["recent_ids"] = jnp.full((batch_size, n_prev), embeddings_lib.OUTSIDE, jnp.int32)
  return cache


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POSITIONS = ("rope", "learned")


def check_model_config(c, seq_len: int) -> None:
  """What a ``config.lm.model`` and the window length ``seq_len`` (``lm.data.seq_len``)
  must satisfy, checked before any training: a ValueError naming the field."""
  if c.dtype not in DTYPES:
    raise ValueError(f"lm.model.dtype must be one of {sorted(DTYPES)}, got {c.dtype!r}.")
  if c.positions not in POSITIONS:
    raise ValueError(f"lm.model.positions must be one of {POSITIONS}, got {c.positions!r}.")
  if seq_len < 1:
    raise ValueError(f"lm.data.seq_len must be >= 1, got {seq_len}.")
  needed = seq_len + c.get("num_registers", 0)
  if c.positions == "learned" and needed > c.max_len:
    raise ValueError(f"lm.data.seq_len={seq_len} (+ {c.get('num_registers', 0)} registers) "
                     f"exceeds lm.model.max_len={c.max_len} learned positions: raise max_len "
                     f"to at least {needed} or use lm.model.positions='rope'.")


def lm_from_config(c, vocab_size: int, token_codes=None, levels=None, token_bytes=None,
                   codec=None, token_counts=None, ambiguous_ids=()) -> TransformerLM:
  """The model of a ``config.lm.model`` ConfigDict (the token tables as the embedding and
  head need them; ``c.fuser``: the fuser embedding's `fsqtok.models.fuser.FuserSpec` fields)."""
  if c.dtype not in DTYPES:
    raise ValueError(f"lm.model.dtype must be one of {sorted(DTYPES)}, got {c.dtype!r}.")
  fuser = None
  if c.embedding == "fuser" and c.get("fuser") is not None:
    fuser = fuser_lib.FuserSpec.from_config(c.fuser)
  return TransformerLM(
      vocab_size=vocab_size, d_model=c.d_model, num_layers=c.num_layers, num_heads=c.num_heads,
      mlp_dim=c.mlp_dim, max_len=c.max_len, positions=c.positions, dropout=c.dropout,
      dtype=DTYPES[c.dtype], embedding=c.embedding, head=c.head,
      head_flat_tokens=c.get("head_flat_tokens", 0),
      token_codes=None if token_codes is None else tuple(int(x) for x in token_codes),
      levels=None if levels is None else tuple(int(x) for x in levels),
      token_bytes=None if token_bytes is None else tuple(token_bytes), codec=codec,
      token_counts=None if token_counts is None else tuple(int(x) for x in token_counts),
      num_registers=c.get("num_registers", 0), num_segments=c.get("num_segments", 0),
      prune_layer=c.get("prune_layer", 0), prune_keep=c.get("prune_keep", 1.0),
      prune_score=c.get("prune_score", "attention"),
      prune_keep_last=c.get("prune_keep_last", 1), fuser=fuser,
      ambiguous_ids=tuple(int(i) for i in ambiguous_ids))
