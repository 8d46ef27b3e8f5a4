"""The contextual fuser: a token's vector computed from its bytes and its neighbours'.

For every position the fuser looks at a window of token ids around it (``window_left``
before, ``window_right`` after; the LM uses ``window_right = 0`` so it stays causal):

* **Fragment encoder**: the window's bytes, packed contiguously (optionally cut to
  ``context_bytes`` bytes each side of the token), with byte, position and segment
  (left context / token / right context) embeddings, go through a char-CNN (conv 3, conv
  5, masked max-pool) and a small transformer (mean over the token's own bytes); the
  enabled paths are concatenated and projected to ``fragment_dim``.
* **Information fuser**: optional per-row signals (document embedding, author id, domain
  id, timestamp, image and audio embeddings), each projected to ``fragment_dim``, with a
  presence mask; the fragment attends to the present ones (cross-attention), then a
  fusion MLP with LayerNorm and a projection head to ``d_model`` (LayerNorm, tanh).
* **Ambiguity gate**: a precomputed set of ambiguous ids and/or a learned score over a
  threshold (a cheap MLP over static vectors of the window). Where the gate is on the
  output is the dynamic vector, elsewhere the static table row. With ``capacity > 0``
  only the top ``ceil(capacity * B * T)`` gated tokens are computed (a static-shape
  gather/scatter); ``capacity = 0`` computes all. The learned score gets gradients by a
  straight-through estimator (forward: the hard gate).

Two designs (``design``), the same gate, signals, head, losses and entry points:

* ``per_position`` (the first design): the fragment encoder runs for every position, over
  the packed bytes of its whole window, as above. Its fixed capacity is not causal (later
  tokens compete with earlier ones for the top-c slots), so the LM embedding computes
  every gated token.
* ``per_id`` (the default): the fragment encoder runs over each token's **own** bytes, so
  its output is a function of the id: a per-id row (fragment vector, the mixer's query
  and key, the learned ambiguity score). While training it is computed for the ids a
  batch needs (``fragment_ids``: the batch's unique ids, static size, or all ``V``),
  gradients flowing; at inference `precompute_table` gives the exact ``V x P`` table,
  passed as the ``fuser_table`` variable collection (`table_variables`,
  `lm_table_variables`). Context enters through a cheap **mixer** over the window's rows:
  one local attention (query of the token, keys of the window, values = the fragments
  plus a per-slot vector, a per-slot bias) or a depthwise convolution (``mixer``); with
  ``mixer_layers=L > 1`` every slot first attends over the window (its id's query), then
  ``L - 2`` more such layers over those contextual states (a small bidirectional
  transformer within the window; ``mixer_mlp`` adds a feed-forward block after each),
  and the centre's query and the keys of the last layer are made from them; with
  ``static_in_rows`` an id's row adds a projection of its static row (a free per-id
  vector, still a function of the id) to the fragment of its bytes. Then the
  information fuser and head as above. The learned score is per id (from the static row
  and the fragment), so a token's gate depends only on its id.
  **Causal capacity** (``capacity > 0``): a gated token is computed when fewer than
  ``m = floor(capacity * (window_left + 1))`` of the ``window_left`` tokens before it are
  gated (a sliding-window limit on requests). It reads only the ids of the token's own
  left window, so it is causal, and generation through a key/value cache (which keeps
  those ids) equals recomputing the sequence; and any ``window_left + 1`` consecutive
  tokens hold at most ``m`` computed ones, so a row of ``T`` tokens needs at most
  ``m * ceil(T / (window_left + 1))`` dynamic slots: a static budget, gathered and
  scattered like the first design's top-c. Its price: where gated tokens cluster more
  densely than ``m`` per window, the later ones of the cluster keep their static rows.

Everything is vectorized over positions and jit-compiled; the only host-side part is the
LRU cache of `FuserEncoder`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

OUTSIDE = -1  # a window slot beyond the sequence
MAX_SPECIALS = 64  # tokens without bytes, each one pseudo-char after the 256 bytes
SIGNALS = ("document", "author", "domain", "timestamp", "image", "audio")
GATE_MODES = ("both", "set", "learned", "always")
DESIGNS = ("per_id", "per_position")
MIXERS = ("attention", "conv")
FRAGMENT_IDS = ("batch", "all")
TABLE = "fuser_table"  # the variable collection of the per-id table at inference


@dataclasses.dataclass(frozen=True)
class FuserSpec:
  """The fuser's hyperparameters (``config.fuser.model``; see configs/fuser.py)."""

  window_left: int = 4
  window_right: int = 4
  context_bytes: int = 0          # 0: whole window tokens; else bytes kept each side
  max_token_bytes: int = 16
  char_dim: int = 64
  hidden_dim: int = 128
  use_cnn: bool = True
  use_transformer: bool = True
  transformer_layers: int = 2
  transformer_heads: int = 4
  fragment_dim: int = 128
  fusion_heads: int = 4
  fused_dim: int = 128
  doc_dim: int = 64
  num_authors: int = 16
  num_domains: int = 16
  image_dim: int = 32
  audio_dim: int = 32
  gate_mode: str = "both"         # both | set | learned | always
  gate_hidden: int = 64
  threshold: float = 0.5
  capacity: float = 0.0           # share of tokens computed dynamically; 0: all
  design: str = "per_id"          # per_id | per_position (see the module docstring)
  mixer: str = "attention"        # per_id: attention | conv over the window's rows
  mixer_dim: int = 32             # per_id attention: query/key width
  mixer_heads: int = 2            # per_id attention: heads
  mixer_layers: int = 1           # per_id attention: L > 1 = L - 1 layers where every
                                  # slot attends over the window, then the centre
  mixer_mlp: bool = False         # per_id, mixer_layers > 1: a feed-forward block after
                                  # each of those layers
  static_in_rows: bool = False    # per_id: an id's row adds a projection of its static
                                  # row (a free per-id vector) to the fragment of its bytes
  fragment_ids: str = "batch"     # per_id training: encode the batch's unique ids | all

  @classmethod
  def from_config(cls, c) -> "FuserSpec":
    d = dict(c) if not hasattr(c, "to_dict") else c.to_dict()
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"Unknown fuser.model fields {sorted(unknown)}; known: "
                       f"{sorted(f.name for f in dataclasses.fields(cls))}.")
    spec = cls(**d)
    spec.validate()
    return spec

  def validate(self) -> None:
    if not (self.use_cnn or self.use_transformer):
      raise ValueError("fuser.model: enable use_cnn or use_transformer (or both).")
    if self.gate_mode not in GATE_MODES:
      raise ValueError(f"fuser.model.gate_mode must be one of {GATE_MODES}, "
                       f"got {self.gate_mode!r}.")
    if self.window_left < 0 or self.window_right < 0:
      raise ValueError("fuser.model.window_left/window_right must be >= 0.")
    if not 0.0 <= self.capacity <= 1.0:
      raise ValueError(f"fuser.model.capacity must be in [0, 1], got {self.capacity}.")
    if self.char_dim % self.transformer_heads or self.fragment_dim % self.fusion_heads:
      raise ValueError("char_dim must be divisible by transformer_heads and fragment_dim "
                       "by fusion_heads.")
    for name, value, allowed in (("design", self.design, DESIGNS),
                                 ("mixer", self.mixer, MIXERS),
                                 ("fragment_ids", self.fragment_ids, FRAGMENT_IDS)):
      if value not in allowed:
        raise ValueError(f"fuser.model.{name} must be one of {allowed}, got {value!r}.")
    if self.static_in_rows and self.design != "per_id":
      raise ValueError("fuser.model.static_in_rows needs design='per_id' (it changes the "
                       "per-id rows).")
    if self.design == "per_id":
      if (self.mixer_heads < 1 or self.mixer_dim % self.mixer_heads
          or self.fragment_dim % self.mixer_heads):
        raise ValueError(f"fuser.model.mixer_heads ({self.mixer_heads}) must divide "
                         f"mixer_dim ({self.mixer_dim}) and fragment_dim "
                         f"({self.fragment_dim}).")
      if self.mixer_layers < 1 or (self.mixer_layers > 1 and self.mixer != "attention"):
        raise ValueError(f"fuser.model.mixer_layers must be >= 1 (above 1 only with "
                         f"mixer='attention'), got {self.mixer_layers} with "
                         f"{self.mixer!r}.")
      if self.mixer_mlp and self.mixer_layers < 2:
        raise ValueError("fuser.model.mixer_mlp adds a feed-forward block to the layers "
                         "where every slot attends over the window: it needs "
                         "mixer_layers >= 2.")
      if self.capacity and not self.per_window:
        raise ValueError(f"fuser.model.capacity={self.capacity} allows no computed token "
                         f"per window of window_left + 1 = {self.window_left + 1} tokens "
                         f"(per_id: floor(capacity * (window_left + 1)) must be >= 1): "
                         f"raise it, or 0 to compute every gated token.")

  @property
  def per_window(self) -> int:
    """per_id capacity: computed tokens allowed in any ``window_left + 1`` in a row."""
    return int(math.floor(self.capacity * (self.window_left + 1) + 1e-9))

  def budget(self, seq_len: int) -> int:
    """per_id capacity: the dynamic slots a row of ``seq_len`` tokens needs at most."""
    if not self.capacity:
      return seq_len
    return min(seq_len, self.per_window * -(-seq_len // (self.window_left + 1)))

  @property
  def table_width(self) -> int:
    """per_id: the width of a per-id row (fragment [, query, key], score)."""
    return self.fragment_dim + (2 * self.mixer_dim if self.mixer == "attention" else 0) + 1

  @property
  def window(self) -> int:
    return self.window_left + 1 + self.window_right

  @property
  def packed_len(self) -> int:
    if self.context_bytes:
      return min(self.window * self.max_token_bytes,
                 self.max_token_bytes + self.context_bytes * (
                     (self.window_left > 0) + (self.window_right > 0)))
    return self.window * self.max_token_bytes


# ---- token bytes and windows ------------------------------------------------------------

def char_layout(token_bytes: Sequence[bytes | None], max_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """``(chars_VxL, lengths_V)``: byte ``b`` is char ``b + 1`` (0 pads); a token without
  bytes (a special) is one char ``257 + k`` for the ``k``-th such token."""
  chars = np.zeros((len(token_bytes), max_len), np.int32)
  lengths = np.zeros(len(token_bytes), np.int32)
  k = 0
  for i, b in enumerate(token_bytes):
    if b is None:
      chars[i, 0], lengths[i] = 257 + k, 1
      k += 1
      continue
    if not 1 <= len(b) <= max_len:
      raise ValueError(f"Token {i} has {len(b)} bytes; fuser.model.max_token_bytes is "
                       f"{max_len}: raise it.")
    chars[i, :len(b)] = np.frombuffer(b, np.uint8).astype(np.int32) + 1
    lengths[i] = len(b)
  return chars, lengths


def context_windows(ids_BxT: jax.Array, left: int, right: int,
                    prefix_BxP: jax.Array | None = None,
                    valid_BxT: jax.Array | None = None) -> jax.Array:
  """``windows_BxTxW``: for each position the ids ``[t - left, t + right]`` (`OUTSIDE`
  beyond the sequence and where ``valid_BxT`` is False, so padding is never seen as
  context; ``prefix_BxP``: the ids before the sequence, e.g. while generating with a
  key/value cache, `OUTSIDE` where there are none)."""
  b, t = ids_BxT.shape
  if valid_BxT is not None:
    ids_BxT = jnp.where(valid_BxT, ids_BxT, OUTSIDE)
  before = jnp.full((b, left), OUTSIDE, ids_BxT.dtype)
  if prefix_BxP is not None and left:
    p = prefix_BxP.astype(ids_BxT.dtype)[:, -left:]
    before = jnp.concatenate([before, p], axis=1)[:, -left:]
  padded = jnp.concatenate([before, ids_BxT, jnp.full((b, right), OUTSIDE, ids_BxT.dtype)], 1)
  idx_TxW = jnp.arange(t)[:, None] + jnp.arange(left + 1 + right)[None, :]
  return padded[:, idx_TxW]


def document_signal(ids_BxT: jax.Array, valid_BxT: jax.Array, dim: int) -> jax.Array:
  """A cheap document embedding: the normalised hashed bag of the row's ids."""
  one_hot = jax.nn.one_hot(ids_BxT % dim, dim) * valid_BxT[..., None]
  bag = one_hot.sum(1)
  return bag / jnp.maximum(jnp.linalg.norm(bag, axis=-1, keepdims=True), 1e-6)


# The periods, in the timestamp's unit, of its sines and cosines: 1 to 10^4.5 units
# (years, say: from a year to thirty millennia).
TIMESTAMP_PERIODS = tuple(10.0 ** (k / 2) for k in range(10))


def timestamp_features(t_N: jax.Array) -> jax.Array:
  """``[N, 2 * len(TIMESTAMP_PERIODS)]`` sines and cosines of the timestamps: bounded
  whatever their scale (a raw year or Unix time into a dense layer would swamp the other
  signals), and close for close times at every period longer than their gap."""
  angles = t_N[:, None].astype(jnp.float32) * (2 * np.pi / np.asarray(TIMESTAMP_PERIODS,
                                                                     np.float32))
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def empty_signals(batch: int, spec: FuserSpec) -> dict[str, jax.Array]:
  """All signals absent (zeros with ``present`` False): the shape every call takes."""
  return {"document": jnp.zeros((batch, spec.doc_dim)),
          "author": jnp.zeros((batch,), jnp.int32), "domain": jnp.zeros((batch,), jnp.int32),
          "timestamp": jnp.zeros((batch,)), "image": jnp.zeros((batch, spec.image_dim)),
          "audio": jnp.zeros((batch, spec.audio_dim)),
          "present": jnp.zeros((batch, len(SIGNALS)), bool)}


def make_signals(batch: int, spec: FuserSpec, **given) -> dict[str, jax.Array]:
  """Signals with the ``given`` ones (``document=..., author=...``) marked present;
  author and domain ids must lie in ``[0, num_authors)`` / ``[0, num_domains)`` (inside
  the model they are clipped, which would make every larger id the last one)."""
  unknown = set(given) - set(SIGNALS)
  if unknown:
    raise ValueError(f"Unknown signals {sorted(unknown)}; known: {SIGNALS}.")
  s = empty_signals(batch, spec)
  present = np.zeros((batch, len(SIGNALS)), bool)
  for k, v in given.items():
    v = jnp.asarray(v)
    if v.shape != s[k].shape:
      raise ValueError(f"Signal {k!r} has shape {v.shape}; expected {s[k].shape}.")
    count = {"author": spec.num_authors, "domain": spec.num_domains}.get(k)
    if count is not None and v.size and not 0 <= int(v.min()) <= int(v.max()) < count:
      raise ValueError(f"Signal {k!r} has ids {int(v.min())}..{int(v.max())}; the model "
                       f"has {count} (fuser.model.num_{k}s): raise it or map the ids "
                       f"into [0, {count}).")
    if v.size and jnp.issubdtype(v.dtype, jnp.floating) and not bool(jnp.isfinite(v).all()):
      raise ValueError(f"Signal {k!r} has a NaN or infinite value: give finite values, "
                       f"or leave the signal out for the rows that have none.")
    s[k] = v.astype(s[k].dtype)
    present[:, SIGNALS.index(k)] = True
  s["present"] = jnp.asarray(present)
  return s


# ---- modules ----------------------------------------------------------------------------

class FragmentEncoder(nn.Module):
  """``chars_NxS, segments_NxS, mask_NxS -> fragment_NxF`` (char-CNN and/or transformer)."""

  spec: FuserSpec

  @nn.compact
  def __call__(self, chars_NxS, segments_NxS, mask_NxS):
    s = self.spec
    length = chars_NxS.shape[1]
    x = (nn.Embed(257 + MAX_SPECIALS, s.char_dim, name="chars")(chars_NxS)
         + nn.Embed(3, s.char_dim, name="segments")(segments_NxS)
         + self.param("positions", nn.initializers.normal(0.02), (length, s.char_dim)))
    x = x * mask_NxS[..., None]
    parts = []
    if s.use_cnn:
      h = nn.relu(nn.Conv(s.hidden_dim, (3,), padding="SAME", name="conv3")(x))
      h = nn.relu(nn.Conv(s.hidden_dim, (5,), padding="SAME", name="conv5")(h))
      parts.append(jnp.max(jnp.where(mask_NxS[..., None], h, -1e9), axis=1))
    if s.use_transformer:
      attn_mask = nn.make_attention_mask(mask_NxS, mask_NxS)
      h = x
      for i in range(s.transformer_layers):
        y = nn.LayerNorm(name=f"ln_attn{i}")(h)
        h = h + nn.MultiHeadDotProductAttention(s.transformer_heads, name=f"attn{i}")(
            y, y, mask=attn_mask)
        y = nn.LayerNorm(name=f"ln_mlp{i}")(h)
        h = h + nn.Dense(s.char_dim, name=f"mlp_out{i}")(
            nn.gelu(nn.Dense(s.hidden_dim, name=f"mlp_in{i}")(y)))
      own = (mask_NxS & (segments_NxS == 1)).astype(h.dtype)[..., None]
      parts.append(jnp.sum(h * own, 1) / jnp.maximum(jnp.sum(own, 1), 1.0))
    return nn.Dense(s.fragment_dim, name="combine")(jnp.concatenate(parts, axis=-1))


class _LeadingDense(nn.Module):
  """`nn.Dense` (the same parameters) that may be given only the leading ``x`` columns of
  its ``in_features`` inputs, the rest being zeros (their kernel rows are skipped)."""

  features: int
  in_features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if x.shape[-1] < self.in_features:
      kernel = kernel[:x.shape[-1]]
    return x @ kernel + bias


def window_attention(q_KxWxHxD, k_KxWxHxD, v_KxWxHxE, bias_HxWxW, present_KxW):
  """Every slot of each window over the window's present slots: ``ctx_KxWx(H*E)``."""
  k, w = present_KxW.shape
  logits = (jnp.einsum("kvhd,kwhd->khvw", q_KxWxHxD, k_KxWxHxD)
            / math.sqrt(q_KxWxHxD.shape[-1]) + bias_HxWxW[None])
  weights = jax.nn.softmax(jnp.where(present_KxW[:, None, None, :], logits, -1e9), axis=-1)
  return jnp.einsum("khvw,kwhe->kvhe", weights, v_KxWxHxE).reshape(k, w, -1)


class WindowSelfAttention(nn.Module):
  """A mixer layer after the first: every slot attends over the window from its
  contextual state (query, key and value made from it, a per-slot-pair bias), residual,
  LayerNorm. ``states_KxWxF, present_KxW -> states_KxWxF``."""

  spec: FuserSpec

  @nn.compact
  def __call__(self, states_KxWxF, present_KxW):
    s = self.spec
    k, w, f = states_KxWxF.shape
    h, dq = s.mixer_heads, s.mixer_dim // s.mixer_heads
    q = nn.Dense(s.mixer_dim, name="query")(states_KxWxF).reshape(k, w, h, dq)
    key = nn.Dense(s.mixer_dim, use_bias=False, name="key")(states_KxWxF).reshape(k, w, h, dq)
    value = nn.Dense(f, name="value")(states_KxWxF).reshape(k, w, h, f // h)
    bias = self.param("slot_bias", nn.initializers.zeros_init(), (h, s.window, s.window))
    ctx = window_attention(q, key, value, bias, present_KxW)
    return nn.LayerNorm(name="norm")(states_KxWxF + nn.Dense(f, name="out")(ctx))


class WindowFeedForward(nn.Module):
  """A feed-forward block on each slot's state (``hidden_dim`` wide), residual, LayerNorm."""

  spec: FuserSpec

  @nn.compact
  def __call__(self, states_KxWxF):
    h = nn.gelu(nn.Dense(self.spec.hidden_dim, name="up")(states_KxWxF))
    return nn.LayerNorm(name="norm")(
        states_KxWxF + nn.Dense(states_KxWxF.shape[-1], name="down")(h))


class InformationFuser(nn.Module):
  """``fragment_NxF`` + the present signals of each token's row -> ``fused_NxH``.

  ``signals=None``: none present (the LM embedding). That skips the signal projections
  and the cross-attention, which would add nothing (same parameters, same result up to
  rounding)."""

  spec: FuserSpec

  @nn.compact
  def __call__(self, fragment_NxF, signals, rows_N):
    s = self.spec
    f = s.fragment_dim
    fuse1 = _LeadingDense(s.hidden_dim, f * (1 + len(SIGNALS)), name="fuse1")
    if signals is None and self.is_initializing():  # create every parameter
      signals, rows_N = empty_signals(1, s), jnp.zeros_like(rows_N)
    if signals is None:
      return self.mlp(fuse1(fragment_NxF))
    g = {k: v[rows_N] for k, v in signals.items()}
    projected = [
        nn.Dense(f, name="document")(g["document"]),
        nn.Embed(s.num_authors, f, name="author")(jnp.clip(g["author"], 0, s.num_authors - 1)),
        nn.Embed(s.num_domains, f, name="domain")(jnp.clip(g["domain"], 0, s.num_domains - 1)),
        nn.Dense(f, name="timestamp")(timestamp_features(g["timestamp"])),
        nn.Dense(f, name="image")(g["image"]),
        nn.Dense(f, name="audio")(g["audio"]),
    ]
    present_NxK = g["present"]
    signals_NxKxF = jnp.stack(projected, 1) * present_NxK[..., None]
    attended = nn.MultiHeadDotProductAttention(s.fusion_heads, name="cross_attention")(
        fragment_NxF[:, None], signals_NxKxF, mask=present_NxK[:, None, None, :])[:, 0]
    any_present = jnp.any(present_NxK, axis=-1, keepdims=True)
    fragment_NxF = fragment_NxF + jnp.where(any_present, attended, 0.0)
    h = jnp.concatenate([fragment_NxF, signals_NxKxF.reshape(fragment_NxF.shape[0], -1)], -1)
    return self.mlp(fuse1(h))

  @nn.nowrap
  def mlp(self, h):
    h = nn.relu(nn.LayerNorm(name="ln1")(h))
    h = nn.relu(nn.LayerNorm(name="ln2")(nn.Dense(self.spec.hidden_dim, name="fuse2")(h)))
    return nn.Dense(self.spec.fused_dim, name="fuse_out")(h)


class ContextualFuser(nn.Module):
  """``ids_BxT -> (x_BxTxD, aux)``: gated dynamic/static token vectors.

  ``aux``: ``gate`` (bool, where the dynamic vector was wanted), ``computed`` (where it
  was used: ``gate`` minus capacity overflow), ``score`` (the learned ambiguity score).
  The ``per_id`` design sows ``intermediates/dynamic_rows``: how many windows went
  through the dynamic path (its static budget).
  """

  vocab_size: int
  d_model: int
  token_bytes: tuple[bytes | None, ...]
  spec: FuserSpec = FuserSpec()
  ambiguous_ids: tuple[int, ...] = ()

  def setup(self):
    self.spec.validate()
    if len(self.token_bytes) != self.vocab_size:
      raise ValueError(f"token_bytes has {len(self.token_bytes)} entries for a vocabulary "
                       f"of {self.vocab_size}.")
    chars, lengths = char_layout(self.token_bytes, self.spec.max_token_bytes)
    if chars.max() >= 257 + MAX_SPECIALS:
      raise ValueError(f"More than {MAX_SPECIALS} tokens without bytes (specials): raise "
                       f"fsqtok.models.fuser.MAX_SPECIALS.")
    self._chars, self._lengths = jnp.asarray(chars), jnp.asarray(lengths)
    in_set = np.zeros(self.vocab_size, bool)
    if self.ambiguous_ids:
      ids = np.asarray(self.ambiguous_ids)
      if ids.min() < 0 or ids.max() >= self.vocab_size:
        raise ValueError(f"ambiguous_ids must lie in [0, {self.vocab_size}).")
      in_set[ids] = True
    self._in_set = jnp.asarray(in_set)
    self.static = nn.Embed(self.vocab_size, self.d_model,
                           embedding_init=nn.initializers.normal(1.0 / math.sqrt(self.d_model)))
    self.fragment = FragmentEncoder(self.spec)
    self.fuser = InformationFuser(self.spec)
    self.project = nn.Dense(self.d_model)
    self.project_norm = nn.LayerNorm()
    self.gate_hidden = nn.Dense(self.spec.gate_hidden)
    self.gate_out = nn.Dense(1)
    self.mlm_head = nn.Dense(self.vocab_size)
    if self.spec.design == "per_id":
      s, init = self.spec, nn.initializers.normal(0.02)
      if s.mixer == "attention":
        self.mix_query = nn.Dense(s.mixer_dim)
        # no key bias: it adds the same logit to every slot (softmax ignores it)
        self.mix_key = nn.Dense(s.mixer_dim, use_bias=False)
        self.slot_bias = self.param("slot_bias", nn.initializers.zeros_init(),
                                    (s.mixer_heads, s.window))
        self.slot_value = self.param("slot_value", init, (s.window, s.fragment_dim))
        if s.mixer_layers > 1:  # the first layer: every slot over the window
          self.slot_bias_all = self.param("slot_bias_all", nn.initializers.zeros_init(),
                                          (s.mixer_heads, s.window, s.window))
          self.mix_out_all = nn.Dense(s.fragment_dim)
          self.mix_norm = nn.LayerNorm()
          # layers 2 .. L-1: every slot over the window again, from the states
          self.mix_deep = [WindowSelfAttention(s) for _ in range(s.mixer_layers - 2)]
          self.mix_mlp = ([WindowFeedForward(s) for _ in range(s.mixer_layers - 1)]
                          if s.mixer_mlp else [])
          # the last layer's query and keys come from the contextual states
          self.mix_query_2 = nn.Dense(s.mixer_dim)
          self.mix_key_2 = nn.Dense(s.mixer_dim, use_bias=False)
      else:
        self.slot_weight = self.param("slot_weight", init, (s.window, s.fragment_dim))
      self.mix_out = nn.Dense(s.fragment_dim)
      if s.static_in_rows:
        self.static_to_fragment = nn.Dense(s.fragment_dim)

  # -- the per-id design --

  def id_rows(self, ids_U):
    """``rows_UxP`` (P = `FuserSpec.table_width`): each id's fragment vector over its own
    bytes (``static_in_rows``: plus a projection of its static row) [, the mixer's query
    and key], and its learned ambiguity score (last column)."""
    s = self.spec
    ids_U = jnp.maximum(ids_U, 0)
    chars = self._chars[ids_U]
    mask = jnp.arange(s.max_token_bytes)[None, :] < self._lengths[ids_U][:, None]
    fragment = self.fragment(chars, jnp.ones_like(chars), mask)
    static = self.static(ids_U)
    if s.static_in_rows:  # what the id's free vector learns, beside what its bytes give
      fragment = fragment + self.static_to_fragment(static)
    h = nn.relu(self.gate_hidden(jnp.concatenate([static, fragment], -1)))
    score = jax.nn.sigmoid(self.gate_out(h))
    parts = [fragment]
    if s.mixer == "attention":
      parts += [self.mix_query(fragment), self.mix_key(fragment)]
    return jnp.concatenate(parts + [score], -1)

  def _rows_for(self, ids_M, pool_P=None):
    """``(table_UxP, index_M)``: per-id rows and where each of ``ids_M`` finds its own:
    the precomputed table if one is given (``fuser_table`` collection), else computed
    for the unique ids of ``pool_P`` (which holds every id of ``ids_M``; default
    ``ids_M``) with ``fragment_ids="batch"`` (``min(V, P)`` rows: a static size), or for
    every id."""
    ids_M = jnp.maximum(ids_M, 0)
    if self.has_variable(TABLE, "table"):
      table = self.get_variable(TABLE, "table")
      if table.shape != (self.vocab_size, self.spec.table_width):
        raise ValueError(f"The fuser_table has shape {table.shape}; this fuser needs "
                         f"{(self.vocab_size, self.spec.table_width)}: precompute it with "
                         f"the same spec.")
      return table, ids_M
    pool_P = ids_M if pool_P is None else jnp.maximum(pool_P, 0)
    n = pool_P.shape[0]
    if self.spec.fragment_ids == "all" or n >= self.vocab_size:
      return self.id_rows(jnp.arange(self.vocab_size)), ids_M
    # sorted unique ids, padded with the largest id (so still sorted): searchsorted
    # finds each id's row
    uniq_U = jnp.unique(pool_P, size=n, fill_value=self.vocab_size - 1)
    return self.id_rows(uniq_U), jnp.searchsorted(uniq_U, ids_M).astype(jnp.int32)

  def _gate_from_rows(self, ids_N, score_N):
    """``(on_N, in_set_N)``: the gate of ``gate_mode`` for tokens ``ids_N`` with learned
    scores ``score_N``."""
    in_set = self._in_set[jnp.maximum(ids_N, 0)]
    mode = self.spec.gate_mode
    if mode == "always":
      on = jnp.ones_like(in_set)
    elif mode == "set":
      on = in_set
    elif mode == "learned":
      on = score_N > self.spec.threshold
    else:
      on = in_set | (score_N > self.spec.threshold)
    return on, in_set

  def mix(self, rows_KxWxP, windows_KxW, rows_K, signals):
    """The dynamic vectors of ``K`` windows from their per-id rows: the mixer over the
    window, the information fuser, the head."""
    s = self.spec
    k, w = windows_KxW.shape
    f = s.fragment_dim
    centre = s.window_left
    present = (windows_KxW >= 0) | (jnp.arange(w) == centre)[None]  # K x W
    fragment_KxWxF = rows_KxWxP[..., :f]
    own_KxF = fragment_KxWxF[:, centre]
    if s.mixer == "attention":
      h, dq = s.mixer_heads, s.mixer_dim // s.mixer_heads
      q = rows_KxWxP[:, centre, f:f + s.mixer_dim].reshape(k, h, dq)
      key = rows_KxWxP[..., f + s.mixer_dim:f + 2 * s.mixer_dim].reshape(k, w, h, dq)
      value = (fragment_KxWxF + self.slot_value[None]).reshape(k, w, h, f // h)
      if s.mixer_layers > 1:
        # each slot's query (its id's row) over the window's keys gives contextual
        # states; more layers over them; the centre's last query and the keys are made
        # from the last states
        q_all = rows_KxWxP[..., f:f + s.mixer_dim].reshape(k, w, h, dq)
        ctx_KxWxF = window_attention(q_all, key, value, self.slot_bias_all, present)
        states = self.mix_norm(fragment_KxWxF + self.mix_out_all(ctx_KxWxF))
        for i in range(s.mixer_layers - 1):
          if i:
            states = self.mix_deep[i - 1](states, present)
          if s.mixer_mlp:
            states = self.mix_mlp[i](states)
        q = self.mix_query_2(states[:, centre]).reshape(k, h, dq)
        key = self.mix_key_2(states).reshape(k, w, h, dq)
        value = (states + self.slot_value[None]).reshape(k, w, h, f // h)
      logits_KxHxW = (jnp.einsum("khd,kwhd->khw", q, key) / math.sqrt(dq)
                      + self.slot_bias[None])
      logits_KxHxW = jnp.where(present[:, None, :], logits_KxHxW, -1e9)
      weights = jax.nn.softmax(logits_KxHxW, axis=-1)
      context_KxF = jnp.einsum("khw,kwhe->khe", weights, value).reshape(k, f)
    else:
      context_KxF = jnp.sum(jnp.where(present[..., None], fragment_KxWxF, 0.0)
                            * self.slot_weight[None], axis=1)
    mixed = own_KxF + self.mix_out(context_KxF)
    fused = self.fuser(mixed, signals, rows_K)
    return jnp.tanh(self.project_norm(self.project(fused)))

  def _embed_windows_per_id(self, windows_NxW, rows_N, signals, compute_all, force_dynamic,
                            extra_ExW, extra_rows_E, budget, pool_ids):
    s = self.spec
    n, w = windows_NxW.shape
    centre = s.window_left
    all_windows = windows_NxW if extra_ExW is None else jnp.concatenate([windows_NxW,
                                                                         extra_ExW])
    if pool_ids is not None and extra_ExW is not None:
      pool_ids = jnp.concatenate([pool_ids, extra_ExW.reshape(-1)])
    table, index = self._rows_for(all_windows.reshape(-1), pool_ids)
    index_MxW = index.reshape(all_windows.shape)
    ids = jnp.maximum(windows_NxW[:, centre], 0)
    static = self.static(ids)
    score_NxW = table[index_MxW[:n], -1]
    on_NxW, in_set_NxW = self._gate_from_rows(windows_NxW, score_NxW)
    on, in_set, score = on_NxW[:, centre], in_set_NxW[:, centre], score_NxW[:, centre]
    if force_dynamic:
      on = jnp.ones_like(on)
    learned = on & ~in_set if s.gate_mode in ("both", "learned") else jnp.zeros_like(on)
    weight = on.astype(static.dtype) + jnp.where(
        learned, score - jax.lax.stop_gradient(score), 0.0)
    computed = on
    use_capacity = s.capacity > 0 and not force_dynamic and compute_all is not True
    if use_capacity:  # causal: fewer than m gated tokens among the window_left before it
      before = jnp.sum(on_NxW[:, :centre] & (windows_NxW[:, :centre] >= 0), axis=1)
      computed = on & (before < s.per_window) & (windows_NxW[:, centre] >= 0)
    gather = use_capacity and budget is not None and budget < n
    if gather:  # the first `budget` computed windows (all of them: see FuserSpec.budget)
      rank = jnp.cumsum(computed) - 1
      slot = jnp.where(computed & (rank < budget), rank, budget)
      idx_C = jnp.zeros((budget + 1,), jnp.int32).at[slot].set(
          jnp.arange(n, dtype=jnp.int32))[:budget]
      used_C = jnp.zeros((budget + 1,), bool).at[slot].set(True)[:budget]
      computed = computed & (rank < budget)
      sel_windows, sel_rows, sel_index = windows_NxW[idx_C], rows_N[idx_C], index_MxW[idx_C]
    else:
      sel_windows, sel_rows, sel_index = windows_NxW, rows_N, index_MxW[:n]
    k = sel_windows.shape[0]
    if extra_ExW is not None:
      sel_windows = jnp.concatenate([sel_windows, extra_ExW])
      sel_rows = jnp.concatenate([sel_rows, extra_rows_E])
      sel_index = jnp.concatenate([sel_index, index_MxW[n:]])
    self.sow("intermediates", "dynamic_rows", jnp.int32(k))
    both = self.mix(table[sel_index], sel_windows, sel_rows, signals)
    dyn, extra = both[:k], (both[k:] if extra_ExW is not None else None)
    if gather:  # unused slots (gathered position 0) are dropped, not written
      dyn = static.at[jnp.where(used_C, idx_C, n)].set(dyn, mode="drop")
    x = static + jnp.where(computed, weight, 0.0)[:, None] * (dyn - static)
    aux = {"gate": on, "computed": computed, "score": score, "in_set": in_set}
    if extra is not None:
      aux["extra"] = extra
    return x, aux

  # -- pieces --

  def pack(self, windows_NxW):
    """The window's bytes packed left to right: ``(chars_NxS, segments_NxS, mask_NxS)``."""
    s = self.spec
    n, w = windows_NxW.shape
    length = s.max_token_bytes
    ids = jnp.maximum(windows_NxW, 0)
    chars = self._chars[ids]                                       # N x W x L
    lens = jnp.where(windows_NxW >= 0, self._lengths[ids], 0)      # N x W
    seg_W = jnp.where(jnp.arange(w) < s.window_left, 0,
                      jnp.where(jnp.arange(w) == s.window_left, 1, 2))
    real = jnp.arange(length)[None, None, :] < lens[..., None]     # N x W x L
    if s.context_bytes:  # keep only the bytes within context_bytes of the token
      wl, p_L = s.window_left, jnp.arange(length)[None, None, :]
      lens_left, lens_right = lens[:, :wl], lens[:, wl + 1:]
      after = jnp.cumsum(lens_left[:, ::-1], axis=1)[:, ::-1] - lens_left  # up to the token
      before = jnp.cumsum(lens_right, axis=1) - lens_right                 # from the token
      dist = jnp.concatenate([after[..., None] + lens_left[..., None] - p_L,
                              jnp.zeros((n, 1, length), lens.dtype),
                              before[..., None] + p_L + 1], axis=1)
      real = real & (dist <= s.context_bytes)
    flat_real = real.reshape(n, -1)
    pos = jnp.cumsum(flat_real, axis=1) - 1
    out_len = s.packed_len
    target = jnp.where(flat_real & (pos < out_len), pos, out_len)  # out_len: dropped
    rows = jnp.arange(n)[:, None]
    seg_flat = jnp.broadcast_to(seg_W[None, :, None], (n, w, length)).reshape(n, -1)
    packed_chars = jnp.zeros((n, out_len + 1), jnp.int32).at[rows, target].set(
        chars.reshape(n, -1))[:, :out_len]
    packed_seg = jnp.zeros((n, out_len + 1), jnp.int32).at[rows, target].set(
        seg_flat)[:, :out_len]
    mask = jnp.zeros((n, out_len + 1), bool).at[rows, target].set(True)[:, :out_len]
    return packed_chars, packed_seg, mask

  def dynamic(self, windows_NxW, rows_N, signals):
    """The dynamic vectors of ``N`` windows (``rows_N``: each one's batch row)."""
    fragment = self.fragment(*self.pack(windows_NxW))
    fused = self.fuser(fragment, signals, rows_N)
    return jnp.tanh(self.project_norm(self.project(fused)))

  def gate_score(self, windows_NxW):
    """The learned ambiguity score in (0, 1), from static vectors of the window."""
    w = self.spec.window_left
    own = self.static(jnp.maximum(windows_NxW[:, w], 0))
    present = (windows_NxW >= 0).astype(own.dtype)
    ctx = (self.static(jnp.maximum(windows_NxW, 0)) * present[..., None]).sum(1)
    ctx = ctx / jnp.maximum(present.sum(1, keepdims=True), 1.0)
    h = nn.relu(self.gate_hidden(jnp.concatenate([own, ctx], -1)))
    return jax.nn.sigmoid(self.gate_out(h)[:, 0])

  def gate(self, windows_NxW):
    """``(on_N, in_set_N, score_N)``: where the gate chooses the dynamic vector."""
    score = self.gate_score(windows_NxW)
    on, in_set = self._gate_from_rows(windows_NxW[:, self.spec.window_left], score)
    return on, in_set, score

  def embed_windows(self, windows_NxW, rows_N, signals, compute_all: bool | None = None,
                    force_dynamic: bool = False, extra_ExW=None, extra_rows_E=None,
                    budget: int | None = None, pool_ids=None):
    """Gated vectors of ``N`` windows and ``aux`` (see the class docstring).

    ``extra_ExW``: more windows whose dynamic vectors are wanted (the InfoNCE views),
    computed in the same pass; returned as ``aux["extra"]``. ``compute_all``: ignore the
    capacity (None: ``capacity == 0``). per_id: ``budget`` (the dynamic slots, e.g.
    `FuserSpec.budget` per row of consecutive windows; None: compute every window and
    keep the computed ones), ``pool_ids`` (every id the windows hold, fewer than their
    slots: the ids whose per-id rows are computed), ``signals=None``: none present.
    """
    if self.spec.design == "per_id":
      return self._embed_windows_per_id(windows_NxW, rows_N, signals, compute_all,
                                        force_dynamic, extra_ExW, extra_rows_E, budget,
                                        pool_ids)
    if signals is None:
      signals = empty_signals(1, self.spec)
      rows_N = jnp.zeros_like(rows_N)
      if extra_rows_E is not None:
        extra_rows_E = jnp.zeros_like(extra_rows_E)
    s = self.spec
    n = windows_NxW.shape[0]
    ids = jnp.maximum(windows_NxW[:, s.window_left], 0)
    static = self.static(ids)
    on, in_set, score = self.gate(windows_NxW)
    if force_dynamic:
      on = jnp.ones_like(on)
    # straight-through: the forward pass uses the hard gate; the score gets gradients
    learned = on & ~in_set if s.gate_mode in ("both", "learned") else jnp.zeros_like(on)
    weight = on.astype(static.dtype) + jnp.where(
        learned, score - jax.lax.stop_gradient(score), 0.0)
    compute_all = (s.capacity == 0.0) if compute_all is None else compute_all
    def dynamic_with_extra(windows, rows):
      if extra_ExW is None:
        return self.dynamic(windows, rows, signals), None
      k = windows.shape[0]
      both = self.dynamic(jnp.concatenate([windows, extra_ExW]),
                          jnp.concatenate([rows, extra_rows_E]), signals)
      return both[:k], both[k:]

    if compute_all or force_dynamic:
      dyn, extra = dynamic_with_extra(windows_NxW, rows_N)
      computed = on
    else:
      c = max(1, min(n, math.ceil(s.capacity * n)))
      real = windows_NxW[:, s.window_left] >= 0  # padding (OUTSIDE) takes no slot
      priority = jnp.where(on & real, 1.0 + jnp.where(in_set, 1.0, score), -1.0)
      _, idx_C = jax.lax.top_k(jax.lax.stop_gradient(priority), c)
      dyn_C, extra = dynamic_with_extra(windows_NxW[idx_C], rows_N[idx_C])
      chosen_C = on[idx_C]
      computed = jnp.zeros((n,), bool).at[idx_C].set(chosen_C)
      dyn = static.at[idx_C].set(jnp.where(chosen_C[:, None], dyn_C, static[idx_C]))
    x = static + jnp.where(computed, weight, 0.0)[:, None] * (dyn - static)
    aux = {"gate": on, "computed": computed, "score": score, "in_set": in_set}
    if extra is not None:
      aux["extra"] = extra
    return x, aux

  # -- entry points --

  def __call__(self, ids_BxT, signals=None, prefix_BxP=None, compute_all: bool | None = None,
               force_dynamic: bool = False, extra_ExW=None, extra_rows_E=None,
               valid_BxT=None):
    b, t = ids_BxT.shape
    if signals is None and self.spec.design == "per_position":
      signals = empty_signals(b, self.spec)
    windows = context_windows(ids_BxT, self.spec.window_left, self.spec.window_right,
                              prefix_BxP, valid_BxT).reshape(b * t, -1)
    rows = jnp.repeat(jnp.arange(b), t)
    pool = None
    if self.spec.design == "per_id":  # the ids the windows can hold
      pool = [ids_BxT.reshape(-1)]
      if prefix_BxP is not None and self.spec.window_left:
        pool.append(prefix_BxP[:, -self.spec.window_left:].reshape(-1).astype(ids_BxT.dtype))
      pool = jnp.concatenate(pool)
    x, aux = self.embed_windows(windows, rows, signals, compute_all, force_dynamic,
                                extra_ExW, extra_rows_E, budget=b * self.spec.budget(t),
                                pool_ids=pool)
    return x.reshape(b, t, -1), {k: v if k == "extra" else v.reshape(b, t)
                                 for k, v in aux.items()}

  def mlm_logits(self, x_BxTxD):
    return self.mlm_head(x_BxTxD)

  def attend(self, x_BxTxD):
    return self.static.attend(x_BxTxD)

  def init_all(self, ids_BxT):
    """Creates every parameter (init only)."""
    x, _ = self(ids_BxT, compute_all=True)
    return self.mlm_logits(x)


def init_params(model: ContextualFuser, rng: jax.Array, seq_len: int):
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32),
                    method=ContextualFuser.init_all)["params"]


# ---- losses -----------------------------------------------------------------------------

def info_nce(anchor_NxD, keys_NxD, shuffled_NxD, temperature: float, valid_N=None):
  """InfoNCE: anchor ``i`` (the token with its true context) must pick key ``i`` (its
  context) among all keys (in-batch negatives) and beat ``shuffled_i`` (the token with a
  shuffled context) scored against key ``i``. Cosine similarities over ``temperature``.
  Rows where ``valid_N`` is False (samples drawn from padding) are neither anchors nor
  negatives."""
  n = anchor_NxD.shape[0]
  valid_N = jnp.ones((n,), bool) if valid_N is None else valid_N
  norm = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
  a, k, s = norm(anchor_NxD), norm(keys_NxD), norm(shuffled_NxD)
  logits_NxN = jnp.where(valid_N[None, :], a @ k.T / temperature, -1e9)
  extra_N = jnp.sum(s * k, -1) / temperature
  logits = jnp.concatenate([logits_NxN, extra_N[:, None]], axis=1)
  nll_N = -jax.nn.log_softmax(logits, axis=-1)[jnp.arange(n), jnp.arange(n)]
  w = valid_N.astype(nll_N.dtype)
  return jnp.sum(nll_N * w) / jnp.maximum(jnp.sum(w), 1.0)


def token_means(x_NxD, ids_N, weights_N, vocab_size: int):
  """Per-token mean of ``x`` over the weighted rows: ``(means_VxD, counts_V)``."""
  sums = jax.ops.segment_sum(x_NxD * weights_N[:, None], ids_N, vocab_size)
  counts = jax.ops.segment_sum(weights_N, ids_N, vocab_size)
  return sums / jnp.maximum(counts, 1e-6)[:, None], counts


def drift_penalty(x_NxD, ids_N, weights_N, reference_VxD, seen_V):
  """Mean squared distance of each token's vectors to its reference (tokens with one)."""
  w = weights_N * seen_V[ids_N]
  d = jnp.sum((x_NxD - reference_VxD[ids_N]) ** 2, -1)
  return jnp.sum(d * w) / jnp.maximum(jnp.sum(w), 1.0)


def ema_update(reference_VxD, seen_V, means_VxD, counts_V, momentum: float):
  """``reference <- (1 - m) reference + m mean`` for tokens in the batch; a token seen
  the first time takes its mean."""
  here = counts_V > 0
  new = jnp.where(seen_V[:, None], (1 - momentum) * reference_VxD + momentum * means_VxD,
                  means_VxD)
  return jnp.where(here[:, None], new, reference_VxD), seen_V | here


# ---- the LM embedding -------------------------------------------------------------------

class FuserEmbedding(nn.Module):
  """The fuser as the LM's embedding: causal (no right context). ``per_position``: every
  gated token computed (its fixed capacity would let later tokens compete with earlier
  ones for slots, which is not causal); ``per_id``: its causal capacity applies. Its
  parameters are a `ContextualFuser`'s, under ``fuser``, so a fuser trained by
  `fsqtok.train.fuser_train` (with the same spec) can be loaded into it.

  ``valid_BxT``: padding is never context. ``prefix_BxP``: the ``window_left`` ids before
  ``ids_BxT`` (`OUTSIDE` where there are none); the LM keeps them in its key/value cache.
  per_id at inference: give the LM `lm_table_variables` (the precomputed per-id table)
  with its parameters; without it the per-id rows are computed from the batch's ids
  (training: gradients reach the fragment encoder).
  """

  vocab_size: int
  d_model: int
  token_bytes: tuple[bytes | None, ...]
  spec: FuserSpec = FuserSpec(window_right=0)
  ambiguous_ids: tuple[int, ...] = ()

  def setup(self):
    if self.spec.window_right:
      raise ValueError("The LM embedding must be causal: window_right must be 0.")
    self.fuser = ContextualFuser(self.vocab_size, self.d_model, self.token_bytes, self.spec,
                                 self.ambiguous_ids)

  def __call__(self, ids_BxT, valid_BxT=None, prefix_BxP=None):
    compute_all = True if self.spec.design == "per_position" else None
    x, _ = self.fuser(ids_BxT, prefix_BxP=prefix_BxP, compute_all=compute_all,
                      valid_BxT=valid_BxT)
    return x

  def attend(self, x_BxTxD):
    return self.fuser.attend(x_BxTxD)


def lm_spec(lm) -> FuserSpec:
  """The causal spec of ``lm``'s fuser embedding: its ``fuser`` field (a `FuserSpec` or a
  config of its fields; default `FuserSpec`) with ``window_right = 0`` (and, for the
  ``per_position`` design, whose capacity is not causal, every token computed)."""
  spec = getattr(lm, "fuser", None) or FuserSpec()
  if not isinstance(spec, FuserSpec):
    spec = FuserSpec.from_config(spec)
  spec = dataclasses.replace(spec, window_right=0)
  return dataclasses.replace(spec, capacity=0.0) if spec.design == "per_position" else spec


def lm_embedding(lm) -> nn.Module:
  """The factory for `fsqtok.models.embeddings.EMBEDDINGS`: the fuser over ``lm``'s token bytes,
  with ``lm.fuser``'s hyperparameters (`lm_spec`) and ``lm.ambiguous_ids``."""
  if lm.token_bytes is None:
    raise ValueError("The fuser embedding needs each token's bytes (token_bytes): build "
                     "the LM with fsqtok.train.curriculum.build_lm or pass token_bytes.")
  return FuserEmbedding(lm.vocab_size, lm.d_model, tuple(lm.token_bytes), lm_spec(lm),
                        tuple(getattr(lm, "ambiguous_ids", ()) or ()))


# ---- the per-id table at inference ------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0,))
def _id_rows(model: ContextualFuser, params, ids_U):
  return model.apply({"params": params}, ids_U, method=ContextualFuser.id_rows)


def precompute_table(model: ContextualFuser, params, chunk: int = 4096) -> jax.Array:
  """The per-id rows of every id, ``V x P`` (`ContextualFuser.id_rows`, in chunks of
  ``chunk`` ids: one compiled shape), for a ``per_id`` fuser at inference."""
  if model.spec.design != "per_id":
    raise ValueError(f"Only the per_id design has a per-id table (this fuser is "
                     f"{model.spec.design!r}).")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}.")
  v = model.vocab_size
  chunk = min(chunk, v)
  parts = []
  for start in range(0, v, chunk):
    ids = np.minimum(np.arange(start, start + chunk), v - 1).astype(np.int32)
    parts.append(_id_rows(model, params, jnp.asarray(ids))[:min(chunk, v - start)])
  return jnp.concatenate(parts)


def table_variables(model: ContextualFuser, params, chunk: int = 4096) -> dict:
  """``{"params": params, "fuser_table": ...}`` for a standalone ``per_id`` fuser's
  ``apply`` at inference."""
  return {"params": params, TABLE: {"table": precompute_table(model, params, chunk)}}


def lm_fuser(lm) -> ContextualFuser:
  """The `ContextualFuser` inside ``lm``'s fuser embedding (its parameters:
  ``params["embed"]["fuser"]``)."""
  emb = lm_embedding(lm)
  return ContextualFuser(emb.vocab_size, emb.d_model, emb.token_bytes, emb.spec,
                         emb.ambiguous_ids)


def lm_table_variables(lm, params, chunk: int = 4096) -> dict:
  """The variables of an LM with a ``per_id`` fuser embedding at inference: its
  parameters and the precomputed per-id table (``lm.apply(lm_table_variables(lm, p),
  ...)``; the same outputs as ``{"params": p}``, without running the fragment encoder)."""
  table = precompute_table(lm_fuser(lm), params["embed"]["fuser"], chunk)
  return {"params": params, TABLE: {"embed": {"fuser": {"table": table}}}}


# ---- inference with a host-side cache ---------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed_windows(model: ContextualFuser, variables, windows_NxW, force_dynamic: bool):
  """Gated (or forced dynamic) vectors of windows, no signals: every gated one computed
  (``per_position``) or as the causal capacity decides from the window (``per_id``)."""
  n = windows_NxW.shape[0]
  per_id = model.spec.design == "per_id"
  return model.apply(variables, windows_NxW, jnp.zeros((n,), jnp.int32),
                     None if per_id else empty_signals(1, model.spec),
                     None if per_id else True, force_dynamic,
                     method=ContextualFuser.embed_windows)[0]


class FuserEncoder:
  """Contextual vectors for texts, with an LRU cache keyed by (token, context ids).

  Only misses are computed, in chunks of ``chunk`` windows (the last chunk padded, so one
  compiled shape). ``context=False`` gives each token without neighbours;
  ``force_dynamic`` returns the dynamic vector even where the gate is off. A ``per_id``
  fuser's per-id table is precomputed once, here.
  """

  def __init__(self, model: ContextualFuser, params, tokenizer, *, cache_size: int = 100_000,
               chunk: int = 256):
    if cache_size < 0 or chunk < 1:
      raise ValueError(f"cache_size must be >= 0 and chunk >= 1 (got {cache_size}, {chunk}).")
    self.model, self.params, self.tok = model, params, tokenizer
    self.variables = (table_variables(model, params) if model.spec.design == "per_id"
                      else {"params": params})
    self.cache_size, self.chunk = cache_size, chunk
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self.hits = self.misses = self.evictions = 0

  @property
  def metrics(self) -> dict[str, float]:
    total = self.hits + self.misses
    return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
            "hit_rate": self.hits / total if total else float("nan"),
            "cached": len(self._cache)}

  def windows(self, ids: Sequence[int], context: bool = True) -> np.ndarray:
    s = self.model.spec
    ids_1xT = jnp.asarray(np.asarray(ids, np.int32)[None])
    w = np.asarray(context_windows(ids_1xT, s.window_left, s.window_right))[0]
    if not context:
      w = np.where(np.arange(s.window)[None] == s.window_left, w, OUTSIDE)
    return w

  def encode_ids(self, ids_list: Sequence[Sequence[int]], *, context: bool = True,
                 force_dynamic: bool = False,
                 positions: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """``[n_i, d_model]`` vectors of each id sequence (``positions``: only those tokens of
    each sequence, in that order)."""
    if positions is not None and len(positions) != len(ids_list):
      raise ValueError(f"positions has {len(positions)} entries for {len(ids_list)} "
                       f"sequences.")
    keys, windows = [], []
    for j, ids in enumerate(ids_list):
      w = (self.windows(ids, context) if len(ids)
           else np.zeros((0, self.model.spec.window), np.int32))
      if positions is not None:
        w = w[np.asarray(positions[j], np.int64)]
      windows.append(w)
      keys.append([(force_dynamic, *map(int, row)) for row in w])
    out = {}
    todo = {}
    for ks, ws in zip(keys, windows):
      for k, row in zip(ks, ws):
        if k in out or k in todo:
          continue
        if self.cache_size and k in self._cache:
          self._cache.move_to_end(k)
          out[k] = self._cache[k]
        else:
          todo[k] = row
    n_total = sum(len(k) for k in keys)
    self.hits += n_total - len(todo) if self.cache_size else 0
    self.misses += len(todo) if self.cache_size else n_total
    rows = list(todo.items())
    for start in range(0, len(rows), self.chunk):
      part = rows[start:start + self.chunk]
      batch = np.stack([r for _, r in part] + [part[0][1]] * (self.chunk - len(part)))
      vec = np.asarray(_embed_windows(self.model, self.variables,
                                      jnp.asarray(batch, jnp.int32), bool(force_dynamic)))
      for i, (k, _) in enumerate(part):
        out[k] = vec[i]
        if self.cache_size:
          self._cache[k] = vec[i]
          if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
            self.evictions += 1
    d = self.model.d_model
    return [np.stack([out[k] for k in ks]) if ks else np.zeros((0, d), np.float32)
            for ks in keys]

  def encode(self, texts: Sequence[str], **kw) -> list[np.ndarray]:
    """``[n_tokens_i, d_model]`` vectors of each text's tokens."""
    return self.encode_ids([self.tok.encode(t) for t in texts], **kw)
