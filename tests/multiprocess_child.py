"""One of several JAX processes on this machine, for tests/test_multiprocess.py.

  python tests/multiprocess_child.py PART PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Joins the others (`jax.distributed.initialize`, a coordinator on localhost, CPU
collectives over gloo; the parent sets the devices per process), then runs one part of
`multiprocess_steps` on the mesh of every process's devices:

* ``steps``: `run_steps`, three LM steps on fixed batches, each process placing only its
  own rows (`sharding.shard_batch`), Grain batches, pooled counts and the files
  ``OUT_DIR/docs/*.txt`` through their TFDS copy (prepared by process 0 in
  ``OUT_DIR/tfds_multi``, then opened by the others); saves the LM state with Orbax as
  ``OUT_DIR/multi`` (every process takes part) and restores ``OUT_DIR/single``, written
  by the parent in one process.
* ``store``: `run_store`, a token store and the fuser phase on it.
* ``curriculum``: the whole tiny curriculum in ``OUT_DIR/curriculum_multi`` on those
  files, streamed, where only process 0 writes files.

For the first two, process 0 writes what the parent compares (``OUT_DIR/PART.npz``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import multiprocess_steps  # noqa: E402  (tests/: the steps both sides run)


def main(part: str, process_id: str, num_processes: str, port: str, out_dir: str) -> None:
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=int(num_processes), process_id=int(process_id),
                             initialization_timeout=120)
  if part == "curriculum":
    multiprocess_steps.run_curriculum(os.path.join(out_dir, "curriculum_multi"),
                                      os.path.join(out_dir, "docs", "*.txt"))
  else:
    if part == "steps":
      result = multiprocess_steps.run_steps(out_dir, "multi", restore_from="single")
    elif part == "store":
      result = multiprocess_steps.run_store(out_dir, "multi")
    else:
      raise ValueError(f"Unknown part {part!r}: use steps, store or curriculum.")
    if jax.process_index() == 0:
      np.savez(os.path.join(out_dir, f"{part}.npz"), **result)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
