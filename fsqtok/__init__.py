"""fsqtok: a tokenizer learned by an FSQ auto-encoder, and language models on it."""
from fsqtok.fsq import FSQ

__version__ = "0.1.0"
__all__ = ["FSQ", "__version__"]
