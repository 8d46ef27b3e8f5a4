"""Phase 1: train the FSQ codec to reconstruct pieces.

  python experiments/train.py --config=configs/recon.py --workdir=runs/recon
  python experiments/train.py --config=configs/recon.py:tiny --workdir=/tmp/tiny
  python experiments/train.py --config=configs/recon.py:long \
      --config.data.source=files:'../shared/data/tinyshakespeare.txt' --workdir=runs/ts

Arguments (``get_config(arg)``):
  ""      CPU default: 16k steps, 6-7 minutes on 2 CPU cores, so that `fsqtok
          train-tokenizer` on 100 MB fits in 10 minutes (docs/tokenizer.md, "Large corpora").
          30k steps (10-11 minutes) gave held-out byte accuracy 97.4% on pieces.
  tiny    seconds; a small MLP codec for tests and the notebook (the char-CNN: ``source``).
  long    the same codec trained 90k steps: 29-37 minutes on 2 CPU cores (97.7-98.1%).
  full    for a GPU/TPU: a wider codec, a larger batch, 100k steps.
  source  the source document's char-CNN (channels 128/256/256, strides 1,2,2, average
          pooling, lr 1e-4): kept to compare against; 11x slower per step on CPU.

Why an MLP codec by default: on a 2-core CPU, XLA's convolutions made the source's
char-CNN run at 3.6 steps/s (batch 256) against 39.5 for this MLP codec
(experiments/bench_codec.py), and at equal wall-clock the MLP codec reconstructs far
better (docs/codec.md).
``data.weighting = "sqrt"`` (each distinct piece seen ~sqrt(count) times an epoch)
beat occurrence weighting by 1.5 points of held-out byte accuracy at 15k steps.
Any field can be overridden, e.g. ``--config.data.source=tfds:tiny_shakespeare``.
"""
import ml_collections

from fsqtok.train.optimizer import adamw_config
from fsqtok.train.sharding import sharding_config


def _char_cnn(model, enc_channels, dec_channels):
  """Switches the codec to the DESIGN's char-CNN (strides 1,2,2 down, 2,2,1 up)."""
  model.enc_channels, model.enc_strides = enc_channels, (1, 2, 2)
  model.dec_channels, model.dec_strides = dec_channels, (2, 2, 1)
  model.enc_mlp_dim = model.dec_mlp_dim = 0


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.phase = "recon"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"      # builtin | files:GLOB | tfds:NAME[:SPLIT]
  c.data.tfds_data_dir = ""      # "" = the TFDS default (~/tensorflow_datasets)
  c.data.text_key = "text"       # the text feature of a tfds: dataset
  c.data.invalid_utf8 = "error"  # bytes of files: that are not UTF-8: error | replace |
                                 # skip_document (the counts go into the reports)
  c.data.val_fraction = 0.05
  c.data.split_seed = 0
  c.data.block_chars = 2048      # documents are split into blocks before train/validation
  c.data.weighting = "sqrt"      # occurrence | sqrt | distinct
  # What the codec learns: "pieces" of the pre-tokenizer, or "adaptive" candidates (pieces,
  # spans of up to max_span_pieces pieces, sub-pieces; fsqtok/tokenizer/candidates.py).
  c.data.candidates = "adaptive"
  c.data.max_span_pieces = 4
  c.data.min_count = 3           # spans and sub-pieces seen fewer times are not candidates
  c.data.max_candidates = 50_000
  c.data.batch_size = 256

  c.model = ml_collections.ConfigDict()
  c.model.levels = (8, 8, 8, 8, 8, 5, 5, 5)
  c.model.max_len = 16
  c.model.embed_dim = 64         # byte embedding; also the decoder's per-position width
  c.model.enc_channels = ()      # conv channels; () = no convolution (an MLP codec)
  c.model.enc_strides = ()
  c.model.dec_channels = ()      # transposed-conv channels; () = none
  c.model.dec_strides = ()
  c.model.kernel_size = 3
  c.model.pooling = "flatten"    # flatten | mean
  c.model.enc_mlp_dim = 512
  c.model.dec_mlp_dim = 512
  c.model.position_embedding = True
  c.model.dec_fourier_octaves = 0  # periodic code features for the decoder (codec.py)

  # How a tokenizer is built on this codec (fsqtok/tokenizer/build.py): "unigram" =
  # vocabulary first (fsqtok/tokenizer/unigram.py), then the codec learns exactly its strings;
  # "codec_exact" = the first design (codec on the candidates above, vocabulary among the
  # strings it reconstructs exactly, fewest-token segmentation).
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocabulary = "unigram"
  c.tokenizer.seed_size = 200_000    # most frequent substrings EM starts from
  c.tokenizer.shrink = 0.75          # share of strings each pruning round keeps
  c.tokenizer.em_iterations = 2      # EM steps between pruning rounds
  c.tokenizer.char_coverage = 0.9999 # rarer characters fall back to their bytes
  c.tokenizer.max_piece_chars = 64   # longer runs (rare) are left out of training
  # What becomes of learned strings the search never uses on the training runs (a corpus
  # small for the size asked): "drop" them, so the vocabulary is smaller than asked, as
  # SentencePiece's is on such a corpus, and the training text is tokenized as before
  # (fsqtok.tokenizer.unigram.drop_unused; at equal FLOPs the LM's table head is cheaper:
  # -2.3% bits per byte on tinyshakespeare at 16384 ids, -0.4% builtin, -7.2% / -6.6%
  # on 1.1 MB slices of docs / books; 0-2 strings dropped on those whole at 16384);
  # "keep" them (exactly the size asked; the default before stop 50); "fill": the
  # strings EM leaves unused give their places to whole runs that save tokens
  # (fsqtok.tokenizer.unigram.fill_unused: +0.2 to +1.4% held-out bytes per token at
  # 32768 ids, but +1.3% bits per byte for the LM on tinyshakespeare at 16384).
  # docs/tokenizer.md, docs/language_model.md
  c.tokenizer.unused = "drop"
  # how text is cut into runs before the search (fsqtok.tokenizer.pieces.RUN_STYLES):
  # "line_ends" (GPT-2's classes, but a punctuation run keeps the newlines after it: ":\n",
  # ".\n\n"), "blank_lines" (that, with whitespace whole but for a last space: "\n\n" before
  # a word is one run, not two) or "gpt2" (letters, digits, punctuation, whitespace apart;
  # the default before stop 48). line_ends compresses 3.4-11.6% more than gpt2 and its LM
  # is level or better on the corpora never tuned on (books -0.8%/-0.9%, docs -0.1%/-0.7%
  # bits per byte at 4096/16384 ids), +1.1% on builtin with the table head at 4096, -0.4%
  # at 16384; blank_lines compresses up to 0.9% more than line_ends (docs) with the LM
  # level (-0.1% to +0.2%), so not the default (docs/language_model.md)
  c.tokenizer.runs = "line_ends"
  # The peak learning rate of the codec that learns the vocabulary's strings (0: that of
  # optim, which is tuned for held-out pieces): 1e-2 reconstructs more of a 32k
  # vocabulary exactly than 3e-3 in the same steps (docs/codec.md).
  c.tokenizer.codec_learning_rate = 1e-2
  # The decoder's periodic code features when it learns the vocabulary (0: model's own,
  # none): the codec alone decodes most of a 32k vocabulary with one octave, but with
  # the decoder steps below three decode more (99.1% against 96.3%; docs/codec.md).
  c.tokenizer.codec_fourier_octaves = 3
  # The build's codec trains this many steps (0: train.num_steps, which is tuned for
  # held-out pieces); then the decoder alone learns every string's assigned code
  # (fsqtok/codec/memorize.py) for decoder_steps (0: not): at 32k ids, 4k codec steps +
  # 12k decoder steps at 1e-2 decode 97.5% of the strings exactly (one octave), against
  # 54.6% for 16k codec steps alone, in 61% of the time (docs/codec.md).
  c.tokenizer.codec_steps = 4000
  c.tokenizer.decoder_steps = 12_000
  c.tokenizer.decoder_learning_rate = 1e-2
  # Then, until every string decodes exactly, at most `num` rounds of: each missed string
  # takes a free code within `search_radius` digit steps that already decodes to it, if
  # one does; then `steps` steps with the missed strings `repeats` times an epoch, the
  # first round at `learning_rate`, each next one at `learning_rate_decay` times the
  # last (fsqtok/codec/memorize.py; docs/codec.md, "Until every string decodes").
  c.tokenizer.decoder_rounds = ml_collections.ConfigDict(dict(
      num=8, steps=2000, learning_rate=3e-3, learning_rate_decay=0.5, repeats=8,
      search_radius=2))
  # Multi-word phrases (" of the") added after the subword vocabulary, as this share of
  # the learned strings (0: none); each of 2..max_phrase_words words, <= model.max_len bytes.
  c.tokenizer.phrase_fraction = 0.0
  c.tokenizer.max_phrase_words = 4
  c.tokenizer.num_workers = 0        # processes counting the corpus (0: every core); the
                                     # vocabulary is the same whatever their number
  # Bounds for large corpora (fsqtok/tokenizer/unigram.py, fsqtok/data/corpus.py): the vocabulary is
  # trained on a seeded sample of about sample_chars characters of the training blocks
  # (0: all of them), and counting keeps at most max_distinct_runs distinct runs (the
  # rarest go when there are more; 0: no bound). Both are reported in vocab_report.json.
  c.tokenizer.sample_chars = 0
  c.tokenizer.sample_seed = 0
  c.tokenizer.max_distinct_runs = 2_000_000

  c.optim = adamw_config(learning_rate=3e-3, warmup_steps=200)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 16_000
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.eval_batch_size = 1024
  c.train.checkpoint_every = 2500
  c.train.keep_checkpoints = 3
  c.train.num_devices = 0        # 0: every visible device
  c.train.sharding = sharding_config()  # replicated; fsdp splits the state (fsqtok/train/sharding.py)
  c.train.progress_bar = True

  if arg == "tiny":
    c.data.batch_size = 32
    c.model.embed_dim = 16
    c.model.enc_mlp_dim = c.model.dec_mlp_dim = 64  # a small MLP codec: compiles fast
    c.model.levels = (5, 5, 5, 4)
    c.optim.warmup_steps = 5
    c.train.num_steps = 40
    c.train.log_every = 10
    c.train.eval_every = 20
    c.train.eval_batch_size = 256
    c.train.checkpoint_every = 10
    c.tokenizer.seed_size = 20_000
    c.tokenizer.codec_learning_rate = 0.0  # optim's (1e-2 was measured at 4k-32k ids)
    c.tokenizer.codec_fourier_octaves = 0
    c.tokenizer.codec_steps = c.tokenizer.decoder_steps = 0
    c.tokenizer.decoder_rounds.update(num=3, steps=50)  # when a test sets decoder_steps
  elif arg == "long":
    c.train.num_steps = 90_000
    c.tokenizer.codec_steps = 0  # the build's codec trains every one of them
    c.train.eval_every = 15_000
    c.train.checkpoint_every = 5000
  elif arg == "full":
    c.data.batch_size = 1024
    c.model.embed_dim = 128
    c.model.enc_mlp_dim = 2048
    c.model.dec_mlp_dim = 2048
    c.train.num_steps = 100_000
    c.train.eval_every = 10_000
    c.train.checkpoint_every = 5000
    c.train.eval_batch_size = 8192
    c.tokenizer.codec_learning_rate = 0.0  # not measured at this width and batch
    c.tokenizer.codec_fourier_octaves = 0
    c.tokenizer.codec_steps = c.tokenizer.decoder_steps = 0
  elif arg == "source":
    c.data.weighting = "occurrence"
    _char_cnn(c.model, (128, 256, 256), (256, 128, 64))
    c.model.pooling = "mean"
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 1000
    c.tokenizer.codec_learning_rate = 0.0
    c.tokenizer.codec_fourier_octaves = 0
    c.tokenizer.codec_steps = c.tokenizer.decoder_steps = 0
  elif arg:
    raise ValueError(f"Unknown configs/recon.py argument {arg!r}: use '', tiny, long, "
                     f"full or source.")
  return c
