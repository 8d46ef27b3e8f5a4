"""Test setup: 8 simulated CPU devices (for data-parallel tests), quiet logs, fixed seeds."""
import os
import sys
import tempfile

# Must happen before JAX is imported anywhere. The tests check properties, never speed:
# XLA's backend optimizations are off (compiling, most of the suite's time, takes ~40%
# less; measured on tests/test_lm.py + test_open_generation.py, 89 s -> 55 s).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS +
                           " --xla_force_host_platform_device_count=8").strip()


def xla_flags(devices: int = 0, optimized: bool = False) -> str:
  """XLA_FLAGS for a process the tests start: the tests' flags, ``devices`` simulated CPU
  devices (0: one, as a user would have); ``optimized``: with XLA's backend optimizations
  (for a process that spends longer running steps than compiling them)."""
  flags = [f for f in os.environ["XLA_FLAGS"].split()
           if "device_count" not in f and not (optimized and f in TEST_XLA_FLAGS.split())]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are kept on disk and shared by the test workers, the subprocesses and
# the notebook kernels (they inherit these variables): the tests build the same tiny
# models many times, and compiling them is most of the suite's time. Every program is
# kept, however quickly it compiled: the small ones (each eager jnp operation is one) are
# compiled again by every worker and subprocess otherwise. On tests/test_lm.py +
# test_open_generation.py, cold cache, -n 2, four runs taking turns: 39.7-52.1 s keeping
# those over 1 s, 31.7-40.2 s keeping all.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"fsqtok-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hypothesis  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """Slow tests first (a stable sort: module order kept within each kind): under xdist
  the long ones start at once and the short ones fill the end, so no worker idles while
  the other finishes a long test."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
  """``--dist loadgroup`` keeps each ``xdist_group``'s tests on one worker, so the fixtures
  they share are built once; with pytest 9.2 and pytest-xdist <= 3.8 it silently stops
  grouping (pytest-dev/pytest-xdist#1386), which setup.cfg's pin avoids."""
  if config.getoption("dist", "no") != "loadgroup" or pytest.version_tuple[:2] < (9, 2):
    return
  import xdist  # pylint: disable=g-import-not-at-top
  if tuple(int(x) for x in xdist.__version__.split(".")[:2]) <= (3, 8):
    raise pytest.UsageError(
        f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} does not group "
        f"tests under --dist loadgroup (pytest-dev/pytest-xdist#1386): install the "
        f"project's pinned pytest, pip install -e '.[test]'.")


hypothesis.settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE_SNIPPET = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.
"""


@pytest.fixture
def text_files(tmp_path):
  """A few small text files (a corpus made here, no network)."""
  d = tmp_path / "texts"
  d.mkdir()
  for i in range(6):
    (d / f"part{i}.txt").write_text(SHAKESPEARE_SNIPPET * (3 + i) + f"\nEnd of part {i}.\n")
  return d


@pytest.fixture(scope="session")
def doc_files(tmp_path_factory):
  """200 documents of the built-in corpus written as files: real, varied English text."""
  from fsqtok.data import corpus  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("docs")
  for i, doc in enumerate(corpus.load_documents("builtin")[:200]):
    (d / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
  return d


def tiny_recon_config(source: str, data_dir: str):
  from configs import recon as recon_config  # pylint: disable=g-import-not-at-top
  c = recon_config.get_config("tiny")
  c.data.source = source
  c.data.tfds_data_dir = data_dir
  c.data.val_fraction = 0.2
  c.data.block_chars = 512
  c.train.progress_bar = False
  return c


def mlp_codec(config):
  """``config`` with an MLP codec (no convolutions): the same interfaces, compiled in a
  fraction of the time, for tests of what surrounds the codec."""
  config.model.update({"enc_channels": (), "enc_strides": (), "dec_channels": (),
                       "dec_strides": (), "enc_mlp_dim": 32, "dec_mlp_dim": 32})
  return config


@pytest.fixture
def object_store():
  """An in-memory object store behind ``s3://`` URIs (fsspec's memory filesystem, which
  `etils.epath` reaches through its fsspec backend): remote work directories, tested
  without a network. Yields a fresh bucket URI."""
  import uuid  # pylint: disable=g-import-not-at-top
  import fsspec  # pylint: disable=g-import-not-at-top
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=g-import-not-at-top
  fsspec.register_implementation("s3", MemoryFileSystem, clobber=True)
  bucket = f"s3://fsqtok-test-{uuid.uuid4().hex[:8]}"
  yield bucket
  MemoryFileSystem.store.clear()
  MemoryFileSystem.pseudo_dirs[:] = [""]
