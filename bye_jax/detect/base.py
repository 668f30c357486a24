"""What every detector shares: the result type, the verdict wording, input checks, strict JSON.

A detector reads a `SignalTable` (bye_jax/signals.py) and returns a `Detection`: per-sample scores and
flags, a verdict in plain words, and its diagnostics (a per-layer statistic with its threshold, the
layers that carry the evidence, its parameters). runner.py, report.py and pipeline.py read only these
fields, whatever the detector.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Detection",
    "MIN_SAMPLES",
    "NO_EVIDENCE",
    "NOT_ENOUGH",
    "flagged_verdict",
    "fill_nan_with_layer_mean",
    "check_entropy",
    "check_tau",
    "json_safe",
    "precision_recall_f1",
]

MIN_SAMPLES = 10  # fewer rows than this: "not enough samples to decide", nothing flagged
NO_EVIDENCE = "no evidence of poisoning"
NOT_ENOUGH = "not enough samples to decide"


def flagged_verdict(n: int, layers: Iterable[int], signal: str) -> str:
    layers = [int(i) for i in layers]
    return f"{n} samples flagged; evidence in layers {layers} (signal: {signal})"


@dataclass
class Detection:
    """A detector's result (the fields report.json, the summary and the plots read).

    ``flagged`` [N] bool and ``flagged_ids`` (in row order) are the decision; ``scores`` [N] (None when
    no score was computed) is what the plot shows, lower = more suspicious unless ``score_low_is_suspect``
    is False; ``score_gmm`` is a fitted mixture of the scores to draw over their histogram (or None).
    ``layer_statistic`` / ``layer_threshold`` hold one value per layer (None where not computed) of
    the statistic named ``statistic_name``; a layer whose statistic passes its threshold is in
    ``sensitive_layers``. ``rule`` is the detector's name (``detector`` too; ``rule`` is the key
    report.json has always had).
    """

    rule: str
    tau: float
    sensitive_layers: list[int]
    layer_stats: list[dict[str, Any]]
    scores: np.ndarray | None
    score_gmm: dict[str, Any] | None
    flagged: np.ndarray  # [N] bool
    flagged_ids: list[Hashable]
    reason: str | None = None
    stats: Any = field(default=None, repr=False)
    verdict: str = NO_EVIDENCE
    statistic_name: str = ""
    layer_statistic: list[float | None] = field(default_factory=list)
    layer_threshold: list[float | None] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    signals: list[str] = field(default_factory=lambda: ["entropy"])
    score_name: str = "score"
    score_low_is_suspect: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def detector(self) -> str:
        return self.rule

    @property
    def n_flagged(self) -> int:
        return len(self.flagged_ids)

    def to_report(self) -> dict[str, Any]:
        """The detection part of report.json (JSON-ready; non-finite numbers become null)."""
        return json_safe({
            "detector": self.rule,
            "verdict": self.verdict,
            "rule": self.rule,
            "tau": self.tau,
            "params": self.params,
            "signals": list(self.signals),
            "num_layers": len(self.layer_stats),
            "sensitive_layers": list(self.sensitive_layers),
            "layer_statistic": {
                "name": self.statistic_name,
                "values": list(self.layer_statistic),
                "thresholds": list(self.layer_threshold),
            },
            "layer_stats": self.layer_stats,
            "score_gmm": self.score_gmm,
            "flagged_ids": list(self.flagged_ids),
            "n_flagged": self.n_flagged,
            "reason": self.reason,
            **({"details": self.extra} if self.extra else {}),
        })


def json_safe(obj):
    """A copy of obj with NaN / +-Inf floats replaced by None and NumPy scalars / arrays made plain
    (so ``json.dumps(..., allow_nan=False)`` works: strict JSON for any reader)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def fill_nan_with_layer_mean(X) -> np.ndarray:
    """NumPy copy of X [N, L] (float64) with NaNs replaced by their column's mean (0 if all NaN)."""
    X = np.array(X, dtype=np.float64, copy=True)
    if X.ndim != 2:
        raise ValueError(f"entropy matrix must be [N, L], got shape {X.shape}")
    nan = np.isnan(X)
    if nan.any():
        count = (~nan).sum(axis=0)
        mean = np.where(count > 0, np.where(nan, 0.0, X).sum(axis=0) / np.maximum(count, 1), 0.0)
        X[nan] = np.broadcast_to(mean, X.shape)[nan]
    return X


def check_entropy(X) -> np.ndarray:
    """X as a float64 [N, L] array; ValueError on a wrong shape or an infinite value (NaN = missing)."""
    X = np.asarray(X, np.float64)
    if X.ndim != 2:
        raise ValueError(f"entropy matrix must be [N, L], got shape {X.shape}")
    if X.shape[1] < 1:
        raise ValueError(f"entropy matrix has no layer: shape {X.shape}")
    if np.isinf(X).any():
        r, c = np.argwhere(np.isinf(X))[0]
        raise ValueError(f"entropy matrix holds an infinite value (row {r}, layer {c}); "
                         "NaN marks a missing value, Infinity is not an entropy")
    return X


def check_tau(tau) -> float:
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number, got {tau!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    return t


def precision_recall_f1(
    flagged_ids: Iterable[Hashable], poisoned_ids: Iterable[Hashable]
) -> dict[str, float | int]:
    """Detection precision / recall / F1 of flagged ids against the true poisoned ids.

    Sets are compared (duplicates ignored). Conventions for empty sets: precision is 0 when
    nothing is flagged, recall is 0 when nothing is poisoned, F1 is 0 when precision + recall is
    0 (so a clean dataset with nothing flagged scores 0 / 0 / 0; look at the counts there).
    Returns ``{precision, recall, f1, tp, fp, fn}``.
    """
    flagged, poisoned = set(flagged_ids), set(poisoned_ids)
    tp = len(flagged & poisoned)
    fp = len(flagged - poisoned)
    fn = len(poisoned - flagged)
    precision = tp / len(flagged) if flagged else 0.0
    recall = tp / len(poisoned) if poisoned else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
