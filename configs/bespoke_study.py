"""Study: bespoke (frequency-bucketed) embedding widths against plain tables (issue 6).

  nice -n 10 python experiments/bespoke_study.py --config=configs/bespoke_study.py \
      --workdir=/tmp/bespoke/main --publish_dir=experiments/results \
      --tinyshakespeare=/work/shared/data/tinyshakespeare.txt \
      --tokenizer_tinyshakespeare=/tmp/exp2/tok_ts_8192 \
      --tokenizer_builtin=/tmp/exp2/tok_builtin_8192
  python experiments/bespoke_study.py --config=configs/bespoke_study.py:tiny \
      --workdir=/tmp/bespoke_tiny

Arguments (``get_config(arg)``):
  ""    the study reported in experiments/README.md: two synthetic settings (the source's
        "scaling" setting, vocabulary 200, width 128, 1K/5K/20K/50K training tokens; and
        its "initial" one, vocabulary 100, width 64, 5K tokens) and, when the flags name
        them, two real corpora (tinyshakespeare and the built-in corpus, 8192-token fsqtok
        tokenizers, 200K training tokens, width 64). 5 seeds per cell, 1000 steps each.
        14 min 22 s on 2 CPU cores shared with other jobs (load average ~7); results
        in experiments/README.md.
  tiny  one synthetic setting (vocabulary 50, width 16, 1K tokens), 2 seeds, 150 steps:
        19 s (tests).

The model is a next-token MLP over the previous ``model.context`` tokens, with logits from
the embedding's tied ``attend`` (``model.tied = False``: an untied Dense). Every
embedding gets the same steps, batch size, optimizer and learning-rate schedule. The
parameters kept are those with the lowest validation loss among evaluations every
``train.eval_every`` steps (early stopping within a fixed budget); the reported held-out
loss is on a separate test split that neither training nor that choice sees.

Any field can be overridden, e.g. ``--config.train.num_steps=4000``.
"""
import ml_collections

from fsqtok.train.optimizer import adamw_config


def _synthetic(vocab_size, d_model, sizes):
  s = ml_collections.ConfigDict()
  s.enabled = True
  s.vocab_size = vocab_size
  s.d_model = d_model
  s.sizes = sizes              # training tokens: prefixes of one sampled chain
  s.successors = 8             # non-zero transitions per token (before teleporting)
  s.dirichlet_alpha = 0.5      # transition weights among them (small: peaked)
  # Successors are drawn with probability ~ 1/rank**zipf_exponent; 0.6 makes the
  # stationary law's log-log slope about -1.07 (V=200) / -1.06 (V=100): Zipf's law.
  s.zipf_exponent = 0.6
  s.teleport = 0.05            # every row mixes in the Zipf distribution: irreducible
  s.val_tokens = 10_000
  s.test_tokens = 20_000
  s.data_seed = 1234
  return s


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_seeds = 5
  c.embeddings = ("standard", "bespoke", "matched")

  # BespokeEmbed: cumulative occurrence mass thresholds, width multipliers of d_model,
  # hashing of the rarest tokens (hash_rows = 0: off, as in the source).
  c.embed = ml_collections.ConfigDict()
  c.embed.thresholds = (0.80, 0.95)
  c.embed.multipliers = (1.25, 1.0, 0.4)
  c.embed.hash_rows = 0
  c.embed.hash_from = 0.99

  c.model = ml_collections.ConfigDict()
  c.model.context = 3          # previous tokens the predictor sees
  c.model.hidden = 256
  c.model.tied = True          # logits from embed.attend; False: an untied Dense

  c.optim = adamw_config(learning_rate=3e-3, warmup_steps=100)  # AdamW, warmup + cosine

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 128
  c.train.eval_every = 25      # early stopping resolution (1K tokens overfit within 100 steps)
  c.train.max_eval_examples = 8192  # cap per split (evenly spaced positions)
  c.train.eval_chunk = 1024

  c.synthetic = _synthetic(200, 128, (1_000, 5_000, 20_000, 50_000))
  c.synthetic_initial = _synthetic(100, 64, (5_000,))

  c.text = ml_collections.ConfigDict()
  c.text.enabled = True        # each corpus runs only if its flags are given
  c.text.d_model = 64
  c.text.sizes = (200_000,)
  # These override optim.* / train.* for the real corpora. 1e-2: in pilots (docs/bespoke.md) it
  # beat 3e-3 on tinyshakespeare's validation split for every embedding, while 3e-3 was
  # better on the synthetic data at 5K-50K tokens. Evaluating 8K-way logits is costly.
  c.text.learning_rate = 1e-2
  c.text.eval_every = 100
  c.text.max_eval_examples = 4096
  c.text.val_fraction = 0.1    # held out by block hash, then halved into val / test
  c.text.block_chars = 2048
  c.text.split_seed = 0

  if arg == "tiny":
    c.num_seeds = 2
    c.model.hidden = 32
    c.train.num_steps = 150
    c.train.batch_size = 32
    c.train.eval_every = 50
    c.train.max_eval_examples = 1024
    c.optim.warmup_steps = 10
    c.synthetic = _synthetic(50, 16, (1_000,))
    c.synthetic.val_tokens = c.synthetic.test_tokens = 1_000
    c.synthetic_initial.enabled = False
    c.text.enabled = False
  elif arg:
    raise ValueError(f"Unknown configs/bespoke_study.py argument {arg!r}: use '' or tiny.")
  return c
