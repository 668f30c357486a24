"""Loss curves of a training run from its train_log.jsonl: per-epoch means and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(log_path: str | Path) -> list[dict]:
    """The records of a train_log.jsonl (one per step), in step order; unreadable lines are skipped."""
    rows = []
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return sorted(rows, key=lambda r: r["step"])


def epoch_losses(rows: list[dict], steps_per_epoch: int) -> list[float]:
    """Mean step loss of each epoch (steps 1..spe are epoch 1; the last epoch may be partial)."""
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        by_epoch.setdefault((int(r["step"]) - 1) // max(1, steps_per_epoch), []).append(float(r["loss"]))
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def plot_loss_curve(log_path: str | Path, png: str | Path, steps_per_epoch: int, title: str = "") -> Path:
    """Per-step loss, per-epoch mean and learning rate of a run -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["loss"] for r in rows], lw=0.6, alpha=0.5, label="step loss")
    means = epoch_losses(rows, steps_per_epoch)
    ax.plot([(i + 1) * steps_per_epoch for i in range(len(means))], means, "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean cross-entropy per answer token)")
    ax.set_yscale("log")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="grey", lw=1, ls="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or str(Path(log_path).parent.name), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
