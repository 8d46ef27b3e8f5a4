"""What each process (host) of a multi-process run reads, and how they pool what they found.

With one process every function here is the identity or a plain call. With several
(`jax.distributed.initialize`), every process must call them at the same point, in the
same order: they are collectives.

* `process_0_first`: process 0 prepares something on a disk the processes may share
  (a ``files:`` corpus's TFDS copy), the others open it after it is done.
* `process_share`: this process's share of a corpus (its documents, or block i to process
  i mod processes), so reading and counting are split between the hosts instead of
  repeated by each; `total_chars`: the corpus's characters, counted over the shares.
* `sum_counts`: the counts of every process added up, the same on all of them;
  `all_true`: one decision for all (e.g. whether to reuse a file only process 0 wrote).
"""
from __future__ import annotations

import collections
import pickle
from typing import Any, Callable, Iterable, TypeVar

import numpy as np

from fsqtok.data import corpus as corpus_lib

T = TypeVar("T")


def _processes() -> tuple[int, int]:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def process_0_first(prepare: Callable[[], T], what: str) -> T:
  """``prepare()`` in process 0, then in the others once process 0 has finished: what it
  writes on a disk the processes share is written once and opened by the others; on
  disks of their own each prepares its own copy."""
  index, count = _processes()
  if count == 1:
    return prepare()
  from fsqtok.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  result = prepare() if index == 0 else None
  sharding_lib.sync_processes(f"fsqtok {what} prepared")
  return result if index == 0 else prepare()


def process_share(blocks: Iterable[str]) -> Iterable[str]:
  """This process's blocks (all of them with one process): a `corpus.BlockStream` that
  knows its documents gives each process its share of them, and the process reads only
  its own (`corpus.BlockStream.share`: document d to process d mod processes, or with
  fewer documents than processes one document, its blocks dealt among the processes
  that read it); otherwise block i goes to process i mod processes. A stream stays a
  stream."""
  index, count = _processes()
  if count == 1:
    return blocks
  if isinstance(blocks, corpus_lib.BlockStream):
    return blocks.share(index, count)
  return list(blocks)[index::count]


def total_chars(share: Iterable[str]) -> int:
  """The characters of every process's ``share`` added up (`corpus.total_chars` of the
  whole corpus, counted by each process over its own share)."""
  return sum(all_gather_objects(corpus_lib.total_chars(share)))


def all_gather_objects(obj: Any) -> list[Any]:
  """``obj`` of every process, in process order (pickled, sent as bytes)."""
  _, count = _processes()
  if count == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(gathered[p, :int(sizes[p, 0])].tobytes()) for p in range(count)]


def all_true(flag: bool) -> bool:
  """Whether ``flag`` holds in every process (the same answer in all of them)."""
  return all(all_gather_objects(bool(flag)))


def sum_counts(counts: collections.Counter) -> collections.Counter:
  """The counts of every process added up (in process order): the same on all."""
  parts = all_gather_objects(counts)
  if len(parts) == 1:
    return counts
  total: collections.Counter = collections.Counter()
  for part in parts:
    total.update(part)
  return total
