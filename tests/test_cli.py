import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHAKESPEARE_SNIPPET
from fsqtok import cli
from fsqtok.tokenizer.tokenizer import Tokenizer


pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli")]


@pytest.fixture(scope="module")
def trained(doc_files, tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "tok"
  old = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = str(out.parent / "tfds")  # keep TFDS out of ~
  try:
    cli.main(["train-tokenizer", "--corpus", f"files:{doc_files}/*.txt", "--vocab-size",
              "400", "--out", str(out), "--config",
              os.path.join(REPO, "configs", "recon.py") + ":tiny", "--steps", "60",
              "--decoder-steps", "20", "--sample-mb", "0.15", "--runs", "gpt2",
              "--unused", "keep"])
  finally:
    if old is None:
      os.environ.pop("TFDS_DATA_DIR")
    else:
      os.environ["TFDS_DATA_DIR"] = old
  return out


def _run(args, stdin: bytes) -> bytes:
  proc = subprocess.run([sys.executable, "-m", "fsqtok.cli", *args], input=stdin,
                        capture_output=True, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  return proc.stdout


def test_the_vocabulary_was_trained_on_the_sample_asked_for(trained):
  import json  # pylint: disable=g-import-not-at-top
  counting = json.loads((trained / "vocab_report.json").read_text())["counting"]
  assert counting["train_chars"] > 0.2e6
  assert 0.1e6 < counting["sampled_chars"] < 0.2e6
  assert counting["distinct_runs"] > 1000 and counting["pruned_runs"] == 0
  report = json.loads((trained / "vocab_report.json").read_text())
  assert report["decoder_steps"] == 20  # --decoder-steps: the decoder learned the codes
  assert 0.0 <= report["assigned_codes_exact"] <= 1.0
  assert report["assigned_codes_not_exact"] == round(
      (1 - report["assigned_codes_exact"]) * report["learned_tokens"])
  assert 1 <= len(report["decoder_rounds"]) <= 4  # the tiny config's rounds, if any missed
  tok = Tokenizer.load(str(trained))  # --runs: saved with the tokenizer, and used
  assert tok.runs == "gpt2" and tok.split("end.\n\nNext") == ["end", ".", "\n", "\n", "Next"]
  from fsqtok.tokenizer import build  # pylint: disable=g-import-not-at-top
  vocabulary = json.loads((trained.parent / "tok.work" / build.VOCABULARY_FILE).read_text())
  assert vocabulary["settings"]["unused"] == "keep"  # --unused


def test_encode_decode_streams_restore_the_input(trained, tmp_path):
  text = (SHAKESPEARE_SNIPPET + "naïve 🙂\r\n\x00 tabs\there\n\n" + "no newline at the end")
  ids = _run(["encode", "--tokenizer", str(trained), "--quiet"], text.encode())
  lines = ids.decode().splitlines()
  assert len(lines) == text.encode().count(b"\n") + 1
  assert _run(["decode", "--tokenizer", str(trained)], ids) == text.encode()
  path = tmp_path / "in.txt"
  path.write_bytes(text.encode())
  assert _run(["encode", "--tokenizer", str(trained), str(path)], b"") == ids


def test_encode_rejects_non_utf8_input(trained):
  proc = subprocess.run([sys.executable, "-m", "fsqtok.cli", "encode", "--tokenizer",
                         str(trained)], input=b"ok\n\xff\xfe bad\n", capture_output=True,
                        cwd=REPO, check=False)
  assert proc.returncode != 0 and b"line 2 is not UTF-8" in proc.stderr


def test_decode_of_an_unknown_id_is_one_line(trained, tmp_path, monkeypatch):
  ids = tmp_path / "ids.txt"
  ids.write_text("300 301\n5 400\n")  # the tokenizer has ids 0..399
  monkeypatch.setattr(sys, "stdout", open(os.devnull, "w"))  # pylint: disable=consider-using-with
  with pytest.raises(SystemExit, match=r"line 2: Token id 400 is outside the vocabulary "
                                       r"\[0, 400\)\. Decode with the tokenizer"):
    cli.main(["decode", "--tokenizer", str(trained), str(ids)])


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(trained, tmp_path,
                                                                 monkeypatch):
  real_fdopen = os.fdopen

  def full_disk(fd, mode="r", *args, **kwargs):
    f = real_fdopen(fd, mode, *args, **kwargs)
    if "w" in mode:
      f.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    return f

  monkeypatch.setattr(os, "fdopen", full_disk)
  with pytest.raises(SystemExit, match=r"^fsqtok inspect: \[Errno 28\] No space left"):
    cli.main(["inspect", str(trained), "--out", str(tmp_path / "report")])
  monkeypatch.undo()
  assert not [p for p in (tmp_path / "report").iterdir() if "inspect.txt" in p.name]


def test_inspect_writes_report_and_plot(trained, capsys):
  cli.main(["inspect", str(trained)])
  report = (trained / "inspect.txt").read_text()
  tok = Tokenizer.load(str(trained))
  assert f"vocabulary: {len(tok)} ids" in report and "unigram vocabulary:" in report
  assert tok.model == "unigram" and len(tok) == 400
  assert (trained / "inspect.png").read_bytes()[:4] == b"\x89PNG"
  assert "Wrote" in capsys.readouterr().out


def test_inspect_plot_counts_every_learned_token_length(tmp_path, monkeypatch):
  import matplotlib.axes  # pylint: disable=g-import-not-at-top
  drawn = []
  real_hist = matplotlib.axes.Axes.hist
  monkeypatch.setattr(matplotlib.axes.Axes, "hist", lambda self, x, bins=None, **kw: (
      drawn.append(np.histogram(x, bins=bins)[0].sum()), real_hist(self, x, bins=bins, **kw))[1])
  tok = Tokenizer(["a", "bc", "x" * 30, "y" * 17])
  cli.inspect_plot(tok, None, str(tmp_path / "p.png"))
  assert drawn == [len(tok.learned_ids)]  # the 30- and 17-byte tokens are in the histogram


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="not an fsqtok tokenizer"):
    cli.main(["inspect", str(tmp_path)])


def test_cli_mistakes_are_one_line_before_any_work(trained, tmp_path):
  """A damaged tokenizer, a config file that does not exist, an --out that cannot be
  written: one line each, and train-tokenizer stops before training anything."""
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "tokenizer.json").write_bytes((trained / "tokenizer.json").read_bytes()[:100])
  with pytest.raises(SystemExit, match=r"^fsqtok encode: .*tokenizer.json is damaged"):
    cli.main(["encode", "--tokenizer", str(damaged)])
  with pytest.raises(SystemExit, match=r"^fsqtok: config file .*nowhere.py not found"):
    cli.main(["train-tokenizer", "--out", str(tmp_path / "tok"), "--config",
              str(tmp_path / "nowhere.py")])
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  with pytest.raises(SystemExit, match=r"^fsqtok train-tokenizer: .*--out: .*a-file/sub "
                                       r"cannot be written .*choose a writable location"):
    cli.main(["train-tokenizer", "--out", str(blocker / "sub" / "tok"), "--workdir",
              str(tmp_path / "work")])
  assert not (tmp_path / "work").exists()  # nothing started


@pytest.mark.parametrize("override, message", [
    ("--config.lm.model.head=tide", "train.py: lm.model.head='tide' is unknown"),
    ("--config.lm.model.head_codes=ranks",
     "train.py: lm.model.head_codes must be 'codec' or 'frequency', got 'ranks'")])
def test_train_py_states_a_bad_config_in_one_line(tmp_path, override, message):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "train.py"),
       "--config=" + os.path.join(REPO, "configs", "curriculum.py") + ":tiny",
       f"--workdir={tmp_path / 'work'}", override],
      capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "work" / "recon").exists()  # stopped before any phase


@pytest.mark.parametrize("share,text", [(1 - 1 / 32499, "99.996%"), (0.29, "29.000%"),
                                        (0.99999, "99.999%"), (1.0, "100.000%"), (0.0, "0.000%")])
def test_the_share_of_strings_decoded_is_never_rounded_up(share, text):
  assert cli._floor_percent(share) == text  # pylint: disable=protected-access
