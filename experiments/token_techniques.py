"""Registers, soft prompts vs fine-tuning vs a linear probe, and token pruning, measured.

  python experiments/token_techniques.py --config=configs/token_techniques.py \
      --config.corpora=builtin=builtin,ts=files:../shared/data/tinyshakespeare.txt \
      --workdir=runs/token_techniques

Each corpus of ``--config.corpora`` is one class of the passage-classification task and
part of the LM's training text (see configs/token_techniques.py and
`fsqtok.studies.token_techniques`). Printed: three markdown tables (registers; classification
accuracy and trainable parameters; pruning speed and quality). Written:
WORKDIR/results.json, WORKDIR/token_techniques.png, the soft prompts under
WORKDIR/prompts/, and the LMs under WORKDIR/lm_reg<N>/ (a finished LM is reused).
"""
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsqtok.studies import token_techniques  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/token_techniques.py",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  corpora = token_techniques.load_corpora(config)
  results = token_techniques.run_study(config, _WORKDIR.value, corpora)
  print(token_techniques.markdown_tables(results))
  print(f"\nwall time {results['wall_seconds']:.0f} s on {results['device']}; "
        f"results in {os.path.join(_WORKDIR.value, 'results.json')}")


if __name__ == "__main__":
  app.run(main)
