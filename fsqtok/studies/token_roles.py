"""The roles of special tokens in model inputs: CLS, SEP, PAD, MASK (BOS/EOS as in `lm_data`).

* `WithRoles` gives any tokenizer ids for the role tokens it lacks (the baselines in
  `fsqtok.tokenizer.baselines` only have [PAD] [BOS] [EOS]); fsqtok's own tokenizer already has them.
* `pack_single` / `pack_pair`: ``[BOS] a [CLS]`` and ``[BOS] a [SEP] b [CLS]``, right-padded
  with [PAD] to a fixed length, with the validity mask and segment ids (0 up to and
  including [SEP], 1 after). In a causal LM only the last position sees the whole input,
  so [CLS] goes at the end (GPT-style), not the front.
* `mlm_corrupt`: the 80/10/10 masking of `fsqtok.models.masking` (shared with the fuser), with
  padding and special tokens never chosen.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fsqtok.models import masking

ROLES = ("[CLS]", "[SEP]", "[MASK]")


class WithRoles:
  """A tokenizer plus ids for [CLS] [SEP] [MASK]: its own where it has them
  (``token_to_id``), otherwise new ids after its vocabulary (``vocab_size`` grows)."""

  def __init__(self, tok):
    self.base = tok
    self.pad_id, self.bos_id, self.eos_id = tok.pad_id, tok.bos_id, tok.eos_id
    lookup = getattr(tok, "token_to_id", None)
    size = tok.vocab_size
    ids = {}
    for name in ROLES:
      found = lookup(name) if lookup is not None else None
      if found is None:
        found, size = size, size + 1
      ids[name] = int(found)
    self.vocab_size = size
    self.cls_id, self.sep_id, self.mask_id = (ids[r] for r in ROLES)
    specials = {self.pad_id, self.bos_id, self.eos_id, *ids.values()}
    named = getattr(tok, "special_tokens", ())  # fsqtok's: a property (a list of strings)
    specials |= {tok.token_to_id(s) for s in (named() if callable(named) else named)}
    self.special_ids = tuple(sorted(i for i in specials if i is not None))
    ordinary = sorted(set(range(tok.vocab_size)) - set(self.special_ids))
    if not ordinary:
      raise ValueError("The tokenizer has no ordinary (non-special) tokens.")
    # Random replacements come from one contiguous range of ordinary ids (specials first).
    self.ordinary_range = (ordinary[0], ordinary[-1] + 1)

  def encode(self, text: str) -> list[int]:
    return self.base.encode(text)

  def decode(self, ids: Sequence[int], **kw) -> str:
    return self.base.decode([i for i in ids if i < self.base.vocab_size], **kw)


def _pad(ids: list[int], segments: list[int], max_len: int, pad_id: int):
  ids_T = np.full((max_len,), pad_id, np.int32)
  seg_T = np.zeros((max_len,), np.int32)
  ids_T[:len(ids)], seg_T[:len(segments)] = ids, segments
  return ids_T, np.arange(max_len) < len(ids), seg_T


def pack_single(tok: WithRoles, a: Sequence[int], max_len: int):
  """``(ids_T, valid_T, segments_T)`` of ``[BOS] a [CLS]`` (``a`` cut to fit)."""
  if max_len < 3:
    raise ValueError(f"max_len must be >= 3 ([BOS] a token [CLS]), got {max_len}.")
  ids = [tok.bos_id, *list(a)[:max_len - 2], tok.cls_id]
  return _pad(ids, [0] * len(ids), max_len, tok.pad_id)


def pack_pair(tok: WithRoles, a: Sequence[int], b: Sequence[int], max_len: int):
  """``(ids_T, valid_T, segments_T)`` of ``[BOS] a [SEP] b [CLS]``, the longer segment cut
  first to fit; segment 0 is ``[BOS] a [SEP]``, segment 1 is ``b [CLS]``."""
  if max_len < 5:
    raise ValueError(f"max_len must be >= 5 ([BOS] a [SEP] b [CLS]), got {max_len}.")
  a, b = list(a), list(b)
  while len(a) + len(b) > max_len - 3:
    if len(a) >= len(b):
      a.pop()
    else:
      b.pop()
  ids = [tok.bos_id, *a, tok.sep_id, *b, tok.cls_id]
  return _pad(ids, [0] * (len(a) + 2) + [1] * (len(b) + 1), max_len, tok.pad_id)


def pack_batch(rows) -> dict[str, np.ndarray]:
  """Stacks `pack_single` / `pack_pair` results into ``ids``, ``valid``, ``segments``."""
  ids, valid, seg = zip(*rows)
  return {"ids": np.stack(ids), "valid": np.stack(valid), "segments": np.stack(seg)}


def mlm_corrupt(rng: jax.Array, tok: WithRoles, ids_BxT, valid_BxT, *, rate: float = 0.15):
  """``(inputs_BxT, chosen_BxT)`` by `fsqtok.models.masking.mask_tokens`: padding and specials are
  never chosen; random replacements are ordinary tokens."""
  special = jnp.isin(ids_BxT, jnp.asarray(tok.special_ids))
  low, high = tok.ordinary_range
  return masking.mask_tokens(rng, ids_BxT, valid_BxT & ~special, mask_id=tok.mask_id,
                             random_low=low, random_high=high, rate=rate)
