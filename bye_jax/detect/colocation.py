"""Co-location test of the ``robust`` detector: a minority whose attention peaks at one image token in
several layers, far beyond chance and far beyond any other token (pure NumPy, on the ``peak`` signal).

A trigger pasted at one place pulls the answer position's attention there in every poisoned image and
in more than one layer; clean images put their peaks where their content is, so the clean samples that
co-locate split over many tokens. Per table:

1. Focused peaks: ``peak[n, l]`` counts when the sample attends narrowly there, ``entropy_norm[n, l] <=
   peak_focus`` (a near-uniform attention row has an arbitrary peak); without ``entropy_norm``,
   ``entropy / ln(num_image_tokens)`` when the token count is known, else every peak counts.
2. For each image token v, ``S_v`` = the samples whose focused peak is v in >= ``peak_layers`` layers,
   and its excess = ``|S_v|`` minus the count expected if the layers were independent (Poisson-binomial
   over the layers' shares of v): a big sink token in one layer meets other layers by chance, not more.
3. The candidate is the token with the largest excess whose ``S_v`` holds at most ``max_share`` of the
   samples (larger groups are the clean majority's habit). It is evidence when all of these hold:
   - size: ``|S_v|`` >= ``min_group`` samples and >= ``min_share`` of them;
   - the table's own null: its excess >= ``peak_ratio x`` the next token's (floored at the minimum
     size): clean co-location, driven by content, spreads over several tokens of similar size;
   - independence null: its excess beats the largest excess of every one of ``resamples`` tables whose
     layers' peak columns are permuted independently;
   - stability: the same token wins and passes size and ratio in >= ``stability`` of ``resamples``
     subsamples (80% of the rows, at most ``resample_rows``, without replacement).
The group is ``S_v``; its layers are those where at least half of its members peak at v.
"""

from __future__ import annotations

import math

import numpy as np

from bye_jax.detect.base import fill_nan_with_layer_mean
from bye_jax.signals import SignalTable


def focused_peaks(table: SignalTable, focus: float) -> np.ndarray | None:
    """[N, L] int: the peak token where the attention is focused (normalised entropy <= focus), else -1;
    None when the table has no ``peak`` of the entropy's shape [N, L >= 2]."""
    peak = table.get("peak")
    if peak is None or peak.shape != table.entropy.shape or peak.shape[1] < 2:
        return None
    peak = np.asarray(peak, np.int64)
    h = table.get("entropy_norm")
    if h is None and table.get("num_image_tokens") is not None:
        tokens = np.asarray(table.get("num_image_tokens"), np.float64)[:, None]
        h = np.asarray(table.entropy, np.float64) / np.log(np.maximum(tokens, 2.0))
    if h is None:
        return np.where(peak >= 0, peak, -1)
    if h.shape != peak.shape:
        return None
    h = fill_nan_with_layer_mean(np.asarray(h, np.float64))
    return np.where((peak >= 0) & (h <= focus), peak, -1)


def _groups(peaks: np.ndarray, min_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [T], sizes [T], excess [T]): for each token some sample's focused peak hits, |S_v| and
    |S_v| minus its expectation if the layers' peaks were independent (same per-layer shares).
    Memory O(N x L) (no [N, T] array: LLaVA has 576 image tokens)."""
    n, layers = peaks.shape
    valid = peaks >= 0
    tokens, inverse = np.unique(peaks[valid], return_inverse=True)
    t = tokens.size
    if t == 0:
        return tokens, np.zeros(0, np.int64), np.zeros(0)
    index = np.full(peaks.shape, -1, np.int64)
    index[valid] = inverse
    pair, count = np.unique(np.nonzero(valid)[0] * t + inverse, return_counts=True)   # (sample, token) hits
    sizes = np.bincount(pair[count >= min_layers] % t, minlength=t)
    dist = np.zeros((layers + 1, t))                 # P(exactly k layers at v), Poisson-binomial over layers
    dist[0] = 1.0
    for layer in range(layers):
        q = np.bincount(index[valid[:, layer], layer], minlength=t) / n
        dist[1:] = dist[1:] * (1.0 - q) + dist[:-1] * q
        dist[0] *= 1.0 - q
    return tokens, sizes, sizes - n * dist[min_layers:].sum(axis=0)


def _best(peaks: np.ndarray, p: dict) -> dict:
    """The admissible co-location group with the largest excess over chance, and its ratio to the next."""
    n = peaks.shape[0]
    tokens, sizes, excess = _groups(peaks, int(p["peak_layers"]))
    floor = max(int(p["min_group"]), math.ceil(p["min_share"] * n))
    ok = sizes <= p["max_share"] * n
    if not ok.any():
        return {"token": None, "size": 0, "excess": 0.0, "next": 0.0, "ratio": 0.0, "passes": False}
    ex = np.where(ok, excess, -np.inf)
    i = int(np.argmax(ex))
    rest = np.delete(ex, i)
    nxt = float(max(rest.max(), 0.0)) if rest.size else 0.0
    ratio = ex[i] / max(nxt, floor)
    return {"token": int(tokens[i]), "size": int(sizes[i]), "excess": float(ex[i]), "next": nxt,
            "ratio": float(ratio), "passes": bool(sizes[i] >= floor and ratio >= p["peak_ratio"])}


def colocation(table: SignalTable, p: dict, seed: int) -> dict | None:
    """The co-location test (module doc). None without ``peak``; else {token, size, excess, next (the
    next token's excess), ratio, null_max (largest excess in the permuted tables), stability, passes,
    group [N] bool (the members), hits [N] (layers whose focused peak is the token), layers (where >= half
    of the members peak there)}."""
    peaks = focused_peaks(table, float(p["peak_focus"]))
    if peaks is None:
        return None
    n, num_layers = peaks.shape
    best = _best(peaks, p)
    rng = np.random.default_rng(seed)
    b = int(p["resamples"])
    null_max, held = 0.0, 1.0 if best["passes"] else 0.0
    if best["passes"] and b > 0:
        for _ in range(b):                           # independence null: every layer's column shuffled
            shuffled = np.stack([peaks[rng.permutation(n), layer] for layer in range(num_layers)], axis=1)
            null_max = max(null_max, float(_groups(shuffled, int(p["peak_layers"]))[2].max(initial=0.0)))
        m = max(2, min(int(0.8 * n), int(p["resample_rows"])))
        wins = 0
        for _ in range(b):                           # stability: the same token wins in the subsamples
            sub = _best(peaks[rng.permutation(n)[:m]], p)
            wins += sub["passes"] and sub["token"] == best["token"]
        held = wins / b
    passes = best["passes"] and best["excess"] > null_max and held >= p["stability"]
    hits = np.zeros(n, np.int64)
    layers: list[int] = []
    if best["token"] is not None:
        at = peaks == best["token"]
        hits = at.sum(axis=1)
        if (hits >= int(p["peak_layers"])).any():
            member = hits >= int(p["peak_layers"])
            layers = [int(layer) for layer in range(num_layers) if at[member, layer].mean() >= 0.5]
    return {**best, "null_max": null_max, "stability": held, "passes": bool(passes),
            "group": hits >= int(p["peak_layers"]), "hits": hits, "layers": layers}


def complete_by_content(table: SignalTable, coloc: dict, focus: float, quantile: float) -> np.ndarray:
    """[N] bool: the co-location group completed with the samples that peak at its token in one of its
    layers (not in ``peak_layers`` of them) and attend to the same content there: the attention-weighted
    image content (``content``) within the ``quantile`` of the members' own distances to their median
    content in that layer. A trigger looks the same in every image; clean samples that happen to peak at
    the trigger's place look at a shape there. The group itself when the table has no ``content``,
    ``quantile`` <= 0, or fewer than 5 members peak at the token in a layer."""
    group = np.asarray(coloc["group"], bool)
    content = table.get("content")
    peaks = focused_peaks(table, focus)
    if content is None or quantile <= 0 or peaks is None or not coloc.get("passes"):
        return group.copy()
    content = np.asarray(content, np.float32)
    out = group.copy()
    for layer in coloc["layers"]:
        at = peaks[:, layer] == coloc["token"]
        ref = group & at
        if ref.sum() < 5:
            continue
        dist = np.linalg.norm(content[:, layer] - np.median(content[ref, layer], axis=0), axis=1)
        out |= at & (dist <= np.quantile(dist[ref], quantile))
    return out
