"""Plots and terminal summaries for a BYE run (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def plot_layer_separation(det, path: Path) -> Path:
    """Any detector's per-layer statistic with its threshold (evidence layers in red), and below it the
    per-layer 2-GMM modes of the reference rules where the detector has them."""
    values = [np.nan if v is None else float(v) for v in det.layer_statistic]
    thresholds = [np.nan if t is None else float(t) for t in det.layer_threshold]
    layers = list(range(len(values)))
    sensitive = set(det.sensitive_layers)
    modes = [s for s in det.layer_stats if "means" in s]
    rows = 2 if modes else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(6, 0.3 * len(layers) + 3), 3.5 * rows + 0.5), sharex=True,
                             squeeze=False)
    ax1 = axes[0, 0]
    ax1.bar(layers, np.nan_to_num(values), color=["tab:red" if i in sensitive else "tab:gray" for i in layers])
    if thresholds and np.isfinite(thresholds).any():
        ax1.step(np.array(layers + [layers[-1] + 1]) - 0.5, thresholds + thresholds[-1:], where="post", color="k",
                 ls="--", lw=1, label="threshold")
        ax1.legend(fontsize=8)
    name = det.statistic_name
    ax1.set_ylabel(name if len(name) < 30 else name.split(",")[0][:40], fontsize=8)
    ax1.set_title(f"{det.rule}: {det.verdict}\nevidence layers in red: {sorted(sensitive) or 'none'}", fontsize=9)
    if modes:
        ax2 = axes[1, 0]
        for s in modes:
            for k, (mu, sd, w) in enumerate(zip(s["means"], s["stds"], s["weights"], strict=True)):
                ax2.errorbar(s["layer"] + (k - 0.5) * 0.25, mu, yerr=sd, fmt="o", ms=3 + 6 * w,
                             color="tab:blue" if k == 0 else "tab:orange", lw=1)
        ax2.set_ylabel("entropy (nats): 2-GMM means +- sd")
    axes[-1, 0].set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _normal_pdf(x, mu, var):
    return np.exp(-0.5 * (x - mu) ** 2 / var) / np.sqrt(2 * np.pi * var)


def plot_score_histogram(scores: np.ndarray, flagged: np.ndarray, gmm: dict | None, path: Path,
                         truth: np.ndarray | None = None, title: str = "",
                         xlabel: str = "score: mean entropy over sensitive layers (nats)") -> Path:
    """Histogram of sample scores with the fitted 2-component mixture and the flagging cut."""
    scores = np.asarray(scores, float)
    flagged = np.asarray(flagged, bool)
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = scores[np.isfinite(scores)]
    bins = np.histogram_bin_edges(finite if finite.size else [0.0, 1.0], bins=min(60, max(10, len(scores) // 5)))
    if truth is not None:
        truth = np.asarray(truth, bool)
        ax.hist(scores[~truth], bins=bins, alpha=0.6, density=True, label="clean (ground truth)")
        ax.hist(scores[truth], bins=bins, alpha=0.6, density=True, color="tab:red", label="poisoned (ground truth)")
    else:
        ax.hist(scores, bins=bins, alpha=0.6, density=True, label="samples")
    if gmm is not None:
        xs = np.linspace(bins[0], bins[-1], 400)
        total = np.zeros_like(xs)
        for w, mu, var in zip(gmm["weights"], gmm["means"], gmm["variances"], strict=True):
            pdf = w * _normal_pdf(xs, mu, max(var, 1e-12))
            total += pdf
            ax.plot(xs, pdf, lw=1, ls=":")
        ax.plot(xs, total, color="k", lw=1.2, label="2-GMM fit")
    if flagged.any() and (~flagged).any():
        low = scores[flagged].max() <= scores[~flagged].min()
        cut = (0.5 * (scores[flagged].max() + scores[~flagged].min()) if low
               else 0.5 * (scores[flagged].min() + scores[~flagged].max()))
        ax.axvline(cut, color="tab:red", ls="--", label=f"cut ({flagged.sum()} flagged)")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("density")
    ax.set_title(title or "Sample scores", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The region a CLIP processor sees: shortest side resized, centre square crop."""
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.convert("RGB").crop(box).resize((size, size), Image.BICUBIC)


def plot_attention_heatmaps(entries: Sequence[tuple[str, Image.Image, np.ndarray]], path: Path,
                            image_size: int = 336, suptitle: str = "") -> Path:
    """Each entry (title, image, attention over the patch grid [n] or [g, g]) as picture + overlay."""
    n = len(entries)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, image, att) in zip(axes.ravel(), entries, strict=False):
        att = np.asarray(att, float)
        if att.ndim == 1:
            g = int(round(math.sqrt(att.size)))
            att = att[-g * g:].reshape(g, g)  # 'full' strategy: drop the class token in front
        ax.imshow(center_square(image, image_size))
        ax.imshow(att, cmap="jet", alpha=0.45, extent=(0, image_size, image_size, 0), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
