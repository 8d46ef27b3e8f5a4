"""Soft prompts (prompt tuning): k learned vectors prepended to the input of a frozen LM.

The parameters are ``{"lm": <the LM's>, "prompt": {"vectors": [k, d_model]}}``; only
``prompt`` trains: `make_optimizer` is `fsqtok.train.optimizer.make_optimizer` with ``lm``
frozen (``optax.multi_transform`` gives it zero updates and no optimizer state), so the
base model stays bit-identical. The vectors enter through ``prefix_BxKxD`` of
`fsqtok.models.lm.TransformerLM` (after any registers; dropped from the outputs).

A trained prompt is a small artifact of its own, one directory per task:
``prompt.msgpack`` (the vectors, `flax.serialization`) and ``prompt.json`` (its length,
width and whatever describes the task: labels, label tokens, the base model it was
tuned on). Both are written atomically.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from fsqtok.train import optimizer as optimizer_lib
from fsqtok.train import workdir as workdir_lib

VECTORS_FILE = "prompt.msgpack"
META_FILE = "prompt.json"
FROZEN = ("lm",)


def init_prompt(rng: jax.Array, length: int, d_model: int, embed_table_VxD=None,
                low: int = 0) -> dict[str, jax.Array]:
  """``{"vectors": [length, d_model]}``: copies of random rows of ``embed_table_VxD``
  (rows ``low..V-1``; prompts started from real token vectors train more easily), or small
  normal vectors without a table."""
  if length < 1:
    raise ValueError(f"A soft prompt needs at least one vector, got length={length}.")
  if embed_table_VxD is None:
    return {"vectors": 0.02 * jax.random.normal(rng, (length, d_model), jnp.float32)}
  if embed_table_VxD.shape[1] != d_model:
    raise ValueError(f"The embedding table is {embed_table_VxD.shape[1]} wide, the model "
                     f"{d_model}.")
  rows = jax.random.randint(rng, (length,), low, embed_table_VxD.shape[0])
  return {"vectors": jnp.asarray(embed_table_VxD, jnp.float32)[rows]}


def combine(lm_params, prompt) -> dict[str, Any]:
  return {"lm": lm_params, "prompt": prompt}


def prefix(params, batch_size: int) -> jax.Array:
  """The prompt broadcast over a batch, ``[B, k, D]`` (for ``prefix_BxKxD``)."""
  v = params["prompt"]["vectors"]
  return jnp.broadcast_to(v[None], (batch_size, *v.shape))


def make_optimizer(optim_config, num_steps: int, params):
  """The LM optimizer on ``prompt`` only; ``lm`` gets zero updates."""
  if set(params) != {"lm", "prompt"}:
    raise ValueError(f"Soft-prompt parameters are {{'lm', 'prompt'}}, got {sorted(params)}: "
                     f"build them with soft_prompt.combine(lm_params, prompt).")
  return optimizer_lib.make_optimizer(optim_config, num_steps, params, FROZEN)


def save(directory: str, prompt, meta: dict[str, Any]) -> None:
  """Writes the prompt and its description (atomically) to ``directory``."""
  v = np.asarray(jax.device_get(prompt["vectors"]), np.float32)
  full = {**meta, "length": int(v.shape[0]), "d_model": int(v.shape[1])}
  workdir_lib.atomic_write_bytes(os.path.join(directory, VECTORS_FILE),
                                 serialization.to_bytes({"vectors": v}))
  workdir_lib.write_json(os.path.join(directory, META_FILE), full)


def load(directory: str, *, d_model: int, length: int | None = None
         ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """``(prompt, meta)`` saved by `save`; clear errors when it does not fit the model."""
  meta_path = os.path.join(directory, META_FILE)
  vec_path = os.path.join(directory, VECTORS_FILE)
  for path in (meta_path, vec_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"No soft prompt at {directory}: {os.path.basename(path)} is "
                              f"missing (save one with fsqtok.models.soft_prompt.save).")
  meta = workdir_lib.read_json(meta_path)
  if meta["d_model"] != d_model:
    raise ValueError(f"The soft prompt in {directory} is {meta['d_model']} wide but the "
                     f"model's d_model is {d_model}: it was tuned for another model.")
  if length is not None and meta["length"] != length:
    raise ValueError(f"The soft prompt in {directory} has {meta['length']} vectors, "
                     f"{length} were expected: set the prompt length to {meta['length']}.")
  target = {"vectors": np.zeros((meta["length"], meta["d_model"]), np.float32)}
  with open(vec_path, "rb") as f:
    restored = serialization.from_bytes(target, f.read())
  if restored["vectors"].shape != target["vectors"].shape:
    raise ValueError(f"{vec_path} holds a {restored['vectors'].shape} prompt but "
                     f"{META_FILE} says {target['vectors'].shape}: the artifact is corrupt.")
  return {"vectors": jnp.asarray(restored["vectors"])}, meta
