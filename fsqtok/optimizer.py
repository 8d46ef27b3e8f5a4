"""optax AdamW with linear warmup and cosine decay, built from ``config.optim``."""
from __future__ import annotations

import ml_collections
import optax


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


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
  c = optim_config
  chain = []
  if c.grad_clip:
    chain.append(optax.clip_by_global_norm(c.grad_clip))
  chain.append(optax.adamw(learning_rate_schedule(c, num_steps), b1=c.b1, b2=c.b2,
                           weight_decay=c.weight_decay))
  return optax.chain(*chain)
