"""The word-sense probes: the centroid probe and the word-in-context pairs test."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fsqtok.studies import sense_probes
from fsqtok.studies.wordnet import SenseExample


def _examples(words=6, senses=3, per_sense=3):
  return [SenseExample(f"w{w}", f"n{w:03d}{s}", f"sentence {w} {s} {k}", 0, 1)
          for w in range(words) for s in range(senses) for k in range(per_sense)]


def _sense_vectors(examples, noise=0.0, seed=0):
  """One direction per sense (+ noise): a representation that holds the sense."""
  senses = sorted({e.sense for e in examples})
  rng = np.random.default_rng(seed)
  v = np.eye(len(senses))[[senses.index(e.sense) for e in examples]]
  return v + noise * rng.normal(size=v.shape)


def test_context_pairs_are_balanced_within_lemmas_and_split_by_lemma():
  ex = _examples()
  train, test = sense_probes.context_pairs(ex, seed=3, test_share=0.5)
  for pairs in (train, test):
    assert pairs.shape[1] == 3 and len(pairs) > 0
    assert all(ex[i].word == ex[j].word and i != j for i, j, _ in pairs)
    assert all(int(ex[i].sense == ex[j].sense) == same for i, j, same in pairs)
    for w in {ex[i].word for i, _, _ in pairs}:
      rows = pairs[[ex[i].word == w for i, _, _ in pairs]]
      assert rows[:, 2].sum() * 2 == len(rows)          # as many same as different
  words = lambda p: {ex[i].word for i, _, _ in p}
  assert not words(train) & words(test) and len(words(test)) == 3
  again = sense_probes.context_pairs(ex, seed=3, test_share=0.5)
  np.testing.assert_array_equal(train, again[0])          # deterministic per seed
  capped, _ = sense_probes.context_pairs(ex, seed=3, max_pairs_per_word=2)
  assert len(capped) == 4 * len(words(capped))


def test_pairs_of_one_form_pair_only_examples_of_equal_form():
  ex = _examples(words=4, senses=2, per_sense=4)
  forms = [k % 2 for k in range(len(ex))]      # two word forms, alternating
  train, test = sense_probes.context_pairs(ex, seed=0, forms=forms)
  for pairs in (train, test):
    assert all(forms[i] == forms[j] for i, j, _ in pairs) and pairs[:, 2].mean() == 0.5
  # a representation that sees only the form: every pair has cosine 1, chance exactly
  by_form = np.eye(2)[forms]
  assert sense_probes.pair_accuracy(by_form, train, test)[0] == 0.5
  with pytest.raises(ValueError, match="forms has 3 entries"):
    sense_probes.context_pairs(ex, seed=0, forms=[0, 1, 2])


def test_pairs_need_two_lemmas_with_both_kinds():
  one_sense_each = [SenseExample(f"w{w}", f"s{w}", "x", 0, 1) for w in range(4) for _ in "ab"]
  with pytest.raises(ValueError, match="min_examples_per_sense"):
    sense_probes.context_pairs(one_sense_each, seed=0)


def test_a_constant_representation_is_at_chance_and_a_sense_one_is_perfect():
  ex = _examples()
  train, test = sense_probes.context_pairs(ex, seed=0)
  constant = np.ones((len(ex), 4))
  assert sense_probes.pair_accuracy(constant, train, test)[0] == 0.5
  acc, threshold = sense_probes.pair_accuracy(_sense_vectors(ex, noise=0.05), train, test)
  assert acc == 1.0 and 0 < threshold < 1
  s_train, s_test = sense_probes.split_by_sense(ex, seed=0)
  assert sense_probes.centroid_accuracy(_sense_vectors(ex, 0.05), ex, s_train, s_test) == 1.0
  # constant vectors tie everywhere: the probe falls back to the majority sense
  assert (sense_probes.centroid_accuracy(constant, ex, s_train, s_test)
          == sense_probes.majority_accuracy(ex, s_train, s_test))


def test_split_by_sense_holds_out_a_third_of_every_sense():
  ex = _examples(words=2, senses=2, per_sense=6)
  train, test = sense_probes.split_by_sense(ex, seed=1)
  assert sorted([*train, *test]) == list(range(len(ex)))
  for s in {e.sense for e in ex}:
    assert sum(ex[i].sense == s for i in test) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1, 1, allow_nan=False), st.booleans()), min_size=1,
                max_size=40))
def test_the_threshold_is_the_best_cut(rows):
  cos = np.asarray([c for c, _ in rows])
  same = np.asarray([s for _, s in rows])
  t = sense_probes.best_threshold(cos, same)
  best = np.mean((np.round(cos, 9) >= t) == same)
  for cut in [*cos, 2.0]:                    # every "same iff cos >= c" rule is no better
    assert np.mean((np.round(cos, 9) >= cut) == same) <= best + 1e-12


def test_context_bag_is_the_mean_of_the_neighbours_rows():
  table = np.arange(20, dtype=np.float32).reshape(10, 2)
  encoded = [([1, 2, 3, 4, 5, 6], [2]),      # neighbours within 2: ids 1 2 . 5 6 -> rows 1,2,4,5
             ([7, 8, 9], [0, 1]),            # a two-token word: its right neighbour only
             ([3], [0])]                     # the word alone: no context
  bag = sense_probes.context_bag(table, encoded, tokens=2)
  np.testing.assert_allclose(bag[0], table[[1, 2, 4, 5]].mean(0))
  np.testing.assert_allclose(bag[1], table[9])
  np.testing.assert_array_equal(bag[2], [0, 0])
  # one neighbour each side; the same word in a different context gets another vector
  one = sense_probes.context_bag(table, [([1, 2, 3], [1]), ([4, 2, 5], [1])], tokens=1)
  np.testing.assert_allclose(one, [table[[1, 3]].mean(0), table[[4, 5]].mean(0)])
  with pytest.raises(ValueError, match="at least one token"):
    sense_probes.context_bag(table, encoded, tokens=0)
  with pytest.raises(ValueError, match="marks no token"):
    sense_probes.context_bag(table, [([1, 2], [])], tokens=1)
