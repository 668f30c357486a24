"""BYE detection from an N x L entropy matrix: layer profiling, layer rules, scores, clustering.

Steps (REFERENCE.md, steps 3-4):

1. NaN entropies are replaced by their layer's (column's) mean.
2. Every layer gets a 2-component 1-D Gaussian mixture (``gmm.fit_gmm_columns``, all layers in
   one call); components are ordered by mean (index 0 = low entropy).
3. A rule from ``RULES`` picks the sensitive layers:
   ``official`` (the reference code): ``|mu1 - mu2| > tau * (sd1 + sd2)``;
   ``paper`` (the paper's Bimodal Separation Index): ``|mu1 - mu2| / sqrt(sd1^2 + sd2^2) >= tau``.
4. Score = mean entropy over the sensitive layers; a 2-GMM on the scores; every sample whose
   label is the lower-mean component is flagged.

Where the reference crashes (no sensitive layer) or would flag a meaningless half (all scores
equal), nothing is flagged and ``Detection.reason`` says why.

New rules: add ``name: fn(stats: LayerStats, tau: float) -> bool array [L]`` to ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bye_jax.gmm import GMMResult, fit_gmm_1d, fit_gmm_columns

__all__ = [
    "LayerStats",
    "Detection",
    "RULES",
    "official_rule",
    "paper_rule",
    "fill_nan_with_layer_mean",
    "layer_stats",
    "select_layers",
    "detect",
    "precision_recall_f1",
]


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


def gaussian_kl(mu_p, sd_p, mu_q, sd_q):
    """KL(N(mu_p, sd_p^2) || N(mu_q, sd_q^2)), elementwise, in nats."""
    mu_p, sd_p, mu_q, sd_q = (np.asarray(a, np.float64) for a in (mu_p, sd_p, mu_q, sd_q))
    return np.log(sd_q / sd_p) + (sd_p**2 + (mu_p - mu_q) ** 2) / (2.0 * sd_q**2) - 0.5


@dataclass
class LayerStats:
    """Per-layer 2-GMM summary; arrays over layers, components sorted by mean (0 = low)."""

    means: np.ndarray  # [L, 2]
    stds: np.ndarray  # [L, 2]
    weights: np.ndarray  # [L, 2]
    bsi: np.ndarray  # [L] |mu1 - mu2| / sqrt(sd1^2 + sd2^2)   (paper)
    official_sep: np.ndarray  # [L] |mu1 - mu2| / (sd1 + sd2)   (reference code)
    kl: np.ndarray  # [L] KL(N_low || N_high)

    @property
    def num_layers(self) -> int:
        return int(self.means.shape[0])

    def to_dicts(self) -> list[dict[str, Any]]:
        """JSON-ready ``[{layer, means, stds, weights, bsi, official_sep, kl}]``."""
        return [
            {
                "layer": i,
                "means": [float(v) for v in self.means[i]],
                "stds": [float(v) for v in self.stds[i]],
                "weights": [float(v) for v in self.weights[i]],
                "bsi": float(self.bsi[i]),
                "official_sep": float(self.official_sep[i]),
                "kl": float(self.kl[i]),
            }
            for i in range(self.num_layers)
        ]


def _stats_from_gmm(res: GMMResult) -> LayerStats:
    means = np.asarray(res.means, np.float64)
    stds = np.sqrt(np.asarray(res.variances, np.float64))
    weights = np.asarray(res.weights, np.float64)
    gap = np.abs(means[:, 1] - means[:, 0])
    return LayerStats(
        means=means,
        stds=stds,
        weights=weights,
        bsi=gap / np.sqrt(stds[:, 0] ** 2 + stds[:, 1] ** 2),
        official_sep=gap / (stds[:, 0] + stds[:, 1]),
        kl=gaussian_kl(means[:, 0], stds[:, 0], means[:, 1], stds[:, 1]),
    )


def layer_stats(
    X,
    *,
    reg_covar: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 100,
    n_init: int = 1,
    seed: int = 0,
) -> LayerStats:
    """Fit a 2-GMM to every layer (column) of the entropy matrix X [N, L] in one call.

    NaNs are replaced by the layer mean. GMM options as scikit-learn's GaussianMixture
    (``seed`` = ``random_state``; the reference uses the defaults with random_state 0).
    """
    X = fill_nan_with_layer_mean(X)
    res = fit_gmm_columns(
        X.astype(np.float32), 2, tol=tol, reg_covar=reg_covar, max_iter=max_iter, n_init=n_init,
        seed=seed, return_posteriors=False,
    )
    return _stats_from_gmm(res)


Rule = Callable[[LayerStats, float], np.ndarray]


def official_rule(stats: LayerStats, tau: float) -> np.ndarray:
    """The reference code: sensitive iff |mu1 - mu2| > tau * (sd1 + sd2)."""
    gap = np.abs(stats.means[:, 1] - stats.means[:, 0])
    return gap > tau * (stats.stds[:, 0] + stats.stds[:, 1])


def paper_rule(stats: LayerStats, tau: float) -> np.ndarray:
    """The paper: sensitive iff BSI = |mu1 - mu2| / sqrt(sd1^2 + sd2^2) >= tau."""
    return stats.bsi >= tau


RULES: dict[str, Rule] = {"official": official_rule, "paper": paper_rule}


def select_layers(stats: LayerStats, rule: str = "official", tau: float = 2.0) -> list[int]:
    """Indices of the sensitive layers under ``RULES[rule]`` with threshold ``tau``."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")
    mask = np.asarray(RULES[rule](stats, float(tau)), bool)
    return [int(i) for i in np.flatnonzero(mask)]


@dataclass
class Detection:
    """Result of ``detect``.

    ``scores`` is None (and ``score_gmm`` None) when no layer is sensitive. ``score_gmm`` holds
    the final 2-GMM's sorted weights / means / variances (component 0 = flagged, lower mean).
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
    stats: LayerStats | None = field(default=None, repr=False)

    @property
    def n_flagged(self) -> int:
        return len(self.flagged_ids)

    def to_report(self) -> dict[str, Any]:
        """The detection part of report.json."""
        return {
            "rule": self.rule,
            "tau": self.tau,
            "num_layers": len(self.layer_stats),
            "sensitive_layers": list(self.sensitive_layers),
            "layer_stats": self.layer_stats,
            "score_gmm": self.score_gmm,
            "flagged_ids": list(self.flagged_ids),
            "n_flagged": self.n_flagged,
            "reason": self.reason,
        }


def detect(
    X,
    ids: Sequence[Hashable] | None = None,
    rule: str = "official",
    tau: float = 2.0,
    *,
    reg_covar: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 100,
    n_init: int = 1,
    seed: int = 0,
) -> Detection:
    """Run BYE's clustering on an entropy matrix X [N, L] (NaN allowed).

    Args:
      X: [N, L] image-span entropies (samples x layers).
      ids: N sample ids (default 0..N-1); ``flagged_ids`` keeps their order.
      rule: a key of ``RULES`` ("official" = reference code, "paper" = BSI).
      tau: the rule's threshold (2.0 in both the code and the paper).
      reg_covar, tol, max_iter, n_init, seed: options of every GMM (scikit-learn defaults,
        random_state 0, as the reference).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {sorted(RULES)}")
    X = fill_nan_with_layer_mean(X)
    n, num_layers = X.shape
    if n < 1 or num_layers < 1:
        raise ValueError(f"entropy matrix is empty: shape {X.shape}")
    ids = list(range(n)) if ids is None else list(ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} rows of the entropy matrix")
    gmm_opts = dict(reg_covar=reg_covar, tol=tol, max_iter=max_iter, n_init=n_init, seed=seed)

    stats = layer_stats(X, **gmm_opts)
    sensitive = select_layers(stats, rule, tau)
    nothing = np.zeros(n, bool)
    common = dict(rule=rule, tau=float(tau), layer_stats=stats.to_dicts(), stats=stats)
    if not sensitive:
        return Detection(
            sensitive_layers=[], scores=None, score_gmm=None, flagged=nothing, flagged_ids=[],
            reason=f"no sensitive layer under rule {rule!r} with tau={tau:g} "
            f"({num_layers} layers tested); nothing flagged",
            **common,
        )

    scores = X[:, sensitive].mean(axis=1)
    res = fit_gmm_1d(scores.astype(np.float32), 2, **gmm_opts)
    means = np.asarray(res.means, np.float64)
    score_gmm = {
        "weights": [float(v) for v in np.asarray(res.weights)],
        "means": [float(v) for v in means],
        "variances": [float(v) for v in np.asarray(res.variances)],
        "log_likelihood": float(res.log_likelihood),
        "converged": bool(res.converged),
        "n_iter": int(res.n_iter),
    }
    if not means[1] > means[0]:
        return Detection(
            sensitive_layers=sensitive, scores=scores, score_gmm=score_gmm, flagged=nothing,
            flagged_ids=[], reason="the scores do not split into two groups (equal GMM means); "
            "nothing flagged",
            **common,
        )
    flagged = np.asarray(res.labels) == 0
    return Detection(
        sensitive_layers=sensitive, scores=scores, score_gmm=score_gmm, flagged=flagged,
        flagged_ids=[ids[i] for i in np.flatnonzero(flagged)], reason=None, **common,
    )


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
