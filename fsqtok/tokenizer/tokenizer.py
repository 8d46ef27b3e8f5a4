"""The exact tokenizer over a learned vocabulary, with byte fallback and special tokens.

Ids are laid out as: special tokens ``[0, S)``, the 256 byte-fallback tokens
``[S, S+256)``, the learned strings, then specials added later by the user.

Two segmentations (``Tokenizer.model``):

* ``"unigram"`` (the default build, `fsqtok.tokenizer.unigram`): every learned string has a score
  (its log probability). Text is split into the pre-tokenizer's runs
  (`fsqtok.tokenizer.pieces.split_runs`, uncut; ``runs``: GPT-2's classes, or with a
  punctuation run keeping the newlines after it) and each run into the strings of highest total
  score (Viterbi); a character no learned string covers costs the lowest score minus 10
  and becomes its UTF-8 byte tokens. Ties go to the path whose last token is longest.
  This is exactly the Hugging Face ``Unigram`` model's search, so the exported
  ``tokenizer.json`` (`fsqtok.tokenizer.hf_export`) gives the same ids. Learned strings may be one
  character long; they are matched inside runs only (a string that no run contains is
  never used). *Phrases* (multi-word learned strings, " of the"; `fsqtok.tokenizer.unigram`) are
  matched by the pre-tokenizer first, where one ends at a word boundary, so that each is
  one run (`fsqtok.tokenizer.pieces.run_regex`); the search then scores it against its words.
* ``"fewest"`` (the codec-exact build of `fsqtok.tokenizer.vocab`): learned strings are pieces,
  parts of pieces (2+ bytes) or *spans* of several whole pieces (`fsqtok.tokenizer.candidates`).
  Each piece (cut at ``max_piece_bytes``) gets its fewest-token segmentation, then spans
  replace runs of pieces where that saves the most tokens (weighted interval scheduling).

A unigram tokenizer encodes with the compiled search of `fsqtok.tokenizer.native_encode` (the same
ids; ``Tokenizer.native = False`` keeps the pure-Python reference below, which caches each
run's or piece's segmentation). Decoding concatenates the tokens' bytes, so
``decode(encode(x)) == x`` for every string that has a UTF-8 encoding. Nothing here
needs JAX or the codec.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import gc
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import threading
from typing import Iterable, Sequence

import numpy as np
from etils import epath

from fsqtok.data import processes
from fsqtok.tokenizer import native_encode
from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.train import workdir as workdir_lib

FORMAT = "fsqtok-tokenizer"
FORMAT_VERSION = 4  # 4 added "runs" (written only when not "gpt2"), 3 "phrases", 2 "model"
                    # and "scores"; 1 loads as "fewest"
MODELS = ("unigram", "fewest")
UNK_PENALTY = 10.0  # an uncovered character's score below the lowest (as Hugging Face's)
PARALLEL_MIN_CHARS = 1 << 20  # encode_batch's processes (pure Python): from this many characters
THREADS_MIN_CHARS = 1 << 16  # encode_batch's threads (compiled search): from this many characters
VOCAB_FILE = "tokenizer.json"
_THREADS_LOCK = threading.Lock()  # guards each tokenizer's encode_batch thread pool

DEFAULT_SPECIALS = (
    "[PAD]", "[BOS]", "[EOS]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "[REG0]", "[REG1]", "[REG2]", "[REG3]", "[IMG]", "[AUDIO]",
)


def _utf8(text: str) -> bytes:
  if not isinstance(text, str):
    raise TypeError(f"encode takes a str, got {type(text).__name__}; decode bytes first "
                    f"(bytes.decode('utf-8')).")
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(
        f"The text has a lone surrogate {text[e.start]!r} at index {e.start}; it has no "
        f"UTF-8 encoding, so no tokenizer can round-trip it. Repair the text first, e.g. "
        f"text.encode('utf-8', 'replace').decode('utf-8').") from None


def _check_save_target(directory: str) -> None:
  """A ``ValueError`` unless ``directory`` may become a tokenizer (`Tokenizer.save`): new,
  empty, or an earlier save; never a file, a folder of other files, or the working
  directory (or one above it)."""
  path = epath.Path(directory)
  if workdir_lib.is_local(directory):
    here, target = os.path.realpath(os.getcwd()), os.path.realpath(directory)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
      raise ValueError(f"Cannot save a tokenizer to {directory!r}: it is the working "
                       f"directory (or holds it), which a save replaces whole. Name a new "
                       f"directory, e.g. {os.path.join(directory, 'tokenizer')!r}.")
  if not path.exists():
    return
  if not path.is_dir():
    raise ValueError(f"Cannot save a tokenizer to {directory}: it is a file. Name a new "
                     f"directory.")
  if any(True for _ in path.iterdir()) and not (path / VOCAB_FILE).exists():
    raise ValueError(f"Cannot save a tokenizer to {directory}: it holds other files and no "
                     f"{VOCAB_FILE}, and a save replaces the directory whole. Name a new or "
                     f"empty directory; nothing was written.")


def _fsync_directory(path: str) -> None:
  """Makes a rename inside ``path`` durable (where the platform allows it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


class Tokenizer:
  """Encodes text to ids and back, exactly."""

  def __init__(self, learned: Iterable[str], *, codes: Sequence[int] | None = None,
               scores: Sequence[float] | None = None, phrases: Sequence[str] = (),
               specials: Sequence[str] = DEFAULT_SPECIALS,
               max_piece_bytes: int = pieces_lib.MAX_PIECE_BYTES, runs: str = "gpt2"):
    """``scores`` (log probabilities, one per learned string) make a ``"unigram"``
    tokenizer; without them it is ``"fewest"``. ``phrases``: the learned strings of a
    unigram tokenizer that its pre-tokenizer matches as one run; ``runs``: how its
    pre-tokenizer cuts text (`fsqtok.tokenizer.pieces.RUN_STYLES`)."""
    learned = list(learned)
    for name, values in (("codes", codes), ("scores", scores)):
      if values is not None and len(values) != len(learned):
        raise ValueError(f"{len(values)} {name} for {len(learned)} learned strings.")
    if len(set(specials)) != len(specials) or not all(specials):
      raise ValueError(f"Special tokens must be distinct non-empty strings: {specials}.")
    self.model = "fewest" if scores is None else "unigram"
    self.max_piece_bytes = max_piece_bytes
    self._specials = list(specials)
    self._learned: list[bytes] = []
    self._codes: list[int] = []
    self._scores: list[float] = []
    min_bytes = 1 if self.model == "unigram" else 2
    seen = set()
    for i, s in enumerate(learned):
      b = _utf8(s)
      if not min_bytes <= len(b) <= max_piece_bytes:
        continue  # single bytes already have a token; overlong strings are never matched
      if b in seen:
        raise ValueError(f"Learned string {s!r} appears twice in the vocabulary.")
      if self.model == "unigram":
        if not math.isfinite(scores[i]):
          raise ValueError(f"Learned string {s!r} has score {scores[i]}; scores are finite "
                           f"log probabilities.")
        self._scores.append(float(scores[i]))
      seen.add(b)
      self._learned.append(b)
      self._codes.append(-1 if codes is None else int(codes[i]))
    self.phrases = tuple(sorted(set(phrases)))
    if self.phrases:
      missing = [p for p in self.phrases if _utf8(p) not in seen]
      if self.model != "unigram" or missing:
        raise ValueError(f"Phrases must be learned strings of a unigram tokenizer; not "
                         f"learned: {missing[:5]}.")
    if runs != "gpt2" and self.model != "unigram":
      raise ValueError(f"runs={runs!r} is for a unigram tokenizer (with scores).")
    self.runs = runs
    self._run_re = pieces_lib.run_regex(self.phrases, runs)  # checks each phrase, and runs
    # The compiled search (unigram only); False: the pure-Python reference (same ids).
    self.native = self.model == "unigram" and native_encode.available()
    self._added: list[str] = []
    self._rebuild()

  # ---- vocabulary --------------------------------------------------------------------

  def _rebuild(self) -> None:
    self._byte_base = len(self._specials)
    self._learned_base = self._byte_base + 256
    self._added_base = self._learned_base + len(self._learned)
    self._bytes_to_id = {b: self._learned_base + i for i, b in enumerate(self._learned)}
    # Bytes each id decodes to (0 for specials), for offsets.
    self._byte_lengths = np.array([0] * self._byte_base + [1] * 256
                                  + [len(b) for b in self._learned]
                                  + [0] * len(self._added), np.int64)
    # Unigram: string -> (id, score); the longest string in characters bounds the search.
    self._scored = {b.decode("utf-8"): (self._learned_base + i, sc)
                    for i, (b, sc) in enumerate(zip(self._learned, self._scores))}
    self._max_chars = max(map(len, self._scored), default=1)
    self._unk_score = min(min(self._scores, default=0.0), 0.0) - UNK_PENALTY
    # Spans ("fewest" only) as a trie over pieces: piece -> [span id ending here or -1,
    # children]; a unigram tokenizer matches inside runs, so it needs none.
    self._span_trie: dict[str, list] = {}
    for b, i in (self._bytes_to_id.items() if self.model == "fewest" else ()):
      parts = pieces_lib.split_pieces(b.decode("utf-8"), self.max_piece_bytes)
      if len(parts) > 1:
        children = self._span_trie
        for part in parts:
          node = children.setdefault(part, [-1, {}])
          children = node[1]
        node[0] = i
    all_specials = self._specials + self._added
    self._special_to_id = {s: self.token_to_id(s) for s in all_specials}
    pattern = "|".join(re.escape(s) for s in sorted(all_specials, key=len, reverse=True))
    self._special_re = re.compile(f"({pattern})") if all_specials else None
    self._cache: dict[str, tuple[int, ...]] = {}
    self._encoder: native_encode.Encoder | None = None
    self._threads: concurrent.futures.ThreadPoolExecutor | None = None
    self._id_objects: np.ndarray | None = None  # the ids as Python ints (`_id_lists`)

  def _native_encoder(self) -> native_encode.Encoder | None:
    """The compiled search, built on first use; None where it is not used."""
    if not (self.native and self.model == "unigram"):
      return None
    if self._encoder is None:
      self._encoder = native_encode.Encoder.build(
          self._scored, self.phrases, self._unk_score, self._byte_base, self.vocab_size,
          self.runs)
    return self._encoder

  @property
  def vocab_size(self) -> int:
    """Every id: specials, byte fallback, learned strings and added specials."""
    return self._added_base + len(self._added)

  def __len__(self) -> int:
    return self.vocab_size

  @property
  def learned_ids(self) -> range:
    """Ids of the learned strings, most frequent first."""
    return range(self._learned_base, self._added_base)

  @property
  def special_tokens(self) -> list[str]:
    return self._specials + self._added

  def add_special_tokens(self, tokens: Sequence[str]) -> int:
    """Appends new special tokens (ids after the vocabulary); returns how many were new."""
    if isinstance(tokens, str):  # a string would add each of its characters
      raise TypeError(f"add_special_tokens takes a list of strings, got the string "
                      f"{tokens!r}: use add_special_tokens([{tokens!r}]).")
    new = [t for t in dict.fromkeys(tokens) if t not in self._special_to_id]
    if not all(isinstance(t, str) and t for t in new):
      raise ValueError(f"Special tokens must be non-empty strings: {tokens}.")
    self._added.extend(new)
    self._rebuild()
    return len(new)

  def token_to_id(self, token: str) -> int | None:
    if token in self._specials:
      return self._specials.index(token)
    if token in self._added:
      return self._added_base + self._added.index(token)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
    if m:
      return self._byte_base + int(m.group(1), 16)
    return self._bytes_to_id.get(token.encode("utf-8", "surrogatepass"))

  def id_to_token(self, token_id: int) -> str:
    return self._token_bytes_or_special(token_id, display=True)

  def token_bytes(self, token_id: int) -> bytes | None:
    """The bytes a token decodes to (None for special tokens)."""
    tok = self._token_bytes_or_special(token_id)
    return None if isinstance(tok, str) else tok

  @property
  def pad_id(self) -> int:
    return self._special_id("[PAD]")

  @property
  def bos_id(self) -> int:
    return self._special_id("[BOS]")

  @property
  def eos_id(self) -> int:
    return self._special_id("[EOS]")

  def id_to_score(self, token_id: int) -> float | None:
    """The log probability of a learned token of a unigram tokenizer (None otherwise)."""
    i = token_id - self._learned_base
    return self._scores[i] if self._scores and 0 <= i < len(self._learned) else None

  def id_to_code(self, token_id: int) -> int:
    """The FSQ code index of a learned token (-1 for specials, bytes, or no codes)."""
    i = token_id - self._learned_base
    return self._codes[i] if 0 <= i < len(self._learned) else -1

  def _token_bytes_or_special(self, token_id: int, display: bool = False):
    if not 0 <= token_id < self.vocab_size:
      raise IndexError(f"Token id {token_id} is outside the vocabulary [0, {self.vocab_size}).")
    if token_id < self._byte_base:
      return self._specials[token_id]
    if token_id < self._learned_base:
      b = token_id - self._byte_base
      return f"<0x{b:02X}>" if display else bytes([b])
    if token_id < self._added_base:
      b = self._learned[token_id - self._learned_base]
      return b.decode("utf-8") if display else b
    return self._added[token_id - self._added_base]

  # ---- encoding ----------------------------------------------------------------------

  def _segment(self, data: bytes, *, whole: bool = True) -> tuple[int, ...]:
    """Fewest tokens for the bytes of one piece: vocabulary strings and single bytes
    (``whole=False``: without the string ``data`` itself)."""
    n = len(data)
    best = [0] + [n + 1] * n
    back = [0] * (n + 1)
    for end in range(1, n + 1):
      for start in range(max(0, end - self.max_piece_bytes), end):
        if best[start] + 1 < best[end] and (
            end - start == 1 or (data[start:end] in self._bytes_to_id
                                 and (whole or end - start < n))):
          best[end], back[end] = best[start] + 1, start
    ids = []
    end = n
    while end:
      start = back[end]
      ids.append(self._byte_base + data[start] if end - start == 1
                 else self._bytes_to_id[data[start:end]])
      end = start
    return tuple(reversed(ids))

  def _viterbi(self, run: str) -> tuple[int, ...]:
    """Highest-scoring segmentation of one run (Hugging Face Unigram's search, step for
    step: starts in order, strings by length, a strictly better score replaces)."""
    n = len(run)
    best: list[float | None] = [0.0] + [None] * n
    back = [(0, -1)] * (n + 1)  # (start, id; -1: an uncovered character)
    scored, unk = self._scored, self._unk_score
    for i in range(n):
      here = best[i]
      single = False
      for j in range(i + 1, min(n, i + self._max_chars) + 1):
        hit = scored.get(run[i:j])
        if hit is not None:
          score = here + hit[1]
          if best[j] is None or score > best[j]:
            best[j], back[j] = score, (i, hit[0])
          single = single or j == i + 1
      if not single:
        score = here + unk
        if best[i + 1] is None or score > best[i + 1]:
          best[i + 1], back[i + 1] = score, (i, -1)
    ids: list[int] = []
    end = n
    while end:
      start, tid = back[end]
      if tid >= 0:
        ids.append(tid)
      else:
        ids.extend(reversed([self._byte_base + b for b in run[start:end].encode("utf-8")]))
      end = start
    return tuple(reversed(ids))

  def _piece_ids(self, piece: str) -> tuple[int, ...]:
    """Ids of one piece (a run for unigram), cached: a dictionary hit, else the fewest-token
    or Viterbi segmentation."""
    cached = self._cache.get(piece)
    if cached is None:
      if self.model == "unigram":
        cached = self._viterbi(piece)
      else:
        data = piece.encode("utf-8")
        whole = self._bytes_to_id.get(data)
        cached = (whole,) if whole is not None else self._segment(data)
      if len(self._cache) < 1_000_000:
        self._cache[piece] = cached
    return cached

  def _span_matches(self, pieces: Sequence[str], per_piece: Sequence[tuple[int, ...]],
                    exclude: int = -1) -> list[tuple[int, int, int, int]]:
    """``(start, pieces, id, tokens saved)`` of every span in ``pieces`` that saves
    tokens, by start."""
    trie = self._span_trie
    cum = [0, *itertools.accumulate(map(len, per_piece))]
    n = len(pieces)
    matches = []
    for i in itertools.compress(range(n), map(trie.__contains__, pieces)):
      node = trie[pieces[i]]
      j = i + 1
      while j < n:
        node = node[1].get(pieces[j])
        if node is None:
          break
        j += 1
        if node[0] >= 0 and node[0] != exclude and cum[j] - cum[i] > 1:
          matches.append((i, j - i, node[0], cum[j] - cum[i] - 1))
    return matches

  def _segment_pieces(self, pieces: Sequence[str], exclude: int = -1) -> list[int]:
    """Fewest-token ids of a sequence of pieces (``exclude``: a span id not to use)."""
    cache = self._cache  # the hot path: one dictionary lookup per cached piece
    per_piece = [cache.get(p) or self._piece_ids(p) for p in pieces]
    matches = self._span_matches(pieces, per_piece, exclude) if self._span_trie else []
    if not matches:
      return list(itertools.chain.from_iterable(per_piece))
    # Weighted interval scheduling: gain[k] = most tokens saved by spans starting at or
    # after matches[k]'s start.
    starts = [m[0] for m in matches]
    gain = [0] * (len(matches) + 1)
    take = [False] * len(matches)
    for k in range(len(matches) - 1, -1, -1):
      i, m, _, saved = matches[k]
      with_k = saved + gain[bisect.bisect_left(starts, i + m)]
      take[k] = with_k > gain[k + 1]
      gain[k] = with_k if take[k] else gain[k + 1]
    ids: list[int] = []
    pos, k = 0, 0
    while k < len(matches):
      i, m, tid, _ = matches[k]
      if not take[k]:
        k += 1
        continue
      ids.extend(itertools.chain.from_iterable(per_piece[pos:i]))
      ids.append(tid)
      pos = i + m
      k = bisect.bisect_left(starts, pos, lo=k + 1)
    ids.extend(itertools.chain.from_iterable(per_piece[pos:]))
    return ids

  def split(self, text: str) -> list[str]:
    """The pre-tokenizer's pieces (``"fewest"``) or runs (``"unigram"``, phrases first)."""
    _utf8(text)  # the same clear error on either path
    encoder = self._native_encoder()
    if encoder is not None:
      return encoder.split(text)
    if self.model == "unigram":
      return self._run_re.findall(text)
    return pieces_lib.split_pieces(text, self.max_piece_bytes)

  def encode_pieces(self, pieces: Sequence[str]) -> list[int]:
    """Ids of text already split by `split` (no specials parsed)."""
    if self.model == "unigram":
      return list(itertools.chain.from_iterable(map(self._piece_ids, pieces)))
    return self._segment_pieces(pieces)

  def _encode_text(self, text: str) -> list[int]:
    encoder = self._native_encoder()
    if encoder is not None:
      return encoder.encode(text)[0].tolist()
    if self.model == "unigram":
      cache = self._cache  # the hot path: one dictionary lookup per cached run
      return list(itertools.chain.from_iterable(
          cache.get(r) or self._piece_ids(r) for r in self._run_re.findall(text)))
    return self._segment_pieces(pieces_lib.split_pieces(text, self.max_piece_bytes))

  def fewest_tokens_without(self, token_id: int) -> int:
    """How many tokens the string of a learned token needs if that token is removed
    (what the vocabulary loses per use of it; `fsqtok.tokenizer.vocab`; "fewest" model only)."""
    if self.model != "fewest":
      raise ValueError("fewest_tokens_without is for 'fewest' tokenizers (fsqtok.tokenizer.vocab).")
    data = self._token_bytes_or_special(token_id)
    parts = pieces_lib.split_pieces(data.decode("utf-8"), self.max_piece_bytes)
    if len(parts) == 1:
      return len(self._segment(data, whole=False))
    return len(self._segment_pieces(parts, exclude=token_id))

  def encode(self, text: str, *, add_special_tokens: bool = False,
             parse_special: bool = False) -> list[int]:
    """Token ids of ``text``.

    ``add_special_tokens`` wraps the ids in [BOS] ... [EOS]. Special-token strings in the
    text stay ordinary text unless ``parse_special`` is set.
    """
    _utf8(text)
    if parse_special and self._special_re is not None:
      ids: list[int] = []
      for i, part in enumerate(self._special_re.split(text)):
        if i % 2:
          ids.append(self._special_to_id[part])
        elif part:
          ids.extend(self._encode_text(part))
    else:
      ids = self._encode_text(text)
    if add_special_tokens:
      ids = [self._special_id("[BOS]"), *ids, self._special_id("[EOS]")]
    return ids

  def encode_with_offsets(self, text: str, *, add_special_tokens: bool = False,
                          parse_special: bool = False
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and, per token, its character span ``(start, end)`` in ``text``.

    A byte-fallback token inside a multi-byte character spans that whole character;
    added [BOS]/[EOS] span ``(0, 0)``, as in Hugging Face tokenizers.
    """
    ids, offsets_Nx2 = self._encode_arrays(text, add_special_tokens, parse_special)
    return ids, list(map(tuple, offsets_Nx2.tolist()))

  def _encode_arrays(self, text: str, add_special_tokens: bool, parse_special: bool
                     ) -> tuple[list[int], np.ndarray]:
    """`encode_with_offsets` with the offsets as an int32 ``[N, 2]`` array."""
    _utf8(text)
    parts = (self._special_re.split(text) if parse_special and self._special_re is not None
             else [text])
    ids: list[int] = []
    firsts, lasts = [], []
    pos = 0
    for i, part in enumerate(parts):
      if i % 2:
        ids.append(self._special_to_id[part])
        firsts.append(np.array([pos]))
        lasts.append(np.array([pos + len(part)]))
      elif part and (encoder := self._native_encoder()) is not None:
        part_ids_N, spans_Nx2 = encoder.encode(part, offsets=True)
        firsts.append(spans_Nx2[:, 0] + pos)
        lasts.append(spans_Nx2[:, 1] + pos)
        ids.extend(part_ids_N.tolist())
      elif part:
        part_ids = self._encode_text(part)
        lengths = self._byte_lengths[np.asarray(part_ids, np.int64)]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        if part.isascii():
          firsts.append(starts + pos)
          lasts.append(ends + pos)
        else:  # the character of each byte: count the bytes that start a character
          data = np.frombuffer(part.encode("utf-8"), np.uint8)
          char_of_byte = np.cumsum((data & 0xC0) != 0x80) - 1 + pos
          firsts.append(char_of_byte[starts])
          lasts.append(char_of_byte[ends - 1] + 1)
        ids.extend(part_ids)
      pos += len(part)
    offsets = np.zeros((len(ids), 2), np.int32)
    if firsts:
      offsets[:, 0], offsets[:, 1] = np.concatenate(firsts), np.concatenate(lasts)
    if add_special_tokens:
      ids = [self._special_id("[BOS]"), *ids, self._special_id("[EOS]")]
      offsets = np.concatenate([np.zeros((1, 2), np.int32), offsets,
                                np.zeros((1, 2), np.int32)])
    return ids, offsets

  def encode_batch(self, texts: Sequence[str], *, padding: bool | str = False,
                   truncation: bool = False, max_length: int | None = None,
                   padding_side: str = "right", add_special_tokens: bool = False,
                   parse_special: bool = False, return_offsets_mapping: bool = True,
                   num_workers: int | None = None) -> dict:
    """Hugging Face-style batch encoding.

    ``num_workers``: how many encode the texts, in contiguous chunks, with the same ids
    as `encode`: threads running the compiled search (``native``), else worker processes
    (None: every core for batches of ``THREADS_MIN_CHARS`` / ``PARALLEL_MIN_CHARS``
    characters or more, else this thread; 1: this thread).

    ``padding``: False (lists of different lengths), True / "longest", or "max_length".
    ``truncation`` cuts to ``max_length`` (from the right). Returns ``input_ids``,
    ``attention_mask`` and (``return_offsets_mapping``) ``offset_mapping``: int32 numpy
    arrays ``[B, T]`` / ``[B, T, 2]`` when padded, lists otherwise.
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a list of strings; use encode for one string.")
    if padding is True:
      padding = "longest"
    if padding not in (False, "longest", "max_length", "do_not_pad"):
      raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}.")
    if padding_side not in ("right", "left"):
      raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    if (truncation or padding == "max_length") and (max_length is None or max_length < 1):
      raise ValueError("truncation and padding='max_length' need max_length >= 1.")
    gc_was_on = gc.isenabled()
    gc.disable()  # the rows are many lists: collections would walk them again and again
    try:
      return self._encode_batch(list(texts), padding, truncation, max_length, padding_side,
                                add_special_tokens, parse_special, return_offsets_mapping,
                                num_workers)
    finally:
      if gc_was_on:
        gc.enable()

  def _encode_batch(self, texts, padding, truncation, max_length, padding_side,
                    add_special_tokens, parse_special, return_offsets_mapping, num_workers):
    """`encode_batch` after its checks (with the garbage collector off)."""
    lists = padding in (False, "do_not_pad")
    rows = self._encode_rows(texts, add_special_tokens, parse_special,
                             return_offsets_mapping, num_workers, lists)
    if truncation:
      rows = [(ids[:max_length], None if offs is None else offs[:max_length])
              for ids, offs in rows]
    if lists:
      out = {"input_ids": [r[0] for r in rows],
             "attention_mask": [[1] * len(r[0]) for r in rows]}
      if return_offsets_mapping:
        out["offset_mapping"] = [r[1] for r in rows]
      return out
    width = max_length if padding == "max_length" else max((len(r[0]) for r in rows), default=0)
    if any(len(r[0]) > width for r in rows):
      raise ValueError(f"A text has more than max_length={width} tokens; set truncation=True.")
    pad = self._special_id("[PAD]")
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    offs = np.zeros((len(rows), width, 2), np.int32)
    for b, (row_ids, row_offs) in enumerate(rows):
      n = len(row_ids)
      cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
      ids[b, cols], mask[b, cols] = row_ids, 1
      if n and return_offsets_mapping:
        offs[b, cols] = row_offs
    out = {"input_ids": ids, "attention_mask": mask}
    if return_offsets_mapping:
      out["offset_mapping"] = offs
    return out

  def _as_lists(self, rows: list, offsets: bool) -> list:
    """Rows of (ids, offsets) as Python lists (`_id_lists`; offsets as tuples)."""
    ids = self._id_lists([r[0] for r in rows])
    return list(zip(ids, [list(map(tuple, r[1].tolist())) for r in rows] if offsets
                    else itertools.repeat(None)))

  def _id_lists(self, rows: list) -> list[list[int]]:
    """Rows of ids (int arrays or lists) as lists of Python ints. Arrays are gathered from
    one object array of the ids' ints, made once: no int object is allocated per token."""
    if not rows or not all(isinstance(r, np.ndarray) for r in rows):
      return [r.tolist() if isinstance(r, np.ndarray) else r for r in rows]
    if self._id_objects is None or len(self._id_objects) != self.vocab_size:
      self._id_objects = np.array(range(self.vocab_size), dtype=object)
    flat = self._id_objects[np.concatenate(rows)].tolist()
    ends = np.cumsum([len(r) for r in rows]).tolist()
    return [flat[a:b] for a, b in zip([0, *ends], ends)]

  def _encode_rows(self, texts: list[str], add_special_tokens: bool, parse_special: bool,
                   offsets: bool, num_workers: int | None, lists: bool) -> list[tuple]:
    """`_encode_arrays` of every text (ids alone without ``offsets``) on ``num_workers``
    threads (compiled search) or processes, one contiguous chunk each; with ``lists``,
    ids and offsets as Python lists."""
    threads = self._native_encoder() is not None
    if num_workers is None:
      big = sum(map(len, texts)) >= (THREADS_MIN_CHARS if threads else PARALLEL_MIN_CHARS)
      num_workers = (os.cpu_count() or 1) if big else 1
    if not isinstance(num_workers, int) or num_workers < 1:
      raise ValueError(f"num_workers must be None or an int >= 1, got {num_workers!r}.")
    num_workers = min(num_workers, len(texts))
    if num_workers <= 1:
      rows = (_native_rows(self, texts, add_special_tokens, parse_special, offsets) if threads
              else [_encode_one(self, t, add_special_tokens, parse_special, offsets)
                    for t in texts])
      return self._as_lists(rows, offsets) if lists else rows
    bounds = [len(texts) * k // num_workers for k in range(num_workers + 1)]
    if threads:  # the compiled search releases the GIL; each thread keeps its run cache
      with _THREADS_LOCK:  # one pool that only grows: callers on other threads share it
        if self._threads is None or self._threads._max_workers < num_workers:  # pylint: disable=protected-access
          self._threads = concurrent.futures.ThreadPoolExecutor(num_workers)  # (the old
        pool = self._threads  # one finishes what it was given, then goes)
      # Each thread: its share in one compiled call, rows as arrays; the lists (which
      # need the GIL) are built once all are done.
      parts = pool.map(
          lambda ab: _native_rows(self, texts[ab[0]:ab[1]], add_special_tokens,
                                  parse_special, offsets), zip(bounds, bounds[1:]))
      rows = [row for part in parts for row in part]
      return self._as_lists(rows, offsets) if lists else rows
    chunks = [(texts[a:b], add_special_tokens, parse_special, offsets)
              for a, b in zip(bounds, bounds[1:]) if b > a]  # one contiguous run a worker
    rows = []
    for ids_N, offsets_Nx2, counts in processes.map_chunks(_encode_chunk, chunks, num_workers,
                                                           shared=self):
      cut = np.cumsum(counts)[:-1]
      rows.extend(zip((ids.tolist() for ids in np.split(ids_N, cut)),
                      np.split(offsets_Nx2, cut) if offsets else itertools.repeat(None)))
    return self._as_lists(rows, offsets) if lists else rows

  def __getstate__(self) -> dict:
    # A worker process builds its own caches, compiled search and threads.
    return {**self.__dict__, "_cache": {}, "_encoder": None, "_threads": None,
            "_id_objects": None}

  def _special_id(self, token: str) -> int:
    if token not in self._special_to_id:
      raise ValueError(f"This tokenizer has no {token} special token.")
    return self._special_to_id[token]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """Text of ``ids``. Invalid UTF-8 (only possible from ids no text produced, e.g.
    sampled ones) becomes U+FFFD."""
    out: list[bytes] = []
    for i in ids:
      tok = self._token_bytes_or_special(int(i))
      if isinstance(tok, str):
        if not skip_special_tokens:
          out.append(tok.encode("utf-8"))
      else:
        out.append(tok)
    return b"".join(out).decode("utf-8", errors="replace")

  # ---- persistence -------------------------------------------------------------------

  def _payload(self) -> dict:
    """What `save` writes to ``tokenizer.json`` (and `load` reads back)."""
    return {
        # version 3 where it says all there is (an older fsqtok reads it alike)
        "format": FORMAT, "version": FORMAT_VERSION if self.runs != "gpt2" else 3,
        "model": self.model, "max_piece_bytes": self.max_piece_bytes,
        "specials": self._specials, "added_specials": self._added,
        "learned": [b.decode("utf-8") for b in self._learned], "codes": self._codes,
        "scores": self._scores if self.model == "unigram" else None,
        "phrases": list(self.phrases),
        **({"runs": self.runs} if self.runs != "gpt2" else {}),
    }

  def fingerprint(self) -> str:
    """sha256 of what `save` writes: equal exactly when two tokenizers are the same."""
    text = json.dumps(self._payload(), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

  def save(self, directory: str, extra_files: dict[str, bytes] | None = None) -> None:
    """Writes the tokenizer (and ``extra_files``: name -> content) to ``directory``.

    The directory is the tokenizer: it must be new, empty, or an earlier save (it holds
    ``tokenizer.json``), which is replaced whole. Anything else (a folder of other files,
    a file, the working directory) is refused before anything is written. Locally the
    files go to a new directory (each fsynced), which is then renamed into place; the
    earlier save is removed after (a crash between the two renames leaves it as
    ``.NAME.old.*`` beside it). On an object store (``gs://...``: no rename of
    directories) the old vocabulary goes first, then each file is an object written
    whole, the extra files first and the vocabulary last, so a directory with a
    vocabulary is complete."""
    if not workdir_lib.is_writer():  # one process of a multi-process JAX run writes
      return
    payload = self._payload()
    _check_save_target(directory)
    if not workdir_lib.is_local(directory):
      epath.Path(directory, VOCAB_FILE).unlink(missing_ok=True)
      for name, content in (extra_files or {}).items():
        workdir_lib.atomic_write_bytes(os.path.join(directory, name), content)
      workdir_lib.atomic_write_text(os.path.join(directory, VOCAB_FILE),
                                    json.dumps(payload, ensure_ascii=False))
      return
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.")
    try:
      files = {VOCAB_FILE: json.dumps(payload, ensure_ascii=False).encode("utf-8"),
               **(extra_files or {})}
      for name, content in files.items():
        with open(os.path.join(tmp, name), "wb") as f:
          f.write(content)
          f.flush()
          os.fsync(f.fileno())
      workdir_lib.make_shareable(tmp)  # mkdtemp makes it 0700
      old = None
      if os.path.exists(directory):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.old.")
        os.rmdir(old)
        os.replace(directory, old)
      os.replace(tmp, directory)
      _fsync_directory(parent)
      if old:
        shutil.rmtree(old)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(cls, directory: str) -> "Tokenizer":
    path = os.path.join(directory, VOCAB_FILE)
    if not workdir_lib.exists(path):
      raise FileNotFoundError(f"{directory} is not an fsqtok tokenizer: {VOCAB_FILE} is "
                              f"missing. Save one with Tokenizer.save(directory).")
    try:
      payload = workdir_lib.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is damaged (not valid JSON: {e}). Save the tokenizer "
                       f"again.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
      raise ValueError(f"{path} is not an fsqtok tokenizer (no format {FORMAT!r}); a "
                       f"Hugging Face tokenizer.json? Load that with `tokenizers`.")
    if payload.get("version") not in range(1, FORMAT_VERSION + 1):
      raise ValueError(f"{path} has format version {payload.get('version')}; this fsqtok "
                       f"reads versions 1 to {FORMAT_VERSION}: upgrade fsqtok.")
    if payload.get("model", "fewest") not in MODELS:
      raise ValueError(f"{path} has model {payload.get('model')!r}; this fsqtok knows "
                       f"{MODELS}: upgrade fsqtok.")
    try:
      tok = cls(payload["learned"], codes=payload["codes"], scores=payload.get("scores"),
                phrases=payload.get("phrases", ()), specials=payload["specials"],
                max_piece_bytes=payload["max_piece_bytes"], runs=payload.get("runs", "gpt2"))
      tok.add_special_tokens(payload["added_specials"])
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path} is damaged: {e!r}. Save the tokenizer again.") from None
    return tok


def _encode_chunk(tok: Tokenizer, texts: list[str], add_special_tokens: bool,
                  parse_special: bool, offsets: bool
                  ) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
  """A worker's rows as arrays (cheap to send back): every id, every offset, and how many
  belong to each text."""
  rows = [_encode_one(tok, t, add_special_tokens, parse_special, offsets) for t in texts]
  ids = np.fromiter(itertools.chain.from_iterable(r[0] for r in rows), np.int32)
  offsets_Nx2 = np.concatenate([r[1] for r in rows]) if offsets and rows else None
  return ids, offsets_Nx2, [len(r[0]) for r in rows]


def _native_row(tok: Tokenizer, text: str, add_special_tokens: bool, parse_special: bool,
                offsets: bool) -> tuple[np.ndarray | list[int], np.ndarray | None]:
  """`_encode_one` with the compiled search: ids as an int32 array (on a thread the search
  runs without the GIL; building Python lists would not)."""
  _utf8(text)  # first: a bytes or a lone surrogate gets its clear error
  if parse_special and tok._special_re is not None and tok._special_re.search(text):  # pylint: disable=protected-access
    return _encode_one(tok, text, add_special_tokens, parse_special, offsets)
  ids_N, spans_Nx2 = tok._native_encoder().encode(text, offsets)  # pylint: disable=protected-access
  if add_special_tokens:
    ids_N = np.concatenate([[tok.bos_id], ids_N, [tok.eos_id]]).astype(np.int32)
    if offsets:
      spans_Nx2 = np.concatenate([np.zeros((1, 2), np.int32), spans_Nx2,
                                  np.zeros((1, 2), np.int32)])
  return ids_N, spans_Nx2


def _native_rows(tok: Tokenizer, texts: list[str], add_special_tokens: bool,
                 parse_special: bool, offsets: bool) -> list[tuple]:
  """`_native_row` of every text; without special tokens to add or parse, all of them in
  one compiled call (`native_encode.Encoder.encode_many`: no Python, so no GIL, per text)."""
  if not texts:
    return []
  if add_special_tokens or (parse_special and tok._special_re is not None):  # pylint: disable=protected-access
    return [_native_row(tok, t, add_special_tokens, parse_special, offsets) for t in texts]
  try:
    ids_N, spans_Nx2, counts = tok._native_encoder().encode_many(texts, offsets)  # pylint: disable=protected-access
  except (TypeError, UnicodeEncodeError):
    for t in texts:
      _utf8(t)  # the clear error for the first text that is not a valid str
    raise
  cut = np.cumsum(counts[:-1])
  return list(zip(np.split(ids_N, cut),
                  np.split(spans_Nx2, cut) if offsets else itertools.repeat(None)))


def _encode_one(tok: Tokenizer, text: str, add_special_tokens: bool, parse_special: bool,
                offsets: bool) -> tuple[list[int], np.ndarray | None]:
  if offsets:
    return tok._encode_arrays(text, add_special_tokens, parse_special)  # pylint: disable=protected-access
  return tok.encode(text, add_special_tokens=add_special_tokens,
                    parse_special=parse_special), None
