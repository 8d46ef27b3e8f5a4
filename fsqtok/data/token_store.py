"""The LM's token windows prepared once on disk, each process tokenizing only its own
shards and reading only its own rows (``lm.data.loader = "grain"``).

A split's blocks go to ``num_shards`` shards: whole documents (document d to shard
d mod num_shards; a file's ~64 MiB segments, `fsqtok.data.corpus.segment_bounds`, are its
documents) when the corpus is streamed (`fsqtok.data.corpus.stream_split`) and has
at least num_shards documents, so a process reads only its own files or records; blocks
by position otherwise (block k to shard k mod num_shards). Either way the shards, and
every window in them, are the same whatever the number of processes; process p tokenizes
and writes the shards s with s mod P = p. A
shard is its blocks' `lm_data.token_stream` cut into `lm_data.windows`; one array_record
record per window holds its ``seq_len + 1`` tokens (int32, padded after the stream's
end: a pad id is never a real token). Beside each shard a JSON file holds its rows, the
UTF-8 bytes of its text and how often each id is a scored target; it is written after the
records, so a shard without it (a run stopped while preparing) is made again.

    DIR/train-00003-of-00008.array_record    DIR/train-00003-of-00008.json
    DIR/val-00000-of-00008.array_record      ...

``DIR`` is named by a digest of what the windows are made from (`store_dir`), so a
changed tokenizer, corpus or window length prepares a fresh store. Training draws
windows through Grain (`fsqtok.data.grain_loader.GrainBatches` over `Split.source`, a
batch of records read as token rows and made windows at once), each
process its own rows, the position saved in the checkpoint; evaluation reads each
process's own shards (`Split.local_batches`). The store lives on a filesystem every
process sees (a local disk for one host; NFS, Lustre or a gcsfuse mount on a pod).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Iterable, Iterator

import grain.python as grain
import numpy as np
from array_record.python import array_record_module

from fsqtok.data import corpus as corpus_lib
from fsqtok.data import lm_data
from fsqtok.train import workdir as workdir_lib

SPLITS = ("train", "val")


# How blocks go to shards (`_text_streams`), part of a store's name (`store_dir`): a
# store made by an older rule is never reused.
SHARD_LAYOUT = (f"documents (cut in segments of {corpus_lib.SEGMENT_BYTES} bytes) to shards "
                "when streamed, else blocks")


def store_dir(root: str, **made_from: Any) -> str:
  """``root/<digest>``: the store for windows made from ``made_from`` (JSON values: the
  tokenizer's `fingerprint`, the corpus config, the window length, the shard count)."""
  key = json.dumps(made_from, sort_keys=True, default=str)
  return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:16])


def _shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}"


def _check_local(directory: str) -> None:
  if not workdir_lib.is_local(directory):
    raise ValueError(
        f"lm.data.loader='grain' prepares its windows under {directory}, which must be a "
        f"filesystem every process mounts (a local disk, NFS, or gs:// through gcsfuse); "
        f"array_record files are not written to an object store directly.")


def _write_shard(path: str, stream: np.ndarray, num_bytes: int, *, seq_len: int,
                 pad_id: int, bos_id: int, vocab_size: int) -> None:
  """One shard's records, then its JSON (both through a temporary name)."""
  if stream.size and np.any(stream == pad_id):
    raise ValueError(f"The token stream contains the pad id {pad_id}: the tokenizer must "
                     f"never emit it for text.")
  rows, counts = np.zeros((0, seq_len + 1), np.int32), np.zeros(vocab_size, np.int64)
  if stream.size >= 2:
    w = lm_data.windows(stream, seq_len, pad_id, bos_id)
    rows = lm_data.training_rows(w)
    counts = np.bincount(w["targets"][w["weights"] > 0], minlength=vocab_size)
  for stale in glob.glob(glob.escape(path) + ".array_record.tmp*"):  # a killed run's
    os.unlink(stale)
  tmp = f"{path}.array_record.tmp{os.getpid()}"
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
      for row in rows:
        writer.write(row.astype("<i4").tobytes())
    finally:
      writer.close()
    with open(tmp, "rb") as f:  # on disk before the JSON that says the shard is whole
      os.fsync(f.fileno())
    os.replace(tmp, path + ".array_record")
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  workdir_lib.write_json(path + ".json", {
      "rows": int(rows.shape[0]), "bytes": int(num_bytes), "seq_len": seq_len,
      "scored_tokens": int(counts.sum()),
      "target_counts": {str(i): int(counts[i]) for i in np.flatnonzero(counts)}},
      all_processes=True)


def _stored_stream(directory: str, split: str, shard: int, num_shards: int, pad_id: int
                   ) -> tuple[np.ndarray, int]:
  """A prepared shard's token stream, exactly (the rows' first ``seq_len`` tokens, the
  last row's last one, the padding after the stream dropped), and its text's bytes."""
  base = os.path.join(directory, _shard_name(split, shard, num_shards))
  if not os.path.exists(base + ".json"):
    raise FileNotFoundError(f"{base}.json is missing: the store to cut again must be "
                            f"prepared whole, with the same number of shards.")
  meta = workdir_lib.read_json(base + ".json")
  if not meta["rows"]:
    return np.zeros((0,), np.int32), meta["bytes"]
  rows = np.stack([_record_row(r) for r in _read_records(base + ".array_record")])
  stream = np.concatenate([rows[:, :-1].reshape(-1), rows[-1, -1:]])
  real = np.flatnonzero(stream != pad_id)  # a pad id is never a token of the text
  return stream[:real[-1] + 1], meta["bytes"]


def prepare(directory: str, tok: lm_data.TokenizerLike,
            splits: dict[str, Iterable[str]] | None, *, seq_len: int, num_shards: int,
            process_index: int = 0, process_count: int = 1, progress: bool = True,
            from_store: str | None = None) -> list[tuple[str, int]]:
  """Writes this process's shards of every split (``{"train": blocks, "val": blocks}``)
  that are not there yet, and returns them (``(split, shard)``). Each process tokenizes
  only its own shards (those s with s mod ``process_count`` = ``process_index``) and, for
  a corpus streamed by documents (`_text_streams`), reads only their documents; otherwise
  it passes over all blocks and keeps its own. Its memory holds 1 / ``process_count`` of
  the text at most. ``from_store``: a store of the same text, tokenizer and shards with
  other windows; its shards' token streams are cut again (the same files as tokenizing
  the text, which is then not read: ``splits`` may be None)."""
  _check_local(directory)
  if num_shards < process_count:
    raise ValueError(f"lm.data.shards={num_shards} gives some of the {process_count} "
                     f"processes no data: use at least {process_count} shards.")
  os.makedirs(directory, exist_ok=True)
  mine = [s for s in range(num_shards) if s % process_count == process_index]
  written = []
  for split in SPLITS:
    todo = [s for s in mine if not os.path.exists(
        os.path.join(directory, _shard_name(split, s, num_shards) + ".json"))]
    if not todo:
      continue
    if from_store is None:
      streams = _text_streams(tok, splits[split], todo, num_shards)
    else:
      streams = ((s, *_stored_stream(from_store, split, s, num_shards, tok.pad_id))
                 for s in todo)
    bar = _progress(len(todo), f"{'cutting' if from_store else 'tokenizing'} {split} shards",
                    progress)
    for s, stream, num_bytes in streams:
      _write_shard(os.path.join(directory, _shard_name(split, s, num_shards)), stream,
                   num_bytes, seq_len=seq_len, pad_id=tok.pad_id, bos_id=tok.bos_id,
                   vocab_size=tok.vocab_size)
      written.append((split, s))
      bar.update(1)
    bar.close()
  return written


def _text_streams(tok, blocks: Iterable[str], shards: list[int], num_shards: int
                  ) -> Iterator[tuple[int, np.ndarray, int]]:
  """``(shard, token stream, bytes)`` of ``shards``: a stream that knows its documents
  gives each shard its share of them (`corpus.BlockStream.shares`), and only the
  documents of ``shards`` are read, each once; otherwise block k goes to shard k mod
  ``num_shards`` (one pass over the blocks, only those of ``shards`` kept)."""
  if isinstance(blocks, corpus_lib.BlockStream) and blocks.by_documents():
    for s, part in blocks.shares(shards, num_shards):
      yield s, lm_data.token_stream(tok, part), sum(len(b.encode("utf-8")) for b in part)
    return
  parts = {s: [] for s in shards}
  nbytes = dict.fromkeys(shards, 0)
  for k, block in enumerate(blocks):
    if k % num_shards in parts:
      parts[k % num_shards].append(block)
      nbytes[k % num_shards] += len(block.encode("utf-8"))
  for s in shards:
    yield s, lm_data.token_stream(tok, parts[s]), nbytes[s]


def _progress(total: int, what: str, enabled: bool):
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, desc=what, disable=not enabled or total < 2, leave=False)


def _read_records(path: str) -> Iterator[bytes]:
  """The records of an array_record file, in order (the file closed after the last)."""
  reader = array_record_module.ArrayRecordReader(path)
  try:
    yield from reader.read_all()
  finally:
    reader.close()


def _record_row(record: bytes) -> np.ndarray:
  return np.frombuffer(record, "<i4").astype(np.int32)


def windows_of(rows_NxL: np.ndarray, pad_id: int, bos_id: int) -> dict[str, np.ndarray]:
  """Token rows ``[N, seq_len + 1]`` as `lm_data.windows`' fields (all rows at once)."""
  targets = rows_NxL[:, 1:]
  return {"inputs": rows_NxL[:, :-1], "targets": targets,
          "weights": ((targets != pad_id) & (targets != bos_id)).astype(np.float32),
          "valid": rows_NxL[:, :-1] != pad_id}


class _RecordRow(grain.MapTransform):

  def map(self, element: bytes) -> np.ndarray:
    return _record_row(element)


class _RowsToWindows(grain.MapTransform):

  def __init__(self, pad_id: int, bos_id: int):
    self.pad_id, self.bos_id = pad_id, bos_id

  def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
    return windows_of(element, self.pad_id, self.bos_id)


@dataclasses.dataclass(frozen=True)
class Split:
  """One prepared split: its shards' paths and statistics (the same on every process)."""

  paths: tuple[str, ...]
  rows: tuple[int, ...]
  num_bytes: int
  scored_tokens: int
  target_counts: dict[int, int]  # id -> how often it is a scored target
  seq_len: int
  pad_id: int
  bos_id: int

  def token_counts(self, vocab_size: int) -> np.ndarray:
    """How often each id is a scored target."""
    out = np.zeros(vocab_size, np.int64)
    for i, c in self.target_counts.items():
      out[i] = c
    return out

  def source(self) -> grain.ArrayRecordDataSource:
    """Every window of the split as one random-access Grain source (records: bytes;
    `record_row` makes each its tokens, `rows_to_windows` a batch of them windows)."""
    return grain.ArrayRecordDataSource(list(self.paths))

  @staticmethod
  def record_row() -> grain.MapTransform:
    """A record -> its ``seq_len + 1`` tokens."""
    return _RecordRow()

  def rows_to_windows(self) -> grain.MapTransform:
    """A batch of token rows -> windows (`windows_of`: vectorized over the batch)."""
    return _RowsToWindows(self.pad_id, self.bos_id)

  def _records(self, shard: int) -> Iterator[bytes]:
    return _read_records(self.paths[shard]) if self.rows[shard] else iter(())

  def local_rows(self, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[np.ndarray]:
    """The ``[rows, seq_len + 1]`` token rows of this process's shards (those s with
    s mod ``process_count`` = ``process_index``), one array a shard, read as they are
    used."""
    for s in range(len(self.paths)):
      if s % process_count == process_index and self.rows[s]:
        yield np.stack([_record_row(r) for r in self._records(s)])

  def local_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """This process's shards' windows, in order, in batches of ``batch_size /
    process_count`` rows; every process yields the same number of batches (the last ones
    padded with zero-weight rows), so together they are global batches for evaluation."""
    per_process = batch_size // process_count
    if per_process * process_count != batch_size or per_process < 1:
      raise ValueError(f"The evaluation batch size {batch_size} does not divide among "
                       f"{process_count} processes: use a multiple of {process_count}.")
    mine = [s for s in range(len(self.paths)) if s % process_count == process_index]
    most = max(sum(self.rows[s] for s in range(len(self.paths)) if s % process_count == p)
               for p in range(process_count))
    num_batches = -(-most // per_process)
    padding = np.full(self.seq_len + 1, self.pad_id, np.int32)  # a row of no tokens
    pending: list[np.ndarray] = []
    made = 0
    for s in mine:
      for record in self._records(s):
        pending.append(_record_row(record))
        if len(pending) == per_process:
          yield windows_of(np.stack(pending), self.pad_id, self.bos_id)
          pending, made = [], made + 1
    while made < num_batches:
      pending += [padding] * (per_process - len(pending))
      yield windows_of(np.stack(pending), self.pad_id, self.bos_id)
      pending, made = [], made + 1


def open_split(directory: str, split: str, num_shards: int, *, pad_id: int, bos_id: int
               ) -> Split:
  """A prepared split (every shard's JSON must be there: after `prepare` on every
  process, and a barrier)."""
  paths, rows, nbytes, scored, seq_len = [], [], 0, 0, 0
  counts: dict[int, int] = {}
  for s in range(num_shards):
    base = os.path.join(directory, _shard_name(split, s, num_shards))
    if not os.path.exists(base + ".json"):
      raise FileNotFoundError(f"{base}.json is missing: shard {s} of the {split} windows "
                              f"was not prepared (did every process run `prepare`?).")
    meta = workdir_lib.read_json(base + ".json")
    paths.append(base + ".array_record")
    rows.append(meta["rows"])
    nbytes += meta["bytes"]
    scored += meta["scored_tokens"]
    seq_len = meta["seq_len"]
    for i, c in meta["target_counts"].items():
      counts[int(i)] = counts.get(int(i), 0) + c
  if not sum(rows):
    raise ValueError(f"The {split} windows are empty: add text to the corpus (for the "
                     f"validation side, or raise data.val_fraction).")
  return Split(tuple(paths), tuple(rows), nbytes, scored, counts, seq_len, pad_id, bos_id)
