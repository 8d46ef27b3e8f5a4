"""The token store: windows prepared once as array_record shards that do not depend on
the number of processes, each process tokenizing and evaluating its own shards, Grain
drawing training windows from them, and a preparation stopped part-way finished later."""
import collections
import os

import numpy as np
import pytest

from fsqtok.data import corpus
from fsqtok.data import grain_loader
from fsqtok.data import lm_data
from fsqtok.data import token_store


class _ByteTok:
  vocab_size, pad_id, bos_id, eos_id = 259, 256, 257, 258

  def encode(self, text):
    return list(text.encode("utf-8"))


TRAIN = [f"block {k}: " + "wxyz" * (k % 5) + "é" * (k % 3) for k in range(23)]
VAL = ["held out one", "held out two", "three"]
SEQ_LEN, SHARDS = 8, 4


def _prepare(directory, index=0, count=1, tok=_ByteTok()):
  return token_store.prepare(str(directory), tok, {"train": TRAIN, "val": VAL},
                             seq_len=SEQ_LEN, num_shards=SHARDS, process_index=index,
                             process_count=count, progress=False)


def _open(directory, split="train"):
  return token_store.open_split(str(directory), split, SHARDS, pad_id=256, bos_id=257)


def _all_windows(split):
  source = split.source()
  rows = np.stack([split.record_row().map(source[i]) for i in range(len(source))])
  windows = split.rows_to_windows().map(rows)
  return [{k: v[i] for k, v in windows.items()} for i in range(len(rows))]


def test_shards_hold_the_windows_of_their_blocks_with_their_bytes_and_counts(tmp_path):
  assert sorted(_prepare(tmp_path)) == [(s, k) for s in ("train", "val") for k in range(4)]
  split = _open(tmp_path)
  want = [lm_data.windows(lm_data.token_stream(_ByteTok(), TRAIN[k::SHARDS]), SEQ_LEN, 256, 257)
          for k in range(SHARDS)]
  assert split.rows == tuple(w["inputs"].shape[0] for w in want)
  got = _all_windows(split)
  for key in ("inputs", "targets", "weights", "valid"):  # exactly `lm_data.windows`
    np.testing.assert_array_equal(np.stack([g[key] for g in got]),
                                  np.concatenate([w[key] for w in want]))
  assert split.num_bytes == sum(len(t.encode()) for t in TRAIN)
  scored = np.concatenate([w["targets"][w["weights"] > 0] for w in want])
  np.testing.assert_array_equal(split.token_counts(259), np.bincount(scored, minlength=259))
  assert split.scored_tokens == scored.size


def test_the_shards_do_not_depend_on_the_number_of_processes(tmp_path):
  _prepare(tmp_path / "one")
  written = [_prepare(tmp_path / "two", index, 2) for index in range(2)]
  assert written == [[(s, k) for s in ("train", "val") for k in (0, 2)],  # each its own
                     [(s, k) for s in ("train", "val") for k in (1, 3)]]
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 16
  for name in names:
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def _documents(docs):
  return corpus.BlockStream.of_documents(len(docs), lambda ids: (b for i in ids for b in docs[i]))


def test_a_corpus_streamed_by_documents_goes_to_shards_a_document_each(tmp_path):
  """Document d to shard d mod shards, each process reading only its shards' documents;
  the same files whatever the number of processes. Fewer documents than shards: blocks
  by position, as for a list."""
  docs = [TRAIN[k:k + 3] for k in range(0, len(TRAIN), 3)]  # 8 documents of 1-3 blocks
  kw = dict(seq_len=SEQ_LEN, num_shards=SHARDS, progress=False)
  splits = {"train": _documents(docs), "val": _documents([VAL])}
  token_store.prepare(str(tmp_path / "one"), _ByteTok(), splits, **kw)
  for index in range(2):
    read = []
    watched = corpus.BlockStream.of_documents(
        len(docs), lambda ids: (b for i in ids if not read.append(i) for b in docs[i]))
    token_store.prepare(str(tmp_path / "two"), _ByteTok(), {"train": watched, "val": splits["val"]},
                        process_index=index, process_count=2, **kw)
    assert sorted(read) == [d for d in range(len(docs)) if d % SHARDS % 2 == index]
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 16
  for name in names:
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
  split = _open(tmp_path / "one")
  want = [lm_data.windows(lm_data.token_stream(_ByteTok(), sum(docs[s::SHARDS], [])), SEQ_LEN,
                          256, 257) for s in range(SHARDS)]
  np.testing.assert_array_equal(np.stack([g["inputs"] for g in _all_windows(split)]),
                                np.concatenate([w["inputs"] for w in want]))
  assert split.num_bytes == sum(len(t.encode()) for t in TRAIN)
  # the validation split is one document (fewer than the shards): blocks by position
  _prepare(tmp_path / "lists")
  for s in range(SHARDS):
    name = f"val-{s:05d}-of-{SHARDS:05d}.array_record"
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "lists" / name).read_bytes()


@pytest.mark.parametrize("seq_len", [3, 8, 40])
def test_a_store_cut_again_from_another_is_the_store_of_the_text(tmp_path, seq_len):
  """Windows of another length made from a store's token streams (shorter, the same,
  longer than the text's shards) are the files tokenizing the text gives, byte for byte."""
  _prepare(tmp_path / "source")
  kw = dict(seq_len=seq_len, num_shards=SHARDS, progress=False)
  token_store.prepare(str(tmp_path / "text"), _ByteTok(), {"train": TRAIN, "val": VAL}, **kw)
  for index in range(2):  # each of two processes cuts its own shards
    token_store.prepare(str(tmp_path / "cut"), _ByteTok(), None, process_index=index,
                        process_count=2, from_store=str(tmp_path / "source"), **kw)
  names = sorted(os.listdir(tmp_path / "text"))
  assert names == sorted(os.listdir(tmp_path / "cut")) and len(names) == 16
  for name in names:
    assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "text" / name).read_bytes()
  with pytest.raises(FileNotFoundError, match="same number of shards"):
    token_store.prepare(str(tmp_path / "bad"), _ByteTok(), None, seq_len=4, num_shards=2,
                        from_store=str(tmp_path / "source"), progress=False)


def test_each_process_evaluates_its_own_shards_and_together_every_window_once(tmp_path):
  _prepare(tmp_path)
  split = _open(tmp_path)
  whole = list(split.local_batches(4))
  parts = [list(split.local_batches(4, index, 2)) for index in range(2)]
  assert len(parts[0]) == len(parts[1])  # the same number of evaluation steps
  assert all(b["inputs"].shape == (2, SEQ_LEN) for p in parts for b in p)
  total = lambda batches: sum(float(b["weights"].sum()) for b in batches)
  assert total(parts[0]) + total(parts[1]) == total(whole) == split.scored_tokens
  rows = lambda batches: collections.Counter(
      tuple(r) for b in batches for r, w in zip(b["inputs"], b["weights"]) if w.any())
  assert rows(parts[0]) + rows(parts[1]) == rows(whole)  # each window once
  with pytest.raises(ValueError, match="does not divide among 3 processes"):
    next(split.local_batches(4, 0, 3))


def test_grain_draws_training_windows_from_the_store_and_resumes(tmp_path):
  _prepare(tmp_path)
  split = _open(tmp_path)
  make = lambda: grain_loader.GrainBatches(split.source(), 4, seed=0, name="windows",
                                           operations=[split.record_row()],
                                           batch_operations=[split.rows_to_windows()])
  loader = make()
  first = [next(loader) for _ in range(3)]
  assert first[0]["inputs"].shape == (4, SEQ_LEN) and first[0]["weights"].dtype == np.float32
  stored = {tuple(w["inputs"]) for w in _all_windows(split)}
  assert all(tuple(r) in stored for b in first for r in b["inputs"])
  saved = loader.get_state()
  want = [next(loader)["inputs"] for _ in range(2)]
  again = make()
  again.set_state(saved)
  np.testing.assert_array_equal(np.stack([next(again)["inputs"] for _ in range(2)]),
                                np.stack(want))


def test_a_preparation_stopped_part_way_is_finished_and_nothing_else_redone(tmp_path):
  _prepare(tmp_path)
  before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
  mtimes = {n: os.stat(tmp_path / n).st_mtime_ns for n in before}
  os.remove(tmp_path / "train-00002-of-00004.json")  # killed before its JSON was written
  # ... and while writing its records again (a partial file under a temporary name)
  (tmp_path / "train-00002-of-00004.array_record.tmp999999").write_bytes(b"partial")
  assert _prepare(tmp_path) == [("train", 2)]
  assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
  changed = {n for n in before if os.stat(tmp_path / n).st_mtime_ns != mtimes[n]}
  assert changed == {"train-00002-of-00004.array_record", "train-00002-of-00004.json"}


def test_stored_lm_data_matches_what_the_lm_phase_needs(tmp_path):
  data = lm_data.StoredLMData(str(tmp_path), _ByteTok(), (TRAIN, VAL), SEQ_LEN,
                              num_shards=SHARDS, progress=False)
  assert data.per_process and len(data.written) == 8
  assert data.train_bytes == sum(len(t.encode()) for t in TRAIN)
  assert data.val_bytes == sum(len(t.encode()) for t in VAL)
  assert data.train_bytes_per_token() == pytest.approx(
      data.train_bytes / data.token_counts(259).sum())
  assert next(data.train_batches(4, seed=0))["inputs"].shape == (4, SEQ_LEN)
  with pytest.raises(ValueError, match="loader='grain', not 'epochs'"):
    data.train_batches(4, seed=0, loader="epochs")
  again = lm_data.StoredLMData(str(tmp_path), _ByteTok(), (TRAIN, VAL), SEQ_LEN,
                               num_shards=SHARDS, progress=False)
  assert again.written == []  # prepared once


def test_bad_stores_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="use at least 5 shards"):
    _prepare(tmp_path, 0, 5)
  with pytest.raises(ValueError, match="filesystem every process mounts"):
    _prepare("gs://bucket/work/lm_data")

  class PadEmitter(_ByteTok):
    def encode(self, text):
      return [256]
  with pytest.raises(ValueError, match="contains the pad id 256"):
    _prepare(tmp_path / "pad", tok=PadEmitter())
  with pytest.raises(FileNotFoundError, match="did every process run"):
    _open(tmp_path / "nothing")
  assert token_store.store_dir("r", seq_len=8, shards=4) != token_store.store_dir(
      "r", seq_len=8, shards=5)
