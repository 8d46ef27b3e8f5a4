"""The tokenizer build (fsqtok/tokenizer/build.py): vocabulary first, then the codec."""
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import tiny_recon_config
from fsqtok.data import corpus as corpus_lib
from fsqtok.tokenizer import build as tokenizer_build
from fsqtok.tokenizer.tokenizer import Tokenizer
from fsqtok.train import recon

LEVELS = (3, 4, 2)


def _digits(code):
  out = []
  for n in LEVELS:
    out.append(code % n)
    code //= n
  return np.array(out)


@given(st.lists(st.integers(0, 23), min_size=1, max_size=24))
def test_distinct_codes_are_distinct_and_nearest(codes):
  order = list(range(len(codes)))
  out = tokenizer_build.distinct_codes(np.array(codes), order, LEVELS)
  assert len(set(out.tolist())) == len(codes)
  taken = set()
  for k in order:
    if codes[k] not in taken:
      assert out[k] == codes[k]  # a free code is kept
    else:  # a taken one moves to a free code at the fewest digit steps
      free = [c for c in range(24) if c not in taken]
      best = min(np.abs(_digits(c) - _digits(codes[k])).sum() for c in free)
      assert np.abs(_digits(out[k]) - _digits(codes[k])).sum() == best
    taken.add(int(out[k]))


def test_distinct_codes_refuse_more_strings_than_codes():
  with pytest.raises(ValueError, match="do not fit"):
    tokenizer_build.distinct_codes(np.zeros(25, np.int64), range(25), LEVELS)


def test_unigram_build_end_to_end_and_resume(doc_files, tmp_path):
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  config.train.num_steps = 60
  config.tokenizer.phrase_fraction = 0.1
  work, out = tmp_path / "work", tmp_path / "tok"
  tok, report = tokenizer_build.train_tokenizer(config, str(work), 600, str(out))
  # the size asked, less the learned strings the search never used (tokenizer.unused)
  assert tok.model == "unigram" and len(tok) == report["vocab_size"] == (
      600 - report["unused_dropped"])
  assert len(tok.phrases) == report["phrases"] == round(0.1 * (600 - 13 - 256))
  assert report["invalid_utf8"] == {"policy": "error", "replaced_bytes": 0,
                                    "skipped_documents": 0, "skipped_bytes": 0}
  assert sorted(p.name for p in out.iterdir()) == [
      "codec.msgpack", "codec_config.json", "tokenizer.json", "vocab_report.json"]
  codes = [tok.id_to_code(i) for i in tok.learned_ids]
  assert min(codes) >= 0 and len(set(codes)) == len(codes)  # every string its own code
  assert 0.0 <= report["codec_exact_strings"] <= 1.0 and report["train_bytes_per_token"] > 1.5
  text = (doc_files / "doc199.txt").read_text()
  loaded = Tokenizer.load(str(out))
  assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == text
  assert loaded.phrases == tok.phrases
  # the default runs: a punctuation run keeps the newlines after it, in both tokenizers
  assert loaded.runs == tok.runs == "line_ends"
  assert loaded.split("end.\n\nNext") == ["end", ".\n\n", "Next"]
  # The vocabulary is kept beside the codec run and reused by a resumed build.
  saved = json.loads((work / tokenizer_build.VOCABULARY_FILE).read_text())
  assert saved["strings"] == [tok.id_to_token(i) for i in tok.learned_ids]
  again, _ = tokenizer_build.train_tokenizer(config, str(work), 600, str(tmp_path / "tok2"))
  assert all(again.id_to_code(i) == tok.id_to_code(i) for i in tok.learned_ids)
  # The files were streamed from disk: the same text and vocabulary as the corpus loaded.
  train, _ = corpus_lib.load_split(config.data)
  assert report["counting"]["train_chars"] == sum(map(len, train))
  assert report["counting"]["sampled_blocks"] == len(train)
  in_memory = tokenizer_build.unigram_tokenizer(config, train, 600)
  assert [in_memory.id_to_token(i) for i in in_memory.learned_ids] == saved["strings"]


@pytest.mark.slow
def test_the_decoder_learns_the_assigned_codes_and_the_tokenizer_keeps_it(doc_files, tmp_path):
  """``tokenizer.decoder_steps``: after the codes are assigned, the decoder alone learns
  them, then in rounds until every string decodes exactly; the report says how many
  decode exactly before and after, and the tokenizer keeps the codes and the codec that
  do."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from fsqtok.codec import memorize  # pylint: disable=g-import-not-at-top
  from fsqtok.data.batches import PieceSet  # pylint: disable=g-import-not-at-top
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  config.train.num_steps = 60
  config.tokenizer.decoder_steps = 400
  config.model.dec_mlp_dim = 256  # room for the strings (the tiny codec has 64)
  config.tokenizer.codec_fourier_octaves = 2  # sharp inputs: 4 code dimensions, 331 strings
  # 150-step rounds: too short for a falling rate (tested in test_memorize.py)
  config.tokenizer.decoder_rounds.update(num=6, steps=150, learning_rate_decay=1.0)
  tok, report = tokenizer_build.train_tokenizer(config, str(tmp_path / "work"), 600,
                                                str(tmp_path / "tok"))
  assert report["decoder_steps"] == 400
  rounds = report["decoder_rounds"]
  assert rounds[0]["exact"] < 1 < len(rounds) and rounds[-1]["exact"] == 1.0
  assert report["assigned_codes_exact"] == 1.0 > report["assigned_codes_exact_before"]
  assert report["assigned_codes_not_exact"] == 0
  assert not report["assigned_not_exact_examples"]
  model, template = recon.load_trained_codec(tokenizer_build.codec_config(config),
                                            str(tmp_path / "work"))
  saved = serialization.from_bytes(template, (tmp_path / "tok" / "codec.msgpack").read_bytes())
  strings = PieceSet.from_counts({tok.id_to_token(i): 1 for i in tok.learned_ids},
                                 config.model.max_len)
  row = {strings.piece_bytes(k).decode("utf-8"): k for k in range(strings.num_distinct)}
  codes = np.zeros(strings.num_distinct, np.int64)
  for i in tok.learned_ids:
    codes[row[tok.id_to_token(i)]] = tok.id_to_code(i)
  assert len(set(codes.tolist())) == len(codes)
  assert memorize.decodes_exactly(model, saved, codes, strings).all()


def test_a_kept_vocabulary_is_reused_only_for_the_same_training_split(doc_files, tmp_path):
  """The vocabulary kept in the work directory is the one of its training texts: a
  changed split (validation share, seed, block size, text policy) trains a new one."""
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  train, _ = corpus_lib.load_split(config.data)
  first, _ = tokenizer_build.unigram_vocabulary(config, str(tmp_path), train[:40], 400)
  again, _ = tokenizer_build.unigram_vocabulary(config, str(tmp_path), train[40:80], 400)
  assert again.strings == first.strings  # the same settings: kept, whatever the texts
  for field, value in (("val_fraction", 0.3), ("split_seed", 1), ("block_chars", 1024),
                       ("invalid_utf8", "replace")):
    changed = config.copy_and_resolve_references()
    changed.data[field] = value
    other, _ = tokenizer_build.unigram_vocabulary(changed, str(tmp_path), train[40:80], 400)
    assert other.strings != first.strings, field  # trained anew on the texts given
    tokenizer_build.unigram_vocabulary(config, str(tmp_path), train[:40], 400)  # back


def test_unused_strings_are_dropped_unless_kept(doc_files, tmp_path):
  """``tokenizer.unused``: "drop" (the default) leaves out what the search never uses on
  the training text, which is then tokenized as before; "keep" fills the size asked;
  anything else is refused with the choices."""
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  train, _ = corpus_lib.load_split(config.data)
  train = train[:60]  # small for 3,000 ids: strings the search never picks
  assert config.tokenizer.unused == "drop"  # the default
  dropped = tokenizer_build.unigram_tokenizer(config, train, 3000)
  config.tokenizer.unused = "keep"
  kept = tokenizer_build.unigram_tokenizer(config, train, 3000)
  assert len(kept) == 3000 and len(dropped) < 2900
  for text in train:
    assert ([dropped.id_to_token(i) for i in dropped.encode(text)]
            == [kept.id_to_token(i) for i in kept.encode(text)])
  config.tokenizer.unused = "prune"
  with pytest.raises(ValueError, match=r"tokenizer.unused='prune' is unknown: use one of "
                                       r"\('keep', 'fill', 'drop'\)"):
    tokenizer_build.unigram_tokenizer(config, train, 3000)


def test_unknown_vocabulary_kind_is_a_clear_error(doc_files, tmp_path):
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  config.tokenizer.vocabulary = "bpe"
  with pytest.raises(ValueError, match="Unknown tokenizer.vocabulary 'bpe'"):
    tokenizer_build.train_tokenizer(config, str(tmp_path / "w"), 600, str(tmp_path / "t"))


def test_the_tokenizer_is_the_same_whatever_the_number_of_workers(doc_files, tmp_path,
                                                                   monkeypatch):
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  config.tokenizer.phrase_fraction = 0.05
  texts = [p.read_text(encoding="utf-8") for p in sorted(doc_files.glob("*.txt"))]
  monkeypatch.setattr(tokenizer_build.unigram_lib, "PARALLEL_MIN_CHARS", 0)  # a small corpus
  saved = []
  for workers in (1, 2):
    config.tokenizer.num_workers = workers
    tokenizer_build.unigram_tokenizer(config, texts, 800).save(str(tmp_path / f"w{workers}"))
    saved.append((tmp_path / f"w{workers}" / "tokenizer.json").read_bytes())
  assert saved[0] == saved[1] and b'" of the"' in saved[0]  # byte for byte, phrases and all


def test_the_build_trains_its_codec_at_the_tokenizer_learning_rate():
  from configs import recon as recon_config  # pylint: disable=g-import-not-at-top
  config = recon_config.get_config("")
  assert config.tokenizer.codec_learning_rate == 1e-2 and config.optim.learning_rate == 3e-3
  assert config.tokenizer.codec_fourier_octaves == 3 and config.model.dec_fourier_octaves == 0
  # Fewer codec steps, then the decoder learns the assigned codes.
  assert config.tokenizer.codec_steps == 4000 and config.train.num_steps == 16_000
  assert config.tokenizer.decoder_steps == 12_000
  built = tokenizer_build.codec_config(config)
  assert built.optim.learning_rate == 1e-2 and config.optim.learning_rate == 3e-3
  assert built.model.dec_fourier_octaves == 3 and config.model.dec_fourier_octaves == 0
  assert built.train.num_steps == 4000 and built.train.eval_every <= 4000
  built.model.dec_fourier_octaves = 0
  assert built.model == config.model
  config.tokenizer.codec_learning_rate = 0.0  # 0: optim's own
  config.tokenizer.codec_fourier_octaves = 0  # 0: model's own
  config.tokenizer.codec_steps = 0            # 0: train.num_steps
  assert tokenizer_build.codec_config(config) is config
