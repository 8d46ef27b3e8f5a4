"""The large training files of docs/tokenizer.md, "Large corpora", from the real text of
`experiments/make_corpora.py` (``docs.txt`` + ``books.txt``, 43 MB):

  python experiments/make_scale_corpora.py --dir=/work/corpora

* ``scale100.txt``, ``scale1000.txt``: the two files repeated to 100 MB and 1 GB (no larger
  real text is on the machine: repeats add time, not new strings).
* ``distinct300.txt``: 300 MB of the same lines with every third word replaced by 5-8
  random letters (seeded; ~14M distinct runs), the worst case for counting's memory.
"""
import os

import numpy as np
from absl import app, flags

_DIR = flags.DEFINE_string("dir", "/work/corpora", "Where docs.txt and books.txt are; the "
                           "files are written there.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random words of distinct300.txt.")
_SIZES = flags.DEFINE_list("sizes_mb", ["100", "1000"], "Sizes of the repeated files, MB.")
_DISTINCT = flags.DEFINE_float("distinct_mb", 300, "Size of the distinct-words file, MB.")


def _write_repeated(text: bytes, path: str, size: int) -> None:
  with open(path + ".tmp", "wb") as f:
    left = size
    while left > 0:
      part = text[:left]
      if len(part) < len(text):  # the last, partial copy ends at a line end
        part = part[:part.rfind(b"\n") + 1]
        left = 0
      f.write(part)
      left -= len(part)
  os.replace(path + ".tmp", path)


def _write_distinct(lines: list[str], path: str, size: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  pool = letters[rng.integers(0, 26, 50_000_000)].tobytes().decode()
  p, written = 0, 0
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    while written < size:
      for line in lines:
        words = line.split(" ")
        for i in range(2, len(words), 3):
          n = 5 + p % 4
          words[i] = pool[p % 49_999_000:p % 49_999_000 + n]
          p += n + 7
        out = " ".join(words) + "\n"
        f.write(out)
        written += len(out)
        if written >= size:
          break
  os.replace(path + ".tmp", path)


def main(argv):
  del argv
  d = _DIR.value
  text = b"".join(open(os.path.join(d, n), "rb").read() for n in ("docs.txt", "books.txt"))
  names = []
  for mb in _SIZES.value:
    names.append(f"scale{mb}.txt")
    _write_repeated(text, os.path.join(d, names[-1]), int(float(mb) * 1e6))
  names.append(f"distinct{_DISTINCT.value:g}.txt")
  _write_distinct(text.decode("utf-8").split("\n"), os.path.join(d, names[-1]),
                  int(_DISTINCT.value * 1e6), _SEED.value)
  print(f"Wrote {', '.join(names)} in {d}.")


if __name__ == "__main__":
  app.run(main)
