"""Trains an fsqtok experiment from an ml-collections config.

  python experiments/train.py --config=configs/recon.py --workdir=runs/recon
  python experiments/train.py --config=configs/curriculum.py --workdir=runs/curriculum

Every config field can be overridden: ``--config.train.num_steps=500``. Running again
with the same workdir resumes from the last checkpoint (or does nothing if finished).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsqtok.train import curriculum  # noqa: E402  pylint: disable=g-import-not-at-top
from fsqtok.train import recon  # noqa: E402  pylint: disable=g-import-not-at-top
from fsqtok.train import workdir as workdir_lib  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, reports.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])

def _recon_summary(report, workdir):
  val = report["validation"]
  return (f"[recon] held-out byte accuracy {val['byte_accuracy']:.4f}, "
          f"perplexity {val['perplexity']:.4f}, exact match {val['exact_match']:.4f}, "
          f"collision rate {val['collision_rate']:.4f}, "
          f"{report['train_pieces_per_second']:.0f} pieces/s. "
          f"Report: {os.path.join(workdir, 'recon', 'report.md')}")


def _percent(share) -> str:
  """A share as a percentage; "n/a" where it is unknown (MFU on a CPU: no known peak)."""
  return "n/a" if share is None else f"{share:.1%}"


def _curriculum_summary(report, workdir):
  lines = [f"[curriculum] {report['source']}: held-out bits per byte "
           f"{report['bits_per_byte']:.4f}"]
  for phase in ("lm", "joint"):
    r = report.get(phase, {})
    if "validation" in r:
      lines.append(f"  {phase}: {r['validation']['bits_per_byte']:.4f} bits/byte, "
                   f"{r['validation']['bytes_per_token']:.2f} bytes/token, "
                   f"{r['train_tokens_per_second']:.0f} tokens/s, MFU {_percent(r.get('mfu'))}"
                   f" on {r.get('devices', '?')}")
  if "vocabulary" in report.get("joint", {}):
    v = report["joint"]["vocabulary"]
    lines.append(f"  vocabulary after joint: {v['still_exact']:.2%} still exact, "
                 f"{v['same_code']:.2%} same code")
  lines.append(f"  sample: {report['sample']['text']!r}")
  lines.append(f"  report: {os.path.join(workdir, 'curriculum_report.json')}")
  return "\n".join(lines)


PHASES = {"recon": (recon.train_recon, _recon_summary),
          "curriculum": (curriculum.run_curriculum, _curriculum_summary)}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (Orbax) out
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  config = _CONFIG.value
  if config.phase not in PHASES:
    raise app.UsageError(f"Unknown phase {config.phase!r}; known: {sorted(PHASES)}.")
  logging.info("Config:\n%s", config)
  run, summary = PHASES[config.phase]
  try:
    report = run(config, _WORKDIR.value)
  except (workdir_lib.WorkdirInUse, recon.ConfigError, OSError) as e:
    # one line, no traceback: a work directory in use, a config field that cannot work,
    # a missing corpus, an unwritable or full disk
    raise SystemExit(f"train.py: {e}") from None
  print(summary(report, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
