"""The compiled search (`fsqtok.tokenizer.native_encode`) against the pure-Python reference: the
same runs, ids and offsets on any text, with or without phrases, whatever the cache."""
import pickle

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fsqtok.tokenizer import native_encode
from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer.tokenizer import Tokenizer

ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
# Where the pre-tokenizer's alternatives meet: contractions, the space before a word, odd
# spaces, numerals that are not digits, marks, other planes, typed special tokens.
TRICKY = st.lists(st.sampled_from(list("ab 1_\n\t\r.,'") + [":\n", ".\n\n", ",\n ", " ;\n\n\t",
    "re", "ll", "ve", "s", "t", "'d", "'", "  ", " '", "\u0301", "\u0903", "\x1c", "\x85",
    "\xa0", "\u2028", "\u3000", "\xb2", "\u2167", "\u00bd", "\u0660", "é", "日", "🙂",
    "\U00030000", "\U000e0041", "[PAD]", " of", " the", " them", " list"]),
    max_size=40).map("".join)
TEXTS = st.one_of(ANY_TEXT, TRICKY)

pytestmark = pytest.mark.skipif(not native_encode.available(), reason="numba missing")


@pytest.fixture(scope="module", params=["subwords", "phrases", "line_ends", "blank_lines"])
def pair(doc_files, request):
  """A unigram tokenizer (with 40 phrases, or none; "line_ends": with phrases, on runs
  whose punctuation keeps the newlines after it; "blank_lines": those runs with
  whitespace whole but for a last space), compiled and pure Python."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer import unigram  # pylint: disable=g-import-not-at-top
  texts = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))][:80]
  runs = request.param if request.param in pieces_lib.RUN_STYLES else "gpt2"
  vocab = unigram.train_unigram(unigram.count_pieces(texts, runs=runs), 600, seed_size=8_000)
  vocab = dataclasses.replace(vocab, runs=runs)
  if request.param != "subwords":
    vocab = unigram.add_phrases(vocab, texts, unigram.count_phrases(texts, 16), 40)
    assert vocab.phrases
  if runs != "gpt2":  # strings that only these runs hold
    assert any("\n" in s and s.strip() for s in vocab.strings)
  if runs == "blank_lines":  # the documents have runs only this style makes
    assert any(pieces_lib.split_runs(t, style=runs) != pieces_lib.split_runs(t, style="line_ends")
               for t in texts)
  native = Tokenizer(vocab.strings, scores=vocab.scores, phrases=vocab.phrases, runs=runs)
  reference = Tokenizer(vocab.strings, scores=vocab.scores, phrases=vocab.phrases, runs=runs)
  reference.native = False
  assert native.native
  return native, reference, texts


@given(TEXTS)
def test_same_runs_ids_and_offsets_as_the_reference(pair, text):
  native, reference, _ = pair
  assert native.split(text) == reference.split(text) == pieces_lib.split_runs(
      text, native.phrases, native.runs)
  for parse_special in (False, True):
    ids = native.encode(text, parse_special=parse_special)
    assert ids == reference.encode(text, parse_special=parse_special)
    assert native.encode_with_offsets(text, parse_special=parse_special) == \
        reference.encode_with_offsets(text, parse_special=parse_special)
  assert native.decode(ids) == text


@settings(max_examples=50)
@given(st.lists(TEXTS, max_size=6))
def test_a_batch_in_one_compiled_call_is_each_text_encoded(pair, texts):
  native, reference, _ = pair
  ids, spans, counts = native._native_encoder().encode_many(texts, offsets=True)  # pylint: disable=protected-access
  assert counts.tolist() == [len(reference.encode(t)) for t in texts]
  cut = np.cumsum(counts[:-1]) if len(texts) else []
  for text, row_ids, row_spans in zip(texts, np.split(ids, cut), np.split(spans, cut)):
    want_ids, want_spans = reference.encode_with_offsets(text)
    assert row_ids.tolist() == want_ids and list(map(tuple, row_spans.tolist())) == want_spans


def test_same_ids_on_documents_and_batches(pair):
  native, reference, texts = pair
  docs = texts[:40]
  assert [native.encode(d) for d in docs] == [reference.encode(d) for d in docs]
  one = reference.encode_batch(docs, num_workers=1, padding=True)
  for workers in (1, 2):  # threads
    out = native.encode_batch(docs, num_workers=workers, padding=True)
    assert all(np.array_equal(out[k], one[k]) for k in one)


def test_a_full_run_cache_changes_nothing(pair, monkeypatch):
  native, reference, texts = pair
  monkeypatch.setattr(native_encode, "_CACHE_SLOTS", 16)  # 8 runs, then no more records
  monkeypatch.setattr(native_encode, "_CACHE_POOL", 64)
  tok = pickle.loads(pickle.dumps(native))  # a fresh encoder with the tiny cache
  text = " ".join(texts[:5]) + " " + "x" * 100  # and a run too long to cache
  assert tok.encode(text) == tok.encode(text) == reference.encode(text)
  assert 1 <= tok._native_encoder()._cache()[2][0] <= 8  # full  # pylint: disable=protected-access


def test_classes_are_those_of_python_re():
  cps = np.arange(0x110000, dtype=np.uint32)
  table = native_encode.classes(cps)
  rng = np.random.default_rng(0)
  for cp in rng.choice(0x110000, 3000).tolist() + list(range(0x3000)):
    ch = chr(cp)
    want = (native_encode.LETTER if pieces_lib.re.fullmatch(pieces_lib.LETTER, ch) else
            native_encode.DIGIT if ch.isdecimal() else
            native_encode.SPACE if pieces_lib.re.fullmatch(r"\s", ch) else
            native_encode.OTHER)
    assert table[cp] == want, hex(cp)


@settings(max_examples=30)
@given(st.lists(st.text(st.sampled_from("ab é日"), min_size=1, max_size=6), min_size=1,
                max_size=30, unique=True), st.text(st.sampled_from("ab é日x"), max_size=30))
def test_trie_finds_exactly_its_strings(strings, text):
  trie = native_encode.Trie.build(strings, list(range(len(strings))))
  for s in set(strings) | {text[:k] for k in range(len(text) + 1)}:
    node = 0
    for ch in s:
      node = native_encode._child(trie.root, trie.table, trie.shift, node, ord(ch))  # pylint: disable=protected-access
      if node < 0:
        break
    found = trie.value[node] if node >= 0 and s else -1
    assert found == (strings.index(s) if s in strings else -1)
