import copy
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import mlp_codec, tiny_recon_config
from fsqtok.data import corpus as corpus_lib
from fsqtok.data import lm_data
from fsqtok.models import lm as lm_lib
from fsqtok.tokenizer import baselines
from fsqtok.tokenizer import build as tokenizer_build
from fsqtok.train import checkpoint as checkpoint_lib
from fsqtok.train import lm_train
from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import recon
from fsqtok.train import sharding as sharding_lib
from fsqtok.train import workdir as workdir_lib


class _ByteTok:
  vocab_size, pad_id, bos_id, eos_id = 259, 256, 257, 258

  def encode(self, text):
    return list(text.encode("utf-8"))


def test_windows_targets_and_weights():
  stream = lm_data.token_stream(_ByteTok(), ["ab", "c"])
  assert stream.tolist() == [257, 97, 98, 258, 257, 99, 258]
  w = lm_data.windows(stream, 3, pad_id=256, bos_id=257)
  assert w["inputs"].tolist() == [[257, 97, 98], [258, 257, 99]]
  assert w["targets"].tolist() == [[97, 98, 258], [257, 99, 258]]
  # The second BOS is not scored; nothing is padded here.
  assert w["weights"].tolist() == [[1, 1, 1], [0, 1, 1]]
  w = lm_data.windows(stream, 4, pad_id=256, bos_id=257)
  assert w["targets"].tolist() == [[97, 98, 258, 257], [99, 258, 256, 256]]
  assert w["weights"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
  assert w["valid"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_batcher_state_round_trip():
  data = lm_data.windows(np.arange(200, dtype=np.int32), 4, pad_id=0, bos_id=1)
  a = lm_data.window_batcher(data, 5, seed=3)
  for _ in range(13):
    next(a)
  b = lm_data.window_batcher(data, 5, seed=3)
  b.set_state(a.get_state())
  for _ in range(5):
    chex.assert_trees_all_equal(next(a), next(b))


def test_a_uniform_model_has_log2_v_bits_per_token():
  data = lm_data.windows(lm_data.token_stream(_ByteTok(), ["hello world"] * 3), 8, 256, 257)
  model = lm_lib.TransformerLM(vocab_size=259, d_model=16, num_layers=1, num_heads=2,
                               mlp_dim=16, head="dense")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(jnp.zeros_like, params)  # zero logits: uniform over 259 tokens
  ev = lm_train.evaluate_bits_per_byte(model.apply, params, lm_data.eval_batches(data, 2),
                                       num_bytes=33, mesh=sharding_lib.data_mesh(1))
  assert ev["tokens"] == 36  # 11 bytes + EOS per text
  assert ev["bits_per_byte"] == pytest.approx(36 * math.log2(259) / 33, rel=1e-5)


def _codec_lm():
  from fsqtok.codec import model as codec_lib  # pylint: disable=g-import-not-at-top
  config = mlp_codec(tiny_recon_config("builtin", ""))
  codec = codec_lib.codec_from_config(config.model)
  tb = [None] * 3 + [bytes([b]) for b in range(97, 123)] + [b"th", b"he", b" the"]
  model = lm_lib.TransformerLM(vocab_size=len(tb), d_model=32, num_layers=1, num_heads=2,
                               mlp_dim=32, embedding="codec", head="dense",
                               token_bytes=tuple(tb), codec=codec)
  return model, len(tb)


def _batch(v, b=8, t=12, seed=0):
  ids = np.random.RandomState(seed).randint(3, v, (b, t + 1)).astype(np.int32)
  ids[:, 1::2] = ids[:, 0:-1:2]  # a learnable pattern: every odd token repeats the previous
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((b, t), np.float32),
          "valid": np.ones((b, t), bool)}


@pytest.mark.slow
def test_frozen_codec_does_not_move_and_the_rest_learns(tmp_path):
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  model, v = _codec_lm()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  optim = tiny_recon_config("builtin", "").optim
  optim.learning_rate, optim.warmup_steps = 1e-2, 1
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optimizer_lib.make_optimizer(optim, 60, params, frozen=("codec",)))
  step = jax.jit(lm_train.train_step)
  losses = []
  for i in range(60):
    state, m = step(state, {"lm": _batch(v, seed=i % 4)}, jax.random.PRNGKey(i))
    losses.append(float(m["loss"]))
  chex.assert_trees_all_equal(state.params["codec"], params["codec"])
  before = traverse_util.flatten_dict({k: p for k, p in params.items() if k != "codec"})
  after = traverse_util.flatten_dict({k: p for k, p in state.params.items() if k != "codec"})
  assert all(not np.allclose(before[k], after[k]) for k in before)
  assert np.mean(losses[-10:]) < 0.92 * np.mean(losses[:5])
  # The LM loss does reach the codec (it is frozen by the optimizer, not by the graph).
  grads = jax.grad(lambda p: lm_train.lm_loss(p, model.apply, _batch(v), jax.random.PRNGKey(0))[0])(params)
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["codec"]["encoder"]))


def test_lm_step_on_8_devices_equals_1():
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  model = lm_lib.TransformerLM(vocab_size=40, d_model=32, num_layers=2, num_heads=2, mlp_dim=32)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  optim = tiny_recon_config("builtin", "").optim
  results = []
  for n in (1, 8):
    mesh = sharding_lib.data_mesh(n)
    repl, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharded(mesh)
    state = jax.device_put(train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optimizer_lib.make_optimizer(optim, 10, params, ())), repl)
    step = jax.jit(lm_train.train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl))
    for i in range(3):
      batch = sharding_lib.shard_batch({"lm": _batch(40, b=16, seed=i)}, mesh)
      state, metrics = step(state, batch, jax.random.PRNGKey(i))
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  chex.assert_trees_all_close(results[0][0], results[1][0], rtol=2e-4, atol=2e-5)
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-4)


def _curriculum_config(doc_files, tmp_path):
  from configs import curriculum  # pylint: disable=g-import-not-at-top
  c = mlp_codec(curriculum.get_config("tiny"))  # what is tested surrounds the codec
  c.data.source = f"files:{doc_files}/*.txt"
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.train.progress_bar = c.lm.train.progress_bar = False
  c.train.num_steps = 100  # the codec's quality is not what these tests check
  return c


# Measured on every run, so never equal between two runs.
_RUN_SPECIFIC = {"train_wall_seconds", "train_tokens_per_second", "mfu"}


def _assert_same_report(got, want, where="report"):
  """Equal reports: the same keys and values, floats to 1e-5, run-specific figures aside."""
  if isinstance(want, dict):
    assert set(got) == set(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
    for k in set(want) - _RUN_SPECIFIC:
      _assert_same_report(got[k], want[k], f"{where}[{k!r}]")
  elif isinstance(want, float):
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7, nan_ok=True), where
  else:
    assert got == want, where


@pytest.fixture(scope="module")
def finished_curriculum(doc_files, tmp_path_factory):
  """A tiny curriculum run to the end in ``ROOT/whole`` (factorized head: the sample comes
  from the open code space), with the part of the work directory each write went to."""
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  import kill_at  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("curriculum")
  config = _curriculum_config(doc_files, root)
  config.lm.model.head = "factorized"
  config.tokenizer.decoder_steps = 30  # the lm phase starts from the tokenizer's codec
  writes = []
  with kill_at.recording(str(root / "whole"), writes):
    report = curriculum.run_curriculum(config, str(root / "whole"))
  return config, root, report, writes


def test_vocabulary_drift_counts_only_what_joint_training_changed():
  from fsqtok.codec import model as codec_lib  # pylint: disable=g-import-not-at-top
  from fsqtok.tokenizer.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  config = mlp_codec(tiny_recon_config("builtin", ""))
  codec = codec_lib.codec_from_config(config.model)
  init = lambda seed: codec.init(jax.random.PRNGKey(seed),
                                 jnp.zeros((1, codec.max_len), jnp.uint8),
                                 jnp.ones((1,), jnp.int32))["params"]
  strings = ["the", " and", "ing", " of", "tion", " to", "er", " a"]
  # codes the build assigned (here all the same: assigned codes are not what is compared)
  tok = Tokenizer(strings, codes=[0] * len(strings))
  mesh = sharding_lib.data_mesh(1)
  same = curriculum.vocabulary_drift(codec, init(0), init(0), tok, mesh=mesh, batch_size=4)
  assert same["same_code"] == 1.0 and same["learned_tokens"] == len(strings)
  moved = jax.tree.map(lambda x: 30 * x, init(1))  # an encoder that spreads the strings
  other = curriculum.vocabulary_drift(codec, init(0), moved, tok, mesh=mesh, batch_size=4)
  assert other["same_code"] < 1.0 and 0 <= other["still_exact"] <= 1


@pytest.mark.slow
@pytest.mark.xdist_group("curriculum")
def test_curriculum_end_to_end_and_then_does_nothing(finished_curriculum):
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  config, root, whole, writes = finished_curriculum
  assert set(whole) >= {"recon", "lm", "joint", "sample", "bits_per_byte"}
  assert 0 < whole["bits_per_byte"] < 8 and whole["sample"]["text"].startswith("The ")
  assert 0 <= whole["sample"]["open_codes"] <= whole["sample"]["codes"]
  assert whole["lm"]["mfu"] is None  # no known peak FLOP/s on a CPU: "n/a", not nan
  lm_curve = [json.loads(l) for l in open(root / "whole" / "lm" / "metrics.jsonl")]
  train_loss = [r["loss"] for r in lm_curve if r["split"] == "train"]
  assert train_loss[-1] < train_loss[0]
  v = whole["joint"]["vocabulary"]
  assert v["learned_tokens"] > 0 and 0 <= v["still_exact"] <= 1
  # The lm phase's frozen codec is the one saved with the tokenizer (its decoder trained
  # on the assigned codes), not the codec run's last checkpoint.
  tok, model, _ = curriculum.load_lm(config, str(root / "whole"))
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  lm_codec = lm_train.load_phase_params(str(root / "whole" / "lm"), init)["codec"]
  _, run_codec = recon.load_trained_codec(tokenizer_build.codec_config(config),
                                          str(root / "whole"))
  saved = tokenizer_build.load_codec_params(str(root / "whole" / "vocab"), run_codec)
  chex.assert_trees_all_close(lm_codec, saved)
  chex.assert_trees_all_close(lm_codec["encoder"], run_codec["encoder"])
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(lm_codec["decoder"]),
                                                    jax.tree.leaves(run_codec["decoder"])))
  # The phases write in order: vocabulary, codec, tokenizer, lm, joint, report.
  order = [p for k, p in enumerate(writes) if k == 0 or writes[k - 1] != p]
  assert order == [tokenizer_build.VOCABULARY_FILE, "recon", "vocab", "lm", "joint",
                   "curriculum_report.json"]
  # Finished: a second run trains nothing and reports the same.
  again = curriculum.run_curriculum(config, str(root / "whole"))
  _assert_same_report(again, whole)


@pytest.mark.slow
@pytest.mark.xdist_group("curriculum")
def test_curriculum_killed_at_seeded_moments_ends_with_the_same_report(finished_curriculum,
                                                                       tmp_path):
  """SIGKILL in every phase (a seeded write of each, before, during or after it), each
  time resumed on the same work directory: the final report is the uninterrupted one's."""
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  import kill_at  # pylint: disable=g-import-not-at-top
  config, root, whole, writes = finished_curriculum
  config_path = tmp_path / "config.pickle"
  config_path.write_bytes(pickle.dumps(config))
  rng = random.Random(0)
  groups = [(tokenizer_build.VOCABULARY_FILE, "recon"), ("vocab",), ("lm",), ("joint",)]
  killed = tmp_path / "killed"
  for group in groups:
    part = rng.choice(group)
    ordinal = rng.randrange(writes.count(part))
    mode = rng.choice(kill_at.MODES)
    proc = subprocess.run([sys.executable, kill_at.__file__, str(config_path), str(killed),
                           part, str(ordinal), mode], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)
    assert proc.returncode == -signal.SIGKILL, (part, ordinal, mode, proc.stderr[-3000:])
    assert not (killed / "curriculum_report.json").exists()
  resumed = curriculum.run_curriculum(config, str(killed))
  _assert_same_report(resumed, whole)
  for phase in ("recon", "lm", "joint"):  # one history each: no step lost or repeated
    steps = [[(r["step"], r["split"]) for r in workdir_lib.MetricsLog.read(
        str(run / phase / "metrics.jsonl"))] for run in (root / "whole", killed)]
    assert steps[0] == steps[1], phase


@pytest.mark.slow
@pytest.mark.xdist_group("curriculum")
def test_curriculum_sets_damaged_files_aside_and_makes_them_again(finished_curriculum,
                                                                  tmp_path, caplog):
  """Files of a finished run damaged afterwards (the lm phase's final checkpoint
  overwritten, a report cut short, the tokenizer and the vocabulary cache overwritten):
  each is reported, kept as ``.damaged`` and made again, to the same report (the lm
  phase trains again from its newest checkpoint that reads)."""
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  config, root, whole, _ = finished_curriculum
  work = tmp_path / "work"
  shutil.copytree(root / "whole", work)
  final = _damage_final_checkpoint(work / "lm")
  report = work / "joint" / "report.json"
  report.write_bytes(report.read_bytes()[:40])
  (work / "vocab" / "tokenizer.json").write_bytes(b"\x00garbage")
  (work / tokenizer_build.VOCABULARY_FILE).write_text("{\"strings\": [")
  again = curriculum.run_curriculum(config, str(work))
  _assert_same_report(again, whole)
  for damaged in (final, report, work / "vocab", work / tokenizer_build.VOCABULARY_FILE):
    assert os.path.exists(f"{damaged}.damaged"), damaged
  for damaged in (work / "lm" / "report.json", report, work / "vocab",
                  work / tokenizer_build.VOCABULARY_FILE):
    assert f"{damaged} cannot be read" in caplog.text
  assert f"checkpoint {final.name} in" in caplog.text
  curriculum.load_lm(config, str(work))  # the repaired run loads
  _damage_final_checkpoint(work / "joint")
  with pytest.raises(checkpoint_lib.DamagedFile, match="Run the curriculum again"):
    curriculum.load_lm(config, str(work))


def _damage_final_checkpoint(phase_dir):
  """Overwrites every file of the phase's newest checkpoint; returns its directory."""
  steps = [p for p in (phase_dir / "checkpoints").iterdir() if p.name.isdigit()]
  final = max(steps, key=lambda p: int(p.name))
  for f in final.rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")
  return final


def _started_from_the_finished_vocabulary(finished_curriculum, work):
  """A copy of the finished run's config, and ``work`` holding its codec and vocabulary
  (so a curriculum run there starts at the phases after them)."""
  config, root, _, _ = finished_curriculum
  for name in ("recon", "vocab"):
    shutil.copytree(root / "whole" / name, work / name)
  shutil.copy(root / "whole" / tokenizer_build.VOCABULARY_FILE, work)
  return copy.deepcopy(config)


@pytest.mark.slow
@pytest.mark.xdist_group("curriculum")
def test_curriculum_with_the_fuser_embedding(finished_curriculum, tmp_path):
  """The fuser phase trains the fuser, the LM starts from it, the sample is generated
  through the key/value cache, and a finished run loads with the same ambiguous set.
  Both read their windows through Grain from token stores (the fuser's are shorter:
  a store of their own)."""
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  # (the run starts at the fuser phase)
  config = _started_from_the_finished_vocabulary(finished_curriculum, tmp_path / "fuser")
  config.lm.model.embedding, config.lm.model.head = "fuser", "dense"
  config.lm.data.loader, config.lm.data.shards = "grain", 2
  config.fuser.train.num_steps = 4
  config.fuser.data.seq_len = 16
  config.lm.train.update(num_steps=4, eval_every=4, checkpoint_every=4)
  config.sample.max_new_tokens = 4
  fused = curriculum.run_curriculum(config, str(tmp_path / "fuser"))
  assert fused["fuser"]["steps"] == 4 and np.isfinite(fused["fuser"]["final"]["loss"])
  assert 0 < fused["bits_per_byte"] < 8 and fused["sample"]["text"].startswith("The ")
  assert "skipped" in fused["joint"]
  stores = sorted((tmp_path / "fuser" / "lm_data").iterdir())
  assert len(stores) == 2 and all(len(list(d.glob("*.array_record"))) == 4 for d in stores)
  _, model, params = curriculum.load_lm(config, str(tmp_path / "fuser"))
  with open(tmp_path / "fuser" / "fuser" / curriculum.AMBIGUOUS_FILE) as f:
    assert model.embedding == "fuser" and model.ambiguous_ids == tuple(json.load(f))
  assert len(model.ambiguous_ids) > 1  # [MASK] and the most varied tokens
  with pytest.raises(ValueError, match="does not fit"):
    curriculum.with_fuser(params, {"static": params["embed"]["fuser"]["static"]})


@pytest.mark.slow
@pytest.mark.xdist_group("curriculum")
def test_curriculum_with_a_head_over_frequency_codes(finished_curriculum, tmp_path):
  """``lm.model.head_codes="frequency"``: the factorized head spells each learned token's
  rank by training count (the most frequent first), the sample is drawn from the
  vocabulary (no codec decoding), and a finished run loads the same codes."""
  from fsqtok.models import embeddings as embeddings_lib  # pylint: disable=g-import-not-at-top
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  work = tmp_path / "ranked"
  config = _started_from_the_finished_vocabulary(finished_curriculum, work)
  m = config.lm.model
  m.embedding, m.head, m.head_codes, m.head_flat_tokens = "table", "factorized_vocab", \
      "frequency", 8
  config.lm.train.update(num_steps=20, eval_every=10, checkpoint_every=20)
  config.sample.max_new_tokens = 4
  report = curriculum.run_curriculum(config, str(work))
  assert np.isfinite(report["bits_per_byte"]) and report["sample"]["text"].startswith("The ")
  assert "open_codes" not in report["sample"] and "skipped" in report["joint"]
  losses = [r["loss"] for r in workdir_lib.MetricsLog.read(str(work / "lm" / "metrics.jsonl"))
            if r["split"] == "train"]
  assert losses[-1] < losses[0]
  tok, model, _ = curriculum.load_lm(config, str(work))
  counts = curriculum.lm_windows(config, str(work), tok, corpus_lib.load_split(config.data)
                                 ).token_counts(len(tok))
  learned = np.array(list(tok.learned_ids))
  codes = np.asarray(model.token_codes)
  assert (np.delete(codes, learned) == -1).all()  # specials and bytes: plain rows
  assert len(set(codes[learned])) == len(learned) and (codes[learned] >= 0).all()
  # (that these codes spell the ranks: tests/test_lm.py)
  assert model.token_codes == embeddings_lib.frequency_codes(
      counts, np.isin(np.arange(len(tok)), learned), config.model.levels)
  m.embedding = "table_code"
  with pytest.raises(ValueError, match="head_codes='frequency'"):
    curriculum.build_lm(config, tok, token_counts=counts)
  m.head = "dense"  # a head that spells nothing: no ranks needed, the codec's codes kept
  assert curriculum.build_lm(config, tok).token_codes == tuple(
      tok.id_to_code(i) for i in range(len(tok)))


@pytest.mark.slow
@pytest.mark.xdist_group("curriculum")
def test_curriculum_on_the_token_store(finished_curriculum, tmp_path):
  """``lm.data.loader="grain"``: the windows are prepared once as shards in
  WORKDIR/lm_data, the lm and joint phases draw and evaluate them there, with the same
  tokens and bytes as the windows in memory; a second run prepares nothing."""
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  whole = finished_curriculum[2]
  work = tmp_path / "store"
  config = _started_from_the_finished_vocabulary(finished_curriculum, work)
  config.lm.data.update(loader="grain", shards=3)
  config.lm.train.update(num_steps=4, eval_every=4, checkpoint_every=4)
  config.joint.num_steps, config.sample.max_new_tokens = 2, 4
  report = curriculum.run_curriculum(config, str(work))
  (store,) = (work / "lm_data").iterdir()
  assert sorted(p.name for p in store.iterdir()) == sorted(
      f"{split}-0000{k}-of-00003.{ext}" for split in ("train", "val") for k in range(3)
      for ext in ("array_record", "json"))
  for phase in ("lm", "joint"):  # every held-out token once, as from the windows in memory
    assert report[phase]["validation"]["tokens"] == whole[phase]["validation"]["tokens"]
    assert np.isfinite(report[phase]["validation"]["bits_per_byte"])
  assert report["lm"]["train_bytes_per_token"] == pytest.approx(
      whole["lm"]["train_bytes_per_token"], rel=1e-9)
  stamps = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
  _assert_same_report(curriculum.run_curriculum(config, str(work)), report)
  assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == stamps


@pytest.mark.parametrize("loader,warned", [("epochs", True), ("grain", False)])
def test_several_processes_loading_the_whole_corpus_are_told(monkeypatch, caplog, loader,
                                                             warned):
  from configs import curriculum as curriculum_config  # pylint: disable=g-import-not-at-top
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  config = curriculum_config.get_config("tiny")
  config.lm.data.loader = loader
  streamed = []
  monkeypatch.setattr(curriculum.corpus_lib, "load_split",
                      lambda data, stream: streamed.append(stream) or ([], []))
  monkeypatch.setattr(curriculum.jax, "process_count", lambda: 2)
  with caplog.at_level("WARNING"):
    curriculum.corpus_texts(config)
  assert streamed == [loader == "grain"]
  assert ("each of the 2 processes loads the whole corpus" in caplog.text) == warned
  assert ("lm.data.loader=grain" in caplog.text) == warned


def test_baseline_token_lengths():
  texts = ["the cat sat on the mat. " * 20, "é and ü are two bytes each. " * 10]
  bpe = baselines.HFBPETokenizer.train(texts, 300)
  lengths = bpe.token_lengths()
  for text in texts:
    ids = bpe.encode(text)
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
  assert lengths[bpe.pad_id] == 0
  byte = baselines.ByteTokenizer()
  assert sum(byte.token_lengths()[i] for i in byte.encode(texts[1])) == len(texts[1].encode())


def test_flops_per_token_counts_the_head_that_is_used():
  codes = tuple([-1] * 10 + list(range(90)))
  kw = dict(vocab_size=100, d_model=16, num_layers=2, num_heads=2, mlp_dim=32,
            token_codes=codes, levels=(5, 4, 5))
  table = lm_lib.TransformerLM(**kw)
  factorized = lm_lib.TransformerLM(**kw, head="factorized")
  blocks = 6 * 2 * (4 * 16 * 16 + 2 * 16 * 32) + 6 * 2 * 8 * 16
  assert lm_train.flops_per_token(table, 8) == blocks + 6 * 16 * 100
  assert lm_train.flops_per_token(factorized, 8) == blocks + 6 * (16 * 11 + 3 * 16 * 16 + 16 * 14)
  flat = lm_lib.TransformerLM(**kw, head="factorized", head_flat_tokens=30,
                              token_counts=tuple(range(100)))
  assert lm_train.flops_per_token(flat, 8) == blocks + 6 * (16 * 41 + 3 * 16 * 16 + 16 * 14)
  mesh = sharding_lib.data_mesh(1)
  assert lm_train.peak_flops(mesh, 1e12) == 1e12
  assert math.isnan(lm_train.peak_flops(mesh)) == (jax.devices()[0].platform == "cpu")
