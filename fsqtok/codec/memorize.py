"""The decoder learns the vocabulary's own codes by heart.

Once every vocabulary string has its own FSQ code (`fsqtok.tokenizer.build.distinct_codes`:
the code the encoder gives, or the nearest free one), some codes do not decode to their
string: strings the codec has not learned yet, and those whose code was moved. Here the
decoder alone trains on exactly those (code -> string) pairs, the codes and the encoder
fixed, every string seen once an epoch: a finite table to learn by heart, with targets
that no longer move as the encoder learns.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

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
  vectors = code_vectors(model, codes_K)
  out = []
  for start in range(0, len(vectors), batch_size):
    chunk = vectors[start:start + batch_size]
    pad = batch_size - len(chunk)
    got_bytes, got_lengths = (np.asarray(a)[:len(chunk)] for a in _greedy_decode(
        model, params, np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])))
    want_bytes = pieces.bytes_NxL[start:start + len(chunk)]
    want_lengths = pieces.lengths_N[start:start + len(chunk)]
    inside = np.arange(want_bytes.shape[1])[None] < want_lengths[:, None]
    out.append((got_lengths == want_lengths)
               & np.all((got_bytes == want_bytes) | ~inside, axis=1))
  return np.concatenate(out)


def _step(state, batch, rng):
  del rng
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["codes"], method=codec_lib.Codec.decode)
    return recon.reconstruction_loss(logits, batch["bytes"], batch["lengths"])
  (loss, byte_acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss, "byte_accuracy": byte_acc}


def train_decoder(model: codec_lib.Codec, params, codes_K: np.ndarray, pieces: PieceSet, *,
                  optim, num_steps: int, batch_size: int, seed: int,
                  progress: bool = True):
  """``params`` with the decoder trained ``num_steps`` on (code k -> string k), the
  encoder frozen (`fsqtok.train.loop`, in memory). ``optim``: an ``adamw_config``."""
  if len(codes_K) != pieces.num_distinct:
    raise ValueError(f"{len(codes_K)} codes for {pieces.num_distinct} strings.")
  tx = optimizer_lib.make_optimizer(optim, num_steps, params, frozen=("encoder",))
  batches = EpochBatcher({"codes": code_vectors(model, codes_K), "bytes": pieces.bytes_NxL,
                          "lengths": pieces.lengths_N}, np.arange(len(codes_K)),
                         min(batch_size, len(codes_K)), seed=seed, what="strings")
  result = train_loop.run(
      "decoder", jax.jit(_step),
      lambda: train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx),
      batches, train_loop.LoopConfig(num_steps, log_every=max(1, num_steps // 20),
                                     progress_bar=progress),
      rng=jax.random.PRNGKey(seed), nan_hint="lower tokenizer.decoder_learning_rate")
  return result.state.params
