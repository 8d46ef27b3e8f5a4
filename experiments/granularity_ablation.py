"""What adaptive granularity buys: held-out bytes per token with the vocabulary chosen
among whole pieces only, pieces + parts of pieces, pieces + spans, and all three.

  python experiments/granularity_ablation.py --corpora=builtin,files:../shared/data/tinyshakespeare.txt \
      --fsqtok_workdirs=runs/builtin,runs/ts --vocab_size=8192

Every row uses the same trained codec (configs/recon.py run in --fsqtok_workdirs) and
its exactly reconstructed candidates; only the kinds allowed into the vocabulary differ.
"""
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import recon as recon_config  # noqa: E402
from fsqtok.codec import evaluate as evaluate_lib  # noqa: E402
from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.tokenizer import candidates as candidates_lib  # noqa: E402
from fsqtok.tokenizer import pieces as pieces_lib  # noqa: E402
from fsqtok.tokenizer import vocab as vocab_lib  # noqa: E402
from fsqtok.tokenizer.tokenizer import DEFAULT_SPECIALS, Tokenizer  # noqa: E402
from fsqtok.train import recon  # noqa: E402
from fsqtok.train import sharding as sharding_lib  # noqa: E402

_CORPORA = flags.DEFINE_list("corpora", ["builtin"], "Corpus specs.")
_WORKDIRS = flags.DEFINE_list("fsqtok_workdirs", [], "Trained codec run per corpus.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size (every id).")
_CONFIG = flags.DEFINE_string("fsqtok_config", "", "configs/recon.py argument of those runs.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data dir for files: corpora.")

ROWS = {"pieces": {"piece"}, "pieces + parts": {"piece", "sub"},
        "pieces + spans": {"piece", "span"}, "all (default)": {"piece", "sub", "span"}}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if len(_WORKDIRS.value) != len(_CORPORA.value):
    raise app.UsageError("Give one --fsqtok_workdirs entry per corpus.")
  print("| corpus | vocabulary from | ids | held-out bytes/token |\n|---|---|---|---|")
  for spec, workdir in zip(_CORPORA.value, _WORKDIRS.value):
    config = recon_config.get_config(_CONFIG.value)
    config.data.source, config.data.tfds_data_dir = spec, _TFDS_DIR.value
    texts = corpus_lib.load_split(config.data)
    train_pieces, _ = candidates_lib.load_pieces(config, texts)
    model, params = recon.load_trained_codec(config, workdir)
    stats = evaluate_lib.compute_piece_stats(
        model, params, train_pieces, batch_size=config.train.eval_batch_size,
        mesh=sharding_lib.data_mesh(config.train.num_devices))
    exact = vocab_lib.exact_candidates(stats["code"], stats["exact"], train_pieces)
    piece_set = {p for t in texts[0] for p in pieces_lib.split_pieces(t)}
    kinds = [vocab_lib.kind_of(s.decode("utf-8"), piece_set) for s in exact.strings]
    held_out = texts[1]
    n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
    for name, allowed in ROWS.items():
      rows = [i for i, k in enumerate(kinds) if k in allowed]
      vocab, _ = vocab_lib.select_vocabulary(exact.take(rows), texts[0],
                                             _VOCAB.value - len(DEFAULT_SPECIALS) - 256)
      tok = Tokenizer([s.decode("utf-8") for s in vocab.strings])
      n_tokens = sum(len(tok.encode(t)) for t in held_out)
      print(f"| {spec} | {name} | {len(tok)} | {n_bytes / n_tokens:.3f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
