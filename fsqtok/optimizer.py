"""optax AdamW with linear warmup and cosine decay, built from ``config.optim``."""
from __future__ import annotations

import optax


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
