import jax
import numpy as np
import optax
import pytest

from configs import recon as recon_config
from fsqtok.codec import model as codec_lib
from fsqtok.data.batches import PieceSet
from fsqtok.tokenizer import vocab as vocab_lib
from fsqtok.tokenizer.tokenizer import Tokenizer
from fsqtok.train import recon
from fsqtok.train import sharding as sharding_lib


TEXT = "the cat sat on the mat and the cat ran to the mat"


@pytest.fixture
def pieces():
  return PieceSet.from_texts([TEXT])


def test_exact_candidates_keep_exact_multibyte_strings_by_count(pieces):
  strings = [pieces.piece_bytes(i) for i in range(pieces.num_distinct)]
  codes = np.arange(pieces.num_distinct) * 7
  exact = np.ones(pieces.num_distinct, bool)
  exact[strings.index(b" the")] = False  # the most frequent piece is not exact
  cands = vocab_lib.exact_candidates(codes, exact, pieces)
  assert b" the" not in cands.strings and cands.strings[:2] == (b" cat", b" mat")
  assert all(len(s) >= 2 for s in cands.strings)
  assert cands.counts_K.tolist() == sorted(cands.counts_K.tolist(), reverse=True)
  for s, c in zip(cands.strings, cands.codes_K):
    assert codes[strings.index(s)] == c


def test_two_exact_pieces_on_one_code_is_an_error(pieces):
  with pytest.raises(ValueError, match="not deterministic"):
    vocab_lib.exact_candidates(np.zeros(pieces.num_distinct), np.ones(pieces.num_distinct, bool),
                               pieces)


def _vocab(strings, counts=None):
  n = len(strings)
  return vocab_lib.CodeVocabulary(np.arange(n, dtype=np.int64), tuple(strings),
                                  np.asarray(counts or [1] * n, np.int64))


def test_selection_keeps_what_saves_the_most_tokens():
  texts = ["the cat sat on the mat. " * 20, "a rare zebra."]
  # " the" saves one token per use (4 bytes -> 1); "ze" in the rare word saves one once;
  # " mat" and " cat" save 3 each per use; the span " the mat" saves the most.
  cands = _vocab([b" the", b"ze", b" mat", b" cat", b" the mat", b" the cat", b"zzz"],
                 [100, 100, 50, 50, 20, 20, 1000])
  vocab, history = vocab_lib.select_vocabulary(cands, texts, 3, shrink=0.5)
  assert len(vocab) == 3
  assert b"zzz" not in vocab.strings and b"ze" not in vocab.strings  # unused / used once
  assert b" the cat" in vocab.strings and b" the mat" in vocab.strings  # 8 bytes -> 1
  assert [h["candidates"] for h in history] == sorted((h["candidates"] for h in history),
                                                      reverse=True)
  assert history[-1]["bytes_per_token"] >= history[0]["bytes_per_token"] * 0.5


def test_pruning_history_and_compression_against_frequency_selection():
  from fsqtok.tokenizer import candidates  # pylint: disable=g-import-not-at-top
  from fsqtok.data import corpus  # pylint: disable=g-import-not-at-top
  doc_texts = corpus.load_documents("builtin")[:60]
  counts = candidates.count_candidates(doc_texts)
  chosen = candidates.select_candidates(counts, min_count=2, max_candidates=20_000)
  pool = PieceSet.from_counts(chosen)
  cands = vocab_lib.exact_candidates(np.arange(pool.num_distinct), np.ones(pool.num_distinct, bool),
                                     pool)
  size = 300
  vocab, history = vocab_lib.select_vocabulary(cands, doc_texts, size)
  assert len(vocab) <= size and history[-1]["candidates"] == size
  assert vocab.counts_K.tolist() == sorted(vocab.counts_K.tolist(), reverse=True)
  by_count = Tokenizer([s.decode() for s in cands.strings[:size]])
  chosen_tok = Tokenizer([s.decode() for s in vocab.strings])
  n_count = sum(len(by_count.encode(t)) for t in doc_texts)
  n_chosen = sum(len(chosen_tok.encode(t)) for t in doc_texts)
  assert n_chosen < 0.9 * n_count  # the compression criterion beats "most frequent"


@pytest.mark.slow
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
  vocab, analysis = vocab_lib.build_code_vocabulary(model, state.params, pieces, [TEXT], 5,
                                                    batch_size=16, mesh=mesh, max_piece_bytes=16)
  assert len(vocab) == 5 and analysis["exact_candidates"] >= 5
  assert sum(analysis["composition"].values()) == 5
  # Each kept code decodes to exactly its string.
  codes = model.fsq.indices_to_codes(vocab.codes_K)
  logits = model.apply({"params": state.params}, codes, method=codec_lib.Codec.decode)
  out, lengths = jax.device_get(codec_lib.greedy_decode(logits))
  assert [bytes(r[:n]) for r, n in zip(out, lengths)] == list(vocab.strings)


@pytest.mark.slow
def test_codec_exact_build_end_to_end(doc_files, tmp_path):
  """The first design, kept for comparison: codec first, vocabulary among its exact strings."""
  from conftest import tiny_recon_config  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer.build import train_tokenizer  # pylint: disable=g-import-not-at-top
  config = tiny_recon_config(f"files:{doc_files}/*.txt", str(tmp_path / "tfds"))
  config.train.num_steps = 100
  config.tokenizer.vocabulary = "codec_exact"
  out = tmp_path / "tok"
  tok, analysis = train_tokenizer(config, str(tmp_path / "work"), 300, str(out))
  assert sorted(p.name for p in out.iterdir()) == [
      "codec.msgpack", "codec_config.json", "tokenizer.json", "vocab_report.json"]
  loaded = Tokenizer.load(str(out))
  assert len(loaded) == len(tok) <= 300
  assert analysis["vocab_size"] == len(tok)
  text = (doc_files / "doc000.txt").read_text()
  assert loaded.decode(loaded.encode(text)) == text
  assert loaded.model == "fewest" and analysis["vocabulary"] == "codec_exact"
  with pytest.raises(ValueError, match="leaves no room"):
    train_tokenizer(config, str(tmp_path / "work"), 100, str(out))
