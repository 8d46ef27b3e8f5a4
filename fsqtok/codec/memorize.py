"""The decoder learns the vocabulary's own codes by heart.

Once every vocabulary string has its own FSQ code (`fsqtok.tokenizer.build.distinct_codes`:
the code the encoder gives, or the nearest free one), some codes do not decode to their
string: strings the codec has not learned yet, and those whose code was moved. Here the
decoder alone trains on exactly those (code -> string) pairs, the codes and the encoder
fixed, every string seen once an epoch: a finite table to learn by heart, with targets
that no longer move as the encoder learns.

`learn_by_heart` is the whole procedure the tokenizer build runs: the decoder trains on
every string alike, then works in rounds on the strings it still misses: each first
looks for a free code near its own that already decodes to it, then the decoder trains
again with the missed strings more often, each round at a lower rate than the last
(docs/codec.md, "Until every string decodes" and "Rounds at a falling rate").
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from fsqtok.codec import fsq as fsq_lib
from fsqtok.codec import model as codec_lib
from fsqtok.data.batches import EpochBatcher, PieceSet
from fsqtok.train import loop as train_loop
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import recon


def code_vectors(model: codec_lib.Codec, codes_K: np.ndarray) -> np.ndarray:
  """The FSQ code vectors ``[K, num_dims]`` of code indices."""
  return np.asarray(model.fsq.indices_to_codes(jnp.asarray(codes_K, jnp.int32)), np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _greedy_decode(model: codec_lib.Codec, params, codes_BxD):
  return codec_lib.greedy_decode(model.apply({"params": params}, codes_BxD,
                                             method=codec_lib.Codec.decode))


def decodes_exactly(model: codec_lib.Codec, params, codes_K: np.ndarray, pieces: PieceSet,
                    batch_size: int = 1024) -> np.ndarray:
  """``[K]`` bool: whether code k decodes to string k (row k of ``pieces``)."""
  return _decodes_to(model, params, codes_K, pieces.bytes_NxL, pieces.lengths_N, batch_size)


def _decodes_to(model, params, codes_K, want_bytes_KxL, want_lengths_K, batch_size):
  vectors = code_vectors(model, codes_K)
  out = []
  for start in range(0, len(vectors), batch_size):
    chunk = vectors[start:start + batch_size]
    pad = batch_size - len(chunk)
    got_bytes, got_lengths = (np.asarray(a)[:len(chunk)] for a in _greedy_decode(
        model, params, np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])))
    want_bytes = want_bytes_KxL[start:start + len(chunk)]
    want_lengths = want_lengths_K[start:start + len(chunk)]
    inside = np.arange(want_bytes.shape[1])[None] < want_lengths[:, None]
    out.append((got_lengths == want_lengths)
               & np.all((got_bytes == want_bytes) | ~inside, axis=1))
  return np.concatenate(out) if out else np.zeros(0, bool)


def _step(state, batch, rng):
  del rng
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["codes"], method=codec_lib.Codec.decode)
    return recon.reconstruction_loss(logits, batch["bytes"], batch["lengths"])
  (loss, byte_acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss, "byte_accuracy": byte_acc}


_train_step = jax.jit(_step)  # one compiled step for every call with the same optimizer


def decoder_optimizer(optim, num_steps: int, params) -> optax.GradientTransformation:
  """The decoder's optimizer (``optim``: an ``adamw_config``), the encoder frozen, its
  updates times a factor its state holds (`train_decoder`'s ``rate_scale``), so that
  calls at different rates share one compiled step."""
  return optax.chain(optimizer_lib.make_optimizer(optim, num_steps, params, frozen=("encoder",)),
                     optax.inject_hyperparams(optax.scale)(step_size=1.0))


def _with_rate_scale(state: train_state.TrainState, scale: float) -> train_state.TrainState:
  """``state`` with the `decoder_optimizer`'s factor set to ``scale`` (the learning rate
  times ``scale``: AdamW's update, weight decay included, is proportional to it)."""
  *inner, scaled = state.opt_state
  hyperparams = {**scaled.hyperparams, "step_size": jnp.asarray(scale, jnp.float32)}
  return state.replace(opt_state=(*inner, scaled._replace(hyperparams=hyperparams)))


def train_decoder(model: codec_lib.Codec, params, codes_K: np.ndarray, pieces: PieceSet, *,
                  optim, num_steps: int, batch_size: int, seed: int,
                  rows: np.ndarray | None = None, tx=None, rate_scale: float = 1.0,
                  progress: bool = True):
  """``params`` with the decoder trained ``num_steps`` on (code k -> string k), the
  encoder frozen (`fsqtok.train.loop`, in memory). ``optim``: an ``adamw_config``, its
  learning rate times ``rate_scale``. ``rows``: the strings an epoch visits, repeats
  allowed (None: each once). ``tx``: the `decoder_optimizer` of ``optim`` and
  ``num_steps`` if the caller has it (calls that share it share one compiled step)."""
  if len(codes_K) != pieces.num_distinct:
    raise ValueError(f"{len(codes_K)} codes for {pieces.num_distinct} strings.")
  rows = np.arange(len(codes_K)) if rows is None else np.asarray(rows)
  if tx is None:
    tx = decoder_optimizer(optim, num_steps, params)
  batches = EpochBatcher({"codes": code_vectors(model, codes_K), "bytes": pieces.bytes_NxL,
                          "lengths": pieces.lengths_N}, rows,
                         min(batch_size, len(rows)), seed=seed, what="strings")
  result = train_loop.run(
      "decoder", _train_step,
      lambda: _with_rate_scale(
          train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx), rate_scale),
      batches, train_loop.LoopConfig(num_steps, log_every=max(1, num_steps // 20),
                                     progress_bar=progress),
      rng=jax.random.PRNGKey(seed), nan_hint="lower tokenizer.decoder_learning_rate")
  return result.state.params


def move_to_decoding_codes(model: codec_lib.Codec, params, codes_K: np.ndarray,
                           exact_K: np.ndarray, pieces: PieceSet, radius: int,
                           batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Each string whose code does not decode to it (``exact_K``: `decodes_exactly`) takes
  a free code within ``radius`` digit steps that does (the nearest; first come first
  served), if there is one. Returns the new codes (still distinct) and whether each now
  decodes exactly."""
  exact = np.array(exact_K, bool)
  taken = set(codes_K.tolist())
  owners, candidates = [], []
  for k in np.flatnonzero(~exact):
    free = [c for c in fsq_lib.neighbour_codes(int(codes_K[k]), model.levels, radius)
            if c not in taken]
    owners += [k] * len(free)
    candidates += free
  codes_K = codes_K.copy()
  if not candidates:
    return codes_K, exact
  owners = np.asarray(owners)
  fits = _decodes_to(model, params, np.asarray(candidates), pieces.bytes_NxL[owners],
                     pieces.lengths_N[owners], batch_size)
  for k, code in zip(owners[fits], np.asarray(candidates)[fits]):
    if not exact[k] and code not in taken:
      codes_K[k], exact[k] = code, True
      taken.add(int(code))
  return codes_K, exact


def learn_by_heart(model: codec_lib.Codec, params, codes_K: np.ndarray, pieces: PieceSet, *,
                   optim, num_steps: int, batch_size: int, seed: int,
                   rounds: ml_collections.ConfigDict, progress: bool = True
                   ) -> tuple[Any, np.ndarray, dict[str, Any]]:
  """The decoder learns string k at code k (the encoder frozen), until every string
  decodes exactly or the rounds are spent. Returns the parameters, the codes (a string
  its code does not decode may move to a free nearby code that does) and a report.

  First ``num_steps`` steps on every string alike at ``optim``; then up to
  ``rounds.num`` rounds of: `move_to_decoding_codes` within ``rounds.search_radius``
  digit steps, and ``rounds.steps`` steps with the strings still missed
  ``rounds.repeats`` times an epoch (every other string once), round r at peak rate
  ``rounds.learning_rate`` × ``rounds.learning_rate_decay`` ** (r - 1): the first rounds
  have many strings to learn, the last few must not unlearn the others.
  Stops as soon as every string decodes exactly; returns the round that decodes the most
  (report: ``rounds``, each round's share exact and codes moved; ``exact``, the share of
  the one returned; ``not_exact``, its strings still missed).
  """
  if rounds.num and (rounds.steps < 1 or rounds.repeats < 1):
    raise ValueError(f"decoder rounds need steps >= 1 and repeats >= 1, got {rounds.steps} "
                     f"and {rounds.repeats}: raise them, or set num = 0 for no rounds.")
  decay = rounds.get("learning_rate_decay", 1.0)
  if not 0 < decay <= 1:
    raise ValueError(f"decoder_rounds.learning_rate_decay must be in (0, 1], got {decay}: "
                     "1 keeps every round at rounds.learning_rate.")
  params = train_decoder(model, params, codes_K, pieces, optim=optim, num_steps=num_steps,
                         batch_size=batch_size, seed=seed, progress=progress)
  codes_K = np.asarray(codes_K)
  exact = decodes_exactly(model, params, codes_K, pieces)
  history = [{"round": 0, "exact": float(exact.mean()), "moved": 0}]
  best = (exact.sum(), params, codes_K, exact)
  round_optim = optim.copy_and_resolve_references()
  round_optim.learning_rate = rounds.learning_rate
  round_optim.warmup_steps = min(round_optim.warmup_steps, rounds.steps // 10)
  round_tx = decoder_optimizer(round_optim, rounds.steps, params) if rounds.num else None
  for r in range(1, rounds.num + 1):
    if exact.all():
      break
    before = codes_K
    codes_K, exact = move_to_decoding_codes(model, params, codes_K, exact, pieces,
                                            rounds.search_radius)
    moved = int(np.sum(codes_K != before))
    scale = decay ** (r - 1)  # this round's rate: rounds.learning_rate times scale
    if not exact.all():
      missed = np.flatnonzero(~exact)
      params = train_decoder(
          model, params, codes_K, pieces, optim=round_optim, num_steps=rounds.steps,
          batch_size=batch_size, seed=seed + r, progress=progress, tx=round_tx,
          rate_scale=scale,
          rows=np.concatenate([np.arange(len(codes_K))] + [missed] * rounds.repeats))
      exact = decodes_exactly(model, params, codes_K, pieces)
    history.append({"round": r, "exact": float(exact.mean()), "moved": moved,
                    "learning_rate": rounds.learning_rate * scale})
    if exact.sum() > best[0]:
      best = (exact.sum(), params, codes_K, exact)
  _, params, codes_K, exact = best  # a round can lose strings: the best one is kept
  return params, codes_K, {"rounds": history, "exact": float(exact.mean()),
                           "not_exact": np.flatnonzero(~exact)}
