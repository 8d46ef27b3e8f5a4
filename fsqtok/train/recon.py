"""Phase 1 (``recon``): train the codec to reconstruct pieces.

``train_step`` is a pure function ``(state, batch, rng) -> (state, metrics)``;
`train_recon` compiles it with ``jax.jit`` over the mesh and runs it in
`fsqtok.train.loop` (checkpoints, evaluation, metrics), then writes the report.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from fsqtok import plots
from fsqtok.codec import evaluate as evaluate_lib
from fsqtok.codec import model as codec_lib
from fsqtok.data import corpus as corpus_lib
from fsqtok.data.batches import PieceBatcher, PieceSet
from fsqtok.tokenizer import candidates as candidates_lib
from fsqtok.train import checkpoint as checkpoint_lib
from fsqtok.train import loop as train_loop
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib

PHASE = "recon"


def reconstruction_loss(logits_BxLxS, bytes_BxL, lengths_B):
  """Masked cross-entropy over the bytes and the END symbol; also byte accuracy."""
  targets, weights = codec_lib.targets_and_weights(bytes_BxL, lengths_B)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxS, targets)
  loss = jnp.sum(ce * weights) / jnp.sum(weights)
  byte_mask = codec_lib.length_mask(lengths_B, bytes_BxL.shape[1])
  right = (jnp.argmax(logits_BxLxS, -1) == targets) & byte_mask
  return loss, jnp.sum(right) / jnp.sum(byte_mask)


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array], rng: jax.Array
               ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One AdamW step on the reconstruction loss."""
  def loss_fn(params):
    logits, _ = state.apply_fn({"params": params}, batch["bytes"], batch["lengths"],
                               rngs={"dropout": rng})
    return reconstruction_loss(logits, batch["bytes"], batch["lengths"])

  (loss, byte_acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  return new_state, {"loss": loss, "byte_accuracy": byte_acc,
                     "grad_norm": optax.global_norm(grads)}


def create_state(config, model: codec_lib.Codec, rng: jax.Array, tx=None
                 ) -> train_state.TrainState:
  """A fresh training state (``tx``: the optimizer, made from ``config`` if None; pass
  the same one to every call whose states must share a pytree structure)."""
  max_len = config.model.max_len
  params = model.init(rng, jnp.zeros((1, max_len), jnp.uint8), jnp.ones((1,), jnp.int32))
  tx = tx or optimizer_lib.make_optimizer(config.optim, config.train.num_steps)
  return train_state.TrainState.create(apply_fn=model.apply, params=params["params"], tx=tx)


def compile_train_step(mesh, donate: bool = True, state_shardings=None):
  """``train_step`` under jit: the batch split on ``data``, the state placed by
  ``state_shardings`` (`fsqtok.train.sharding.state_shardings`; None: replicated)."""
  return sharding_lib.jit_train_step(train_step, mesh, state_shardings, donate)


class ConfigError(ValueError):
  """A config field that cannot work, found before any work is done (the message names
  the field)."""


def validate_config(config) -> None:
  """Every mistake of the codec's fields that would otherwise stop a run part-way, as a
  `ConfigError`."""
  try:
    _check_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_config(config) -> None:
  t = config.train
  if t.num_steps < 1:
    raise ValueError(f"train.num_steps must be >= 1, got {t.num_steps}.")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    if getattr(t, name) < 1:
      raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}.")
  if config.model.max_len > 255:
    raise ValueError("model.max_len must be <= 255 (piece lengths are stored as uint8).")
  try:
    codec_lib.codec_from_config(config.model).fsq  # levels >= 2, an int32 codebook
  except ValueError as e:
    raise ValueError(f"model.levels: {e}") from None
  try:
    mesh = sharding_lib.mesh_from_config(config.train)
  except ValueError as e:
    raise ValueError(f"train: {e}") from None
  sharding_lib.check_batch_size(config.data.batch_size, mesh, "data.batch_size")
  sharding_lib.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")


def restore_latest(config, workdir: str):
  """``(step, state, data_state)`` of the newest checkpoint under ``workdir/recon``.

  The state is placed replicated on this process's data mesh, whatever devices saved it
  (a codec trained on 8 devices or a GPU loads on one CPU).
  """
  model = codec_lib.codec_from_config(config.model)
  abstract = checkpoint_lib.abstract_like(
      jax.eval_shape(lambda: create_state(config, model, jax.random.PRNGKey(0))),
      sharding_lib.replicated(sharding_lib.data_mesh(config.train.num_devices)))
  directory = os.path.join(workdir, PHASE, "checkpoints")
  restored = None
  if workdir_lib.exists(directory):
    ckpt = checkpoint_lib.Checkpointer(directory, save_every=1, max_to_keep=1)
    restored = ckpt.restore_latest(abstract)
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"No codec checkpoint in {directory}: train one first with "
                            f"experiments/train.py --config=configs/recon.py --workdir={workdir}")
  return restored


def load_trained_codec(config, workdir: str):
  """The codec and the parameters of its newest checkpoint under ``workdir/recon``."""
  _, state, _ = restore_latest(config, workdir)
  return codec_lib.codec_from_config(config.model), state.params


def _samples(model, params, pieces: PieceSet, n: int) -> list[dict[str, str]]:
  idx = np.linspace(0, pieces.num_distinct - 1, n).astype(int)
  recon = evaluate_lib.reconstruct(model, params, pieces.bytes_NxL[idx], pieces.lengths_N[idx])
  return [{"piece": pieces.piece_bytes(i).decode("utf-8", "replace"),
           "reconstruction": r.decode("utf-8", "replace"), "count": int(pieces.counts_N[i])}
          for i, r in zip(idx, recon)]


def _report_markdown(report: dict[str, Any]) -> str:
  lines = [f"# Codec reconstruction report ({report['source']})", "",
           f"Steps: {report['steps']}, training throughput: "
           f"{report['train_pieces_per_second']:.0f} pieces/s on {report['devices']}.", "",
           f"Held-out bytes in pieces seen in training: "
           f"{report['validation_bytes_in_seen_pieces']:.2%} (what memorisation alone "
           f"could reconstruct).", "",
           "| split | byte acc | exact match | exact (distinct) | perplexity | codes used "
           "| utilization | collision rate |", "|---|---|---|---|---|---|---|---|"]
  for split in ("validation", "train"):
    m = report.get(split)
    if m:
      lines.append(f"| {split} | {m['byte_accuracy']:.4f} | {m['exact_match']:.4f} | "
                   f"{m['exact_match_distinct']:.4f} | {m['perplexity']:.4f} | "
                   f"{m['codes_used']} | {m['code_utilization']:.4f} | "
                   f"{m['collision_rate']:.4f} |")
  lines += ["", "Learning curves: `curves.png`.", "", "Sample held-out reconstructions (most to least frequent):", "",
            "| piece | reconstruction | count |", "|---|---|---|"]
  for s in report["samples"]:
    lines.append(f"| {json.dumps(s['piece'])} | {json.dumps(s['reconstruction'])} "
                 f"| {s['count']} |")
  return "\n".join(lines) + "\n"


@workdir_lib.exclusive_workdir
def train_recon(config, workdir: str,
                pieces: tuple[PieceSet, PieceSet] | None = None) -> dict[str, Any]:
  """Trains (or resumes, or finds finished) the codec; returns the report dict.

  ``pieces``: the (train, validation) pieces of ``config.data`` if the caller has them.
  """
  validate_config(config)
  phase_dir = os.path.join(workdir, PHASE)
  workdir_lib.makedirs(phase_dir)
  t = config.train
  done = train_loop.finished(phase_dir, t.num_steps)
  if done is not None:  # nothing to do
    return done[0]

  mesh = sharding_lib.mesh_from_config(t)
  model = codec_lib.codec_from_config(config.model)
  train_pieces, val_pieces = (pieces if pieces is not None
                              else candidates_lib.load_pieces(config))
  batcher = PieceBatcher(train_pieces, config.data.batch_size, seed=config.seed,
                         weighting=config.data.weighting)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  tx = optimizer_lib.make_optimizer(config.optim, t.num_steps)
  init = lambda: create_state(config, model, init_rng, tx)
  state_sh = sharding_lib.state_shardings(jax.eval_shape(init), mesh, t.get("sharding"))
  evaluate = lambda state: evaluate_lib.evaluate(model, state.params, val_pieces,
                                                 batch_size=t.eval_batch_size, mesh=mesh)
  result = train_loop.run(
      PHASE, compile_train_step(mesh, state_shardings=state_sh), init, batcher,
      train_loop.LoopConfig.from_config(t), rng=step_rng, directory=phase_dir, mesh=mesh,
      state_shardings=state_sh, evaluate=evaluate,
      schedule=optimizer_lib.learning_rate_schedule(config.optim, t.num_steps),
      nan_hint="lower optim.learning_rate or set optim.grad_clip")
  params = result.state.params
  report = {
      "source": config.data.source, "steps": int(t.num_steps),
      "invalid_utf8": corpus_lib.invalid_utf8_counts(
          config.data.source, config.data.get("invalid_utf8", "error")),
      "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
      "validation": train_loop.final_eval(result, t.num_steps, evaluate),
      "train": evaluate_lib.evaluate(model, params, train_pieces,
                                     batch_size=t.eval_batch_size, mesh=mesh),
      "validation_bytes_in_seen_pieces": evaluate_lib.seen_byte_share(val_pieces, train_pieces),
      "train_pieces_per_second": result.per_second(config.data.batch_size),
      "timed_steps_this_run": result.timed_steps,
      # This run's loop (compilation and evaluation included); a resumed run counts
      # only its own part.
      "train_wall_seconds": result.wall_seconds,
      "samples": _samples(model, params, val_pieces, 12),
  }
  workdir_lib.atomic_write_text(os.path.join(phase_dir, "report.md"), _report_markdown(report))
  plots.plot_learning_curves(os.path.join(phase_dir, train_loop.METRICS),
                             os.path.join(phase_dir, "curves.png"),
                             title=f"codec on {config.data.source}")
  train_loop.write_report(phase_dir, report)
  return report
