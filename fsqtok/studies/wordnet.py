"""A reader of the WordNet 3.0 database files, for word-sense evaluation.

Reads the plain-text database Debian's ``wordnet-base`` installs under
``/usr/share/wordnet`` (``index.{noun,verb,adj,adv}``: a lemma's synsets in sense order;
``data.*``: each synset's words and gloss, see ``man 5 wndb``). A gloss ends with quoted
example sentences; an example that contains the lemma (or a regular inflection of it)
is a sense-labelled usage of that lemma. No NLTK needed.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Iterable, Sequence

DEFAULT_DIR = "/usr/share/wordnet"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_QUOTED = re.compile(r'"([^"]+)"')
_SUFFIXES = ("", "s", "es", "ed", "d", "ing")


@dataclasses.dataclass(frozen=True)
class Synset:
  offset: int
  pos: str
  lemmas: tuple[str, ...]
  gloss: str
  examples: tuple[str, ...]

  @property
  def key(self) -> str:
    """A stable sense label, e.g. ``n08420278``."""
    return f"{self.pos}{self.offset:08d}"


@dataclasses.dataclass(frozen=True)
class SenseExample:
  word: str          # the lemma, e.g. "bank"
  sense: str         # the synset key of the sense used, e.g. "n09213565"
  sentence: str      # the example sentence
  start: int         # character span of the word in the sentence
  end: int


def check_database(directory: str, pos: Iterable[str] = tuple(POS_FILES)) -> None:
  """Raises a clear error if ``directory`` lacks the index/data files of ``pos``."""
  missing = [os.path.join(directory, f"{kind}.{POS_FILES[p]}") for p in pos
             for kind in ("index", "data")
             if not os.path.isfile(os.path.join(directory, f"{kind}.{POS_FILES[p]}"))]
  if missing:
    raise FileNotFoundError(
        f"WordNet database not found: missing {', '.join(missing)}. Install it with "
        f"`apt-get install wordnet-base` (files go to {DEFAULT_DIR}), or point "
        f"--wordnet_dir at a directory holding index.noun/data.noun etc.")


def _lines(path: str):
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      if line.startswith("  ") or not line.strip():  # the license header
        continue
      yield line.rstrip("\n")


def read_index(directory: str, pos: str) -> dict[str, list[int]]:
  """``lemma -> synset offsets`` in WordNet's sense order (most frequent first)."""
  out = {}
  for line in _lines(os.path.join(directory, f"index.{POS_FILES[pos]}")):
    f = line.split()
    try:
      n_synsets, n_ptrs = int(f[2]), int(f[3])
      offsets = [int(x) for x in f[4 + n_ptrs + 2:4 + n_ptrs + 2 + n_synsets]]
    except (IndexError, ValueError) as e:
      raise ValueError(f"Malformed line in index.{POS_FILES[pos]}: {line[:80]!r}") from e
    out[f[0]] = offsets
  return out


def read_synsets(directory: str, pos: str) -> dict[int, Synset]:
  """``offset -> Synset`` of one part of speech (from ``data.<pos>``)."""
  out = {}
  for line in _lines(os.path.join(directory, f"data.{POS_FILES[pos]}")):
    head, _, gloss = line.partition(" | ")
    f = head.split()
    try:
      offset, n_words = int(f[0]), int(f[3], 16)
      lemmas = tuple(re.sub(r"\(.*\)$", "", f[4 + 2 * i]).lower() for i in range(n_words))
    except (IndexError, ValueError) as e:
      raise ValueError(f"Malformed line in data.{POS_FILES[pos]}: {line[:80]!r}") from e
    out[offset] = Synset(offset, pos, lemmas, gloss.strip(),
                         tuple(s.strip() for s in _QUOTED.findall(gloss)))
  return out


def sense_counts(directory: str, pos: Iterable[str] = tuple(POS_FILES)) -> dict[str, int]:
  """Number of senses of each lemma, over the given parts of speech."""
  check_database(directory, pos)
  counts: dict[str, int] = {}
  for p in pos:
    for lemma, offsets in read_index(directory, p).items():
      counts[lemma] = counts.get(lemma, 0) + len(offsets)
  return counts


def find_word(sentence: str, word: str) -> tuple[int, int] | None:
  """Character span of ``word`` (or a regular inflection) as a whole word, or None."""
  pattern = r"\b" + re.escape(word) + "(?:" + "|".join(s for s in _SUFFIXES if s) + r")?\b"
  m = re.search(pattern, sentence, flags=re.IGNORECASE)
  return None if m is None else (m.start(), m.end())


def sense_examples(directory: str, pos: Iterable[str] = ("n", "v"), *, min_senses: int = 2,
                   min_examples_per_sense: int = 2, max_words: int = 0
                   ) -> list[SenseExample]:
  """Sense-labelled example sentences of polysemous single-word lemmas.

  A lemma is kept when at least ``min_senses`` of its senses (within one part of speech)
  each have ``min_examples_per_sense`` examples containing the lemma; only those senses
  are kept. ``max_words``: keep the first that many lemmas, one part of speech after
  another in the order of ``pos``, alphabetical within each (a lemma kept in two parts of
  speech counts twice; 0 = all).
  """
  pos = tuple(pos)
  check_database(directory, pos)
  out: list[SenseExample] = []
  words = 0
  for p in pos:
    synsets = read_synsets(directory, p)
    for lemma, offsets in sorted(read_index(directory, p).items()):
      if "_" in lemma or "-" in lemma or not lemma.isalpha() or len(offsets) < 2:
        continue
      per_sense = []
      for off in offsets:
        s = synsets.get(off)
        if s is None:
          raise ValueError(f"index.{POS_FILES[p]} names synset {off} for {lemma!r}, absent "
                           f"from data.{POS_FILES[p]}: the database is inconsistent.")
        found = [(e, find_word(e, lemma)) for e in s.examples]
        found = [(e, span) for e, span in found if span is not None]
        if len(found) >= min_examples_per_sense:
          per_sense.append((s.key, found))
      if len(per_sense) < min_senses:
        continue
      for key, found in per_sense:
        out.extend(SenseExample(lemma, key, e, a, b) for e, (a, b) in found)
      words += 1
      if max_words and words >= max_words:
        return out
  return out


def write_fixture(directory: str, entries: dict[str, dict[str, list[str]]], pos: str = "n"
                  ) -> None:
  """Writes a tiny database in WordNet's format (tests, notebook): ``{lemma: {gloss:
  [examples]}}``, each gloss one synset. Offsets are byte positions as in the real files."""
  os.makedirs(directory, exist_ok=True)
  data_lines, index = [], {}
  position = len("  license header line\n")
  for lemma, senses in sorted(entries.items()):
    for gloss, examples in senses.items():
      quoted = "; ".join(f'"{e}"' for e in examples)
      body = f" 03 {pos} 01 {lemma} 0 000 | {gloss}" + (f"; {quoted}" if quoted else "") + "  \n"
      line = f"{position:08d}" + body
      data_lines.append(line)
      index.setdefault(lemma, []).append(position)
      position += len(line.encode("utf-8"))
  from fsqtok.train import workdir  # pylint: disable=g-import-not-at-top
  workdir.atomic_write_text(os.path.join(directory, f"data.{POS_FILES[pos]}"),
                            "  license header line\n" + "".join(data_lines))
  workdir.atomic_write_text(
      os.path.join(directory, f"index.{POS_FILES[pos]}"),
      "  license header line\n" + "".join(
          f"{lemma} {pos} {len(offs)} 1 @ {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs)
          + "  \n" for lemma, offs in sorted(index.items())))


def keep_polysemous(examples: Sequence[SenseExample], *, min_senses: int = 2,
                    min_examples_per_sense: int = 2) -> list[int]:
  """Indices of ``examples`` that `sense_examples`'s rule keeps once some examples are
  gone (e.g. seen in training): senses with ``min_examples_per_sense`` examples left, of
  lemmas (within one part of speech) with ``min_senses`` such senses. A sense left with
  one example would be scored without a training example, a lemma left with one sense
  always right."""
  per_sense = collections.Counter((e.word, e.sense) for e in examples)
  senses = collections.Counter((word, sense[0]) for (word, sense), n in per_sense.items()
                               if n >= min_examples_per_sense)
  return [i for i, e in enumerate(examples)
          if per_sense[e.word, e.sense] >= min_examples_per_sense
          and senses[e.word, e.sense[0]] >= min_senses]


def drop_seen(examples: Iterable[SenseExample], texts: Iterable[str]
              ) -> tuple[list[SenseExample], int]:
  """The examples whose sentence does not occur in ``texts`` (case-insensitive, verbatim),
  and how many were dropped: an evaluation never scores a sentence the model was trained
  on."""
  haystack = "\n".join(t.lower() for t in texts)
  kept, dropped = [], 0
  for e in examples:
    if e.sentence.lower() in haystack:
      dropped += 1
    else:
      kept.append(e)
  return kept, dropped
