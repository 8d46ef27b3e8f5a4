"""What the LM's window loaders cost the host per batch, side by side in one run.

  python experiments/bench_lm_loaders.py --docs=2000 --batch_size=64 --seq_len=128

The built-in corpus's first ``--docs`` documents, tokenized by a counted tokenizer, cut
into windows; then ``--batches`` batches drawn from each loader (after 20 unmeasured):

* ``epochs``: the default loader (`fsqtok.data.batches.EpochBatcher` over the windows in
  memory: every host makes the whole global batch);
* ``grain, store, T threads``: the ``lm.data.loader="grain"`` path
  (`fsqtok.data.grain_loader.GrainBatches` over a `fsqtok.data.token_store` of 4 shards:
  each record read as its token row, a batch made windows at once), with ``T`` threads
  reading batches ahead (0: in the calling thread).

A row's time is the caller's wait per batch, with no training step running beside it;
the threads' reading ahead pays off only while a step runs. Printed as a table with the
ratio to ``epochs``; ``--json_out`` keeps it.
"""
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fsqtok.data import corpus as corpus_lib  # noqa: E402
from fsqtok.data import grain_loader  # noqa: E402
from fsqtok.data import lm_data  # noqa: E402
from fsqtok.data import token_store  # noqa: E402
from fsqtok.train import fuser_train  # noqa: E402
from fsqtok.train import workdir as workdir_lib  # noqa: E402

_DOCS = flags.DEFINE_integer("docs", 2000, "Built-in documents tokenized.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Windows per batch.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per window.")
_BATCHES = flags.DEFINE_integer("batches", 500, "Measured batches per loader.")
_THREADS = flags.DEFINE_list("threads", ["0", "2", "4"], "Grain read threads, per row.")
_JSON = flags.DEFINE_string("json_out", "", "Where to write the table (JSON).")


def _wait_per_batch(batches) -> float:
  for _ in range(20):
    next(batches)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(batches)
  return (time.perf_counter() - start) / _BATCHES.value


def main(argv):
  del argv
  texts = corpus_lib.load_documents("builtin")[:_DOCS.value]
  tok = fuser_train.counted_tokenizer(texts[:200], 4096)
  memory = lm_data.windows(lm_data.token_stream(tok, texts), _SEQ.value, tok.pad_id,
                           tok.bos_id)
  rows = {"epochs": _wait_per_batch(lm_data.window_batcher(memory, _BATCH.value, seed=0))}
  with tempfile.TemporaryDirectory() as directory:
    token_store.prepare(directory, tok, {"train": texts, "val": texts[:4]},
                        seq_len=_SEQ.value, num_shards=4, progress=False)
    split = token_store.open_split(directory, "train", 4, pad_id=tok.pad_id,
                                   bos_id=tok.bos_id)
    for threads in map(int, _THREADS.value):
      rows[f"grain, store, {threads} threads"] = _wait_per_batch(grain_loader.GrainBatches(
          split.source(), _BATCH.value, seed=0, name="windows",
          operations=[split.record_row()], batch_operations=[split.rows_to_windows()],
          shard_index=0, shard_count=1, read_threads=threads))
  tokens = _BATCH.value * _SEQ.value
  print(f"\n{memory['inputs'].shape[0]} windows of {_SEQ.value} tokens, batches of "
        f"{_BATCH.value}; the caller's wait per batch\n")
  print("| loader | ms per batch | M tokens/s | × epochs |\n|---|---|---|---|")
  for name, seconds in rows.items():
    print(f"| {name} | {seconds * 1e3:.3f} | {tokens / seconds / 1e6:.1f} | "
          f"{seconds / rows['epochs']:.1f}× |")
  if _JSON.value:
    workdir_lib.write_json(_JSON.value, {
        "command": " ".join(["python experiments/bench_lm_loaders.py"] + sys.argv[1:]),
        "windows": int(memory["inputs"].shape[0]), "batch_size": _BATCH.value,
        "seq_len": _SEQ.value, "seconds_per_batch": rows})


if __name__ == "__main__":
  app.run(main)
