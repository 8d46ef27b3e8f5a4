"""Token embeddings with a width per frequency bucket, and the plain tables to compare.

Every embedding here has one interface, so a language model can take any of them:

* ``__call__(ids_BxT) -> x_BxTxD``: float vectors ``d_model`` wide;
* ``attend(x_BxTxD) -> logits_BxTxV``: the tied output layer over the full vocabulary.

`BespokeEmbed` sorts the vocabulary by training frequency and cuts it into buckets by
cumulative occurrence mass (by default the tokens that make the first 80% of occurrences,
the next 15%, the rest). Each bucket has its own table, as wide as its multiplier of
``d_model`` says (1.25x, 1x, 0.4x by default), and a projection to ``d_model``. The
rarest tokens can share a few hashed rows. The tied output layer is the adaptive-softmax
counterpart: ``x`` is projected back to each bucket's width through the transposed
projection, scored against that bucket's table, and the scores are put back in vocabulary
order.

`StandardEmbed` is one ``V x d_model`` table; `FactorizedEmbed` is a ``V x width`` table
projected to ``d_model``, which with `matched_width` becomes "the standard table resized
to the bespoke parameter count".

Bucket assignment (`assign_buckets`) is a pure numpy function of the token counts; the
module receives its result as hashable static configuration.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BUCKET_NAMES = ("high", "mid", "low")
DEFAULT_THRESHOLDS = (0.80, 0.95)
DEFAULT_MULTIPLIERS = (1.25, 1.0, 0.4)
_HASH_MULTIPLIER = 0x9E3779B1  # Knuth's multiplicative hash (golden ratio * 2**32)


@dataclasses.dataclass(frozen=True)
class BucketAssignment:
  """Where each token's vector lives: ``bucket[v]`` and ``row[v]`` within that bucket.

  Tuples, not arrays, so that the assignment is hashable static module configuration.
  ``rows`` is the table size of each bucket (a bucket may be empty: 0 rows).
  ``hashed`` lists the tokens that share the hashed rows at the end of the last bucket.
  """

  bucket: tuple[int, ...]
  row: tuple[int, ...]
  rows: tuple[int, ...]
  hashed: tuple[int, ...] = ()

  @property
  def vocab_size(self) -> int:
    return len(self.bucket)

  @property
  def num_buckets(self) -> int:
    return len(self.rows)

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """``(bucket_V, row_V)`` as int32 numpy arrays."""
    return np.asarray(self.bucket, np.int32), np.asarray(self.row, np.int32)

  def flat_index(self) -> np.ndarray:
    """Index of each token in the concatenation of all bucket tables (in bucket order)."""
    bucket_V, row_V = self.arrays()
    offsets = np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int32)
    return offsets[bucket_V] + row_V


def frequency_order(counts_V: np.ndarray) -> np.ndarray:
  """Token ids from most to least frequent; ties go to the smaller id (stable)."""
  return np.argsort(-np.asarray(counts_V, np.int64), kind="stable")


def assign_buckets(counts_V: Sequence[int] | np.ndarray,
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                   hash_rows: int = 0, hash_from: float = 0.99) -> BucketAssignment:
  """Cuts the vocabulary into frequency buckets by cumulative occurrence mass.

  Tokens are taken from most to least frequent; a token goes to bucket ``b``, the first
  whose threshold exceeds the share of all occurrences taken by the tokens before it. So
  with thresholds (0.8, 0.95) bucket 0 holds the tokens that make up the first 80% of
  occurrences (always at least the most frequent token), bucket 1 the next 15%, bucket 2
  the rest, including every token never seen. Rows within a bucket follow frequency
  order, so each bucket's rows are ``0 .. rows[b] - 1`` with none unused.

  With ``hash_rows > 0``, the tokens whose preceding mass is at least ``hash_from`` (the
  rarest, unseen tokens included) do not get their own rows: they share
  ``min(hash_rows, how many they are)`` rows appended to the last bucket, picked by a
  fixed multiplicative hash of the token id.
  """
  counts_V = np.asarray(counts_V, np.int64)
  if counts_V.ndim != 1 or counts_V.size == 0:
    raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts_V.shape}.")
  if (counts_V < 0).any():
    raise ValueError("counts must be non-negative.")
  thresholds = tuple(float(t) for t in thresholds)
  if any(not 0.0 < t <= 1.0 for t in thresholds) or list(thresholds) != sorted(thresholds):
    raise ValueError(f"thresholds must increase within (0, 1], got {thresholds}.")
  if hash_rows < 0:
    raise ValueError(f"hash_rows must be >= 0, got {hash_rows}.")
  if hash_rows and not (thresholds[-1] if thresholds else 0.0) <= hash_from <= 1.0:
    raise ValueError(f"hash_from ({hash_from}) must lie in the last bucket: "
                     f"[{thresholds[-1] if thresholds else 0.0}, 1].")
  vocab = counts_V.size
  order = frequency_order(counts_V)
  total = max(int(counts_V.sum()), 1)
  before = (np.cumsum(counts_V[order]) - counts_V[order]) / total  # mass before each token
  before[counts_V[order] == 0] = 1.0                              # never seen: the rarest
  bucket_sorted = np.searchsorted(np.asarray(thresholds), before, side="right")
  num_buckets = len(thresholds) + 1
  hashed_sorted = (before >= hash_from) if hash_rows else np.zeros(vocab, bool)

  bucket_V = np.empty(vocab, np.int64)
  row_V = np.empty(vocab, np.int64)
  bucket_V[order] = bucket_sorted
  rows = []
  for b in range(num_buckets):
    own = order[(bucket_sorted == b) & ~hashed_sorted]
    row_V[own] = np.arange(own.size)
    rows.append(int(own.size))
  hashed = np.sort(order[hashed_sorted])
  if hashed.size:
    shared = min(hash_rows, int(hashed.size))
    h = (hashed.astype(np.uint64) * np.uint64(_HASH_MULTIPLIER)) % np.uint64(2**32)
    row_V[hashed] = rows[-1] + (h % np.uint64(shared)).astype(np.int64)
    rows[-1] += shared
  return BucketAssignment(bucket=tuple(int(b) for b in bucket_V),
                          row=tuple(int(r) for r in row_V), rows=tuple(rows),
                          hashed=tuple(int(t) for t in hashed))


def bucket_widths(d_model: int, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS
                  ) -> tuple[int, ...]:
  """Each bucket's width: ``round(multiplier * d_model)``, at least 1."""
  return tuple(max(1, int(round(m * d_model))) for m in multipliers)


def bespoke_param_count(assignment: BucketAssignment, widths: Sequence[int], d_model: int
                        ) -> int:
  """Exact parameters of `BespokeEmbed`: per non-empty bucket, table plus projection."""
  if len(widths) != assignment.num_buckets:
    raise ValueError(f"{len(widths)} widths for {assignment.num_buckets} buckets.")
  return sum(n * w + w * d_model for n, w in zip(assignment.rows, widths) if n)


def standard_param_count(vocab_size: int, d_model: int) -> int:
  return vocab_size * d_model


def factorized_param_count(vocab_size: int, width: int, d_model: int) -> int:
  return vocab_size * width + width * d_model


def matched_width(vocab_size: int, d_model: int, target_params: int) -> int:
  """The width ``w`` whose `FactorizedEmbed` parameter count is closest to the target.

  Ties go to the smaller width. The result can exceed ``d_model`` when the target is
  larger than the standard table.
  """
  exact = target_params / (vocab_size + d_model)
  candidates = {max(1, int(np.floor(exact))), max(1, int(np.ceil(exact)))}
  return min(sorted(candidates),
             key=lambda w: abs(factorized_param_count(vocab_size, w, d_model) - target_params))


@functools.lru_cache(maxsize=16)
def _vocab_order_fn(assignment: BucketAssignment) -> Callable[[jax.Array], jax.Array]:
  """``rows_NxD -> rows_VxD``: rows of all tables (concatenated) put in vocabulary order.

  The forward pass is a gather of rows. Its default gradient is a scatter-add, which
  XLA's CPU backend runs far slower than a gather; but every row that is not a shared
  hashed row belongs to exactly one token, so its gradient is a gather by the inverse
  index, and the shared rows' gradient is a small one-hot matmul.
  """
  flat_V = assignment.flat_index()
  hashed_K = np.asarray(assignment.hashed, np.int64)
  num_rows = int(sum(assignment.rows))
  num_own = flat_V.size - hashed_K.size  # one row per token that is not hashed ...
  num_shared = num_rows - num_own        # ... then the shared rows (some may go unused)
  own_V = np.setdiff1d(np.arange(flat_V.size), hashed_K)
  owner_N = np.full(num_own, -1, np.int64)
  owner_N[flat_V[own_V]] = own_V
  if (owner_N < 0).any():
    raise AssertionError("every own row must belong to exactly one token")
  onehot_HxK = (np.eye(num_shared, dtype=np.float32)[flat_V[hashed_K] - num_own].T
                if hashed_K.size else None)
  # numpy, not jnp: this closure is cached across traces, so it must hold no tracers.
  flat_V, owner_N, hashed_K = (a.astype(np.int32) for a in (flat_V, owner_N, hashed_K))

  @jax.custom_vjp
  def gather(rows_NxD):
    return rows_NxD[flat_V]

  def fwd(rows_NxD):
    return gather(rows_NxD), None

  def bwd(_, g_VxD):
    grad_NxD = g_VxD[owner_N]
    if onehot_HxK is not None:
      shared_HxD = onehot_HxK @ g_VxD[hashed_K]
      grad_NxD = jnp.concatenate([grad_NxD, shared_HxD.astype(grad_NxD.dtype)], axis=0)
    return (grad_NxD,)

  gather.defvjp(fwd, bwd)
  return gather


def to_vocab_order(rows_NxD: jax.Array, assignment: BucketAssignment) -> jax.Array:
  """Rows of the concatenated bucket tables, one per token in vocabulary order."""
  return _vocab_order_fn(assignment)(rows_NxD)


def _table_init(d_model: int):
  # All tables start like nn.Embed's default (std 1/sqrt(d_model)); projections keep
  # lecun_normal, so every embedding starts with vectors of the same scale.
  return nn.initializers.normal(stddev=d_model**-0.5)


class StandardEmbed(nn.Module):
  """One ``V x d_model`` table; ``attend`` is ``x @ table.T``."""

  vocab_size: int
  d_model: int

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.d_model,
                          embedding_init=_table_init(self.d_model))

  def __call__(self, ids_BxT: jax.Array) -> jax.Array:
    return self.embed(ids_BxT)

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.embed.attend(x_BxTxD)

  def param_count(self) -> int:
    return standard_param_count(self.vocab_size, self.d_model)


class FactorizedEmbed(nn.Module):
  """A ``V x width`` table projected to ``d_model``; ``attend`` goes back through it."""

  vocab_size: int
  d_model: int
  width: int

  def setup(self):
    self.table = self.param("table", _table_init(self.d_model), (self.vocab_size, self.width))
    self.proj = self.param("proj", nn.initializers.lecun_normal(), (self.width, self.d_model))

  def __call__(self, ids_BxT: jax.Array) -> jax.Array:
    return self.table[ids_BxT] @ self.proj

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    return (x_BxTxD @ self.proj.T) @ self.table.T

  def param_count(self) -> int:
    return factorized_param_count(self.vocab_size, self.width, self.d_model)


class BespokeEmbed(nn.Module):
  """One table and projection per frequency bucket (see `assign_buckets`).

  Empty buckets get no parameters. ``param_count()`` is exact.
  """

  assignment: BucketAssignment
  widths: tuple[int, ...]
  d_model: int

  def setup(self):
    if len(self.widths) != self.assignment.num_buckets:
      raise ValueError(f"{len(self.widths)} widths for {self.assignment.num_buckets} "
                       f"buckets.")
    tables, projs = {}, {}
    for b, (n, w) in enumerate(zip(self.assignment.rows, self.widths)):
      if n:
        tables[b] = self.param(f"table_{b}", _table_init(self.d_model), (n, w))
        projs[b] = self.param(f"proj_{b}", nn.initializers.lecun_normal(), (w, self.d_model))
    self.tables, self.projs = tables, projs

  @property
  def vocab_size(self) -> int:
    return self.assignment.vocab_size

  def projected_tables(self) -> jax.Array:
    """``table_b @ proj_b`` for every bucket, concatenated: ``N x d_model`` (N rows)."""
    return jnp.concatenate([t @ self.projs[b] for b, t in self.tables.items()], axis=0)

  def full_table(self) -> jax.Array:
    """The ``V x d_model`` table this module amounts to: row v is token v's vector.

    It is also the tied output layer (`attend`), because ``(x @ proj.T) . e ==
    x . (e @ proj)``.
    """
    return to_vocab_order(self.projected_tables(), self.assignment)

  def __call__(self, ids_BxT: jax.Array) -> jax.Array:
    # Two exact ways to embed; the cheaper one by multiply-adds: project every table row
    # once (few rows), or each token through every bucket's projection (few tokens).
    table_rows = sum(n * w for n, w in zip(self.assignment.rows, self.widths))
    per_token = int(np.prod(ids_BxT.shape)) * sum(
        w for n, w in zip(self.assignment.rows, self.widths) if n)
    if table_rows <= per_token:
      flat_V = jnp.asarray(self.assignment.flat_index())
      return self.projected_tables()[flat_V[ids_BxT]]
    return self.embed_per_token(ids_BxT)

  def embed_per_token(self, ids_BxT: jax.Array) -> jax.Array:
    """Looks each token up in its bucket's table and projects it (no full table)."""
    bucket_V, row_V = (jnp.asarray(a) for a in self.assignment.arrays())
    bucket_BxT, row_BxT = bucket_V[ids_BxT], row_V[ids_BxT]
    x_BxTxD = jnp.zeros(ids_BxT.shape + (self.d_model,), jnp.float32)
    for b, table_NxW in self.tables.items():
      rows_BxT = jnp.clip(row_BxT, 0, table_NxW.shape[0] - 1)
      v_BxTxD = table_NxW[rows_BxT] @ self.projs[b]
      # where(), not a multiply by a mask, so other buckets' tokens send no gradient here.
      x_BxTxD = jnp.where((bucket_BxT == b)[..., None], v_BxTxD, x_BxTxD)
    return x_BxTxD

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    """Tied logits over the full vocabulary, ``x @ full_table().T``.

    The same numbers as `attend_per_bucket` (the adaptive-softmax form), computed the way
    XLA runs fastest: the per-bucket form ends with a gather of B*T*V scalars, this one
    with a gather of V rows.
    """
    return x_BxTxD @ self.full_table().T

  def attend_per_bucket(self, x_BxTxD: jax.Array) -> jax.Array:
    """Per bucket, ``x`` back through the transposed projection to the bucket's width and
    scored against its table; the scores then put in vocabulary order."""
    scores = []
    for b, table_NxW in self.tables.items():
      h_BxTxW = x_BxTxD @ self.projs[b].T
      scores.append(h_BxTxW @ table_NxW.T)
    return jnp.take(jnp.concatenate(scores, axis=-1),
                    jnp.asarray(self.assignment.flat_index()), axis=-1)

  def param_count(self) -> int:
    return bespoke_param_count(self.assignment, self.widths, self.d_model)


# Registry: name -> builder(counts_V, d_model, config) -> module. ``config`` is an
# ml_collections ConfigDict (or anything with these attributes): thresholds,
# multipliers, hash_rows, hash_from.
def _build_standard(counts_V, d_model, config) -> nn.Module:
  del config
  return StandardEmbed(vocab_size=len(counts_V), d_model=d_model)


def _build_bespoke(counts_V, d_model, config) -> nn.Module:
  assignment = assign_buckets(counts_V, tuple(config.thresholds), hash_rows=config.hash_rows,
                              hash_from=config.hash_from)
  return BespokeEmbed(assignment=assignment, d_model=d_model,
                      widths=bucket_widths(d_model, tuple(config.multipliers)))


def _build_matched(counts_V, d_model, config) -> nn.Module:
  target = _build_bespoke(counts_V, d_model, config).param_count()
  width = matched_width(len(counts_V), d_model, target)
  return FactorizedEmbed(vocab_size=len(counts_V), d_model=d_model, width=width)


EMBEDDINGS: dict[str, Callable[..., nn.Module]] = {
    "standard": _build_standard,
    "bespoke": _build_bespoke,
    "matched": _build_matched,  # a standard table resized to the bespoke parameter count
}


def embedding_from_config(name: str, counts_V: np.ndarray, d_model: int, config) -> nn.Module:
  """Builds the embedding ``name`` (see `EMBEDDINGS`) for these training counts."""
  if name not in EMBEDDINGS:
    raise ValueError(f"Unknown embedding {name!r}; known: {sorted(EMBEDDINGS)}.")
  return EMBEDDINGS[name](np.asarray(counts_V), d_model, config)
