"""The studies built on the library (each with its config and experiment script).

* `token_techniques` -- special-token roles, pooling, soft prompts, pruning.
* `token_roles` -- CLS/SEP/PAD/MASK in model inputs.
* `token_importance` -- attention received, hidden-state norms, token pruning.
* `wordnet` -- a reader of the WordNet 3.0 files for the word-sense evaluation.
"""
