"""What each host reads of a corpus that is one large file, in one run.

  python experiments/bench_corpus_shares.py --file=~/fsqtok-corpora/books.txt --copies=25

Writes ``--copies`` copies of ``--file`` one after another into one temporary file (outside
the clock), streams it as a ``files:`` corpus (`fsqtok.data.corpus.stream_split`: the file
is cut into ``--segment_bytes`` segments at line ends, the stream's documents), then
reads it whole, as one host does, and as each share of 2..``--max_hosts`` hosts
(`BlockStream.share`, what `fsqtok.data.hosts.process_share` gives host i): the
characters each reader gets, the bytes it read (the process's read() calls, from
/proc/self/io: Linux), and its time against the whole pass's. A share reads only its own
segments: with fewer segments than hosts, one segment each, whose blocks the hosts that
read it take in turn.
"""
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsqtok.data import corpus  # noqa: E402

_FILE = flags.DEFINE_string("file", None, "A UTF-8 text file.", required=True)
_COPIES = flags.DEFINE_integer("copies", 25, "Copies of --file in the corpus's one file.")
_SEGMENT = flags.DEFINE_integer("segment_bytes", corpus.SEGMENT_BYTES, "Segment size.")
_HOSTS = flags.DEFINE_integer("max_hosts", 4, "Shares of 2..max_hosts hosts.")


def bytes_read() -> int:
  """Bytes this process has read through read() calls (Linux: /proc/self/io rchar)."""
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def main(argv):
  del argv
  text = open(os.path.expanduser(_FILE.value), "rb").read()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "corpus.txt")
    with open(path, "wb") as f:
      for _ in range(_COPIES.value):
        f.write(text)
    t = time.perf_counter()
    train, _ = corpus.stream_split(f"files:{path}", val_fraction=0.0, seed=0,
                                   block_chars=4096, segment_bytes=_SEGMENT.value)
    found = time.perf_counter() - t
    readers = [("whole (1 host)", train)] + [
        (f"share {i} of {n}", train.share(i, n)) for n in range(2, _HOSTS.value + 1)
        for i in range(n)]
    rows = []
    for name, stream in readers:
      before, t = bytes_read(), time.perf_counter()
      chars = sum(map(len, stream))
      rows.append((name, chars, bytes_read() - before, time.perf_counter() - t))
    size = os.path.getsize(path)
  print(f"One file of {size:,} bytes ({_COPIES.value} copies of {_FILE.value}): "
        f"{train.documents} segments of <= {_SEGMENT.value:,} bytes, found in {found:.2f} s\n")
  print("| reader | characters | bytes of the file read | time against the whole pass |")
  print("|---|---|---|---|")
  for name, chars, nbytes, seconds in rows:
    print(f"| {name} | {chars:,} | {nbytes:,} ({nbytes / size:.0%}) | "
          f"{seconds / rows[0][3]:.2f} |")


if __name__ == "__main__":
  app.run(main)
