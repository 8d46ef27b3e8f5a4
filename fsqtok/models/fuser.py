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


def empty_signals(batch: int, spec: FuserSpec) -> dict[str, jax.Array]:
  """All signals absent (zeros with ``present`` False): the shape every call takes."""
  return {"document": jnp.zeros((batch, spec.doc_dim)),
          "author": jnp.zeros((batch,), jnp.int32), "domain": jnp.zeros((batch,), jnp.int32),
          "timestamp": jnp.zeros((batch,)), "image": jnp.zeros((batch, spec.image_dim)),
          "audio": jnp.zeros((batch, spec.audio_dim)),
          "present": jnp.zeros((batch, len(SIGNALS)), bool)}


def make_signals(batch: int, spec: FuserSpec, **given) -> dict[str, jax.Array]:
  """Signals with the ``given`` ones (``document=..., author=...``) marked present."""
  unknown = set(given) - set(SIGNALS)
  if unknown:
    raise ValueError(f"Unknown signals {sorted(unknown)}; known: {SIGNALS}.")
  s = empty_signals(batch, spec)
  present = np.zeros((batch, len(SIGNALS)), bool)
  for k, v in given.items():
    v = jnp.asarray(v)
    if v.shape != s[k].shape:
      raise ValueError(f"Signal {k!r} has shape {v.shape}; expected {s[k].shape}.")
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


class InformationFuser(nn.Module):
  """``fragment_NxF`` + the present signals of each token's row -> ``fused_NxH``."""

  spec: FuserSpec

  @nn.compact
  def __call__(self, fragment_NxF, signals, rows_N):
    s = self.spec
    f = s.fragment_dim
    g = {k: v[rows_N] for k, v in signals.items()}
    projected = [
        nn.Dense(f, name="document")(g["document"]),
        nn.Embed(s.num_authors, f, name="author")(jnp.clip(g["author"], 0, s.num_authors - 1)),
        nn.Embed(s.num_domains, f, name="domain")(jnp.clip(g["domain"], 0, s.num_domains - 1)),
        nn.Dense(f, name="timestamp")(g["timestamp"][:, None]),
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
    h = nn.relu(nn.LayerNorm(name="ln1")(nn.Dense(s.hidden_dim, name="fuse1")(h)))
    h = nn.relu(nn.LayerNorm(name="ln2")(nn.Dense(s.hidden_dim, name="fuse2")(h)))
    return nn.Dense(s.fused_dim, name="fuse_out")(h)


class ContextualFuser(nn.Module):
  """``ids_BxT -> (x_BxTxD, aux)``: gated dynamic/static token vectors.

  ``aux``: ``gate`` (bool, where the dynamic vector was wanted), ``computed`` (where it
  was used: ``gate`` minus capacity overflow), ``score`` (the learned ambiguity score).
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
    ids = jnp.maximum(windows_NxW[:, self.spec.window_left], 0)
    in_set = self._in_set[ids]
    score = self.gate_score(windows_NxW)
    mode = self.spec.gate_mode
    if mode == "always":
      on = jnp.ones_like(in_set)
    elif mode == "set":
      on = in_set
    elif mode == "learned":
      on = score > self.spec.threshold
    else:
      on = in_set | (score > self.spec.threshold)
    return on, in_set, score

  def embed_windows(self, windows_NxW, rows_N, signals, compute_all: bool | None = None,
                    force_dynamic: bool = False, extra_ExW=None, extra_rows_E=None):
    """Gated vectors of ``N`` windows and ``aux`` (see the class docstring).

    ``extra_ExW``: more windows whose dynamic vectors are wanted (the InfoNCE views),
    computed in the same pass; returned as ``aux["extra"]``.
    """
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
      priority = jnp.where(on, 1.0 + jnp.where(in_set, 1.0, score), -1.0)
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
    signals = empty_signals(b, self.spec) if signals is None else signals
    windows = context_windows(ids_BxT, self.spec.window_left, self.spec.window_right,
                              prefix_BxP, valid_BxT).reshape(b * t, -1)
    rows = jnp.repeat(jnp.arange(b), t)
    x, aux = self.embed_windows(windows, rows, signals, compute_all, force_dynamic,
                                extra_ExW, extra_rows_E)
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

def info_nce(anchor_NxD, keys_NxD, shuffled_NxD, temperature: float):
  """InfoNCE: anchor ``i`` (the token with its true context) must pick key ``i`` (its
  context) among all keys (in-batch negatives) and beat ``shuffled_i`` (the token with a
  shuffled context) scored against key ``i``. Cosine similarities over ``temperature``."""
  norm = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
  a, k, s = norm(anchor_NxD), norm(keys_NxD), norm(shuffled_NxD)
  logits_NxN = a @ k.T / temperature
  extra_N = jnp.sum(s * k, -1) / temperature
  logits = jnp.concatenate([logits_NxN, extra_N[:, None]], axis=1)
  n = a.shape[0]
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[jnp.arange(n), jnp.arange(n)])


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
  """The fuser as the LM's embedding: causal (no right context), every gated token
  computed (a fixed capacity would let later tokens compete with earlier ones for slots,
  which is not causal). Its parameters are a `ContextualFuser`'s, under ``fuser``, so a
  fuser trained by `fsqtok.train.fuser_train` (with the same spec) can be loaded into it.

  ``valid_BxT``: padding is never context. ``prefix_BxP``: the ``window_left`` ids before
  ``ids_BxT`` (`OUTSIDE` where there are none); the LM keeps them in its key/value cache.
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
    x, _ = self.fuser(ids_BxT, prefix_BxP=prefix_BxP, compute_all=True, valid_BxT=valid_BxT)
    return x

  def attend(self, x_BxTxD):
    return self.fuser.attend(x_BxTxD)


def lm_spec(lm) -> FuserSpec:
  """The causal spec of ``lm``'s fuser embedding: its ``fuser`` field (a `FuserSpec` or a
  config of its fields; default `FuserSpec`) with ``window_right = 0`` and every token
  computed."""
  spec = getattr(lm, "fuser", None) or FuserSpec()
  if not isinstance(spec, FuserSpec):
    spec = FuserSpec.from_config(spec)
  return dataclasses.replace(spec, window_right=0, capacity=0.0)


def lm_embedding(lm) -> nn.Module:
  """The factory for `fsqtok.models.embeddings.EMBEDDINGS`: the fuser over ``lm``'s token bytes,
  with ``lm.fuser``'s hyperparameters (`lm_spec`) and ``lm.ambiguous_ids``."""
  if lm.token_bytes is None:
    raise ValueError("The fuser embedding needs each token's bytes (token_bytes): build "
                     "the LM with fsqtok.train.curriculum.build_lm or pass token_bytes.")
  return FuserEmbedding(lm.vocab_size, lm.d_model, tuple(lm.token_bytes), lm_spec(lm),
                        tuple(getattr(lm, "ambiguous_ids", ()) or ()))


# ---- inference with a host-side cache ---------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed_windows(model: ContextualFuser, params, windows_NxW, force_dynamic: bool):
  """Gated (or forced dynamic) vectors of windows, every one computed, no signals."""
  n = windows_NxW.shape[0]
  return model.apply({"params": params}, windows_NxW, jnp.zeros((n,), jnp.int32),
                     empty_signals(1, model.spec), True, force_dynamic,
                     method=ContextualFuser.embed_windows)[0]


class FuserEncoder:
  """Contextual vectors for texts, with an LRU cache keyed by (token, context ids).

  Only misses are computed, in chunks of ``chunk`` windows (the last chunk padded, so one
  compiled shape). ``context=False`` gives each token without neighbours;
  ``force_dynamic`` returns the dynamic vector even where the gate is off.
  """

  def __init__(self, model: ContextualFuser, params, tokenizer, *, cache_size: int = 100_000,
               chunk: int = 256):
    if cache_size < 0 or chunk < 1:
      raise ValueError(f"cache_size must be >= 0 and chunk >= 1 (got {cache_size}, {chunk}).")
    self.model, self.params, self.tok = model, params, tokenizer
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
      vec = np.asarray(_embed_windows(self.model, self.params, jnp.asarray(batch, jnp.int32),
                                      bool(force_dynamic)))
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
