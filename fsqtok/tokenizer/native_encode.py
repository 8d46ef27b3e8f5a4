"""The compiled encoder of a unigram tokenizer: the pre-tokenizer's runs and the Viterbi
search in machine code (numba, installed from PyPI wheels), giving exactly the ids of the
pure-Python reference in `fsqtok.tokenizer.tokenizer` (tested equal on hypothesis text).

The text is read as an array of code points; each code point has the class Python's `re`
gives it (`classes`: letter ``[^\\W\\d_]``, digit ``\\d``, space ``\\s``, other), and a
left-to-right scan replays `fsqtok.tokenizer.pieces.run_regex`'s alternation at every match start:
a phrase (the longest one no letter follows), a contraction, `` ?letters``, `` ?digits``,
`` ?others`` (with the newlines after them, for the ``"line_ends"`` and ``"blank_lines"``
runs), then whitespace (all but a last whitespace character before a word; for
``"blank_lines"``, all but a last space). Each run is searched
as Hugging Face's `Unigram` model searches it (starts in order, strings by length, a
strictly better score replaces; a character no string covers costs the unknown score and
becomes its UTF-8 bytes). The vocabulary is a trie over code points stored as an
open-addressing hash table (``(node, code point) -> child``), so the search walks from
each start only as far as some string continues. Runs already searched are looked up in
a per-thread cache (hashed, then compared code point by code point).

The compiled functions release the GIL, so `fsqtok.tokenizer.tokenizer.Tokenizer.encode_batch`
encodes on several threads. Without numba, `available()` is False and the tokenizer keeps its pure-Python
path.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from typing import Sequence

import numpy as np

from fsqtok.tokenizer import pieces as pieces_lib

try:
  import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a clear path
  numba = None

LETTER, DIGIT, OTHER, SPACE = 0, 1, 2, 3
# The run styles, by their place in pieces_lib.RUN_STYLES (constants in the compiled code).
LINE_ENDS, BLANK_LINES = (pieces_lib.RUN_STYLES.index(s) for s in ("line_ends", "blank_lines"))
_NUM_CODE_POINTS = 0x110000
_BLOCK = 1 << 12  # code points are classified a block at a time, on first sight
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing of trie edges
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)  # FNV-1a over a run's code points
_FNV_PRIME = np.uint64(0x100000001B3)
_CACHE_SLOTS = 1 << 19      # run-cache hash slots (half of them used at most)
_CACHE_POOL = 1 << 23       # int32s of run records the run cache holds
_CACHE_MAX_CHARS = 48       # longer runs are searched every time
_ROOT_SIZE = 0x10000        # the root's children by code point (the BMP)

_table = np.full(_NUM_CODE_POINTS, OTHER, np.uint8)
_classified = np.zeros(_NUM_CODE_POINTS // _BLOCK, bool)
_table_lock = threading.Lock()


def available() -> bool:
  return numba is not None


def classes(cps: np.ndarray) -> np.ndarray:
  """The class table, with every block that ``cps`` touches classified as Python's `re`
  matches its characters (so the scan splits exactly where `fsqtok.tokenizer.pieces.RUN_PATTERN`
  does, under this Python's Unicode version)."""
  new = _unclassified_blocks(cps, _classified)
  if new.size:
    from fsqtok.tokenizer import pieces  # pylint: disable=g-import-not-at-top
    with _table_lock:
      for block in new.tolist():
        base = block * _BLOCK
        chars = "".join(map(chr, range(base, base + _BLOCK)))
        for cls, pattern in ((LETTER, pieces.LETTER), (DIGIT, r"\d"), (SPACE, r"\s")):
          for m in re.finditer(f"{pattern}+", chars):
            _table[base + m.start():base + m.end()] = cls
        _classified[block] = True
  return _table


@dataclasses.dataclass(frozen=True)
class Trie:
  """Strings as a trie over code points. Node 0 is the root; its children are an array
  over the Basic Multilingual Plane (``root``); every other edge is in an open-addressing
  table (``table[slot] = (node * 0x110000 + cp, child)``, key -1: empty). ``value[node]``:
  the id a string ends with (-1: none)."""
  root: np.ndarray    # int32 [0x10000]: child of the root by code point, -1 none
  table: np.ndarray   # int64 [table size (a power of two), 2]
  value: np.ndarray   # int32 [nodes]
  shift: np.uint64    # 64 - log2(table size)

  @classmethod
  def build(cls, strings: Sequence[str], values: Sequence[int]) -> "Trie":
    cps = np.frombuffer("".join(strings).encode("utf-32-le"), np.uint32)
    ends = np.cumsum(np.fromiter(map(len, strings), np.int64, len(strings)))
    bits = max(4, (2 * len(cps) + 1).bit_length())
    root = np.full(_ROOT_SIZE, -1, np.int32)
    table = np.full((1 << bits, 2), -1, np.int64)
    value = np.full(len(cps) + 1, -1, np.int32)
    nodes = _build_trie(cps, ends, np.asarray(values, np.int32), root, table, value,
                        np.uint64(64 - bits))
    return cls(root, table, value[:nodes], np.uint64(64 - bits))


@dataclasses.dataclass(frozen=True)
class Encoder:
  """What the compiled search needs of a tokenizer (`fsqtok.tokenizer.tokenizer.Tokenizer`)."""
  vocab: Trie            # learned strings -> ids
  scores: np.ndarray     # float64 [vocab_size]: the score of each learned id
  phrases: Trie          # phrases -> 1 (an empty trie without phrases)
  style: int             # the runs' style: its place in `fsqtok.tokenizer.pieces.RUN_STYLES`
  unk_score: float
  byte_base: int         # the id of byte 0
  max_chars: int         # the longest learned string, in code points
  local: threading.local = dataclasses.field(default_factory=threading.local, compare=False)

  @classmethod
  def build(cls, scored: dict[str, tuple[int, float]], phrases: Sequence[str],
            unk_score: float, byte_base: int, vocab_size: int, runs: str = "gpt2"
            ) -> "Encoder":
    """``runs``: a style `fsqtok.tokenizer.pieces.run_pattern` knows (the tokenizer checked it)."""
    strings = list(scored)
    ids = [scored[s][0] for s in strings]
    scores = np.zeros(vocab_size, np.float64)
    scores[ids] = [scored[s][1] for s in strings]
    return cls(Trie.build(strings, ids), scores, Trie.build(phrases, [1] * len(phrases)),
               pieces_lib.RUN_STYLES.index(runs), float(unk_score), int(byte_base),
               max(map(len, strings), default=1))

  def _cache(self) -> tuple:
    cache = getattr(self.local, "cache", None)
    if cache is None:  # one per thread: the compiled code writes to it
      cache = self.local.cache = (np.zeros((_CACHE_SLOTS, 2), np.int64),
                                  np.zeros(_CACHE_POOL, np.int32), np.zeros(2, np.int64))
    return cache

  def encode(self, text: str, offsets: bool = False
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Ids (int32 ``[N]``) of ``text`` (valid UTF-8: no lone surrogate) and, with
    ``offsets``, each token's character span (int32 ``[N, 2]``)."""
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    v, p = self.vocab, self.phrases
    ids, spans = _encode(cps, classes(cps), v.root, v.table, v.value, v.shift,
                         self.scores, p.root, p.table, p.value, p.shift, self.style,
                         self.unk_score, self.max_chars, self.byte_base, offsets,
                         *self._cache())
    return ids, (spans if offsets else None)

  def encode_many(self, texts: Sequence[str], offsets: bool = False
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """`encode` of every text in one compiled call: all ids (int32 ``[N]``), their spans
    in their own text (int32 ``[N, 2]``, with ``offsets``) and each text's token count
    (``[len(texts)]``). The texts must be valid UTF-8 (no lone surrogate)."""
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
    bounds = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=bounds[1:])
    v, p = self.vocab, self.phrases
    ids, spans, counts = _encode_many(
        cps, bounds, classes(cps), v.root, v.table, v.value, v.shift, self.scores, p.root,
        p.table, p.value, p.shift, self.style, self.unk_score, self.max_chars,
        self.byte_base, offsets,
        *self._cache())
    return ids, (spans if offsets else None), counts

  def split(self, text: str) -> list[str]:
    """The runs of ``text`` (what `fsqtok.tokenizer.pieces.split_runs` gives with these phrases)."""
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    p = self.phrases
    ends = _run_ends(cps, classes(cps), p.root, p.table, p.value, p.shift,
                     self.style).tolist()
    return [text[a:b] for a, b in zip([0, *ends], ends)]

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "local"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, local=threading.local())


# ---- compiled ------------------------------------------------------------------------

def _jit(fn):
  return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


@_jit
def _unclassified_blocks(cps, classified):
  seen = np.zeros(len(classified), np.bool_)
  for cp in cps:
    seen[cp >> 12] = True
  return np.nonzero(seen & ~classified)[0]


@_jit
def _slot(key, shift):
  return np.int64((np.uint64(key) * _HASH_MULTIPLIER) >> shift)


@_jit
def _child(root, table, shift, node, cp):
  if node == 0 and cp < _ROOT_SIZE:
    return root[cp]
  key = np.int64(node) * _NUM_CODE_POINTS + np.int64(cp)
  mask = len(table) - 1
  slot = _slot(key, shift)
  while True:
    k = table[slot, 0]
    if k == key:
      return table[slot, 1]
    if k == -1:
      return -1
    slot = (slot + 1) & mask


@_jit
def _build_trie(cps, ends, values, root, table, value, shift):
  nodes = 1
  start = 0
  for s in range(len(ends)):
    node = 0
    for k in range(start, ends[s]):
      child = _child(root, table, shift, node, cps[k])
      if child < 0:
        child = nodes
        nodes += 1
        if node == 0 and cps[k] < _ROOT_SIZE:
          root[cps[k]] = child
        else:
          key = np.int64(node) * _NUM_CODE_POINTS + np.int64(cps[k])
          slot = _slot(key, shift)
          while table[slot, 0] != -1:
            slot = (slot + 1) & (len(table) - 1)
          table[slot, 0], table[slot, 1] = key, child
      node = child
    value[node] = values[s]
    start = ends[s]
  return nodes


@_jit
def _run_end(cps, cls, i, p_root, p_table, p_value, p_shift, style):
  """End of the run that starts at ``i`` (`fsqtok.tokenizer.pieces.run_regex`, alternative by
  alternative)."""
  n = len(cps)
  # A phrase: the longest one that no letter follows.
  node, end, j = 0, -1, i
  while j < n:
    node = _child(p_root, p_table, p_shift, node, cps[j])
    if node < 0:
      break
    j += 1
    if p_value[node] >= 0 and (j == n or cls[cps[j]] != LETTER):
      end = j
  if end > 0:
    return end
  cp = cps[i]
  # '(?:[stdm]|re|ve|ll)
  if cp == 39 and i + 1 < n:
    nx = cps[i + 1]
    if nx == 115 or nx == 116 or nx == 100 or nx == 109:  # s t d m
      return i + 2
    if i + 2 < n:
      nx2 = cps[i + 2]
      if (nx == 114 and nx2 == 101) or (nx == 118 and nx2 == 101) or (nx == 108 and nx2 == 108):
        return i + 3  # re ve ll
  # ' ?letters| ?digits| ?others'
  j = i + 1 if (cp == 32 and i + 1 < n and cls[cps[i + 1]] != SPACE) else i
  c = cls[cps[j]]
  if c != SPACE:
    j += 1
    while j < n and cls[cps[j]] == c:
      j += 1
    if (style == LINE_ENDS or style == BLANK_LINES) and c == OTHER:  # newlines after punctuation
      while j < n and cps[j] == 10:
        j += 1
    return j
  # \s+(?!\S)|\s+
  j = i
  while j < n and cls[cps[j]] == SPACE:
    j += 1
  if j == n or j - i == 1 or (style == BLANK_LINES and cps[j - 1] != 32):
    return j
  return j - 1


@_jit
def _run_ends(cps, cls, p_root, p_table, p_value, p_shift, style):
  ends = np.empty(len(cps), np.int64)
  count, a = 0, 0
  while a < len(cps):
    a = _run_end(cps, cls, a, p_root, p_table, p_value, p_shift, style)
    ends[count] = a
    count += 1
  return ends[:count]


@_jit
def _viterbi(cps, a, m, root, table, value, shift, scores, unk_score, max_chars,
             byte_base, best, seen, back_start, back_id, out_ids, out_pos):
  """Writes the tokens of run ``cps[a:a+m]`` to ``out_ids`` (and in ``out_pos`` the start
  of each in the run; ``-1 - start`` for a byte of the character at ``start``); returns
  their number."""
  best[0] = 0.0
  seen[0] = True
  for k in range(1, m + 1):
    seen[k] = False
  for i in range(m):
    here = best[i]
    single = False
    node = 0
    for j in range(i + 1, min(m, i + max_chars) + 1):
      node = _child(root, table, shift, node, cps[a + j - 1])
      if node < 0:
        break
      tid = value[node]
      if tid >= 0:
        score = here + scores[tid]
        if not seen[j] or score > best[j]:
          best[j], back_start[j], back_id[j], seen[j] = score, i, tid, True
        if j == i + 1:
          single = True
    if not single:
      score = here + unk_score
      if not seen[i + 1] or score > best[i + 1]:
        best[i + 1], back_start[i + 1], back_id[i + 1], seen[i + 1] = score, i, -1, True
  # Back from the end, in reverse; then turned around.
  top = 0
  end = m
  while end > 0:
    start = back_start[end]
    tid = back_id[end]
    if tid >= 0:
      out_ids[top], out_pos[top] = tid, start
      top += 1
    else:  # the character's UTF-8 bytes, last byte first
      cp = cps[a + start]
      nb = 1 if cp < 0x80 else (2 if cp < 0x800 else (3 if cp < 0x10000 else 4))
      for q in range(nb - 1, -1, -1):
        if nb == 1:
          byte = cp
        elif q == 0:  # the lead byte: 110xxxxx, 1110xxxx or 11110xxx
          byte = (0xC0 if nb == 2 else (0xE0 if nb == 3 else 0xF0)) | (cp >> (6 * (nb - 1)))
        else:
          byte = 0x80 | ((cp >> (6 * (nb - 1 - q))) & 0x3F)
        out_ids[top], out_pos[top] = byte_base + byte, -1 - start
        top += 1
    end = start
  out_ids[:top] = out_ids[:top][::-1].copy()
  out_pos[:top] = out_pos[:top][::-1].copy()
  return top


@_jit
def _utf8_bytes(cps):
  size = 0
  for i in range(len(cps)):
    cp = cps[i]
    size += 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
  return size


@_jit
def _encode_many(cps, bounds, cls, root, table, value, shift, scores, p_root, p_table,
                 p_value, p_shift, style, unk_score, max_chars, byte_base, want_spans,
                 c_slots, c_pool, c_state):
  """`_encode` of each text ``cps[bounds[r]:bounds[r + 1]]``, concatenated; and counts."""
  capacity = _utf8_bytes(cps)  # tokens <= UTF-8 bytes
  ids = np.empty(capacity, np.int32)
  spans = np.empty((capacity if want_spans else 0, 2), np.int32)
  counts = np.empty(len(bounds) - 1, np.int64)
  total = 0
  for r in range(len(bounds) - 1):
    row_ids, row_spans = _encode(cps[bounds[r]:bounds[r + 1]], cls, root, table, value,
                                 shift, scores, p_root, p_table, p_value, p_shift,
                                 style, unk_score, max_chars, byte_base, want_spans,
                                 c_slots, c_pool, c_state)
    k = len(row_ids)
    ids[total:total + k] = row_ids
    if want_spans:
      spans[total:total + k] = row_spans
    counts[r] = k
    total += k
  return ids[:total], spans[:total], counts


@_jit
def _encode(cps, cls, root, table, value, shift, scores, p_root, p_table, p_value,
            p_shift, style, unk_score, max_chars, byte_base, want_spans,
            c_slots, c_pool, c_state):
  """Ids (and spans) of ``cps``; the run cache: ``c_slots[slot] = (hash, record)``, a
  record in ``c_pool`` = [chars m, tokens k, m code points, k ids, k starts];
  ``c_state`` = (records, pool used)."""
  n = len(cps)
  capacity = _utf8_bytes(cps)  # tokens <= UTF-8 bytes
  ids = np.empty(capacity, np.int32)
  spans = np.empty((capacity if want_spans else 0, 2), np.int32)
  best = np.empty(n + 1, np.float64)
  seen = np.zeros(n + 1, np.bool_)
  back_start = np.empty(n + 1, np.int64)
  back_id = np.empty(n + 1, np.int32)
  run_ids = np.empty(capacity, np.int32)
  run_pos = np.empty(capacity, np.int32)
  slot_mask = len(c_slots) - 1
  count = 0
  a = 0
  while a < n:
    b = _run_end(cps, cls, a, p_root, p_table, p_value, p_shift, style)
    m = b - a
    k = -1  # tokens of this run, once known
    src, ids_at, pos_at = run_ids, 0, -1  # pos_at -1: the starts are in run_pos
    if m <= _CACHE_MAX_CHARS:
      h = _FNV_OFFSET
      for q in range(a, b):
        h = (h ^ np.uint64(cps[q])) * _FNV_PRIME
      key = np.int64(h | np.uint64(1))  # 0 marks an empty slot
      slot = np.int64((h * _HASH_MULTIPLIER) >> np.uint64(40)) & slot_mask
      while c_slots[slot, 0] != 0:
        if c_slots[slot, 0] == key:
          r = c_slots[slot, 1]
          if c_pool[r] == m:
            same = True
            for q in range(m):
              if c_pool[r + 2 + q] != cps[a + q]:
                same = False
                break
            if same:
              k = c_pool[r + 1]
              src, ids_at, pos_at = c_pool, r + 2 + m, r + 2 + m + k
              break
        slot = (slot + 1) & slot_mask
      if k < 0:
        k = _viterbi(cps, a, m, root, table, value, shift, scores, unk_score, max_chars,
                     byte_base, best, seen, back_start, back_id, run_ids, run_pos)
        r = c_state[1]
        if 2 * c_state[0] < len(c_slots) and r + 2 + m + 2 * k <= len(c_pool):
          c_slots[slot, 0], c_slots[slot, 1] = key, r  # else full: no more records
          c_pool[r], c_pool[r + 1] = m, k
          for q in range(m):
            c_pool[r + 2 + q] = cps[a + q]
          c_pool[r + 2 + m:r + 2 + m + k] = run_ids[:k]
          c_pool[r + 2 + m + k:r + 2 + m + 2 * k] = run_pos[:k]
          c_state[0], c_state[1] = c_state[0] + 1, r + 2 + m + 2 * k
          src, ids_at, pos_at = c_pool, r + 2 + m, r + 2 + m + k
        else:
          src, ids_at, pos_at = run_ids, 0, -1
    else:
      k = _viterbi(cps, a, m, root, table, value, shift, scores, unk_score, max_chars,
                   byte_base, best, seen, back_start, back_id, run_ids, run_pos)
      src, ids_at, pos_at = run_ids, 0, -1
    src_pos, src_pos_at = (run_pos, 0) if pos_at < 0 else (src, pos_at)
    for t in range(k):
      ids[count] = src[ids_at + t]
      if want_spans:
        pos = src_pos[src_pos_at + t]
        if pos >= 0:  # a learned string: to the next token's start, or the run's end
          spans[count, 0] = a + pos
          if t + 1 < k:
            nxt = src_pos[src_pos_at + t + 1]
            spans[count, 1] = a + (nxt if nxt >= 0 else -1 - nxt)
          else:
            spans[count, 1] = b
        else:  # a byte of one character: the whole character
          spans[count, 0] = a - 1 - pos
          spans[count, 1] = a - pos
      count += 1
    a = b
  return ids[:count], spans[:count]
