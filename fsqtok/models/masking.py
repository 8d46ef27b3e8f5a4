"""BERT-style masking for masked-LM objectives (the fuser's MLM loss, token techniques).

Of the tokens that may be masked, each is chosen with probability ``rate``; a chosen token
becomes ``[MASK]`` with probability ``mask_fraction`` (80%), a random ordinary token with
probability ``random_fraction`` (10%), and stays itself otherwise (10%). The loss is taken
on the chosen tokens only, against the original ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_tokens(rng: jax.Array, ids_BxT: jax.Array, maskable_BxT: jax.Array, *, mask_id: int,
                random_low: int, random_high: int, rate: float = 0.15,
                mask_fraction: float = 0.8, random_fraction: float = 0.1):
  """``(inputs_BxT, chosen_BxT)``: the corrupted ids and which positions carry the loss.

  ``maskable_BxT`` excludes padding and special tokens. Random replacements are drawn
  uniformly from ``[random_low, random_high)`` (the ordinary, non-special ids).
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate must be in [0, 1], got {rate}.")
  if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
    raise ValueError(f"mask_fraction ({mask_fraction}) and random_fraction "
                     f"({random_fraction}) must be >= 0 and sum to at most 1.")
  if not 0 <= random_low < random_high:
    raise ValueError(f"Need 0 <= random_low < random_high, got [{random_low}, {random_high}).")
  choose_rng, kind_rng, random_rng = jax.random.split(rng, 3)
  chosen = (jax.random.uniform(choose_rng, ids_BxT.shape) < rate) & maskable_BxT.astype(bool)
  u = jax.random.uniform(kind_rng, ids_BxT.shape)
  random_ids = jax.random.randint(random_rng, ids_BxT.shape, random_low, random_high,
                                  dtype=ids_BxT.dtype)
  replaced = jnp.where(u < mask_fraction, jnp.asarray(mask_id, ids_BxT.dtype),
                       jnp.where(u < mask_fraction + random_fraction, random_ids, ids_BxT))
  return jnp.where(chosen, replaced, ids_BxT), chosen
