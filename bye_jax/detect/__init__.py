"""Poisoned-sample detectors over the signal table, by name.

    from bye_jax.detect import detect
    det = detect(table_or_entropy_matrix, ids, "robust")     # -> Detection (flags, verdict, diagnostics)

Registered detectors (``config.detect.rule`` names one; ``config.detect.<name>`` holds its parameters):
``official`` and ``paper`` (bye.py: the reference rules, bit for bit), ``robust`` (robust.py: the
default), ``shares`` (shares.py: per-head prompt-segment attention shares, Dawid-Skene fusion), ``text``
(text.py: co-location of the answer's attention on one question-text token, a learnt text trigger),
``inserted`` (inserted.py: an attention-share minority whose questions are other questions with the same
text inserted: prefix / suffix / template text triggers) and ``combined`` (combined.py: robust, text and
inserted where each finds evidence). A new detector is one module
with a function decorated ``@register("name", defaults)`` plus its import below (README: "Add a
detector").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from bye_jax.detect import bye, combined, inserted, robust, shares, targeted, text  # noqa: F401  (importing registers)
from bye_jax.detect.base import (
    MIN_SAMPLES,
    NO_EVIDENCE,
    NOT_ENOUGH,
    Detection,
    fill_nan_with_layer_mean,
    json_safe,
    precision_recall_f1,
)
from bye_jax.detect.bye import RULES, LayerStats, gaussian_kl, layer_stats, official_rule, paper_rule, select_layers
from bye_jax.detect.registry import DETECTORS, Detector, get_detector, register, run_detector

__all__ = [
    "DETECTORS",
    "Detector",
    "Detection",
    "LayerStats",
    "MIN_SAMPLES",
    "NO_EVIDENCE",
    "NOT_ENOUGH",
    "RULES",
    "detect",
    "fill_nan_with_layer_mean",
    "gaussian_kl",
    "get_detector",
    "json_safe",
    "layer_stats",
    "official_rule",
    "paper_rule",
    "precision_recall_f1",
    "register",
    "run_detector",
    "select_layers",
]


def detect(
    X,
    ids: Sequence[Hashable] | None = None,
    rule: str = "official",
    tau: float = 2.0,
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    **gmm_options,
) -> Detection:
    """Runs the detector ``rule`` on X: a SignalTable or an [N, L] entropy matrix (NaN allowed).

    Args:
      X: a SignalTable, or [N, L] image-span entropies (samples x layers).
      ids: N sample ids for a matrix (default 0..N-1); ``flagged_ids`` keeps their order.
      rule: a registered detector ("official" = reference code, "paper" = BSI, "robust").
      tau: the reference rules' threshold (2.0 in both the code and the paper).
      params: the detector's parameters (defaults: ``DETECTORS[rule].defaults``).
      seed: random seed (the reference rules' GMM random_state).
      **gmm_options: reg_covar, tol, max_iter, n_init of the reference rules' GMMs (as params).
    """
    if rule not in DETECTORS:
        raise ValueError(f"unknown rule {rule!r}; registered detectors: {', '.join(sorted(DETECTORS))}")
    merged = {**dict(params or {}), **gmm_options}
    det = run_detector(rule, X, ids, params=merged, tau=tau, seed=seed)
    _add_reference_layer_stats(det, X, seed)
    return det


def _add_reference_layer_stats(det: Detection, X, seed: int) -> None:
    """Every report's ``layer_stats`` has the reference 2-GMM fields (layer, means, stds, weights, bsi,
    official_sep, kl: DESIGN.md's contract); a detector's own per-layer diagnostics stay in each entry."""
    if det.layer_stats and all("means" in s for s in det.layer_stats):
        return
    entropy = X.entropy if hasattr(X, "entropy") else X
    if len(entropy) < 2:
        return
    ref = layer_stats(entropy, seed=seed).to_dicts()
    own = {s["layer"]: s for s in det.layer_stats}
    det.layer_stats = [{**r, **{k: v for k, v in own.get(r["layer"], {}).items() if k != "layer"}} for r in ref]
