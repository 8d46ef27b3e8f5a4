"""Sequence classification on top of the language model.

Two ways to read a class out of `fsqtok.models.lm.TransformerLM`:

* `SequenceClassifier`: the LM's final hidden states pooled into one vector, then a dense
  layer. Poolings (``POOLINGS``): ``cls`` (the state at the last real [CLS] token, which
  `fsqtok.studies.token_roles` puts at the end: in a causal model only the end sees everything),
  ``mean`` (masked mean over the real tokens) and ``attention`` (a learned query scoring
  the real tokens, softmax, weighted sum). Padding never enters any of them.
* `verbalizer_logits`: no new layer at all; the LM's own next-token log-probabilities at
  the last real position, read at one "label word" token per class. This is what prompt
  tuning (`fsqtok.models.soft_prompt`) steers: the frozen LM already has an output for it.

Training: a `flax.training.train_state.TrainState` whose ``apply_fn(params, batch)``
returns class logits; `train_step` is the pure step, `fit` runs it in `fsqtok.train.loop`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from fsqtok.models import lm as lm_lib
from fsqtok.train import loop as train_loop


def last_index(mask_BxT: jax.Array) -> jax.Array:
  """``[B]``: the index of the last True in each row (0 if none)."""
  t = mask_BxT.shape[1]
  return jnp.max(jnp.where(mask_BxT, jnp.arange(t)[None], 0), axis=1)


def cls_pool(h_BxTxD, ids_BxT, valid_BxT, cls_id: int):
  """The hidden state at the last real [CLS]."""
  idx_B = last_index((ids_BxT == cls_id) & valid_BxT)
  return jnp.take_along_axis(h_BxTxD, idx_B[:, None, None], axis=1)[:, 0]


def mean_pool(h_BxTxD, valid_BxT):
  """The mean hidden state over the real tokens."""
  w_BxT = valid_BxT.astype(h_BxTxD.dtype)
  return jnp.einsum("btd,bt->bd", h_BxTxD, w_BxT) / jnp.maximum(w_BxT.sum(1, keepdims=True), 1)


class AttentionPool(nn.Module):
  """A learned query attends over the real tokens (one head)."""

  @nn.compact
  def __call__(self, h_BxTxD, valid_BxT):
    d = h_BxTxD.shape[-1]
    query_D = self.param("query", nn.initializers.normal(stddev=0.02), (d,))
    keys = nn.Dense(d, name="key")(h_BxTxD)
    logits_BxT = jnp.einsum("btd,d->bt", keys, query_D) / jnp.sqrt(d)
    logits_BxT = jnp.where(valid_BxT, logits_BxT.astype(jnp.float32), -1e9)
    w_BxT = jax.nn.softmax(logits_BxT, axis=-1).astype(h_BxTxD.dtype)
    return jnp.einsum("btd,bt->bd", h_BxTxD, w_BxT)


POOLINGS = ("cls", "mean", "attention")


class SequenceClassifier(nn.Module):
  """``(ids_BxT, valid_BxT) -> logits_BxC``; the LM's parameters are under ``lm``."""

  lm: lm_lib.TransformerLM
  num_classes: int
  pooling: str = "cls"
  cls_id: int = -1

  @nn.compact
  def __call__(self, ids_BxT, valid_BxT, segments_BxT=None, prefix_BxKxD=None,
               deterministic: bool = True):
    if self.pooling not in POOLINGS:
      raise ValueError(f"Unknown pooling {self.pooling!r}: choose one of {POOLINGS}.")
    if self.pooling == "cls" and self.cls_id < 0:
      raise ValueError("pooling='cls' needs cls_id (the tokenizer's [CLS] id, e.g. "
                       "fsqtok.studies.token_roles.WithRoles(tok).cls_id).")
    valid_BxT = valid_BxT.astype(bool)
    h, _, _ = self.lm.hidden(ids_BxT, valid_BxT, deterministic=deterministic,
                             segments_BxT=segments_BxT, prefix_BxKxD=prefix_BxKxD)
    if self.pooling == "cls":
      pooled = cls_pool(h, ids_BxT, valid_BxT, self.cls_id)
    elif self.pooling == "mean":
      pooled = mean_pool(h, valid_BxT)
    else:
      pooled = AttentionPool(name="pool")(h, valid_BxT)
    return nn.Dense(self.num_classes, name="head")(pooled).astype(jnp.float32)


def verbalizer_logits(model: lm_lib.TransformerLM, lm_params, ids_BxT, valid_BxT,
                      label_ids: tuple[int, ...], prefix_BxKxD=None):
  """``[B, C]``: log p(label token c) as the LM's next token after the last real token."""
  def read(m, ids, valid, prefix):
    h, _, _ = m.hidden(ids, valid, prefix_BxKxD=prefix)
    h_Bx1xD = jnp.take_along_axis(h, last_index(valid)[:, None, None], axis=1)
    return m.output_head.vocab_log_probs(m.output_head(h_Bx1xD))[:, 0]
  logp_BxV = model.apply({"params": lm_params}, ids_BxT, valid_BxT.astype(bool), prefix_BxKxD,
                         method=read)
  return logp_BxV[:, jnp.asarray(label_ids)]


def classification_loss(logits_BxC, labels_B):
  """Mean cross-entropy and accuracy."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()
  return loss, jnp.mean(jnp.argmax(logits_BxC, -1) == labels_B)


def train_step(state: train_state.TrainState, batch):
  """One optimizer step on the cross-entropy of ``state.apply_fn(params, batch)``."""
  def loss_fn(params):
    loss, acc = classification_loss(state.apply_fn(params, batch), batch["labels"])
    return loss, acc
  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": acc}


def fit(apply_fn: Callable[[Any, dict], jax.Array], params, tx: optax.GradientTransformation,
        batches: Iterator[dict], num_steps: int, *, desc: str = "fit",
        progress: bool = True) -> tuple[Any, list[float]]:
  """Trains ``params`` for ``num_steps`` in memory (`fsqtok.train.loop`, nothing written);
  returns them and the per-step losses."""
  result = train_loop.run(
      desc, jax.jit(lambda state, batch, _: train_step(state, batch)),
      lambda: train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=tx),
      _Unsaved(batches), train_loop.LoopConfig(num_steps, log_every=1, progress_bar=progress),
      rng=jax.random.PRNGKey(0))
  return result.state.params, [r["loss"] for r in result.history]


class _Unsaved:
  """An iterator of batches as `train_loop.Batches` (no position: nothing is saved)."""

  def __init__(self, batches: Iterator[dict]):
    self._batches = batches

  def __next__(self) -> dict:
    return next(self._batches)

  def get_state(self) -> dict:
    return {}

  def set_state(self, state: dict) -> None:
    del state


def accuracy(apply_fn, params, data: dict[str, np.ndarray], batch_size: int) -> float:
  """Accuracy over every example of ``data`` (its last batch padded, then cut)."""
  logits_fn = jax.jit(apply_fn)
  n = data["labels"].shape[0]
  correct = 0
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in data.items()}
    m = batch["labels"].shape[0]
    if m < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - m, 0)])
               for k, v in batch.items()}
    pred = np.asarray(jnp.argmax(logits_fn(params, batch), -1))[:m]
    correct += int(np.sum(pred == batch["labels"][:m]))
  return correct / max(n, 1)


def batch_iterator(data: dict[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
  """Endless shuffled batches (a new permutation each epoch)."""
  n = data["labels"].shape[0]
  if n < batch_size:
    raise ValueError(f"{n} examples cannot fill a batch of {batch_size}: lower batch_size.")
  rng = np.random.RandomState(seed)
  while True:
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield {k: v[idx] for k, v in data.items()}

