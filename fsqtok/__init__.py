"""fsqtok: a tokenizer learned by an FSQ auto-encoder, and language models on it.

``from fsqtok import Tokenizer`` needs no JAX; the modelling parts (``fsqtok.FSQ``,
``fsqtok.codec.model``, ...) import it when first used.
"""
from fsqtok.tokenizer.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["FSQ", "Tokenizer", "__version__"]


def __getattr__(name):
  if name == "FSQ":
    from fsqtok.codec.fsq import FSQ  # pylint: disable=g-import-not-at-top
    return FSQ
  raise AttributeError(f"module 'fsqtok' has no attribute {name!r}")
