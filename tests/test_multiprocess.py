"""Several JAX processes on this machine, three tests that each launch their own: 2
processes x 4 CPU devices (collectives over gloo) give the LM steps of 1 process x 8
devices, Orbax checkpoints move between the two layouts, each process draws its own rows
of one process's global batches through Grain; the token store's shards are each
tokenized by one process and evaluated there, and the fuser phase, reading its rows that
way and pooling its token-pair counts, trains as in one process; and the whole
curriculum (a files: corpus prepared once, its pieces counted a share per process,
codec, vocabulary, LM and joint on a token store, sample; FSDP state; only process 0
writing) gives one process's work directory."""
import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multiprocess_steps
from conftest import xla_flags
from fsqtok.data import corpus
from fsqtok.data import grain_loader
from fsqtok.data import token_store
from fsqtok.train import curriculum
from fsqtok.train import lm_train

pytestmark = pytest.mark.slow

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_child.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(part: str, out_dir, meanwhile=None, num_processes: int = 2,
            devices_each: int = 4, timeout: float = 600):
  """Runs PART of tests/multiprocess_child.py in ``num_processes`` processes of
  ``devices_each`` CPU devices, and ``meanwhile()`` here while they run (their
  compiling leaves the cores idle at times); fails with a process's output if one
  fails. Returns what ``meanwhile`` returned."""
  # each part takes ~5-50 s alone on 2 cores; the bound is only there to end a hang
  env = dict(os.environ)
  env.update(XLA_FLAGS=xla_flags(devices_each),
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  port = _free_port()
  logs = [os.path.join(out_dir, f"{part}_{i}.log") for i in range(num_processes)]
  procs = []
  try:
    for i, log in enumerate(logs):  # to a file, not a pipe: nobody reads it meanwhile
      with open(log, "w", encoding="utf-8") as f:
        procs.append(subprocess.Popen(
            [sys.executable, CHILD, part, str(i), str(num_processes), str(port),
             str(out_dir)], env=env, stdout=f, stderr=subprocess.STDOUT))
    done = meanwhile() if meanwhile else None
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:  # never leave a process behind, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log) in enumerate(zip(procs, logs)):
    with open(log, encoding="utf-8", errors="replace") as f:
      assert p.returncode == 0, f"process {i}:\n{f.read()[-3000:]}"
  return done


def _docs(tmp_path) -> str:
  """The ``files:`` corpus of these tests, 40 documents of the built-in one; its glob."""
  docs = tmp_path / "docs"
  docs.mkdir()
  for i, doc in enumerate(corpus.load_documents("builtin")[:40]):
    (docs / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
  return str(docs / "*.txt")


def test_lm_steps_and_checkpoints_of_two_processes_equal_one(tmp_path):
  """LM steps, Orbax round trips both ways, Grain rows, pooled counts, a files: corpus."""
  _docs(tmp_path)
  single = multiprocess_steps.run_steps(str(tmp_path), "single")  # this process: 8 devices
  _launch("steps", tmp_path)
  multi = dict(np.load(tmp_path / "steps.npz"))
  assert single["layout"].tolist() == [1, 8, 8] and multi["layout"].tolist() == [2, 4, 8]
  trained = {k: v for k, v in single.items() if k.split("/")[0] in ("lm", "lm_loss")}
  assert sum(k.startswith("lm/") for k in trained) > 4 and len(trained) > 8
  for key, value in trained.items():  # the same steps
    chex.assert_trees_all_close(multi[key], value, rtol=2e-4, atol=2e-5)
  # Grain: each of the 2 processes drew its own half of every global batch, which is
  # one process's.
  for i in range(2):
    shards = [_grain_batches(index, 2)[i] for index in range(2)]
    np.testing.assert_array_equal(multi[f"grain/{i}"], np.concatenate(shards))
    np.testing.assert_array_equal(single[f"grain/{i}"], _grain_batches(0, 1)[i])
    np.testing.assert_array_equal(multi[f"grain/{i}"], single[f"grain/{i}"])
  # A files: corpus: process 0 prepared its TFDS copy, the other opened it: the same
  # documents as one process's.
  assert single["corpus/docs"].tolist() == [40] and (tmp_path / "tfds_multi").is_dir()
  np.testing.assert_array_equal(multi["corpus/sha256"], single["corpus/sha256"])
  # Counting a corpus: each process counted its own blocks (5 and 4 of 9), and the pooled
  # counts are one process's.
  assert single["counts/blocks"].tolist() == [9] and multi["counts/blocks"].tolist() == [5, 4]
  np.testing.assert_array_equal(multi["counts/pieces"], single["counts/pieces"])
  np.testing.assert_array_equal(multi["counts/n"], single["counts/n"])
  # The 2 processes restored the checkpoint written here, and this process theirs.
  assert multi["restored/step"] == multiprocess_steps.STEPS
  assert multi["restored/position"] == multiprocess_steps.STEPS
  for key in (k for k in trained if k.startswith("lm/")):
    np.testing.assert_array_equal(multi["restored/" + key[3:]], single[key])
  again = multiprocess_steps.run_steps(str(tmp_path), "again", restore_from="multi")
  for key in (k for k in trained if k.startswith("lm/")):
    np.testing.assert_array_equal(again["restored/" + key[3:]], multi[key])


def test_the_token_store_and_fuser_phase_of_two_processes_equal_one(tmp_path):
  """Each process tokenizes its own shards and draws its own rows; the fuser phase
  pools the token pairs each counted and trains as in one process."""
  single = _launch("store", tmp_path,
                   lambda: multiprocess_steps.run_store(str(tmp_path), "single"))
  multi = dict(np.load(tmp_path / "store.npz"))
  assert single["layout"].tolist() == [1, 8, 8] and multi["layout"].tolist() == [2, 4, 8]
  # The token store: the same shards whoever prepares them, each process tokenizing its
  # own (0 and 2, or 1) and drawing its own rows; the held-out loss of all windows.
  assert single["store/written"].tolist() == [[[True] * 3] * 2]
  assert multi["store/written"].tolist() == [[[True, False, True]] * 2,
                                             [[False, True, False]] * 2]
  names = sorted(os.listdir(tmp_path / "store_single"))
  assert names == sorted(os.listdir(tmp_path / "store_multi")) and len(names) == 12
  for name in names:
    assert ((tmp_path / "store_single" / name).read_bytes()
            == (tmp_path / "store_multi" / name).read_bytes()), name
  tok, _, _ = multiprocess_steps.loop_lm()
  split = token_store.open_split(str(tmp_path / "store_single"), "train", 3,
                                 pad_id=tok.pad_id, bos_id=tok.bos_id)
  for i in range(2):
    shards = [_store_batches(split, index, 2)[i] for index in range(2)]
    np.testing.assert_array_equal(multi[f"store/rows/{i}"], np.concatenate(shards))
    np.testing.assert_array_equal(multi[f"store/rows/{i}"], single[f"store/rows/{i}"])
  assert multi["store/eval"][1] == single["store/eval"][1] > 0  # every held-out token
  np.testing.assert_allclose(multi["store/eval"][0], single["store/eval"][0], rtol=1e-5)
  # The fuser phase on the store: the token pairs each process counted in its shards
  # add up to one process's, so the ambiguous set is the same; so are its steps.
  for key in ("fuser/pairs", "fuser/pair_counts", "fuser/ambiguous", "fuser/memory_pairs",
              "fuser/memory_pair_counts"):
    np.testing.assert_array_equal(multi[key], single[key])
  assert len(single["fuser/ambiguous"]) > 1
  assert single["fuser/mlm_loss"][1] < single["fuser/mlm_loss"][0]
  # (not the attention key biases: their gradient is zero but for rounding, which Adam
  # scales up to steps of its own)
  fuser = [k for k in single if k.startswith("fuser/params/")
           and not k.endswith("key/bias")] + ["fuser/mlm_loss"]
  assert len(fuser) > 10
  for key in fuser:
    chex.assert_trees_all_close(multi[key], single[key], rtol=2e-4, atol=2e-5)


def test_the_curriculum_of_two_processes_equals_one(tmp_path):
  """The whole curriculum, end to end (corpus, codec, vocabulary, LM, joint, sample): the
  same files, histories, reports and sample as in one process, each record written once
  (only process 0 writes), the same tokenizer and final parameters."""
  docs_glob = _docs(tmp_path)
  _launch("curriculum", tmp_path, lambda: multiprocess_steps.run_curriculum(
      str(tmp_path / "curriculum_single"), docs_glob))
  one, two = tmp_path / "curriculum_single", tmp_path / "curriculum_multi"
  assert _files(two) == _files(one)
  assert (two / "vocab" / "tokenizer.json").read_bytes() == (
      one / "vocab" / "tokenizer.json").read_bytes()
  for phase in ("recon", "lm", "joint"):
    history = [_numbers(r) for r in _records(two / phase / "metrics.jsonl")]
    assert len(history) == len(_records(one / phase / "metrics.jsonl")) >= 2
    chex.assert_trees_all_close(history, [_numbers(r) for r in _records(one / phase / "metrics.jsonl")],
                                rtol=2e-4, atol=1e-5)
  reports = [json.loads((d / "curriculum_report.json").read_text()) for d in (one, two)]
  assert reports[1]["sample"] == reports[0]["sample"]
  chex.assert_trees_all_close(_numbers(reports[1]), _numbers(reports[0]), rtol=2e-4, atol=1e-5)
  config = multiprocess_steps.curriculum_config(docs_glob)
  _, model, _ = curriculum.load_lm(config, str(one))
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  chex.assert_trees_all_close(lm_train.load_phase_params(str(two / "joint"), init),
                              lm_train.load_phase_params(str(one / "joint"), init),
                              rtol=2e-4, atol=2e-5)


def _files(root):
  """The files of a work directory, checkpoints aside (Orbax names its own)."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and "checkpoints" not in p.parts)


def _grain_batches(index, count):
  loader = grain_loader.GrainBatches({"row": np.arange(32)}, 8, seed=0, name="rows",
                                     shard_index=index, shard_count=count)
  return [next(loader)["row"] for _ in range(2)]


def _store_batches(split, index, count):
  loader = grain_loader.GrainBatches(split.source(), 8, seed=0, name="LM windows",
                                     operations=[split.record_row()],
                                     batch_operations=[split.rows_to_windows()],
                                     shard_index=index, shard_count=count)
  return [next(loader)["inputs"] for _ in range(2)]


def _records(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _numbers(record, skip=("seconds", "per_second", "sha256", "mfu", "devices", "samples")):
  """The numbers of a record or report, flattened, without timings and digests."""
  flat = {}
  for key, value in record.items():
    if any(s in key for s in skip):
      continue
    if isinstance(value, dict):
      flat.update({f"{key}/{k}": v for k, v in _numbers(value, skip).items()})
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      flat[key] = float(value)
  return flat
