"""The word-sense evaluation of token vectors (issue 17; `experiments/eval_word_senses.py`,
`experiments/fuser_distill.py`): WordNet's example sentences of polysemous lemmas
(`fsqtok.studies.wordnet`), the word's vector in each from a representation (the static
table, the fuser, an LM's hidden states, a pretrained reference encoder), and both probes
of `fsqtok.studies.sense_probes` over seeded splits (`score`)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fsqtok.models import fuser as fuser_lib
from fsqtok.models import lm as lm_lib
from fsqtok.studies import reference_encoder
from fsqtok.studies import sense_probes
from fsqtok.studies import wordnet
from fsqtok.tokenizer.tokenizer import VOCAB_FILE, Tokenizer
from fsqtok.train import fuser_train

# ---- the word's vector in each example -------------------------------------------

def target_tokens(tok, examples):
  """Per example: its ids and the indices of the tokens covering the word."""
  out = []
  for e in examples:
    ids, offsets = tok.encode_with_offsets(e.sentence)
    where = [k for k, (a, b) in enumerate(offsets) if a < e.end and b > e.start]
    out.append((ids, where))
  return out


def lm_hidden_vectors(model, params, tok, encoded, max_len: int, batch: int = 32):
  """The LM's final hidden state, averaged over the word's tokens ([BOS] prepended)."""
  fn = jax.jit(lambda p, i, v: model.apply({"params": p}, i, v,
                                           method=lm_lib.TransformerLM.hidden)[0])
  out = []
  for s in range(0, len(encoded), batch):
    part = encoded[s:s + batch]
    ids = np.full((batch, max_len), tok.pad_id, np.int32)
    valid = np.zeros((batch, max_len), bool)
    for r, (x, _) in enumerate(part):
      x = [tok.bos_id, *x][:max_len]
      ids[r, :len(x)], valid[r, :len(x)] = x, True
    h = np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(valid)))
    for r, (_, where) in enumerate(part):
      rows = [k + 1 for k in where if k + 1 < max_len] or [max_len - 1]
      out.append(h[r, rows].mean(0))
  return np.stack(out)


def prepare_examples(config, tok, wn_dir, train_texts=()):
  """``(examples, encoded, seen)``: WordNet's example sentences of polysemous lemmas
  (``config.eval``), less the ``seen`` ones that occur in ``train_texts`` and those whose
  word no token covers; ``encoded``: per example, its ids and the word's token indices."""
  e = config.eval
  examples = wordnet.sense_examples(wn_dir, tuple(e.pos),
                                    min_examples_per_sense=e.min_examples_per_sense,
                                    max_words=e.max_words)
  examples, seen = wordnet.drop_seen(examples, train_texts)
  encoded = target_tokens(tok, examples)
  covered = [i for i, (_, w) in enumerate(encoded) if w]
  # what is left after both must still have two senses of a lemma with enough examples
  keep = [covered[k] for k in wordnet.keep_polysemous(
      [examples[i] for i in covered], min_examples_per_sense=e.min_examples_per_sense)]
  if not keep:
    raise ValueError(f"No polysemous lemma in {wn_dir} has two senses with "
                     f"{e.min_examples_per_sense} usable examples (outside the training "
                     f"text: {seen} dropped).")
  return [examples[i] for i in keep], [encoded[i] for i in keep], seen


def score(config, reps: dict[str, np.ndarray], examples, encoded, seen: int) -> dict:
  """Both probes (`fsqtok.studies.sense_probes`) on every representation in ``reps``
  (``name -> N x D``, one row per example), over ``config.eval.seeds``."""
  e = config.eval
  results = {name: [] for name in ["majority sense", *reps]}
  # word in context: all pairs, and pairs whose word has the same token ids in both
  # sentences (a static table cannot tell those apart: chance by construction)
  forms = {"any form": None, "same tokens": [tuple(np.asarray(ids)[w]) for ids, w in encoded]}
  pairs = {kind: {name: [] for name in reps} for kind in forms}
  sizes, pair_sizes = [], {kind: [] for kind in forms}
  for seed in e.seeds:
    train, test = sense_probes.split_by_sense(examples, seed)
    sizes.append((len(train), len(test)))
    results["majority sense"].append(sense_probes.majority_accuracy(examples, train, test))
    for name, vec in reps.items():
      results[name].append(sense_probes.centroid_accuracy(vec, examples, train, test))
    for kind, form in forms.items():
      train_p, test_p = sense_probes.context_pairs(
          examples, seed, test_share=e.wic_test_share,
          max_pairs_per_word=e.wic_max_pairs_per_word, forms=form)
      pair_sizes[kind].append((len(train_p), len(test_p)))
      for name, vec in reps.items():
        pairs[kind][name].append(sense_probes.pair_accuracy(vec, train_p, test_p)[0])
  summary = lambda res: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                             "per_seed": v} for k, v in res.items()}
  words = len({x.word for x in examples})
  senses = len({(x.word, x.sense) for x in examples})
  return {"examples": len(examples), "words": words, "senses": senses,
          "seen_in_training": seen, "split_sizes": sizes, "seeds": list(e.seeds),
          "accuracy": summary(results),
          "word_in_context": {kind: {"pair_sizes": pair_sizes[kind],
                                     "test_share": e.wic_test_share,
                                     "accuracy": summary(pairs[kind])} for kind in forms}}


def fuser_vectors(fuser_model, fuser_params, tok, encoded) -> tuple[dict, dict]:
  """``(reps, cache metrics)``: the word's mean fuser vector per example, without context,
  with it (dynamic path), as gated, and the context part (with minus without)."""
  enc = fuser_lib.FuserEncoder(fuser_model, fuser_params, tok, chunk=256)
  ids_list = [ids for ids, _ in encoded]
  where = [w for _, w in encoded]
  reps = {}
  for name, kw in (("fuser, no context", dict(context=False, force_dynamic=True)),
                   ("fuser, with context", dict(context=True, force_dynamic=True)),
                   ("fuser, gated (as used)", dict(context=True, force_dynamic=False))):
    reps[name] = np.stack([v.mean(0) for v in enc.encode_ids(ids_list, positions=where,
                                                             **kw)])
  # what context changed: the vector with context minus the one without (the token's
  # own part, shared by every same-token pair, taken out)
  reps["fuser, context part (with - no context)"] = (reps["fuser, with context"]
                                                     - reps["fuser, no context"])
  return reps, enc.metrics


def reference_vectors(reference: reference_encoder.ReferenceEncoder, examples) -> dict:
  """A pretrained encoder's input embeddings and last layer at each example's word."""
  vectors = reference.word_vectors([x.sentence for x in examples],
                                   [(x.start, x.end) for x in examples])
  return {f"reference {reference.name}: {part}": vec for part, vec in vectors.items()}


def word_sense_table(config, tok, fuser_model, fuser_params, lm_model, lm_params, wn_dir,
                     train_texts=(), reference: reference_encoder.ReferenceEncoder | None = None):
  """Both probes on every representation (`score`); examples whose sentence occurs in
  ``train_texts`` are dropped first (counted in ``seen_in_training``). ``reference``: a
  pretrained encoder's input embeddings and last layer, scored as two more rows (a
  reference point: a model trained on far more text)."""
  examples, encoded, seen = prepare_examples(config, tok, wn_dir, train_texts)
  table = np.asarray(fuser_params["static"]["embedding"])
  reps = {"static table": np.stack([table[np.asarray(ids)[w]].mean(0) for ids, w in encoded])}
  # no model: the mean static vector of the word's neighbours (what context alone gives)
  reps[f"context bag (static table, ±{config.eval.context_bag_tokens} tokens)"] = (
      sense_probes.context_bag(table, encoded, config.eval.context_bag_tokens))
  fuser_reps, cache = fuser_vectors(fuser_model, fuser_params, tok, encoded)
  reps.update(fuser_reps)
  reps["LM hidden states"] = lm_hidden_vectors(lm_model, lm_params, tok, encoded,
                                               config.lm.data.seq_len)
  if reference is not None:
    reps.update(reference_vectors(reference, examples))
  return {**score(config, reps, examples, encoded, seen), "cache": cache}


def load_tokenizer(config, texts, workdir: str):
  """``(tokenizer, kind)``: ``config.tokenizer.dir``'s, else the one counted from
  ``texts`` (``config.tokenizer.vocab_size`` ids) and kept under ``workdir/vocab``."""
  if config.tokenizer.dir:
    if not os.path.exists(os.path.join(config.tokenizer.dir, VOCAB_FILE)):
      raise FileNotFoundError(f"config.tokenizer.dir={config.tokenizer.dir!r} holds no "
                              f"{VOCAB_FILE}: train one with `fsqtok train-tokenizer` or set "
                              f"it to '' for a tokenizer counted from the corpus.")
    return Tokenizer.load(config.tokenizer.dir), "fsqtok (codec) " + config.tokenizer.dir
  vocab_dir = os.path.join(workdir, "vocab")
  if os.path.exists(os.path.join(vocab_dir, VOCAB_FILE)):
    return Tokenizer.load(vocab_dir), "counted (top pieces)"
  tok = fuser_train.counted_tokenizer(texts, config.tokenizer.vocab_size)
  tok.save(vocab_dir)
  return tok, "counted (top pieces)"
