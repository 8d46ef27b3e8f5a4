"""Where the text comes from and how it is batched.

* `corpus` -- named sources (``builtin``, ``files:GLOB``, ``tfds:NAME``) and the
  deterministic train/validation split.
* `files_dataset` -- the TFDS builder over the user's own text files.
* `batches` -- `PieceSet` and the deterministic, checkpointable batch iterators.
* `lm_data` -- token streams, LM windows and their batches (`LMData` in memory,
  `StoredLMData` from a token store).
* `token_store` -- LM windows prepared once as array_record shards, each process
  tokenizing and reading its own.
* `grain_loader` -- Grain batches, each process drawing its own rows.
* `hosts` -- each process's share of a corpus, counts pooled across processes, files
  prepared by process 0 first.
* `processes` -- worker processes for CPU-bound pure-Python work.
"""
