"""Bespoke embedding widths against a standard table and a parameter-matched table.

  nice -n 10 python experiments/bespoke_study.py --config=configs/bespoke_study.py \
      --workdir=/tmp/bespoke --tinyshakespeare=PATH/tinyshakespeare.txt \
      --tokenizer_tinyshakespeare=TOKDIR --tokenizer_builtin=TOKDIR \
      --publish_dir=experiments/results

For every setting (a synthetic Zipfian Markov chain, or a real corpus with an fsqtok
tokenizer), corpus size and embedding (`fsqtok.models.bespoke.EMBEDDINGS`), it trains
``config.num_seeds`` next-token predictors at once (``jax.vmap`` over seeds) and writes
to ``--workdir``: ``bespoke_study.json`` (every seed's numbers, summaries with 95%
t-intervals), ``bespoke_study.md`` (the tables) and ``bespoke_loss_vs_corpus.png``.
``--publish_dir`` also gets the JSON and the plot. Corpora whose flags are empty are
skipped.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsqtok.models import bespoke  # noqa: E402  pylint: disable=g-import-not-at-top
from fsqtok.train import optimizer as optimizer_lib  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci95(values) -> tuple[float, float]:
  """Mean and half-width of its 95% confidence interval (t-distribution)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return float(v.mean()), float("nan")
  t = _T975[v.size - 2] if v.size - 1 <= len(_T975) else 1.96
  return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(v.size))


# ---------------------------------------------------------------------------- data


def zipf_markov_chain(vocab_size: int, *, successors: int, dirichlet_alpha: float,
                      zipf_exponent: float, teleport: float, rng: np.random.Generator
                      ) -> np.ndarray:
  """A random sparse transition matrix ``P_VxV`` whose stationary law is Zipf-like.

  Each token gets ``successors`` next tokens drawn (without replacement) with
  probability ~ 1/rank**zipf_exponent and Dirichlet weights among them; every row then
  mixes in that Zipf law with weight ``teleport``, so the chain is irreducible and every
  token can follow every other. Token ids are a random permutation of the ranks.
  """
  zipf_V = 1.0 / np.arange(1, vocab_size + 1) ** zipf_exponent
  zipf_V /= zipf_V.sum()
  perm = rng.permutation(vocab_size)  # rank r is token perm[r]
  zipf_V = zipf_V[np.argsort(perm)]
  sparse_VxV = np.zeros((vocab_size, vocab_size))
  for v in range(vocab_size):
    nxt = rng.choice(vocab_size, size=successors, replace=False, p=zipf_V)
    sparse_VxV[v, nxt] = rng.dirichlet(np.full(successors, dirichlet_alpha))
  return (1 - teleport) * sparse_VxV + teleport * zipf_V[None, :]


def stationary(p_VxV: np.ndarray) -> np.ndarray:
  mu = np.full(p_VxV.shape[0], 1.0 / p_VxV.shape[0])
  for _ in range(10_000):
    new = mu @ p_VxV
    if np.abs(new - mu).max() < 1e-13:
      break
    mu = new
  return new / new.sum()


def entropy_rate(p_VxV: np.ndarray) -> float:
  """Nats per token of the chain: the lowest expected next-token loss any model has."""
  mu = stationary(p_VxV)
  with np.errstate(divide="ignore", invalid="ignore"):
    h_V = -np.nansum(np.where(p_VxV > 0, p_VxV * np.log(p_VxV), 0.0), axis=1)
  return float(mu @ h_V)


def sample_chain(p_VxV: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  cdf_VxV = np.cumsum(p_VxV, axis=1)
  cdf_VxV[:, -1] = 1.0
  u = rng.random(n)
  out = np.empty(n, np.int32)
  state = int(np.searchsorted(np.cumsum(stationary(p_VxV)), rng.random()))
  for i in range(n):
    state = int(np.searchsorted(cdf_VxV[state], u[i], side="right"))
    out[i] = state
  return out


def synthetic_splits(s) -> dict[str, Any]:
  """Train (the longest size; smaller sizes are its prefixes), val and test streams."""
  rng = np.random.default_rng(s.data_seed)
  p_VxV = zipf_markov_chain(s.vocab_size, successors=s.successors,
                            dirichlet_alpha=s.dirichlet_alpha, zipf_exponent=s.zipf_exponent,
                            teleport=s.teleport, rng=rng)
  train = sample_chain(p_VxV, max(s.sizes), rng)
  val = sample_chain(p_VxV, s.val_tokens, rng)
  test = sample_chain(p_VxV, s.test_tokens, rng)
  mu_sorted = np.sort(stationary(p_VxV))[::-1]
  ranks = np.arange(1, s.vocab_size + 1)
  slope = float(np.polyfit(np.log(ranks), np.log(mu_sorted), 1)[0])
  oracle = float(-np.log(p_VxV[test[:-1], test[1:]]).mean())
  return {"vocab_size": s.vocab_size, "train": train, "val": val, "test": test,
          "info": {"entropy_rate_nats": entropy_rate(p_VxV), "oracle_test_loss": oracle,
                   "stationary_zipf_slope": slope, "successors": s.successors,
                   "teleport": s.teleport, "data_seed": s.data_seed}}


def text_splits(documents: list[str], tokenizer, t) -> dict[str, Any]:
  """Blocks of the corpus, held out by content hash (then halved), tokenized per block."""
  from fsqtok.data import corpus  # pylint: disable=g-import-not-at-top
  train_docs, held = corpus.split_documents(documents, val_fraction=t.val_fraction,
                                            seed=t.split_seed, block_chars=t.block_chars)
  val_docs, test_docs = corpus.split_documents(held, val_fraction=0.5, seed=t.split_seed + 1,
                                               block_chars=t.block_chars)

  def encode(blocks):
    return np.asarray([i for b in blocks for i in tokenizer.encode(b)], np.int32)

  train = encode(train_docs)
  if train.size < max(t.sizes):
    raise ValueError(f"The corpus has {train.size} training tokens, fewer than the "
                     f"largest size {max(t.sizes)} in config.text.sizes.")
  return {"vocab_size": len(tokenizer), "train": train, "val": encode(val_docs),
          "test": encode(test_docs),
          "info": {"train_tokens_available": int(train.size), "vocab_size": len(tokenizer)}}


def unigram_loss(train_T: np.ndarray, eval_T: np.ndarray, vocab_size: int) -> float:
  """Held-out loss of add-one smoothed training frequencies: the no-context baseline."""
  counts_V = np.bincount(train_T, minlength=vocab_size) + 1.0
  return float(-np.log(counts_V[eval_T] / counts_V.sum()).mean())


# --------------------------------------------------------------------------- model


class NextTokenMLP(nn.Module):
  """Embeddings of the previous K tokens, concatenated -> MLP -> logits over V."""

  embed: nn.Module
  vocab_size: int
  d_model: int
  hidden: int
  tied: bool = True

  @nn.compact
  def __call__(self, context_BxK: jax.Array) -> jax.Array:
    x_BxKxD = self.embed(context_BxK)
    h_BxH = nn.gelu(nn.Dense(self.hidden)(x_BxKxD.reshape(x_BxKxD.shape[0], -1)))
    y_BxD = nn.LayerNorm()(nn.Dense(self.d_model)(h_BxH))
    if self.tied:
      return self.embed.attend(y_BxD[:, None, :])[:, 0, :]
    return nn.Dense(self.vocab_size)(y_BxD)


def windows(stream_T: jax.Array, targets_B: jax.Array, context: int
            ) -> tuple[jax.Array, jax.Array]:
  """Contexts ``stream[i-K:i]`` and targets ``stream[i]`` for positions ``i >= K``."""
  return stream_T[targets_B[:, None] + jnp.arange(-context, 0)], stream_T[targets_B]


def loss_fn(params, model: NextTokenMLP, context_BxK, target_B) -> jax.Array:
  logits_BxV = model.apply(params, context_BxK)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxV, target_B).mean()


def train_step(params, opt_state, key, stream_T, *, model, tx, context, batch_size,
               train_end):
  """One AdamW step on positions drawn uniformly from ``stream_T[context:train_end]``."""
  pos_B = jax.random.randint(key, (batch_size,), context, train_end)
  context_BxK, target_B = windows(stream_T, pos_B, context)
  loss, grads = jax.value_and_grad(loss_fn)(params, model, context_BxK, target_B)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def eval_positions(start: int, stop: int, context: int, cap: int, chunk: int) -> np.ndarray:
  """At most ``cap`` evenly spaced positions in ``[start + context, stop)``, as whole
  chunks, padded with -1 to ``ceil(cap / chunk)`` chunks (one shape for every split)."""
  pos = np.arange(start + context, stop)
  if pos.size > cap:
    pos = pos[np.linspace(0, pos.size - 1, cap).round().astype(np.int64)]
  pad = -(-cap // chunk) * chunk - pos.size
  return np.concatenate([pos, np.full(pad, -1)]).astype(np.int32).reshape(-1, chunk)


def mean_loss(params, stream_T, pos_CxB, *, model, context) -> jax.Array:
  """Mean next-token loss over the positions (-1: padding), one chunk at a time."""
  def chunk(carry, pos_B):
    valid_B = pos_B >= 0
    def loss_sum():
      context_BxK, target_B = windows(stream_T, jnp.where(valid_B, pos_B, context), context)
      logits_BxV = model.apply(params, context_BxK)
      l_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxV, target_B)
      return jnp.sum(jnp.where(valid_B, l_B, 0.0))
    return carry + jax.lax.cond(valid_B.any(), loss_sum, lambda: jnp.zeros(())), None
  total, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), pos_CxB)
  return total / jnp.sum(pos_CxB >= 0)


def train_seeds(model: NextTokenMLP, splits: dict[str, np.ndarray], config, seeds
                ) -> dict[str, Any]:
  """Trains one model per seed (vmapped) with the same steps and data distribution.

  ``splits`` holds the token streams ``train``, ``val`` and ``test``. Returns per-seed
  lists: held-out (test) loss, validation and training loss at the evaluation with the
  lowest validation loss, test and training loss at the last step, the chosen step, and
  the validation curve (step 0 first).
  """
  c, tc = config.model.context, config.train
  # The "rbg" generator: XLA compiles it in a fraction of threefry's time on CPU.
  keys = jnp.stack([jax.random.key(s, impl="rbg") for s in seeds])
  init_keys, data_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  tx = optimizer_lib.make_optimizer(config.optim, tc.num_steps)
  dummy = jnp.zeros((1, c), jnp.int32)
  params = jax.jit(jax.vmap(lambda k: model.init(k, dummy)))(init_keys)
  opt_state = jax.jit(jax.vmap(tx.init))(params)
  # One stream, so that one compiled evaluation serves every split.
  names = ("train", "val", "test")
  bounds = np.cumsum([0] + [len(splits[k]) for k in names])
  stream_T = jnp.asarray(np.concatenate([splits[k] for k in names]).astype(np.int32))
  positions = {k: jnp.asarray(eval_positions(bounds[i], bounds[i + 1], c,
                                             tc.max_eval_examples, tc.eval_chunk))
               for i, k in enumerate(names)}

  step = functools.partial(train_step, model=model, tx=tx, context=c,
                           batch_size=tc.batch_size, train_end=int(bounds[1]))
  vstep = jax.vmap(step, in_axes=(0, 0, 0, None))

  @jax.jit
  def run_chunk(params, opt_state, start):
    def body(carry, i):
      p, o = carry
      k = jax.vmap(jax.random.fold_in, in_axes=(0, None))(data_keys, start + i)
      p, o, loss = vstep(p, o, k, stream_T)
      return (p, o), loss
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                               jnp.arange(tc.eval_every))
    return params, opt_state, losses.mean(axis=0)

  veval = jax.jit(jax.vmap(functools.partial(mean_loss, model=model, context=c),
                           in_axes=(0, None, None)))

  def evaluate(p, split):
    return np.asarray(veval(p, stream_T, positions[split]))

  best_val = evaluate(params, "val")
  curve = [best_val.tolist()]
  best_params, best_step = params, np.zeros(len(seeds), np.int64)
  num_chunks = max(1, tc.num_steps // tc.eval_every)
  for i in range(num_chunks):
    params, opt_state, _ = run_chunk(params, opt_state, i * tc.eval_every)
    val = evaluate(params, "val")
    curve.append(val.tolist())
    better = val < best_val
    best_val = np.where(better, val, best_val)
    best_step = np.where(better, (i + 1) * tc.eval_every, best_step)
    mask = jnp.asarray(better)
    best_params = jax.tree_util.tree_map(
        lambda b, p: jnp.where(mask.reshape((-1,) + (1,) * (p.ndim - 1)), p, b),
        best_params, params)
  return {
      "test_loss": evaluate(best_params, "test").tolist(),
      "val_loss": best_val.tolist(),
      "train_loss": evaluate(best_params, "train").tolist(),
      "best_step": best_step.tolist(),
      "final_test_loss": evaluate(params, "test").tolist(),
      "final_train_loss": evaluate(params, "train").tolist(),
      "val_curve": curve,
      "eval_every": tc.eval_every,
      "steps": num_chunks * tc.eval_every,
  }


# --------------------------------------------------------------------------- study


def run_setting(name: str, data: dict[str, Any], sizes, d_model: int, config,
                log=print) -> list[dict[str, Any]]:
  """Every (size, embedding) cell of one setting."""
  rows = []
  seeds = [config.seed + i for i in range(config.num_seeds)]
  for size in sizes:
    train_T = data["train"][:size]
    counts_V = np.bincount(train_T, minlength=data["vocab_size"])
    splits = {"train": train_T, "val": data["val"], "test": data["test"]}
    baseline = unigram_loss(train_T, data["test"][config.model.context:], data["vocab_size"])
    for emb_name in config.embeddings:
      embed = bespoke.embedding_from_config(emb_name, counts_V, d_model, config.embed)
      model = NextTokenMLP(embed=embed, vocab_size=data["vocab_size"], d_model=d_model,
                           hidden=config.model.hidden, tied=config.model.tied)
      t0 = time.time()
      res = train_seeds(model, splits, config, seeds)
      params = jax.eval_shape(model.init, jax.random.key(0, impl="rbg"),
                              jnp.zeros((1, config.model.context), jnp.int32))
      row = {"setting": name, "size": int(size), "embedding": emb_name,
             "embed_params": embed.param_count(),
             "embed_params_initialised": optimizer_lib.count_params(params["params"]["embed"]),
             "model_params": optimizer_lib.count_params(params),
             "unigram_test_loss": baseline, "seeds": seeds,
             "seconds": time.time() - t0, **res}
      if isinstance(embed, bespoke.BespokeEmbed):
        row["bucket_rows"] = list(embed.assignment.rows)
        row["bucket_widths"] = list(embed.widths)
      if isinstance(embed, bespoke.FactorizedEmbed):
        row["width"] = embed.width
      for key in ("test_loss", "train_loss", "final_test_loss", "final_train_loss"):
        row[key + "_mean"], row[key + "_ci95"] = mean_ci95(res[key])
      rows.append(row)
      log(f"[{name} {size:>7} {emb_name:>8}] params {row['embed_params']:>8} "
          f"test {row['test_loss_mean']:.4f} ± {row['test_loss_ci95']:.4f} "
          f"train {row['train_loss_mean']:.4f} final train {row['final_train_loss_mean']:.4f} "
          f"final test {row['final_test_loss_mean']:.4f} ({row['seconds']:.1f}s)")
  return rows


def markdown_tables(rows: list[dict[str, Any]], infos: dict[str, Any]) -> str:
  out = []
  for setting in dict.fromkeys(r["setting"] for r in rows):
    out.append(f"### {setting}\n")
    info = infos.get(setting, {})
    if info:
      out.append(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in sorted(info.items())) + "\n")
    out.append("| corpus size | embedding | params (embed) | held-out loss (best val) "
               "| train loss (same params) | held-out / train at last step | ratio to standard "
               "| unigram |")
    out.append("|---|---|---|---|---|---|---|---|")
    sel = [r for r in rows if r["setting"] == setting]
    for r in sel:
      std = [s for s in sel if s["size"] == r["size"] and s["embedding"] == "standard"]
      ratio = f"{r['test_loss_mean'] / std[0]['test_loss_mean']:.3f}" if std else "-"
      out.append(
          f"| {r['size']:,} | {r['embedding']} | {r['embed_params']:,} "
          f"| {r['test_loss_mean']:.3f} ± {r['test_loss_ci95']:.3f} "
          f"| {r['train_loss_mean']:.3f} ± {r['train_loss_ci95']:.3f} "
          f"| {r['final_test_loss_mean']:.3f} / {r['final_train_loss_mean']:.3f} "
          f"| {ratio} "
          f"| {r['unigram_test_loss']:.3f} |")
    out.append("")
  return "\n".join(out)


def plot(rows: list[dict[str, Any]], infos: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), squeeze=False)
  for ax, setting in zip(axes[0], settings):
    sel = [r for r in rows if r["setting"] == setting]
    for emb, color in zip(dict.fromkeys(r["embedding"] for r in sel), ("C0", "C1", "C2", "C3")):
      rs = sorted((r for r in sel if r["embedding"] == emb), key=lambda r: r["size"])
      sizes = [r["size"] for r in rs]
      ax.errorbar(sizes, [r["test_loss_mean"] for r in rs],
                  yerr=[r["test_loss_ci95"] for r in rs], marker="o", color=color,
                  capsize=3, label=f"{emb} held-out")
      ax.plot(sizes, [r["final_train_loss_mean"] for r in rs], ls=":", marker=".",
              color=color, label=f"{emb} train (last step)")
    oracle = infos.get(setting, {}).get("oracle_test_loss")
    if oracle is not None:
      ax.axhline(oracle, color="k", ls="--", lw=1, label="true chain (oracle)")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(setting, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  workdir_lib.save_figure(fig, path)


def run_study(config, workdir: str, text_sources: dict[str, tuple[Any, Any]] | None = None,
              publish_dir: str = "", log=print) -> dict[str, Any]:
  """Runs every enabled setting; ``text_sources``: name -> (documents, tokenizer)."""
  t_start = time.time()
  rows, infos = [], {}
  for key in ("synthetic", "synthetic_initial"):
    s = config[key]
    if not s.enabled:
      continue
    name = f"synthetic V={s.vocab_size} d={s.d_model}"
    data = synthetic_splits(s)
    infos[name] = data["info"]
    rows += run_setting(name, data, s.sizes, s.d_model, config, log)
  if config.text.enabled:
    for corpus_name, (documents, tokenizer) in (text_sources or {}).items():
      data = text_splits(documents, tokenizer, config.text)
      name = f"{corpus_name} V={data['vocab_size']} d={config.text.d_model}"
      infos[name] = data["info"]
      text_config = ml_collections.ConfigDict(config.to_dict())
      text_config.optim.learning_rate = config.text.learning_rate
      text_config.train.max_eval_examples = config.text.max_eval_examples
      text_config.train.eval_every = config.text.eval_every
      rows += run_setting(name, data, config.text.sizes, config.text.d_model, text_config, log)
  result = {"config": config.to_dict(), "settings": infos, "rows": rows,
            "wall_seconds": time.time() - t_start, "jax_backend": jax.default_backend()}
  os.makedirs(workdir, exist_ok=True)
  for directory in filter(None, (workdir, publish_dir)):
    os.makedirs(directory, exist_ok=True)
    workdir_lib.write_json(os.path.join(directory, "bespoke_study.json"), result)
    plot(rows, infos, os.path.join(directory, "bespoke_loss_vs_corpus.png"))
  workdir_lib.atomic_write_text(os.path.join(workdir, "bespoke_study.md"),
                                markdown_tables(rows, infos))
  return result


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  from fsqtok.data import corpus  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  sources = {}
  if f.tinyshakespeare and f.tokenizer_tinyshakespeare:
    with open(f.tinyshakespeare, encoding="utf-8") as fh:
      sources["tinyshakespeare"] = ([fh.read()], Tokenizer.load(f.tokenizer_tinyshakespeare))
  if f.tokenizer_builtin:
    sources["builtin"] = (corpus.load_documents("builtin"), Tokenizer.load(f.tokenizer_builtin))
  if not sources and f.config.text.enabled:
    print("No real corpus flags given: running the synthetic settings only.")
  result = run_study(f.config, f.workdir, sources, f.publish_dir,
                     log=functools.partial(print, flush=True))
  print(f"Wall time {result['wall_seconds']:.0f}s. Tables: "
        f"{os.path.join(f.workdir, 'bespoke_study.md')}")


def _define_flags():
  # Defined here, not at import, so tests can import this module beside other scripts.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "configs/bespoke_study.py[:tiny]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for the JSON, tables and plot.")
  flags.DEFINE_string("publish_dir", "", "Also write the JSON and the plot here.")
  flags.DEFINE_string("tinyshakespeare", "", "Path of tinyshakespeare.txt ('' = skip).")
  flags.DEFINE_string("tokenizer_tinyshakespeare", "", "fsqtok tokenizer directory for it.")
  flags.DEFINE_string("tokenizer_builtin", "",
                      "fsqtok tokenizer directory for the built-in corpus ('' = skip).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
