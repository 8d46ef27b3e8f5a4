import os
import chex
import jax
import numpy as np
import pytest

from configs import recon as recon_config
from fsqtok.codec import model as codec_lib
from fsqtok.tokenizer.pieces import pieces_to_array, split_pieces
from fsqtok.train import recon


@pytest.mark.parametrize("arg", ["", "tiny", "long", "full", "source"])
def test_every_config_builds_and_trains_one_step(arg):
  config = recon_config.get_config(arg)
  model = codec_lib.codec_from_config(config.model)
  state = recon.create_state(config, model, jax.random.PRNGKey(0))
  b, l = pieces_to_array(split_pieces("Every config trains: one step, 8 pieces!"))
  batch = {"bytes": b[:8], "lengths": l[:8]}
  new_state, metrics = jax.jit(recon.train_step)(state, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["loss"]))
  assert int(new_state.step) == 1
  chex.assert_trees_all_equal_shapes(state.params, new_state.params)
  assert config.train.num_steps >= 1 and config.data.batch_size >= 1


def test_default_levels_match_the_design():
  assert tuple(recon_config.get_config("").model.levels) == (8, 8, 8, 8, 8, 5, 5, 5)


def test_unknown_argument():
  with pytest.raises(ValueError, match="Unknown configs/recon.py argument"):
    recon_config.get_config("huge")


@pytest.mark.parametrize("module,arg", [("curriculum", ""), ("curriculum", "full"),
                                        ("compare_lm", "")])
def test_lm_configs_build_their_model(module, arg):
  import importlib  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fsqtok.models import lm as lm_lib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  v = 300
  codec = codec_lib.codec_from_config(config.model)
  model = lm_lib.lm_from_config(
      config.lm.model, v, token_codes=[-1] * 13 + list(range(v - 13)), levels=config.model.levels,
      token_bytes=[None] * 13 + [b"ab"] * (v - 13), codec=codec,
      token_counts=list(range(v, 0, -1)))
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, config.lm.data.seq_len), jnp.int32)))
  assert shapes["params"]
  assert config.lm.data.seq_len <= config.lm.model.max_len or config.lm.model.positions == "rope"
  if config.lm.model.embedding == "codec":
    assert "codec" in shapes["params"]


@pytest.mark.parametrize("field, value, message", [
    ("data.batch_size", 12, r"data.batch_size: Batch size 12 must be divisible by the 8"),
    ("train.eval_batch_size", 20, r"train.eval_batch_size: Batch size 20 must be divisible "
                                  r"by the 8"),
    ("model.levels", (8, 1, 5), r"model.levels: FSQ levels must be .* >= 2"),
    ("vocab.size", 200, r"vocab_size=200 leaves no room"),
    ("tokenizer.unused", "prune", r"tokenizer.unused='prune' is unknown: use one of"),
    ("tokenizer.runs", "words", r"tokenizer.runs='words' is unknown: use one of"),
    ("lm.model.embedding", "tabel", r"lm.model.embedding='tabel' is unknown"),
    ("lm.model.head", "tide", r"lm.model.head='tide' is unknown"),
    ("lm.train.num_steps", 0, r"lm.train.num_steps must be >= 1"),
    ("joint.num_steps", -1, r"joint.num_steps must be >= 0"),
    ("lm.train.eval_batch_size", 12, r"lm.train.eval_batch_size: Batch size 12 must be "
                                     r"divisible by the 8 devices"),
    ("train.num_steps", -5, r"train.num_steps must be >= 1"),
    ("lm.data.batch_size", 6, r"lm.data.batch_size: Batch size 6"),
    ("lm.data.loader", "tfrecord", r"lm.data.loader='tfrecord' is unknown"),
    ("lm.train.sharding.model_parallel", 3, r"lm.train: .*model_parallel=3 must be >= 1 "
                                            r"and divide the 8 devices"),
    ("train.sharding.model_parallel", 0, r"train: .*model_parallel=0"),
    # the fuser embedding's spec and its training phase
    ("lm.model.fuser.gate_mode", "bogus", r"lm.model.fuser.gate_mode must be one of"),
    ("lm.model.fuser.max_token_bytes", 8, r"lm.model.fuser.max_token_bytes=8 is below"),
    ("fuser.data.batch_size", 3, r"fuser.data.batch_size: Batch size 3"),
    ("fuser.loss.nce_samples", 10_000, r"fuser.loss.nce_samples=10000 must be between 1 "
                                       r"and the batch's"),
    ("fuser.loss.reference_every", 0, r"fuser.loss.reference_every must be >= 1"),
    ("fuser.loss.nce_weight_typo", 1.0, r"fuser.loss has unknown fields \['nce_weight_typo'\]"),
    # what the LM is built with only after the codec and vocabulary phases
    ("lm.model.dtype", "fp16", r"lm.model.dtype must be one of"),
    ("lm.model.positions", "alibi", r"lm.model.positions must be one of"),
    ("lm.data.seq_len", 0, r"lm.data.seq_len must be >= 1"),
    ("lm.model.max_len", 16, r"lm.data.seq_len=32 \(\+ 0 registers\) exceeds "
                             r"lm.model.max_len=16"),
    # used on the LM's devices by the joint phase and the vocabulary check after it
    ("joint.piece_batch_size", 12, r"joint.piece_batch_size: Batch size 12"),
    ("train.eval_batch_size", 12, r"train.eval_batch_size \(the codec's, on the LM's"),
])
def test_a_bad_curriculum_config_stops_before_any_work(field, value, message, tmp_path):
  from configs import curriculum as curriculum_config  # pylint: disable=g-import-not-at-top
  from fsqtok.train import curriculum  # pylint: disable=g-import-not-at-top
  config = curriculum_config.get_config("tiny")
  config.data.source = f"files:{tmp_path}/does-not-exist/*.txt"  # never read
  if field.startswith(("fuser.", "lm.model.fuser.")):
    config.lm.model.embedding = "fuser"
    config.fuser.train.num_steps = 2
  if field == "lm.model.max_len":
    config.lm.model.positions = "learned"
  if field == "train.eval_batch_size" and value == 12:
    # the codec's own mesh (a data axis of 4: 12 splits) passes; the LM's 8 devices do not
    config.train.sharding.model_parallel = 2
  node, *path = config, *field.split(".")
  for name in path[:-1]:
    node = node[name]
  node[path[-1]] = value
  with pytest.raises(ValueError, match=message):
    curriculum.run_curriculum(config, str(tmp_path / "work"))
  assert os.listdir(tmp_path / "work") == []  # nothing written (the lock is gone)
