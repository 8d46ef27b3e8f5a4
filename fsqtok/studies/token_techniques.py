"""The token-techniques study (configs/token_techniques.py, experiments/token_techniques.py).

`run_study(config, workdir, corpora)` takes ``{name: (train_texts, val_texts)}`` (one
class per corpus) and measures, on a byte-level BPE (with role tokens added) and a small
LM trained on all training texts:

* `register_study`: held-out bits per byte and attention share to the first token, for
  each register count (one LM each, same seed and data);
* `classification_study`: which corpus a passage comes from, by zero-shot label words, a
  linear probe on frozen mean-pooled features, a soft prompt on the frozen LM, full
  fine-tuning through the label words, and full fine-tuning with a CLS / mean / attention
  pooling head; accuracy per seed and trainable parameters; the soft prompts are saved as
  artifacts under ``WORKDIR/prompts/seed<S>`` and reloaded to check they score the same;
* `pruning_study`: time per batch and tail bits per byte for each keep ratio and score,
  all in one run, timings interleaved round-robin so machine load hits them alike.

`markdown_tables` renders the results; `plot` draws them.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fsqtok.data import corpus as corpus_lib
from fsqtok.data import lm_data
from fsqtok.models import classifier as clf
from fsqtok.models import lm as lm_lib
from fsqtok.models import soft_prompt
from fsqtok.studies import token_importance
from fsqtok.studies import token_roles
from fsqtok.tokenizer import baselines
from fsqtok.train import lm_train
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import workdir as workdir_lib


def parse_corpora(spec: str) -> dict[str, str]:
  """``"a=builtin,b=files:x.txt"`` -> ``{"a": "builtin", "b": "files:x.txt"}`` (>= 2)."""
  out = corpus_lib.parse_named(spec)
  if len(out) < 2:
    raise ValueError(f"The classification task needs at least two corpora, got {spec!r}.")
  return out


def load_corpora(config) -> dict[str, tuple[list[str], list[str]]]:
  """Train/validation texts of each corpus in ``config.corpora``."""
  out = {}
  for name, source in parse_corpora(config.corpora).items():
    c = config.copy_and_resolve_references()
    c.data.source = source
    out[name] = corpus_lib.load_split(c.data)
  return out


def _cap(texts: list[str], max_chars: int) -> list[str]:
  out, total = [], 0
  for t in texts:
    if total >= max_chars:
      break
    out.append(t[:max_chars - total])
    total += len(out[-1])
  return out


def passages(texts: list[str], passage_bytes: int, n: int, seed: int) -> list[str]:
  """``n`` distinct passages of ``passage_bytes`` UTF-8 bytes cut from ``texts``."""
  data = "\n".join(texts).encode("utf-8")
  starts = np.arange(0, len(data) - passage_bytes + 1, passage_bytes)
  if len(starts) < n:
    raise ValueError(f"The texts hold {len(starts)} passages of {passage_bytes} bytes, "
                     f"{n} were asked for: lower task.*_per_class or passage_bytes.")
  chosen = np.sort(np.random.RandomState(seed).choice(starts, n, replace=False))
  return [data[s:s + passage_bytes].decode("utf-8", "ignore") for s in chosen]


def task_data(tok: token_roles.WithRoles, corpora, split: int, per_class: int, config
              ) -> dict[str, np.ndarray]:
  """``[BOS] passage [CLS]`` examples labelled by corpus (``split`` 0 train, 1 test)."""
  t = config.task
  rows, labels = [], []
  for label, (name, texts) in enumerate(corpora.items()):
    for p in passages(texts[split], t.passage_bytes, per_class, config.seed + split):
      rows.append(token_roles.pack_single(tok, tok.encode(p), t.max_tokens))
      labels.append(label)
  data = token_roles.pack_batch(rows)
  data["labels"] = np.asarray(labels, np.int32)
  return data


def label_token_ids(tok, words) -> tuple[int, ...]:
  """The first token of each label word (the verbalizer); they must differ."""
  ids = tuple(tok.encode(w)[0] for w in words)
  if len(set(ids)) != len(ids):
    raise ValueError(f"The label words {tuple(words)} start with the same token: choose "
                     f"words that differ in their first token.")
  return ids


def train_lm(config, workdir: str, tok, texts, num_registers: int):
  """A base LM with ``num_registers`` registers (fsqtok.train.lm_train, under WORKDIR/lm_regN)."""
  c = copy.deepcopy(config)
  c.lm.model.num_registers = num_registers
  model = lm_lib.lm_from_config(c.lm.model, tok.vocab_size)
  data = lm_data.LMData(tok, texts, c.lm.data.seq_len)
  init = lambda: model.init(jax.random.PRNGKey(c.seed),
                            jnp.zeros((1, c.lm.data.seq_len), jnp.int32))["params"]
  report, params = lm_train.train_lm_phase(f"lm_reg{num_registers}", c, workdir, model, data,
                                           init)
  return model, jax.device_get(params), report, data


def register_study(config, model, params, data) -> dict[str, Any]:
  """Attention share to each held-out window's first token (and to the registers)."""
  n = min(config.registers.attention_windows, data.val["inputs"].shape[0])
  ids, valid = data.val["inputs"][:n], data.val["valid"][:n]
  attn = jax.jit(lambda p, i, v: model.apply({"params": p}, i, v,
                                             method=lm_lib.TransformerLM.hidden)[2])(
                                                 params, ids, valid)
  shares = token_importance.first_token_attention_share(attn, valid, model.num_registers)
  return {"attention_to_first_token_per_layer": shares["first_token"].tolist(),
          "attention_to_registers_per_layer": shares["prefix"].tolist(),
          "attention_to_first_token": float(np.mean(shares["first_token"])),
          "attention_to_registers": float(np.mean(shares["prefix"]))}


def _optim(config, name):
  return config.classify.optim[name]


def classification_study(config, workdir, tok, model, params, train, test, class_names
                         ) -> dict[str, Any]:
  """Accuracy per method and seed, trainable parameter counts (see the module docstring)."""
  cc = config.classify
  labels = label_token_ids(tok, config.task.label_words)
  num_classes = len(config.task.label_words)
  steps, bs = cc.num_steps, cc.batch_size
  # Verbalizer methods read the LM's next token after the passage (not after [CLS]).
  passage = lambda b: b["valid"] & (b["ids"] != tok.cls_id)
  verbal = lambda lm_params, b, prefix=None: clf.verbalizer_logits(
      model, lm_params, b["ids"], passage(b), labels, prefix)
  features = jax.jit(lambda p, b: clf.mean_pool(
      model.apply({"params": p}, b["ids"], passage(b), method=lm_lib.TransformerLM.hidden)[0],
      passage(b)))

  def feats(data):
    out = [np.asarray(features(params, {k: v[s:s + 64] for k, v in data.items()}))
           for s in range(0, data["labels"].shape[0], 64)]
    return {"features": np.concatenate(out), "labels": data["labels"]}

  probe_train, probe_test = feats(train), feats(test)
  base_count = optimizer_lib.count_params(params)
  table_VxD = model.apply({"params": params}, jnp.arange(tok.base.vocab_size)[None],
                          method=lambda m, i: m.embed(i))[0]
  results = {m: {"accuracy": [], "trainable_params": None} for m in cc.methods}
  for seed in cc.seeds:
    rng = jax.random.PRNGKey(seed)
    batches = lambda data: clf.batch_iterator(data, bs, seed)
    for method in cc.methods:
      desc = f"{method} seed {seed}"
      if method == "zero_shot":
        acc = clf.accuracy(lambda p, b: verbal(p, b), params, test, cc.eval_batch_size)
        results[method]["trainable_params"] = 0
      elif method == "linear_probe":
        d = probe_train["features"].shape[1]
        p0 = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
        apply = lambda p, b: b["features"] @ p["w"] + p["b"]
        tx = optimizer_lib.make_optimizer(_optim(config, "linear_probe"), steps)
        p, _ = clf.fit(apply, p0, tx, batches(probe_train), steps, desc=desc,
                       progress=config.progress_bar)
        acc = clf.accuracy(apply, p, probe_test, cc.eval_batch_size)
        results[method]["trainable_params"] = optimizer_lib.count_params(p0)
      elif method == "soft_prompt":
        prompt = soft_prompt.init_prompt(rng, cc.prompt_length, model.d_model, table_VxD,
                                         low=tok.ordinary_range[0])
        p0 = soft_prompt.combine(params, prompt)
        apply = lambda p, b: verbal(p["lm"], b, soft_prompt.prefix(p, b["ids"].shape[0]))
        tx = soft_prompt.make_optimizer(_optim(config, "soft_prompt"), steps, p0)
        p, _ = clf.fit(apply, p0, tx, batches(train), steps, desc=desc,
                       progress=config.progress_bar)
        acc = clf.accuracy(apply, p, test, cc.eval_batch_size)
        if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p["lm"]),
                                                       jax.tree.leaves(params))):
          raise AssertionError("Prompt tuning changed the frozen LM.")
        artifact = os.path.join(workdir, "prompts", f"seed{seed}")
        soft_prompt.save(artifact, p["prompt"], {
            "task": "corpus of a passage", "labels": list(class_names),
            "label_words": list(config.task.label_words), "label_token_ids": list(labels),
            "base_model": f"lm_reg{model.num_registers}", "accuracy": acc})
        loaded, _ = soft_prompt.load(artifact, d_model=model.d_model, length=cc.prompt_length)
        acc_loaded = clf.accuracy(apply, soft_prompt.combine(params, loaded), test,
                                  cc.eval_batch_size)
        if acc_loaded != acc:
          raise AssertionError(f"The reloaded prompt scores {acc_loaded}, not {acc}.")
        results[method]["trainable_params"] = optimizer_lib.count_params(p0, soft_prompt.FROZEN)
      elif method == "full_finetune":
        apply = lambda p, b: verbal(p, b)
        tx = optimizer_lib.make_optimizer(_optim(config, "full_finetune"), steps)
        p, _ = clf.fit(apply, params, tx, batches(train), steps, desc=desc,
                       progress=config.progress_bar)
        acc = clf.accuracy(apply, p, test, cc.eval_batch_size)
        results[method]["trainable_params"] = base_count
      elif method.endswith("_head"):
        pooling = method[:-len("_head")]
        head = clf.SequenceClassifier(model, num_classes, pooling, tok.cls_id)
        init = head.init(rng, train["ids"][:1], train["valid"][:1])["params"]
        p0 = {**init, "lm": params}
        apply = lambda p, b, head=head: head.apply({"params": p}, b["ids"], b["valid"])
        tx = optimizer_lib.make_optimizer(_optim(config, "head"), steps)
        p, _ = clf.fit(apply, p0, tx, batches(train), steps, desc=desc,
                       progress=config.progress_bar)
        acc = clf.accuracy(apply, p, test, cc.eval_batch_size)
        results[method]["trainable_params"] = optimizer_lib.count_params(p0)
      else:
        raise ValueError(f"Unknown classify method {method!r}: use zero_shot, linear_probe, "
                         f"soft_prompt, full_finetune or <{'|'.join(clf.POOLINGS)}>_head.")
      results[method]["accuracy"].append(float(acc))
  for r in results.values():
    r["mean"] = float(np.mean(r["accuracy"]))
    r["std"] = float(np.std(r["accuracy"]))
  return results


def token_byte_lengths(tok: token_roles.WithRoles) -> np.ndarray:
  """UTF-8 bytes of each token id (0 for specials): the bits-per-byte denominator."""
  lengths = np.zeros(tok.vocab_size, np.int64)
  base = tok.base
  if hasattr(base, "token_lengths"):  # the baselines
    lengths[:base.vocab_size] = base.token_lengths()
  else:  # fsqtok
    lengths[:base.vocab_size] = [len(base.token_bytes(i) or b"") for i in range(base.vocab_size)]
  lengths[list(tok.special_ids)] = 0
  return lengths


def pruning_study(config, model, params, data, byte_lengths) -> list[dict[str, Any]]:
  """Tail bits per byte and time per batch for every (score, keep ratio); see the module
  docstring and `fsqtok.models.lm.TransformerLM` for what pruning keeps."""
  pc = config.pruning
  n = min(pc.windows, data.val["inputs"].shape[0]) // pc.batch_size * pc.batch_size
  if n == 0:
    raise ValueError(f"Fewer held-out windows than pruning.batch_size={pc.batch_size}.")
  tail = pc.tail
  batches = []
  for s in range(0, n, pc.batch_size):
    sl = slice(s, s + pc.batch_size)
    batches.append({k: jnp.asarray(data.val[k][sl]) for k in ("inputs", "valid")} |
                   {"targets": jnp.asarray(data.val["targets"][sl, -tail:]),
                    "weights": jnp.asarray(data.val["weights"][sl, -tail:])})
  settings = [("none", 1.0)] + [(s, r) for s in pc.scores for r in pc.keep_ratios if r < 1.0]
  fns, kept_fns = {}, {}
  for score, keep in settings:
    m = model if score == "none" else model.clone(
        prune_layer=pc.layer, prune_keep=keep, prune_score=score, prune_keep_last=tail)
    fns[(score, keep)] = jax.jit(lambda p, b, m=m: m.apply(
        {"params": p}, b["inputs"], b["valid"], b["targets"],
        method=lm_lib.TransformerLM.target_log_probs_last))
    # the positions the model kept, read from it (``[B, registers + T]``), not recomputed
    kept_fns[(score, keep)] = jax.jit(lambda p, b, m=m: m.apply(
        {"params": p}, b["inputs"], b["valid"], b["targets"],
        method=lm_lib.TransformerLM.target_log_probs_last,
        mutable=["intermediates"])[1].get("intermediates", {}).get("kept"))
  rows = {}
  t = batches[0]["inputs"].shape[1]
  for key, fn in fns.items():  # compile, then the quality over every batch
    nll_bits, nbytes = 0.0, 0
    for b in batches:
      logp = np.asarray(fn(params, b))
      w = np.asarray(b["weights"])
      nll_bits += float(-(logp * w).sum() / math.log(2))
      nbytes += int((byte_lengths[np.asarray(b["targets"])] * (w > 0)).sum())
    sown = kept_fns[key](params, batches[0])
    # token positions kept per window (of t); the registers, always kept, not counted
    kept = t if sown is None else float(np.asarray(sown[0])[:, -t:].sum(1).mean())
    rows[key] = {"score": key[0], "keep_ratio": key[1], "kept_positions": kept,
                 "tail_bits_per_byte": nll_bits / max(nbytes, 1), "times": []}
  for _ in tqdm(range(pc.timing_rounds), desc="pruning timing", disable=not config.progress_bar,
                leave=False):
    for key, fn in fns.items():  # round-robin: load changes hit every setting alike
      tic = time.perf_counter()
      for b in batches:
        jax.block_until_ready(fn(params, b))
      rows[key]["times"].append((time.perf_counter() - tic) / len(batches))
  base = statistics.median(rows[("none", 1.0)]["times"])
  base_bpb = rows[("none", 1.0)]["tail_bits_per_byte"]
  out = []
  for r in rows.values():
    med = statistics.median(r.pop("times"))
    out.append({**r, "ms_per_batch": 1000 * med, "time_ratio": med / base,
                "bpb_increase": r["tail_bits_per_byte"] - base_bpb})
  return out


def run_study(config, workdir: str, corpora: dict[str, tuple[list[str], list[str]]]
              ) -> dict[str, Any]:
  """The whole study; writes WORKDIR/results.json and WORKDIR/token_techniques.png."""
  os.makedirs(workdir, exist_ok=True)
  if len(config.task.label_words) != len(corpora):
    raise ValueError(f"task.label_words has {len(config.task.label_words)} words for "
                     f"{len(corpora)} corpora: give one label word per corpus.")
  tic = time.perf_counter()
  cap = config.data.max_train_chars
  train_texts = [t for tr, _ in corpora.values() for t in _cap(tr, cap)]
  val_texts = [t for _, va in corpora.values() for t in _cap(va, max(cap // 10, 1))]
  tok = token_roles.WithRoles(baselines.HFBPETokenizer.train(train_texts,
                                                             config.tokenizer.vocab_size))
  results: dict[str, Any] = {"corpora": list(corpora), "vocab_size": tok.vocab_size,
                             "registers": {}}
  base = None
  for count in config.registers.counts:
    model, params, report, data = train_lm(config, workdir, tok, (train_texts, val_texts),
                                           count)
    results["registers"][str(count)] = {
        "bits_per_byte": report["validation"]["bits_per_byte"],
        "train_wall_seconds": report["train_wall_seconds"],
        **register_study(config, model, params, data)}
    if base is None or count == 0:
      base = (model, params, data)
  model, params, data = base
  results["base_lm"] = {"num_registers": model.num_registers,
                        "params": optimizer_lib.count_params(params)}
  train = task_data(tok, corpora, 0, config.task.train_per_class, config)
  test = task_data(tok, corpora, 1, config.task.test_per_class, config)
  results["task"] = {"train_examples": int(train["labels"].shape[0]),
                     "test_examples": int(test["labels"].shape[0]),
                     "label_words": list(config.task.label_words)}
  results["classification"] = classification_study(config, workdir, tok, model, params,
                                                   train, test, list(corpora))
  results["pruning"] = pruning_study(config, model, params, data, token_byte_lengths(tok))
  results["pruning_layer"] = config.pruning.layer
  results["wall_seconds"] = time.perf_counter() - tic
  results["device"] = jax.devices()[0].device_kind
  workdir_lib.write_json(os.path.join(workdir, "results.json"), results)
  plot(results, os.path.join(workdir, "token_techniques.png"))
  return results


def markdown_tables(results: dict[str, Any]) -> str:
  """The study's three tables in markdown."""
  lines = ["| registers | held-out bits/byte | attention to first token | attention to "
           "registers |", "|---|---|---|---|"]
  for n, r in results["registers"].items():
    lines.append(f"| {n} | {r['bits_per_byte']:.4f} | {r['attention_to_first_token']:.3f} | "
                 f"{r['attention_to_registers']:.3f} |")
  lines += ["", "| method | accuracy (mean ± std) | per seed | trainable params |",
            "|---|---|---|---|"]
  for m, r in results["classification"].items():
    seeds = ", ".join(f"{a:.3f}" for a in r["accuracy"])
    lines.append(f"| {m} | {r['mean']:.3f} ± {r['std']:.3f} | {seeds} | "
                 f"{r['trainable_params']:,} |")
  lines += ["", "| score | keep ratio | kept positions | ms / batch | time ratio | tail "
            "bits/byte | Δ bits/byte |", "|---|---|---|---|---|---|---|"]
  for r in results["pruning"]:
    lines.append(f"| {r['score']} | {r['keep_ratio']:.2f} | {r['kept_positions']:g} | "
                 f"{r['ms_per_batch']:.1f} | {r['time_ratio']:.3f} | "
                 f"{r['tail_bits_per_byte']:.4f} | {r['bpb_increase']:+.4f} |")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
  """Pruning (time ratio and tail bits per byte vs keep ratio) and accuracy per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
  base = [r for r in results["pruning"] if r["score"] == "none"]
  for score in sorted({r["score"] for r in results["pruning"]} - {"none"}):
    rows = sorted(base + [r for r in results["pruning"] if r["score"] == score],
                  key=lambda r: r["keep_ratio"])
    ax1.plot([r["keep_ratio"] for r in rows], [r["time_ratio"] for r in rows], "o-",
             label=score)
    ax2.plot([r["keep_ratio"] for r in rows], [r["tail_bits_per_byte"] for r in rows], "o-",
             label=score)
  ax1.set(xlabel="keep ratio", ylabel="time / unpruned", title="pruning: speed")
  ax2.set(xlabel="keep ratio", ylabel="tail bits per byte", title="pruning: quality")
  ax1.legend()
  ax2.legend()
  cls = results["classification"]
  names = list(cls)
  ax3.bar(range(len(names)), [cls[m]["mean"] for m in names],
          yerr=[cls[m]["std"] for m in names])
  ax3.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax3.set(ylabel="test accuracy", title="which corpus? (mean ± std over seeds)", ylim=(0, 1))
  fig.tight_layout()
  workdir_lib.save_figure(fig, path)
