"""Trains an fsqtok experiment from an ml-collections config.

  python experiments/train.py --config=configs/recon.py --workdir=runs/recon

Every config field can be overridden: ``--config.train.num_steps=500``. Running again
with the same workdir resumes from the last checkpoint (or does nothing if finished).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsqtok import recon  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, reports.")
flags.mark_flags_as_required(["config", "workdir"])

PHASES = {"recon": recon.train_recon}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (Orbax) out
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config.phase not in PHASES:
    raise app.UsageError(f"Unknown phase {config.phase!r}; known: {sorted(PHASES)}.")
  logging.info("Config:\n%s", config)
  report = PHASES[config.phase](config, _WORKDIR.value)
  val = report["validation"]
  print(f"[{config.phase}] held-out byte accuracy {val['byte_accuracy']:.4f}, "
        f"perplexity {val['perplexity']:.4f}, exact match {val['exact_match']:.4f}, "
        f"collision rate {val['collision_rate']:.4f}, "
        f"{report['train_pieces_per_second']:.0f} pieces/s. "
        f"Report: {os.path.join(_WORKDIR.value, config.phase, 'report.md')}")


if __name__ == "__main__":
  app.run(main)
