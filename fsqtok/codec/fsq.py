"""Finite Scalar Quantization (Mentzer et al., 2023).

Each latent dimension is squashed into a bounded interval and rounded to one of
``levels[i]`` values. The codebook is implicit: the product of the per-dimension grids.
Codes are floats in [-1, 1]; indices are integers in [0, prod(levels)).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def round_ste(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer; the gradient passes straight through."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def neighbour_codes(index: int, levels: Sequence[int], radius: int) -> list[int]:
  """The code indices 1..``radius`` digit steps of +-1 from code ``index`` (one step per
  dimension at most), nearest first; for one step: by dimension, down before up."""
  basis = [math.prod(levels[:d]) for d in range(len(levels))]
  digits = [index // b % l for b, l in zip(basis, levels)]
  out = []
  for r in range(1, radius + 1):
    for dims in itertools.combinations(range(len(levels)), r):
      for signs in itertools.product((-1, 1), repeat=r):
        if all(0 <= digits[d] + s < levels[d] for d, s in zip(dims, signs)):
          out.append(index + sum(s * basis[d] for d, s in zip(dims, signs)))
  return out


@dataclasses.dataclass(frozen=True)
class FSQ:
  """The quantizer for a tuple of per-dimension level counts (each >= 2)."""

  levels: tuple[int, ...]
  eps: float = 1e-3

  def __post_init__(self):
    if any(isinstance(l, bool) or int(l) != l for l in self.levels):
      raise ValueError(f"FSQ levels must be whole numbers, got {self.levels!r}: a level "
                       f"count is how many values a dimension takes.")
    levels = tuple(int(l) for l in self.levels)
    if not levels or min(levels) < 2:
      raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2, got {self.levels!r}.")
    object.__setattr__(self, "levels", levels)
    if self.codebook_size >= 2**31:
      raise ValueError(f"FSQ codebook of {self.codebook_size} codes does not fit int32 indices; use fewer levels.")

  @classmethod
  def from_levels(cls, levels: Sequence[int]) -> "FSQ":
    return cls(tuple(levels))

  @property
  def num_dims(self) -> int:
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return int(np.prod(self.levels, dtype=np.int64))

  @property
  def _levels_np(self) -> np.ndarray:
    return np.asarray(self.levels, dtype=np.int64)

  @property
  def _half_width(self) -> np.ndarray:
    return (self._levels_np // 2).astype(np.float32)

  @property
  def _basis(self) -> np.ndarray:
    return np.concatenate([[1], np.cumprod(self._levels_np[:-1])]).astype(np.int64)

  def bound(self, z_BxD: jax.Array) -> jax.Array:
    """Squashes each dimension so that rounding yields exactly ``levels[i]`` values.

    For an even level count the interval is shifted by half a step, so that the grid
    {-L/2, ..., L/2 - 1} is hit uniformly instead of losing one level to symmetry; z = 0
    maps to the grid point 0. For L = 2 that point is the range's top end (shift
    arctanh(0.999) ~ 3.8), where tanh is flat: the straight-through gradient at z = 0 is
    ~1e-3, so a quantizer that is trained wants levels >= 3 (the index arithmetic works for
    any L >= 2).
    """
    levels = self._levels_np.astype(np.float32)
    half_l = (levels - 1) * (1 + self.eps) / 2
    offset = np.where(self._levels_np % 2 == 0, 0.5, 0.0).astype(np.float32)
    shift = np.arctanh(offset / half_l).astype(np.float32)
    return jnp.tanh(z_BxD + shift) * half_l - offset

  def quantize(self, z_BxD: jax.Array) -> jax.Array:
    """Bounds, rounds (straight-through) and rescales to codes in [-1, 1]."""
    return round_ste(self.bound(z_BxD)) / self._half_width

  def codes_to_indices(self, codes_BxD: jax.Array) -> jax.Array:
    """Maps codes on the grid to integer indices in [0, codebook_size)."""
    digits = jnp.round(codes_BxD * self._half_width + self._half_width).astype(jnp.int32)
    return jnp.sum(digits * self._basis.astype(jnp.int32), axis=-1)

  def indices_to_codes(self, indices_B: jax.Array) -> jax.Array:
    """Inverse of `codes_to_indices`."""
    idx = jnp.asarray(indices_B, dtype=jnp.int32)[..., None]
    digits = (idx // self._basis.astype(jnp.int32)) % self._levels_np.astype(jnp.int32)
    return (digits.astype(jnp.float32) - self._half_width) / self._half_width

  def implicit_codebook(self) -> jax.Array:
    """All codes, row i being the code of index i. Only sensible for small level sets."""
    return self.indices_to_codes(jnp.arange(self.codebook_size))
