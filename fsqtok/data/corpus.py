"""Corpora: named sources of documents, and the deterministic train/validation split.

Sources are looked up by scheme in `SOURCES`:

* ``builtin`` -- the English documentation that ships with every Python install (the
  ``pydoc_data`` topics and the docstrings of the standard library, read with `ast`,
  never imported), deduplicated. Needs no network. It varies slightly between Python
  versions; read once per install and cached (`_builtin_documents`).
* ``files:GLOB`` -- the user's text files, prepared through `fsqtok.data.files_dataset`.
* ``tfds:NAME[:SPLIT]`` -- any TensorFlow Datasets text set (default split ``train``).

`split_documents` loads a corpus whole; `stream_split` gives the same blocks as
re-iterable `BlockStream`s that read ``files:`` corpora from disk a few MB at a time and
``tfds:`` ones a document at a time, so the tokenizer build's (and, with the Grain
loader, every host's) memory does not grow with the corpus. The streams know their
documents: a host's share of them (`BlockStream.share`) reads only its own files or
records, never the rest of the corpus.

A document longer than ``SEGMENT_BYTES`` (UTF-8) is first cut into **segments** of about
that size, each ending after a line end (`segment_bounds`), and each segment into blocks;
shorter documents are one segment. A streamed file's segments are read by seeking, so a
corpus that is one large file still gives every host only its own part to read.

Bytes of a ``files:`` corpus that are not UTF-8 follow ``invalid_utf8`` (`INVALID_UTF8`):
``"error"`` (the default: stop, naming the file and byte), ``"replace"`` (each bad
sequence becomes U+FFFD) or ``"skip_document"`` (the whole file is left out);
`invalid_utf8_counts` says how many bytes that changed, for the run's report.
"""
from __future__ import annotations

import ast
import codecs
import functools
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import threading
from typing import Callable, Iterable, Iterator

INVALID_UTF8 = ("error", "replace", "skip_document")
_BAD_BYTES = threading.local()


def _count_and_replace(e: UnicodeDecodeError):
  _BAD_BYTES.n = getattr(_BAD_BYTES, "n", 0) + (e.end - e.start)
  return "\ufffd", e.end


codecs.register_error("fsqtok.count_replace", _count_and_replace)


def check_invalid_utf8(policy: str) -> None:
  if policy not in INVALID_UTF8:
    raise ValueError(f"data.invalid_utf8={policy!r} is unknown: use one of {INVALID_UTF8}.")


def decode_document(raw: bytes, path: str, policy: str = "error") -> str | None:
  """A file's text under ``policy`` (None: the file is skipped)."""
  check_invalid_utf8(policy)
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if policy == "error":
      raise not_utf8_error(path, e.start, e.reason) from None
    return None if policy == "skip_document" else raw.decode("utf-8", "replace")

_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                "turtledemo", "__pycache__"}
_MIN_DOCSTRING_CHARS = 40


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> tuple[str, ...]:
  """The ``builtin`` corpus, read once per Python install: parsing the standard library
  takes ~10 s, so the documents are kept in the user's cache directory
  (``$XDG_CACHE_HOME/fsqtok``, written atomically) under a key of the Python version and
  the standard library's path; a cache that does not read is made again."""
  stdlib = sysconfig.get_paths()["stdlib"]
  key = hashlib.sha256(json.dumps([sys.version, stdlib, sorted(_STDLIB_SKIP),
                                   _MIN_DOCSTRING_CHARS, 1]).encode()).hexdigest()[:16]
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                       "fsqtok", f"builtin-{key}.json")
  try:
    with open(cache, encoding="utf-8") as f:
      docs = json.load(f)
    if isinstance(docs, list) and docs and all(isinstance(d, str) for d in docs):
      return tuple(docs)
  except (OSError, ValueError):
    pass
  docs = _read_builtin_documents(pathlib.Path(stdlib))
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(docs, f)
    os.replace(tmp, cache)
  except OSError:  # a read-only home: read the standard library each time
    pass
  return tuple(docs)


def _read_builtin_documents(stdlib: pathlib.Path) -> list[str]:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  docs = dict.fromkeys(topics[k] for k in sorted(topics))
  for path in sorted(stdlib.rglob("*.py")):
    if _STDLIB_SKIP.intersection(path.relative_to(stdlib).parts):
      continue
    try:
      tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
          docs.setdefault(doc)
  return list(docs)


def _load_builtin(arg: str, *, data_dir: str | None, text_key: str,
                  invalid_utf8: str) -> list[str]:
  del data_dir, text_key, invalid_utf8
  if arg:
    raise ValueError(f"'builtin' takes no argument, got 'builtin:{arg}'.")
  return list(_builtin_documents())


def _load_files(pattern: str, *, data_dir: str | None, text_key: str,
                invalid_utf8: str) -> list[str]:
  del text_key
  if not pattern:
    raise ValueError("'files:' needs a glob, e.g. files:data/*.txt")
  from fsqtok.data import files_dataset  # pylint: disable=g-import-not-at-top
  from fsqtok.data import hosts  # pylint: disable=g-import-not-at-top
  builder = hosts.process_0_first(
      lambda: files_dataset.files_builder(pattern, data_dir, invalid_utf8), "files: corpus")
  source = builder.as_data_source(split="train")
  records = sorted((_as_text(r["path"]), _as_text(r["text"])) for r in source)
  return [text for _, text in records]  # in path order, not the storage's order


def _tfds_source(arg: str, data_dir: str | None):
  """The random-access TFDS source of ``tfds:NAME[:SPLIT]``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, _, split = arg.partition(":")
  if not name:
    raise ValueError("'tfds:' needs a dataset name, e.g. tfds:tiny_shakespeare")
  try:
    return tfds.data_source(name, split=split or "train", data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"TFDS does not know the dataset {name!r}. Check the name in the TFDS catalog "
        f"(https://www.tensorflow.org/datasets/catalog), e.g. tfds:tiny_shakespeare.") from e


def _tfds_text(source, i: int, arg: str, text_key: str) -> str:
  """The text of record ``i`` of a TFDS source (an error naming the features if it has no
  ``text_key``)."""
  record = source[i]
  if text_key not in record:
    raise ValueError(f"tfds:{arg.partition(':')[0]} has no feature {text_key!r} (it has "
                     f"{sorted(record)}); set config.data.text_key to the text feature.")
  return _as_text(record[text_key])


def _tfds_documents(arg: str, *, data_dir: str | None, text_key: str) -> Iterator[str]:
  """The documents of ``tfds:NAME[:SPLIT]``, read one at a time."""
  source = _tfds_source(arg, data_dir)
  for i in range(len(source)):
    yield _tfds_text(source, i, arg, text_key)


def _load_tfds(arg: str, *, data_dir: str | None, text_key: str,
               invalid_utf8: str) -> list[str]:
  del invalid_utf8  # TFDS text features are decoded by TFDS
  return list(_tfds_documents(arg, data_dir=data_dir, text_key=text_key))


def _as_text(value) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


SOURCES: dict[str, Callable[..., list[str]]] = {
    "builtin": _load_builtin,
    "files": _load_files,
    "tfds": _load_tfds,
}


def load_documents(spec: str, *, data_dir: str | None = None, text_key: str = "text",
                   invalid_utf8: str = "error") -> list[str]:
  """Documents of the corpus ``spec`` (``builtin``, ``files:GLOB`` or ``tfds:NAME``)."""
  scheme, _, arg = spec.partition(":")
  if scheme not in SOURCES:
    raise ValueError(f"Unknown corpus {spec!r}: use one of 'builtin', 'files:GLOB', "
                     f"'tfds:NAME'.")
  check_invalid_utf8(invalid_utf8)
  docs = [d for d in SOURCES[scheme](arg, data_dir=data_dir, text_key=text_key,
                                     invalid_utf8=invalid_utf8) if d]
  if not docs:
    raise ValueError(f"Corpus {spec!r} is empty: it has no non-empty document. "
                     f"Point it at text files with content.")
  return docs


def content_key(spec: str) -> str:
  """What names a corpus's content, for keys of what is made from it: the spec, and for
  ``files:`` the digest of the matching files' paths, sizes and modification times (an
  edited, added or removed file gives another key)."""
  scheme, _, arg = spec.partition(":")
  if scheme != "files":
    return spec
  from fsqtok.data import files_dataset  # pylint: disable=g-import-not-at-top
  return f"{spec}@{files_dataset.files_digest(files_dataset.resolve_glob(arg))}"


def load_split(data_config, *, stream: bool = False
               ) -> tuple[list[str], list[str]] | tuple[BlockStream, BlockStream]:
  """Train and validation texts of a ``config.data`` (its source, split fraction, seed,
  block size and text policy): `load_documents` then `split_documents`; with ``stream``,
  the same blocks as `stream_split`'s `BlockStream`s (a ``files:`` or ``tfds:`` corpus is
  read anew on each pass and never held whole)."""
  d = data_config
  if stream:
    return stream_split(d.source, data_dir=d.tfds_data_dir or None, text_key=d.text_key,
                        val_fraction=d.val_fraction, seed=d.split_seed,
                        block_chars=d.block_chars, invalid_utf8=d.get("invalid_utf8", "error"))
  docs = load_documents(d.source, data_dir=d.tfds_data_dir or None, text_key=d.text_key,
                        invalid_utf8=d.get("invalid_utf8", "error"))
  return split_documents(docs, val_fraction=d.val_fraction, seed=d.split_seed,
                         block_chars=d.block_chars)


def parse_named(spec: str, what: str = "corpora") -> dict[str, str]:
  """``"a=builtin,b=files:x.txt"`` -> ``{"a": "builtin", "b": "files:x.txt"}``."""
  out = {}
  for item in filter(None, spec.split(",")):
    name, _, value = item.partition("=")
    if not name or not value:
      raise ValueError(f"Expected name=value pairs in {what} {spec!r}, e.g. "
                       f"builtin=builtin,ts=files:../shared/data/tinyshakespeare.txt.")
    out[name] = value
  return out


# A document longer than this many UTF-8 bytes is cut into segments (`segment_bounds`)
# before blocks: part of the corpus's block layout, not a tuning knob.
SEGMENT_BYTES = 1 << 26


def segment_bounds(size: int, newline_from: Callable[[int], int], segment_bytes: int
                   ) -> list[tuple[int, int]]:
  r"""The segments of a document of ``size`` bytes: ``[(start, end), ...]`` in order,
  covering it, none empty. Segment k >= 1 starts just after the first line end
  (``b"\n"``) at or after byte ``k * segment_bytes - 1`` (so UTF-8 is never cut inside a
  character); ``newline_from(p)`` gives the first ``\n`` at or after ``p`` (-1: none). The
  cuts depend only on the bytes and ``segment_bytes``, not on who reads."""
  if segment_bytes < 1:
    raise ValueError(f"segment_bytes must be >= 1, got {segment_bytes}.")
  starts = [0]
  for k in range(1, -(-size // segment_bytes)):
    if starts[-1] >= k * segment_bytes:  # a line longer than a segment
      continue
    newline = newline_from(k * segment_bytes - 1)
    if newline < 0 or newline + 1 >= size:
      break
    starts.append(newline + 1)
  ends = starts[1:] + [size]
  return [(a, b) for a, b in zip(starts, ends) if a < b]


def document_blocks(text: str, block_chars: int, segment_bytes: int = SEGMENT_BYTES
                    ) -> list[str]:
  """A document's blocks: `split_blocks` of each of its segments (`segment_bounds`)."""
  # at most 4 bytes a character: a short text is one segment without being encoded
  if (len(text) * 4 <= segment_bytes
      or len(raw := text.encode("utf-8", "surrogatepass")) <= segment_bytes):
    return split_blocks(text, block_chars)
  return [b for start, end in segment_bounds(len(raw), lambda p: raw.find(b"\n", p),
                                             segment_bytes)
          for b in split_blocks(raw[start:end].decode("utf-8", "surrogatepass"),
                                block_chars)]


def split_blocks(text: str, block_chars: int) -> list[str]:
  """Cuts a document into blocks of about ``block_chars`` characters at line ends."""
  blocks, start = [], 0
  while start < len(text):
    end = _block_end(text, start, block_chars)
    blocks.append(text[start:end])
    start = end
  return blocks


def _block_end(text: str, start: int, block_chars: int) -> int:
  """Where the block from ``start`` ends: after its last line end within ``block_chars``
  characters (or there, when it has none), or at the end of ``text``."""
  if block_chars < 1:  # every loop over blocks comes here first; 0 would never advance
    raise ValueError(f"data.block_chars must be at least 1 (the characters of a block), "
                     f"got {block_chars}.")
  end = min(start + block_chars, len(text))
  if end < len(text):
    newline = text.rfind("\n", start, end)
    end = newline + 1 if newline > start else end
  return end


def _unit_hash(block: str, key: str) -> float:
  """A number in [0, 1) fixed by ``block``'s content and ``key``."""
  h = hashlib.blake2b(block.encode("utf-8", "surrogatepass"), digest_size=8,
                      key=key.encode()).digest()
  return int.from_bytes(h, "little") / 2.0**64


def split_documents(docs: list[str], *, val_fraction: float, seed: int, block_chars: int,
                    segment_bytes: int = SEGMENT_BYTES) -> tuple[list[str], list[str]]:
  """Deterministic train/validation split by a seeded hash of each block's content.

  Documents are cut into blocks first (`document_blocks`), so a corpus that is one long
  file still gets a validation set; identical blocks always land on the same side (no
  leakage).
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
  train, val = [], []
  for doc in docs:
    for block in document_blocks(doc, block_chars, segment_bytes):
      (val if _unit_hash(block, str(seed)) < val_fraction else train).append(block)
  _check_split(len(train), len(val), val_fraction, block_chars)
  return train, val


def _check_split(train: int, val: int, val_fraction: float, block_chars: int) -> None:
  if not train or (val_fraction > 0 and not val):
    raise ValueError(f"Corpus too small to split: {train} train and {val} validation "
                     f"blocks of {block_chars} characters. Lower data.block_chars or add "
                     f"text.")


def sample_blocks(blocks: Iterable[str], max_chars: int, seed: int, *,
                  total: int | None = None) -> list[str] | BlockStream:
  """About ``max_chars`` characters of ``blocks``, in order: each block is kept with the
  same probability, decided by a seeded hash of its content (independent of the split's),
  so the sample depends neither on the blocks' order nor on how the corpus is read. All of
  them when they hold no more than ``max_chars`` (or ``max_chars`` <= 0). A `BlockStream`
  gives a `BlockStream` (read as it is iterated), anything else a list. ``total``: the
  characters of the whole corpus when ``blocks`` is one host's share of it (default: those
  of ``blocks``), so the shares' samples together are the corpus's."""
  total = total_chars(blocks) if total is None else total
  if max_chars <= 0 or total <= max_chars:
    return blocks if isinstance(blocks, BlockStream) else list(blocks)
  keep, key = max_chars / total, f"sample:{seed}"
  if isinstance(blocks, BlockStream):
    return blocks.filter(lambda b: _unit_hash(b, key) < keep)
  return [b for b in blocks if _unit_hash(b, key) < keep]


class BlockStream:
  """Blocks of text made anew by ``make`` on every iteration, so they need not all be in
  memory at once; ``chars`` (their characters) is counted by one pass, once.

  A stream made `of_documents` knows its documents (a corpus's files or records) and can
  read a few of them alone: `share` then gives whole documents, so a host reads only its
  own (`fsqtok.data.hosts.process_share`, the token store's shards)."""

  def __init__(self, make: Callable[[], Iterator[str]]):
    self._make = make
    self.documents = 0             # how many documents `share` can read one by one
    self._read: Callable[[Iterable[int]], Iterator[str]] | None = None

  @classmethod
  def of_documents(cls, documents: int,
                   read: Callable[[Iterable[int]], Iterator[str]]) -> "BlockStream":
    """The blocks of ``documents`` documents, ``read(indices)`` giving those of the
    documents ``indices`` in order (and reading only them)."""
    stream = cls(lambda: read(range(documents)))
    stream.documents, stream._read = documents, read
    return stream

  def __iter__(self) -> Iterator[str]:
    return iter(self._make())

  @functools.cached_property
  def chars(self) -> int:
    return sum(map(len, self))

  def by_documents(self) -> bool:
    """Whether `share` reads only its own documents: when the stream knows them."""
    return self._read is not None and self.documents > 0

  def share(self, index: int, count: int) -> "BlockStream":
    """Share ``index`` of ``count``, each block in exactly one share, depending only on the
    corpus and ``count``. A stream that knows its ``D`` documents (`by_documents`) reads
    only those of the share: with ``D >= count``, the documents d with d mod ``count`` =
    ``index``; with fewer, document ``index mod D`` alone, whose blocks are dealt in turn
    among the shares that read it (the ``k`` shares ``d, d + D, ...``; block j to the one
    of rank j mod ``k``), so no share reads more than one document. Otherwise block i of
    the stream for i mod ``count`` = ``index`` (every block is read)."""
    _check_share(index, count)
    if not self.by_documents():
      return BlockStream(lambda: (b for i, b in enumerate(self) if i % count == index))
    read, docs = self._read, self.documents
    if docs >= count:
      return BlockStream(lambda: read(range(index, docs, count)))
    doc, rank, sharers = self._dealt(index, count)
    return BlockStream(lambda: (b for j, b in enumerate(read([doc])) if j % sharers == rank))

  def shares(self, indices: Iterable[int], count: int) -> Iterator[tuple[int, list[str]]]:
    """``(index, blocks of share index of count)`` for each of ``indices``, as `share`
    gives them (a stream that knows its documents), reading each document once: shares
    of one document (fewer documents than shares) are dealt from one reading of it."""
    if not self.by_documents():
      raise ValueError("shares() reads documents; this stream does not know its own.")
    indices = list(indices)
    if self.documents >= count:
      for index in indices:
        yield index, list(self.share(index, count))
      return
    by_doc: dict[int, list[int]] = {}
    for index in indices:
      _check_share(index, count)
      by_doc.setdefault(index % self.documents, []).append(index)
    for doc, on_doc in by_doc.items():
      blocks = list(self._read([doc]))
      for index in on_doc:
        _, rank, sharers = self._dealt(index, count)
        yield index, blocks[rank::sharers]

  def _dealt(self, index: int, count: int) -> tuple[int, int, int]:
    """With fewer documents than shares: share ``index``'s document, its rank among the
    shares of that document, and how many they are."""
    doc = index % self.documents
    return doc, index // self.documents, len(range(doc, count, self.documents))

  def filter(self, keep: Callable[[str], bool]) -> "BlockStream":
    """The blocks for which ``keep`` holds, read as iterated (documents kept)."""
    if self._read is None:
      return BlockStream(lambda: (b for b in self if keep(b)))
    read = self._read
    return BlockStream.of_documents(self.documents,
                                    lambda ids: (b for b in read(ids) if keep(b)))


def _check_share(index: int, count: int) -> None:
  if not 0 <= index < count:
    raise ValueError(f"share {index} of {count} does not exist.")


def total_chars(blocks: Iterable[str]) -> int:
  """Characters of ``blocks`` (a `BlockStream`'s counted once)."""
  return blocks.chars if isinstance(blocks, BlockStream) else sum(map(len, blocks))


def chunk_blocks(blocks: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
  """Consecutive blocks, about ``chunk_chars`` characters a chunk (read as they are used)."""
  current, size = [], 0
  for b in blocks:
    current.append(b)
    size += len(b)
    if size >= chunk_chars:
      yield current
      current, size = [], 0
  if current:
    yield current


READ_BYTES = 1 << 22  # a streamed file is read this many bytes at a time


def not_utf8_error(path: str, byte: int, reason: str) -> ValueError:
  """The error for a corpus file that is not UTF-8 (nothing is decoded by guessing)."""
  return ValueError(f"{path} is not UTF-8 text (byte {byte}: {reason}). Convert it first, "
                    f"e.g. iconv -f latin1 -t utf-8 {path} > {path}.utf8, or set "
                    f"data.invalid_utf8 to 'replace' or 'skip_document' (`fsqtok "
                    f"train-tokenizer --invalid-utf8`, the experiment scripts' "
                    f"--invalid_utf8, train.py's --config.data.invalid_utf8).")


def _bad_bytes(path: str) -> int:
  """How many bytes of a file are not UTF-8 (one pass, ``READ_BYTES`` at a time)."""
  decoder = codecs.getincrementaldecoder("utf-8")("fsqtok.count_replace")
  _BAD_BYTES.n = 0
  with open(path, "rb") as f:
    while raw := f.read(READ_BYTES):
      decoder.decode(raw)
  decoder.decode(b"", final=True)
  return _BAD_BYTES.n


@functools.lru_cache(maxsize=4096)
def _has_bad_bytes(path: str, size: int, mtime_ns: int) -> bool:
  """Whether a file (as of ``size`` and ``mtime_ns``) holds bytes that are not UTF-8:
  checked once per file, not once per segment read."""
  del size, mtime_ns  # part of the cache key only
  return _bad_bytes(path) > 0


def _newline_from(f, position: int) -> int:
  r"""The first ``\n`` of the open binary file ``f`` at or after ``position`` (-1: none)."""
  f.seek(position)
  while chunk := f.read(1 << 16):
    found = chunk.find(b"\n")
    if found >= 0:
      return position + found
    position += len(chunk)
  return -1


def file_segments(path: str, segment_bytes: int = SEGMENT_BYTES) -> list[tuple[int, int]]:
  """A file's segments (`segment_bounds`), found by seeking: a few reads per segment."""
  size = os.path.getsize(path)
  if size <= segment_bytes:
    return [(0, size)] if size else []
  with open(path, "rb") as f:
    return segment_bounds(size, lambda p: _newline_from(f, p), segment_bytes)


def read_blocks(path: str, block_chars: int, invalid_utf8: str = "error", *,
                segment: tuple[int, int] | None = None) -> Iterator[str]:
  """The blocks of a UTF-8 text file (or of its bytes ``segment = (start, end)``), exactly
  those of ``split_blocks(that text)``, read ``READ_BYTES`` at a time. Bytes that are not
  UTF-8 follow ``invalid_utf8``: an error naming the file and byte, U+FFFD, or no blocks
  from this file (which is checked whole)."""
  check_invalid_utf8(invalid_utf8)
  if invalid_utf8 == "skip_document":
    stat = os.stat(path)
    if _has_bad_bytes(path, stat.st_size, stat.st_mtime_ns):
      return
  decoder = codecs.getincrementaldecoder("utf-8")(
      "replace" if invalid_utf8 == "replace" else "strict")
  offset, stop = segment if segment is not None else (0, None)
  text, start = "", 0
  with open(path, "rb") as f:
    f.seek(offset)
    while True:
      raw = f.read(READ_BYTES if stop is None else min(READ_BYTES, stop - offset))
      pending = len(decoder.getstate()[0])  # bytes of a character cut by the last read
      try:
        text = text[start:] + decoder.decode(raw, final=not raw)
      except UnicodeDecodeError as e:
        raise not_utf8_error(path, offset - pending + e.start, e.reason) from None
      offset += len(raw)
      start = 0
      # A block is final once more than block_chars characters follow its start.
      while len(text) - start > block_chars or (not raw and start < len(text)):
        end = _block_end(text, start, block_chars)
        yield text[start:end]
        start = end
      if not raw:
        return


def stream_split(spec: str, *, data_dir: str | None = None, text_key: str = "text",
                 val_fraction: float, seed: int, block_chars: int,
                 invalid_utf8: str = "error", segment_bytes: int = SEGMENT_BYTES
                 ) -> tuple[BlockStream, BlockStream]:
  """The train and validation blocks of `split_documents` for the corpus ``spec``, as
  `BlockStream`s of its documents (`BlockStream.of_documents`) read anew on each pass, so
  their memory does not grow with the corpus: ``files:`` corpora a segment of a file at a
  time (`file_segments`: the stream's documents), block by block from disk; ``tfds:``
  ones a record at a time from their random-access source; ``builtin`` is loaded once
  and held. A share of whole documents reads only those.

  Under ``invalid_utf8="replace"`` a file longer than ``segment_bytes`` with bytes that
  are not UTF-8 may be cut into segments at other places than `split_documents` cuts its
  decoded text (the cuts are made on the file's bytes here, on the text's there)."""
  scheme, _, arg = spec.partition(":")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
  if scheme == "tfds":
    source = _tfds_source(arg, data_dir)  # a bad name or split fails here, not on a pass
    if len(source):
      _tfds_text(source, 0, arg, text_key)  # so does a bad text_key
    def read(ids: Iterable[int]) -> Iterator[str]:
      src = _tfds_source(arg, data_dir)
      for i in ids:
        yield from document_blocks(_tfds_text(src, i, arg, text_key), block_chars,
                                   segment_bytes)
    count = len(source)
  elif scheme == "files":
    if not arg:
      raise ValueError("'files:' needs a glob, e.g. files:data/*.txt")
    from fsqtok.data import files_dataset  # pylint: disable=g-import-not-at-top
    segments = [(path, segment) for path in files_dataset.resolve_glob(arg)
                for segment in file_segments(path, segment_bytes)]
    read = lambda ids: (b for i in ids for b in read_blocks(
        segments[i][0], block_chars, invalid_utf8, segment=segments[i][1]))
    count = len(segments)
  else:
    docs = load_documents(spec, data_dir=data_dir, text_key=text_key,
                          invalid_utf8=invalid_utf8)
    doc_blocks = [document_blocks(doc, block_chars, segment_bytes) for doc in docs]
    val = sum(_unit_hash(b, str(seed)) < val_fraction for bs in doc_blocks for b in bs)
    _check_split(sum(map(len, doc_blocks)) - val, val, val_fraction, block_chars)
    read = lambda ids: (b for i in ids for b in doc_blocks[i])
    count = len(docs)
  blocks = BlockStream.of_documents(count, read)
  is_val = lambda b: _unit_hash(b, str(seed)) < val_fraction
  return blocks.filter(lambda b: not is_val(b)), blocks.filter(is_val)


def invalid_utf8_counts(spec: str, invalid_utf8: str) -> dict[str, int | str]:
  """What ``invalid_utf8`` changed in a ``files:`` corpus (for reports): bytes replaced,
  files skipped and their bytes. One reading pass, made only when the policy is not
  ``"error"`` (under ``"error"`` nothing can have changed)."""
  check_invalid_utf8(invalid_utf8)
  counts: dict[str, int | str] = {"policy": invalid_utf8, "replaced_bytes": 0,
                                  "skipped_documents": 0, "skipped_bytes": 0}
  scheme, _, arg = spec.partition(":")
  if scheme != "files" or invalid_utf8 == "error":
    return counts
  from fsqtok.data import files_dataset  # pylint: disable=g-import-not-at-top
  for path in files_dataset.resolve_glob(arg):
    bad = _bad_bytes(path)
    if invalid_utf8 == "replace":
      counts["replaced_bytes"] += bad
    elif bad:
      counts["skipped_documents"] += 1
      counts["skipped_bytes"] += os.path.getsize(path)
  return counts
