r"""What the contextual fuser embedding costs an LM, against a static table, in one run.

  python experiments/bench_fuser_cost.py                      # both LM sizes, ~4 min on 2 CPU cores
  python experiments/bench_fuser_cost.py --sizes=small --repeats=3 --capacity=0.4
  python experiments/bench_fuser_cost.py --embeddings=per_id,capacity  # those rows alone
  taskset -c 0 python experiments/bench_fuser_cost.py --sizes=small --embeddings=per_id,capacity
      # on one core: the fuser's own work, without the two cores' uneven speed-up

For each LM size (``small``: the README's LM, d=128, 2 layers, configs/fuser.py's
``lm.model``; ``big``: d=256, 6 layers, 8 heads, MLP 1024) and each embedding (static
table; the first fuser design, ``per_position``; the new one, ``per_id``, at every token,
at a causal capacity, with the two-layer mixer, ``mixer_layers=2``, and with the
four-layer one with feed-forward blocks, ``mixer_layers=4, mixer_mlp=True``), the same
random-initialised LM (dense head) over a vocabulary counted from the built-in corpus
(``--vocab_size`` ids) and a batch of real text windows:

* **LM forward**: the whole batch (``--batch_size x --seq_len``), median time per token
  and compiled memory (arguments + outputs + temporaries) per token. ``per_id`` at
  inference reads its precomputed per-id table (`fsqtok.models.fuser.lm_table_variables`);
  the ``per_id, training mode`` row runs the fragment encoder over the batch's unique ids
  instead (what a training forward does; no gradients here).
* **LM decode step**: one new token per row through the key/value cache, after a prompt
  of ``seq_len - 1`` tokens, one call at a time (interleaved with the other variants, so
  each call starts with cold caches).
* **Generation, per new token**: the project's own sampler (`fsqtok.models.generate`,
  one jitted loop of decode steps, greedy, after a prompt of ``seq_len / 2`` tokens): the
  time of ``--gen_tokens`` new tokens per row minus that of ``--gen_tokens / 4``, per
  token. This is a decode step as generation runs it, step after step (its memory is
  the decode step's).

The fuser's hyperparameters are configs/fuser.py's ``fuser.model`` (window 4 tokens,
causal in the LM). Timings are interleaved (every variant once per repeat), so a
background load hits all of them alike; each row reports the median over repeats and the
fastest repeat (which noise can only lengthen). On 2 shared CPU cores one and the same
call varied ~2x between repeats (8.6-21 ms for the small LM's forward in one process), and
the small LM's ratios moved by up to ~0.3x between runs, by either statistic. Prints a table of ratios to the
static table and writes ``--out`` (atomically). `cost_table` is also the cost part of
experiments/eval_word_senses.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fuser as fuser_config  # noqa: E402
from fsqtok.models import fuser as fuser_lib  # noqa: E402
from fsqtok.models import generate as generate_lib  # noqa: E402
from fsqtok.models import lm as lm_lib  # noqa: E402

SIZES = {  # LM model fields over configs/fuser.py's lm.model (the README's LM)
    "small": {},
    "big": {"d_model": 256, "num_layers": 6, "num_heads": 8, "mlp_dim": 1024},
}
# the embeddings timed beside the static table (--embeddings)
EMBEDDINGS = ("per_position", "per_id", "capacity", "mixer2", "mixer4", "training")
TARGETS = {"forward_time": 1.25, "decode_time": 1.25, "memory": 1.5}  # issue 17, x static

_SIZES = flags.DEFINE_list("sizes", ["small", "big"], f"LM sizes: {sorted(SIZES)}.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Ids of the counted tokenizer.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed calls per variant (median).")
_CAPACITY = flags.DEFINE_float("capacity", 0.4, "per_id capacity of the capacity rows.")
_GEN = flags.DEFINE_integer("gen_tokens", 64, "New tokens per row of the longer generation.")
_EMBEDDINGS = flags.DEFINE_list(
    "embeddings", list(EMBEDDINGS),
    "Embeddings timed beside the static table: per_position (the first design), per_id (all "
    "tokens), capacity (per_id at --capacity), mixer2 (per_id, two-layer mixer), mixer4 "
    "(per_id, four-layer mixer with feed-forward blocks), training (per_id without its "
    "table).")
_OUT = flags.DEFINE_string("out", "experiments/results/fuser_cost.json", "JSON report.")


# ---- measuring --------------------------------------------------------------------------

def memory_bytes(compiled) -> int:
  """Compiled memory: arguments + outputs + temporaries (-1 if the backend says none)."""
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def wall_seconds(calls: dict, repeats: int) -> dict[str, list[float]]:
  """The wall times of each ``name -> fn()`` (after one warm-up call each), the calls
  interleaved: every one once per repeat, so a background load hits all of them alike."""
  for fn in calls.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return times


def median_seconds(calls: dict, repeats: int) -> dict[str, float]:
  """Median of `wall_seconds` (on a shared machine 5 repeats left the small LM's ratios
  ~0.3 off; 15-20 agree within ~0.07)."""
  return {name: float(np.median(v)) for name, v in wall_seconds(calls, repeats).items()}


def lm_variant(lm_config, vocab_size: int, token_bytes, ambiguous, embedding: str,
               fuser_spec: fuser_lib.FuserSpec | None, ids_BxT, *, table: bool = True):
  """One LM's jitted calls (``forward``, ``decode``), their compiled memory and its
  parameter count. ``table``: a per_id fuser reads its precomputed per-id table."""
  m = lm_config.copy_and_resolve_references()
  with m.unlocked():
    m.embedding = embedding
    m.fuser = None if fuser_spec is None else dataclasses.asdict(fuser_spec)
  model = lm_lib.lm_from_config(m, vocab_size, token_bytes=token_bytes,
                                ambiguous_ids=ambiguous)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids_BxT[:1])["params"]
  variables = {"params": params}
  if table and embedding == "fuser" and fuser_lib.lm_spec(model).design == "per_id":
    variables = fuser_lib.lm_table_variables(model, params)
  b, t = ids_BxT.shape
  forward = jax.jit(lambda v, i: model.apply(v, i)[0])
  step = jax.jit(lambda v, i, c: model.apply(v, i, cache=c))
  cache = lm_lib.init_cache(model, b, t)
  _, cache = step(variables, ids_BxT[:, :-1], cache)
  last = ids_BxT[:, -1:]
  prompt, valid = ids_BxT[:, :t // 2], jnp.ones((b, t // 2), bool)
  generate = lambda n: lambda: generate_lib._generate(  # pylint: disable=protected-access
      model, variables, prompt, valid, jax.random.PRNGKey(0), max_new_tokens=n,
      temperature=0.0, top_k=0, top_p=1.0, eos_id=-1, pad_id=0)
  return {
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "forward": (lambda: forward(variables, ids_BxT),
                  memory_bytes(forward.lower(variables, ids_BxT).compile()), b * t),
      "decode": (lambda: step(variables, last, cache),
                 memory_bytes(step.lower(variables, last, cache).compile()), b),
      "generate": (generate(_GEN.value // 4), generate(_GEN.value)),
  }


def fuser_alone(vocab_size: int, d_model: int, token_bytes, ambiguous,
                spec: fuser_lib.FuserSpec, ids_BxT):
  """The standalone fuser's forward (its spec's capacity), for `cost_table`."""
  model = fuser_lib.ContextualFuser(vocab_size, d_model, tuple(token_bytes), spec,
                                    tuple(ambiguous))
  params = jax.jit(lambda r: fuser_lib.init_params(model, r, 8))(jax.random.PRNGKey(0))
  variables = (fuser_lib.table_variables(model, params) if spec.design == "per_id"
               else {"params": params})
  fn = jax.jit(lambda v, i: model.apply(v, i)[0])
  return {"params": int(sum(x.size for x in jax.tree.leaves(params))),
          "forward": (lambda: fn(variables, ids_BxT),
                      memory_bytes(fn.lower(variables, ids_BxT).compile()), ids_BxT.size)}


def measure(variants: dict, repeats: int, generations: dict | None = None) -> dict:
  """``{row name: (fn, memory, tokens, params)}`` -> rows of time (the median, and the
  fastest of the repeats: a machine's noise only ever adds time) and memory per token;
  ``generations``: ``{row name: (short fn, long fn, extra new tokens, decode row name)}``,
  timed in the same interleaved calls, each row's time per token the difference of the
  two, its memory and parameters those of its decode step's row."""
  calls = {k: v[0] for k, v in variants.items()}
  for k, (short, long, *_) in (generations or {}).items():
    calls[k + " (short)"], calls[k + " (long)"] = short, long
  times = wall_seconds(calls, repeats)
  seconds = {k: float(np.median(v)) for k, v in times.items()}
  fastest = {k: float(np.min(v)) for k, v in times.items()}
  rows = {k: {"seconds_per_token": seconds[k] / v[2], "min_seconds_per_token": fastest[k] / v[2],
              "memory_bytes": v[1], "memory_bytes_per_token": v[1] / v[2], "tokens": v[2],
              "params": v[3]}
          for k, v in variants.items()}
  for k, (_, _, extra, decode) in (generations or {}).items():
    per_token = lambda t: (t[k + " (long)"] - t[k + " (short)"]) / extra
    rows[k] = {**rows[decode], "tokens": extra, "seconds_per_token": per_token(seconds),
               "min_seconds_per_token": per_token(fastest)}
  return rows


def cost_table(config, tok, fuser_spec, ambiguous):
  """experiments/eval_word_senses.py's cost: per-token time and compiled memory, fuser vs
  static table, in one run: the LM's whole forward, one cached decode step (the LM of
  ``config.lm.model``), and the fuser alone (all tokens vs a 25% capacity; per_id: at
  least one token per ``window_left + 1``)."""
  e = config.eval
  token_bytes = [tok.token_bytes(i) for i in range(len(tok))]
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(len(tok.special_tokens), len(tok),
                                 (e.cost_batch_size, e.cost_seq_len)), jnp.int32)
  variants = {}
  for kind, emb in (("static table", "table"), ("fuser embedding", "fuser")):
    v = lm_variant(config.lm.model, len(tok), token_bytes, ambiguous, emb, fuser_spec, ids)
    variants[f"LM forward, {kind}"] = (*v["forward"], v["params"])
    variants[f"LM decode step (KV cache), {kind}"] = (*v["decode"], v["params"])
  capacity = 0.25 if fuser_spec.design == "per_position" else max(
      0.25, 1.0 / (fuser_spec.window_left + 1))  # per_id: at least one per window
  for name, cap in (("fuser alone, all tokens", 0.0), ("fuser alone, at capacity", capacity)):
    spec = dataclasses.replace(fuser_spec, capacity=cap)
    f = fuser_alone(len(tok), config.fuser.d_model, token_bytes, ambiguous, spec, ids)
    variants[name] = (*f["forward"], f["params"])
  rows = measure(variants, e.cost_repeats)
  rows["fuser alone, at capacity"]["capacity"] = capacity
  return {"batch": [e.cost_batch_size, e.cost_seq_len], "device": jax.devices()[0].device_kind,
          "design": fuser_spec.design, "rows": rows}


# ---- the benchmark ----------------------------------------------------------------------

def text_batch(tok, texts, batch: int, seq_len: int) -> np.ndarray:
  """``batch`` windows of ``seq_len`` consecutive tokens of ``texts``."""
  stream = []
  for t in texts:
    stream.extend(tok.encode(t))
    if len(stream) >= batch * seq_len:
      break
  if len(stream) < batch * seq_len:
    raise ValueError(f"The corpus has {len(stream)} tokens; {batch} x {seq_len} needed.")
  return np.asarray(stream[:batch * seq_len], np.int32).reshape(batch, seq_len)


def run_size(size: str, tok, ids_BxT, ambiguous, capacity: float, repeats: int,
             embeddings=EMBEDDINGS) -> dict:
  config = fuser_config.get_config("")
  lm_config = config.lm.model
  lm_config.update(SIZES[size])
  base = fuser_lib.FuserSpec.from_config(config.fuser.model)
  old = dataclasses.replace(base, design="per_position", capacity=0.0)
  new = dataclasses.replace(base, design="per_id", capacity=0.0)
  capped = dataclasses.replace(new, capacity=capacity)
  capped.validate()
  two_layer = dataclasses.replace(new, mixer="attention", mixer_layers=2)
  four_layer = dataclasses.replace(new, mixer="attention", mixer_layers=4, mixer_mlp=True)
  token_bytes = [tok.token_bytes(i) for i in range(len(tok))]
  ids = jnp.asarray(ids_BxT)
  built = {  # --embeddings -> (row name, fuser spec)
      "per_position": ("fuser per_position (first design)", old),
      "per_id": ("fuser per_id, all tokens", new),
      "capacity": (f"fuser per_id, capacity {capacity:g}", capped),
      "mixer2": ("fuser per_id, 2-layer mixer, all tokens", two_layer),
      "mixer4": ("fuser per_id, 4-layer mixer + MLPs, all tokens", four_layer),
  }
  variants, generations = {}, {}
  b = ids.shape[0]
  for name, spec in [("static table", None), *(built[e] for e in embeddings if e in built)]:
    print(f"[{size}] compiling {name}", flush=True)
    v = lm_variant(lm_config, len(tok), token_bytes, ambiguous,
                   "table" if spec is None else "fuser", spec, ids)
    variants[f"forward | {name}"] = (*v["forward"], v["params"])
    variants[f"decode | {name}"] = (*v["decode"], v["params"])
    generations[f"generation | {name}"] = (*v["generate"], b * (_GEN.value - _GEN.value // 4),
                                           f"decode | {name}")
  if "training" in embeddings:
    print(f"[{size}] compiling fuser per_id, training mode", flush=True)
    v = lm_variant(lm_config, len(tok), token_bytes, ambiguous, "fuser", new, ids, table=False)
    variants["forward | fuser per_id, training mode (no table)"] = (*v["forward"], v["params"])
  rows = measure(variants, repeats, generations)
  for name, r in rows.items():
    ref = rows[name.split(" | ")[0] + " | static table"]
    r["time_ratio"] = r["seconds_per_token"] / ref["seconds_per_token"]
    r["min_time_ratio"] = r["min_seconds_per_token"] / ref["min_seconds_per_token"]
    r["memory_ratio"] = r["memory_bytes"] / ref["memory_bytes"]
  model_fields = {k: lm_config[k] for k in ("d_model", "num_layers", "num_heads", "mlp_dim",
                                            "head", "positions")}
  # the capacity on real text with the precomputed set as the gate (a trained learned
  # score fell to ~0, docs/fuser.md): the share of tokens gated / computed / budgeted
  fuser = fuser_lib.ContextualFuser(
      len(tok), lm_config.d_model, tuple(token_bytes),
      dataclasses.replace(capped, window_right=0, gate_mode="set"), tuple(ambiguous))
  p = jax.jit(lambda r: fuser_lib.init_params(fuser, r, 8))(jax.random.PRNGKey(0))
  _, aux = jax.jit(lambda p, i: fuser.apply({"params": p}, i))(p, ids)
  share = {"gate_on": float(jnp.mean(aux["gate"])),
           "computed": float(jnp.mean(aux["computed"])),
           "budget": fuser.spec.budget(ids.shape[1]) / ids.shape[1]}
  return {"lm": model_fields, "rows": rows, "capacity_share_set_gate": share}


def print_table(report: dict) -> None:
  b, t = report["batch"]
  print(f"\nBatch {b} x {t} tokens, {report['vocab_size']}-id vocabulary, "
        f"{report['device']}; ratios to the static table of the same LM, this run "
        f"(targets: forward and decode time <= {TARGETS['forward_time']}x, memory <= "
        f"{TARGETS['memory']}x)\n")
  print("| LM | call | embedding | µs / token | memory KiB / token | time ratio (median) | "
        "time ratio (fastest) | memory ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for size, s in report["sizes"].items():
    lm = s["lm"]
    label = f"{size} (d={lm['d_model']}, {lm['num_layers']} layers)"
    for name, r in s["rows"].items():
      call, emb = name.split(" | ")
      print(f"| {label} | {call} | {emb} | {r['seconds_per_token'] * 1e6:.1f} | "
            f"{r['memory_bytes_per_token'] / 1024:.1f} | {r['time_ratio']:.2f}x | "
            f"{r['min_time_ratio']:.2f}x | {r['memory_ratio']:.2f}x |")
    c = s["capacity_share_set_gate"]
    print(f"| {label} | capacity {report['capacity']:g}, set gate, this text | | gate on "
          f"{c['gate_on']:.1%}, computed {c['computed']:.1%}, budget {c['budget']:.1%} "
          f"| | | | |")


def main(argv):
  del argv
  from fsqtok.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from fsqtok.data import lm_data  # pylint: disable=g-import-not-at-top
  from fsqtok.train import fuser_train  # pylint: disable=g-import-not-at-top
  from fsqtok.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  unknown = set(_SIZES.value) - set(SIZES)
  if unknown:
    raise ValueError(f"Unknown --sizes {sorted(unknown)}; known: {sorted(SIZES)}.")
  unknown = set(_EMBEDDINGS.value) - set(EMBEDDINGS)
  if unknown:
    raise ValueError(f"Unknown --embeddings {sorted(unknown)}; known: {list(EMBEDDINGS)}.")
  start = time.perf_counter()
  config = fuser_config.get_config("")
  texts = corpus_lib.load_split(config.data)
  tok = fuser_train.counted_tokenizer(texts[0][:2000], _VOCAB.value)
  a = config.fuser.ambiguity
  ambiguous = fuser_train.ambiguous_ids(
      tok, [lm_data.token_stream(tok, texts[0][:2000])], corpus_top_k=a.corpus_top_k,
      min_count=a.min_count)
  ids = text_batch(tok, texts[1], _BATCH.value, _SEQ.value)
  report = {"command": " ".join(["python experiments/bench_fuser_cost.py"] + sys.argv[1:]),
            "device": jax.devices()[0].device_kind, "batch": [_BATCH.value, _SEQ.value],
            "vocab_size": len(tok), "ambiguous_set": len(ambiguous),
            "capacity": _CAPACITY.value, "repeats": _REPEATS.value, "targets": TARGETS,
            "embeddings": _EMBEDDINGS.value,
            "fuser": config.fuser.model.to_dict(), "sizes": {}}
  for size in _SIZES.value:
    report["sizes"][size] = run_size(size, tok, ids, ambiguous, _CAPACITY.value,
                                     _REPEATS.value, _EMBEDDINGS.value)
  report["wall_seconds"] = time.perf_counter() - start
  workdir_lib.write_json(_OUT.value, report)
  print_table(report)
  print(f"\nWall time {report['wall_seconds']:.0f} s; written to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
