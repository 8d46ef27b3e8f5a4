"""From a corpus to an exact tokenizer, and the tokenizers it is compared with.

* `tokenizer` -- `Tokenizer`: the vocabulary, byte fallback, specials, Viterbi encoding,
  save/load.
* `pieces` -- the pre-tokenizers (text -> pieces or runs).
* `candidates` -- the strings the codec learns (pieces, or adaptive granularity).
* `unigram` -- the unigram-LM vocabulary (EM and pruning over the corpus).
* `vocab` -- the codec-exact vocabulary (a trained codec -> code <-> string table).
* `build` -- corpus -> saved tokenizer (the ``vocab`` phase and `fsqtok train-tokenizer`).
* `native_encode` -- the compiled (numba) encoder.
* `hf_export` -- a Hugging Face ``tokenizer.json``.
* `baselines` -- BPE and SentencePiece behind the same interface.
"""
