"""Training: one loop, the phases that plug into it, and where their state lives.

* `loop` -- the one training loop (resume, Orbax checkpoints, metrics, progress bar,
  NaN guard, evaluation, timing) and `finished`, a finished phase's report and parameters.
* `recon`, `lm_train`, `fuser_train` -- each phase's pure step and report.
* `curriculum` -- the main job: ``recon -> vocab -> [fuser] -> lm -> joint``.
* `sharding` -- the ``(data, model)`` mesh, FSDP and tensor-parallel rules, jit of a step.
* `checkpoint` -- Orbax checkpoints with the data position; damaged steps set aside.
* `optimizer` -- the one optimizer builder (AdamW, warmup + cosine, frozen parts).
* `workdir` -- atomic files, the metrics log, the work directory's lock, process 0 writes.
"""
