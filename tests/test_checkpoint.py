"""Damaged checkpoints: the newest readable step is restored, the damaged ones set aside."""
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from conftest import mlp_codec, tiny_recon_config
from fsqtok.train import recon


pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("checkpoint")]


def _files(step_dir):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs)


def _damage(step_dir, how):
  data_files = [f for f in _files(os.path.join(step_dir, "state"))
                if f"{os.sep}d{os.sep}" in f]
  if how == "truncated":  # a copy that stopped half-way
    biggest = max(data_files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  elif how == "random":  # every file overwritten (the UnicodeDecodeError of issue 16)
    rng = np.random.default_rng(0)
    for path in _files(step_dir):
      size = max(os.path.getsize(path), 16)
      with open(path, "wb") as f:
        f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
  elif how == "missing":  # a file lost
    os.remove(os.path.join(step_dir, "data", "metadata"))
  else:
    raise ValueError(how)


@pytest.fixture(scope="module")
def finished(doc_files, tmp_path_factory):
  """A tiny codec trained 40 steps, checkpoints at 20, 30 and 40."""
  root = tmp_path_factory.mktemp("ckpt")
  config = mlp_codec(tiny_recon_config(f"files:{doc_files}/*.txt", str(root / "tfds")))
  config.train.update(num_steps=40, log_every=10, eval_every=40, checkpoint_every=10,
                      keep_checkpoints=3)
  recon.train_recon(config, str(root / "straight"))
  return config, root


@pytest.mark.parametrize("how", ["truncated", "random", "missing"])
def test_a_damaged_newest_step_falls_back_to_the_one_before(finished, tmp_path, how, caplog):
  config, root = finished
  work = tmp_path / "work"
  shutil.copytree(root / "straight", work)
  ckpts = work / "recon" / "checkpoints"
  os.remove(work / "recon" / "report.json")  # as if it died after saving step 40
  _damage(str(ckpts / "40"), how)
  report = recon.train_recon(config, str(work))  # resumes from 30, trains 30 -> 40
  assert report["steps"] == 40
  assert "Checkpoint step 40" in caplog.text and "cannot be read" in caplog.text
  assert (ckpts / "40.damaged").is_dir()  # kept for inspection, not deleted
  step_a, state_a, data_a = recon.restore_latest(config, str(root / "straight"))
  step_b, state_b, data_b = recon.restore_latest(config, str(work))
  assert step_a == step_b == 40 and data_a == data_b
  chex.assert_trees_all_close(jax.device_get(state_a.params), jax.device_get(state_b.params),
                              rtol=1e-5, atol=1e-6)


def test_a_step_damaged_again_is_set_aside_beside_the_first(finished, tmp_path):
  """The same step damaged twice (two crashes): the second copy goes to ``.damaged.1``,
  the first is kept, and the run resumes both times."""
  config, root = finished
  work = tmp_path / "work"
  shutil.copytree(root / "straight", work)
  ckpts = work / "recon" / "checkpoints"
  for _ in range(2):
    os.remove(work / "recon" / "report.json")
    _damage(str(ckpts / "40"), "missing")
    assert recon.train_recon(config, str(work))["steps"] == 40
  assert {"40", "40.damaged", "40.damaged.1"} <= set(os.listdir(ckpts))


def test_no_readable_step_is_a_clear_error_and_nothing_is_moved(finished, tmp_path):
  config, root = finished
  work = tmp_path / "work"
  shutil.copytree(root / "straight", work)
  ckpts = work / "recon" / "checkpoints"
  for step in ("20", "30", "40"):
    _damage(str(ckpts / step), "missing")
  with pytest.raises(ValueError, match=r"No checkpoint in .*checkpoints can be read \(steps "
                                       r"\[40, 30, 20\].*delete"):
    recon.restore_latest(config, str(work))
  assert sorted(os.listdir(ckpts)) == ["20", "30", "40"]
  with pytest.raises(FileNotFoundError, match="train one first"):
    recon.restore_latest(config, str(tmp_path / "nothing"))
