"""Phases 2 and 3: train the language model on a tokenizer's tokens.

``lm``: the codec (if the embedding uses it) is frozen by an optax partition, everything
else trains on the next-token loss. ``joint``: everything trains on
``LM loss + recon_weight * reconstruction loss`` (the codec's candidate pieces), starting
from the ``lm`` phase's parameters. Both run one pure ``train_step`` under ``jit`` over
the mesh in `fsqtok.train.loop`, and report held-out bits per byte (summed negative log-likelihood in bits over the held-out UTF-8 bytes).
"""
from __future__ import annotations

import functools
import math
import os
import zlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from fsqtok.data import lm_data
from fsqtok.data.batches import PieceBatcher
from fsqtok.models import embeddings as embeddings_lib
from fsqtok.models import lm as lm_lib
from fsqtok.train import checkpoint as checkpoint_lib
from fsqtok.train import loop as train_loop
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import recon
from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib


# Dense bfloat16 peak FLOP/s per device, by `device_kind` prefix: the denominator of model
# FLOPs utilization (MFU). Override with config.lm.train.peak_flops_per_device.
PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
              "NVIDIA L4": 121e12, "Tesla T4": 65e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def flops_per_token(model: lm_lib.TransformerLM, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (weights a token passes through) + causal attention.

  Counted: the transformer blocks and the output head (V-wide for table heads; for the
  factorized head a (plain tokens + 1)-wide softmax plus, per FSQ dimension, a d x d
  mixing layer and its digit softmax; its flat tokens count as plain ones). Not counted:
  embedding lookups, the codec encoder of the ``codec`` embedding and the contextual
  fuser of the ``fuser`` embedding (its MFU is overstated by the fuser's share;
  `experiments/bench_fuser_cost.py` measures that share)."""
  d, l = model.d_model, model.num_layers
  per_layer = 4 * d * d + 2 * d * model.mlp_dim
  if model.head.startswith("factorized"):
    head = (d * (embeddings_lib.head_plain_count(model) + 1) + len(model.levels) * d * d
            + d * sum(model.levels))
  else:
    head = d * model.vocab_size
  return 6 * (l * per_layer + head) + 6 * l * seq_len * d


def _finite_or_none(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None


def peak_flops(mesh, override: float = 0.0) -> float:
  """Peak FLOP/s of the mesh's devices (NaN where unknown, e.g. on CPU)."""
  if override:
    return override * mesh.size
  kind = jax.devices()[0].device_kind
  per_device = next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), float("nan"))
  return per_device * mesh.size


def lm_loss(params, apply_fn, batch, rng, deterministic: bool = False):
  """Mean next-token loss over the weighted targets; also its sum and weight."""
  logp = apply_fn({"params": params}, batch["inputs"], batch["valid"], batch["targets"],
                  deterministic=deterministic, rngs={"dropout": rng},
                  method=lm_lib.TransformerLM.target_log_probs)
  nll = -jnp.sum(logp * batch["weights"])
  count = jnp.sum(batch["weights"])
  return nll / jnp.maximum(count, 1.0), (nll, count)


def train_step(state: train_state.TrainState, batch, rng, *, recon_weight: float = 0.0):
  """One optimizer step on the LM loss (+ ``recon_weight`` x reconstruction loss on
  ``batch["pieces"]``, the joint phase)."""
  def loss_fn(params):
    loss, (nll, count) = lm_loss(params, state.apply_fn, batch["lm"], rng)
    metrics = {"lm_loss": loss, "nll": nll, "count": count}
    if recon_weight:
      p = batch["pieces"]
      logits, _ = state.apply_fn({"params": params}, p["bytes"], p["lengths"],
                                 method=lm_lib.TransformerLM.reconstruct)
      rec, acc = recon.reconstruction_loss(logits, p["bytes"], p["lengths"])
      loss = loss + recon_weight * rec
      metrics |= {"recon_loss": rec, "recon_byte_accuracy": acc}
    return loss, metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  return new_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}


def state_shardings(abstract_state, mesh, train_config):
  """Where each leaf of an LM training state lives (``train.sharding``: replicated by
  default; FSDP and tensor parallel by `fsqtok.models.lm.PARAM_AXES`)."""
  return sharding_lib.state_shardings(abstract_state, mesh, train_config.get("sharding"),
                                      lm_lib.PARAM_AXES)


def compile_train_step(mesh, state_sh, recon_weight: float = 0.0, donate: bool = True):
  """``train_step`` under jit: the batch split on ``data``, the state placed by
  ``state_sh`` (see `state_shardings`)."""
  return sharding_lib.jit_train_step(functools.partial(train_step, recon_weight=recon_weight),
                                     mesh, state_sh, donate)


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_sums(apply_fn, params, batch):
  _, (nll, count) = lm_loss(params, apply_fn, batch, jax.random.PRNGKey(0), deterministic=True)
  return nll, count


def evaluate_bits_per_byte(apply_fn, params, batches: Iterable[dict[str, np.ndarray]],
                           num_bytes: int, *, mesh, per_process: bool = False
                           ) -> dict[str, float]:
  """Held-out loss per token and bits per byte over ``batches`` (every held-out window
  once: `lm_data.LMData.val_batches`; ``per_process``: each process gives its own rows)."""
  nll, count = 0.0, 0.0
  for batch in batches:
    n, c = sharding_lib.to_host(_eval_sums(
        apply_fn, params, sharding_lib.shard_batch(batch, mesh, per_process=per_process)))
    nll, count = nll + float(n), count + float(c)
  return {"loss_per_token": nll / max(count, 1.0), "tokens": count,
          "bits_per_byte": nll / math.log(2) / num_bytes, "bytes_per_token": num_bytes / count}


def train_lm_phase(phase: str, config, workdir: str, model: lm_lib.TransformerLM,
                   data: lm_data.LMData | lm_data.StoredLMData, init_params: Callable[[], Any], *,
                   frozen: Sequence[str] = (), recon_weight: float = 0.0,
                   optim=None, num_steps: int | None = None) -> tuple[dict[str, Any], Any]:
  """Trains (or resumes, or finds finished) one LM phase under ``workdir/phase``.

  ``init_params()`` gives the starting parameters (the previous phase's, or fresh).
  Returns the report and the final parameters.
  """
  t = config.lm.train
  num_steps = num_steps or t.num_steps
  optim = optim or config.lm.optim
  phase_dir = os.path.join(workdir, phase)
  workdir_lib.makedirs(phase_dir)
  mesh = sharding_lib.mesh_from_config(t)
  sharding_lib.check_batch_size(config.lm.data.batch_size, mesh, "lm.data.batch_size")
  sharding_lib.check_batch_size(t.eval_batch_size, mesh, "lm.train.eval_batch_size")

  # One optimizer object: states made by separate calls share their pytree structure.
  abstract_params = jax.eval_shape(init_params)
  tx = optimizer_lib.make_optimizer(optim, num_steps, abstract_params, frozen)
  init = lambda: train_state.TrainState.create(apply_fn=model.apply, params=init_params(),
                                               tx=tx)
  abstract_state = jax.eval_shape(init)
  state_sh = state_shardings(abstract_state, mesh, t)
  done = train_loop.finished(phase_dir, num_steps,
                             checkpoint_lib.abstract_like(abstract_params, state_sh.params))
  if done is not None:  # nothing to do
    return done

  batches = {"lm": data.train_batches(config.lm.data.batch_size, seed=config.seed,
                                      loader=config.lm.data.get("loader", "epochs"))}
  if recon_weight:
    batches["pieces"] = PieceBatcher(data.pieces[0], config.joint.piece_batch_size,
                                     seed=config.seed, weighting=config.data.weighting)
  evaluate = lambda state: evaluate_bits_per_byte(
      state.apply_fn, state.params, data.val_batches(t.eval_batch_size), data.val_bytes,
      mesh=mesh, per_process=data.per_process)
  result = train_loop.run(
      phase, compile_train_step(mesh, state_sh, recon_weight), init,
      train_loop.NamedBatches(**batches), train_loop.LoopConfig.from_config(t, num_steps),
      rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), zlib.crc32(phase.encode())),
      directory=phase_dir, mesh=mesh, state_shardings=state_sh, evaluate=evaluate,
      schedule=optimizer_lib.learning_rate_schedule(optim, num_steps),
      summed=("nll", "count"), nan_hint=f"{phase}: lower the learning rate")

  tokens_per_second = result.sum_per_second("count")
  model_flops = flops_per_token(model, config.lm.data.seq_len)
  report = {
      "phase": phase, "steps": num_steps, "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
      "model_flops_per_token": model_flops,
      # None where the device's peak is unknown (a CPU): shown as "n/a"
      "mfu": _finite_or_none(tokens_per_second * model_flops / peak_flops(
          mesh, t.get("peak_flops_per_device", 0.0))),
      "validation": train_loop.final_eval(result, num_steps, evaluate),
      "train_tokens_per_second": tokens_per_second,
      "train_bytes_per_token": data.train_bytes_per_token(),
      "train_wall_seconds": result.wall_seconds,
      "frozen": list(frozen), "recon_weight": recon_weight,
  }
  train_loop.write_report(phase_dir, report)
  return report, result.state.params


def load_phase_params(phase_dir: str, init_params: Callable[[], Any], mesh=None):
  """The final parameters of a finished phase (its last checkpoint's; ``init_params``
  gives their structure), replicated on ``mesh`` (default: this process's devices);
  `checkpoint.DamagedFile` if they cannot be read."""
  ckpt_dir = os.path.join(phase_dir, train_loop.CHECKPOINTS)
  step = checkpoint_lib.latest_step(ckpt_dir)
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {ckpt_dir}: run the curriculum first.")
  mesh = mesh or sharding_lib.data_mesh()
  try:
    return checkpoint_lib.restore_params(ckpt_dir, step, checkpoint_lib.abstract_like(
        jax.eval_shape(init_params), sharding_lib.replicated(mesh)))
  except checkpoint_lib.DamagedFile as e:
    raise checkpoint_lib.DamagedFile(
        f"{e}. Run the curriculum again on its work directory: the phase resumes from its "
        f"newest checkpoint that reads.") from None
