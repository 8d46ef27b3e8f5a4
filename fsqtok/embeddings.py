"""Token embeddings and output heads of the language model, looked up by name.

Embeddings map ``ids_BxT -> x_BxTxD``:

* ``table``: one learned row per vocabulary id (`fsqtok.bespoke.StandardEmbed`).
* ``bespoke``: frequency buckets with their own widths (`fsqtok.bespoke.BespokeEmbed`,
  buckets from the tokens' training counts).
* ``code_factorized``: a token with an FSQ code gets the sum of one small table per FSQ
  dimension, indexed by that dimension's digit of its code (8 tables of 5-8 rows cover all
  4,096,000 codes); tokens without a code (specials, bytes) get rows of a small table.
* ``codec``: a token's bytes go through the codec's encoder and FSQ (straight-through),
  and an MLP maps its code to ``d_model``; specials get rows of a small table. The codec
  is a submodule, so the LM loss reaches it: frozen in the ``lm`` phase, trained in
  ``joint``.

Heads map hidden states to a distribution over the next token and give ``log p(target)``:

* ``tied``: logits = x . table rows (needs an embedding with ``attend``).
* ``dense``: an untied projection to the vocabulary.
* ``factorized``: a softmax over {tokens without a code} + {"a code"}, then one softmax
  per FSQ dimension over its digits: a distribution over the whole code space, so
  ``log p(token) = log p(code) + sum_d log p_d(digit_d)``; probability given to codes
  outside the vocabulary is honestly lost when a vocabulary token is scored.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsqtok import bespoke


def code_layout(token_codes, levels) -> tuple[np.ndarray, np.ndarray]:
  """``(plain_V, digits_VxD)``: per token id, its row among the tokens without a code
  (-1 if it has one) and the FSQ digits of its code (0 where none)."""
  if token_codes is None or levels is None:
    raise ValueError("The code_factorized embedding and factorized head need the tokens' "
                     "FSQ codes: build the model with token_codes and levels (a tokenizer "
                     "built by fsqtok has them).")
  codes = np.asarray(token_codes, np.int64)
  levels = np.asarray(levels, np.int64)
  basis = np.concatenate([[1], np.cumprod(levels[:-1])])
  has = codes >= 0
  plain = np.where(has, -1, np.cumsum(~has) - 1)
  digits = np.where(has[:, None], (np.maximum(codes, 0)[:, None] // basis) % levels, 0)
  return plain.astype(np.int32), digits.astype(np.int32)


class CodeFactorizedEmbedding(nn.Module):
  vocab_size: int
  d_model: int
  token_codes: tuple[int, ...]
  levels: tuple[int, ...]

  def setup(self):
    plain, digits = code_layout(self.token_codes, self.levels)
    self._plain, self._digits = jnp.asarray(plain), jnp.asarray(digits)
    init = nn.initializers.normal(stddev=0.02)
    self.plain_table = nn.Embed(max(int((plain >= 0).sum()), 1), self.d_model,
                                embedding_init=init)
    self.digit_tables = [nn.Embed(l, self.d_model, embedding_init=init) for l in self.levels]

  def embed_codes(self, digits_BxTxD):
    return sum(t(digits_BxTxD[..., d]) for d, t in enumerate(self.digit_tables))

  def __call__(self, ids_BxT):
    plain = self._plain[ids_BxT]
    from_plain = self.plain_table(jnp.maximum(plain, 0))
    from_code = self.embed_codes(self._digits[ids_BxT])
    return jnp.where((plain >= 0)[..., None], from_plain, from_code)


def bytes_layout(token_bytes, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``(bytes_VxL, lengths_V)``: each token's bytes, zero padded; length 0 = no bytes."""
  if token_bytes is None:
    raise ValueError("The codec embedding needs each token's bytes (token_bytes).")
  out = np.zeros((len(token_bytes), max_len), np.uint8)
  lengths = np.zeros(len(token_bytes), np.int32)
  for i, b in enumerate(token_bytes):
    if b is not None:
      if not 1 <= len(b) <= max_len:
        raise ValueError(f"Token {i} has {len(b)} bytes; the codec takes 1..{max_len}.")
      out[i, :len(b)] = np.frombuffer(b, np.uint8)
      lengths[i] = len(b)
  return out, lengths


class CodecEmbedding(nn.Module):
  vocab_size: int
  d_model: int
  token_bytes: tuple[bytes | None, ...]
  codec: Any

  def setup(self):
    b, lengths = bytes_layout(self.token_bytes, self.codec.max_len)
    self._bytes, self._lengths = jnp.asarray(b), jnp.asarray(lengths)
    self.plain_table = nn.Embed(max(int((lengths == 0).sum()), 1), self.d_model,
                                embedding_init=nn.initializers.normal(stddev=0.02))
    self._plain = jnp.asarray(np.cumsum(lengths == 0) - 1, jnp.int32)
    self.hidden = nn.Dense(self.d_model)
    self.project = nn.Dense(self.d_model)

  def __call__(self, ids_BxT):
    lengths_BxT = self._lengths[ids_BxT]
    flat_bytes = self._bytes[ids_BxT].reshape(-1, self._bytes.shape[1])
    codes = self.codec.encode(flat_bytes, jnp.maximum(lengths_BxT.reshape(-1), 1))
    from_code = self.project(nn.gelu(self.hidden(codes.reshape(*ids_BxT.shape, -1))))
    from_plain = self.plain_table(jnp.maximum(self._plain[ids_BxT], 0))
    return jnp.where((lengths_BxT == 0)[..., None], from_plain, from_code)


class TiedHead(nn.Module):
  embed: Any

  def __call__(self, h_BxTxD):
    if not hasattr(self.embed, "attend"):
      raise ValueError(f"head='tied' needs an embedding with attend(); "
                       f"{type(self.embed).__name__} has none: use head='dense'.")
    return self.embed.attend(h_BxTxD).astype(jnp.float32)

  def log_prob(self, logits_BxTxV, targets_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    return jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]

  def vocab_log_probs(self, logits_BxTxV):
    return jax.nn.log_softmax(logits_BxTxV, axis=-1)


class DenseHead(TiedHead):
  vocab_size: int = 0

  @nn.compact
  def __call__(self, h_BxTxD):
    return nn.Dense(self.vocab_size, name="out")(h_BxTxD).astype(jnp.float32)


class FactorizedHead(nn.Module):
  """Softmax over {plain tokens, "a code"} plus one softmax per FSQ dimension."""

  token_codes: tuple[int, ...]
  levels: tuple[int, ...]

  def setup(self):
    plain, digits = code_layout(self.token_codes, self.levels)
    self._plain, self._digits = jnp.asarray(plain), jnp.asarray(digits)
    self._num_plain = int((plain >= 0).sum())
    self.top = nn.Dense(self._num_plain + 1)
    self.digit_heads = [nn.Dense(l) for l in self.levels]

  def __call__(self, h_BxTxD):
    return {"top": self.top(h_BxTxD).astype(jnp.float32),
            "digits": [head(h_BxTxD).astype(jnp.float32) for head in self.digit_heads]}

  def log_prob(self, out, targets_BxT):
    top = jax.nn.log_softmax(out["top"], axis=-1)
    plain = self._plain[targets_BxT]
    row = jnp.where(plain >= 0, plain, self._num_plain)
    logp = jnp.take_along_axis(top, row[..., None], axis=-1)[..., 0]
    digits = self._digits[targets_BxT]
    code_logp = sum(
        jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), digits[..., d, None], -1)[..., 0]
        for d, logits in enumerate(out["digits"]))
    return logp + jnp.where(plain >= 0, 0.0, code_logp)

  def vocab_log_probs(self, out):
    """log p of every vocabulary token (not normalised over the vocabulary: codes
    outside it keep their share)."""
    top = jax.nn.log_softmax(out["top"], axis=-1)
    plain = self._plain
    logp = top[..., jnp.where(plain >= 0, plain, self._num_plain)]
    code_logp = sum(jax.nn.log_softmax(logits, axis=-1)[..., self._digits[:, d]]
                    for d, logits in enumerate(out["digits"]))
    return logp + jnp.where(plain >= 0, 0.0, code_logp)


def _bespoke(lm) -> nn.Module:
  if lm.token_counts is None:
    raise ValueError("The bespoke embedding needs each token's training count "
                     "(token_counts); fsqtok.curriculum.build_lm passes them.")
  return bespoke.BespokeEmbed(assignment=bespoke.assign_buckets(np.asarray(lm.token_counts)),
                              widths=bespoke.bucket_widths(lm.d_model), d_model=lm.d_model)


EMBEDDINGS = {
    "table": lambda lm: bespoke.StandardEmbed(lm.vocab_size, lm.d_model),
    "bespoke": _bespoke,
    "code_factorized": lambda lm: CodeFactorizedEmbedding(
        lm.vocab_size, lm.d_model, lm.token_codes, lm.levels),
    "codec": lambda lm: CodecEmbedding(lm.vocab_size, lm.d_model, lm.token_bytes, lm.codec),
}

HEADS = {
    "tied": lambda lm, embed: TiedHead(embed),
    "dense": lambda lm, embed: DenseHead(embed, lm.vocab_size),
    "factorized": lambda lm, embed: FactorizedHead(lm.token_codes, lm.levels),
}


def make_embedding(name: str, lm) -> nn.Module:
  if name not in EMBEDDINGS:
    raise ValueError(f"Unknown embedding {name!r}: choose one of {sorted(EMBEDDINGS)}.")
  return EMBEDDINGS[name](lm)


def make_head(name: str, lm, embed) -> nn.Module:
  if name not in HEADS:
    raise ValueError(f"Unknown head {name!r}: choose one of {sorted(HEADS)}.")
  return HEADS[name](lm, embed)
