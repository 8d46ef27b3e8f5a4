import concurrent.futures
import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from conftest import SHAKESPEARE_SNIPPET
from fsqtok.data.batches import PieceSet
from fsqtok.tokenizer.tokenizer import DEFAULT_SPECIALS, Tokenizer

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=400)


@pytest.fixture(scope="module")
def tok():
  pieces = PieceSet.from_texts([SHAKESPEARE_SNIPPET * 3, "naïve café 日本語 🙂 ok"])
  learned = [pieces.piece_bytes(i).decode() for i in range(pieces.num_distinct)]
  extra = ["speak", "ee", " of the", ".\n", ", and", "'d to"]  # parts of pieces and spans
  return Tokenizer(learned + extra, codes=list(range(len(learned) + len(extra))))


@given(TEXT)
def test_decode_encode_is_the_identity(tok, text):
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [
    "", "\x00", "\x00\x01\x02\x7f", "e\u0301\u0302 a\u0308", "日本語のテキスト" * 20,
    "👩‍👩‍👧‍👦🙂🏳️‍🌈", "\r\n\t\x0b\x0c ", "[CLS] [PAD][MASK]", "x" * 100_000,
    SHAKESPEARE_SNIPPET * 50, "\ufeff\u200b\u2028\U0010ffff",
])
def test_round_trip_edge_cases(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_known_pieces_are_one_token_and_unknown_ones_fall_back(tok):
  assert tok.encode("First Citizen") == [tok.token_to_id("First"), tok.token_to_id(" Citizen")]
  ids = tok.encode(" zq")  # not in the vocabulary: three byte tokens
  assert [tok.id_to_token(i) for i in ids] == ["<0x20>", "<0x7A>", "<0x71>"]
  # Fewest tokens inside an unknown piece: " speakee" -> " speak" + "ee" + ... never bytes
  # where a vocabulary string covers them.
  assert [tok.id_to_token(i) for i in tok.encode(" speakee")] == [" speak", "ee"]


@given(st.text(st.sampled_from("speakx e"), max_size=30))
def test_segmentation_is_never_longer_than_bytes(tok, text):
  assert len(tok.encode(text)) <= len(text.encode())


def test_spans_are_one_token_only_at_piece_boundaries(tok):
  ids = tok.encode(" of the end.\n")
  assert ids == [tok.token_to_id(" of the"), *tok.encode(" end"), tok.token_to_id(".\n")]
  # " of the" inside " of theory" is not a piece boundary: no span there.
  assert tok.token_to_id(" of the") not in tok.encode(" of theory")


def _reference_count(tok, text):
  """Fewest tokens with piece boundaries kept except inside spans: a plain O(n^2) DP."""
  from fsqtok.tokenizer import pieces as pieces_lib  # pylint: disable=g-import-not-at-top
  ps = pieces_lib.split_pieces(text)
  best = [0] * (len(ps) + 1)
  for i in range(len(ps) - 1, -1, -1):
    best[i] = best[i + 1] + len(tok._piece_ids(ps[i]))  # pylint: disable=protected-access
    for j in range(i + 2, len(ps) + 1):
      if tok.token_to_id("".join(ps[i:j])) is not None:
        best[i] = min(best[i], 1 + best[j])
  return best[0]


@given(st.lists(st.sampled_from(["'d", " to", " of", " the", ".", "\n", ",", " and", "x"]),
                max_size=30).map("".join))
def test_span_segmentation_of_word_sequences_has_the_fewest_tokens(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert len(ids) == _reference_count(tok, text)


def test_fewest_tokens_without_a_token(tok):
  alone = len(tok.encode(" of")) + len(tok.encode(" the"))
  assert tok.fewest_tokens_without(tok.token_to_id(" of the")) == alone
  assert tok.fewest_tokens_without(tok.token_to_id("speak")) == 5    # five bytes


def test_lone_surrogates_and_non_strings_are_clear_errors(tok, unigram_tok):
  for t in (tok, unigram_tok[0]):  # pure Python, and the compiled search
    with pytest.raises(ValueError, match="lone surrogate"):
      t.encode("ok \ud800 no")
    with pytest.raises(ValueError, match="lone surrogate"):
      t.split("ab \ud800")
    with pytest.raises(TypeError, match="takes a str"):
      t.encode(b"bytes")
    with pytest.raises(TypeError, match="takes a str"):
      t.encode_batch([b"ab"], parse_special=True, add_special_tokens=True)


def test_special_tokens_stay_text_unless_asked(tok):
  cls = tok.token_to_id("[CLS]")
  assert cls == DEFAULT_SPECIALS.index("[CLS]")
  assert cls not in tok.encode("[CLS] hello")
  assert tok.encode("[CLS] hello", parse_special=True)[0] == cls
  ids = tok.encode("Speak", add_special_tokens=True)
  assert ids[0] == tok.token_to_id("[BOS]") and ids[-1] == tok.token_to_id("[EOS]")
  assert tok.decode(ids) == "[BOS]Speak[EOS]"
  assert tok.decode(ids, skip_special_tokens=True) == "Speak"


def test_added_special_tokens_get_new_ids(tok):
  tok2 = Tokenizer(["ab", "cd"])
  size = len(tok2)
  assert tok2.add_special_tokens(["<tool>", "[CLS]", "<tool>"]) == 1
  with pytest.raises(TypeError, match=r"use add_special_tokens\(\['\[FOO\]'\]\)"):
    tok2.add_special_tokens("[FOO]")  # not four specials "[", "F", "O", "]"
  assert tok2.token_to_id("<tool>") == size and len(tok2) == size + 1
  assert tok2.encode("x<tool>y", parse_special=True)[1] == size
  assert tok2.decode(tok2.encode("x<tool>y", parse_special=True)) == "x<tool>y"


def test_vocabulary_accounting_and_id_maps(tok):
  assert len(tok) == tok.vocab_size == len(DEFAULT_SPECIALS) + 256 + len(tok._learned)
  for i in range(len(tok)):
    assert tok.token_to_id(tok.id_to_token(i)) == i
  assert tok.id_to_code(tok.token_to_id("speak")) >= 0
  assert tok.id_to_code(0) == -1
  with pytest.raises(IndexError, match="outside the vocabulary"):
    tok.decode([len(tok)])


def test_save_load_round_trip_and_overwrite(tok, tmp_path):
  d = tmp_path / "tok"
  tok.save(str(d))
  tok.save(str(d))  # overwriting is atomic too
  loaded = Tokenizer.load(str(d))
  text = SHAKESPEARE_SNIPPET + " naïve 🙂 [CLS]"
  assert loaded.encode(text) == tok.encode(text)
  assert len(loaded) == len(tok)
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
  assert loaded.fingerprint() == tok.fingerprint()  # names what is saved, exactly
  other = Tokenizer.load(str(d))
  other.add_special_tokens(["[NEW]"])
  assert other.fingerprint() != tok.fingerprint()


def test_save_never_replaces_what_is_not_a_tokenizer(tok, tmp_path, monkeypatch):
  """A save replaces its directory whole, so it refuses a folder of other files, a file
  and the working directory, before writing anything; an empty folder is fine."""
  users = tmp_path / "model"
  users.mkdir()
  (users / "weights.bin").write_bytes(b"precious")
  with pytest.raises(ValueError, match="holds other files and no tokenizer.json"):
    tok.save(str(users))
  assert os.listdir(users) == ["weights.bin"]
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ValueError, match="it is a file"):
    tok.save(str(tmp_path / "a_file"))
  monkeypatch.chdir(users)
  for here in (".", "", str(tmp_path)):
    with pytest.raises(ValueError, match="working directory"):
      tok.save(here)
  assert os.listdir(users) == ["weights.bin"]
  (tmp_path / "empty").mkdir()
  tok.save(str(tmp_path / "empty"))
  assert Tokenizer.load(str(tmp_path / "empty")).fingerprint() == tok.fingerprint()


def test_the_run_style_is_saved_and_a_default_tokenizer_is_still_format_3(tmp_path):
  text = "Enter:\nA lord.\n\nExit,\n"
  for runs, version in (("gpt2", 3), ("blank_lines", 4), ("line_ends", 4)):
    tok = Tokenizer([":\n", ".\n\n", "lord", " lord"], scores=[-1.0, -1.0, -2.0, -2.0],
                    runs=runs)
    tok.save(str(tmp_path / runs))
    payload = json.loads((tmp_path / runs / "tokenizer.json").read_text())
    assert payload["version"] == version and payload.get("runs", "gpt2") == runs
    loaded = Tokenizer.load(str(tmp_path / runs))
    assert loaded.runs == runs and loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
  assert tok.split(text)[:2] == ["Enter", ":\n"]  # line_ends: one run, one token
  assert [tok.id_to_token(i) for i in tok.encode("Enter:\n")][-1] == ":\n"
  with pytest.raises(ValueError, match="tokenizer.runs='spaces' is unknown"):
    Tokenizer(["ab"], scores=[-1.0], runs="spaces")
  with pytest.raises(ValueError, match="is for a unigram tokenizer"):
    Tokenizer(["ab"], runs="line_ends")


def test_loading_damaged_or_foreign_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an fsqtok tokenizer"):
    Tokenizer.load(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="damaged"):
    Tokenizer.load(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
  with pytest.raises(ValueError, match="not an fsqtok tokenizer"):
    Tokenizer.load(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "fsqtok-tokenizer",
                                                       "version": 1}))
  with pytest.raises(ValueError, match="damaged"):
    Tokenizer.load(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "fsqtok-tokenizer",
                                                       "version": 5}))
  with pytest.raises(ValueError, match="reads versions 1 to 4: upgrade fsqtok"):
    Tokenizer.load(str(tmp_path))


@given(TEXT)
def test_offsets_cover_the_text_and_agree_with_encode(tok, text):
  ids, offsets = tok.encode_with_offsets(text)
  assert ids == tok.encode(text)
  assert all(0 <= a < b <= len(text) for a, b in offsets)
  # Spans are in order, and every character is covered by some token.
  assert [a for a, _ in offsets] == sorted(a for a, _ in offsets)
  covered = set()
  for a, b in offsets:
    covered.update(range(a, b))
  assert covered == set(range(len(text)))


def test_offsets_of_words_and_split_characters(tok):
  ids, offs = tok.encode_with_offsets("First 🙂", add_special_tokens=True)
  assert offs[0] == (0, 0) and offs[-1] == (0, 0)
  assert offs[1] == (0, 5)
  # " 🙂" is one learned piece here; an unknown emoji falls back to 4 bytes of one char.
  _, offs2 = tok.encode_with_offsets("a😀")
  assert offs2[-4:] == [(1, 2)] * 4


def test_batch_padding_truncation_and_masks(tok):
  texts = ["First Citizen", "Speak, speak. You are all resolved", ""]
  out = tok.encode_batch(texts, padding="longest")
  lengths = [len(tok.encode(t)) for t in texts]
  assert out["input_ids"].shape == (3, max(lengths))
  assert out["attention_mask"].sum(1).tolist() == lengths
  pad = tok.token_to_id("[PAD]")
  assert out["input_ids"][0, lengths[0]:].tolist() == [pad] * (max(lengths) - lengths[0])
  left = tok.encode_batch(texts, padding=True, padding_side="left")
  assert left["input_ids"][0, -lengths[0]:].tolist() == tok.encode(texts[0])
  assert left["attention_mask"][0, : max(lengths) - lengths[0]].sum() == 0
  cut = tok.encode_batch(texts, padding="max_length", truncation=True, max_length=4)
  assert cut["input_ids"].shape == (3, 4) and cut["offset_mapping"].shape == (3, 4, 2)
  assert cut["input_ids"][1].tolist() == tok.encode(texts[1])[:4]
  ragged = tok.encode_batch(texts)
  assert [len(r) for r in ragged["input_ids"]] == lengths
  with pytest.raises(ValueError, match="truncation=True"):
    tok.encode_batch(texts, padding="max_length", max_length=2)
  with pytest.raises(ValueError, match="max_length"):
    tok.encode_batch(texts, truncation=True)
  with pytest.raises(TypeError, match="list of strings"):
    tok.encode_batch("one string")


def test_loading_and_encoding_need_no_jax(tok, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  tok.save(str(tmp_path / "tok"))
  code = ("import sys; from fsqtok import Tokenizer; t = Tokenizer.load(sys.argv[1]); "
          "assert t.decode(t.encode('First Citizen 🙂')) == 'First Citizen 🙂'; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tok")], cwd=REPO,
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_saved_files_get_the_usual_permissions(tok, tmp_path):
  import stat  # pylint: disable=g-import-not-at-top
  old = os.umask(0o022)
  try:
    tok.save(str(tmp_path / "tok"))
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "tok").st_mode) == 0o755
  assert stat.S_IMODE(os.stat(tmp_path / "tok" / "tokenizer.json").st_mode) == 0o644


@pytest.fixture(scope="module")
def unigram_tok(doc_files):
  from fsqtok.tokenizer import unigram  # pylint: disable=g-import-not-at-top
  texts = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))][:100]
  vocab = unigram.train_unigram(unigram.count_pieces(texts), 700, seed_size=10_000)
  vocab = unigram.add_phrases(vocab, texts, unigram.count_phrases(texts, 16), 30)
  return Tokenizer(vocab.strings, scores=vocab.scores, phrases=vocab.phrases), texts


@pytest.mark.parametrize("native", [True, False])  # threads, or worker processes
@given(texts=st.lists(TEXT, min_size=2, max_size=12))
@settings(max_examples=8)  # each example starts worker processes
def test_batch_workers_give_the_ids_of_one_process(unigram_tok, native, texts):
  tok, _ = unigram_tok
  tok.native = native
  try:
    one = tok.encode_batch(texts, num_workers=1, parse_special=True)
    two = tok.encode_batch(texts, num_workers=2, parse_special=True)
    assert two == one
    assert one["input_ids"] == [tok.encode(t, parse_special=True) for t in texts]
  finally:
    tok.native = True


def test_encode_batch_from_several_threads_at_once(unigram_tok):
  """Callers on two threads, batches of different sizes, the same num_workers: they share
  the tokenizer's thread pool (one replaced under the other's feet raised "cannot
  schedule new futures after shutdown")."""
  utok, docs = unigram_tok
  want = [utok.encode(d) for d in docs]
  def work(k):
    return [utok.encode_batch(docs[:2 + (i + k) % 3], num_workers=4)["input_ids"]
            for i in range(30)]
  with concurrent.futures.ThreadPoolExecutor(2) as callers:
    results = list(callers.map(work, range(2)))
  for k, got in enumerate(results):
    assert got == [want[:2 + (i + k) % 3] for i in range(30)]


def test_batch_workers_on_documents_and_their_errors(unigram_tok, tok):
  utok, docs = unigram_tok
  for t in (utok, tok):
    padded = t.encode_batch(docs, padding=True, num_workers=2)
    ragged = t.encode_batch(docs, num_workers=1)
    assert padded["attention_mask"].sum(1).tolist() == [len(r) for r in ragged["input_ids"]]
    assert [row[m > 0].tolist() for row, m in zip(padded["input_ids"],
                                                   padded["attention_mask"])] == ragged["input_ids"]
    ids_only = t.encode_batch(docs, return_offsets_mapping=False, num_workers=2)
    assert ids_only == {k: ragged[k] for k in ("input_ids", "attention_mask")}
  with pytest.raises(ValueError, match="lone surrogate"):
    utok.encode_batch(["fine", "bad \ud800"], num_workers=2)
  with pytest.raises(ValueError, match="num_workers"):
    utok.encode_batch(["a"], num_workers=0)


def test_save_load_on_an_object_store(tok, object_store):
  """A tokenizer saved to an ``s3://`` directory (in-memory store) loads back whole."""
  where = f"{object_store}/tokenizers/one"
  tok.save(where, extra_files={"notes.txt": b"extra"})
  again = Tokenizer.load(where)
  text = "First Citizen: Before we proceed any further, hear me speak. \u00e9\U0001F600"
  assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == text
  with pytest.raises(FileNotFoundError, match="is not an fsqtok tokenizer"):
    Tokenizer.load(f"{object_store}/tokenizers/none")
  tok.save(where)  # an earlier save is replaced
  assert Tokenizer.load(where).fingerprint() == tok.fingerprint()
