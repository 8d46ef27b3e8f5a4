"""A TFDS builder that turns the user's own text files into a prepared dataset.

Going through TFDS gives local files what ``tfds:NAME`` datasets have: a prepared,
cached, random-access copy (array_record, no TensorFlow needed). The builder config is
named by a digest of the files' paths, sizes and modification times, so editing a file
prepares a fresh copy instead of reading a stale one.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

import tensorflow_datasets as tfds

from fsqtok.data import corpus


@dataclasses.dataclass
class FilesTextConfig(tfds.core.BuilderConfig):
  paths: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  invalid_utf8: str = "error"  # fsqtok.data.corpus.INVALID_UTF8


class _LocalFilesInfo(tfds.core.DatasetInfo):
  """The info of a ``files:`` corpus, which has no published copy to start from."""

  def initialize_from_bucket(self) -> None:
    """Nothing to fetch. (TFDS's own makes a temporary directory for the published files
    each time a builder of an unprepared dataset is made, and never removes it: one empty
    directory left in /tmp by every fresh ``files:`` corpus.)"""


class FilesText(tfds.core.GeneratorBasedBuilder):
  """One example per file: its text and its path. A single ``train`` split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalFilesInfo(
        builder=self,
        description="Text files selected by a glob (fsqtok `files:` corpus).",
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "path": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, path in enumerate(self.builder_config.paths):
      with open(path, "rb") as f:
        text = corpus.decode_document(f.read(), path, self.builder_config.invalid_utf8)
      yield i, {"text": text or "", "path": path}  # a skipped file: no text


def resolve_glob(pattern: str) -> tuple[str, ...]:
  """Sorted absolute paths of the regular files matching a glob; an error if none."""
  paths = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(
        f"files:{pattern} matches no file. Give a path or glob of existing text files, "
        f"e.g. files:data/*.txt or files:'corpus/**/*.md' (quote it so the shell leaves it).")
  return tuple(paths)


def files_digest(paths: tuple[str, ...]) -> str:
  """A digest of the files' paths, sizes and modification times: it changes when a file
  is edited, added or removed."""
  digest = hashlib.blake2b(digest_size=8)
  for p in paths:
    st = os.stat(p)
    digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def files_builder(pattern: str, data_dir: str | None = None, invalid_utf8: str = "error"
                  ) -> FilesText:
  """The prepared builder for the files matching ``pattern`` (prepared on first use;
  ``invalid_utf8``: `fsqtok.data.corpus.INVALID_UTF8`, part of the prepared copy's name)."""
  corpus.check_invalid_utf8(invalid_utf8)
  paths = resolve_glob(pattern)
  suffix = "" if invalid_utf8 == "error" else f"-{invalid_utf8.replace('_', '-')}"
  config = FilesTextConfig(name=f"g{files_digest(paths)}{suffix}", paths=paths,
                           invalid_utf8=invalid_utf8, description=f"files:{pattern}")
  builder = FilesText(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder
