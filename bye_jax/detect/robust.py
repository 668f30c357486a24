"""The ``robust`` detector: a tight, deep minority group in some layers, or no verdict of poisoning.

Per layer (all layers in one vmapped JAX fit per K) and per side:

1. Scale. Low side: ``x = log(h + eps)``; high side: ``x = log(1 - h + eps)`` (h = entropy / ln(image
   tokens), from ``entropy_norm``; without it, i.e. entropies alone, only the low side is tested and
   h is the entropy in nats). On this scale an attention collapse (h near 0) or a spread to uniform
   (h near 1) is far from the rest, and a ratio of entropies is a difference.
2. Mixtures with K = 1..``max_components`` components, K chosen by BIC (so a multi-modal clean
   layer is modelled as such instead of being forced into two halves).
3. Every cut between adjacent components (sorted) proposes "the components below the cut" as the
   candidate group. A cut is evidence when all of these hold:
   - share: the group holds between ``min_share`` and ``max_share`` of the samples;
   - separation: ``(mu_next - mu_group) / (sd_group + sd_next) > min_separation`` (mu / sd of the group
     moment-matched from its components; ``next`` = the first component above the cut): a tight group
     with a gap, not a tail;
   - depth: the group's mean is at least ``log(1 / depth_ratio)`` below the rest's on this scale, i.e.
     its entropy (low side) or its distance to uniform (high side) is at most ``depth_ratio`` times the
     rest's: an attention collapse, not one more clean mode a little lower.
   The layer statistic is the best separation among the cuts that pass share and depth.
4. Samples: the mean, over the evidence (layer, side) pairs, of the posterior of belonging to the
   group; flagged when above 0.5, at most ``max_share`` of the samples.
5. Location / content (when the table has ``peak`` / ``centroid`` / ``content``): see ``_location``.
   A flagged group whose members attend to the same place (or the same content) much more than random
   samples do is kept and completed with the samples that attend there with a low entropy; a group
   with no shared place or content is dropped (clean samples that happen to attend narrowly).

No labels, no clean reference data. Fewer than ``min_samples`` rows: "not enough samples to decide".
"""

from __future__ import annotations

import math

import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, fill_nan_with_layer_mean, flagged_verdict
from bye_jax.detect.mixture import fit_bic
from bye_jax.detect.registry import register
from bye_jax.signals import SignalTable

DEFAULTS = {
    "min_share": 0.005,        # smallest group (share of the samples) reported as poisoned
    "max_share": 0.35,         # largest group; no verdict flags more than this share
    "min_separation": 2.0,     # (mu_next - mu_group) / (sd_group + sd_next) on the log scale
    "depth_ratio": 0.5,        # group entropy (or distance to uniform) <= this x the rest's
    "max_components": 4,       # K = 1..max_components, chosen by BIC
    "eps": 1e-3,               # floor inside the logs (normalised entropy units, or nats)
    "min_samples": 20,         # fewer rows: "not enough samples to decide"
    "location_ratio": 0.5,     # group's location spread <= this x random samples' = shared location
}

SIDES = ("low", "high")


def _scales(table: SignalTable, eps: float) -> dict[str, np.ndarray]:
    """{side: [N, L] values in which the suspicious group is the low one}."""
    norm = table.get("entropy_norm")
    if norm is not None:
        h = fill_nan_with_layer_mean(np.clip(np.asarray(norm, np.float64), 0.0, 1.0))
        return {"low": np.log(h + eps), "high": np.log(1.0 - h + eps)}
    h = fill_nan_with_layer_mean(np.maximum(table.entropy, 0.0))
    return {"low": np.log(h + eps)}


def _cuts(weights, means, variances):
    """For fitted components [C, K] (sorted by mean), every cut j (group = components 0..j), [C, K-1]:
    (share, mu_group, sd_group, mu_rest, mu_next, sd_next)."""
    cw = np.cumsum(weights, axis=1)[:, :-1]                                 # group share
    m1 = np.cumsum(weights * means, axis=1)[:, :-1]
    m2 = np.cumsum(weights * (variances + means**2), axis=1)[:, :-1]
    mu_g = m1 / np.maximum(cw, 1e-12)
    sd_g = np.sqrt(np.maximum(m2 / np.maximum(cw, 1e-12) - mu_g**2, 0.0))
    mu_r = (np.sum(weights * means, axis=1, keepdims=True) - m1) / np.maximum(1.0 - cw, 1e-12)
    return cw, mu_g, sd_g, mu_r, means[:, 1:], np.sqrt(variances[:, 1:])


def _layer_evidence(x: np.ndarray, p: dict):
    """x [N, L] (suspicious = low) -> per layer: statistic, passes, group posterior [L, N], share, depth."""
    num_layers = x.shape[1]
    fit = fit_bic(x, int(p["max_components"]))
    share, mu_g, sd_g, mu_r, mu_n, sd_n = _cuts(fit.weights, fit.means, fit.variances)
    real = np.arange(1, share.shape[1] + 1)[None, :] < fit.k[:, None]      # cut j exists iff j + 1 < K
    sep = (mu_n - mu_g) / np.maximum(sd_g + sd_n, 1e-12)
    depth = mu_r - mu_g
    in_range = real & (share >= p["min_share"]) & (share <= p["max_share"])
    deep = depth >= math.log(1.0 / p["depth_ratio"])
    stat = np.where(in_range, sep, -np.inf)
    # the best cut: deep ones first, then the best separation
    cut = np.argmax(np.where(in_range & deep, sep + 1e6, stat), axis=1)
    rows = np.arange(num_layers)
    best = stat[rows, cut]
    posterior = np.cumsum(fit.posteriors, axis=2)[rows, :, cut]            # [L, N] P(group)
    return {
        "statistic": np.where(np.isfinite(best), best, np.nan),
        "passes": (in_range & deep)[rows, cut] & (best > p["min_separation"]),
        "posterior": posterior,
        "share": np.where(np.isfinite(best), share[rows, cut], np.nan),
        "depth": np.where(np.isfinite(best), depth[rows, cut], np.nan),
        "components": fit.k,
    }


def _spread(points: np.ndarray) -> float:
    """Median distance of points [m, d] to their coordinate-wise median."""
    return float(np.median(np.linalg.norm(points - np.median(points, axis=0), axis=-1)))


def _location(table: SignalTable, flagged: np.ndarray, layers: list[int], ratio: float):
    """Shared location / content of the flagged group in the evidence layers.

    For each available signal (centroid [N, L, 2], content [N, L, D]) and evidence layer: the group's
    spread (median distance to its median) over the spread of all samples. Returns (signal name or
    None, best ratio, refined flags): when the best ratio is <= ``ratio`` the group shares a location
    / content; its members farther than the group's radius (median + 3 MAD of the members' distances)
    from the group's centre are dropped, and samples within that radius whose mean group posterior
    (see caller) passes are kept. Without these signals: (None, None, flags unchanged).
    """
    best = (None, math.inf, None, None)
    for name in ("centroid", "content"):
        arr = table.get(name)
        if arr is None or flagged.sum() < 3:
            continue
        for layer in layers:
            pts = np.asarray(arr[:, layer], np.float64).reshape(arr.shape[0], -1)
            if not np.isfinite(pts).all():
                continue
            all_spread = _spread(pts)
            if all_spread <= 0:
                continue
            r = _spread(pts[flagged]) / all_spread
            if r < best[1]:
                best = (name, r, layer, pts)
    if best[0] is None:
        return None, None, None
    name, r, layer, pts = best
    centre = np.median(pts[flagged], axis=0)
    dist = np.linalg.norm(pts - centre, axis=-1)
    d_in = dist[flagged]
    radius = float(np.median(d_in) + 3.0 * 1.4826 * np.median(np.abs(d_in - np.median(d_in))))
    return f"{name} (layer {layer})", r, dist <= max(radius, 1e-12)


@register("robust", DEFAULTS)
def robust(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """A tight, deep minority group (low entropy; high entropy too when entropy_norm is present)."""
    p = params
    n, num_layers = table.entropy.shape
    scales = _scales(table, float(p["eps"]))
    per_side = {side: _layer_evidence(x, p) for side, x in scales.items()}

    evidence = [(side, layer) for side, ev in per_side.items() for layer in np.flatnonzero(ev["passes"])]
    layer_stats, statistic = [], []
    for layer in range(num_layers):
        entry = {"layer": layer}
        for side, ev in per_side.items():
            entry[side] = {
                "statistic": ev["statistic"][layer], "share": ev["share"][layer], "depth": ev["depth"][layer],
                "components": int(ev["components"][layer]), "evidence": bool(ev["passes"][layer]),
            }
        layer_stats.append(entry)
        vals = [ev["statistic"][layer] for ev in per_side.values() if np.isfinite(ev["statistic"][layer])]
        statistic.append(float(max(vals)) if vals else None)
    sensitive = sorted({int(layer) for _, layer in evidence})
    common = dict(
        rule="robust", tau=float(tau), layer_stats=layer_stats, score_gmm=None,
        statistic_name="separation of the best minority group, (mu_next - mu_group) / (sd_group + sd_next) on the "
        "log scale (max over sides); evidence if > min_separation with share and depth in range",
        layer_statistic=statistic, layer_threshold=[float(p["min_separation"])] * num_layers,
        score_name="mean posterior of the suspicious group over the evidence layers", score_low_is_suspect=False,
        signals=["entropy_norm" if "high" in scales else "entropy"],
        extra={"sides": list(scales), "evidence": [{"layer": int(layer), "side": side} for side, layer in evidence]},
    )
    if not evidence:
        return Detection(sensitive_layers=[], scores=np.zeros(n), flagged=np.zeros(n, bool), flagged_ids=[],
                         verdict=NO_EVIDENCE, reason="no layer holds a tight, deep minority group", **common)

    score = np.mean([per_side[side]["posterior"][layer] for side, layer in evidence], axis=0)
    flagged = score > 0.5
    cap = int(math.floor(p["max_share"] * n))
    if flagged.sum() > cap:
        flagged = score >= np.sort(score)[::-1][cap - 1] if cap > 0 else np.zeros(n, bool)
    signal = "entropy" + (" (low side)" if all(s == "low" for s, _ in evidence) else
                          " (high side)" if all(s == "high" for s, _ in evidence) else " (both sides)")
    where, ratio, near = _location(table, flagged, sensitive, float(p["location_ratio"]))
    if where is not None:
        common["extra"]["location_ratio"] = ratio
        common["extra"]["location_signal"] = where
        common["signals"] = [*common["signals"], where.split(" ")[0]]
        if ratio > p["location_ratio"]:
            return Detection(sensitive_layers=sensitive, scores=score, flagged=np.zeros(n, bool), flagged_ids=[],
                             verdict=NO_EVIDENCE, reason=f"the low-entropy group does not share a location or "
                             f"content ({where}: spread {ratio:.2f} x random samples'); nothing flagged", **common)
        flagged = near & (score > 0.5 * min(1.0, score[flagged].min() * 2 if flagged.any() else 1.0) / 2 + 0.0)
        signal += f" + shared {where}"
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(flagged)]
    if not flagged_ids:
        return Detection(sensitive_layers=sensitive, scores=score, flagged=flagged, flagged_ids=[],
                         verdict=NO_EVIDENCE, reason="no sample is more likely in the group than not", **common)
    return Detection(sensitive_layers=sensitive, scores=score, flagged=flagged, flagged_ids=flagged_ids,
                     verdict=flagged_verdict(len(flagged_ids), sensitive, signal), **common)
