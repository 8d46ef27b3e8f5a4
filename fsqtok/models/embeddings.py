"""Token embeddings and output heads of the language model, looked up by name.

Embeddings map ``ids_BxT -> x_BxTxD``:

* ``table``: one learned row per vocabulary id (`fsqtok.models.bespoke.StandardEmbed`).
* ``bespoke``: frequency buckets with their own widths (`fsqtok.models.bespoke.BespokeEmbed`,
  buckets from the tokens' training counts).
* ``code_factorized``: a token with an FSQ code gets the sum of one small table per FSQ
  dimension, indexed by that dimension's digit of its code (8 tables of 5-8 rows cover all
  4,096,000 codes); tokens without a code (specials, bytes) get rows of a small table.
* ``table_code``: a table row plus the ``code_factorized`` vector of the token's code: its
  own vector, and what its code shares with similar strings (a rare token starts from its
  code's); ``attend`` (the tied head) goes through the table.
* ``fuser``: the contextual fuser (`fsqtok.models.fuser`) where the ambiguity gate is on,
  the static table row where it is off. ``per_id`` (default): a per-id row of each
  token's own bytes (a precomputed table at inference, `fuser.lm_table_variables`) mixed
  over the window of tokens before it; ``per_position`` (the first design): the
  window's bytes encoded at every position. Its hyperparameters are the LM's ``fuser`` field (default
  `fsqtok.models.fuser.FuserSpec`). It reads the ``window_left`` ids before each token: the LM
  passes them (`context_len`), and its key/value cache keeps the last ones for generation.
* ``codec``: a token's bytes go through the codec's encoder and FSQ (straight-through),
  and an MLP maps its code to ``d_model``; specials get rows of a small table. The codec
  is a submodule, so the LM loss reaches it: frozen in the ``lm`` phase, trained in
  ``joint``.

Heads map hidden states to a distribution over the next token and give ``log p(target)``:

* ``tied``: logits = x . table rows (needs an embedding with ``attend``).
* ``dense``: an untied projection to the vocabulary.
* ``factorized``: a softmax over {tokens without a code} + {"a code"}, then the code's
  FSQ digits one dimension at a time (each softmax conditioned on the digits before it):
  a distribution over the whole code space, so ``log p(token) = log p(a code) +
  sum_d log p(digit_d | digit_<d)``; probability given to codes outside the vocabulary is
  honestly lost when a vocabulary token is scored. `fsqtok.models.generate.generate_open` samples
  in that open code space and decodes codes through the codec decoder.
* ``factorized_vocab``: the same, each digit restricted to those that still lead to a
  vocabulary code: a distribution over the vocabulary only.

Both factorized heads take ``head_flat_tokens`` (K): the K most frequent tokens with a code
(by their training counts) get their own row in the first softmax, like the tokens
without one, and the digits spell only the rarer rest (the code-space form of an adaptive
softmax: frequent tokens flat, the tail by its code).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsqtok.models import bespoke
from fsqtok.models import fuser as fuser_lib


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


def vocab_digit_tables(plain, digits, levels) -> tuple[np.ndarray, np.ndarray]:
  """Per token and FSQ dimension d, over digits x: ``allowed_VxKxL`` (some vocabulary code
  starts with this token's digits before d, then x) and ``next_token_VxKxL`` (one such
  token, -1 if none). Rows of tokens without a code are all-allowed / -1."""
  has = plain < 0
  num_dims, max_level = len(levels), max(levels)
  allowed = np.ones((len(plain), num_dims, max_level), bool)
  next_token = np.full((len(plain), num_dims, max_level), -1, np.int32)
  if not has.any():
    return allowed, next_token
  ids = np.flatnonzero(has)
  prefix_key = np.zeros(len(ids), np.int64)
  for d in range(num_dims):
    pair = prefix_key * max_level + digits[ids, d]
    pairs, first = np.unique(pair, return_index=True)
    for x in range(max_level):
      wanted = prefix_key * max_level + x
      slot = np.clip(np.searchsorted(pairs, wanted), 0, len(pairs) - 1)
      found = pairs[slot] == wanted
      allowed[ids, d, x] = found
      next_token[ids, d, x] = np.where(found, ids[first[slot]], -1)
    prefix_key = prefix_key * levels[d] + digits[ids, d]
  return allowed, next_token


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


class TableCodeEmbedding(nn.Module):
  """A table row plus the code-factorized vector of the token's code."""

  vocab_size: int
  d_model: int
  token_codes: tuple[int, ...]
  levels: tuple[int, ...]

  def setup(self):
    self.table = bespoke.StandardEmbed(self.vocab_size, self.d_model)
    self.code = CodeFactorizedEmbedding(self.vocab_size, self.d_model, self.token_codes,
                                        self.levels)

  def __call__(self, ids_BxT):
    return self.table(ids_BxT) + self.code(ids_BxT)

  def attend(self, x_BxTxD):
    return self.table.attend(x_BxTxD)


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
  """Softmax over {plain tokens, "a code"}, then the code's FSQ digits one dimension at a
  time, each conditioned on the hidden state and the digits already chosen:
  ``p(code) = prod_d p(digit_d | h, digit_<d)``. (Independent per-dimension softmaxes
  spread the mass over digit combinations that are no token: 4.41 bits/byte against 2.26
  for a table head in the pilot comparison.)

  ``vocab_only``: each digit's softmax only admits digits that, after the digits already
  chosen, still lead to a code of the vocabulary (a hierarchical softmax along the FSQ
  digits): a distribution over the vocabulary, with no mass on other codes."""

  token_codes: tuple[int, ...]
  levels: tuple[int, ...]
  width: int
  vocab_only: bool = False
  flat_ids: tuple[int, ...] = ()  # tokens with a code that get their own top row anyway

  @property
  def spelled_codes(self) -> np.ndarray:
    """The codes the digits spell: ``token_codes`` with the flat ids' set to -1."""
    codes = np.array(self.token_codes, np.int64)
    codes[list(self.flat_ids)] = -1
    return codes

  def setup(self):
    plain, digits = code_layout(self.spelled_codes, self.levels)
    self._plain, self._digits = jnp.asarray(plain), jnp.asarray(digits)
    self._num_plain = int((plain >= 0).sum())
    self._plain_ids = jnp.asarray(np.flatnonzero(plain >= 0), jnp.int32)
    self.top = nn.Dense(self._num_plain + 1)
    init = nn.initializers.normal(stddev=0.02)
    self.digit_embeds = [nn.Embed(l, self.width, embedding_init=init) for l in self.levels]
    self.dim_embed = self.param("dim_embed", init, (len(self.levels), self.width))
    self.mix = nn.Dense(self.width)
    self.digit_heads = [nn.Dense(l) for l in self.levels]
    allowed, next_token = vocab_digit_tables(plain, digits, self.levels)
    self._allowed = jnp.asarray(allowed) if self.vocab_only else None
    self._next_token = jnp.asarray(next_token)

  def __call__(self, h_BxTxD):
    if self.is_initializing():  # create the digit layers, which only log_prob/sample use
      self._digit_log_probs(h_BxTxD, jnp.zeros((*h_BxTxD.shape[:-1], len(self.levels)),
                                               jnp.int32))
    return {"top": self.top(h_BxTxD).astype(jnp.float32), "h": h_BxTxD}

  def _digit_logits(self, d, z, allowed_NxL):
    logits = self.digit_heads[d](z).astype(jnp.float32)
    if allowed_NxL is None:
      return logits
    return jnp.where(allowed_NxL[..., :self.levels[d]], logits, -1e30)

  def _digit_log_probs(self, h_NxD, digits_NxK, allowed_NxKxL=None):
    """log p(digit_d | h, digit_<d) for every dimension d, teacher-forced: ``[N, K]``
    (``allowed_NxKxL``: which digits each dimension admits, for ``vocab_only``)."""
    prefix = [jnp.zeros_like(h_NxD, jnp.float32)]
    for d, embed in enumerate(self.digit_embeds[:-1]):
      prefix.append(prefix[-1] + embed(digits_NxK[..., d]))
    out = []
    for d in range(len(self.levels)):
      z = nn.gelu(self.mix(h_NxD + prefix[d] + self.dim_embed[d]))
      logits = self._digit_logits(d, z, None if allowed_NxKxL is None
                                  else allowed_NxKxL[..., d, :])
      logp = jax.nn.log_softmax(logits, axis=-1)
      out.append(jnp.take_along_axis(logp, digits_NxK[..., d, None], -1)[..., 0])
    return jnp.stack(out, axis=-1)

  def log_prob(self, out, targets_BxT):
    top = jax.nn.log_softmax(out["top"], axis=-1)
    plain = self._plain[targets_BxT]
    row = jnp.where(plain >= 0, plain, self._num_plain)
    logp = jnp.take_along_axis(top, row[..., None], axis=-1)[..., 0]
    allowed = None if self._allowed is None else self._allowed[targets_BxT]
    code_logp = self._digit_log_probs(out["h"], self._digits[targets_BxT], allowed).sum(-1)
    return logp + jnp.where(plain >= 0, 0.0, code_logp)

  def vocab_log_probs(self, out):
    """log p of every vocabulary token: normalised over the vocabulary with
    ``vocab_only`` (each digit drawn among the vocabulary's codes), otherwise not (codes
    outside it keep their share). ``out`` of one position per row: ``[B, 1, ...]``."""
    top = jax.nn.log_softmax(out["top"], axis=-1)                          # [B, 1, P+1]
    plain = self._plain
    logp = top[..., jnp.where(plain >= 0, plain, self._num_plain)]        # [B, 1, V]
    h = out["h"][:, :, None, :]                                            # [B, 1, 1, D]
    h_Bx1xVxD = jnp.broadcast_to(h, (*h.shape[:2], plain.shape[0], h.shape[-1]))
    digits = jnp.broadcast_to(self._digits, (*h.shape[:2], *self._digits.shape))
    allowed = None if self._allowed is None else jnp.broadcast_to(
        self._allowed, (*h.shape[:2], *self._allowed.shape))
    code_logp = self._digit_log_probs(h_Bx1xVxD, digits, allowed).sum(-1)
    return logp + jnp.where(plain >= 0, 0.0, code_logp)

  def sample(self, out_B, rng, pick):
    """One draw per row from the head's own distribution over {plain tokens} and the whole
    code space: ``(token_B, code_B)``, ``token_B`` the plain token's id or -1 where a code
    was drawn, ``code_B`` the FSQ index drawn (or -1). ``out_B``: one position per row;
    ``pick(logits_BxN, rng) -> index_B`` chooses from logits (temperature, top-k, top-p)."""
    top_rng, *digit_rngs = jax.random.split(rng, 1 + len(self.levels))
    row = pick(out_B["top"], top_rng)
    is_code = row == self._num_plain
    h = out_B["h"]
    prefix = jnp.zeros_like(h, jnp.float32)
    digits = []
    # vocab_only: a token whose code starts with the digits drawn so far (its allowed
    # digits are those of every such token).
    first_code_token = int(np.flatnonzero(self.spelled_codes >= 0)[0])
    witness = jnp.full(h.shape[:1], first_code_token, jnp.int32)
    for d in range(len(self.levels)):
      z = nn.gelu(self.mix(h + prefix + self.dim_embed[d]))
      allowed = None if self._allowed is None else self._allowed[witness, d]
      digits.append(pick(self._digit_logits(d, z, allowed), digit_rngs[d]))
      witness = jnp.maximum(self._next_token[witness, d, digits[-1]], 0)
      if d + 1 < len(self.levels):
        prefix = prefix + self.digit_embeds[d](digits[-1])
    basis = np.concatenate([[1], np.cumprod(self.levels[:-1])]).astype(np.int64)
    code = sum(int(b) * x for b, x in zip(basis, digits)).astype(jnp.int32)
    token = jnp.where(is_code, -1, self._plain_ids[jnp.minimum(row, self._num_plain - 1)])
    return token, jnp.where(is_code, code, -1)


def _bespoke(lm) -> nn.Module:
  if lm.token_counts is None:
    raise ValueError("The bespoke embedding needs each token's training count "
                     "(token_counts); fsqtok.train.curriculum.build_lm passes them.")
  return bespoke.BespokeEmbed(assignment=bespoke.assign_buckets(np.asarray(lm.token_counts)),
                              widths=bespoke.bucket_widths(lm.d_model), d_model=lm.d_model)


EMBEDDINGS = {
    "table": lambda lm: bespoke.StandardEmbed(lm.vocab_size, lm.d_model),
    "bespoke": _bespoke,
    "code_factorized": lambda lm: CodeFactorizedEmbedding(
        lm.vocab_size, lm.d_model, lm.token_codes, lm.levels),
    "table_code": lambda lm: TableCodeEmbedding(lm.vocab_size, lm.d_model, lm.token_codes,
                                                lm.levels),
    "codec": lambda lm: CodecEmbedding(lm.vocab_size, lm.d_model, lm.token_bytes, lm.codec),
    "fuser": fuser_lib.lm_embedding,
}

# Embeddings that read the ids before each token: how many (the LM passes them, with the
# valid mask, and its key/value cache keeps the last ones).
CONTEXT = {"fuser": lambda lm: fuser_lib.lm_spec(lm).window_left}
OUTSIDE = fuser_lib.OUTSIDE  # "no token here" in those ids


def context_len(lm) -> int:
  """How many previous ids ``lm``'s embedding reads (0 for a plain lookup)."""
  return CONTEXT[lm.embedding](lm) if lm.embedding in CONTEXT else 0


def flat_ids(lm) -> tuple[int, ...]:
  """The ``lm.head_flat_tokens`` most frequent token ids with a code (by
  ``lm.token_counts``; ties to the lower id): the factorized head's flat rows."""
  k = getattr(lm, "head_flat_tokens", 0)
  if not k:
    return ()
  if k < 0:
    raise ValueError(f"lm.model.head_flat_tokens must be >= 0, got {k}.")
  if lm.token_counts is None or lm.token_codes is None:
    raise ValueError("head_flat_tokens needs each token's training count (token_counts) and "
                     "code: fsqtok.train.curriculum.build_lm passes them.")
  coded = np.flatnonzero(np.asarray(lm.token_codes) >= 0)
  if k >= len(coded):
    raise ValueError(f"lm.model.head_flat_tokens={k} leaves no token for the digits to "
                     f"spell: the vocabulary has {len(coded)} tokens with a code; use fewer.")
  counts = np.asarray(lm.token_counts)[coded]
  order = np.lexsort((coded, -counts))  # most frequent first, then the lower id
  return tuple(int(i) for i in np.sort(coded[order[:k]]))


def frequency_codes(token_counts, coded, levels) -> tuple[int, ...]:
  """Codes that carry no spelling, for a factorized head over any vocabulary (a control
  for the codec's codes; a BPE model's adaptive softmax): the tokens where ``coded`` is
  true, most frequent first (ties to the lower id), get the codes of their rank written
  with the first FSQ dimension as the most significant digit, so the head's first digit
  picks a frequency band and the later digits the token in it (adaptive-softmax-like);
  the others get -1 (plain rows)."""
  levels_D = np.asarray(levels, np.int64)
  coded_V = np.asarray(coded, bool)
  ids = np.flatnonzero(coded_V)
  if len(ids) > int(np.prod(levels_D)):
    raise ValueError(f"{len(ids)} coded tokens do not fit the {int(np.prod(levels_D))} "
                     f"codes of levels {tuple(levels)}.")
  order = ids[np.lexsort((ids, -np.asarray(token_counts)[ids]))]
  rank = np.arange(len(order), dtype=np.int64)
  basis_D = np.cumprod(np.r_[1, levels_D[:-1]])
  code = np.zeros_like(rank)
  for d in reversed(range(len(levels_D))):  # the last dimension is the least significant
    code += (rank % levels_D[d]) * basis_D[d]
    rank //= levels_D[d]
  out = np.full(len(coded_V), -1, np.int64)
  out[order] = code
  return tuple(int(c) for c in out)


def head_plain_count(lm) -> int:
  """Rows of a factorized head's first softmax besides "a code": the tokens without a
  code plus the flat ones."""
  return int((np.asarray(lm.token_codes) < 0).sum()) + len(flat_ids(lm))


HEADS = {
    "tied": lambda lm, embed: TiedHead(embed),
    "dense": lambda lm, embed: DenseHead(embed, lm.vocab_size),
    "factorized": lambda lm, embed: FactorizedHead(lm.token_codes, lm.levels, lm.d_model,
                                                   flat_ids=flat_ids(lm)),
    "factorized_vocab": lambda lm, embed: FactorizedHead(
        lm.token_codes, lm.levels, lm.d_model, vocab_only=True, flat_ids=flat_ids(lm)),
}


def make_embedding(name: str, lm) -> nn.Module:
  if name not in EMBEDDINGS:
    raise ValueError(f"Unknown embedding {name!r}: choose one of {sorted(EMBEDDINGS)}.")
  return EMBEDDINGS[name](lm)


def make_head(name: str, lm, embed) -> nn.Module:
  if name not in HEADS:
    raise ValueError(f"Unknown head {name!r}: choose one of {sorted(HEADS)}.")
  return HEADS[name](lm, embed)
