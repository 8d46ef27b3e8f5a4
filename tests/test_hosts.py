"""fsqtok/data/hosts.py with one process (several: tests/test_multiprocess.py)."""
import collections

from fsqtok.data import corpus
from fsqtok.data import hosts


def test_one_process_reads_everything_and_pools_nothing():
  blocks = ["a b", "c", "d e f"]
  assert hosts.process_share(blocks) == blocks
  stream = corpus.BlockStream(lambda: iter(blocks))
  assert hosts.process_share(stream) is stream  # still a stream, read as iterated
  counts = collections.Counter({"a": 2, " b": 1})
  assert hosts.sum_counts(counts) == counts
  assert hosts.all_gather_objects({"x": [1, 2]}) == [{"x": [1, 2]}]
  assert hosts.all_true(True) and not hosts.all_true(False)
  calls = []
  assert hosts.process_0_first(lambda: calls.append(1) or "ready", "test") == "ready"
  assert calls == [1]
