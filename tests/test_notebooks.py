"""Every notebook in colab/ runs top to bottom on a CPU."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, xla_flags

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
# Notebooks that spend longer running steps than compiling them run with XLA's backend
# optimizations, which the other tests turn off (conftest.py): 02's tokenizer build took
# 49.2 s with them and 68.7 s without (alone, cold compilation cache); the others took
# as long or longer with them (03: 40.3 against 34.2 s).
OPTIMIZED = {"02_tokenizer.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  # the notebook runs as a user would: one CPU device
  monkeypatch.setenv("XLA_FLAGS", xla_flags(optimized=os.path.basename(path) in OPTIMIZED))
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # its work directory goes there, not /tmp
  monkeypatch.setenv("FSQTOK_NOTEBOOK_STEPS", "200")  # fewer codec steps where it asks
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  assert list(tmp_path.iterdir()), "the notebook wrote nothing to its temporary directory"


def test_there_is_a_notebook():
  assert NOTEBOOKS
