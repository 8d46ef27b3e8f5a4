"""The whole curriculum: ``recon -> vocab -> lm -> joint``, then a sample.

Each phase lives in ``WORKDIR/<phase>/``, starts from the previous phase's final state and
resumes from its own newest checkpoint; a finished phase is skipped, so running a finished
curriculum again only re-reads its reports.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fsqtok import evaluate as evaluate_lib
from fsqtok import generate as generate_lib
from fsqtok import lm as lm_lib
from fsqtok import lm_train
from fsqtok import recon
from fsqtok import sharding as sharding_lib
from fsqtok import workdir as workdir_lib
from fsqtok.data import PieceSet
from fsqtok.tokenizer import VOCAB_FILE, Tokenizer
from fsqtok.tokenizer_build import train_tokenizer


def build_lm(config, tok: Tokenizer, codec=None, token_counts=None) -> lm_lib.TransformerLM:
  """The LM of ``config.lm.model`` over ``tok``'s ids (codes and bytes per id;
  ``token_counts``: training counts per id, for the bespoke embedding)."""
  ids = range(len(tok))
  return lm_lib.lm_from_config(
      config.lm.model, len(tok), token_codes=[tok.id_to_code(i) for i in ids],
      levels=config.model.levels, token_bytes=[tok.token_bytes(i) for i in ids],
      codec=codec if config.lm.model.embedding == "codec" else None,
      token_counts=token_counts if config.lm.model.embedding == "bespoke" else None)


def load_lm(config, workdir: str):
  """``(tokenizer, model, params)`` of a finished curriculum (the joint phase's parameters
  if it ran, else the lm phase's)."""
  tok = Tokenizer.load(os.path.join(workdir, "vocab"))
  codec, _ = recon.load_trained_codec(config, workdir)
  counts = None
  if config.lm.model.embedding == "bespoke":
    counts = lm_train.LMData(tok, recon.load_texts(config), config.lm.data.seq_len
                             ).token_counts(len(tok))
  model = build_lm(config, tok, codec, counts)
  phase = "joint" if os.path.exists(os.path.join(workdir, "joint", lm_train.PARAMS_FILE)) else "lm"
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return tok, model, lm_train.load_phase_params(os.path.join(workdir, phase), init)


def vocabulary_drift(model: lm_lib.TransformerLM, params, tok: Tokenizer, *, mesh,
                     batch_size: int) -> dict[str, float]:
  """After joint training: the share of learned tokens whose string the codec still
  reconstructs exactly, and the share whose code changed."""
  strings = {tok.token_bytes(i).decode("utf-8"): 1 for i in tok.learned_ids}
  if not strings:
    return {"still_exact": float("nan"), "same_code": float("nan"), "learned_tokens": 0}
  pieces = PieceSet.from_counts(strings, model.codec.max_len)
  stats = evaluate_lib.compute_piece_stats(model.codec, params["codec"], pieces,
                                           batch_size=batch_size, mesh=mesh)
  code_of = {tok.token_bytes(i): tok.id_to_code(i) for i in tok.learned_ids}
  same = [code_of[pieces.piece_bytes(k)] == c for k, c in enumerate(stats["code"])]
  return {"still_exact": float(np.mean(stats["exact"])), "same_code": float(np.mean(same)),
          "learned_tokens": len(strings)}


def run_curriculum(config, workdir: str) -> dict[str, Any]:
  texts = recon.load_texts(config)
  pieces = recon.load_pieces(config, texts)
  report: dict[str, Any] = {"source": config.data.source}
  report["recon"] = {k: v for k, v in recon.train_recon(config, workdir, pieces).items()
                     if k in ("validation", "train_wall_seconds", "steps")}

  vocab_dir = os.path.join(workdir, "vocab")
  if not os.path.exists(os.path.join(vocab_dir, VOCAB_FILE)):
    train_tokenizer(config, workdir, config.vocab.size, vocab_dir, texts=texts, pieces=pieces)
  tok = Tokenizer.load(vocab_dir)
  codec, codec_params = recon.load_trained_codec(config, workdir)
  data = lm_train.LMData(tok, texts, config.lm.data.seq_len, pieces)
  model = build_lm(config, tok, codec, data.token_counts(len(tok)))

  def fresh_params():
    params = model.init(jax.random.PRNGKey(config.seed),
                        jnp.zeros((1, config.lm.data.seq_len), jnp.int32))["params"]
    if model.codec is not None:
      params = {**params, "codec": codec_params}
    return params

  report["lm"], params = lm_train.train_lm_phase("lm", config, workdir, model, data,
                                                 fresh_params, frozen=("codec",))
  j = config.joint
  if j.num_steps and model.codec is not None:
    report["joint"], params = lm_train.train_lm_phase(
        "joint", config, workdir, model, data, lambda: params, recon_weight=j.recon_weight,
        optim=j.optim, num_steps=j.num_steps)
    mesh = sharding_lib.data_mesh(config.lm.train.num_devices)
    report["joint"]["vocabulary"] = vocabulary_drift(
        model, params, tok, mesh=mesh, batch_size=config.train.eval_batch_size)
  elif j.num_steps:
    report["joint"] = {"skipped": f"embedding {config.lm.model.embedding!r} does not use the "
                                  f"codec, so the joint loss would not couple them; use "
                                  f"lm.model.embedding='codec'."}

  s = config.sample
  prompt = [tok.bos_id, *tok.encode(s.prompt)]
  kw = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p)
  if model.embedding == "fuser":  # its causal windows are not kept by the KV cache yet
    report["sample"] = {"prompt": s.prompt, "text": "", "skipped": "generation with the "
                        "fuser embedding is not supported yet"}
  elif model.head.startswith("factorized"):  # sample its code space; the codec decodes codes
    out = generate_lib.generate_open(
        model, params, tok, codec, params["codec"] if model.codec is not None else codec_params,
        [prompt], jax.random.PRNGKey(s.seed), **kw)[0]
    text = tok.decode(out["ids"], skip_special_tokens=True)
    report["sample"] = {"open_codes": out["open_codes"], "codes": out["codes"]}
  else:
    new = generate_lib.generate(model, params, [prompt], jax.random.PRNGKey(s.seed),
                                eos_id=tok.eos_id, pad_id=tok.pad_id, **kw)[0]
    text = tok.decode(new, skip_special_tokens=True)
    report["sample"] = {}
  if "skipped" not in report["sample"]:
    report["sample"] |= {"prompt": s.prompt, "text": s.prompt + text}
  final = report.get("joint", {}).get("validation") or report["lm"]["validation"]
  report["bits_per_byte"] = final["bits_per_byte"]
  workdir_lib.write_json(os.path.join(workdir, "curriculum_report.json"), report)
  return report
