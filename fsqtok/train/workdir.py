"""Files a run leaves in its work directory, always written atomically; one writer at a
time per work directory (`exclusive`).

With several JAX processes (a pod), every process runs the same loop and computes the
same numbers, and only process 0 writes files (`is_writer`): reports, metrics, plots
and the lock. Orbax coordinates its own checkpoint writes.

Paths go through `etils.epath`, so a work directory can be ``gs://bucket/run`` (or any
scheme epath has a backend for) as well as a local one. Local files are written to a
temporary name and renamed; an object store writes an object whole when it is closed,
so there the object is written in place (same guarantee: never half-written). The
metrics log is appended to locally and rewritten whole on an object store (it has no
append). The one-writer lock needs a local filesystem: on an object store there is none,
and the log says so.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import socket
import sys
import tempfile
from typing import Any, Iterable

from etils import epath

LOCK_FILE = ".fsqtok.lock"


def is_local(path) -> bool:
  """Whether ``path`` is on this machine's filesystem (not ``gs://...`` and the like)."""
  return "://" not in os.fspath(path)


def makedirs(path) -> None:
  """``mkdir -p`` (an object store has no directories: nothing to do there)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(path).exists()


def is_writer() -> bool:
  """Whether this process writes the run's files: process 0 of a multi-process JAX run,
  or any process where JAX is not in use (a tokenizer alone never imports it)."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


class WorkdirInUse(RuntimeError):
  """Another live process is writing to the work directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


@contextlib.contextmanager
def exclusive(workdir: str):
  """Holds ``workdir/.fsqtok.lock`` (this process's id and host) while the block runs.

  A second process is refused with `WorkdirInUse` naming the holder. A lock left by a
  killed process on this host is taken over (with a warning); one from another host
  cannot be checked, so the message says to delete it if that run is gone. Re-entrant:
  nested blocks of the same process share the lock. Processes other than the writer
  (`is_writer`) of a multi-process run take no lock: process 0 holds it for them.
  """
  if not is_writer():
    yield
    return
  if not is_local(workdir):
    logging.warning("%s is not on a local filesystem: it has no one-writer lock; run one "
                    "job at a time on it.", workdir)
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  me = {"pid": os.getpid(), "host": socket.gethostname()}
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        other = read_json(path)
      except (OSError, ValueError):
        other = {}  # being written this instant, or empty
      if other == me:  # held by this process further up the call stack
        yield
        return
      if other.get("host") == me["host"] and not _alive(int(other.get("pid", 0) or 0)):
        logging.warning("Taking over %s: the process %s that held it is gone.", path,
                        other["pid"])
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      holder = (f"process {other['pid']} on {other['host']}" if other
                else "another process")
      raise WorkdirInUse(
          f"The work directory {workdir} is in use by {holder} (lock {path}). Wait for "
          f"that run to finish or use another work directory; if that run is gone, "
          f"delete {path}.")
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def exclusive_workdir(fn):
  """Decorator: ``fn(config, workdir, ...)`` runs under `exclusive` (workdir)."""
  @functools.wraps(fn)
  def wrapped(config, workdir, *args, **kwargs):
    with exclusive(workdir):
      return fn(config, workdir, *args, **kwargs)
  return wrapped


def check_writable(directory: str, what: str) -> None:
  """Makes ``directory`` (and its parents) and writes a probe file in it, so a location
  that cannot be written fails at the start of a long run, with ``what`` (e.g. "--out")
  and the reason in one line, instead of at its end."""
  try:
    if is_local(directory):
      os.makedirs(directory, exist_ok=True)
      with tempfile.TemporaryFile(dir=directory):
        pass
    else:
      probe = epath.Path(directory) / f".fsqtok-probe-{os.getpid()}"
      makedirs(directory)
      probe.write_bytes(b"")
      probe.unlink()
  except OSError as e:
    raise OSError(e.errno, f"{what}: {directory} cannot be written ({e.strerror}); choose "
                           f"a writable location") from None


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def make_shareable(path: str) -> None:
  """Gives a file made by ``tempfile`` (mode 0600 / 0700) the usual permissions."""
  os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def atomic_write_text(path: str, text: str, all_processes: bool = False) -> None:
  """Writes to a temporary file beside ``path``, then renames it over ``path``."""
  atomic_write_bytes(path, text.encode("utf-8"), all_processes)


def atomic_write_bytes(path: str, data: bytes, all_processes: bool = False) -> None:
  """Writes to a temporary file beside ``path``, then renames it over ``path`` (on the
  writer process only, `is_writer`, unless ``all_processes``: a file that each process
  writes for its own part of the data)."""
  if not (all_processes or is_writer()):
    return
  if not is_local(path):  # an object is written whole when it is closed
    makedirs(epath.Path(path).parent)
    epath.Path(path).write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    make_shareable(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_figure(fig, path: str, dpi: int = 100) -> None:
  """Saves a matplotlib figure to ``path`` atomically (writer process only) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not is_writer():
    plt.close(fig)
    return
  if not is_local(path):
    buffer = io.BytesIO()
    try:
      fig.savefig(buffer, dpi=dpi, format=os.path.splitext(os.fspath(path))[1][1:] or "png")
    finally:
      plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=dpi)
    make_shareable(tmp)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_json(path: str, obj: Any, all_processes: bool = False) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", all_processes)


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text(encoding="utf-8"))


def set_aside(path: str, reason: str) -> str:
  """Reports a file or directory a run cannot read and renames it ``PATH.damaged`` (then
  ``.damaged.1``, ...): kept for inspection, never deleted. Returns the new name (the
  writer process renames; the others only report)."""
  path = os.fspath(path)
  target, n = path + ".damaged", 0
  while exists(target):
    n += 1
    target = f"{path}.damaged.{n}"
  if is_writer():
    epath.Path(path).rename(target)
  logging.warning("%s cannot be read (%s); moved to %s and made again.", path, reason, target)
  return target


def read_saved_json(path: str) -> Any | None:
  """A JSON file an earlier run saved (a report, a cache), or None if there is none.
  One that cannot be read (damaged by a crash while copying, a full disk) is set aside
  (`set_aside`) and treated as missing, so the run makes it again."""
  if not exists(path):
    return None
  try:
    return read_json(path)
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError included
    set_aside(path, f"{type(e).__name__}: {str(e)[:200]}")
    return None


class MetricsLog:
  """``metrics.jsonl``: one JSON record per line, each with ``step`` and ``split``.

  Resuming from step ``s`` drops records after ``s`` (a killed run's last lines), so the
  file always describes exactly one history. ``pandas.read_json(path, lines=True)``
  reads it.
  """

  def __init__(self, path: str, *, resume_step: int):
    self.path = path
    kept = [r for r in self.read(path) if r.get("step", 0) <= resume_step]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

  @staticmethod
  def read(path: str) -> list[dict[str, Any]]:
    if not exists(path):
      return []
    records = []
    for line in epath.Path(path).read_text(encoding="utf-8").splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut by a kill mid-write
        continue
    return records

  def write(self, records: Iterable[dict[str, Any]]) -> None:
    if not is_writer():
      return
    if not is_local(self.path):  # no append on an object store: the whole log again
      lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
      old = epath.Path(self.path).read_text(encoding="utf-8") if exists(self.path) else ""
      atomic_write_text(self.path, old + lines)
      return
    with open(self.path, "a", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
      f.flush()
