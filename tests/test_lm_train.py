import json
import math
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import tiny_recon_config
from fsqtok import baselines
from fsqtok import lm as lm_lib
from fsqtok import lm_data
from fsqtok import lm_train
from fsqtok import optimizer as optimizer_lib
from fsqtok import sharding as sharding_lib
from fsqtok import tokenizer_build


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
  ev = lm_train.evaluate_bits_per_byte(model.apply, params, data, num_bytes=33, batch_size=2,
                                       mesh=sharding_lib.data_mesh(1))
  assert ev["tokens"] == 36  # 11 bytes + EOS per text
  assert ev["bits_per_byte"] == pytest.approx(36 * math.log2(259) / 33, rel=1e-5)


def _codec_lm():
  from fsqtok import codec as codec_lib  # pylint: disable=g-import-not-at-top
  config = tiny_recon_config("builtin", "")
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
  c = curriculum.get_config("tiny")
  c.data.source = f"files:{doc_files}/*.txt"
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.train.progress_bar = c.lm.train.progress_bar = False
  c.train.num_steps = 100  # the codec's quality is not what these tests check
  return c


def test_curriculum_end_to_end_resumes_exactly_and_then_does_nothing(doc_files, tmp_path,
                                                                     monkeypatch):
  from fsqtok import curriculum  # pylint: disable=g-import-not-at-top
  config = _curriculum_config(doc_files, tmp_path)
  config.lm.model.head = "factorized"  # the sample then comes from the open code space
  whole = curriculum.run_curriculum(config, str(tmp_path / "whole"))
  assert set(whole) >= {"recon", "lm", "joint", "sample", "bits_per_byte"}
  assert 0 < whole["bits_per_byte"] < 8 and whole["sample"]["text"].startswith("The ")
  assert 0 <= whole["sample"]["open_codes"] <= whole["sample"]["codes"]
  assert whole["lm"]["mfu"] is None  # no known peak FLOP/s on a CPU: "n/a", not nan
  lm_curve = [json.loads(l) for l in open(tmp_path / "whole" / "lm" / "metrics.jsonl")]
  train_loss = [r["loss"] for r in lm_curve if r["split"] == "train"]
  assert train_loss[-1] < train_loss[0]
  v = whole["joint"]["vocabulary"]
  assert v["learned_tokens"] > 0 and 0 <= v["still_exact"] <= 1

  # A run that dies during the lm phase (after its step-10 checkpoint) resumes to the
  # same parameters, metrics and report as the uninterrupted one.
  real_batcher = lm_data.window_batcher

  class DyingBatcher:  # the real batcher, killed at its 14th batch
    def __init__(self, *args, **kwargs):
      self.inner, self.n = real_batcher(*args, **kwargs), 0
      self.get_state, self.set_state = self.inner.get_state, self.inner.set_state

    def __next__(self):
      self.n += 1
      if self.n == 14:
        raise KeyboardInterrupt("simulated kill")
      return next(self.inner)

  dying_batcher = DyingBatcher

  monkeypatch.setattr(lm_data, "window_batcher", dying_batcher)
  # (the finished codec and vocabulary are copied: the run starts at the lm phase)
  for name in ("recon", "vocab"):
    shutil.copytree(tmp_path / "whole" / name, tmp_path / "killed" / name)
  shutil.copy(tmp_path / "whole" / tokenizer_build.VOCABULARY_FILE, tmp_path / "killed")
  with pytest.raises(KeyboardInterrupt):
    curriculum.run_curriculum(config, str(tmp_path / "killed"))
  monkeypatch.setattr(lm_data, "window_batcher", real_batcher)
  resumed = curriculum.run_curriculum(config, str(tmp_path / "killed"))
  for phase in ("lm", "joint"):
    assert resumed[phase]["validation"] == pytest.approx(whole[phase]["validation"], rel=1e-5)
  assert resumed["sample"] == whole["sample"]
  # Finished: a second run trains nothing and reports the same.
  again = curriculum.run_curriculum(config, str(tmp_path / "whole"))
  assert again["bits_per_byte"] == whole["bits_per_byte"]


def test_curriculum_with_the_fuser_embedding(doc_files, tmp_path):
  """The fuser phase trains the fuser, the LM starts from it, the sample is generated
  through the key/value cache, and a finished run loads with the same ambiguous set."""
  from fsqtok import curriculum  # pylint: disable=g-import-not-at-top
  config = _curriculum_config(doc_files, tmp_path)
  config.lm.model.embedding, config.lm.model.head = "fuser", "dense"
  config.fuser.train.num_steps = 4
  config.lm.train.update(num_steps=4, eval_every=4, checkpoint_every=4)
  config.sample.max_new_tokens = 4
  fused = curriculum.run_curriculum(config, str(tmp_path / "fuser"))
  assert fused["fuser"]["steps"] == 4 and np.isfinite(fused["fuser"]["final"]["loss"])
  assert 0 < fused["bits_per_byte"] < 8 and fused["sample"]["text"].startswith("The ")
  assert "skipped" in fused["joint"]
  _, model, params = curriculum.load_lm(config, str(tmp_path / "fuser"))
  with open(tmp_path / "fuser" / "fuser" / curriculum.AMBIGUOUS_FILE) as f:
    assert model.embedding == "fuser" and model.ambiguous_ids == tuple(json.load(f))
  with pytest.raises(ValueError, match="does not fit"):
    curriculum.with_fuser(params, {"static": params["embed"]["fuser"]["static"]})


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
  mesh = sharding_lib.data_mesh(1)
  assert lm_train.peak_flops(mesh, 1e12) == 1e12
  assert math.isnan(lm_train.peak_flops(mesh)) == (jax.devices()[0].platform == "cpu")
