"""The whole curriculum: ``recon -> vocab -> [fuser] -> lm -> joint``, then a sample.

With ``lm.model.embedding = "fuser"`` the ``fuser`` phase first trains the contextual
fuser (`fsqtok.train.fuser_train`: masked LM + InfoNCE + drift, causal windows, the spec
``lm.model.fuser``) on the curriculum's tokens, and the LM starts from it as its embedding
(``fuser.train.num_steps = 0``: from a fresh one).

Each phase lives in ``WORKDIR/<phase>/``, starts from the previous phase's final state and
resumes from its own newest checkpoint; a finished phase is skipped, so running a finished
curriculum again only re-reads its reports.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fsqtok.codec import evaluate as evaluate_lib
from fsqtok.data import corpus as corpus_lib
from fsqtok.data import hosts
from fsqtok.data import lm_data
from fsqtok.data.batches import PieceSet
from fsqtok.models import embeddings as embeddings_lib
from fsqtok.models import fuser as fuser_lib
from fsqtok.models import generate as generate_lib
from fsqtok.models import lm as lm_lib
from fsqtok.tokenizer import build as tokenizer_build
from fsqtok.tokenizer import candidates as candidates_lib
from fsqtok.tokenizer.build import train_tokenizer
from fsqtok.tokenizer.tokenizer import VOCAB_FILE, Tokenizer
from fsqtok.train import fuser_train
from fsqtok.train import lm_train
from fsqtok.train import loop as train_loop
from fsqtok.train import recon
from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib

AMBIGUOUS_FILE = "ambiguous_ids.json"


def build_lm(config, tok: Tokenizer, codec=None, token_counts=None,
             ambiguous_ids=()) -> lm_lib.TransformerLM:
  """The LM of ``config.lm.model`` over ``tok``'s ids (codes and bytes per id;
  ``token_counts``: training counts per id, for the bespoke embedding;
  ``ambiguous_ids``: the fuser embedding's precomputed ambiguous set)."""
  ids = range(len(tok))
  token_codes = [tok.id_to_code(i) for i in ids]
  m = config.lm.model
  if m.head.startswith("factorized") and head_codes(m) == "frequency":  # else unused
    if token_counts is None:
      raise ValueError("lm.model.head_codes='frequency' ranks the tokens by their training "
                       "counts: pass token_counts.")
    learned = np.zeros(len(tok), bool)
    learned[list(tok.learned_ids)] = True
    token_codes = embeddings_lib.frequency_codes(token_counts, learned, config.model.levels)
  return lm_lib.lm_from_config(
      config.lm.model, len(tok), token_codes=token_codes,
      levels=config.model.levels, token_bytes=[tok.token_bytes(i) for i in ids],
      codec=codec if config.lm.model.embedding == "codec" else None,
      token_counts=token_counts if _needs_counts(config.lm.model) else None,
      ambiguous_ids=ambiguous_ids)


def _needs_counts(model_config) -> bool:
  """Whether the LM needs its tokens' training counts: the bespoke embedding's buckets,
  a factorized head's flat rows."""
  return model_config.embedding == "bespoke" or (
      model_config.head.startswith("factorized") and (
          model_config.get("head_flat_tokens", 0) or head_codes(model_config) == "frequency"))


def head_codes(model_config) -> str:
  """Which codes a factorized head spells: ``codec`` (the codec's, the default) or
  ``frequency`` (`fsqtok.models.embeddings.frequency_codes`: the rank by training count,
  an adaptive softmax; closed-vocabulary sampling). Other heads spell nothing, and keep
  the codec's codes for the embeddings that read them."""
  kind = model_config.get("head_codes", "codec")
  if kind not in ("codec", "frequency"):
    raise ValueError(f"lm.model.head_codes must be 'codec' or 'frequency', got {kind!r}.")
  if (kind == "frequency" and model_config.head.startswith("factorized")
      and model_config.embedding in ("table_code", "code_factorized")):
    raise ValueError(f"lm.model.head_codes='frequency' gives the tokens codes of their "
                     f"frequency rank, which embedding {model_config.embedding!r} would "
                     f"read as spellings: use head_codes='codec' or another embedding "
                     f"(table, codec, bespoke, fuser).")
  return kind


def fuser_ambiguous_ids(config, workdir: str, tok: Tokenizer,
                        train_data: Callable[[], Any]) -> tuple[int, ...]:
  """The fuser embedding's ambiguous set from the statistics of the training tokens
  (``config.fuser.ambiguity``), computed once and kept in ``WORKDIR/fuser``; () for other
  embeddings. ``train_data()``: the LM's windows (`lm_windows`); each process counts the
  token pairs of its own rows, and the counts of all are added up."""
  if config.lm.model.embedding != "fuser":
    return ()
  path = os.path.join(workdir, "fuser", AMBIGUOUS_FILE)
  saved = workdir_lib.read_saved_json(path)
  if saved is not None:
    return tuple(saved)
  a = config.fuser.ambiguity
  mine = fuser_train.next_token_pairs(train_data().local_training_rows(), len(tok),
                                      pad_id=tok.pad_id)
  pairs = fuser_train.add_pairs(hosts.all_gather_objects(mine))
  ids = fuser_train.ambiguous_ids(tok, pairs=pairs, corpus_top_k=a.corpus_top_k,
                                  min_count=a.min_count)
  workdir_lib.makedirs(os.path.dirname(path))
  workdir_lib.write_json(path, list(ids))
  return ids


def with_fuser(params, fuser_params):
  """The LM's parameters with its fuser embedding replaced by a trained fuser's (the
  masked-LM head, which the LM does not use, left out)."""
  trained = {k: v for k, v in fuser_params.items() if k != "mlm_head"}
  current = params["embed"]["fuser"]
  if jax.tree.structure(current) != jax.tree.structure(trained) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(trained))):
    raise ValueError("The trained fuser does not fit the LM's fuser embedding: train it "
                     "with the LM's spec (lm.model.fuser) and d_model.")
  return {**params, "embed": {**params["embed"], "fuser": trained}}


def train_fuser_phase(config, workdir: str, model: lm_lib.TransformerLM, tok: Tokenizer,
                      texts, lm_windows_data=None) -> tuple[dict[str, Any], Any]:
  """Trains the LM's fuser embedding on its own (``WORKDIR/fuser``), with the LM's causal
  spec, vocabulary, width and ambiguous set, on windows of ``fuser.data.seq_len`` tokens
  (the LM's own, ``lm_windows_data``, when the lengths agree) read like the LM's
  (``lm.data.loader``: with ``"grain"`` each process reads its own rows)."""
  fuser_model = fuser_lib.ContextualFuser(model.vocab_size, model.d_model,
                                          model.token_bytes, fuser_lib.lm_spec(model),
                                          model.ambiguous_ids)
  seq_len = config.fuser.data.seq_len
  if lm_windows_data is not None and seq_len == config.lm.data.seq_len:
    data = lm_windows_data
  else:  # a token store of the LM's is cut again, not tokenized again
    data = lm_windows(config, workdir, tok, texts, seq_len=seq_len,
                      from_store=getattr(lm_windows_data, "directory", None))
  return fuser_train.train_fuser(config, os.path.join(workdir, "fuser"), fuser_model, tok,
                                 data, loader=config.lm.data.get("loader", "epochs"))


def corpus_texts(config):
  """The corpus's train and validation blocks: in memory, or, when the windows go to a
  token store (``lm.data.loader="grain"``), streamed (`fsqtok.data.corpus.stream_split`):
  each process then reads only its own documents of a ``files:`` or ``tfds:`` corpus
  (those it counts, those of its shards to tokenize: `fsqtok.data.corpus.BlockStream.share`)
  and never holds the whole text. With several processes and the in-memory loader every
  process loads the whole corpus: that is said in the log."""
  stream = config.lm.data.get("loader") == "grain"
  if not stream and jax.process_count() > 1:
    logging.warning("lm.data.loader=%r: each of the %d processes loads the whole corpus "
                    "and makes every global batch; --config.lm.data.loader=grain makes each "
                    "read only its own share.", config.lm.data.get("loader", "epochs"),
                    jax.process_count())
  return corpus_lib.load_split(config.data, stream=stream)


def lm_windows(config, workdir: str, tok: Tokenizer, texts, pieces=None,
               seq_len: int | None = None, from_store: str | None = None):
  """The LM's train and validation windows (of ``lm.data.seq_len`` tokens, or
  ``seq_len``): in memory (``lm.data.loader="epochs"``), or prepared in
  ``lm.data.store_dir`` (default ``WORKDIR/lm_data``) by every process for its own shards
  (``"grain"``, `fsqtok.data.token_store`; a new store whenever the tokenizer, corpus,
  window length or shard count changes; ``from_store``: a store of other windows of the
  same text, cut again instead of tokenizing ``texts``)."""
  d = config.lm.data
  seq_len = seq_len or d.seq_len
  if d.get("loader", "epochs") != "grain":
    return lm_data.LMData(tok, texts, seq_len, pieces)
  from fsqtok.data import token_store  # pylint: disable=g-import-not-at-top
  directory = token_store.store_dir(
      d.get("store_dir") or os.path.join(workdir, "lm_data"), data=config.data.to_dict(),
      content=corpus_lib.content_key(config.data.source),
      seq_len=seq_len, shards=d.shards, tokenizer=tok.fingerprint(),
      layout=token_store.SHARD_LAYOUT)
  return lm_data.StoredLMData(directory, tok, texts, seq_len, num_shards=d.shards,
                              pieces=pieces, progress=config.lm.train.progress_bar,
                              from_store=from_store)


def load_lm(config, workdir: str):
  """``(tokenizer, model, params)`` of a finished curriculum (the joint phase's parameters
  if it ran, else the lm phase's)."""
  tok = Tokenizer.load(os.path.join(workdir, "vocab"))
  codec, _ = recon.load_trained_codec(tokenizer_build.codec_config(config), workdir)
  data = functools.cache(lambda: lm_windows(config, workdir, tok, corpus_texts(config)))
  counts = data().token_counts(len(tok)) if _needs_counts(config.lm.model) else None
  model = build_lm(config, tok, codec, counts, fuser_ambiguous_ids(config, workdir, tok, data))
  phase = "joint" if workdir_lib.exists(os.path.join(workdir, "joint", train_loop.REPORT)) else "lm"
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return tok, model, lm_train.load_phase_params(os.path.join(workdir, phase), init)


def vocabulary_drift(codec, before, after, tok: Tokenizer, *, mesh,
                     batch_size: int) -> dict[str, float]:
  """What joint training did to the vocabulary's strings, from the codec's parameters
  ``before`` and ``after`` it: the share of learned tokens whose string the codec still
  reconstructs exactly, and the share the encoder still gives the code it gave before."""
  strings = {tok.token_bytes(i).decode("utf-8"): 1 for i in tok.learned_ids}
  if not strings:
    return {"still_exact": float("nan"), "same_code": float("nan"), "learned_tokens": 0}
  pieces = PieceSet.from_counts(strings, codec.max_len)
  stats = lambda p: evaluate_lib.compute_piece_stats(codec, p, pieces, batch_size=batch_size,
                                                     mesh=mesh)
  old, new = stats(before), stats(after)
  return {"still_exact": float(np.mean(new["exact"])),
          "same_code": float(np.mean(np.asarray(old["code"]) == np.asarray(new["code"]))),
          "learned_tokens": len(strings)}


def codec_pieces(config, workdir: str, texts) -> tuple[PieceSet, PieceSet]:
  """What the codec learns (and the joint phase keeps reconstructing): the unigram
  vocabulary's strings (trained once, kept in ``workdir``), or the codec-exact build's
  candidates."""
  if config.tokenizer.vocabulary == "codec_exact":
    return candidates_lib.load_pieces(config, texts)
  vocab, _ = tokenizer_build.unigram_vocabulary(config, workdir, texts[0],
                                                tokenizer_build.learned_size(config.vocab.size))
  strings = tokenizer_build.vocabulary_pieces(vocab, config.model.max_len)
  return strings, strings


def _saved_tokenizer(vocab_dir: str) -> Tokenizer | None:
  """The vocabulary phase's saved tokenizer, or None. A damaged one is set aside
  (``vocab.damaged``) to be built again: the build is deterministic, so the later phases,
  built on the old one, still fit."""
  if not workdir_lib.exists(os.path.join(vocab_dir, VOCAB_FILE)):
    return None
  try:
    return Tokenizer.load(vocab_dir)
  except ValueError as e:
    workdir_lib.set_aside(vocab_dir, str(e))
    return None


def validate_config(config) -> None:
  """Every mistake a config can hold that would otherwise stop a run part-way: one
  `recon.ConfigError` naming the field, before any corpus is read or step is taken."""
  recon.validate_config(config)
  try:
    _check_config(config)
  except ValueError as e:
    raise recon.ConfigError(str(e)) from None


def _check_config(config) -> None:
  corpus_lib.check_invalid_utf8(config.data.get("invalid_utf8", "error"))
  tokenizer_build.learned_size(config.vocab.size)
  if config.tokenizer.vocabulary == "unigram":
    tokenizer_build.check_vocabulary_config(config.tokenizer)
  m, t = config.lm.model, config.lm.train
  if config.lm.data.get("loader", "epochs") not in lm_data.LOADERS:
    raise ValueError(f"lm.data.loader={config.lm.data.loader!r} is unknown: use one of "
                     f"{lm_data.LOADERS}.")
  if config.lm.data.get("loader") == "grain" and config.lm.data.shards < jax.process_count():
    raise ValueError(f"lm.data.shards={config.lm.data.shards} gives some of the "
                     f"{jax.process_count()} processes no data: use at least "
                     f"{jax.process_count()}.")
  for field, names in (("embedding", embeddings_lib.EMBEDDINGS),
                       ("head", embeddings_lib.HEADS)):
    if m[field] not in names:
      raise ValueError(f"lm.model.{field}={m[field]!r} is unknown: use one of {sorted(names)}.")
  head_codes(m)
  if m.embedding == "fuser":
    try:
      spec = fuser_lib.FuserSpec.from_config(m.fuser)
    except (ValueError, TypeError) as e:
      raise ValueError(str(e).replace("fuser.model", "lm.model.fuser")) from None
    if spec.max_token_bytes < config.model.max_len:
      raise ValueError(f"lm.model.fuser.max_token_bytes={spec.max_token_bytes} is below the "
                       f"longest token's {config.model.max_len} bytes (model.max_len): "
                       f"raise it to at least that.")
    if config.fuser.train.num_steps:  # the fuser phase trains it first
      fuser_train.check_config(config.fuser)
  lm_lib.check_model_config(m, config.lm.data.seq_len)
  if m.d_model % m.num_heads:
    raise ValueError(f"lm.model.d_model={m.d_model} is not divisible by "
                     f"lm.model.num_heads={m.num_heads}.")
  if t.num_steps < 1:  # the lm phase is the one every later phase starts from
    raise ValueError(f"lm.train.num_steps must be >= 1, got {t.num_steps}.")
  if config.joint.num_steps < 0:
    raise ValueError(f"joint.num_steps must be >= 0 (0: no joint phase), got "
                     f"{config.joint.num_steps}.")
  try:
    mesh = sharding_lib.mesh_from_config(t)
  except ValueError as e:
    raise ValueError(f"lm.train: {e}") from None
  sharding_lib.check_batch_size(config.lm.data.batch_size, mesh, "lm.data.batch_size")
  sharding_lib.check_batch_size(t.eval_batch_size, mesh, "lm.train.eval_batch_size")
  if config.joint.num_steps:  # the joint step's piece batch, and the vocabulary check after
    sharding_lib.check_batch_size(config.joint.piece_batch_size, mesh, "joint.piece_batch_size")
    sharding_lib.check_batch_size(config.train.eval_batch_size, mesh,
                                  "train.eval_batch_size (the codec's, on the LM's devices "
                                  "after the joint phase)")


@workdir_lib.exclusive_workdir
def run_curriculum(config, workdir: str) -> dict[str, Any]:
  validate_config(config)
  texts = corpus_texts(config)
  report: dict[str, Any] = {"source": config.data.source, "invalid_utf8":
                            corpus_lib.invalid_utf8_counts(
                                config.data.source, config.data.get("invalid_utf8", "error"))}
  vocab_dir = os.path.join(workdir, "vocab")
  pieces = codec_pieces(config, workdir, texts)
  tok = _saved_tokenizer(vocab_dir)
  if tok is None:
    tok, _ = train_tokenizer(config, workdir, config.vocab.size, vocab_dir, texts=texts, pieces=pieces)
  sharding_lib.sync_processes("fsqtok tokenizer saved")  # process 0 wrote vocab_dir
  report["recon"] = {k: v for k, v in recon.train_recon(config, workdir, pieces).items()
                     if k in ("validation", "train_wall_seconds", "steps")}
  codec, codec_params = recon.load_trained_codec(tokenizer_build.codec_config(config), workdir)
  saved = tokenizer_build.load_codec_params(vocab_dir, codec_params)
  if saved is not None:  # the build's codec, its decoder trained on the assigned codes
    codec_params = saved
  data = lm_windows(config, workdir, tok, texts, pieces)
  model = build_lm(config, tok, codec, data.token_counts(len(tok)),
                   fuser_ambiguous_ids(config, workdir, tok, lambda: data))
  fuser_params = None
  if model.embedding == "fuser" and config.fuser.train.num_steps:
    report["fuser"], fuser_params = train_fuser_phase(config, workdir, model, tok, texts, data)

  def fresh_params():
    params = model.init(jax.random.PRNGKey(config.seed),
                        jnp.zeros((1, config.lm.data.seq_len), jnp.int32))["params"]
    if model.codec is not None:
      params = {**params, "codec": codec_params}
    if fuser_params is not None:
      params = with_fuser(params, fuser_params)
    return params

  report["lm"], params = lm_train.train_lm_phase("lm", config, workdir, model, data,
                                                 fresh_params, frozen=("codec",))
  j = config.joint
  if j.num_steps and model.codec is not None:
    lm_codec = params["codec"]
    report["joint"], params = lm_train.train_lm_phase(
        "joint", config, workdir, model, data, lambda: params, recon_weight=j.recon_weight,
        optim=j.optim, num_steps=j.num_steps)
    mesh = sharding_lib.data_mesh(config.lm.train.num_devices)
    report["joint"]["vocabulary"] = vocabulary_drift(
        model.codec, lm_codec, params["codec"], tok, mesh=mesh,
        batch_size=config.train.eval_batch_size)
  elif j.num_steps:
    report["joint"] = {"skipped": f"embedding {config.lm.model.embedding!r} does not use the "
                                  f"codec, so the joint loss would not couple them; use "
                                  f"lm.model.embedding='codec'."}

  s = config.sample
  prompt = [tok.bos_id, *tok.encode(s.prompt)]
  kw = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p)
  if model.head.startswith("factorized") and head_codes(config.lm.model) == "codec":
    # sample its code space; the codec decodes codes outside the vocabulary
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
  report["sample"] |= {"prompt": s.prompt, "text": s.prompt + text}
  final = report.get("joint", {}).get("validation") or report["lm"]["validation"]
  report["bits_per_byte"] = final["bits_per_byte"]
  workdir_lib.write_json(os.path.join(workdir, "curriculum_report.json"), report)
  return report
