"""The reference rules, as detectors ``official`` and ``paper`` (bit for bit the reference clustering).

Steps (REFERENCE.md, steps 3-4), on the entropy alone:

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, fill_nan_with_layer_mean, flagged_verdict
from bye_jax.detect.registry import register
from bye_jax.gmm import GMMResult, fit_gmm_1d, fit_gmm_columns
from bye_jax.signals import SignalTable

__all__ = ["LayerStats", "RULES", "official_rule", "paper_rule", "layer_stats", "select_layers", "gaussian_kl"]


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


GMM_DEFAULTS = {"reg_covar": 1e-6, "tol": 1e-3, "max_iter": 100, "n_init": 1}


def _reference(table: SignalTable, params: dict, *, rule: str, tau: float, seed: int) -> Detection:
    """BYE's clustering on the entropy matrix (NaN allowed): sensitive layers, score, final 2-GMM."""
    X = fill_nan_with_layer_mean(table.entropy)
    n, num_layers = X.shape
    ids = list(table.ids)
    gmm_opts = dict(reg_covar=float(params["reg_covar"]), tol=float(params["tol"]),
                    max_iter=int(params["max_iter"]), n_init=int(params["n_init"]), seed=seed)

    stats = layer_stats(X, **gmm_opts)
    sensitive = select_layers(stats, rule, tau)
    nothing = np.zeros(n, bool)
    statistic = stats.bsi if rule == "paper" else stats.official_sep
    common = dict(
        rule=rule, tau=float(tau), layer_stats=stats.to_dicts(), stats=stats,
        statistic_name=("BSI = |mu1-mu2| / sqrt(sd1^2+sd2^2), sensitive if >= tau" if rule == "paper"
                        else "|mu1-mu2| / (sd1+sd2), sensitive if > tau"),
        layer_statistic=[float(v) for v in statistic], layer_threshold=[float(tau)] * num_layers,
        score_name="mean entropy over the sensitive layers (nats)",
    )
    if not sensitive:
        return Detection(
            sensitive_layers=[], scores=None, score_gmm=None, flagged=nothing, flagged_ids=[],
            verdict=NO_EVIDENCE,
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
            flagged_ids=[], verdict=NO_EVIDENCE, reason="the scores do not split into two groups (equal GMM means); "
            "nothing flagged",
            **common,
        )
    flagged = np.asarray(res.labels) == 0
    flagged_ids = [ids[i] for i in np.flatnonzero(flagged)]
    return Detection(
        sensitive_layers=sensitive, scores=scores, score_gmm=score_gmm, flagged=flagged,
        flagged_ids=flagged_ids, reason=None, verdict=flagged_verdict(len(flagged_ids), sensitive, "entropy"),
        **common,
    )


@register("official", GMM_DEFAULTS)
def official(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """The reference code: layers with |mu1-mu2| > tau (sd1+sd2), mean entropy over them, lower 2-GMM half."""
    return _reference(table, params, rule="official", tau=tau, seed=seed)


@register("paper", GMM_DEFAULTS)
def paper(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """The paper: layers with BSI >= tau, mean entropy over them, lower 2-GMM half."""
    return _reference(table, params, rule="paper", tau=tau, seed=seed)
