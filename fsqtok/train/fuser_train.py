"""Training the contextual fuser: masked-LM + InfoNCE + drift penalty, one pure step.

Per step, on a batch of token windows (``inputs`` ``[B, T]`` and ``valid``, the LM's
windows of `fsqtok.data.lm_data`, so the fuser reads the same loaders and token store):

* **masked LM**: `fsqtok.models.masking.mask_tokens` (80/10/10) corrupts the ids; the fuser's
  vectors of the corrupted sequence predict the original ids at the chosen positions
  (a dense head over the vocabulary). ``[MASK]`` is in the ambiguous set
  (`ambiguous_ids`), so where the gate reads the set (``gate_mode`` both, set or always)
  a masked token is recovered from its context; with ``learned`` the gate alone decides,
  and a ``per_id`` capacity below 1 can leave a ``[MASK]`` without a dynamic slot.
* **InfoNCE**: ``nce_samples`` positions are drawn among the ordinary tokens (a batch
  with fewer leaves the extra draws out of the loss, as for the neighbours); each
  token's dynamic vector with its true context is the anchor, the vector of its context
  alone (the token replaced by ``[MASK]``) the key; the other keys of the batch and the
  token placed in another position's context (shuffled) are the negatives.
* **neighbours** (``neighbour_weight > 0``): ``neighbour_samples`` positions are drawn
  among the ordinary tokens; in each one's window one ordinary neighbour is hidden
  (its slot set to `fsqtok.models.fuser.OUTSIDE`, as beyond the sequence) and the token's
  dynamic vector, computed with the token itself in view, predicts the hidden neighbour
  through the masked-LM head: a contextual skip-gram, which trains the vectors of
  ordinary (unmasked) tokens — the ones a word-sense probe reads — to say what their
  context allows, where the masked LM trains only the vectors of ``[MASK]``.
* **drift**: each token's vectors are pulled toward its reference vector, an EMA over
  batches kept in the train state (``reference_VxD``, ``seen_V``) and updated every
  ``reference_every`` steps.
* **gate cost**: ``gate_cost x`` the mean learned ambiguity score keeps the learned gate
  sparse.

A document signal (the hashed bag of the row's ids) is given to a random half of the
rows (``document_rate``), so the fuser learns with and without it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from fsqtok.data import lm_data
from fsqtok.models import fuser as fuser_lib
from fsqtok.models import masking
from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer.tokenizer import Tokenizer
from fsqtok.train import checkpoint as checkpoint_lib
from fsqtok.train import loop as train_loop
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib


class FuserState(train_state.TrainState):
  reference_VxD: jax.Array
  seen_V: jax.Array


@struct.dataclass
class StepConfig:
  """The step's static settings (from ``config.fuser.loss`` and the tokenizer)."""

  mask_id: int = struct.field(pytree_node=False)
  vocab_size: int = struct.field(pytree_node=False)
  first_ordinary: int = struct.field(pytree_node=False)  # ids >= this are not specials
  mask_rate: float = struct.field(pytree_node=False, default=0.15)
  mlm_weight: float = struct.field(pytree_node=False, default=1.0)
  nce_weight: float = struct.field(pytree_node=False, default=1.0)
  nce_samples: int = struct.field(pytree_node=False, default=32)
  temperature: float = struct.field(pytree_node=False, default=0.1)
  drift_weight: float = struct.field(pytree_node=False, default=0.1)
  reference_every: int = struct.field(pytree_node=False, default=10)
  reference_momentum: float = struct.field(pytree_node=False, default=0.1)
  gate_cost: float = struct.field(pytree_node=False, default=0.01)
  document_rate: float = struct.field(pytree_node=False, default=0.5)
  neighbour_weight: float = struct.field(pytree_node=False, default=0.0)
  neighbour_samples: int = struct.field(pytree_node=False, default=128)


_FROM_TOKENIZER = ("mask_id", "vocab_size", "first_ordinary")  # StepConfig's other fields


def check_config(f) -> None:
  """``config.fuser``'s training settings (``data``, ``loss``, ``train``), checked before
  any data is read; a ValueError names the field."""
  known = {x.name for x in dataclasses.fields(StepConfig)} - set(_FROM_TOKENIZER)
  unknown = sorted(set(f.loss) - known)
  if unknown:
    raise ValueError(f"fuser.loss has unknown fields {unknown}; known: {sorted(known)}.")
  loss = StepConfig(mask_id=0, vocab_size=1, first_ordinary=0, **f.loss.to_dict())
  tokens = f.data.batch_size * f.data.seq_len
  for name in ("nce_samples", "neighbour_samples")[:2 if loss.neighbour_weight else 1]:
    if not 1 <= getattr(loss, name) <= tokens:
      raise ValueError(f"fuser.loss.{name}={getattr(loss, name)} must be between 1 and the "
                       f"batch's {tokens} tokens (fuser.data.batch_size x seq_len): the "
                       f"positions are drawn among them.")
  if loss.reference_every < 1:
    raise ValueError(f"fuser.loss.reference_every must be >= 1, got {loss.reference_every}.")
  try:
    mesh = sharding_lib.mesh_from_config(f.train)
  except ValueError as e:
    raise ValueError(f"fuser.train: {e}") from None
  sharding_lib.check_batch_size(f.data.batch_size, mesh, "fuser.data.batch_size")


def step_config(loss_config, tok) -> StepConfig:
  mask_id = tok.token_to_id("[MASK]")
  if mask_id is None:
    raise ValueError("The fuser's masked-LM loss needs a [MASK] token: use an fsqtok "
                     "Tokenizer (its specials include [MASK]) or add_special_tokens(['[MASK]']).")
  first = len(tok.special_tokens) if hasattr(tok, "special_tokens") else 0
  return StepConfig(mask_id=mask_id, vocab_size=len(tok), first_ordinary=first,
                    **loss_config.to_dict())


def create_state(model: fuser_lib.ContextualFuser, params, tx) -> FuserState:
  return FuserState.create(apply_fn=model.apply, params=params, tx=tx,
                           reference_VxD=jnp.zeros((model.vocab_size, model.d_model)),
                           seen_V=jnp.zeros((model.vocab_size,), bool))


def _sample_positions(rng, ok_N, k: int):
  """``k`` distinct positions where ``ok_N`` (Gumbel top-k: static shape); a row is
  ``False`` in the second output if there were fewer than ``k``."""
  g = jax.random.gumbel(rng, ok_N.shape)
  _, idx = jax.lax.top_k(jnp.where(ok_N, g, -1e9), k)
  return idx, ok_N[idx]


def hide_neighbour(rng, windows_ExW, centre: int, first_ordinary: int):
  """Each window with one of its ordinary neighbours hidden (set to `OUTSIDE`), chosen
  uniformly; returns the windows, the hidden ids and whether a window had one to hide."""
  e, w = windows_ExW.shape
  ok = (windows_ExW >= first_ordinary) & (jnp.arange(w) != centre)[None, :]
  slot_E = jnp.argmax(jnp.where(ok, jax.random.gumbel(rng, (e, w)), -jnp.inf), axis=1)
  rows = jnp.arange(e)
  hidden_E = windows_ExW[rows, slot_E]
  return windows_ExW.at[rows, slot_E].set(fuser_lib.OUTSIDE), hidden_E, ok.any(1)


def losses(params, state: FuserState, batch, rng, c: StepConfig, spec: fuser_lib.FuserSpec):
  """The total loss and its parts (and the per-token means for the EMA update)."""
  ids, valid = batch["inputs"], batch["valid"].astype(bool)
  b, t = ids.shape
  model_apply = state.apply_fn
  mask_rng, nce_rng, perm_rng, doc_rng, nb_rng, hide_rng = jax.random.split(rng, 6)
  ordinary = valid & (ids >= c.first_ordinary)
  inputs, chosen = masking.mask_tokens(mask_rng, ids, ordinary, mask_id=c.mask_id,
                                       random_low=c.first_ordinary,
                                       random_high=c.vocab_size,
                                       rate=c.mask_rate)
  doc = fuser_lib.document_signal(inputs, valid, spec.doc_dim)
  has_doc = jax.random.uniform(doc_rng, (b,)) < c.document_rate
  signals = fuser_lib.empty_signals(b, spec)
  signals["document"] = doc
  signals["present"] = signals["present"].at[:, 0].set(has_doc)
  variables = {"params": params}

  # InfoNCE views of sampled positions (uncorrupted ids): the token in its context, the
  # context alone, the token in a shuffled context
  windows = fuser_lib.context_windows(ids, spec.window_left, spec.window_right,
                                      valid_BxT=valid).reshape(b * t, -1)
  pos, pos_ok = _sample_positions(nce_rng, ordinary.reshape(-1), c.nce_samples)
  rows = pos // t
  win = windows[pos]
  centre = spec.window_left
  ctx_only = win.at[:, centre].set(c.mask_id)
  shuffled = win[jax.random.permutation(perm_rng, c.nce_samples)].at[:, centre].set(
      win[:, centre])
  views, view_rows = [win, ctx_only, shuffled], [rows] * 3
  if c.neighbour_weight:  # contextual skip-gram views: one neighbour hidden
    npos, npos_ok = _sample_positions(nb_rng, ordinary.reshape(-1), c.neighbour_samples)
    hidden_win, hidden_ids, has_hidden = hide_neighbour(hide_rng, windows[npos], centre,
                                                        c.first_ordinary)
    views.append(hidden_win)
    view_rows.append(npos // t)
  # one dynamic pass for the batch and the views (one graph to compile, not two)
  x, aux = model_apply(variables, inputs, signals, extra_ExW=jnp.concatenate(views),
                       extra_rows_E=jnp.concatenate(view_rows), valid_BxT=valid)
  z = aux["extra"]
  m = c.nce_samples
  nce = fuser_lib.info_nce(z[:m], z[m:2 * m], z[2 * m:3 * m], c.temperature, pos_ok)
  neighbour = jnp.zeros(())
  if c.neighbour_weight:
    nb_logp = jax.nn.log_softmax(model_apply(
        variables, z[3 * m:], method=fuser_lib.ContextualFuser.mlm_logits).astype(jnp.float32))
    nb_nll = -jnp.take_along_axis(nb_logp, jnp.maximum(hidden_ids, 0)[:, None], -1)[:, 0]
    hw = (has_hidden & npos_ok).astype(jnp.float32)
    neighbour = jnp.sum(nb_nll * hw) / jnp.maximum(jnp.sum(hw), 1.0)

  logits = model_apply(variables, x, method=fuser_lib.ContextualFuser.mlm_logits)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, ids[..., None], -1)[..., 0]
  w = chosen.astype(jnp.float32)
  mlm = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

  keep = (ordinary & ~chosen).reshape(-1).astype(jnp.float32)
  flat_x, flat_ids = x.reshape(b * t, -1), ids.reshape(-1)
  drift = fuser_lib.drift_penalty(flat_x, flat_ids, keep, state.reference_VxD, state.seen_V)
  learned = (valid & ~aux["in_set"]).astype(jnp.float32)
  score = jnp.sum(aux["score"] * learned) / jnp.maximum(jnp.sum(learned), 1.0)
  total = (c.mlm_weight * mlm + c.nce_weight * nce + c.drift_weight * drift
           + c.gate_cost * score + c.neighbour_weight * neighbour)
  vf = valid.astype(jnp.float32)
  metrics = {"loss": total, "mlm_loss": mlm, "nce_loss": nce, "drift": drift,
             "neighbour_loss": neighbour,
             "gate_score": score,
             "activation_rate": jnp.sum(aux["gate"] * vf) / jnp.maximum(jnp.sum(vf), 1.0),
             "computed_rate": jnp.sum(aux["computed"] * vf) / jnp.maximum(jnp.sum(vf), 1.0),
             "mlm_accuracy": jnp.sum((jnp.argmax(logp, -1) == ids) * w)
                             / jnp.maximum(jnp.sum(w), 1.0)}
  return total, (metrics, jax.lax.stop_gradient(flat_x), flat_ids, keep)


def train_step(state: FuserState, batch, rng, c: StepConfig, spec: fuser_lib.FuserSpec):
  """One optimizer step; the reference EMA is refreshed every ``reference_every`` steps."""
  (loss, (metrics, x, ids, keep)), grads = jax.value_and_grad(losses, has_aux=True)(
      state.params, state, batch, rng, c, spec)
  new = state.apply_gradients(grads=grads)
  means, counts = fuser_lib.token_means(x, ids, keep, state.reference_VxD.shape[0])
  ref, seen = fuser_lib.ema_update(state.reference_VxD, state.seen_V, means, counts,
                                   c.reference_momentum)
  update = (state.step % c.reference_every) == 0
  new = new.replace(reference_VxD=jnp.where(update, ref, state.reference_VxD),
                    seen_V=jnp.where(update, seen, state.seen_V))
  del loss
  return new, {**metrics, "grad_norm": optax.global_norm(grads)}


def make_step(model: fuser_lib.ContextualFuser, c: StepConfig, mesh=None, donate: bool = True,
              state_sh=None):
  """The jitted step over ``{"inputs", "valid"}`` batches; on ``mesh`` the batch is split
  along ``data`` and the state placed by ``state_sh`` (`fsqtok.train.sharding.state_shardings`;
  None: replicated)."""
  step = functools.partial(train_step, c=c, spec=model.spec)
  if mesh is None:
    return jax.jit(step, donate_argnums=(0,) if donate else ())
  return sharding_lib.jit_train_step(step, mesh, state_sh, donate)


# ---- vocabulary helpers -----------------------------------------------------------------

def counted_tokenizer(texts: Sequence[str], size: int, max_piece_bytes: int = 16) -> Tokenizer:
  """An fsqtok `Tokenizer` whose learned strings are the most frequent pieces of
  ``texts`` (no codec: for tests, notebooks and machines without a trained codec).
  ``size`` counts every id (specials and 256 bytes included)."""
  from fsqtok.tokenizer.tokenizer import DEFAULT_SPECIALS  # pylint: disable=g-import-not-at-top
  learned = size - len(DEFAULT_SPECIALS) - 256
  if learned < 1:
    raise ValueError(f"vocab size {size} leaves no learned strings (specials and bytes "
                     f"take {len(DEFAULT_SPECIALS) + 256}).")
  counts = collections.Counter(p for t in texts for p in
                               pieces_lib.split_pieces(t, max_piece_bytes)
                               if len(p.encode("utf-8")) >= 2)
  return Tokenizer([p for p, _ in counts.most_common(learned)], max_piece_bytes=max_piece_bytes)


def next_token_pairs(rows: Sequence[np.ndarray], vocab_size: int, pad_id: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """How often each id is followed by each other in ``rows`` (token streams, or windows
  of ``seq_len + 1`` tokens, whose pairs are those of their stream): the pairs as
  ``left * vocab_size + right`` (sorted, int64) and their counts. A pair with
  ``pad_id`` is no pair."""
  uniq, counts = [], []
  for row in rows:
    row = np.asarray(row, np.int64)
    pair = row[..., :-1] * vocab_size + row[..., 1:]
    if pad_id is not None:
      pair = pair[(row[..., :-1] != pad_id) & (row[..., 1:] != pad_id)]
    u, n = np.unique(pair, return_counts=True)
    uniq.append(u)
    counts.append(n)
  return add_pairs(list(zip(uniq, counts)))


def add_pairs(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """Pair counts (`next_token_pairs`) of several parts added up (e.g. of every process)."""
  if not parts:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  pairs = np.concatenate([np.asarray(p, np.int64) for p, _ in parts])
  uniq, where = np.unique(pairs, return_inverse=True)
  counts = np.bincount(where, weights=np.concatenate([n for _, n in parts]),
                       minlength=uniq.size)
  return uniq, counts.astype(np.int64)


def ambiguous_ids(tok, streams: Sequence[np.ndarray] = (), *, corpus_top_k: int,
                  min_count: int, pairs: tuple[np.ndarray, np.ndarray] | None = None,
                  sense_counts: dict[str, int] | None = None, min_senses: int = 3
                  ) -> tuple[int, ...]:
  """The precomputed ambiguous set: ``[MASK]``; tokens that are WordNet lemmas with at
  least ``min_senses`` senses (``sense_counts``); and the ``corpus_top_k`` tokens (seen
  ``min_count`` times) whose neighbours are most varied (entropy of the next-token
  distribution, from the token ``streams`` or their `next_token_pairs` ``pairs``)."""
  out = {tok.token_to_id("[MASK]")}
  first = len(tok.special_tokens)
  if sense_counts:
    for i in range(first + 256, len(tok)):
      word = tok.token_bytes(i).decode("utf-8", "replace").strip().lower()
      if sense_counts.get(word, 0) >= min_senses:
        out.add(i)
  if corpus_top_k:
    uniq, n = next_token_pairs(streams, len(tok)) if pairs is None else pairs
    left = uniq // len(tok)
    totals = np.bincount(left, weights=n, minlength=len(tok))
    p = n / totals[left]
    entropy = np.bincount(left, weights=-p * np.log(p), minlength=len(tok))
    ok = (totals >= min_count) & (np.arange(len(tok)) >= first)
    ranked = np.argsort(-np.where(ok, entropy, -1.0))[:corpus_top_k]
    out.update(int(i) for i in ranked if ok[i])
  return tuple(sorted(i for i in out if i is not None))


def model_from_config(config, tok, ambiguous: Sequence[int] = ()) -> fuser_lib.ContextualFuser:
  spec = fuser_lib.FuserSpec.from_config(config.fuser.model)
  return fuser_lib.ContextualFuser(len(tok), config.fuser.d_model,
                                   tuple(tok.token_bytes(i) for i in range(len(tok))),
                                   spec, tuple(ambiguous))


# ---- the training loop ------------------------------------------------------------------

@workdir_lib.exclusive_workdir
def train_fuser(config, workdir: str, model: fuser_lib.ContextualFuser, tok, data, *,
                loader: str = "epochs") -> tuple[dict[str, Any], Any]:
  """Trains (or resumes, or finds finished) the fuser under ``workdir`` on the training
  windows of ``data`` (`fsqtok.data.lm_data.LMData` or, with ``loader="grain"``, its
  per-process store `StoredLMData`, of ``fuser.data.seq_len`` tokens); returns the report
  and the parameters."""
  f = config.fuser
  t = f.train
  check_config(f)
  workdir_lib.makedirs(workdir)
  mesh = sharding_lib.mesh_from_config(t)
  tx = optimizer_lib.make_optimizer(f.optim, t.num_steps)
  init = lambda: create_state(
      model, fuser_lib.init_params(model, jax.random.PRNGKey(config.seed), f.data.seq_len), tx)
  abstract = jax.eval_shape(init)
  state_sh = sharding_lib.state_shardings(abstract, mesh, t.get("sharding"))
  done = train_loop.finished(workdir, t.num_steps, checkpoint_lib.abstract_like(
      abstract.params, state_sh.params))
  if done is not None:  # nothing to do
    return done
  batcher = data.train_batches(f.data.batch_size, seed=config.seed, loader=loader,
                               field="fuser.data")
  result = train_loop.run(
      "fuser", make_step(model, step_config(f.loss, tok), mesh, state_sh=state_sh), init,
      batcher, train_loop.LoopConfig.from_config(t),
      rng=jax.random.PRNGKey(config.seed + 1), directory=workdir, mesh=mesh,
      state_shardings=state_sh, nan_hint="lower fuser.optim.learning_rate")
  history = workdir_lib.MetricsLog.read(os.path.join(workdir, train_loop.METRICS))
  history = [r for r in history if r["split"] == "train"]
  report = {"steps": t.num_steps, "train_wall_seconds": result.wall_seconds,
            "final": history[-1] if history else {}, "first": history[0] if history else {},
            "ambiguous_set_size": len(model.ambiguous_ids), "vocab_size": len(tok)}
  train_loop.write_report(workdir, report)
  return report, result.state.params


@functools.partial(jax.jit, static_argnums=(0,))
def _measure(model, params, ids_BxT, valid_BxT):
  _, aux = model.apply({"params": params}, ids_BxT, valid_BxT=valid_BxT)
  v = valid_BxT.astype(jnp.float32)
  return (jnp.sum(aux["gate"] * v), jnp.sum(aux["computed"] * v), jnp.sum(v))


def activation_rate(model: fuser_lib.ContextualFuser, params, tok, texts: Sequence[str], *,
                    seq_len: int, batch_size: int, max_batches: int = 0) -> dict[str, float]:
  """The measured share of tokens whose gate is on (and that were computed) on ``texts``."""
  data = lm_data.windows(lm_data.token_stream(tok, texts), seq_len, tok.pad_id, tok.bos_id)
  on = computed = total = 0.0
  for i, batch in enumerate(lm_data.eval_batches(data, batch_size)):
    if max_batches and i >= max_batches:
      break
    a, b, n = jax.device_get(_measure(model, params, jnp.asarray(batch["inputs"]),
                                      jnp.asarray(batch["valid"])))
    on, computed, total = on + float(a), computed + float(b), total + float(n)
  return {"activation_rate": on / max(total, 1.0), "computed_rate": computed / max(total, 1.0),
          "tokens": total}
