"""Worker processes for the CPU-bound pure-Python work (counting a corpus, encoding a
batch): fresh Python interpreters that import only what the work needs.

Not ``multiprocessing``'s fork: a process that has used JAX runs JAX's threads, and a
forked child of a multithreaded process can deadlock; nor its spawn, which imports the
caller's main script again in every worker (for an experiment script, JAX and the whole
data stack). Each worker here is ``python -c`` reading one pickled task on stdin and
writing its pickled results on stdout.
"""
from __future__ import annotations

import concurrent.futures
import os
import pickle
import subprocess
import sys
from typing import Any, Callable, Sequence

import fsqtok

# the directory holding the fsqtok package, for workers of a checkout that is not installed
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fsqtok.__file__)))


def map_chunks(fn: Callable, chunks: Sequence[tuple], num_workers: int,
               shared: Any = None) -> list:
  """``[fn(shared, *chunk) for chunk in chunks]``, in order, over ``num_workers`` worker
  processes (each takes a contiguous run of chunks). ``fn`` must be a module-level
  function; ``shared`` and the chunks are pickled. A worker's exception is raised here."""
  num_workers = max(1, min(num_workers, len(chunks)))
  bounds = [len(chunks) * k // num_workers for k in range(num_workers + 1)]
  tasks = [pickle.dumps((fn, shared, list(chunks[a:b])), protocol=pickle.HIGHEST_PROTOCOL)
           for a, b in zip(bounds, bounds[1:])]
  env = {**os.environ,
         "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT,
                                                     os.environ.get("PYTHONPATH")]))}
  command = [sys.executable, "-c", "from fsqtok.data.processes import _serve; _serve()"]

  def run(task: bytes):
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate(task)
    if proc.returncode != 0:
      raise RuntimeError(f"A worker process failed (exit {proc.returncode}): "
                         f"{err.decode(errors='replace')[-2000:]}")
    return pickle.loads(out)

  with concurrent.futures.ThreadPoolExecutor(num_workers) as threads:
    replies = list(threads.map(run, tasks))
  results = []
  for ok, value in replies:
    if not ok:
      raise value
    results.extend(value)
  return results


def _serve() -> None:
  """A worker: one task from stdin, ``(True, results)`` or ``(False, exception)`` out."""
  fn, shared, chunks = pickle.load(sys.stdin.buffer)
  try:
    reply = (True, [fn(shared, *chunk) for chunk in chunks])
  except Exception as e:  # pylint: disable=broad-except
    reply = (False, e)
  sys.stdout.buffer.write(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
  sys.stdout.buffer.flush()
