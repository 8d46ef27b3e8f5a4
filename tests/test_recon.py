"""The recon phase end to end: data-parallel equivalence, checkpoints, resume, reports."""
import json
import os

import chex
import jax
import pytest

from conftest import tiny_recon_config
from fsqtok.codec import model as codec_lib
from fsqtok.data.batches import PieceBatcher
from fsqtok.tokenizer import candidates as candidates_lib
from fsqtok.train import recon
from fsqtok.train import sharding as sharding_lib


@pytest.fixture
def config(doc_files, tmp_path):
  return tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))


def _run_steps(config, mesh, batches, num_steps):
  model = codec_lib.codec_from_config(config.model)
  state = jax.device_put(recon.create_state(config, model, jax.random.PRNGKey(0)),
                         sharding_lib.replicated(mesh))
  step = recon.compile_train_step(mesh, donate=False)
  metrics = []
  for i in range(num_steps):
    state, m = step(state, sharding_lib.shard_batch(batches[i], mesh),
                    jax.random.fold_in(jax.random.PRNGKey(1), i))
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


def test_eight_devices_match_one(config):
  assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
  train_pieces, _ = candidates_lib.load_pieces(config)
  batcher = PieceBatcher(train_pieces, 64, seed=0)
  batches = [next(batcher) for _ in range(4)]
  params1, metrics1 = _run_steps(config, sharding_lib.data_mesh(1), batches, 4)
  params8, metrics8 = _run_steps(config, sharding_lib.data_mesh(8), batches, 4)
  chex.assert_trees_all_close(params1, params8, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(metrics1, metrics8, rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    sharding_lib.check_batch_size(12, sharding_lib.data_mesh(8))


def test_train_writes_checkpoints_metrics_and_report_and_loss_falls(config, tmp_path):
  workdir = str(tmp_path / "run")
  config.train.num_steps = 60
  report = recon.train_recon(config, workdir)
  phase = os.path.join(workdir, "recon")
  steps = sorted(int(s) for s in os.listdir(os.path.join(phase, "checkpoints")) if s.isdigit())
  assert steps == [40, 50, 60]  # periodic, the last three kept
  records = [json.loads(l) for l in open(os.path.join(phase, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
  assert train[-1]["loss"] < 0.8 * train[0]["loss"]
  assert [r["step"] for r in records if r["split"] == "validation"] == [20, 40, 60]
  val = report["validation"]
  for key in ("byte_accuracy", "exact_match", "exact_match_distinct", "code_utilization",
              "collision_rate"):
    assert 0.0 <= val[key] <= 1.0, key
  assert val["perplexity"] >= 1.0 and report["train_pieces_per_second"] > 0
  assert json.load(open(os.path.join(phase, "report.json"))) == report
  assert "byte acc" in open(os.path.join(phase, "report.md")).read()
  with open(os.path.join(phase, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # A finished run does nothing when started again.
  mtime = os.path.getmtime(os.path.join(phase, "metrics.jsonl"))
  assert recon.train_recon(config, workdir) == report
  assert os.path.getmtime(os.path.join(phase, "metrics.jsonl")) == mtime


def test_nan_loss_stops_with_a_clear_error(config, tmp_path):
  config.optim.learning_rate = float("nan")
  config.train.num_steps = 10
  with pytest.raises(FloatingPointError, match="learning_rate"):
    recon.train_recon(config, str(tmp_path / "nan"))


def test_config_validation(config, tmp_path):
  config.train.num_steps = 0
  with pytest.raises(ValueError, match="num_steps"):
    recon.train_recon(config, str(tmp_path / "bad"))
