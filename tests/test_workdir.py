import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, tiny_recon_config
from fsqtok import recon
from fsqtok import workdir as workdir_lib

HOLD = ("import sys, time; from fsqtok import workdir as w\n"
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
