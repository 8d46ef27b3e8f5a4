"""The curriculum: codec (recon) -> vocabulary -> language model (lm) -> joint, then a sample.

  python experiments/train.py --config=configs/curriculum.py --workdir=runs/curriculum
  python experiments/train.py --config=configs/curriculum.py:tiny --workdir=/tmp/tiny

Arguments (``get_config(arg)``):
  ""     CPU default on the built-in corpus (see docs/main_job.md for the measured time): a codec
         trained 8k steps, a 4096-token vocabulary, a 3-layer d=128 LM (1000 steps of
         16 x 128 tokens), 200 joint steps.
  tiny   seconds; for tests and the notebook.
  full   for a GPU/TPU: the `full` codec, a 32768-token vocabulary, a 12-layer d=768 LM in
         bfloat16.

The codec fields (``data``, ``model``, ``optim``, ``train``) are those of configs/recon.py;
the LM's are under ``lm``, the fuser phase's under ``fuser`` (only with
``lm.model.embedding="fuser"``), the joint phase's under ``joint``, the sample's under
``sample``.
"""
import ml_collections

from configs import fuser as fuser_config
from configs import recon as recon_config
from fsqtok.train.optimizer import adamw_config
from fsqtok.train.sharding import sharding_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny", "full"):
    raise ValueError(f"Unknown configs/curriculum.py argument {arg!r}: use '', tiny or full.")
  c = recon_config.get_config("full" if arg == "full" else "")
  c.phase = "curriculum"
  c.vocab = ml_collections.ConfigDict({"size": 4096})
  # The curriculum's codec keeps optim's learning rate and plain decoder (its measured
  # runs); tokenizer.codec_learning_rate and codec_fourier_octaves were measured on 8k
  # and 32k vocabularies only.
  c.tokenizer.codec_learning_rate = 0.0
  c.tokenizer.codec_fourier_octaves = 0
  # Its codec trains train.num_steps; then its decoder learns the assigned codes
  # (the lm and joint phases start from that codec, saved with the tokenizer).
  c.tokenizer.codec_steps = 0
  c.tokenizer.decoder_steps = 4000 if arg == "" else 0

  c.lm = ml_collections.ConfigDict()
  m = c.lm.model = ml_collections.ConfigDict()
  m.d_model = 128
  m.num_layers = 3
  m.num_heads = 4
  m.mlp_dim = 512
  m.max_len = 1024               # learned positions only
  m.positions = "rope"           # rope | learned
  m.dropout = 0.0
  m.dtype = "float32"            # float32 | bfloat16 (accelerators)
  m.embedding = "codec"          # table | bespoke | code_factorized | table_code | codec | fuser (fsqtok/models/embeddings.py)
  # The fuser embedding's hyperparameters (`fsqtok.models.fuser.FuserSpec`; made causal), used
  # only with embedding="fuser"; its pretraining is ``c.fuser`` below.
  m.fuser = fuser_config.model_config(tiny=arg == "tiny")
  m.fuser.window_right = 0
  m.head = "dense"               # tied (table only) | dense | factorized | factorized_vocab
  # factorized heads: the K most frequent tokens with a code get their own row in the first
  # softmax; the FSQ digits spell only the rest (0: every coded token by its digits). At
  # 4096 ids, equal FLOPs: K=1024 gives 3.4% fewer bits per byte than a table head, K=0
  # 11.1% more (docs/language_model.md).
  m.head_flat_tokens = 0 if arg == "tiny" else 1024
  # factorized heads: whose codes the digits spell: "codec" (the codec's; open-vocabulary
  # sampling decodes codes outside the vocabulary) | "frequency" (each token's rank by
  # training count: an adaptive softmax, closed vocabulary). With the table embedding,
  # frequency codes scored as well as the codec's at 4096 ids and 1.2-2.0% better at 16384
  # (docs/language_model.md).
  m.head_codes = "codec"
  # Token-level options (fsqtok/models/lm.py; the study: configs/token_techniques.py), all off:
  m.num_registers = 0            # learned register vectors before every sequence
  m.num_segments = 0             # segment embeddings for [SEP]-joined pairs
  m.prune_layer = 0              # prune the context after this layer (0: never)
  m.prune_keep = 1.0             # fraction of positions kept
  m.prune_score = "attention"    # attention (received) | norm
  m.prune_keep_last = 1          # last positions always kept (their targets are scored)
  # loader: "epochs" (windows in memory; every host makes the global batch) | "grain"
  # (windows prepared once as `shards` array_record files in store_dir, "" for
  # WORKDIR/lm_data, a filesystem every host mounts; the corpus streamed, each host
  # tokenizes its own shards and reads its own rows of the same global batches, for the
  # LM and the fuser: fsqtok/data/token_store.py; a different data order from "epochs",
  # so different numbers). shards >= the number of hosts.
  c.lm.data = ml_collections.ConfigDict({"seq_len": 128, "batch_size": 16, "loader": "epochs",
                                         "shards": 8, "store_dir": ""})
  c.lm.optim = adamw_config(learning_rate=2e-3, warmup_steps=100, end_lr_ratio=0.05,
                            weight_decay=0.05, b2=0.98)
  c.lm.train = ml_collections.ConfigDict({
      "num_steps": 1000, "log_every": 50, "eval_every": 250, "eval_batch_size": 64,
      "checkpoint_every": 250, "keep_checkpoints": 2, "num_devices": 0,
      "progress_bar": True,
      # replicated state by default; fsdp / model_parallel split it (fsqtok/train/sharding.py)
      "sharding": sharding_config(),
      # MFU denominator; 0: looked up by device kind (fsqtok/lm_train.PEAK_FLOPS)
      "peak_flops_per_device": 0.0})

  # With lm.model.embedding="fuser": the fuser phase trains it first (masked LM + InfoNCE
  # + drift; configs/fuser.py's training fields); num_steps=0: the LM starts from a fresh one.
  c.fuser = fuser_config.training_config(tiny=arg == "tiny")

  c.joint = ml_collections.ConfigDict()
  c.joint.num_steps = 200        # 0: no joint phase
  c.joint.recon_weight = 1.0     # loss = LM loss + recon_weight * reconstruction loss
  c.joint.piece_batch_size = 128
  c.joint.optim = adamw_config(learning_rate=3e-4, warmup_steps=20, end_lr_ratio=0.1,
                               weight_decay=0.05, b2=0.98)

  c.sample = ml_collections.ConfigDict({
      "prompt": "The ", "max_new_tokens": 64, "temperature": 0.8, "top_k": 0, "top_p": 0.95,
      "seed": 0})

  c.train.num_steps = 8000       # the codec: shorter than configs/recon.py's 16k
  c.train.eval_every = 4000
  if arg == "tiny":  # a small MLP codec: fast, and it reconstructs some candidates exactly
    c.data.batch_size = 64
    c.data.max_candidates = 5000
    c.model.levels = (8, 5, 5, 5)
    c.model.embed_dim, c.model.enc_mlp_dim, c.model.dec_mlp_dim = 16, 128, 128
    c.optim.warmup_steps = 10
    c.train.update({"num_steps": 300, "log_every": 50, "eval_every": 300,
                    "eval_batch_size": 256, "checkpoint_every": 50, "progress_bar": False})
    c.tokenizer.decoder_rounds.update(num=3, steps=30)  # when a test sets decoder_steps
    c.vocab.size = 400
    m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 32, 2, 2, 64
    c.lm.data.seq_len, c.lm.data.batch_size = 32, 8
    c.lm.optim.warmup_steps = 5
    c.lm.train.update({"num_steps": 30, "log_every": 10, "eval_every": 15,
                       "eval_batch_size": 16, "checkpoint_every": 10})
    c.joint.num_steps = 10
    c.joint.piece_batch_size = 16
    c.joint.optim.warmup_steps = 2
    c.sample.max_new_tokens = 16
  elif arg == "full":
    c.train.num_steps = 100_000
    c.vocab.size = 32768
    m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 768, 12, 12, 3072
    m.dtype = "bfloat16"
    m.dropout = 0.1
    c.lm.data.seq_len, c.lm.data.batch_size = 512, 64
    c.lm.optim.learning_rate = 6e-4
    c.lm.optim.warmup_steps = 2000
    c.lm.train.update({"num_steps": 50_000, "eval_every": 5000, "eval_batch_size": 64,
                       "checkpoint_every": 2500})
    c.joint.num_steps = 5000
    c.fuser.train.num_steps = 20_000
    c.fuser.data.seq_len, c.fuser.data.batch_size = 128, 64
    c.joint.piece_batch_size = 1024
  return c
