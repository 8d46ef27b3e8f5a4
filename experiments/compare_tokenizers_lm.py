"""Bits per byte of the same transformer on fsqtok, Hugging Face BPE and raw-byte tokens.

  python experiments/compare_tokenizers_lm.py --config=configs/compare_lm.py \
      --config.codec_workdirs=builtin=runs/builtin,ts=runs/ts --workdir=runs/compare

For each corpus and vocabulary size: an fsqtok tokenizer is built from the corpus's
trained codec (configs/recon.py run), a byte-level BPE is trained on the same training
split, then every variant is trained for the same number of training bytes with each seed.
Printed: held-out bits per byte (mean +- std over seeds), bytes per token, training steps,
training FLOPs per byte, training and generation bytes per second. Written:
WORKDIR/results.json and WORKDIR/bpb_vs_bytes.png.
"""
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fsqtok import baselines  # noqa: E402
from fsqtok import curriculum  # noqa: E402
from fsqtok import generate as generate_lib  # noqa: E402
from fsqtok import lm_train  # noqa: E402
from fsqtok import recon  # noqa: E402
from fsqtok import workdir as workdir_lib  # noqa: E402
from fsqtok.tokenizer import VOCAB_FILE, Tokenizer  # noqa: E402
from fsqtok.tokenizer_build import train_tokenizer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/compare_lm.py",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])

VARIANTS = {  # name -> (tokenizer kind, embedding, head)
    "fsqtok-table": ("fsqtok", "table", "tied"),
    "fsqtok-factorized": ("fsqtok", "table", "factorized"),
    "hf-bpe": ("hf-bpe", "table", "tied"),
    "raw-bytes": ("raw-bytes", "table", "tied"),
}


def _pairs(spec: str) -> dict[str, str]:
  out = {}
  for item in filter(None, spec.split(",")):
    name, _, value = item.partition("=")
    if not value:
      raise app.UsageError(f"Expected name=value in {spec!r}.")
    out[name] = value
  return out


def _tokenizer(kind, config, corpus, spec, vocab, texts, pieces, codec_dir, out):
  if kind == "raw-bytes":
    return baselines.ByteTokenizer()
  if kind == "hf-bpe":
    return baselines.HFBPETokenizer.train(texts[0], vocab)
  tok_dir = os.path.join(out, f"tok_{corpus}_{vocab}")
  if not os.path.exists(os.path.join(tok_dir, VOCAB_FILE)):
    c = config.copy_and_resolve_references()
    c.data.source = spec
    train_tokenizer(c, codec_dir, vocab, tok_dir, texts=texts, pieces=pieces)
  return Tokenizer.load(tok_dir)


def _flops_per_token(model, vocab: int, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (non-embedding params + output layer) + attention."""
  d, l = model.d_model, model.num_layers
  per_layer = 4 * d * d + 2 * d * model.mlp_dim
  return 6 * (l * per_layer + d * vocab) + 6 * l * seq_len * d


def _generation_bytes_per_second(model, params, tok, n_tokens: int) -> float:
  run = lambda seed: generate_lib.generate(
      model, params, [[tok.bos_id]], jax.random.PRNGKey(seed), max_new_tokens=n_tokens,
      eos_id=-1, pad_id=tok.pad_id, temperature=1.0)[0]
  run(0)  # compile
  tic = time.perf_counter()
  ids = run(1)
  seconds = time.perf_counter() - tic
  return len(tok.decode(ids).encode("utf-8")) / seconds


def run_one(config, workdir, name, tok, texts, seed):
  kind, embedding, head = VARIANTS[name]
  c = config.copy_and_resolve_references()
  c.seed = seed
  c.lm.model.embedding, c.lm.model.head = embedding, head
  data = lm_train.LMData(tok, texts, c.lm.data.seq_len)
  bytes_per_token = data.train_bytes / float(np.sum(data.train["weights"]))
  tokens_per_step = c.lm.data.batch_size * c.lm.data.seq_len
  steps = max(1, round(c.train_bytes / (tokens_per_step * bytes_per_token)))
  c.lm.train.num_steps = steps
  c.lm.train.eval_every = max(1, steps // c.lm.train.evals_per_run)
  model = curriculum.build_lm(c, tok) if kind == "fsqtok" else _plain_lm(c, tok)
  init = lambda: model.init(jax.random.PRNGKey(seed),
                            jnp.zeros((1, c.lm.data.seq_len), jnp.int32))["params"]
  run_dir = os.path.join(workdir, "runs", f"{name}_seed{seed}")
  report, params = lm_train.train_lm_phase("lm", c, run_dir, model, data, init)
  curve = [(r["step"] * tokens_per_step * bytes_per_token, r["bits_per_byte"])
           for r in workdir_lib.MetricsLog.read(os.path.join(run_dir, "lm", "metrics.jsonl"))
           if r["split"] == "validation"]
  return {"variant": name, "seed": seed, "vocab": len(tok), "steps": steps,
          "bits_per_byte": report["validation"]["bits_per_byte"],
          "bytes_per_token": report["validation"]["bytes_per_token"],
          "train_bytes_per_second": report["train_tokens_per_second"] * bytes_per_token,
          "flops_per_byte": _flops_per_token(model, len(tok), c.lm.data.seq_len) / bytes_per_token,
          "generation_bytes_per_second": _generation_bytes_per_second(
              model, params, tok, c.generation_tokens),
          "curve": curve}


def _plain_lm(config, tok):
  from fsqtok import lm as lm_lib  # pylint: disable=g-import-not-at-top
  return lm_lib.lm_from_config(config.lm.model, tok.vocab_size)


def _plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = sorted({(r["corpus"], r["requested_vocab"]) for r in results})
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
  for ax, (corpus, vocab) in zip(axes[0], groups):
    for name in VARIANTS:
      runs = [r for r in results if (r["corpus"], r["requested_vocab"], r["variant"]) ==
              (corpus, vocab, name)]
      if runs:
        n = min(len(r["curve"]) for r in runs)
        x = np.mean([[p[0] for p in r["curve"][:n]] for r in runs], axis=0)
        y = np.mean([[p[1] for p in r["curve"][:n]] for r in runs], axis=0)
        ax.plot(x / 1e6, y, marker="o", label=name)
    ax.set(title=f"{corpus}, vocabulary {vocab}", xlabel="training MB", ylabel="held-out bits/byte")
    ax.legend()
  fig.tight_layout()
  workdir_lib.save_figure(fig, path)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config, out = _CONFIG.value, _WORKDIR.value
  os.makedirs(out, exist_ok=True)
  corpora, codec_dirs = _pairs(config.corpora), _pairs(config.codec_workdirs)
  results = []
  for corpus, spec in corpora.items():
    c = config.copy_and_resolve_references()
    c.data.source = spec
    texts = recon.load_texts(c)
    pieces = recon.load_pieces(c, texts) if corpus in codec_dirs else None
    byte_runs = []
    for vocab in config.vocab_sizes:
      toks = {}
      for name in config.variants:
        kind = VARIANTS[name][0]
        if kind == "fsqtok" and corpus not in codec_dirs:
          logging.warning("No codec run for %s: skipping %s.", corpus, name)
          continue
        if kind not in toks:
          toks[kind] = _tokenizer(kind, c, corpus, spec, vocab, texts, pieces,
                                  codec_dirs.get(corpus), out)
        for seed in config.seeds:
          if kind == "raw-bytes" and byte_runs and len(byte_runs) == len(config.seeds):
            results.append({**byte_runs[list(config.seeds).index(seed)],
                            "requested_vocab": vocab})
            continue
          r = run_one(c, os.path.join(out, corpus, str(vocab)), name, toks[kind], texts, seed)
          r |= {"corpus": corpus, "requested_vocab": vocab}
          if kind == "raw-bytes":
            byte_runs.append(r)
          results.append(r)
          print(f"{corpus} {vocab} {name} seed {seed}: {r['bits_per_byte']:.4f} bits/byte",
                flush=True)
  workdir_lib.write_json(os.path.join(out, "results.json"), results)
  _plot(results, os.path.join(out, "bpb_vs_bytes.png"))
  print("\n| corpus | vocab | tokenizer | ids | bytes/token | steps | bits/byte (mean ± std) "
        "| GFLOPs/MB | train KB/s | generate B/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for corpus in corpora:
    for vocab in config.vocab_sizes:
      for name in VARIANTS:
        runs = [r for r in results if (r["corpus"], r["requested_vocab"], r["variant"]) ==
                (corpus, vocab, name)]
        if not runs:
          continue
        bpb = np.array([r["bits_per_byte"] for r in runs])
        mean = lambda k: float(np.mean([r[k] for r in runs]))
        print(f"| {corpus} | {vocab} | {name} | {runs[0]['vocab']} | {mean('bytes_per_token'):.3f} "
              f"| {runs[0]['steps']} | {bpb.mean():.4f} ± {bpb.std(ddof=1) if len(bpb) > 1 else 0:.4f} "
              f"| {mean('flops_per_byte') * 1e6 / 1e9:.0f} | {mean('train_bytes_per_second') / 1e3:.1f} "
              f"| {mean('generation_bytes_per_second'):.0f} |")


if __name__ == "__main__":
  app.run(main)
