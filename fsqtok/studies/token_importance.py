"""How much each position matters: attention received, hidden-state norm, and token pruning.

Pruning keeps, after a layer, the top-k positions of a sequence by an importance score,
with static shapes (k is a Python int fixed by the keep ratio and the sequence length):

* ``attention``: the mean attention weight a position receives at the pruning layer
  (over heads and over the queries allowed to see it, so that early positions, seen by
  more queries in a causal model, are not favoured just for being early);
* ``norm``: the L2 norm of its hidden state after the pruning layer (no attention
  weights needed, so it also works with fused attention kernels).

The prefix (registers, soft prompt) and the last ``keep_last`` positions are always kept;
padding is dropped first. The kept indices are sorted, so the kept positions keep their
causal order. `fsqtok.models.lm.TransformerLM` calls these functions when ``prune_layer > 0``.
The top-k is taken over the whole window (and attention received counts later queries),
so *which* context positions survive depends on the whole window: that is harmless for
the always-kept tail, which sees the whole window anyway, and it is why only the tail's
predictions are the pruned model's result.

Also here: the share of attention a model gives its first real token (an "attention
sink"), which registers are meant to absorb.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_BIG = 1e30  # forced-keep / never-keep scores (finite: top_k stays well defined)


def attention_received(weights_BxHxTxS: jax.Array, mask_BxTxS: jax.Array) -> jax.Array:
  """``[B, S]``: mean attention a key position receives from the queries that may see it."""
  total_BxS = jnp.sum(weights_BxHxTxS.astype(jnp.float32), axis=(1, 2))
  seen_by_BxS = jnp.sum(mask_BxTxS, axis=1) * weights_BxHxTxS.shape[1]
  return total_BxS / jnp.maximum(seen_by_BxS, 1)


def norm_score(x_BxTxD: jax.Array) -> jax.Array:
  """``[B, T]``: the L2 norm of each position's hidden state."""
  return jnp.linalg.norm(x_BxTxD.astype(jnp.float32), axis=-1)


SCORES = {
    "attention": lambda x_BxTxD, weights, mask: attention_received(weights, mask),
    "norm": lambda x_BxTxD, weights, mask: norm_score(x_BxTxD),
}


def importance(name: str, x_BxTxD, weights_BxHxTxS, mask_BxTxS) -> jax.Array:
  """The score ``name`` of every position (higher = more important)."""
  if name not in SCORES:
    raise ValueError(f"Unknown pruning score {name!r}: choose one of {sorted(SCORES)}.")
  return SCORES[name](x_BxTxD, weights_BxHxTxS, mask_BxTxS)


def check_pruning(layer: int, num_layers: int, keep: float, score: str, keep_last: int):
  """Clear errors for pruning settings that cannot work."""
  if not 1 <= layer < num_layers:
    raise ValueError(f"prune_layer must be in [1, num_layers - 1] = [1, {num_layers - 1}] "
                     f"(0 turns pruning off), got {layer}.")
  if not 0.0 < keep <= 1.0:
    raise ValueError(f"prune_keep is the fraction of positions kept, in (0, 1], got {keep}.")
  if score not in SCORES:
    raise ValueError(f"Unknown prune_score {score!r}: choose one of {sorted(SCORES)}.")
  if keep_last < 1:
    raise ValueError(f"prune_keep_last must be >= 1 (the last position is always predicted), "
                     f"got {keep_last}.")


def num_kept(n: int, num_prefix: int, keep: float, keep_last: int) -> int:
  """How many of ``n`` positions survive (a Python int: shapes stay static)."""
  t = n - num_prefix
  return num_prefix + min(t, max(keep_last, math.ceil(keep * t)))


def select_kept(score_BxT, valid_BxT, *, num_prefix: int, keep: float, keep_last: int):
  """``[B, K]`` sorted indices of the kept positions (see the module docstring)."""
  n = score_BxT.shape[1]
  k = num_kept(n, num_prefix, keep, keep_last)
  pos_T = jnp.arange(n)
  forced_T = (pos_T < num_prefix) | (pos_T >= n - keep_last)
  score_BxT = jnp.where(valid_BxT, score_BxT.astype(jnp.float32), -_BIG)
  score_BxT = jnp.where(forced_T[None], _BIG, score_BxT)
  _, idx_BxK = jax.lax.top_k(score_BxT, k)
  return jnp.sort(idx_BxK, axis=-1).astype(jnp.int32)


def kept_mask(kept_BxK, n: int) -> jax.Array:
  """``[B, n]`` bool: which positions were kept."""
  return jnp.any(kept_BxK[:, :, None] == jnp.arange(n)[None, None, :], axis=1)


def gather_kept(kept_BxK, x_BxTxD, positions_BxT, valid_BxT):
  """The kept rows of the hidden states, positions and validity."""
  x = jnp.take_along_axis(x_BxTxD, kept_BxK[:, :, None], axis=1)
  return (x, jnp.take_along_axis(positions_BxT, kept_BxK, axis=1),
          jnp.take_along_axis(valid_BxT, kept_BxK, axis=1))


def scatter_kept(full_BxTxD, kept_BxK, x_BxKxD):
  """``full_BxTxD`` with the kept rows replaced by ``x_BxKxD``."""
  return jax.vmap(lambda f, i, v: f.at[i].set(v))(full_BxTxD, kept_BxK, x_BxKxD)


def first_token_attention_share(attn, valid_BxT, num_prefix: int = 0) -> dict[str, np.ndarray]:
  """Per layer: the share of attention going to the first real token, and to the prefix.

  ``attn`` is `TransformerLM.hidden`'s list of ``[B, H, N, N]`` weights (``N = num_prefix
  + T``, no pruning); ``valid_BxT`` marks the real tokens (right padding). Averaged over
  heads and over the real queries after the first real token (the first token can only
  attend to itself and the prefix).
  """
  valid = np.asarray(valid_BxT, bool)
  first_B = num_prefix + np.argmax(valid, axis=1)
  first_BxT = np.arange(valid.shape[1])[None] + num_prefix
  queries_BxN = np.concatenate([np.zeros((valid.shape[0], num_prefix), bool),
                                valid & (first_BxT > first_B[:, None])], axis=1)
  to_first, to_prefix = [], []
  for w in attn:
    w = np.asarray(w, np.float64).mean(axis=1)  # [B, N, N], mean over heads
    first = np.take_along_axis(w, first_B[:, None, None].repeat(w.shape[1], 1), axis=2)[..., 0]
    prefix = w[:, :, :num_prefix].sum(-1)
    n = max(queries_BxN.sum(), 1)
    to_first.append(float((first * queries_BxN).sum() / n))
    to_prefix.append(float((prefix * queries_BxN).sum() / n))
  return {"first_token": np.asarray(to_first), "prefix": np.asarray(to_prefix)}
