"""The ``fsqtok`` command: train a tokenizer, encode, decode, inspect.

  fsqtok train-tokenizer --corpus files:'my/*.txt' --vocab-size 32768 --out tok/
  fsqtok encode --tokenizer tok/ < big.txt > ids.txt
  fsqtok decode --tokenizer tok/ < ids.txt > big.txt
  fsqtok inspect tok/

``encode`` writes one line of space-separated ids per input line (the line's newline is
part of its tokens), so ``decode`` restores the input byte for byte. Spans across a line
break are not used there: ``Tokenizer.encode`` on the whole text can give fewer tokens.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

from fsqtok.tokenizer import pieces as pieces_lib
from fsqtok.tokenizer import unigram as unigram_lib
from fsqtok.tokenizer.tokenizer import Tokenizer
from fsqtok.train import workdir as workdir_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "recon.py")


def load_config(spec: str):
  """``path/to/config.py[:arg]`` -> ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"fsqtok: config file {path} not found; pass --config "
                     f"path/to/configs/recon.py[:arg].")
  spec_obj = importlib.util.spec_from_file_location("fsqtok_user_config", path)
  module = importlib.util.module_from_spec(spec_obj)
  spec_obj.loader.exec_module(module)
  return module.get_config(arg)


def _train_tokenizer(args) -> None:
  from fsqtok.tokenizer.build import train_tokenizer  # pylint: disable=g-import-not-at-top
  config = load_config(args.config)
  config.data.source = args.corpus
  if args.steps:
    config.train.num_steps = args.steps
    config.tokenizer.codec_steps = args.steps
  if args.decoder_steps is not None:
    config.tokenizer.decoder_steps = args.decoder_steps
  if args.vocabulary:
    config.tokenizer.vocabulary = args.vocabulary
  if args.sample_mb:
    config.tokenizer.sample_chars = int(args.sample_mb * 1e6)
  if args.invalid_utf8:
    config.data.invalid_utf8 = args.invalid_utf8
  if args.runs:
    config.tokenizer.runs = args.runs
  if args.unused:
    config.tokenizer.unused = args.unused
  workdir = args.workdir or os.path.join(args.out.rstrip("/") + ".work")
  workdir_lib.check_writable(os.path.dirname(os.path.abspath(args.out)), "--out")
  workdir_lib.check_writable(workdir, "--workdir")
  tok, analysis = train_tokenizer(config, workdir, args.vocab_size, args.out)
  if "codec_exact_strings" in analysis:
    codec = (f"the codec reconstructs {analysis['codec_exact_strings']:.1%} of the learned "
             f"strings exactly ({analysis['codes_moved']} given a nearby free code)")
    if "assigned_codes_exact" in analysis:
      rounds = len(analysis["decoder_rounds"]) - 1
      missed = analysis["assigned_codes_not_exact"]
      codec += (f"; after {analysis['decoder_steps']} decoder steps and {rounds} rounds "
                + ("every one decodes exactly from its code" if not missed else
                   f"all but {missed} decode exactly from their codes "
                   f"({_floor_percent(analysis['assigned_codes_exact'])})"))
  else:
    codec = (f"fewer than {args.vocab_size} tokens means the codec reconstructs fewer "
             f"useful candidates exactly")
  dropped = analysis.get("unused_dropped", 0)
  print(f"Saved {args.out}: {len(tok)} tokens"
        + (f" ({dropped} learned strings the search never used dropped)" if dropped else "")
        + f", {analysis['train_bytes_per_token']:.3f} training bytes per token; {codec}; "
        f"codec run in {workdir}.")


def _floor_percent(share: float) -> str:
  """``share`` as a percentage to 3 decimals, rounded down: 1 missed of 32,499 is
  99.996%, never 100.000%."""
  return f"{math.floor(round(share * 1e5, 6)) / 1e3:.3f}%"


def _input_stream(path: str | None):
  if path and path != "-":
    return open(path, "rb")
  return sys.stdin.buffer


def _progress(stream, show: bool):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  try:
    size = os.fstat(stream.fileno()).st_size
  except (OSError, AttributeError, ValueError):
    size = 0
  return tqdm(total=size or None, unit="B", unit_scale=True, disable=not show or not size,
              file=sys.stderr, desc="encode")


def _encode(args) -> None:
  tok = Tokenizer.load(args.tokenizer)
  stream = _input_stream(args.input)
  out = sys.stdout
  bar = _progress(stream, not args.quiet)
  for lineno, raw in enumerate(stream, 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise SystemExit(f"fsqtok encode: input line {lineno} is not UTF-8 ({e.reason} at "
                       f"byte {e.start}); convert the file to UTF-8 first (iconv).") from None
    out.write(" ".join(map(str, tok.encode(line))) + "\n")
    bar.update(len(raw))
  bar.close()


def _decode(args) -> None:
  tok = Tokenizer.load(args.tokenizer)
  out = sys.stdout.buffer
  for lineno, raw in enumerate(_input_stream(args.input), 1):
    try:
      ids = [int(x) for x in raw.split()]
    except ValueError:
      raise SystemExit(f"fsqtok decode: line {lineno} is not space-separated integer "
                       f"ids.") from None
    try:
      text = tok.decode(ids, skip_special_tokens=args.skip_special_tokens)
    except IndexError as e:  # an id outside the vocabulary
      raise SystemExit(f"fsqtok decode: line {lineno}: {e} Decode with the tokenizer that "
                       f"produced these ids.") from None
    out.write(text.encode("utf-8"))
  out.flush()


def _vocab_report(directory: str) -> dict | None:
  """The codebook analysis the build left beside the tokenizer, if any."""
  path = os.path.join(directory, "vocab_report.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def inspect_report(tok: Tokenizer, directory: str, report: dict | None) -> str:
  """A text report of the vocabulary (and of its codebook, if the build left one)."""
  lengths = [len(tok.id_to_token(i).encode("utf-8")) for i in tok.learned_ids]
  lines = [f"fsqtok tokenizer {directory}",
           f"vocabulary: {len(tok)} ids = {len(tok.special_tokens)} special + 256 byte + "
           f"{len(tok.learned_ids)} learned",
           f"special tokens: {' '.join(tok.special_tokens)}"]
  if lengths:
    lines.append(f"learned token length: mean {sum(lengths) / len(lengths):.2f} bytes, "
                 f"max {max(lengths)}")
    first = [tok.id_to_token(i) for i in tok.learned_ids[:20]]
    lines.append("most frequent learned tokens: " + " ".join(json.dumps(t) for t in first))
  if report and "codec_exact_strings" in report:
    r = report
    lines.append(f"unigram vocabulary: {r['single_characters']} single characters; the codec "
                 f"reconstructs {r['codec_exact_strings']:.1%} of the learned strings "
                 f"exactly ({r['codec_exact_uses']:.1%} of their uses), {r['codes_moved']} "
                 f"moved to a nearby free code; {r['train_bytes_per_token']:.3f} training "
                 f"bytes per token")
  elif report:
    r = report
    c = r["composition"]
    lines.append(f"codebook: {r['codes_used']} codes used by {r['distinct_candidates']} "
                 f"distinct training candidates (utilization {r['code_utilization']:.4f}, "
                 f"collision rate {r['collision_rate']:.4f}); {r['exact_candidates']} "
                 f"reconstructed exactly")
    lines.append(f"learned tokens: {c['piece']} whole pieces, {c['sub']} parts of pieces, "
                 f"{c['span']} multi-piece spans; {r['train_bytes_per_token']:.3f} training "
                 f"bytes per token")
  return "\n".join(lines) + "\n"


def inspect_plot(tok: Tokenizer, report: dict | None, png_path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_len, ax_freq) = plt.subplots(1, 2, figsize=(10, 3.6))
  lengths = [len(tok.id_to_token(i).encode("utf-8")) for i in tok.learned_ids]
  ax_len.hist(lengths, bins=range(1, max(lengths, default=1) + 2), rwidth=0.9)
  ax_len.set(xlabel="learned token length (bytes)", ylabel="tokens")
  if tok.model == "unigram":
    scores = sorted((tok.id_to_score(i) for i in tok.learned_ids), reverse=True)
    ax_freq.semilogx(range(1, len(scores) + 1), scores)
    ax_freq.set(xlabel="token rank", ylabel="log probability", title="unigram scores")
  elif report:
    curve = report["code_frequency_curve"]
    ax_freq.loglog(range(1, len(curve) + 1), curve)
    ax_freq.set(xlabel="code rank", ylabel="occurrences", title="code frequency")
  fig.tight_layout()
  workdir_lib.save_figure(fig, png_path)


def _inspect(args) -> None:
  tok = Tokenizer.load(args.tokenizer)
  out_dir = args.out or args.tokenizer
  vocab_report = _vocab_report(args.tokenizer)
  text = inspect_report(tok, args.tokenizer, vocab_report)
  workdir_lib.atomic_write_text(os.path.join(out_dir, "inspect.txt"), text)
  inspect_plot(tok, vocab_report, os.path.join(out_dir, "inspect.png"))
  print(text + f"Wrote {os.path.join(out_dir, 'inspect.txt')} and inspect.png.")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="fsqtok", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train-tokenizer", help="train a vocabulary and its codec on a corpus, "
                                             "save the tokenizer")
  t.add_argument("--corpus", default="builtin", help="builtin | files:GLOB | tfds:NAME")
  t.add_argument("--vocab-size", type=int, default=32768,
                 help="every id: specials + 256 bytes + learned (at most that many: see "
                      "--unused)")
  t.add_argument("--out", required=True, help="directory to save the tokenizer in")
  t.add_argument("--config", default=_DEFAULT_CONFIG, help="codec config, path[:arg]")
  t.add_argument("--workdir", help="codec run directory (default: OUT.work)")
  t.add_argument("--steps", type=int, default=0,
                 help="the codec's steps (train.num_steps and tokenizer.codec_steps)")
  t.add_argument("--decoder-steps", type=int, default=None,
                 help="then the decoder's steps on the assigned codes "
                      "(tokenizer.decoder_steps; 0: none)")
  t.add_argument("--sample-mb", type=float, default=0,
                 help="train the vocabulary on a seeded sample of about this many MB of "
                      "the training text (tokenizer.sample_chars; 0: all of it)")
  t.add_argument("--invalid-utf8", choices=("error", "replace", "skip_document"),
                 help="bytes of the corpus files that are not UTF-8: stop (the config's "
                      "default), U+FFFD, or leave the file out (data.invalid_utf8)")
  t.add_argument("--vocabulary", choices=("unigram", "codec_exact"),
                 help="override tokenizer.vocabulary (default: the config's, unigram)")
  t.add_argument("--runs", choices=pieces_lib.RUN_STYLES,
                 help="how text is cut before the search (tokenizer.runs; default: the "
                      "config's, line_ends: punctuation keeps the newlines after it, so a "
                      "line's end can be one token; blank_lines: that, and whitespace "
                      "whole but for a last space, so a blank line before a word is one "
                      "run; gpt2: newlines stand apart)")
  t.add_argument("--unused", choices=unigram_lib.UNUSED_POLICIES,
                 help="learned strings the search never uses on the training text (a "
                      "corpus small for the size asked): drop them (the config's default: "
                      "fewer ids than asked, as SentencePiece), keep them (--vocab-size "
                      "ids exactly) or fill their places with whole runs (tokenizer.unused)")
  t.set_defaults(func=_train_tokenizer)
  for name, func, what in (("encode", _encode, "text -> id lines"),
                           ("decode", _decode, "id lines -> text")):
    e = sub.add_parser(name, help=what)
    e.add_argument("--tokenizer", required=True)
    e.add_argument("input", nargs="?", help="file (default: standard input)")
    if name == "encode":
      e.add_argument("--quiet", action="store_true", help="no progress bar")
    else:
      e.add_argument("--skip-special-tokens", action="store_true")
    e.set_defaults(func=func)
  i = sub.add_parser("inspect", help="vocabulary report and plots")
  i.add_argument("tokenizer")
  i.add_argument("--out", help="where to write inspect.txt / inspect.png (default: TOKENIZER)")
  i.set_defaults(func=_inspect)
  return p


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (OSError, ValueError, workdir_lib.WorkdirInUse) as e:
    # a missing or damaged input, an unwritable or full output (files are written to a
    # temporary name and renamed, so nothing half-written is left), a bad setting
    raise SystemExit(f"fsqtok {args.command}: {e}") from None


if __name__ == "__main__":
  main()
