"""Fault injection for the tests: runs the curriculum and SIGKILLs itself at a chosen write.

  python tests/kill_at.py CONFIG.pickle WORKDIR PART ORDINAL MODE

A *write* is a call of `Checkpointer.save`, `MetricsLog.write`, `workdir.atomic_write_bytes`
(every report, cache and parameter file) or `Tokenizer.save`, labelled with the part of
the work directory it writes (`part_of`: ``recon``, ``vocab``, ``lm``, ``joint``, or the
name of a file at its top). The process kills itself at the ORDINAL-th write (from 0) of
PART: MODE ``before`` the call, ``after`` it (Orbax may still be writing the checkpoint in
the background), or ``during`` it (half a metrics line appended; a temporary file written
but not yet renamed; otherwise as ``after``). `recording` labels the writes of a run in
this process, to choose the moments from.
"""
import contextlib
import os
import pickle
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsqtok.tokenizer.tokenizer import Tokenizer  # noqa: E402
from fsqtok.train import checkpoint as checkpoint_lib  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

MODES = ("before", "after", "during")


def part_of(workdir: str, path: str) -> str:
  rel = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
  return rel.split(os.sep)[0]


def _path_of(name: str, args) -> str:
  """The path a write goes to, from the arguments of the patched call."""
  obj = args[0]
  return {"save": lambda: obj.directory, "write": lambda: obj.path,
          "atomic_write_bytes": lambda: obj, "tokenizer_save": lambda: args[1]}[name]()


@contextlib.contextmanager
def intercepted(on_write):
  """Calls ``on_write(name, path, call)`` instead of each write; ``call()`` performs it."""
  targets = [(checkpoint_lib.Checkpointer, "save", "save"),
             (workdir_lib.MetricsLog, "write", "write"),
             (workdir_lib, "atomic_write_bytes", "atomic_write_bytes"),
             (Tokenizer, "save", "tokenizer_save")]
  originals = [getattr(owner, attr) for owner, attr, _ in targets]

  def wrap(original, name):
    def wrapped(*args, **kwargs):
      return on_write(name, _path_of(name, args), args,
                      lambda: original(*args, **kwargs))
    return wrapped

  for (owner, attr, name), original in zip(targets, originals):
    setattr(owner, attr, wrap(original, name))
  try:
    yield
  finally:
    for (owner, attr, _), original in zip(targets, originals):
      setattr(owner, attr, original)


@contextlib.contextmanager
def recording(workdir: str, parts: list):
  """Appends the part of each write of the block to ``parts``."""
  def on_write(name, path, args, call):
    del name, args
    parts.append(part_of(workdir, path))
    return call()
  with intercepted(on_write):
    yield


def _die() -> None:
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _half_done(name: str, path: str, args) -> None:
  """The first half of a write, as a kill in its middle leaves it."""
  if name == "write":  # half of the first record's line
    records = list(args[1])
    if records:
      import json  # pylint: disable=g-import-not-at-top
      line = json.dumps(records[0], sort_keys=True)
      with open(path, "a", encoding="utf-8") as f:
        f.write(line[:len(line) // 2])
  elif name == "atomic_write_bytes":  # the temporary file, not yet renamed
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, _ = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.write(fd, args[1][:len(args[1]) // 2])
    os.close(fd)


def main(config_path: str, workdir: str, part: str, ordinal: str, mode: str) -> None:
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  with open(config_path, "rb") as f:
    config = pickle.load(f)
  seen = {"n": 0}

  def on_write(name, path, args, call):
    if part_of(workdir, path) != part:
      return call()
    seen["n"] += 1
    if seen["n"] - 1 != int(ordinal):
      return call()
    if mode == "before":
      _die()
    if mode == "during" and name in ("write", "atomic_write_bytes"):
      _half_done(name, path, args)
      _die()
    result = call()
    _die()
    return result

  with intercepted(on_write):
    curriculum.run_curriculum(config, workdir)
  sys.exit(f"kill_at.py: the run ended before write {ordinal} of {part!r}")


if __name__ == "__main__":
  main(*sys.argv[1:])
