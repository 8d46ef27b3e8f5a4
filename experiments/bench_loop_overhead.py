"""What the one training loop (`fsqtok.train.loop.run`) costs the host per step, beside the
step alone, in one run.

  python experiments/bench_loop_overhead.py --configs=noop,tiny, --steps=2000

For each row the same jitted step runs ``--steps`` times twice:

* **alone**: called in a Python loop on one batch already on the device (what
  ``experiments/compile_full.py --run_steps`` measures);
* **in the loop**: inside `loop.run` (the key folded per step, batches drawn from a
  `PieceBatcher` over the built-in corpus's pieces and placed, metrics gathered every
  ``log_every`` steps, a checkpoint at the end, no progress bar), timed by the loop itself
  (`LoopResult.timed_seconds`: compilation and the final checkpoint excluded).

Rows: ``noop`` (a step that does nothing: the loop's own cost per step) and the codec of
``configs/recon.py`` at each other config argument (``tiny``, ``""`` the default). The
difference is the host's cost per step; on an accelerator where the step alone is short
(the ``:full`` codec: 0.54 ms on an H200, docs/scale.md) it bounds the throughput.
"""
import os
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import recon as recon_config  # noqa: E402
from fsqtok.codec import model as codec_lib  # noqa: E402
from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.data.batches import PieceBatcher, PieceSet  # noqa: E402
from fsqtok.train import loop as loop_lib  # noqa: E402
from fsqtok.train import optimizer as optimizer_lib  # noqa: E402
from fsqtok.train import recon  # noqa: E402
from fsqtok.train import sharding as sharding_lib  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["noop", "tiny", ""],
                             "Rows: 'noop' and configs/recon.py arguments ('' the default).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Timed steps per measurement.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "The loop's metric interval.")
_DOCS = flags.DEFINE_integer("docs", 400, "Built-in documents whose pieces are the batches.")


def _noop_step(state, batch, rng):
  del rng
  return ({"w": state["w"] + 1.0},
          {"loss": jnp.mean(state["w"]) + 0.0 * batch["lengths"][0]})


def _row(name: str, pieces: PieceSet, mesh):
  if name == "noop":
    step = sharding_lib.jit_train_step(_noop_step, mesh)
    init, batch_size = (lambda: {"w": jnp.zeros((4,))}), 1024
  else:
    config = recon_config.get_config(name)
    model = codec_lib.codec_from_config(config.model)
    tx = optimizer_lib.make_optimizer(config.optim, _STEPS.value)
    init = lambda: recon.create_state(config, model, jax.random.PRNGKey(0), tx)
    step = recon.compile_train_step(mesh)
    batch_size = config.data.batch_size
  rng = jax.random.PRNGKey(1)

  # Alone: one batch on the device, the same key; 3 untimed calls compile and warm up.
  state = sharding_lib.init_on_mesh(init, sharding_lib.replicated(mesh))
  batch = sharding_lib.shard_batch(next(PieceBatcher(pieces, batch_size, seed=0)), mesh)
  for _ in range(3):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready(metrics)
  tic = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready((state, metrics))
  alone = (time.perf_counter() - tic) / _STEPS.value

  # In the loop: its first log interval (compilation) is not timed, so run one more.
  num_steps = _STEPS.value + _LOG_EVERY.value
  with tempfile.TemporaryDirectory() as directory:
    result = loop_lib.run(
        name or "default", step, init, PieceBatcher(pieces, batch_size, seed=0),
        loop_lib.LoopConfig(num_steps, log_every=_LOG_EVERY.value, progress_bar=False),
        rng=rng, directory=directory, mesh=mesh)
  in_loop = result.timed_seconds / result.timed_steps
  return {"row": name if name == "noop" else f"codec recon:{name}", "batch": batch_size,
          "alone_ms": alone * 1e3, "loop_ms": in_loop * 1e3,
          "host_us": (in_loop - alone) * 1e6, "ratio": in_loop / alone}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax's info lines
  docs = corpus_lib.load_documents("builtin")[:_DOCS.value]
  pieces = PieceSet.from_texts(docs)
  mesh = sharding_lib.data_mesh(1)
  print(f"{sharding_lib.describe_devices()}; {pieces.num_distinct} distinct pieces; "
        f"{_STEPS.value} timed steps per cell")
  print("| row | batch | step alone (ms) | in the loop (ms) | host per step (us) "
        "| loop / alone |")
  print("|---|---|---|---|---|---|")
  for name in _CONFIGS.value:
    r = _row(name, pieces, mesh)
    print(f"| {r['row']} | {r['batch']} | {r['alone_ms']:.3f} | {r['loop_ms']:.3f} | "
          f"{r['host_us']:.0f} | {r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
