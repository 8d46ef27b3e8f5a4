import jax
import numpy as np
import optax
import pytest

from configs import recon as recon_config
from fsqtok import codec as codec_lib
from fsqtok import recon
from fsqtok import sharding as sharding_lib
from fsqtok import vocab as vocab_lib
from fsqtok.data import PieceSet


@pytest.fixture
def pieces():
  return PieceSet.from_texts(["the cat sat on the mat and the cat ran to the mat"])


def test_selection_keeps_frequent_exact_codes(pieces):
  strings = [pieces.piece_bytes(i) for i in range(pieces.num_distinct)]
  codes = np.arange(pieces.num_distinct) * 7
  exact = np.ones(pieces.num_distinct, bool)
  exact[strings.index(b" the")] = False  # the most frequent piece is not exact
  vocab = vocab_lib.select_vocabulary(codes, exact, pieces, 3)
  assert len(vocab) == 3 and b" the" not in vocab.strings
  assert list(vocab.strings) == [b" cat", b" mat", b" and"]
  assert vocab.counts_K.tolist() == [2, 2, 1]
  for s, c in zip(vocab.strings, vocab.codes_K):
    assert codes[strings.index(s)] == c


def test_analysis_counts_collisions_and_coverage(pieces):
  n = pieces.num_distinct
  codes = np.zeros(n, np.int64)
  codes[: n // 2] = np.arange(n // 2) + 1  # the rest collide on code 0
  exact = codes > 0
  vocab = vocab_lib.select_vocabulary(codes, exact, pieces, 100)
  a = vocab_lib.codebook_analysis(codes, exact, pieces, vocab, 4096)
  assert a["codes_used"] == n // 2 + 1
  assert a["collision_rate"] == pytest.approx((n - n // 2) / n)
  assert a["vocab_coverage"] == pytest.approx(pieces.counts_N[: n // 2].sum() / pieces.counts_N.sum())
  assert a["code_frequency_curve"] == sorted(a["code_frequency_curve"], reverse=True)
  assert sum(a["code_frequency_curve"]) == pieces.num_occurrences


def test_two_exact_pieces_on_one_code_is_an_error(pieces):
  with pytest.raises(ValueError, match="not deterministic"):
    vocab_lib.select_vocabulary(np.zeros(pieces.num_distinct), np.ones(pieces.num_distinct, bool),
                                pieces, 5)


def test_vocabulary_from_a_trained_codec_is_exact(pieces):
  config = recon_config.get_config("tiny")
  model = codec_lib.codec_from_config(config.model)
  state = recon.create_state(config, model, jax.random.PRNGKey(0))
  state = state.replace(tx=optax.adam(1e-2), opt_state=optax.adam(1e-2).init(state.params))
  step = jax.jit(recon.train_step)
  batch = {"bytes": pieces.bytes_NxL, "lengths": pieces.lengths_N}
  for i in range(300):
    state, _ = step(state, batch, jax.random.PRNGKey(i))
  mesh = sharding_lib.data_mesh(1)
  vocab, analysis = vocab_lib.build_code_vocabulary(model, state.params, pieces, 5,
                                                    batch_size=16, mesh=mesh)
  assert len(vocab) == 5 and analysis["exact_pieces"] >= 5
  # Each kept code decodes to exactly its string.
  codes = model.fsq.indices_to_codes(vocab.codes_K)
  logits = model.apply({"params": state.params}, codes, method=codec_lib.Codec.decode)
  out, lengths = jax.device_get(codec_lib.greedy_decode(logits))
  assert [bytes(r[:n]) for r, n in zip(out, lengths)] == list(vocab.strings)


def test_train_tokenizer_end_to_end(doc_files, tmp_path):
  from conftest import tiny_recon_config  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer_build import train_tokenizer  # pylint: disable=g-import-not-at-top
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  config.train.num_steps = 100
  out = tmp_path / "tok"
  tok, analysis = train_tokenizer(config, str(tmp_path / "work"), 300, str(out))
  assert sorted(p.name for p in out.iterdir()) == [
      "codec.msgpack", "codec_config.json", "tokenizer.json", "vocab_report.json"]
  loaded = Tokenizer.load(str(out))
  assert len(loaded) == len(tok) <= 300
  assert analysis["vocab_size"] == len(tok)
  text = (doc_files / "doc000.txt").read_text()
  assert loaded.decode(loaded.encode(text)) == text
  with pytest.raises(ValueError, match="smaller than"):
    train_tokenizer(config, str(tmp_path / "work"), 100, str(out))
