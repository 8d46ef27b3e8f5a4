import dataclasses
import json
import tempfile

import ml_collections
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings, strategies as st

from fsqtok.data import corpus


def test_builtin_corpus_is_english_docs_deduplicated_and_stable():
  docs = corpus.load_documents("builtin")
  assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000
  assert len(set(docs)) == len(docs)
  assert any("for" in d and "loop" in d for d in docs)
  assert corpus.load_documents("builtin") == docs


def test_split_is_deterministic_disjoint_and_complete():
  docs = corpus.load_documents("builtin")[:400]
  train, val = corpus.split_documents(docs, val_fraction=0.1, seed=0, block_chars=512)
  assert (train, val) == corpus.split_documents(docs, val_fraction=0.1, seed=0, block_chars=512)
  assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
  assert sorted(train + val) == sorted(b for d in docs for b in corpus.split_blocks(d, 512))
  assert not set(train) & set(val)
  other = corpus.split_documents(docs, val_fraction=0.1, seed=1, block_chars=512)
  assert other[1] != val


def test_one_long_document_still_gets_a_validation_split():
  doc = "".join(f"line {i} of a single long file\n" for i in range(5000))
  train, val = corpus.split_documents([doc], val_fraction=0.1, seed=0, block_chars=1024)
  assert val and train
  assert all(b.endswith("\n") for b in train + val)


def test_sample_is_seeded_sized_and_independent_of_order():
  docs = corpus.load_documents("builtin")[:600]
  train, _ = corpus.split_documents(docs, val_fraction=0.1, seed=0, block_chars=512)
  total = sum(map(len, train))
  sample = corpus.sample_blocks(train, total // 4, seed=0)
  assert sample == corpus.sample_blocks(train, total // 4, seed=0)
  assert 0.2 < sum(map(len, sample)) / total < 0.3
  assert set(sample) <= set(train) and sample == [b for b in train if b in set(sample)]
  assert set(corpus.sample_blocks(train[::-1], total // 4, seed=0)) == set(sample)
  assert set(corpus.sample_blocks(train, total // 4, seed=1)) != set(sample)
  # Not the split's hash: training blocks are sampled at the same rate as any other.
  assert corpus.sample_blocks(train, 0, seed=0) == train == corpus.sample_blocks(train, total, 0)


def test_split_blocks_reassemble():
  text = "abc\ndef\n" * 300 + "no newline at the end"
  assert "".join(corpus.split_blocks(text, 100)) == text
  assert "".join(corpus.split_blocks("x" * 1000, 100)) == "x" * 1000


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.sampled_from("ab\n\u00e9\u4e2d\U0001f600"), max_size=400),
       block_chars=st.integers(1, 40), read_bytes=st.integers(1, 64))
def test_read_blocks_streams_exactly_the_blocks_of_the_whole_text(text, block_chars,
                                                                  read_bytes, tmp_path_factory):
  path = tmp_path_factory.mktemp("stream") / "t.txt"
  path.write_bytes(text.encode("utf-8"))
  with pytest.MonkeyPatch.context() as m:
    m.setattr(corpus, "READ_BYTES", read_bytes)  # cuts inside characters and blocks
    assert list(corpus.read_blocks(str(path), block_chars)) == corpus.split_blocks(
        text, block_chars)


def test_stream_split_is_the_split_read_from_disk_and_samples_alike(doc_files):
  spec = f"files:{doc_files}/*.txt"
  docs = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))]
  train, val = corpus.split_documents(docs, val_fraction=0.1, seed=3, block_chars=512)
  s_train, s_val = corpus.stream_split(spec, val_fraction=0.1, seed=3, block_chars=512)
  assert isinstance(s_train, corpus.BlockStream)
  assert list(s_train) == train and list(s_val) == val and list(s_train) == train  # re-read
  assert s_train.chars == corpus.total_chars(train)
  config = ml_collections.ConfigDict({"source": spec, "tfds_data_dir": "", "text_key": "text",
                                      "val_fraction": 0.1, "split_seed": 3,
                                      "block_chars": 512})
  streamed = corpus.load_split(config, stream=True)  # a config's split, streamed
  assert isinstance(streamed[0], corpus.BlockStream)
  assert list(streamed[0]) == train and list(streamed[1]) == val
  sample = corpus.sample_blocks(s_train, s_train.chars // 3, seed=0)
  assert isinstance(sample, corpus.BlockStream)
  assert list(sample) == corpus.sample_blocks(train, s_train.chars // 3, seed=0)
  chunks = list(corpus.chunk_blocks(s_train, 5000))
  assert sum(chunks, []) == train and all(sum(map(len, c)) >= 5000 for c in chunks[:-1])
  b_train, _ = corpus.stream_split("builtin", val_fraction=0.1, seed=3, block_chars=512)
  assert list(b_train)[:5] == corpus.split_documents(
      corpus.load_documents("builtin"), val_fraction=0.1, seed=3, block_chars=512)[0][:5]


def test_a_share_of_a_stream_reads_only_its_own_documents(doc_files, monkeypatch):
  """Share i of n: the blocks of documents d with d mod n = i, in order, reading no other
  file; the shares hold every block once and their samples make the corpus's sample."""
  spec, kw = f"files:{doc_files}/*.txt", dict(val_fraction=0.1, seed=3, block_chars=512)
  paths = sorted(str(p) for p in doc_files.glob("*.txt"))
  docs = [open(p, encoding="utf-8").read() for p in paths]
  train, _ = corpus.stream_split(spec, **kw)
  assert train.documents == len(docs) == 200 and train.by_documents()
  read, real_read = [], corpus.read_blocks
  monkeypatch.setattr(corpus, "read_blocks", lambda path, *a, **k: read.append(path) or
                      real_read(path, *a, **k))
  shares = [list(train.share(i, 3)) for i in range(3)]
  assert read == paths[0::3] + paths[1::3] + paths[2::3]  # each file once, by its share
  for i in range(3):
    assert shares[i] == corpus.split_documents(docs[i::3], **kw)[0]
  assert sorted(sum(shares, [])) == sorted(train)
  total = train.chars
  sample = corpus.sample_blocks(train, total // 4, seed=1)
  parts = [corpus.sample_blocks(train.share(i, 3), total // 4, seed=1, total=total)
           for i in range(3)]
  assert sorted(sum(map(list, parts), [])) == sorted(sample)
  few = corpus.BlockStream(lambda: iter(["a", "b", "c", "d", "e"]))  # no documents known
  assert not few.by_documents() and list(few.share(1, 2)) == ["b", "d"]
  with pytest.raises(ValueError, match="does not know its own"):
    list(few.shares([0, 1], 2))
  with pytest.raises(ValueError, match="share 3 of 3"):
    train.share(3, 3)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5), count=st.integers(1, 9))
def test_shares_of_few_documents_read_one_document_each(sizes, count):
  """Fewer documents than shares: each share reads one document (d = index mod D) and
  the shares that read it take its blocks in turn; with as many or more, each reads only
  its documents d = index mod count. Either way every block is in exactly one share, and
  `shares` gives several shares reading each of their documents once."""
  docs = [[f"{d}.{j}" for j in range(n)] for d, n in enumerate(sizes)]
  read = []
  stream = corpus.BlockStream.of_documents(
      len(docs), lambda ids: (b for i in ids if not read.append(i) for b in docs[i]))
  shares = []
  for index in range(count):
    read.clear()
    shares.append(list(stream.share(index, count)))
    if len(docs) >= count:
      assert read == list(range(index, len(docs), count))
    else:
      assert read == [index % len(docs)]
      sharers = len(range(index % len(docs), count, len(docs)))
      assert shares[-1] == docs[index % len(docs)][index // len(docs)::sharers]
  assert sorted(sum(shares, [])) == sorted(sum(docs, []))
  # several shares at once (a token store's shards): the same blocks, each document read once
  read.clear()
  mine = list(range(count))[::2]
  assert dict(stream.shares(mine, count)) == {i: shares[i] for i in mine}
  assert sorted(read) == sorted({d for i in mine for d in (
      range(i, len(docs), count) if len(docs) >= count else [i % len(docs)])})


@settings(max_examples=80, deadline=None)
@given(text=st.text(st.sampled_from("ab\n\u00e9\U0001f600"), max_size=300),
       segment_bytes=st.integers(1, 48), block_chars=st.integers(1, 30))
def test_segments_cover_a_document_cut_after_line_ends_and_read_alike(
    text, segment_bytes, block_chars, tmp_path_factory):
  """Segments cover the document in order, none empty, each but the last ending with a
  line end, each after the first starting at or after its k * segment_bytes; a file's
  segments read from disk give `document_blocks`, the loaded text's blocks."""
  raw = text.encode("utf-8")
  bounds = corpus.segment_bounds(len(raw), lambda p: raw.find(b"\n", p), segment_bytes)
  assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]
  assert (bounds[0][0], bounds[-1][1]) == (0, len(raw)) if raw else bounds == []
  assert all(a < b for a, b in bounds)
  assert all(raw[b - 1:b] == b"\n" for _, b in bounds[:-1])
  assert all(a >= k * segment_bytes for k, (a, _) in enumerate(bounds))
  blocks = corpus.document_blocks(text, block_chars, segment_bytes)
  assert "".join(blocks) == text
  assert blocks == [b for a, e in bounds
                    for b in corpus.split_blocks(raw[a:e].decode("utf-8"), block_chars)]
  path = tmp_path_factory.mktemp("segments") / "t.txt"
  path.write_bytes(raw)
  segments = corpus.file_segments(str(path), segment_bytes)
  assert segments == bounds
  assert [b for seg in segments for b in corpus.read_blocks(
      str(path), block_chars, segment=seg)] == blocks


def test_a_share_of_one_large_file_reads_only_its_own_segments(tmp_path, monkeypatch):
  """One file of ~30 segments: each share reads only its own byte ranges (bytes that are
  not UTF-8 in the others' segments are never decoded), and the shares are the split's
  blocks of the loaded text, cut into the same segments."""
  lines = [f"line {i}: {'word ' * (i % 7)}\n" for i in range(600)]
  path = tmp_path / "one.txt"
  path.write_text("".join(lines), encoding="utf-8")
  kw = dict(val_fraction=0.1, seed=3, block_chars=64, segment_bytes=512)
  train, _ = corpus.stream_split(f"files:{path}", **kw)
  segments = corpus.file_segments(str(path), 512)
  assert train.documents == len(segments) >= 30 and train.by_documents()
  expected, _ = corpus.split_documents([path.read_text(encoding="utf-8")], **kw)
  assert list(train) == expected
  read, real_read = [], corpus.read_blocks
  monkeypatch.setattr(corpus, "read_blocks", lambda path, *a, segment: read.append(
      segment) or real_read(path, *a, segment=segment))
  shares = [list(train.share(i, 3)) for i in range(3)]
  assert read == segments[0::3] + segments[1::3] + segments[2::3]
  assert sorted(sum(shares, [])) == sorted(expected)
  monkeypatch.setattr(corpus, "read_blocks", real_read)
  # share 0's segments stay readable when every other segment is damaged
  data = bytearray(path.read_bytes())
  for start, end in segments[1::3] + segments[2::3]:
    data[start] = 0xFF
  path.write_bytes(bytes(data))
  assert list(train.share(0, 3)) == shares[0]
  with pytest.raises(ValueError, match=rf"not UTF-8 text \(byte {segments[1][0]}:"):
    list(train.share(1, 3))
  # skip_document leaves the whole file out, checking its bytes once, not once a segment
  checks, real_bad = [], corpus._bad_bytes  # pylint: disable=protected-access
  monkeypatch.setattr(corpus, "_bad_bytes", lambda p: checks.append(p) or real_bad(p))
  skipped, _ = corpus.stream_split(f"files:{path}", **kw, invalid_utf8="skip_document")
  assert list(skipped) == [] and len(checks) == 1


def test_streamed_text_that_is_not_utf8_is_an_error_naming_file_and_byte(tmp_path):
  for name, tail in (("a.txt", "caf\u00e9"), ("b.txt", "caf\u00e9 au lait")):
    (tmp_path / name).write_bytes(b"fine text\n" * 3 + tail.encode("latin-1"))
    train, _ = corpus.stream_split(f"files:{tmp_path}/{name}", val_fraction=0.0, seed=0,
                                   block_chars=8)
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(byte 33: .*iconv"):
      list(train)
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(byte 33: .*iconv"):
      corpus.load_documents(f"files:{tmp_path}/{name}", data_dir=str(tmp_path / "tfds"))


def test_invalid_utf8_replace_or_skip_as_asked_with_counts(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"good text\n" * 3 + "caf\u00e9 ok".encode("latin-1"))
  (tmp_path / "b.txt").write_bytes("all fine \u00e9\n".encode("utf-8"))
  (tmp_path / "c.bin").write_bytes(b"\xff\xfe\x00\x81 binary" * 3)
  spec, data_dir = f"files:{tmp_path}/*", str(tmp_path / "tfds")
  kw = dict(val_fraction=0.0, seed=0, block_chars=8)
  replaced = corpus.load_documents(spec, data_dir=data_dir, invalid_utf8="replace")
  assert replaced[0] == "good text\n" * 3 + "caf\ufffd ok" and replaced[1] == "all fine \u00e9\n"
  assert "".join(corpus.stream_split(spec, invalid_utf8="replace", **kw)[0]) == "".join(replaced)
  assert corpus.invalid_utf8_counts(spec, "replace") == {
      "policy": "replace", "replaced_bytes": 1 + 3 * 3, "skipped_documents": 0,
      "skipped_bytes": 0}
  kept = corpus.load_documents(spec, data_dir=data_dir, invalid_utf8="skip_document")
  assert kept == ["all fine \u00e9\n"]
  assert "".join(corpus.stream_split(spec, invalid_utf8="skip_document", **kw)[0]) == kept[0]
  assert corpus.invalid_utf8_counts(spec, "skip_document") == {
      "policy": "skip_document", "replaced_bytes": 0, "skipped_documents": 2,
      "skipped_bytes": 37 + 11 * 3}
  assert corpus.invalid_utf8_counts(spec, "error")["replaced_bytes"] == 0
  with pytest.raises(ValueError, match="invalid_utf8='guess' is unknown"):
    corpus.load_documents(spec, data_dir=data_dir, invalid_utf8="guess")


def test_nul_bytes_long_lines_empty_files_and_directories_as_documented(tmp_path):
  """NUL is text like any other character (kept, and the tokenizer round-trips it); a line
  of any length is read (streamed in blocks of at most block_chars); empty files are left
  out; directories a glob matches are passed over, and a glob of directories only is the
  "matches no file" error."""
  from fsqtok.tokenizer import unigram  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  d = tmp_path / "corpus"
  (d / "chapter.txt").mkdir(parents=True)  # a directory the glob matches
  (d / "chapter.txt" / "inner.txt").write_text("not read: *.txt is not recursive")
  (d / "a.txt").write_text("hello world\x00with a NUL\nsecond line\n")
  (d / "b.txt").write_text("")
  (d / "c.txt").write_text("x" * 100_000 + " and a tail of words\n")
  (d / "d.txt").write_text("plain text, said twice. " * 20)
  spec, data_dir = f"files:{d}/*.txt", str(tmp_path / "tfds")
  expected = [(d / n).read_text() for n in ("a.txt", "c.txt", "d.txt")]
  docs = corpus.load_documents(spec, data_dir=data_dir)
  assert docs == expected and "\x00" in docs[0] and len(docs[1]) == 100_021
  train, val = corpus.stream_split(spec, val_fraction=0.0, seed=0, block_chars=4096)
  blocks = list(train)
  assert "".join(blocks) == "".join(expected) and not list(val)
  assert max(map(len, blocks)) <= 4096
  vocab = unigram.train_unigram(unigram.count_pieces(docs), 40, seed_size=2000)
  tok = Tokenizer(list(vocab.strings), scores=list(vocab.scores))
  for doc in docs:
    assert tok.decode(tok.encode(doc)) == doc
  recursive = corpus.load_documents(f"files:{d}/**/*.txt", data_dir=data_dir)
  assert recursive == [*expected[:2], "not read: *.txt is not recursive", expected[2]]
  with pytest.raises(FileNotFoundError, match="matches no file"):
    corpus.load_documents(f"files:{d}/chapter*", data_dir=data_dir)
  (d / "a.txt").write_text("")
  (d / "c.txt").write_text("")
  (d / "d.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    corpus.load_documents(spec, data_dir=data_dir)


def test_files_source_goes_through_the_tfds_builder(text_files, tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  scratch = tmp_path / "scratch"  # the process's temporary directory, for this test
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  docs = corpus.load_documents(f"files:{text_files}/*.txt", data_dir=str(data_dir))
  assert not list(scratch.iterdir())  # preparing left nothing behind in it
  assert len(docs) == 6 and all("First Citizen" in d for d in docs)
  assert docs == [p.read_text() for p in sorted(text_files.glob("*.txt"))]
  assert (data_dir / "files_text").is_dir()  # prepared, cached copy
  # Editing a file prepares a fresh copy rather than reading a stale one.
  (text_files / "part0.txt").write_text("changed\n")
  assert corpus.load_documents(f"files:{text_files}/*.txt", data_dir=str(data_dir))[0] == "changed\n"


@dataclasses.dataclass
class _Cfg(tfds.core.BuilderConfig):
  pass


class LocalTinyText(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset built by the test itself (no hub is reachable here)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "label": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(["alpha beta", "gamma delta", ""]),
            "test": self._generate_examples(["omega"])}

  def _generate_examples(self, texts):
    for i, t in enumerate(texts):
      yield i, {"text": t, "label": str(i)}


def test_tfds_source_reads_a_registered_dataset(tmp_path, monkeypatch):
  LocalTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  docs = corpus.load_documents("tfds:local_tiny_text", data_dir=str(tmp_path))
  assert sorted(docs) == ["alpha beta", "gamma delta"]  # empty documents are dropped
  assert corpus.load_documents("tfds:local_tiny_text:test", data_dir=str(tmp_path)) == ["omega"]
  with pytest.raises(ValueError, match="no feature 'body'"):
    corpus.load_documents("tfds:local_tiny_text", data_dir=str(tmp_path), text_key="body")
  # streamed a document at a time: the blocks of the split of the documents loaded whole
  kw = dict(val_fraction=0.3, seed=1, block_chars=4)
  train, val = corpus.stream_split("tfds:local_tiny_text", data_dir=str(tmp_path), **kw)
  want = corpus.split_documents(docs, **kw)
  assert isinstance(train, corpus.BlockStream)
  assert train.chars + val.chars == sum(map(len, docs)) and train.chars and val.chars
  assert (list(train), list(val)) == want and list(train) == want[0]  # read again
  with pytest.raises(ValueError, match="TFDS does not know"):
    corpus.stream_split("tfds:surely_not_a_dataset_xyz", data_dir=str(tmp_path), **kw)
  # a share reads only its own records: the others are never fetched from the source
  source, fetched = corpus._tfds_source("local_tiny_text", str(tmp_path)), []

  class Watched:
    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      fetched.append(i)
      return source[i]

  monkeypatch.setattr(corpus, "_tfds_source", lambda arg, data_dir: Watched())
  train, _ = corpus.stream_split("tfds:local_tiny_text", data_dir=str(tmp_path), **kw)
  fetched.clear()
  text = corpus._as_text(source[1]["text"])
  own = [b for b in corpus.split_blocks(text, 4) if corpus._unit_hash(b, "1") >= 0.3]
  assert list(train.share(1, 3)) == own and fetched == [1]


@pytest.mark.parametrize("spec, error, message", [
    ("tfds:surely_not_a_dataset_xyz", ValueError, "TFDS does not know"),
    ("files:/nonexistent/dir/*.txt", FileNotFoundError, "matches no file"),
    ("words:foo", ValueError, "Unknown corpus"),
    ("builtin:extra", ValueError, "takes no argument"),
    ("files:", ValueError, "needs a glob"),
])
def test_bad_sources_name_the_problem(spec, error, message, tmp_path):
  with pytest.raises(error, match=message):
    corpus.load_documents(spec, data_dir=str(tmp_path))


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    corpus.load_documents(f"files:{tmp_path}/*.txt", data_dir=str(tmp_path / "tfds"))


def test_too_small_to_split_is_a_clear_error():
  with pytest.raises(ValueError, match="too small to split"):
    corpus.split_documents(["tiny"], val_fraction=0.05, seed=0, block_chars=100)


@pytest.mark.parametrize("block_chars", [0, -5])
def test_a_block_size_below_one_is_a_clear_error_not_an_endless_loop(block_chars, tmp_path):
  (tmp_path / "a.txt").write_text("one line\nanother line\n" * 20)
  with pytest.raises(ValueError, match="data.block_chars must be at least 1"):
    corpus.split_documents(["some text\n" * 50], val_fraction=0.05, seed=0,
                           block_chars=block_chars)
  with pytest.raises(ValueError, match="data.block_chars must be at least 1"):
    list(corpus.read_blocks(str(tmp_path / "a.txt"), block_chars))


def test_the_builtin_corpus_is_read_once_and_a_damaged_cache_is_made_again(tmp_path,
                                                                          monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  reads = []
  monkeypatch.setattr(corpus, "_read_builtin_documents",
                      lambda stdlib: reads.append(stdlib) or ["doc one", "doc two"])
  corpus._builtin_documents.cache_clear()
  try:
    assert corpus._builtin_documents() == ("doc one", "doc two")
    (cache,) = (tmp_path / "fsqtok").iterdir()
    corpus._builtin_documents.cache_clear()
    assert corpus._builtin_documents() == ("doc one", "doc two") and len(reads) == 1
    cache.write_text('["doc one", "do')  # cut short
    corpus._builtin_documents.cache_clear()
    assert corpus._builtin_documents() == ("doc one", "doc two") and len(reads) == 2
    assert json.loads(cache.read_text()) == ["doc one", "doc two"]
  finally:
    corpus._builtin_documents.cache_clear()


def test_content_key_changes_when_the_files_change(tmp_path):
  (tmp_path / "a.txt").write_text("one")
  spec = f"files:{tmp_path}/*.txt"
  first = corpus.content_key(spec)
  assert first.startswith(spec) and corpus.content_key(spec) == first
  (tmp_path / "a.txt").write_text("one, edited")
  edited = corpus.content_key(spec)
  (tmp_path / "b.txt").write_text("two")
  added = corpus.content_key(spec)
  assert len({first, edited, added}) == 3
  assert corpus.content_key("builtin") == "builtin"
