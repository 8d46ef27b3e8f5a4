"""The one optimizer of every phase: optax AdamW with linear warmup and cosine decay,
built from ``config.optim``, with frozen parts; and parameter counts."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import traverse_util


def adamw_config(learning_rate: float, warmup_steps: int, *, end_lr_ratio: float = 0.01,
                 weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.99,
                 grad_clip: float = 1.0) -> ml_collections.ConfigDict:
  """The ``optim`` sub-config every experiment uses (read by `make_optimizer`)."""
  return ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, warmup_steps=warmup_steps, end_lr_ratio=end_lr_ratio,
      weight_decay=weight_decay, b1=b1, b2=b2, grad_clip=grad_clip))


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
  c = optim_config
  warmup = min(c.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=c.learning_rate * c.end_lr_ratio)


def frozen_labels(params, frozen: Sequence[str]):
  """``"frozen"`` for parameters under a top-level name in ``frozen``, else ``"train"``."""
  flat = traverse_util.flatten_dict(params)
  labels = {k: "frozen" if k[0] in frozen else "train" for k in flat}
  return traverse_util.unflatten_dict(labels)


def make_optimizer(optim_config, num_steps: int, params: Any = None,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """AdamW (clipped, warmup + cosine) over ``num_steps``. Parameters under the top-level
  names in ``frozen`` (``params`` then says which exist) get zero updates and no state."""
  c = optim_config
  chain = []
  if c.grad_clip:
    chain.append(optax.clip_by_global_norm(c.grad_clip))
  chain.append(optax.adamw(learning_rate_schedule(c, num_steps), b1=c.b1, b2=c.b2,
                           weight_decay=c.weight_decay))
  tx = optax.chain(*chain)
  if not frozen:
    return tx
  if params is None:
    raise ValueError("make_optimizer needs the parameters to freeze some of them.")
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               frozen_labels(params, frozen))


def count_params(params, frozen: Sequence[str] = ()) -> int:
  """Number of scalars in a parameter pytree, outside the top-level names in ``frozen``."""
  if frozen:
    params = {k: v for k, v in params.items() if k not in frozen}
  return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
