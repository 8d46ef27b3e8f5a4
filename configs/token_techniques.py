"""Token-level techniques in the LM: registers, soft prompts, pooling heads, token pruning.

  python experiments/token_techniques.py --config=configs/token_techniques.py \
      --config.corpora=builtin=builtin,ts=files:../shared/data/tinyshakespeare.txt \
      --workdir=runs/token_techniques

A byte-level BPE tokenizer (with [CLS]/[SEP]/[MASK] added) and a small LM are trained on
the training splits of the corpora together; then:

* registers: the same LM trained with 0 and with 4 registers: held-out bits per byte and
  the share of attention given to each window's first token;
* classification (which corpus a passage comes from): soft prompt vs full fine-tuning vs
  a linear probe (and pooling heads), accuracy over seeds and trainable parameters;
* pruning: for each keep ratio and score, time per batch (ratio to the unpruned model,
  measured in the same run) and bits per byte on the always-kept tail of each window.

Arguments (``get_config(arg)``): "" (the CPU default; measured once: 1446 s wall on a
2-core CPU shared, at nice 10, with other jobs -- the two LMs 221 s and 267 s, the
18 classifier trainings most of the rest) | tiny (about a minute of CPU; tests and the
notebook). ``corpora`` is ``name=spec,name=spec`` (specs of `fsqtok.data.corpus`); each corpus
is one class.
"""
import ml_collections

from fsqtok.train.optimizer import adamw_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown configs/token_techniques.py argument {arg!r}: use '' or tiny.")
  c = ml_collections.ConfigDict()
  c.phase = "token_techniques"
  c.seed = 0
  c.corpora = "builtin=builtin,ts=files:../shared/data/tinyshakespeare.txt"
  # How each corpus is split into train/validation (as configs/recon.py's data).
  c.data = ml_collections.ConfigDict({
      "val_fraction": 0.05, "split_seed": 0, "block_chars": 2048, "tfds_data_dir": "",
      "text_key": "text", "max_train_chars": 1_500_000})  # per corpus, for the LM and BPE
  c.tokenizer = ml_collections.ConfigDict({"vocab_size": 1024})

  # The base LM: configs/curriculum.py's lm fields (read by fsqtok.train.lm_train).
  c.lm = ml_collections.ConfigDict()
  m = c.lm.model = ml_collections.ConfigDict()
  m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 64, 4, 4, 256
  m.max_len = 512
  m.positions = "rope"
  m.dropout = 0.0
  m.dtype = "float32"
  m.embedding, m.head = "table", "tied"
  m.num_registers = 0            # the register study overrides it
  c.lm.data = ml_collections.ConfigDict({"seq_len": 128, "batch_size": 16})
  c.lm.optim = adamw_config(learning_rate=3e-3, warmup_steps=30, end_lr_ratio=0.05,
                            weight_decay=0.05, b2=0.98)
  c.lm.train = ml_collections.ConfigDict({
      "num_steps": 350, "log_every": 50, "eval_every": 350, "eval_batch_size": 64,
      "checkpoint_every": 350, "keep_checkpoints": 1, "num_devices": 1,
      "progress_bar": True})

  c.registers = ml_collections.ConfigDict({
      "counts": (0, 4),          # registers per sequence, one LM each
      "attention_windows": 64})  # held-out windows the attention share is averaged over

  c.task = ml_collections.ConfigDict({
      "passage_bytes": 256,      # each example: this many bytes of one corpus
      "train_per_class": 256, "test_per_class": 200,
      "max_tokens": 112,         # [BOS] passage [CLS], right-padded
      "label_words": (" code", " thou")})  # one per corpus, in order: verbalizer tokens
  c.classify = ml_collections.ConfigDict({
      "methods": ("zero_shot", "linear_probe", "soft_prompt", "full_finetune",
                  "cls_head", "mean_head", "attention_head"),
      "seeds": (0, 1, 2),
      "num_steps": 120, "batch_size": 32, "eval_batch_size": 100,
      "prompt_length": 8})
  c.classify.optim = ml_collections.ConfigDict({
      "linear_probe": adamw_config(3e-2, 10, weight_decay=0.0),
      "soft_prompt": adamw_config(3e-2, 10, weight_decay=0.0),
      "full_finetune": adamw_config(1e-3, 10, weight_decay=0.01),
      "head": adamw_config(1e-3, 10, weight_decay=0.01)})

  c.pruning = ml_collections.ConfigDict({
      "layer": 1,                # prune after this many layers
      "keep_ratios": (1.0, 0.75, 0.5, 0.25),
      "scores": ("attention", "norm"),
      "tail": 16,                # the last positions of each window: always kept, scored
      "windows": 128, "batch_size": 32,
      "timing_rounds": 7})       # round-robin repeats over all settings; median reported
  c.progress_bar = True

  if arg == "tiny":
    c.data.max_train_chars = 20_000
    c.tokenizer.vocab_size = 300
    m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 32, 2, 2, 64
    c.lm.data.seq_len, c.lm.data.batch_size = 32, 8
    c.lm.optim.warmup_steps = 3
    c.lm.train.update({"num_steps": 10, "log_every": 5, "eval_every": 10,
                       "eval_batch_size": 16, "checkpoint_every": 10, "progress_bar": False})
    c.registers.attention_windows = 8
    c.task.update({"passage_bytes": 64, "train_per_class": 16, "test_per_class": 8,
                   "max_tokens": 40})
    c.classify.update({"methods": ("zero_shot", "linear_probe", "soft_prompt",
                                   "full_finetune"),
                       "seeds": (0,), "num_steps": 4, "batch_size": 8,
                       "eval_batch_size": 8, "prompt_length": 2})
    c.pruning.update({"keep_ratios": (1.0, 0.5), "tail": 4, "windows": 8, "batch_size": 4,
                      "timing_rounds": 1})
    c.progress_bar = False
  return c
