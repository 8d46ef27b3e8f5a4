import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, tiny_recon_config
from fsqtok.train import recon
from fsqtok.train import workdir as workdir_lib

HOLD = ("import sys, time; from fsqtok.train import workdir as w\n"
        "with w.exclusive(sys.argv[1]):\n"
        "  print('held', flush=True); time.sleep(600)\n")


def _holder(workdir):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_writer_is_refused_and_a_killed_writer_does_not_block(tmp_path, caplog):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lib.WorkdirInUse, match=rf"in use by process {proc.pid} on "):
      with workdir_lib.exclusive(str(tmp_path)):
        pass
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # The killed holder left its lock behind; the next run takes it over.
  assert os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
  with workdir_lib.exclusive(str(tmp_path)):
    held = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())
    assert held["pid"] == os.getpid()
    with workdir_lib.exclusive(str(tmp_path)):  # re-entrant in one process
      pass
    assert (tmp_path / workdir_lib.LOCK_FILE).exists()
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()
  assert f"the process {proc.pid} that held it is gone" in caplog.text


def test_training_on_a_work_directory_in_use_stops_before_any_work(doc_files, tmp_path):
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  proc = _holder(tmp_path / "work")
  try:
    with pytest.raises(workdir_lib.WorkdirInUse, match="Wait for that run to finish"):
      recon.train_recon(config, str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work") == [workdir_lib.LOCK_FILE]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_work_files_on_an_object_store(object_store, caplog):
  """Reports, metrics, figures and damaged files in a ``s3://`` work directory (an
  in-memory store): written whole, read back, set aside, no lock needed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  run = f"{object_store}/run"
  workdir_lib.check_writable(run, "--workdir")
  with workdir_lib.exclusive(run):  # no lock on an object store, and it says so
    workdir_lib.write_json(f"{run}/report.json", {"steps": 3})
  assert "no one-writer lock" in caplog.text
  assert workdir_lib.read_saved_json(f"{run}/report.json") == {"steps": 3}
  assert workdir_lib.read_saved_json(f"{run}/missing.json") is None
  epath.Path(f"{run}/cut.json").write_text('{"ste')
  assert workdir_lib.read_saved_json(f"{run}/cut.json") is None
  assert epath.Path(f"{run}/cut.json.damaged").read_text() == '{"ste'
  log = workdir_lib.MetricsLog(f"{run}/metrics.jsonl", resume_step=0)
  log.write([{"step": 1, "split": "train"}])
  log.write([{"step": 2, "split": "train"}, {"step": 3, "split": "train"}])
  resumed = workdir_lib.MetricsLog(f"{run}/metrics.jsonl", resume_step=2)
  assert [r["step"] for r in resumed.read(resumed.path)] == [1, 2]
  fig = plt.figure()
  workdir_lib.save_figure(fig, f"{run}/curves.png")
  assert epath.Path(f"{run}/curves.png").read_bytes()[:4] == b"\x89PNG"
  assert not any(workdir_lib.is_local(p) for p in (run, f"{run}/x"))
  assert workdir_lib.is_local("/tmp/run") and workdir_lib.is_local("runs/a")
