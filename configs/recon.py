"""Phase 1: train the FSQ codec to reconstruct pieces.

  python experiments/train.py --config=configs/recon.py --workdir=runs/recon
  python experiments/train.py --config=configs/recon.py:tiny --workdir=/tmp/tiny
  python experiments/train.py --config=configs/recon.py:long \
      --config.data.source=files:'../shared/data/tinyshakespeare.txt' --workdir=runs/ts

Arguments (``get_config(arg)``):
  ""     CPU default: about 10 minutes on 2 CPU cores.
  tiny   seconds; for tests and the notebook.
  long   the best codec this project trains on a 2-core CPU in at most 45 minutes.
  full   for a GPU/TPU: the source document's channel sizes, a larger batch.
Any field can be overridden, e.g. ``--config.data.source=tfds:tiny_shakespeare``.
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.phase = "recon"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"      # builtin | files:GLOB | tfds:NAME[:SPLIT]
  c.data.tfds_data_dir = ""      # "" = the TFDS default (~/tensorflow_datasets)
  c.data.text_key = "text"       # the text feature of a tfds: dataset
  c.data.val_fraction = 0.05
  c.data.split_seed = 0
  c.data.block_chars = 2048      # documents are split into blocks before train/validation
  c.data.weighting = "occurrence"  # occurrence | sqrt | distinct
  c.data.batch_size = 256

  c.model = ml_collections.ConfigDict()
  c.model.levels = (8, 8, 8, 8, 8, 5, 5, 5)
  c.model.max_len = 16
  c.model.embed_dim = 64
  c.model.enc_channels = (128, 256, 256)
  c.model.enc_strides = (1, 2, 2)
  c.model.dec_channels = (256, 128, 64)
  c.model.dec_strides = (2, 2, 1)
  c.model.kernel_size = 3
  c.model.pooling = "flatten"
  c.model.enc_mlp_dim = 0
  c.model.dec_mlp_dim = 0
  c.model.position_embedding = True

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 200
  c.optim.end_lr_ratio = 0.01
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 3000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batch_size = 1024
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.num_devices = 0        # 0: every visible device
  c.train.progress_bar = True

  if arg == "tiny":
    c.data.batch_size = 32
    c.model.embed_dim = 16
    c.model.enc_channels = (16, 32, 32)
    c.model.dec_channels = (32, 16, 16)
    c.model.levels = (5, 5, 5, 4)
    c.optim.warmup_steps = 5
    c.train.num_steps = 40
    c.train.log_every = 10
    c.train.eval_every = 20
    c.train.eval_batch_size = 256
    c.train.checkpoint_every = 10
  elif arg == "long":
    c.train.num_steps = 12000
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
  elif arg == "full":
    c.data.batch_size = 1024
    c.train.num_steps = 100_000
    c.train.eval_every = 5000
    c.train.checkpoint_every = 5000
    c.train.eval_batch_size = 8192
  elif arg:
    raise ValueError(f"Unknown configs/recon.py argument {arg!r}: use '', tiny, long or full.")
  return c
