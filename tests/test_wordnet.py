"""The WordNet reader on a tiny database in WordNet's format, and the missing-database error."""
import collections
import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import fuser as fuser_config
from conftest import REPO
from fsqtok.data import corpus
from fsqtok.studies import wordnet

ENTRIES = {
    "bank": {"sloping land beside a body of water": ["they pulled the canoe up on the bank",
                                                     "he sat on the banks of the river"],
             "a financial institution": ["he cashed a check at the bank",
                                         "that bank holds the mortgage", "no word here"]},
    "plant": {"a living organism": ["the plant needs water", "water the plants daily"],
              "a factory": ["the plant closed", "they built a power plant"],
              "a trick": ["it was a plant"]},
    "river": {"a large stream": ["the river flooded", "swim in the river"]},
}


@pytest.fixture
def db(tmp_path):
  wordnet.write_fixture(str(tmp_path), ENTRIES)
  return str(tmp_path)


def test_reader_parses_index_and_data(db):
  index = wordnet.read_index(db, "n")
  synsets = wordnet.read_synsets(db, "n")
  assert sorted(index) == ["bank", "plant", "river"]
  assert len(index["bank"]) == 2 and len(index["plant"]) == 3
  first = synsets[index["bank"][0]]
  assert first.lemmas == ("bank",) and first.gloss.startswith("sloping land")
  assert first.examples == ("they pulled the canoe up on the bank",
                            "he sat on the banks of the river")
  # offsets are byte positions in data.noun, as in the real database
  with open(os.path.join(db, "data.noun"), "rb") as f:
    f.seek(index["plant"][1])
    assert f.readline().decode().split(" | ")[1].startswith("a factory")
  assert wordnet.sense_counts(db, "n") == {"bank": 2, "plant": 3, "river": 1}


def test_sense_examples_keep_polysemous_words_with_enough_examples(db):
  ex = wordnet.sense_examples(db, ("n",), min_examples_per_sense=2)
  assert {e.word for e in ex} == {"bank", "plant"}       # river has one sense
  assert len({e.sense for e in ex if e.word == "plant"}) == 2  # "a trick" has one example
  assert "no word here" not in {e.sentence for e in ex}
  banks = [e for e in ex if e.sentence.startswith("he sat")][0]
  assert banks.sentence[banks.start:banks.end] == "banks"
  assert wordnet.find_word("Bankrupt", "bank") is None
  assert wordnet.find_word("banking on it", "bank") == (0, 7)
  assert wordnet.find_word("The Bank.", "bank") == (4, 8)


def test_examples_seen_in_the_training_text_are_dropped(db):
  ex = wordnet.sense_examples(db, ("n",), min_examples_per_sense=2)
  kept, dropped = wordnet.drop_seen(ex, ["Once upon a time THE PLANT CLOSED for good.",
                                         "no overlap here"])
  assert dropped == 1 and "the plant closed" not in {e.sentence for e in kept}
  assert len(kept) == len(ex) - 1
  assert wordnet.drop_seen(ex, []) == (ex, 0)
  # "plant" is left with one example of "a factory": that sense goes, and with it the
  # lemma (one sense left); "bank" keeps both senses
  kept = [kept[i] for i in wordnet.keep_polysemous(kept, min_examples_per_sense=2)]
  assert {e.word for e in kept} == {"bank"} and len(kept) == 4


def test_examples_left_after_the_filters_still_have_two_senses_of_a_lemma(db):
  from fsqtok.studies import word_senses  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  config = fuser_config.get_config("tiny")
  config.eval.pos, config.eval.min_examples_per_sense = "n", 2
  # one example of each sense of "bank" is in the training text
  examples, encoded, seen = word_senses.prepare_examples(
      config, Tokenizer([" bank", " plant"]), db,
      ["they pulled the canoe up on the bank", "he cashed a check at the bank"])
  assert seen == 2 and len(examples) == len(encoded) == 4
  assert {e.word for e in examples} == {"plant"}
  assert all(n >= 2 for n in collections.Counter(e.sense for e in examples).values())


@functools.lru_cache(maxsize=None)
def _experiment():
  """The experiment script as a module, loaded once (its absl flags can be defined once)."""
  spec = importlib.util.spec_from_file_location(
      "eval_word_senses", os.path.join(REPO, "experiments", "eval_word_senses.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_missing_database_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
    wordnet.sense_examples(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="--wordnet_dir"):
    _experiment().run(fuser_config.get_config("tiny"), str(tmp_path / "out"),
                      str(tmp_path / "none"))


def test_the_english_config_says_how_to_build_its_corpus(db, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))           # no ~/fsqtok-corpora here
  config = fuser_config.get_config("english")
  assert config.data.source == "files:~/fsqtok-corpora/books.txt"
  config.eval.pos = "n"                               # the fixture's part of speech
  with pytest.raises(FileNotFoundError, match="make_corpora.py --only books"):
    _experiment().run(config, str(tmp_path / "out"), db)


def _run_on_the_fixture(script, db, workdir, *args):
  """Runs experiments/SCRIPT with configs/fuser.py:tiny on the WordNet fixture ``db``,
  the tiny BERT as its reference encoder, and ``args``; fails with its stderr."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", script),
                         f"--config={os.path.join(REPO, 'configs', 'fuser.py')}:tiny",
                         f"--workdir={workdir}", f"--wordnet_dir={db}", *args,
                         f"--reference_encoder={os.path.join(REPO, 'tests', 'data', 'tiny_bert')}"],
                        cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_the_word_sense_experiment_runs_on_the_fixture(db, tmp_path):
  out = tmp_path / "out"
  proc = _run_on_the_fixture("eval_word_senses.py", db, out,
                             "--config.eval.fuser_train_fraction=0.5")
  assert "| fuser, with context |" in proc.stdout
  with open(out / "report.json") as f:
    report = json.load(f)
  train, _ = corpus.load_split(fuser_config.get_config("tiny").data)
  share = report["fuser"]["train_bytes"] / sum(len(t.encode()) for t in train)
  assert 0.4 < share < 0.6  # the fuser trained on about half of the training text
  s = report["word_senses"]
  assert (s["words"], s["senses"], s["examples"]) == (2, 4, 8)
  assert set(s["accuracy"]) == {"majority sense", "static table", "fuser, no context",
                                "fuser, with context", "fuser, gated (as used)",
                                "LM hidden states", "context bag (static table, ±2 tokens)",
                                "fuser, context part (with - no context)",
                                "reference tiny_bert: input embeddings",
                                "reference tiny_bert: last layer"}
  assert all(len(r["per_seed"]) == 3 and 0 <= r["mean"] <= 1 for r in s["accuracy"].values())
  for kind in ("any form", "same tokens"):
    w = s["word_in_context"][kind]
    assert set(w["accuracy"]) == set(s["accuracy"]) - {"majority sense"}
    assert all(0 <= r["mean"] <= 1 and len(r["per_seed"]) == 3 for r in w["accuracy"].values())
  # bank and plant: 2 same + 2 different pairs each, one lemma for the threshold
  assert s["word_in_context"]["any form"]["pair_sizes"] == [[4, 4]] * 3
  same_tokens = s["word_in_context"]["same tokens"]["accuracy"]
  for name in ("static table", "reference tiny_bert: input embeddings"):
    assert same_tokens[name]["per_seed"] == [0.5] * 3  # one vector per form: chance exactly
  assert "| fuser, with context |" in proc.stdout.split("Word in context")[1]
  rows = report["cost"]["rows"]
  assert {"LM forward, fuser embedding", "LM decode step (KV cache), fuser embedding",
          "fuser alone, at capacity"} <= set(rows)
  assert all(r["seconds_per_token"] > 0 for r in rows.values())
  assert 0 <= report["activation"]["activation_rate"] <= 1


@pytest.mark.slow
def test_the_distillation_check_runs_on_the_fixture(db, tmp_path):
  out = tmp_path / "out"
  proc = _run_on_the_fixture("fuser_distill.py", db, out, "--teacher_rows=48",
                             "--config.fuser.train.num_steps=24",
                             "--config.fuser.train.log_every=4")
  assert "| distilled fuser, with context |" in proc.stdout
  with open(out / "report.json") as f:
    report = json.load(f)
  assert report["teacher_rows"] == 48 and report["teacher_tokens"] > 0
  train = report["train"]
  assert train["steps"] == 24 and train["final"]["loss"] < train["first"]["loss"]
  s = report["word_senses"]
  assert set(s["accuracy"]) == {"majority sense", "distilled fuser, no context",
                                "distilled fuser, with context",
                                "distilled fuser, context part (with - no context)",
                                "distilled fuser, with context, through the head",
                                "reference tiny_bert: input embeddings",
                                "reference tiny_bert: last layer"}
  same_tokens = s["word_in_context"]["same tokens"]["accuracy"]
  assert same_tokens["distilled fuser, no context"]["per_seed"] == [0.5] * 3
  with np.load(out / "teacher.npz") as z:
    assert z["teacher"].shape == (48, 16, 8) and z["teacher"].dtype == np.float16
    assert not (z["has_teacher"] & ~z["valid"]).any()  # padding never has a teacher


def test_malformed_files_are_reported(tmp_path):
  (tmp_path / "index.noun").write_text("bank n x\n")
  (tmp_path / "data.noun").write_text("")
  with pytest.raises(ValueError, match="Malformed line in index.noun"):
    wordnet.read_index(str(tmp_path), "n")
