"""What tests/test_multiprocess.py runs once in one process and once in several, in three
parts that each test launches on its own: three LM steps on fixed batches over every
device of every process and an Orbax round trip of the LM state (`run_steps`, with Grain
batches, pooled counts and a ``files:`` corpus); the fuser phase on a token store each
process reads its own rows of (`run_store`); and the whole curriculum end to end with its
state split FSDP-style and its windows read through Grain (`run_curriculum`)."""
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.training import train_state

from configs import curriculum as curriculum_config_lib
from configs import fuser as fuser_config_lib
from fsqtok.data import corpus
from fsqtok.data import grain_loader
from fsqtok.data import hosts
from fsqtok.data import lm_data
from fsqtok.models import lm as lm_lib
from fsqtok.tokenizer import unigram
from fsqtok.tokenizer.tokenizer import Tokenizer
from fsqtok.train import checkpoint as checkpoint_lib
from fsqtok.train import curriculum
from fsqtok.train import fuser_train
from fsqtok.train import lm_train
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import sharding as sharding_lib

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "You are all resolved rather to die than to famish? Resolved. resolved. First, you "
        "know Caius Marcius is chief enemy to the people. ") * 4
STEPS = 3


def _mlp_codec(config):
  """An MLP codec: compiles in a fraction of the time of the convolutional one (the child
  processes do not import tests/conftest.py, whose `mlp_codec` this is)."""
  config.model.update({"enc_channels": (), "enc_strides": (), "dec_channels": (),
                       "dec_strides": (), "enc_mlp_dim": 32, "dec_mlp_dim": 32})
  return config


def _host(tree) -> dict[str, np.ndarray]:
  """A replicated pytree as flat numpy arrays (each process holds all of it)."""
  flat = traverse_util.flatten_dict(jax.tree.map(lambda a: np.asarray(a.addressable_data(0)),
                                                 tree), sep="/")
  return {k: v for k, v in flat.items()}


def _lm_state():
  model = lm_lib.TransformerLM(vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                               mlp_dim=32, head="dense")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  tx = optimizer_lib.make_optimizer(optimizer_lib.adamw_config(learning_rate=1e-2,
                                                               warmup_steps=1), STEPS, params)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _lm_batch(i: int) -> dict[str, np.ndarray]:
  ids = np.random.default_rng(i).integers(0, 64, (16, 9)).astype(np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
          "weights": np.ones((16, 8), np.float32), "valid": np.ones((16, 8), np.int32)}


def run_steps(out_dir: str, save_as: str, restore_from: str | None = None
              ) -> dict[str, np.ndarray]:
  """Grain batches, pooled piece counts, a ``files:`` corpus and three LM steps on this
  run's mesh; saves the LM state as ``out_dir/SAVE_AS`` and restores
  ``out_dir/RESTORE_FROM`` (another run's). Returns the results by name."""
  mesh = sharding_lib.data_mesh()
  repl, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharded(mesh)
  out = _layout()

  # Grain: each process draws its own rows of a global batch of 8 (ids of 32 rows)
  loader = grain_loader.GrainBatches({"row": np.arange(32)}, 8, seed=0, name="rows")
  for i in range(2):
    out[f"grain/{i}"] = sharding_lib.to_host(loader.place(next(loader), mesh))["row"]
  out.update(_pooled_counts())
  out.update(_files_corpus(out_dir, save_as))

  lm_state = jax.jit(_lm_state, out_shardings=repl)()
  lm_step = jax.jit(lm_train.train_step, in_shardings=(repl, data, repl),
                    out_shardings=(repl, repl))
  for i in range(STEPS):
    lm_state, metrics = lm_step(lm_state, sharding_lib.shard_batch({"lm": _lm_batch(i)}, mesh),
                                jax.random.PRNGKey(i))
    out[f"lm_loss/{i}"] = np.asarray(metrics["loss"].addressable_data(0))
  out.update({f"lm/{k}": v for k, v in _host(lm_state.params).items()})

  abstract = checkpoint_lib.abstract_like(jax.eval_shape(_lm_state), repl)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, save_as), save_every=1,
                                     max_to_keep=1)
  ckpt.save(STEPS, lm_state, {"position": STEPS}, force=True)
  ckpt.close()
  if restore_from:
    restorer = checkpoint_lib.Checkpointer(os.path.join(out_dir, restore_from),
                                           save_every=1, max_to_keep=1)
    step_, restored, position = restorer.restore_latest(abstract)
    restorer.close()
    out["restored/step"] = np.asarray(step_)
    out["restored/position"] = np.asarray(position["position"])
    out.update({f"restored/{k}": v for k, v in _host(restored.params).items()})
  return out


def run_store(out_dir: str, save_as: str) -> dict[str, np.ndarray]:
  """A token store prepared in ``out_dir/store_SAVE_AS`` and the fuser phase trained on
  it (`_token_store`, `_fuser`). Returns the results by name."""
  store, out = _token_store(out_dir, save_as, sharding_lib.data_mesh())
  out.update(_layout())
  out.update(_fuser(out_dir, save_as, store))
  return out


def _layout() -> dict[str, np.ndarray]:
  return {"layout": np.array([jax.process_count(), jax.local_device_count(),
                              jax.device_count()])}


STORE_TEXTS = ([TEXT[k:] for k in range(0, 60, 10)], [TEXT[k:] for k in (5, 15, 25)])
STORE_SHARDS = 3


def _token_store(out_dir: str, save_as: str, mesh):
  """Windows prepared in ``out_dir/store_SAVE_AS``, each process tokenizing its own
  shards; two global batches drawn through Grain (each process its rows) and the held-out
  loss of a fresh LM (each process its own validation shards). Returns the store too."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  tok, model, init = loop_lm()
  data = lm_data.StoredLMData(os.path.join(out_dir, f"store_{save_as}"), tok, STORE_TEXTS,
                              16, num_shards=STORE_SHARDS, progress=False)
  written = np.zeros((2, STORE_SHARDS), bool)
  for split, shard in data.written:
    written[("train", "val").index(split), shard] = True
  out = {"store/written": multihost_utils.process_allgather(written)}
  loader = data.train_batches(8, seed=0)
  for i in range(2):
    out[f"store/rows/{i}"] = sharding_lib.to_host(loader.place(next(loader), mesh))["inputs"]
  params = jax.jit(init, out_shardings=sharding_lib.replicated(mesh))()
  ev = lm_train.evaluate_bits_per_byte(model.apply, params, data.val_batches(8),
                                       data.val_bytes, mesh=mesh, per_process=True)
  out["store/eval"] = np.array([ev["loss_per_token"], ev["tokens"]])
  return data, out


def _fuser(out_dir: str, save_as: str, data) -> dict[str, np.ndarray]:
  """The fuser phase on the token store's windows (``configs/fuser.py:tiny``, 6 steps,
  its state split FSDP-style), each process drawing its own rows through Grain; its
  ambiguous set from the token pairs each process counted in its own shards, pooled."""
  tok, _, _ = loop_lm()
  config = fuser_config_lib.get_config("tiny")
  config.fuser.train.sharding = sharding_lib.sharding_config(fsdp=True, fsdp_min_size=64)
  mine = fuser_train.next_token_pairs(data.local_training_rows(), len(tok), pad_id=tok.pad_id)
  pairs = fuser_train.add_pairs(hosts.all_gather_objects(mine))
  a = config.fuser.ambiguity
  ambiguous = fuser_train.ambiguous_ids(tok, pairs=pairs, corpus_top_k=a.corpus_top_k,
                                        min_count=a.min_count)
  model = fuser_train.model_from_config(config, tok, ambiguous)
  workdir = os.path.join(out_dir, f"fuser_{save_as}")
  report, params = fuser_train.train_fuser(config, workdir, model, tok, data, loader="grain")
  flat = traverse_util.flatten_dict(sharding_lib.to_host(params), sep="/")
  # the windows in memory (every process holds all): each counts its share of the rows
  memory = lm_data.LMData(tok, STORE_TEXTS, 16).local_training_rows()
  in_memory = fuser_train.add_pairs(hosts.all_gather_objects(
      fuser_train.next_token_pairs(memory, len(tok), pad_id=tok.pad_id)))
  return {"fuser/pairs": pairs[0], "fuser/pair_counts": pairs[1],
          "fuser/memory_pairs": in_memory[0], "fuser/memory_pair_counts": in_memory[1],
          "fuser/ambiguous": np.array(ambiguous),
          "fuser/mlm_loss": np.array([report["first"]["mlm_loss"], report["final"]["mlm_loss"]]),
          **{f"fuser/params/{k}": np.asarray(v) for k, v in flat.items()}}


def _files_corpus(out_dir: str, save_as: str) -> dict[str, np.ndarray]:
  """The documents of the ``files:`` corpus ``OUT_DIR/docs/*.txt`` through its TFDS copy,
  which process 0 prepares in ``OUT_DIR/tfds_SAVE_AS`` and the others open after it: how
  many, and a digest of them."""
  docs = corpus.load_documents("files:" + os.path.join(out_dir, "docs", "*.txt"),
                               data_dir=os.path.join(out_dir, f"tfds_{save_as}"))
  digest = hashlib.sha256("\0".join(docs).encode("utf-8")).digest()
  return {"corpus/docs": np.array([len(docs)]),
          "corpus/sha256": np.frombuffer(digest, np.uint8)}


def _pooled_counts() -> dict[str, np.ndarray]:
  """Pieces of the token store's texts, each process counting its share of the blocks,
  the counts pooled (`fsqtok.data.hosts`): the blocks each counted, and the pooled counts."""
  texts = [t for split in STORE_TEXTS for t in split]
  mine = hosts.process_share(texts)
  counts = hosts.sum_counts(unigram.count_pieces(mine))
  keys = sorted(counts)
  return {"counts/blocks": np.array([len(m) for m in hosts.all_gather_objects(mine)]),
          "counts/pieces": np.array(keys), "counts/n": np.array([counts[k] for k in keys])}


def curriculum_config(docs_glob: str):
  """A tiny curriculum on ``files:DOCS_GLOB``: a few steps of each phase, the state split
  along ``data`` (FSDP) over every device of every process, the corpus streamed from disk
  and the LM's windows in a token store of 4 shards that each process reads its own rows
  of."""
  fsdp = sharding_lib.sharding_config(fsdp=True, fsdp_min_size=64)
  # one checkpoint a phase, at its end: with 2 processes on 2 cores a second save made
  # the LM phase 20.3 s instead of 12.6 s (one run each); the steps test covers saving
  c = _mlp_codec(curriculum_config_lib.get_config("tiny"))
  c.data.source = f"files:{docs_glob}"
  c.data.max_candidates = 1000
  c.train.update({"num_steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
                  "progress_bar": False, "sharding": fsdp})
  c.lm.train.update({"num_steps": 4, "log_every": 2, "eval_every": 2, "checkpoint_every": 4,
                     "progress_bar": False, "sharding": fsdp})
  c.lm.data.loader, c.lm.data.shards = "grain", 4
  c.joint.num_steps = 2
  c.sample.max_new_tokens = 4
  return c


def run_curriculum(workdir: str, docs_glob: str) -> dict:
  """The whole curriculum (`curriculum_config`) in ``workdir``: corpus, codec, vocabulary,
  LM, joint, sample; it leaves its reports, metrics, tokenizer and checkpoints there."""
  return curriculum.run_curriculum(curriculum_config(docs_glob), workdir)


def loop_lm():
  """The tokenizer, model and ``init_params`` of `run_loops`'s LM phase."""
  words = sorted({w for w in TEXT.split(" ") if w} | {" " + w for w in TEXT.split(" ") if w})
  tok = Tokenizer(words)
  model = lm_lib.TransformerLM(vocab_size=len(tok), d_model=16, num_layers=1, num_heads=2,
                               mlp_dim=32, head="dense")
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return tok, model, init
