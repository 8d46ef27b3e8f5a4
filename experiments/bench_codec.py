"""Codec throughput on this machine: training steps and batched inference, side by side.

  python experiments/bench_codec.py                 # default, source and full codecs
  python experiments/bench_codec.py --configs=,source --batch_size=256 --steps=30

Prints one table; ratios are against the first config. Every number is measured in
this run, on the same pieces (the built-in corpus), after a compilation warm-up.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import recon as recon_config  # noqa: E402
from fsqtok.codec import model as codec_lib  # noqa: E402
from fsqtok.data.batches import PieceBatcher  # noqa: E402
from fsqtok.tokenizer import candidates as candidates_lib  # noqa: E402
from fsqtok.train import recon  # noqa: E402
from fsqtok.train import sharding as sharding_lib  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["", "source", "full"],
                             "configs/recon.py arguments to compare ('' = CPU default).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Training batch size for every config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps per config.")
_INFER_BATCH = flags.DEFINE_integer("infer_batch_size", 4096, "Pieces per inference call.")


def _timed(fn, repeats):
  out = fn()
  jax.block_until_ready(out)
  out = fn()  # the second call may recompile for committed shardings
  jax.block_until_ready(out)
  tic = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - tic) / repeats


def bench(arg: str, batches, infer_bytes, infer_lengths):
  config = recon_config.get_config(arg)
  config.data.batch_size = _BATCH.value
  model = codec_lib.codec_from_config(config.model)
  mesh = sharding_lib.data_mesh()
  state = jax.jit(lambda r: recon.create_state(config, model, r),
                  out_shardings=sharding_lib.replicated(mesh))(jax.random.PRNGKey(0))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  step = recon.compile_train_step(mesh, donate=False)
  sharded = [sharding_lib.shard_batch(b, mesh) for b in batches]
  key = jax.random.PRNGKey(1)
  it = iter(range(10**9))

  def one_step():
    return step(state, sharded[next(it) % len(sharded)], key)[1]["loss"]

  step_s = _timed(one_step, _STEPS.value)
  params = state.params
  encode = jax.jit(lambda b, l: model.apply({"params": params}, b, l,
                                            method=codec_lib.Codec.encode))
  codes = encode(infer_bytes, infer_lengths)
  decode = jax.jit(lambda c: codec_lib.greedy_decode(
      model.apply({"params": params}, c, method=codec_lib.Codec.decode)))
  enc_s = _timed(lambda: encode(infer_bytes, infer_lengths), 5)
  dec_s = _timed(lambda: decode(codes), 5)
  n = infer_bytes.shape[0]
  return {"config": arg or "default", "params": n_params,
          "train_pieces_s": _BATCH.value / step_s, "steps_s": 1 / step_s,
          "encode_us_per_piece": enc_s / n * 1e6, "decode_us_per_piece": dec_s / n * 1e6}


def main(argv):
  del argv
  config = recon_config.get_config("")
  train_pieces, _ = candidates_lib.load_pieces(config)
  batcher = PieceBatcher(train_pieces, _BATCH.value, seed=0)
  batches = [next(batcher) for _ in range(8)]
  infer = PieceBatcher(train_pieces, _INFER_BATCH.value, seed=1)
  sample = next(infer)
  ib, il = jnp.asarray(sample["bytes"]), jnp.asarray(sample["lengths"])
  rows = [bench(arg, batches, ib, il) for arg in _CONFIGS.value]
  base = rows[0]
  print(f"\nCodec throughput on {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"(train batch {_BATCH.value}, inference batch {_INFER_BATCH.value})\n")
  print("| config | params | train pieces/s | steps/s | vs first | encode µs/piece "
        "| decode µs/piece |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['params']:,} | {r['train_pieces_s']:,.0f} | "
          f"{r['steps_s']:.1f} | {r['train_pieces_s'] / base['train_pieces_s']:.2f}x | "
          f"{r['encode_us_per_piece']:.2f} | {r['decode_us_per_piece']:.2f} |")


if __name__ == "__main__":
  app.run(main)
