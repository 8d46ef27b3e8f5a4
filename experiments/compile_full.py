"""The accelerator configs, checked here: compile their train steps for a pod, on CPU.

  python experiments/compile_full.py --json_out=experiments/results/compile_full.json

For the codec of `configs/recon.py:full` and the `lm` and `joint` phases of
`configs/curriculum.py:full` (12 layers, d=768, 32,768 ids, codec embedding, dense head,
bfloat16), the train step is lowered and compiled ahead of time for ``--devices``
simulated CPU devices (nothing is run: the state and batch are abstract), once per state
sharding of ``--shardings`` (`fsqtok.train.sharding`):

* ``replicated`` — today's default: every device holds the whole state;
* ``fsdp`` — the state split along ``data``;
* ``fsdp_tpN`` — FSDP on ``data`` x tensor parallel over N devices on ``model``.

Per row: the parameters, XLA's per-device memory (arguments + outputs + temporaries −
donated buffers), whether that fits 16 GB (a TPU v5e chip), XLA's FLOPs per step per
device and the step time they imply at 40% of the peak of a TPU v5e, a TPU v4 and an
H100 (bf16 dense). XLA compiles for the CPU here, so its memory and FLOP counts are the
CPU program's: a guide to the accelerator's, not a measurement on it.

``--run_steps=N`` also runs each compiled step N times on real arrays (random parameters
and batches of the config's shapes, after 2 untimed steps) on the devices JAX finds, and
adds what was measured: ms per step, throughput (tokens/s for the LM phases, pieces/s for
the codec), model FLOPs utilization against the device's bf16 peak
(`fsqtok.train.lm_train.PEAK_FLOPS`; analytic FLOPs for the LM phases, XLA's for the codec)
and the device's peak memory in use. On a GPU:

  JAX_PLATFORMS=cuda python experiments/compile_full.py --devices=1 --shardings=replicated \
      --run_steps=20 --json_out=/tmp/full_gpu.json

``--config_arg=tiny`` checks the same code on the tiny configs in seconds (the test).
"""
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def flag_value(argv: list[str], name: str, default: str) -> str:
  """``--name=V`` or ``--name V`` in ``argv`` (absl's two forms), else ``default``."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # read before JAX starts its backends
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={flag_value(sys.argv, 'devices', '8')}")

import dataclasses  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import curriculum as curriculum_config  # noqa: E402
from configs import recon as recon_config  # noqa: E402
from fsqtok.codec import model as codec_lib  # noqa: E402
from fsqtok.models import lm as lm_lib  # noqa: E402
from fsqtok.tokenizer import build as tokenizer_build  # noqa: E402
from fsqtok.train import checkpoint as checkpoint_lib  # noqa: E402
from fsqtok.train import lm_train  # noqa: E402
from fsqtok.train import optimizer as optimizer_lib  # noqa: E402
from fsqtok.train import recon  # noqa: E402
from fsqtok.train import sharding as sharding_lib  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402
from flax.training import train_state  # noqa: E402

_ARG = flags.DEFINE_string("config_arg", "full", "configs/{recon,curriculum}.py argument.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices (the pod's chips).")
_SHARDINGS = flags.DEFINE_list("shardings", ["replicated", "fsdp", "fsdp_tp2"],
                               "replicated | fsdp | tpN | fsdp_tpN.")
_PHASES = flags.DEFINE_list("phases", ["codec", "lm", "joint"], "codec | lm | joint.")
_JSON = flags.DEFINE_string("json_out", "", "Also write the rows here.")
_RUN_STEPS = flags.DEFINE_integer("run_steps", 0, "Also run each step this many times on "
                                  "real arrays and measure it (0: compile only).")

PEAKS = {"TPU v5e": 197e12, "TPU v4": 275e12, "H100": 989e12}  # bf16 dense FLOP/s
MFU = 0.4
HBM = 16 * 2 ** 30  # a TPU v5e chip


def sharding_of(name: str):
  """``replicated`` | ``fsdp`` | ``tpN`` | ``fsdp_tpN`` (N >= 1) -> a ``train.sharding``
  config."""
  match = re.fullmatch(r"replicated|(fsdp)|(fsdp_)?tp([1-9][0-9]*)", name)
  if match is None:
    raise ValueError(f"Unknown sharding {name!r}: replicated, fsdp, tpN or fsdp_tpN "
                     f"(N >= 1, e.g. fsdp_tp2).")
  fsdp = bool(match.group(1) or match.group(2))
  return sharding_lib.sharding_config(fsdp=fsdp, model_parallel=int(match.group(3) or 1))


def _batch(mesh, **shapes):
  sh = sharding_lib.batch_sharded(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
          for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class Step:
  """A phase's train step and what compiling and running it needs."""
  step: Any                 # the jitted step(state, batch, rng)
  state: Any                # abstract state, with its shardings
  batch: dict               # abstract batch, with its shardings
  abstract: Any             # abstract state, without shardings
  state_shardings: Any
  make_state: Callable[[], Any]  # the concrete first state (random parameters)
  amount: int               # tokens (LM) or pieces (codec) per step
  unit: str
  model: Any = None         # the LM (analytic FLOPs)
  vocab_size: int = 0


def codec_step(sharding, mesh):
  config = recon_config.get_config(_ARG.value)
  config.train.sharding = sharding
  model = codec_lib.codec_from_config(config.model)
  tx = optimizer_lib.make_optimizer(config.optim, config.train.num_steps)
  make_state = lambda: recon.create_state(config, model, jax.random.PRNGKey(0), tx)
  state = jax.eval_shape(make_state)
  state_sh = sharding_lib.state_shardings(state, mesh, sharding)
  b, length = config.data.batch_size, config.model.max_len
  batch = _batch(mesh, bytes=((b, length), jnp.uint8), lengths=((b,), jnp.int32))
  step = recon.compile_train_step(mesh, state_shardings=state_sh)
  return Step(step, checkpoint_lib.abstract_like(state, state_sh), batch, state, state_sh,
              make_state, amount=b, unit="pieces")


def fake_token_tables(vocab_size: int, levels, seed: int = 0):
  """Codes and bytes for ``vocab_size`` ids shaped like a built tokenizer's: 4 specials
  and 256 bytes without codes, the rest distinct codes and 2-8 byte strings."""
  rng = np.random.RandomState(seed)
  learned = vocab_size - 260
  codes = [-1] * 260 + list(rng.choice(int(np.prod(levels)), learned, replace=False))
  token_bytes = [None] * 4 + [bytes([i]) for i in range(256)] + [
      bytes(rng.randint(97, 123, rng.randint(2, 9)).astype(np.uint8)) for _ in range(learned)]
  return codes, token_bytes


def lm_step(sharding, mesh, joint: bool):
  config = curriculum_config.get_config(_ARG.value)
  config.lm.train.sharding = sharding
  codec = codec_lib.codec_from_config(tokenizer_build.codec_config(config).model)
  codes, token_bytes = fake_token_tables(config.vocab.size, config.model.levels)
  model = lm_lib.lm_from_config(config.lm.model, config.vocab.size, token_codes=codes,
                                levels=config.model.levels, token_bytes=token_bytes,
                                codec=codec if config.lm.model.embedding == "codec" else None)
  t, b = config.lm.data.seq_len, config.lm.data.batch_size
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32))["params"]
  frozen = () if joint else ("codec",)
  optim = config.joint.optim if joint else config.lm.optim
  tx = optimizer_lib.make_optimizer(optim, config.lm.train.num_steps, jax.eval_shape(init),
                                    frozen)
  make_state = lambda: train_state.TrainState.create(apply_fn=model.apply, params=init(), tx=tx)
  state = jax.eval_shape(make_state)
  state_sh = lm_train.state_shardings(state, mesh, config.lm.train)
  batch = {"lm": _batch(mesh, inputs=((b, t), jnp.int32), targets=((b, t), jnp.int32),
                        weights=((b, t), jnp.float32), valid=((b, t), jnp.bool_))}
  if joint:
    p, length = config.joint.piece_batch_size, config.model.max_len
    batch["pieces"] = _batch(mesh, bytes=((p, length), jnp.uint8), lengths=((p,), jnp.int32))
  step = lm_train.compile_train_step(
      mesh, state_sh, config.joint.recon_weight if joint else 0.0)
  return Step(step, checkpoint_lib.abstract_like(state, state_sh), batch, state, state_sh,
              make_state, amount=b * t, unit="tokens", model=model,
              vocab_size=config.vocab.size)


def random_batch(abstract: dict, vocab_size: int, max_len: int, seed: int = 0) -> dict:
  """Concrete arrays of ``abstract``'s shapes and shardings: token ids below
  ``vocab_size``, bytes of lower-case letters, lengths 1..``max_len``, weights 1."""
  rng = np.random.RandomState(seed)

  def fill(name, spec):
    if name == "lengths":
      x = rng.randint(1, max_len + 1, spec.shape)
    elif name == "bytes":
      x = rng.randint(97, 123, spec.shape)
    elif name in ("inputs", "targets"):
      x = rng.randint(0, vocab_size, spec.shape)
    else:  # weights, valid
      x = np.ones(spec.shape)
    return jax.device_put(x.astype(spec.dtype), spec.sharding)

  return {k: random_batch(v, vocab_size, max_len, seed + 1) if isinstance(v, dict)
          else fill(k, v) for k, v in abstract.items()}


def measure(compiled, s: Step, rng, steps: int) -> dict:
  """Runs ``compiled`` on random state and batch: 2 untimed steps, then ``steps`` timed."""
  state = sharding_lib.init_on_mesh(s.make_state, s.state_shardings)
  max_len = recon_config.get_config(_ARG.value).model.max_len
  batch = random_batch(s.batch, s.vocab_size, max_len)
  rng = jax.device_put(np.asarray(jax.random.PRNGKey(1)), rng.sharding)
  for _ in range(2):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  tic = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - tic) / steps
  stats = jax.devices()[0].memory_stats() or {}
  return {"run_steps": steps, "measured_step_ms": seconds * 1e3,
          "measured_per_second": s.amount / seconds,
          "measured_loss": float(np.asarray(metrics["loss"])),
          "device_kind": jax.devices()[0].device_kind,
          "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def check(phase: str, sharding_name: str) -> dict:
  sharding = sharding_of(sharding_name)
  mesh = sharding_lib.data_mesh(_DEVICES.value, sharding.model_parallel)
  make = {"codec": codec_step, "lm": lambda s, m: lm_step(s, m, False),
          "joint": lambda s, m: lm_step(s, m, True)}[phase]
  s = make(sharding, mesh)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(mesh))
  tic = time.perf_counter()
  compiled = s.step.lower(s.state, s.batch, rng).compile()
  seconds = time.perf_counter() - tic
  print(f"[{phase} {sharding_name}: compiled in {seconds:.0f} s]", flush=True)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  row = {"phase": phase, "config": f"{'recon' if phase == 'codec' else 'curriculum'}:"
                                   f"{_ARG.value}",
         "sharding": sharding_name, "mesh": dict(mesh.shape),
         "platform": jax.devices()[0].platform,
         "params": optimizer_lib.count_params(s.abstract.params),
         "state_bytes_per_device": sharding_lib.bytes_per_device(s.abstract,
                                                                 s.state_shardings),
         "memory_bytes_per_device": int(per_device),
         "temp_bytes_per_device": int(mem.temp_size_in_bytes),
         "fits_16gb": bool(per_device <= HBM),
         "xla_flops_per_device": flops, "compile_seconds": seconds}
  if s.model is not None:
    row["analytic_flops_per_device"] = (
        lm_train.flops_per_token(s.model, s.batch["lm"]["inputs"].shape[1])
        * s.amount / mesh.size)
  for name, peak in PEAKS.items():
    row[f"step_ms_{name}"] = flops / (MFU * peak) * 1e3
  if _RUN_STEPS.value:
    row.update(measure(compiled, s, rng, _RUN_STEPS.value))
    row["unit"] = s.unit
    peak = lm_train.peak_flops(mesh) / mesh.size
    seconds = row["measured_step_ms"] / 1e3
    # Model FLOPs utilization: the analytic count for the LM (what MFU conventionally
    # counts), XLA's for the codec (no analytic count); NaN where the peak is unknown.
    useful = row.get("analytic_flops_per_device", flops)
    finite = lambda x: float(x) if np.isfinite(x) else None
    row["mfu"] = finite(useful / seconds / peak)
    row["xla_flops_utilization"] = finite(flops / seconds / peak)
  return row


def _percent(x) -> str:
  return "n/a" if x is None else f"{x:.1%}"


def main(argv):
  del argv
  rows = []
  gb = lambda x: f"{x / 2 ** 30:.3f}"
  run = _RUN_STEPS.value
  print(f"{_DEVICES.value} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
        f"step times at {MFU:.0%} of bf16 peak from XLA's FLOPs per device"
        + (f"; measured: the mean of {run} steps" if run else "") + "\n")
  measured = " | measured ms/step | throughput | MFU | peak GB in use" if run else ""
  print("| phase | sharding | mesh (data x model) | params | state GB/device | XLA memory "
        "GB/device | fits 16 GB | GFLOPs/device/step | ms v5e / v4 / H100 | compile s"
        + measured + " |")
  print("|---|---|---|---|---|---|---|---|---|---" + "|---" * 4 * bool(run) + "|")
  for phase in _PHASES.value:
    for name in _SHARDINGS.value:
      r = check(phase, name)
      rows.append(r)
      line = (f"| {phase} | {name} | {r['mesh']['data']} x {r['mesh']['model']} | "
              f"{r['params'] / 1e6:.2f}M | {gb(r['state_bytes_per_device'])} | "
              f"{gb(r['memory_bytes_per_device'])} | {'yes' if r['fits_16gb'] else 'NO'} | "
              f"{r['xla_flops_per_device'] / 1e9:.2f} | "
              + " / ".join(f"{r[f'step_ms_{p}']:.2f}" for p in PEAKS)
              + f" | {r['compile_seconds']:.0f} |")
      if run:
        peak_mem = r["peak_bytes_in_use"]
        line += (f" {r['measured_step_ms']:.1f} | {r['measured_per_second']:,.0f} "
                 f"{r['unit']}/s | {_percent(r['mfu'])} | "
                 f"{gb(peak_mem) if peak_mem is not None else 'n/a'} |")
      print(line, flush=True)
      if _JSON.value:  # after every row: a run stopped part-way keeps what it measured
        workdir_lib.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
