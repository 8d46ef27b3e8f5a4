"""Phase 1 (``recon``): train the codec to reconstruct pieces.

``train_step`` is a pure function ``(state, batch, rng) -> (state, metrics)``;
`train_recon` compiles it with ``jax.jit`` over the data mesh and runs the loop with
checkpoints, evaluation, a metrics file and a report.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from fsqtok import candidates as candidates_lib
from fsqtok import checkpoint as checkpoint_lib
from fsqtok import codec as codec_lib
from fsqtok import corpus as corpus_lib
from fsqtok import evaluate as evaluate_lib
from fsqtok import optimizer as optimizer_lib
from fsqtok import plots
from fsqtok import sharding as sharding_lib
from fsqtok import workdir as workdir_lib
from fsqtok.data import PieceBatcher, PieceSet

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
  ``state_shardings`` (`fsqtok.sharding.state_shardings`; None: replicated)."""
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
  if os.path.isdir(directory):
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


def _throughput(clock: dict[str, Any], batch_size: int) -> float:
  seconds = (clock["t1"] or 0.0) - (clock["t0"] or 0.0) - clock["excluded"]
  steps = clock["step1"] - clock["step0"]
  return steps * batch_size / seconds if steps and seconds > 0 else float("nan")


@workdir_lib.exclusive_workdir
def train_recon(config, workdir: str,
                pieces: tuple[PieceSet, PieceSet] | None = None) -> dict[str, Any]:
  """Trains (or resumes, or finds finished) the codec; returns the report dict.

  ``pieces``: the (train, validation) pieces of ``config.data`` if the caller has them.
  """
  validate_config(config)
  phase_dir = os.path.join(workdir, PHASE)
  os.makedirs(phase_dir, exist_ok=True)
  report_path = os.path.join(phase_dir, "report.json")
  t = config.train

  ckpt = checkpoint_lib.Checkpointer(os.path.join(phase_dir, "checkpoints"),
                                     save_every=t.checkpoint_every, max_to_keep=t.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start >= t.num_steps:  # finished: nothing to do (a damaged report is made again)
    report = workdir_lib.read_saved_json(report_path)
    if report is not None:
      ckpt.close()
      return report

  mesh = sharding_lib.mesh_from_config(t)
  sharding_lib.check_batch_size(config.data.batch_size, mesh)
  model = codec_lib.codec_from_config(config.model)
  train_pieces, val_pieces = (pieces if pieces is not None
                              else candidates_lib.load_pieces(config))
  batcher = PieceBatcher(train_pieces, config.data.batch_size, seed=config.seed,
                         weighting=config.data.weighting)

  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  create = functools.partial(create_state, config, model,
                             tx=optimizer_lib.make_optimizer(config.optim, t.num_steps))
  state_sh = sharding_lib.state_shardings(jax.eval_shape(create, init_rng), mesh,
                                          t.get("sharding"))
  state = jax.jit(create, out_shardings=state_sh)(init_rng)
  restored = ckpt.restore_latest(checkpoint_lib.abstract_like(state, state_sh))
  start = 0
  if restored:
    start, state, data_state = restored
    batcher.set_state(data_state)
    logging.info("Resumed %s from step %d.", phase_dir, start)

  metrics_log = workdir_lib.MetricsLog(os.path.join(phase_dir, "metrics.jsonl"),
                                       resume_step=start)
  step_fn = compile_train_step(mesh, state_shardings=state_sh)
  eval_kw = dict(batch_size=t.eval_batch_size, mesh=mesh)
  schedule = optimizer_lib.learning_rate_schedule(config.optim, t.num_steps)
  # Throughput is timed from the first synchronisation (after compilation) to the last,
  # minus the time spent evaluating.
  clock = {"t0": None, "step0": 0, "excluded": 0.0, "t1": None, "step1": 0}
  pending: list[dict[str, jax.Array]] = []
  last_eval: tuple[int, dict[str, Any]] | None = None
  loop_start = time.perf_counter()
  bar = tqdm(range(start, t.num_steps), initial=start, total=t.num_steps,
             desc="recon", disable=not t.progress_bar, dynamic_ncols=True)
  for step in bar:
    batch = sharding_lib.shard_batch(next(batcher), mesh)
    state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
    pending.append(metrics)
    done = step + 1
    if done % t.log_every == 0 or done == t.num_steps:
      host = sharding_lib.to_host(pending)
      pending = []
      now = time.perf_counter()
      if clock["t0"] is None:
        clock["t0"], clock["step0"] = now, done
      clock["t1"], clock["step1"] = now, done
      loss = float(np.mean([m["loss"] for m in host]))
      if not np.isfinite(loss):
        raise FloatingPointError(f"Loss is {loss} at step {done}: lower optim.learning_rate "
                                 f"or set optim.grad_clip; last good checkpoint is in {ckpt.directory}.")
      record = {"step": done, "split": "train", "loss": loss,
                "byte_accuracy": float(np.mean([m["byte_accuracy"] for m in host])),
                "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
                "learning_rate": float(schedule(done))}
      metrics_log.write([record])
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{record['byte_accuracy']:.3f}")
    if done % t.eval_every == 0 or done == t.num_steps:
      tic = time.perf_counter()
      ev = evaluate_lib.evaluate(model, state.params, val_pieces, **eval_kw)
      metrics_log.write([{"step": done, "split": "validation", **ev}])
      last_eval = (done, ev)
      if clock["t0"] is not None:
        clock["excluded"] += time.perf_counter() - tic
    ckpt.save(done, state, batcher.get_state(), force=done == t.num_steps)
  bar.close()
  ckpt.close()

  final_val = (last_eval[1] if last_eval and last_eval[0] == t.num_steps
               else evaluate_lib.evaluate(model, state.params, val_pieces, **eval_kw))
  final_train = evaluate_lib.evaluate(model, state.params, train_pieces, **eval_kw)
  report = {
      "source": config.data.source, "steps": int(t.num_steps),
      "invalid_utf8": corpus_lib.invalid_utf8_counts(
          config.data.source, config.data.get("invalid_utf8", "error")),
      "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
      "validation": final_val, "train": final_train,
      "validation_bytes_in_seen_pieces": evaluate_lib.seen_byte_share(val_pieces, train_pieces),
      "train_pieces_per_second": _throughput(clock, config.data.batch_size),
      "timed_steps_this_run": clock["step1"] - clock["step0"],
      # This run's loop (compilation included) and final evaluation; a resumed run
      # counts only its own part.
      "train_wall_seconds": time.perf_counter() - loop_start,
      "samples": _samples(model, state.params, val_pieces, 12),
  }
  workdir_lib.write_json(report_path, report)
  workdir_lib.atomic_write_text(os.path.join(phase_dir, "report.md"), _report_markdown(report))
  plots.plot_learning_curves(metrics_log.path, os.path.join(phase_dir, "curves.png"),
                             title=f"codec on {config.data.source}")
  return report
