"""The ``robust`` detector: a tight, deep minority group in some layers, or no verdict of poisoning.

Per layer and per side (one jitted JAX fit, vmapped over layers and K: detect/mixture.py):

1. Scale. Low side: ``x = log(h + eps)``; high side: ``x = log(1 - h + eps)`` (h = entropy / ln(image
   tokens), from ``entropy_norm``; without it, i.e. entropies alone, only the low side is tested and
   h is the entropy in nats). On this scale an attention collapse (h near 0) or a spread to uniform
   (h near 1) is far from the rest, and a ratio of entropies is a difference.
2. Mixtures with K = 1..``max_components`` components, K chosen by BIC (so a multi-modal clean
   layer is modelled as such instead of being forced into two halves).
3. Every cut between adjacent components (sorted) proposes "the components below the cut" as the
   candidate group. A cut is evidence when all of these hold:
   - share: the group holds between ``min_share`` and ``max_share`` of the samples, and >= ``min_group``;
   - separation: ``(mu_next - mu_group) / (sd_group + sd_next) > min_separation`` (mu / sd of the group
     moment-matched from its components; ``next`` = the first component above the cut): a tight group
     with a gap, not a tail;
   - depth: the group's mean is at least ``log(1 / depth_ratio)`` below the rest's on this scale, i.e.
     its entropy (low side) or its distance to uniform (high side) is at most ``depth_ratio`` times the
     rest's: an attention collapse, not one more clean mode a little lower;
   - stability: the same holds in at least ``stability`` of ``resamples`` subsamples (80% of the rows,
     without replacement), so a group that a few rows make or break is not evidence.
   The layer statistic is the separation of the best cut that passes share and depth.
4. Evidence layers whose groups hold the same samples as the strongest one (Jaccard >= 0.5) are
   combined: a sample's score is its mean group posterior over them, flagged above 0.5 (at most
   ``max_share`` of the samples); groups of other samples are reported, not flagged.
5. An own look, when the table has ``peak`` and ``peak_embed`` (`colocation.own_look_colocation`): a group
   of samples that peak at one image token with one look (the input embedding there) in >= ``peak_layers``
   layers, a look at most ``own_look_others`` x the group's size peak on anywhere else, is flagged, and
   decides: a trigger pasted at one place is the same thing at the same place in every poisoned image and
   in no clean one. It needs no collapse and no excess over other tokens (20% patch seed 0, where the
   trigger draws the peak in one layer mainly, and 3% patch). With it, the exclusive cores of different
   layers that share >= ``own_look_link`` x the smaller one's members (a grid of squares: the peak on
   another square in each layer) and a one-layer exclusive core whose median entropy is below the
   ``own_look_collapse`` quantile of the others' (a trigger seen in one layer only). Otherwise:
   Location, when the table has ``peak`` (signals.npz): the co-location test (detect/colocation.py) looks
   for a minority whose focused attention peaks at one image token in >= ``peak_layers`` layers, in excess
   of chance (independent layers) by >= ``peak_ratio`` x any other token's excess, beyond a permutation
   null and in >= ``stability`` of the subsamples. Its members are flagged (signal "peak"), with the samples
   that peak at the token in one of the group's layers and attend to the same content there (within the
   ``content_quantile`` of the members' distances: a trigger looks alike in every image); an entropy group is then
   kept only as far as it is that group. With ``peak_embed`` the group must also share a look: in at least one
   of its layers the members' looks at the token (the input embedding there) lie within ``look_ratio`` x the
   typical distance between two samples' looks (median distance to their medoid look; `colocation.look_gate`),
   else it is clean samples attending to different content at one place and nothing is flagged; and the look
   must be the group's own there: at most ``look_others`` samples outside the group peak on it per member that
   does (a trigger is only in the poisoned images; the plain background is in every image, and a group that
   co-locates on it is clean samples attending to nothing in particular). Without such
   a group nothing is flagged, whatever the entropy: on the demo runs every entropy group without a shared
   peak was clean samples (README "Detection").
6. Without ``peak`` but with ``centroid`` / ``content`` (see ``_location``): a group whose members attend
   to one place or one content (spread <= ``location_ratio`` x all samples') is kept and completed with
   the samples there whose score is >= 0.05; when both signals are there and the group shares neither,
   it is dropped (clean samples that happen to attend narrowly).

No labels, no clean reference data. Fewer than ``min_samples`` rows: "not enough samples to decide".
"""

from __future__ import annotations

import math

import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, fill_nan_with_layer_mean, flagged_verdict
from bye_jax.detect.colocation import (
    colocation,
    complete_content_group,
    complete_group,
    content_colocation,
    look_gate,
    own_look_colocation,
)
from bye_jax.detect.mixture import fit_bic
from bye_jax.detect.registry import register
from bye_jax.signals import SignalTable

DEFAULTS = {
    "min_share": 0.005,        # smallest group (share of the samples) reported as poisoned
    "min_group": 5,            # ... and at least this many samples
    "max_share": 0.35,         # largest group; no verdict flags more than this share
    "min_separation": 2.0,     # (mu_next - mu_group) / (sd_group + sd_next) on the log scale
    "depth_ratio": 0.5,        # group entropy (or distance to uniform) <= this x the rest's
    "max_components": 4,       # K = 1..max_components, chosen by BIC
    "eps": 1e-3,               # floor inside the logs (normalised entropy units, or nats)
    "min_samples": 20,         # fewer rows: "not enough samples to decide"
    "resamples": 16,           # subsamples (80% of the rows, at most resample_rows) the evidence must survive
    "stability": 0.8,          # ... in at least this share of them
    "resample_rows": 4096,
    "location_ratio": 0.5,     # group's location spread <= this x random samples' = shared location
    "peak_focus": 0.6,         # a peak counts where entropy / ln(image tokens) <= this (narrow attention)
    "focus_levels": 4,         # co-location token sought at this many focus levels, peak_focus down to half of it
    "peak_layers": 2,          # co-location: the same peak token in at least this many layers
    "peak_ratio": 2.0,         # ... its excess over chance >= this x the next token's
    "content_quantile": 0.9,   # completion: same peak in one group layer + content within this quantile of
                               # the members' distances (0: no content completion)
    "focus_quantile": 0.25,    # ... or a collapse: normalised entropy there <= this quantile of the members'
    "focus_others_quantile": 0.05,  # ... and <= this quantile of the samples that peak elsewhere (0: none)
    "look_ratio": 0.3,         # co-location group's look spread at its token <= this in some layer (0: no gate)
    "look_others": 0.1,        # ... and there, samples outside the group with that look <= this x members with it
                               # (the own-look test's exclusivity; 1.0 let a sink group through: suffix 3% epoch 12)
    "look_radius": 0.1,        # "with that look": within the members' median distance, at least this x typical
    "own_look_others": 0.1,    # own-look test: a group at one token with one look in >= peak_layers layers, which
                               # at most this x its size peak on elsewhere (0: test off)
    "own_look_link": 0.5,      # ... or such cores of different layers sharing >= this x the smaller's members (0: off)
    "own_look_collapse": 0.05,  # ... or a one-layer core whose median entropy is below this quantile of the rest's
    "content_clusters": 0,     # with peak_embed: co-location by content (the peak token's look, k-means
                               # labels, this many) when no place is shared; 0 = off (README "Detection")
}


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


def _cut_evidence(x: np.ndarray, p: dict):
    """x [N, C] (suspicious = low) -> per column: statistic, passes, best cut, fit, share, depth."""
    n, cols = x.shape
    fit = fit_bic(x, int(p["max_components"]))
    share, mu_g, sd_g, mu_r, mu_n, sd_n = _cuts(fit.weights, fit.means, fit.variances)
    real = np.arange(1, share.shape[1] + 1)[None, :] < fit.k[:, None]      # cut j exists iff j + 1 < K
    sep = (mu_n - mu_g) / np.maximum(sd_g + sd_n, 1e-12)
    depth = mu_r - mu_g
    in_range = real & (share >= max(p["min_share"], p["min_group"] / n)) & (share <= p["max_share"])
    deep = depth >= math.log(1.0 / p["depth_ratio"])
    stat = np.where(in_range, sep, -np.inf)
    cut = np.argmax(np.where(in_range & deep, sep + 1e6, stat), axis=1)   # deep cuts first, then separation
    rows = np.arange(cols)
    best = stat[rows, cut]
    return {
        "statistic": np.where(np.isfinite(best), best, np.nan),
        "passes": (in_range & deep)[rows, cut] & (best > p["min_separation"]),
        "cut": cut, "fit": fit,
        "share": np.where(np.isfinite(best), share[rows, cut], np.nan),
        "depth": np.where(np.isfinite(best), depth[rows, cut], np.nan),
    }


def _layer_evidence(x: np.ndarray, p: dict, seed: int):
    """x [N, L] -> per layer: statistic, passes (also in >= stability of the subsamples), posterior [L, N]."""
    n, num_layers = x.shape
    ev = _cut_evidence(x, p)
    b = int(p["resamples"])
    if b > 0 and ev["passes"].any():
        m = max(2, min(int(0.8 * n), int(p["resample_rows"])))
        rng = np.random.default_rng(seed)
        idx = np.stack([rng.permutation(n)[:m] for _ in range(b)])           # [B, m], without replacement
        xr = np.transpose(x[idx], (1, 0, 2)).reshape(m, b * num_layers)       # column = (resample, layer)
        held = _cut_evidence(xr, p)["passes"].reshape(b, num_layers).mean(axis=0)
    else:
        held = np.where(ev["passes"], 1.0, 0.0)
    rows = np.arange(num_layers)
    posterior = np.cumsum(ev["fit"].posteriors, axis=2)[rows, :, ev["cut"]]  # [L, N] P(group)
    return {
        "statistic": ev["statistic"],
        "passes": ev["passes"] & (held >= p["stability"]),
        "stability": held,
        "posterior": posterior,
        "share": ev["share"],
        "depth": ev["depth"],
        "components": ev["fit"].k,
    }


def _consistent(evidence, per_side):
    """Splits the evidence (side, layer) pairs into those whose group (posterior > 0.5) overlaps the
    strongest one's (Jaccard >= 0.5: the same samples) and the others (reported, not flagged)."""
    def group(e):
        return per_side[e[0]]["posterior"][e[1]] > 0.5

    order = sorted(evidence, key=lambda e: -per_side[e[0]]["statistic"][e[1]])
    primary = group(order[0])
    same, other = [], []
    for e in order:
        g = group(e)
        union = (g | primary).sum()
        (same if union and (g & primary).sum() / union >= 0.5 else other).append(e)
    return sorted(same, key=lambda e: (e[1], e[0])), other


def _spread(points: np.ndarray) -> float:
    """Median distance of points [m, d] to their coordinate-wise median."""
    return float(np.median(np.linalg.norm(points - np.median(points, axis=0), axis=-1)))


def _location(table: SignalTable, group: np.ndarray, layers: list[int]) -> dict:
    """How much the group shares a location (``centroid``) or content (``content``) in the evidence layers.

    For each signal present and each layer: the group's spread (median distance to its median) over the
    spread of all samples; the smallest ratio wins. Returns {} without these signals, else {signal,
    layer, ratio, signals_tested, near [N] bool: within the group's radius (median + 3 MAD of its
    members' distances) of the group's centre}.
    """
    best: dict = {}
    tested = []
    for name in ("centroid", "content"):
        arr = table.get(name)
        if arr is None or group.sum() < 3:
            continue
        tested.append(name)
        for layer in layers:
            pts = np.asarray(arr[:, layer], np.float64).reshape(arr.shape[0], -1)
            if not np.isfinite(pts).all():
                continue
            spread_all = _spread(pts)
            if spread_all <= 0:
                continue
            ratio = _spread(pts[group]) / spread_all
            if not best or ratio < best["ratio"]:
                best = {"signal": name, "layer": int(layer), "ratio": ratio, "points": pts}
    if not best:
        return {}
    pts = best.pop("points")
    dist = np.linalg.norm(pts - np.median(pts[group], axis=0), axis=-1)
    d_in = dist[group]
    radius = float(np.median(d_in) + 3.0 * 1.4826 * np.median(np.abs(d_in - np.median(d_in))))
    return {**best, "signals_tested": tested, "near": dist <= max(radius, 1e-12)}


def _side_words(sides) -> str:
    sides = set(sides)
    return "entropy" + (" (low side)" if sides == {"low"} else " (high side)" if sides == {"high"} else " (both sides)")


def _peak_decision(table: SignalTable, coloc: dict, evidence, per_side, common, p: dict,
                   by_content: dict | None = None) -> Detection:
    """The decision when the table has ``peak``: the co-location group (completed by content / collapse) is flagged, or
    nothing is. `by_content`: the content co-location test's result (`content_colocation`), which decides
    instead when it passes and the place test does not (a trigger at varying places)."""
    n = table.num_samples
    keys = ("token", "focus", "size", "excess", "next", "ratio", "null_max", "stability", "layers", "passes")
    if by_content is not None:
        common["extra"]["peak_content"] = {k: by_content[k] for k in keys}
    if by_content is not None and by_content["passes"] and not coloc["passes"]:
        group = complete_content_group(table, by_content, float(p["peak_focus"]), float(p["content_quantile"]))
        common["extra"]["peak_content"]["completed"] = int(group.sum() - by_content["group"].sum())
        coloc = by_content
        what = f"peak_embed (content {coloc['token']}, at varying places)"
        common["signals"] = [*common["signals"], "peak", "peak_embed"]
    else:
        group = complete_group(table, coloc, float(p["peak_focus"]), float(p["content_quantile"]),
                               float(p["focus_quantile"]), float(p["focus_others_quantile"]))
        what = f"peak (token {coloc['token']})"
        common["signals"] = [*common["signals"], "peak"]
    common["extra"]["peak"] = {**{k: coloc[k] for k in keys},
                               "completed": int(group.sum() - coloc["group"].sum())}
    common["score_name"] = "layers whose focused attention peak is the co-location group's token, / layers"
    common["statistic_name"] += ("; with the peak signal the evidence layers are the co-location group's "
                                 "(details.peak), the entropy statistic is reported only")
    scores = coloc["hits"] / max(table.num_layers, 1)

    def overlaps(e):  # an entropy group that is (mostly) the co-location group
        g = per_side[e[0]]["posterior"][e[1]] > 0.5
        union = (g | group).sum()
        return bool(union) and (g & group).sum() / union >= 0.5

    joined = [e for e in evidence if coloc["passes"] and overlaps(e)]
    apart = [e for e in evidence if e not in joined]
    common["extra"]["evidence"] = [{"layer": int(layer), "side": side} for side, layer in joined]
    if apart:
        common["extra"]["entropy_groups_without_peak"] = [{"layer": int(layer), "side": side} for side, layer in apart]
    if "look_spread" in coloc:
        common["extra"]["peak"]["look_spread"] = coloc["look_spread"]
        common["extra"]["peak"]["look_others"] = coloc["look_others"]
    if not coloc["passes"]:
        best = (f"best: token {coloc['token']}, {coloc['size']} samples, excess over chance {coloc['excess']:.1f} = "
                f"{coloc['ratio']:.2f} x the next token's" if coloc["token"] is not None
                else "no focused peak shared across layers")
        reason = f"no minority shares an attention peak across layers ({best})"
        if "look_spread" in coloc and min(coloc["look_spread"]) > float(p["look_ratio"]):
            reason = (f"the minority that shares an attention peak (token {coloc['token']}, {coloc['size']} samples) "
                      f"shares no look there: look spread {min(coloc['look_spread']):.2f} x two samples' "
                      f"(> look_ratio {p['look_ratio']}), i.e. clean samples attending to different content at "
                      "one place")
        elif "look_spread" in coloc:
            shared = min(o for o, s in zip(coloc["look_others"], coloc["look_spread"], strict=True)
                         if s <= float(p["look_ratio"]))
            reason = (f"the minority that shares an attention peak (token {coloc['token']}, {coloc['size']} samples) "
                      f"looks at content that is everywhere: {shared:.2f} other samples per member peak on the "
                      f"same look (> look_others {p['look_others']}), e.g. the plain background, not a trigger")
        if apart:
            layers = sorted({int(layer) for _, layer in apart})
            reason += f"; the entropy group(s) in layers {layers} share none either: nothing flagged"
        common["sensitive_layers"] = []
        return Detection(scores=scores, flagged=np.zeros(n, bool), flagged_ids=[], verdict=NO_EVIDENCE,
                         reason=reason, **common)
    layers = sorted(set(coloc["layers"]) | {int(layer) for _, layer in joined})
    common["sensitive_layers"] = layers
    signal = what
    if joined:
        signal += " + " + _side_words(side for side, _ in joined)
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(group)]
    return Detection(scores=scores, flagged=group.copy(), flagged_ids=flagged_ids,
                     verdict=flagged_verdict(len(flagged_ids), layers, signal), **common)


def _own_look_decision(table: SignalTable, own: dict, common: dict) -> Detection:
    """The decision when the own-look test passes: its group is flagged (step 5 of the module docstring)."""
    common["sensitive_layers"] = list(own["layers"])
    common["signals"] = [*common["signals"], "peak", "peak_embed"]
    common["extra"]["own_look"] = {k: own[k] for k in ("token", "tokens", "layers", "size", "others", "evidence",
                                                       "cores", "passes")}
    common["score_name"] = "layers in which the sample peaks at the group's token with the group's look, / layers"
    common["statistic_name"] += ("; the evidence layers are the own-look group's (details.own_look), the entropy "
                                 "statistic is reported only")
    ids = list(table.ids)
    flagged = np.asarray(own["group"], bool).copy()
    flagged_ids = [ids[i] for i in np.flatnonzero(flagged)]
    if len(own["tokens"]) == 1:
        signal = f"peak + peak_embed (token {own['tokens'][0]}, a look no other sample peaks on)"
    else:
        signal = f"peak + peak_embed (tokens {', '.join(map(str, own['tokens']))}, looks no other sample peaks on)"
    return Detection(scores=own["hits"] / max(table.num_layers, 1), flagged=flagged, flagged_ids=flagged_ids,
                     verdict=flagged_verdict(len(flagged_ids), list(own["layers"]), signal), **common)


@register("robust", DEFAULTS)
def robust(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """A tight, deep minority group (low entropy; high entropy too when entropy_norm is present)."""
    p = params
    n, num_layers = table.entropy.shape
    scales = _scales(table, float(p["eps"]))
    per_side = {side: _layer_evidence(x, p, seed) for side, x in scales.items()}

    evidence = [(side, layer) for side, ev in per_side.items() for layer in np.flatnonzero(ev["passes"])]
    layer_stats, statistic = [], []
    for layer in range(num_layers):
        entry = {"layer": layer}
        for side, ev in per_side.items():
            entry[side] = {
                "statistic": ev["statistic"][layer], "share": ev["share"][layer], "depth": ev["depth"][layer],
                "components": int(ev["components"][layer]), "stability": ev["stability"][layer],
                "evidence": bool(ev["passes"][layer]),
            }
        layer_stats.append(entry)
        vals = [ev["statistic"][layer] for ev in per_side.values() if np.isfinite(ev["statistic"][layer])]
        statistic.append(float(max(vals)) if vals else None)
    common = dict(
        rule="robust", sensitive_layers=sorted({int(layer) for _, layer in evidence}), tau=float(tau),
        layer_stats=layer_stats, score_gmm=None,
        statistic_name="separation of the best minority group, (mu_next - mu_group) / (sd_group + sd_next) on the "
        "log scale (max over sides); evidence if > min_separation with share and depth in range",
        layer_statistic=statistic, layer_threshold=[float(p["min_separation"])] * num_layers,
        score_name="mean posterior of the suspicious group over the evidence layers", score_low_is_suspect=False,
        signals=["entropy_norm" if "high" in scales else "entropy"],
        extra={"sides": list(scales), "evidence": [{"layer": int(layer), "side": side} for side, layer in evidence]},
    )
    own = own_look_colocation(table, p, seed) if float(p["own_look_others"]) > 0 else None
    if own is not None and own["passes"]:
        return _own_look_decision(table, own, common)
    if own is not None:
        common["extra"]["own_look"] = {"passes": False, "cores": own["cores"]}
    coloc = colocation(table, p, seed)
    if coloc is not None and coloc["passes"] and float(p["look_ratio"]) > 0:
        gate = look_gate(table, coloc, seed, radius=float(p["look_radius"]))
        if gate is not None:
            coloc["look_spread"] = [round(g["spread"], 4) for g in gate]
            coloc["look_others"] = [round(g["others"], 4) for g in gate]
            alike = [g for g in gate if g["spread"] <= float(p["look_ratio"])]
            coloc["passes"] = any(g["others"] <= float(p["look_others"]) for g in alike)
    if coloc is not None:
        by_content = None
        if not coloc["passes"] and int(p["content_clusters"]) > 0:
            by_content = content_colocation(table, p, seed)
        return _peak_decision(table, coloc, evidence, per_side, common, p, by_content)
    if not evidence:
        return Detection(scores=np.zeros(n), flagged=np.zeros(n, bool), flagged_ids=[],
                         verdict=NO_EVIDENCE, reason="no layer holds a tight, deep minority group", **common)

    evidence, others = _consistent(evidence, per_side)
    common["extra"]["evidence"] = [{"layer": int(layer), "side": side} for side, layer in evidence]
    if others:
        common["extra"]["other_groups"] = [{"layer": int(layer), "side": side} for side, layer in others]
    sensitive = sorted({int(layer) for _, layer in evidence})
    common["sensitive_layers"] = sensitive
    score = np.mean([per_side[side]["posterior"][layer] for side, layer in evidence], axis=0)
    flagged = score > 0.5
    cap = int(math.floor(p["max_share"] * n))
    if flagged.sum() > cap:
        flagged = score >= np.sort(score)[::-1][cap - 1] if cap > 0 else np.zeros(n, bool)
    signal = _side_words(side for side, _ in evidence)
    loc = _location(table, flagged, common["sensitive_layers"])
    if loc:
        where = f"{loc['signal']} (layer {loc['layer']})"
        common["extra"]["location"] = {k: loc[k] for k in ("signal", "layer", "ratio", "signals_tested")}
        common["signals"] = [*common["signals"], loc["signal"]]
        if loc["ratio"] <= p["location_ratio"]:
            # trigger-driven: the samples that attend there with a lowered entropy, not the others
            flagged = loc["near"] & (score >= 0.05)
            if flagged.sum() > cap:
                flagged &= score >= np.sort(score[flagged])[::-1][cap - 1]
            signal += f" + shared {where}"
        elif len(loc["signals_tested"]) == 2:
            return Detection(scores=score, flagged=np.zeros(n, bool), flagged_ids=[], verdict=NO_EVIDENCE,
                             reason=f"the group shares neither a location nor a content (best: {where}, "
                             f"spread {loc['ratio']:.2f} x all samples'); nothing flagged", **common)
        else:
            signal += f" (no shared {loc['signal']})"
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(flagged)]
    if not flagged_ids:
        return Detection(scores=score, flagged=flagged, flagged_ids=[],
                         verdict=NO_EVIDENCE, reason="no sample is more likely in the group than not", **common)
    return Detection(scores=score, flagged=flagged, flagged_ids=flagged_ids,
                     verdict=flagged_verdict(len(flagged_ids), common["sensitive_layers"], signal), **common)
