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
    h = _normalised_entropy(table)
    if h is None:
        return np.where(peak >= 0, peak, -1)
    if h.shape != peak.shape:
        return None
    return np.where((peak >= 0) & (h <= focus), peak, -1)


def _normalised_entropy(table: SignalTable) -> np.ndarray | None:
    """[N, L] entropy / ln(image tokens) (NaN filled with the layer mean), or None when not derivable."""
    h = table.get("entropy_norm")
    if h is None and table.get("num_image_tokens") is not None:
        tokens = np.asarray(table.get("num_image_tokens"), np.float64)[:, None]
        h = np.asarray(table.entropy, np.float64) / np.log(np.maximum(tokens, 2.0))
    return None if h is None else fill_nan_with_layer_mean(np.asarray(h, np.float64))


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


def focus_levels(p: dict) -> list[float]:
    """The focus thresholds scanned, loosest first: ``focus_levels`` steps from ``peak_focus`` down to half of it."""
    top, steps = float(p["peak_focus"]), max(1, int(p.get("focus_levels", 1)))
    return [top] if steps == 1 else [top * (1.0 - 0.5 * i / (steps - 1)) for i in range(steps)]


def _null_and_stability(best: dict, peaks: np.ndarray, p: dict, seed: int) -> tuple[float, float]:
    """(largest excess in ``resamples`` tables with every layer's column shuffled, share of subsamples in
    which the same token wins and passes size and ratio); (0, 1 or 0) when not tested."""
    n, num_layers = peaks.shape
    b = int(p["resamples"])
    if not best["passes"] or b <= 0:
        return 0.0, 1.0 if best["passes"] else 0.0
    rng = np.random.default_rng(seed)
    null_max = 0.0
    for _ in range(b):
        shuffled = np.stack([peaks[rng.permutation(n), layer] for layer in range(num_layers)], axis=1)
        null_max = max(null_max, float(_groups(shuffled, int(p["peak_layers"]))[2].max(initial=0.0)))
    m = max(2, min(int(0.8 * n), int(p["resample_rows"])))
    wins = 0
    for _ in range(b):
        sub = _best(peaks[rng.permutation(n)[:m]], p)
        wins += sub["passes"] and sub["token"] == best["token"]
    return null_max, wins / b


def colocation(table: SignalTable, p: dict, seed: int) -> dict | None:
    """The co-location test (module doc). None without ``peak``; else {token, focus (the level that found it),
    size, excess, next (the next token's excess), ratio, null_max (largest excess in the permuted tables),
    stability, passes, group [N] bool (the members), hits [N] (layers whose focused peak is the token, at
    ``peak_focus``), layers (where >= half of the members peak there)}.

    The token is sought at each focus level (`focus_levels`): a clean sink that many samples attend to
    loosely (e.g. a background corner) can outweigh the trigger at the loosest level, while the trigger's
    samples attend to it narrowly. The levels whose candidate passes size and ratio are tested against
    the null and for stability (at that level), largest ratio first, and the first that passes wins; the
    members are then counted at the loosest level (``peak_focus``), so a sample that attends to the
    trigger more loosely in one layer stays in.
    """
    scans = [(focus, peaks) for focus in focus_levels(p) if (peaks := focused_peaks(table, focus)) is not None]
    return colocation_scan(scans, p, seed) if scans else None


def colocation_scan(scans: list[tuple[float, np.ndarray]], p: dict, seed: int, *,
                    members_at_chosen: bool = False) -> dict:
    """The co-location test over focus levels given as [(level, peaks [N, L] int, -1 = no focused peak)],
    loosest first (members are counted at the first, or at the chosen level with `members_at_chosen`:
    for labels that mean something else at each level); any per-layer token signal works (image token
    index, text token id, content label). Returns what `colocation` returns, plus `at` [N, L]."""
    candidates = [(_best(peaks, p), focus, peaks) for focus, peaks in scans]
    order = sorted(candidates, key=lambda c: (not c[0]["passes"], -c[0]["ratio"]))
    chosen = None                                    # passing levels, largest ratio first, until one holds
    for best, focus, peaks in order:
        null_max, held = _null_and_stability(best, peaks, p, seed)
        passes = bool(best["passes"] and best["excess"] > null_max and held >= p["stability"])
        if chosen is None or passes:                 # else the first (largest-ratio) candidate is reported
            chosen = best, focus, peaks, null_max, held, passes
        if passes or not best["passes"]:
            break
    best, focus, peaks, null_max, held, passes = chosen
    n, num_layers = peaks.shape
    hits = np.zeros(n, np.int64)
    at = np.zeros((n, num_layers), bool)
    layers: list[int] = []
    if best["token"] is not None:
        at = (peaks if members_at_chosen else scans[0][1]) == best["token"]  # members: loosest level by default
        hits = at.sum(axis=1)
        if (hits >= int(p["peak_layers"])).any():
            member = hits >= int(p["peak_layers"])
            layers = [int(layer) for layer in range(num_layers) if at[member, layer].mean() >= 0.5]
    return {**best, "focus": float(focus), "null_max": null_max, "stability": held, "passes": bool(passes),
            "group": hits >= int(p["peak_layers"]), "hits": hits, "layers": layers, "at": at}


def complete_group(table: SignalTable, coloc: dict, focus: float, content_quantile: float,
                   focus_quantile: float, focus_others_quantile: float) -> np.ndarray:
    """[N] bool: the co-location group completed with the samples that peak at its token in one of its
    layers (not in ``peak_layers`` of them) and, there, look like its members in one of two ways:

    - the same content: the attention-weighted image content (``content``) within the ``content_quantile``
      of the members' own distances to their median content in that layer (a trigger looks the same in
      every image; clean samples that happen to peak at the trigger's place look at a shape there);
    - a collapse onto it: normalised entropy at most the ``focus_quantile`` of the members' own there (as
      narrow as their narrower part) and at most the ``focus_others_quantile`` of the samples whose peak is
      elsewhere in that layer (a focus the upload's other samples rarely reach): a sample that collapses
      onto the trigger in one layer only. Clean samples that peak at the trigger's place attend to a shape
      and its surroundings.

    A criterion is skipped where its signal is missing, its quantile is <= 0, or fewer than 5 members
    peak at the token in the layer; the group itself when the test did not pass."""
    group = np.asarray(coloc["group"], bool)
    peaks = focused_peaks(table, focus)
    if peaks is None or not coloc.get("passes"):
        return group.copy()
    content = table.get("content")
    h = _normalised_entropy(table)
    out = group.copy()
    for layer in coloc["layers"]:
        at = peaks[:, layer] == coloc["token"]
        ref = group & at
        if ref.sum() < 5:
            continue
        if content is not None and content_quantile > 0:
            c = np.asarray(content[:, layer], np.float32)
            dist = np.linalg.norm(c - np.median(c[ref], axis=0), axis=1)
            out |= at & (dist <= np.quantile(dist[ref], content_quantile))
        others = np.asarray(table.get("peak"))[:, layer] != coloc["token"]
        if h is not None and focus_quantile > 0 and others.any():
            cut = min(np.quantile(h[ref, layer], focus_quantile), np.quantile(h[others, layer], focus_others_quantile))
            out |= at & (h[:, layer] <= cut)
    return out


def look_gate(table: SignalTable, coloc: dict, seed: int, radius: float = 0.1, rows: int = 512
              ) -> list[dict] | None:
    """Per layer of a co-location group, how alike and how exclusive its members' looks at the group's token
    are (``peak_embed``: the input embedding at the peak image token, i.e. what is there):

    - ``spread``: the members' median distance to their medoid look over the median distance between two
      samples' looks in that layer (all samples' peaks). A trigger looks the same in every image (0 in the
      demo's runs); clean samples that happen to share a place attend to different shapes there (0.6-0.9).
    - ``others``: the samples outside the group whose peak has the members' look (within the members' median
      distance to the medoid, at least ``radius`` x the typical distance), per member that has it, in the
      group layer where most do (the maximum over the group's layers). A trigger is in the poisoned images only
      (0-0.13 on the demo's runs); a look that is everywhere, such as the plain background, is also where many
      other samples peak (3.0 on the one background group of the demo's runs), if only in another of the
      group's layers (prefix 3% seed 3, epoch 24: 0.07 samples per member in layer 2, 5.1 in layer 0).

    At most `rows` members and samples enter the pairwise distances (a fixed subsample); ``others`` counts
    every sample. None without ``peak_embed`` or without group layers."""
    emb = table.get("peak_embed")
    if emb is None or not coloc.get("layers") or coloc.get("token") is None:
        return None
    rng = np.random.default_rng(seed)
    n = table.num_samples
    ref = rng.choice(n, min(n, rows), replace=False)
    group = np.asarray(coloc["group"], bool)
    looks = {layer: np.asarray(emb[:, layer], np.float32) for layer in coloc["layers"]}
    out = []
    for layer in coloc["layers"]:
        look = looks[layer]
        members = np.flatnonzero(group & (np.asarray(coloc["at"])[:, layer]))
        if len(members) < 2:
            continue
        members = rng.choice(members, min(len(members), rows), replace=False)
        within = np.linalg.norm(look[members][:, None] - look[members][None], axis=-1)
        medoid = look[members[int(np.argmin(within.sum(axis=1)))]]
        pairs = np.linalg.norm(look[ref][:, None] - look[ref][None], axis=-1)[np.triu_indices(len(ref), 1)]
        typical = float(np.median(pairs)) if len(pairs) else 0.0
        spread = float(np.median(np.linalg.norm(look[members] - medoid, axis=1)))
        others = []
        for other in looks.values():  # the look is the group's own in every layer of the group
            near = np.linalg.norm(other - medoid, axis=1) <= max(spread, radius * typical)
            others.append(float(np.count_nonzero(near & ~group) / max(1, np.count_nonzero(near & group))))
        out.append({"layer": int(layer), "spread": spread / typical if typical > 0 else 0.0, "others": max(others)})
    return out or None


def look_spread(table: SignalTable, coloc: dict, seed: int, rows: int = 512) -> list[float] | None:
    """The ``spread`` of `look_gate` per group layer (None without ``peak_embed`` or group layers)."""
    gate = look_gate(table, coloc, seed, rows=rows)
    return None if gate is None else [g["spread"] for g in gate]


# ------------------------------------------------------------------------------ co-location on an own look

def _typical_distance(look: np.ndarray, ref: np.ndarray) -> float:
    pairs = np.linalg.norm(look[ref][:, None] - look[ref][None], axis=-1)[np.triu_indices(len(ref), 1)]
    return float(np.median(pairs)) if len(pairs) else 0.0


def own_look_cores(table: SignalTable, p: dict, seed: int, rows: int = 512) -> list[dict] | None:
    """Per layer and image token: the samples that peak at the token with its most common look there (the
    core), and how many samples peak on that look elsewhere, per core member (``others``).

    The look is ``peak_embed`` (the input embedding at the peak token, projected; one space for every layer).
    "The same look" is within ``look_radius`` x the typical distance between two samples' looks in the layer;
    the most common look at a token is the one with most members within that radius (sought among at most
    `rows` of the token's samples). Cores outside ``min_group`` / ``min_share`` .. ``max_share`` are left out.
    None without ``peak`` and ``peak_embed`` of matching shape."""
    emb, peak = table.get("peak_embed"), table.get("peak")
    if emb is None or peak is None or emb.ndim != 3 or emb.shape[:2] != np.shape(peak):
        return None
    n, layers = np.shape(peak)
    rng = np.random.default_rng(seed)
    ref = rng.choice(n, min(n, rows), replace=False)
    lo, hi = max(int(p["min_group"]), math.ceil(float(p["min_share"]) * n)), float(p["max_share"]) * n
    out = []
    for layer in range(layers):
        look = np.asarray(emb[:, layer], np.float32)
        radius = float(p["look_radius"]) * _typical_distance(look, ref)
        at_layer = np.asarray(peak[:, layer])
        tokens, counts = np.unique(at_layer[at_layer >= 0], return_counts=True)
        for token in tokens[counts >= lo]:
            at = np.flatnonzero(at_layer == token)
            sub = rng.choice(at, min(len(at), rows), replace=False)
            close = np.linalg.norm(look[sub][:, None] - look[sub][None], axis=-1) <= radius
            mode = look[sub[int(np.argmax(close.sum(axis=1)))]]
            near = np.linalg.norm(look - mode, axis=1) <= radius
            core = near & (at_layer == token)
            size = int(core.sum())
            if lo <= size <= hi:
                out.append({"layer": layer, "token": int(token), "core": core, "look": mode, "radius": radius,
                            "others": float(np.count_nonzero(near & ~core) / size)})
    return out


def _linked_cores(own: list[dict], link: float) -> list[list[int]]:
    """Components of the cores of different layers that share >= ``link`` x the smaller core's members (and
    >= 2): one trigger seen in several layers, at the same or at different tokens (the squares of a grid)."""
    parent = list(range(len(own)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, a in enumerate(own):
        for j in range(i + 1, len(own)):
            b = own[j]
            shared = int(np.count_nonzero(a["core"] & b["core"]))
            if a["layer"] != b["layer"] and shared >= max(2.0, link * min(a["core"].sum(), b["core"].sum())):
                parent[root(i)] = root(j)
    comps: dict[int, list[int]] = {}
    for i in range(len(own)):
        comps.setdefault(root(i), []).append(i)
    return list(comps.values())


def _collapsed(h: np.ndarray, core: dict, quantile: float) -> bool:
    """A core whose members' median entropy (`h` [N, L]) in its layer lies below ``quantile`` of the other
    samples': the attention collapses onto the core's token there (a trigger seen in one layer only)."""
    h = h[:, core["layer"]]
    inside, rest = h[core["core"]], h[~core["core"]]
    return bool(len(inside) and len(rest) and np.mean(rest <= np.median(inside)) <= quantile)


def own_look_colocation(table: SignalTable, p: dict, seed: int) -> dict | None:
    """A minority that peaks on a look (almost) no other sample peaks on, seen as a trigger: the union of

    * place: at one image token with one look in >= ``peak_layers`` layers (a trigger pasted at one place;
      per token, the largest core and the cores of the token whose look is within its radius; the token
      with the largest such group);
    * linked: cores of different layers that share >= ``own_look_link`` x the smaller one's members, spanning
      >= ``peak_layers`` layers (one trigger drawing the peak onto different tokens in different layers, e.g.
      the squares of a grid trigger);
    * collapsed: a core of one layer whose members' median entropy there is below the
      ``own_look_collapse`` quantile of the other samples' (a trigger seen in one layer only);

    over the cores of `own_look_cores` with ``others`` <= ``own_look_others``. Evidence when the union is
    not empty and within ``max_share`` (beyond it, the place group alone where there is one). Clean samples
    that share a place and a look there (the plain background, an attention sink, a shape's look) share it
    with many samples peaking elsewhere; on the
    detection suite's tables no clean sample passes the place rule (with ``own_look_others`` up to 1.0;
    without the exclusivity, sinks and background groups of 12-266 clean samples do), and the clean cores
    that pass the exclusivity sit in one layer each, sharing <= 0.22 of their members with another layer's
    core, with a median entropy above 0.2 of the others'. None without the signals."""
    cores = own_look_cores(table, p, seed)
    if cores is None:
        return None
    n = table.num_samples
    own = [c for c in cores if c["others"] <= float(p["own_look_others"])]
    best = None
    for token in sorted({c["token"] for c in own}):
        mine = [c for c in own if c["token"] == token]
        top = max(mine, key=lambda c: int(c["core"].sum()))
        same = [c for c in mine if np.linalg.norm(c["look"] - top["look"]) <= max(c["radius"], top["radius"])]
        size = int(np.any([c["core"] for c in same], axis=0).sum())
        if len({c["layer"] for c in same}) >= int(p["peak_layers"]) and (best is None or size > best[1]):
            best = (same, size)
    used = {id(c): "place" for c in (best[0] if best else [])}
    if float(p.get("own_look_link", 0)) > 0:
        for comp in _linked_cores(own, float(p["own_look_link"])):
            if len({own[i]["layer"] for i in comp}) >= int(p["peak_layers"]):
                for i in comp:
                    used.setdefault(id(own[i]), "linked")
    if float(p.get("own_look_collapse", 0)) > 0:
        h = _normalised_entropy(table)
        h = fill_nan_with_layer_mean(np.asarray(table.entropy, np.float64)) if h is None else h
        for c in own:
            if id(c) not in used and _collapsed(h, c, float(p["own_look_collapse"])):
                used[id(c)] = "collapsed"
    chosen = [c for c in own if id(c) in used]
    if chosen and np.any([c["core"] for c in chosen], axis=0).sum() > float(p["max_share"]) * n and best:
        chosen = best[0]                           # too large with the other kinds: the place rule's group alone
    if not chosen:
        return {"passes": False, "token": None, "cores": len(own)}
    group = np.any([c["core"] for c in chosen], axis=0)
    evidence = [{"layer": c["layer"], "token": c["token"], "size": int(c["core"].sum()),
                 "others": round(c["others"], 4), "kind": used[id(c)]} for c in chosen]
    return {"token": best[0][0]["token"] if best else None, "tokens": sorted({c["token"] for c in chosen}),
            "layers": sorted({c["layer"] for c in chosen}), "group": group, "size": int(group.sum()),
            "hits": np.sum([c["core"] for c in chosen], axis=0), "others": [e["others"] for e in evidence],
            "evidence": evidence, "cores": len(own), "passes": bool(group.sum() <= float(p["max_share"]) * n)}


# ------------------------------------------------------------------------------ co-location by content

def content_labels(table: SignalTable, focus: float, clusters: int, seed: int, fit_rows: int = 20000
                   ) -> np.ndarray | None:
    """[N, L] int: a content label per focused peak (-1 elsewhere), from ``peak_embed`` (what the layer peaks
    on: the peak token's input embedding, projected): k-means (k-means++ start, ``clusters`` centres, fitted
    on at most ``fit_rows`` of the pooled focused peaks of all layers, then every peak assigned). The input
    embedding is the same space in every layer, so a label means the same look in every layer. None without
    ``peak_embed`` of shape [N, L, D] or with fewer focused peaks than 2 x ``clusters``."""
    emb = table.get("peak_embed")
    peaks = focused_peaks(table, focus)
    if emb is None or peaks is None or emb.ndim != 3 or emb.shape[:2] != peaks.shape:
        return None
    x = np.asarray(emb, np.float64)
    ok = (peaks >= 0) & np.isfinite(x).all(axis=-1)
    pts = x[ok]
    k = int(clusters)
    if len(pts) < 2 * k:
        return None
    rng = np.random.default_rng(seed)
    fit = pts[rng.permutation(len(pts))[:fit_rows]]
    centres = [fit[rng.integers(len(fit))]]
    d2 = np.sum((fit - centres[0]) ** 2, axis=1)
    for _ in range(1, k):                                  # k-means++
        if d2.sum() <= 0:
            break
        centres.append(fit[rng.choice(len(fit), p=d2 / d2.sum())])
        d2 = np.minimum(d2, np.sum((fit - centres[-1]) ** 2, axis=1))
    c = np.asarray(centres)
    for _ in range(25):
        lab = _nearest(fit, c)
        new = np.asarray([fit[lab == j].mean(axis=0) if (lab == j).any() else c[j] for j in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    labels = np.full(peaks.shape, -1, np.int64)
    labels[ok] = _nearest(pts, c)
    return labels


def _nearest(points: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    return np.concatenate([np.argmin(((points[i:i + chunk, None] - centres[None]) ** 2).sum(-1), axis=1)
                           for i in range(0, len(points), chunk)]) if len(points) else np.zeros(0, np.int64)


def content_colocation(table: SignalTable, p: dict, seed: int) -> dict | None:
    """The co-location test (`colocation`, same gates: size, ratio to the next group, permutation null,
    stability) on content labels instead of token places: a minority whose focused peaks, wherever they
    are in the image, land on the same look (`content_labels`) in >= ``peak_layers`` layers. A trigger
    pasted at a random place per image keeps its look; clean samples peak on shapes of many looks.
    Returns what `colocation` returns ("token" = the content label), or None without ``peak_embed``."""
    scans = []
    for focus in focus_levels(p):
        labels = content_labels(table, focus, int(p["content_clusters"]), seed)
        if labels is not None:
            scans.append((focus, labels))
    return colocation_scan(scans, p, seed, members_at_chosen=True) if scans else None


def complete_content_group(table: SignalTable, coloc: dict, focus: float, quantile: float) -> np.ndarray:
    """[N] bool: a content co-location group completed with the samples whose focused peak, in one of its
    layers, looks like the members' there (``peak_embed`` within the ``quantile`` of the members' own
    distances to their median look). The group itself when the test did not pass or ``quantile`` <= 0."""
    group = np.asarray(coloc["group"], bool)
    emb = table.get("peak_embed")
    peaks = focused_peaks(table, focus)
    if emb is None or peaks is None or not coloc.get("passes") or quantile <= 0:
        return group.copy()
    out = group.copy()
    for layer in coloc["layers"]:
        ref = group & coloc["at"][:, layer]
        if ref.sum() < 5:
            continue
        e = np.asarray(emb[:, layer], np.float64)
        dist = np.linalg.norm(e - np.median(e[ref], axis=0), axis=1)
        out |= (peaks[:, layer] >= 0) & np.isfinite(dist) & (dist <= np.quantile(dist[ref], quantile))
    return out
