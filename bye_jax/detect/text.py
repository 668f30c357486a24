"""The ``text`` detector: a minority whose answer attention peaks on the same user-text token in several
layers, far beyond chance and far beyond any other token (pure NumPy, on the ``text_peak`` signal).

The text counterpart of the ``robust`` detector's image co-location (detect/colocation.py, whose test
this module runs unchanged on other input): a learnt text trigger (a rare token in the question) pulls
the answer position's attention onto itself in the poisoned samples, in more than one layer. Per table:

1. Focused text peaks: ``text_peak[n, l]`` (a token id) counts where the sample puts at least ``level``
   of its user-text attention on it (``text_peak_mass``); the levels run from ``text_focus`` up to
   ``text_focus_max`` in ``focus_levels`` steps (a trigger the model learnt draws most of the text
   attention; a question word draws a share like its neighbours').
2. The co-location test of detect/colocation.py on those peaks: the token with the largest excess over
   chance (independent layers) among groups of ``min_share``..``max_share`` of the upload, evidence when
   its excess is >= ``peak_ratio`` x the next token's, beats every permuted table's and the same token
   wins in >= ``stability`` of the subsamples.
3. The template gate: a question template shared by many samples (the same words in the same order)
   also makes its samples peak on one of its words in every layer, just as a trigger does. What sets a
   trigger apart is that its token does not belong to the question: the samples that peak on it are a
   minority of every kind of question, and the model attends to it far more than to any question word.
   A group is kept only when its members' attention on the token is ``depth_ratio`` x deeper than the
   rest of the upload gives its own peaks in the group's layers (median user-text share of the members
   on the token >= ``min_depth`` and >= ``depth_ratio`` x the others' median): a template's word gets
   the attention a question word gets; a learnt trigger takes it over.

No labels, no clean reference data. Without ``text_peak`` (entropies alone, or a table extracted before
SIGNALS_VERSION 3): "no text-peak signal", nothing flagged.
"""

from __future__ import annotations

import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, flagged_verdict
from bye_jax.detect.colocation import colocation_scan
from bye_jax.detect.registry import register
from bye_jax.signals import SignalTable

DEFAULTS = {
    "min_share": 0.005,        # smallest group (share of the samples) reported as poisoned
    "min_group": 5,            # ... and at least this many samples
    "max_share": 0.35,         # largest group; no verdict flags more than this share
    "min_samples": 20,         # fewer rows: "not enough samples to decide"
    "resamples": 16,           # subsamples (80% of the rows, at most resample_rows) the evidence must survive
    "stability": 0.8,          # ... in at least this share of them
    "resample_rows": 4096,
    "peak_layers": 2,          # the same text peak token in at least this many layers
    "peak_ratio": 2.0,         # ... its excess over chance >= this x the next token's
    "text_focus": 0.0,         # a text peak counts where it holds >= this share of the user-text attention
    "text_focus_max": 0.6,     # ... scanned from text_focus up to this
    "focus_levels": 4,
    "min_depth": 0.5,          # members' median user-text share on the token, in the group's layers
    "depth_ratio": 2.0,        # ... >= this x the other samples' median share on their own text peak
}


def focus_levels(p: dict) -> list[float]:
    """The user-text share thresholds scanned, loosest first."""
    lo, hi, steps = float(p["text_focus"]), float(p["text_focus_max"]), max(1, int(p["focus_levels"]))
    return [lo] if steps == 1 else [lo + (hi - lo) * i / (steps - 1) for i in range(steps)]


def text_scans(table: SignalTable, p: dict) -> list[tuple[float, np.ndarray]] | None:
    """[(level, peaks [N, L] int, -1 where the text peak holds less than level)], or None without the signal."""
    peak, mass = table.get("text_peak"), table.get("text_peak_mass")
    if peak is None or mass is None or peak.ndim != 2 or peak.shape[1] < 2 or mass.shape != peak.shape:
        return None
    peak = np.asarray(peak, np.int64)
    mass = np.nan_to_num(np.asarray(mass, np.float64), nan=-1.0)
    return [(level, np.where((peak >= 0) & (mass >= level), peak, -1)) for level in focus_levels(p)]


def depth(table: SignalTable, coloc: dict) -> dict:
    """Members' and others' median user-text share on their text peak, over the group's layers."""
    mass = np.asarray(table.get("text_peak_mass"), np.float64)
    group, layers = np.asarray(coloc["group"], bool), list(coloc["layers"])
    if not layers or not group.any() or group.all():
        return {"members": float("nan"), "others": float("nan")}
    at = np.asarray(table.get("text_peak"))[:, layers] == coloc["token"]
    m = mass[:, layers]
    inside = m[group[:, None] & at]
    outside = m[~group, :]
    return {"members": float(np.nanmedian(inside)) if inside.size else float("nan"),
            "others": float(np.nanmedian(outside)) if np.isfinite(outside).any() else float("nan")}


@register("text", DEFAULTS)
def text(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """A minority whose answer attention peaks on one user-text token in several layers (a text trigger)."""
    p = params
    n, num_layers = table.num_samples, table.num_layers
    common = dict(
        rule="text", tau=float(tau), layer_stats=[{"layer": i} for i in range(num_layers)], score_gmm=None,
        statistic_name="share of the co-location group's members whose text peak is its token",
        layer_threshold=[0.5] * num_layers, score_name="layers whose text peak is the group's token, / layers",
        score_low_is_suspect=False, signals=["text_peak", "text_peak_mass"],
    )
    scans = text_scans(table, p)
    if scans is None:
        return Detection(sensitive_layers=[], scores=None, flagged=np.zeros(n, bool), flagged_ids=[],
                         verdict=NO_EVIDENCE, layer_statistic=[None] * num_layers,
                         reason="no text-peak signal (extracted before signal version 4?); nothing flagged",
                         **{**common, "signals": []})
    coloc = colocation_scan(scans, p, seed)
    group = np.asarray(coloc["group"], bool)
    at = np.asarray(table.get("text_peak")) == coloc["token"] if coloc["token"] is not None else np.zeros((n, 1), bool)
    stat = [float(at[group, i].mean()) if group.any() and i < at.shape[1] else None for i in range(num_layers)]
    d = depth(table, coloc)
    deep = bool(np.isfinite(d["members"]) and d["members"] >= p["min_depth"]
                and d["members"] >= p["depth_ratio"] * max(d["others"], 0.0))
    keys = ("token", "focus", "size", "excess", "next", "ratio", "null_max", "stability", "layers", "passes")
    common["extra"] = {"text_peak": {**{k: coloc[k] for k in keys}, "depth_members": d["members"],
                                     "depth_others": d["others"], "deep": deep}}
    scores = coloc["hits"] / max(num_layers, 1)
    if not (coloc["passes"] and deep):
        if coloc["token"] is None:
            why = "no focused text peak shared across layers"
        elif not coloc["passes"]:
            why = (f"best: token {coloc['token']}, {coloc['size']} samples, excess over chance {coloc['excess']:.1f} = "
                   f"{coloc['ratio']:.2f} x the next token's, stability {coloc['stability']:.2f}")
        else:
            why = (f"token {coloc['token']} ({coloc['size']} samples) passes the co-location test, but its members "
                   f"put {d['members']:.2f} of their text attention on it vs {d['others']:.2f} for the others' "
                   f"peaks: a question word, not a trigger")
        return Detection(sensitive_layers=[], scores=scores, flagged=np.zeros(n, bool), flagged_ids=[],
                         verdict=NO_EVIDENCE, layer_statistic=stat,
                         reason=f"no minority shares a text attention peak across layers ({why})", **common)
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(group)]
    return Detection(sensitive_layers=list(coloc["layers"]), scores=scores, flagged=group.copy(),
                     flagged_ids=flagged_ids, layer_statistic=stat,
                     verdict=flagged_verdict(len(flagged_ids), coloc["layers"], f"text peak (token {coloc['token']})"),
                     **common)
