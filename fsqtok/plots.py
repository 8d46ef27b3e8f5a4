"""Learning-curve plots from a run's ``metrics.jsonl`` (PNG, written atomically)."""
from __future__ import annotations

from fsqtok.train.workdir import MetricsLog, save_figure


def plot_learning_curves(metrics_path: str, png_path: str, title: str = "") -> None:
  """Train loss, and train / held-out byte accuracy, against the step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = MetricsLog.read(metrics_path)
  train = [r for r in records if r["split"] == "train"]
  valid = [r for r in records if r["split"] == "validation"]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
  ax_loss.set(xlabel="step", ylabel="train cross-entropy (nats)", yscale="log")
  ax_acc.plot([r["step"] for r in train], [r["byte_accuracy"] for r in train], label="train batches (data.weighting)")
  ax_acc.plot([r["step"] for r in valid], [r["byte_accuracy"] for r in valid], "o-",
              label="held-out")
  ax_acc.set(xlabel="step", ylabel="byte accuracy")
  ax_acc.legend()
  ax_acc.grid(alpha=0.3)
  ax_loss.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, png_path)
