"""The decisive comparison: the same transformer on fsqtok, BPE and raw-byte tokens.

  python experiments/compare_tokenizers_lm.py --config=configs/compare_lm.py \
      --config.codec_workdirs=builtin=runs/builtin,ts=runs/ts --workdir=runs/compare

Budgets: ``bytes`` trains every model on ``train_bytes`` training bytes (step count
``train_bytes / (batch_size * seq_len * training bytes per token)``: longer tokens, fewer
steps and FLOPs); ``flops`` trains every model for the FLOPs the BPE model spends on
``train_bytes`` (longer tokens then see more bytes). Held-out bits per byte for each
(corpus, vocabulary size, budget, tokenizer, seed).

Arguments: "" (CPU default: d=128 2-layer LM, 1 MB of training bytes per run) | dev (one
corpus, 4096 ids, equal FLOPs, 3 seeds: fsqtok, BPE and SentencePiece unigram; ~15 min on
2 cores) | tiny (the tests: a d=32 LM on 20 kB, one seed, two evaluations a run).
"""
import ml_collections

from configs import curriculum


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "dev", "tiny"):
    raise ValueError(f"Unknown configs/compare_lm.py argument {arg!r}: use '', dev or tiny.")
  c = curriculum.get_config("tiny" if arg == "tiny" else "")
  c.phase = "compare_lm"
  # corpus name -> corpus spec; the codec run of each corpus (needed by the factorized
  # heads and by tokenizer.vocabulary="codec_exact") is given by codec_workdirs
  # "name=dir,name=dir".
  c.corpora = "builtin=builtin,ts=files:../shared/data/tinyshakespeare.txt"
  c.codec_workdirs = ""
  c.vocab_sizes = (4096, 16384)
  c.seeds = (0, 1, 2)
  c.variants = ("fsqtok-table", "hf-bpe", "sp-unigram", "raw-bytes")
  c.train_bytes = 1_000_000
  c.phrase_fraction = 0.1  # tokenizer.phrase_fraction of the fsqtok-phrases-table variant
  # bytes: equal training bytes; flops: equal training FLOPs (what BPE spends on train_bytes)
  c.budgets = ("bytes", "flops")
  m = c.lm.model
  m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 128, 2, 2, 512
  m.embedding, m.head = "table", "tied"
  c.lm.data.seq_len, c.lm.data.batch_size = 64, 16
  c.lm.optim.learning_rate = 3e-3
  c.lm.optim.warmup_steps = 50
  c.lm.train.update({"log_every": 25, "eval_every": 0, "evals_per_run": 6,
                     "checkpoint_every": 100000, "progress_bar": False})
  c.generation_tokens = 128
  if arg == "dev":
    c.corpora = "builtin=builtin"
    c.vocab_sizes = (4096,)
    c.budgets = ("flops",)
    c.variants = ("fsqtok-table", "hf-bpe", "sp-unigram")
  if arg == "tiny":
    c.vocab_sizes = (400,)
    c.seeds = (0,)
    c.budgets = ("bytes",)
    c.train_bytes = 20_000
    c.generation_tokens = 8
    # the model and evaluations of configs/curriculum.py's tiny LM: the test checks the
    # pipeline, and held-out evaluations were most of its time
    m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 32, 2, 2, 64
    c.lm.train.evals_per_run = 2
  return c
