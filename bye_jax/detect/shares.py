"""The ``shares`` detector: trigger-sensitive heads from the prompt-segment attention shares, votes fused
by Dawid-Skene EM (an own implementation of the TCAP idea), or no verdict of poisoning.

Input: the signal table's ``shares`` [N, L, H, 4] (bye_jax/signals.py: per layer and head, the answer
position's attention share on the system / image / user / answer-prefix segments). A table without
them (entropies alone, or extracted before SIGNALS_VERSION 2) gets "no share signals", nothing flagged.

1. Columns. Every (layer, head, segment in ``segments``) is one column, on the logit scale
   ``log(s + eps) - log(1 - s + eps)``.
2. Mixtures. Per column a 1-D Gaussian mixture with K = 1..``max_components`` (<= 3) chosen by
   ``criterion`` (AIC by default, as TCAP: under heavy tails BIC prefers "bulk + wide tail" and
   merges a 2-3% group into the tail), one jitted JAX fit vmapped over columns and K: detect/mixture.py's
   EM and starts, plus starts aimed at a tail group of 2-25% (either side) and at a bulk split into
   a core and a wide part; the best likelihood per K is kept.
3. Head selection. In a column with K >= 2, every component is a minority candidate; one passes
   when its weight is within [``min_share``, ``max_share``], it holds >= ``min_group`` samples
   (posterior > 0.5: the column's vote), it is separated from both neighbours (sorted by mean),
   ``|mu_j - mu_nb| / (sd_j + sd_nb) >= min_separation``, and its members' mean share differs from
   the others' by >= ``min_shift`` (share units: an effect, not a split of a tight column). The most
   separated candidate of a column is its vote.
4. Consensus. Selected columns are taken in order of separation; each not yet placed seeds a group
   with the columns whose votes overlap its own (Jaccard >= ``agreement``). A group is evidence when
   its columns span >= ``min_heads`` distinct heads (one head's four shares sum to 1: they count once).
   A minority that only one or two heads see, or independent splits of a multi-modal clean upload
   (each head its own samples), is not evidence. The group with most heads is kept; others are reported.
5. Fusion. Dawid-Skene EM over the binary votes of every selected column (two classes; per column a
   sensitivity and a false-positive rate, Laplace-smoothed; ``ds_iters`` steps, pure JAX), started from
   the kept group's majority vote: a sample's score is its posterior of the minority class; flagged
   above 0.5, at most ``max_share`` of the upload and at least ``min_group`` samples, else nothing.

A clean subgroup of the upload (e.g. one kind of question) that moves the same >= ``min_heads`` heads
the same way is, without labels, indistinguishable from a trigger: this detector flags it.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, flagged_verdict
from bye_jax.detect.mixture import _bucket, _starts, best_fits, posteriors, standardise
from bye_jax.detect.registry import register
from bye_jax.signals import SHARE_SEGMENTS, SignalTable

__all__ = ["DEFAULTS", "NO_SHARES", "column_of", "dawid_skene", "select_columns", "share_matrix", "shares"]

DEFAULTS = {
    "segments": ",".join(SHARE_SEGMENTS),  # the segments whose shares are columns (comma-separated)
    "max_components": 3,       # K = 1..max_components (<= 3) per column, chosen by `criterion`
    "criterion": "aic",        # aic | bic (BIC merges a small group into a wide tail component under heavy tails)
    "iters": 100,              # EM steps per start
    "min_share": 0.005,        # the minority component's weight: at least ...
    "max_share": 0.35,         # ... at most (no verdict flags more than this share)
    "min_group": 5,            # samples in a minority (votes) and in a verdict
    "min_separation": 2.0,     # |mu_j - mu_next| / (sd_j + sd_next) on the logit scale
    "min_shift": 0.01,         # |members' mean share - others'| in share units
    "min_heads": 3,            # distinct (layer, head) pairs that must see the same minority
    "agreement": 0.5,          # Jaccard of a column's votes with the seed column's
    "eps": 1e-4,               # floor inside the logit
    "ds_iters": 50,            # Dawid-Skene EM steps
    "column_chunk": 128,       # columns per mixture call (bounds the posteriors held at once)
    "fit_rows": 4096,          # mixtures fitted on this many random rows of a larger upload (0: all rows)
    "min_samples": 20,         # fewer rows: "not enough samples to decide"
}
NO_SHARES = "no share signals in the signal table (entropies alone, or extracted before the share signals)"


def _segments(spec) -> list[int]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in names if s not in SHARE_SEGMENTS]
    if bad or not names:
        raise ValueError(f"detect.shares.segments: unknown segment(s) {bad or names!r}; "
                         f"known: {', '.join(SHARE_SEGMENTS)}")
    return [SHARE_SEGMENTS.index(s) for s in dict.fromkeys(names)]


_LEVELS = (0.02, 0.08, 0.25)  # tail groups the extra starts aim at (share of the samples)


def _tail_starts(zs, n, k, kmax):
    """Starting mean vectors [3 * len(_LEVELS), kmax] aimed at a minority group in a tail: for K = 2 the bulk's
    median and one tail group (either side, each level); for K = 3 both tails, or one tail and a
    split bulk (the bulk's core + a wide part, as heavy tails need)."""
    def q(v):
        return zs[jnp.clip(jnp.floor(v * (n - 1)).astype(jnp.int32), 0, zs.shape[0] - 1)]

    med, q35, q65 = q(0.5), q(0.35), q(0.65)
    two, three = [], []
    for a in _LEVELS:
        lo, hi = q(a / 2), q(1.0 - a / 2)
        two += [jnp.stack([lo, med, med]), jnp.stack([med, hi, hi])]
        three += [jnp.stack([lo, med, hi]), jnp.stack([lo, q35, q65]), jnp.stack([q35, q65, hi])]
    two = jnp.stack(two + two[:len(_LEVELS)])
    return jnp.where(k == 2, two, jnp.stack(three))[:, :kmax]


@partial(jax.jit, static_argnames=("kmax", "iters", "aic"))
def _fit(X, valid, reg, *, kmax, iters, aic):
    """X [Np, C] (padded), valid [Np] -> per column and K = 1..kmax: weights, means, variances
    [C, kmax, kmax], posteriors [C, kmax, Np, kmax], criterion [C, kmax]; detect/mixture.py's EM
    from its two starts plus `_tail_starts`, the best likelihood kept."""

    def column(x):
        z, zs, n, centre, scale = standardise(x, valid)

        def starts_of(k):
            return jnp.concatenate([_starts(zs, n, k, kmax), _tail_starts(zs, n, k, 3)[:, :kmax]])

        w, mu, var, ll = best_fits(z, valid, reg, kmax, iters, starts_of)
        post = jax.vmap(lambda w, mu, var: posteriors(z, w, mu, var))(w, mu, var)
        k = jnp.arange(1, kmax + 1)
        dev = -2.0 * n * (ll - jnp.log(scale))
        crit = dev + (3.0 * k - 1.0) * jnp.where(aic, 2.0, jnp.log(n))
        return w, mu * scale + centre, var * scale**2, post, crit

    return jax.vmap(column, in_axes=1)(X)


def fit_columns(X: np.ndarray, max_components: int, criterion: str = "bic", iters: int = 300, fit_rows: int = 0):
    """Best 1-D mixture (K = 1..max_components <= 3 by `criterion`, bic or aic) of every column of
    X [N, C]: (k [C], weights, means, variances [C, K], posteriors [C, N, K]). `fit_rows` > 0: the mixtures
    are fitted on that many rows drawn at random (a fixed generator) when N is larger, and every row gets
    its posteriors under them (the fit's cost then stops growing with N)."""
    if not 1 <= int(max_components) <= 3:
        raise ValueError(f"detect.shares.max_components must be 1, 2 or 3, got {max_components!r}")
    if criterion not in ("bic", "aic"):
        raise ValueError(f"detect.shares.criterion must be 'bic' or 'aic', got {criterion!r}")
    n, cols = X.shape
    sub = X
    if 0 < int(fit_rows) < n:
        sub = X[np.sort(np.random.default_rng(0).choice(n, int(fit_rows), replace=False))]
    m = sub.shape[0]
    rows = _bucket(m)
    valid = jnp.asarray(np.arange(rows) < m)
    out = _fit(jnp.asarray(np.pad(sub, ((0, rows - m), (0, 0)))), valid, jnp.float32(1e-3), kmax=int(max_components),
               iters=int(iters), aic=criterion == "aic")
    w, mu, var, post, crit = (np.asarray(a) for a in out)
    crit = np.where(np.isfinite(crit), crit, np.inf)
    best = np.argmin(crit, axis=1)
    c = np.arange(cols)
    w, mu, var = w[c, best], mu[c, best], var[c, best]
    if m == n:
        return best + 1, w, mu, var, post[c, best, :n]
    return best + 1, w, mu, var, np.asarray(_all_posteriors(jnp.asarray(X), w, mu, var))


_all_posteriors = jax.jit(jax.vmap(posteriors, in_axes=(1, 0, 0, 0)))  # X [N, C], w, mu, var [C, K] -> [C, N, K]


def share_matrix(shares: np.ndarray, segs: list[int]) -> np.ndarray:
    """[N, L, H, 4] shares -> [N, L * H * len(segs)] float32 columns in [0, 1] (NaN -> 0), layer-major."""
    sh = np.asarray(shares, np.float32)[..., segs]
    return np.clip(np.nan_to_num(sh, nan=0.0), 0.0, 1.0).reshape(sh.shape[0], -1)


def column_of(col: int, heads: int, segs: list[int]) -> tuple[int, int, str]:
    """A `share_matrix` column -> (layer, head, segment name)."""
    layer, rest = divmod(int(col), heads * len(segs))
    head, s = divmod(rest, len(segs))
    return int(layer), int(head), SHARE_SEGMENTS[segs[s]]


def select_columns(raw: np.ndarray, p: dict) -> list[dict]:
    """Minority candidates of every column of raw [N, C] shares that pass step 3 (module docstring):
    [{column, side, separation, weight, votes [N] bool, shift}]."""
    n, num_cols = raw.shape
    eps = float(p["eps"])
    x = (np.log(raw + eps) - np.log1p(-raw + eps)).astype(np.float32)
    chunk = max(1, int(p["column_chunk"]))
    out = []
    for start in range(0, num_cols, chunk):
        block = x[:, start:start + chunk]
        width = block.shape[1]
        block = np.pad(block, ((0, 0), (0, chunk - width)), mode="edge") if num_cols > chunk else block
        ks, weights, means, variances, posts = fit_columns(block, int(p["max_components"]), str(p["criterion"]),
                                                           int(p["iters"]), int(p["fit_rows"]))
        for c in np.flatnonzero(ks[:width] >= 2):
            k = int(ks[c])
            w, mu, sd = weights[c, :k], means[c, :k], np.sqrt(variances[c, :k])
            best = None
            for j in range(k):
                seps = [abs(mu[j] - mu[b]) / (sd[j] + sd[b]) for b in (j - 1, j + 1) if 0 <= b < k]
                sep = min(seps)
                if not (p["min_share"] <= w[j] <= p["max_share"] and sep >= p["min_separation"]):
                    continue
                votes = posts[c, :, j] > 0.5
                m = int(votes.sum())
                if m < p["min_group"] or m > p["max_share"] * n:
                    continue
                col = raw[:, start + c]
                shift = float(col[votes].mean() - col[~votes].mean())
                if abs(shift) >= p["min_shift"] and (best is None or sep > best["separation"]):
                    side = "low" if j == 0 else "high" if j == k - 1 else "middle"
                    best = {"column": start + int(c), "side": side, "separation": float(sep), "weight": float(w[j]),
                            "votes": votes, "shift": shift}
            if best is not None:
                out.append(best)
    return out


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _groups(selected: list[dict], head_of, agreement: float) -> list[dict]:
    """Step 4: groups of selected columns with overlapping votes, most heads first."""
    order = sorted(range(len(selected)), key=lambda i: -selected[i]["separation"])
    placed, groups = set(), []
    for seed in order:
        if seed in placed:
            continue
        members = [i for i in order if i not in placed
                   and _jaccard(selected[i]["votes"], selected[seed]["votes"]) >= agreement]
        placed.update(members)
        heads = sorted({head_of(selected[i]["column"]) for i in members})
        groups.append({"columns": members, "heads": heads})
    return sorted(groups, key=lambda g: -len(g["heads"]))


@partial(jax.jit, static_argnames=("iters",))
def dawid_skene(votes: jax.Array, init: jax.Array, *, iters: int):
    """Two-class Dawid-Skene EM over binary votes [N, C] from a start posterior init [N].

    Returns (posterior of class 1 [N], per-column sensitivity P(vote | 1) [C], per-column
    false-positive rate P(vote | 0) [C], prior P(1)); the rates are Laplace-smoothed.
    """
    v = jnp.asarray(votes, jnp.float32)

    def rates(t):
        prior = jnp.clip(jnp.mean(t), 1e-4, 1.0 - 1e-4)
        sens = (t @ v + 1.0) / (jnp.sum(t) + 2.0)
        fpr = ((1.0 - t) @ v + 1.0) / (jnp.sum(1.0 - t) + 2.0)
        return prior, sens, fpr

    def step(_, t):
        prior, sens, fpr = rates(t)
        logit = (jnp.log(prior) - jnp.log1p(-prior) + v @ (jnp.log(sens) - jnp.log(fpr))
                 + (1.0 - v) @ (jnp.log1p(-sens) - jnp.log1p(-fpr)))
        return jax.nn.sigmoid(logit)

    t = jax.lax.fori_loop(0, iters, step, jnp.asarray(init, jnp.float32))
    prior, sens, fpr = rates(t)
    return t, sens, fpr, prior


REPORTED = 100  # selected columns / groups listed in the report (most separated / most heads first)


def _trim(extra: dict) -> None:
    extra["selected"] = sorted(extra["selected"], key=lambda d: -d["separation"])[:REPORTED]
    extra["groups"] = extra["groups"][:REPORTED]


@register("shares", DEFAULTS)
def shares(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """Trigger-sensitive heads from the prompt-segment attention shares, fused by Dawid-Skene EM."""
    p = params
    n, num_layers = table.num_samples, table.num_layers
    common = dict(rule="shares", tau=float(tau), score_gmm=None, signals=["shares"],
                  statistic_name="largest separation of a selected minority component among the layer's heads, "
                  "|mu_j - mu_next| / (sd_j + sd_next) on the logit scale; evidence if >= min_separation and "
                  ">= min_heads heads agree", score_name="Dawid-Skene posterior of the minority class",
                  score_low_is_suspect=False)
    sh = table.get("shares")
    if sh is None:
        return Detection(sensitive_layers=[], layer_stats=[], scores=None, flagged=np.zeros(n, bool), flagged_ids=[],
                         verdict=NO_SHARES, reason=NO_SHARES + "; nothing flagged", **common)
    segs = _segments(p["segments"])
    _, layers, heads, _ = sh.shape
    raw = share_matrix(sh, segs)

    def where(col):  # column -> (layer, head, segment name)
        return column_of(col, heads, segs)

    selected = select_columns(raw, p)
    groups = _groups(selected, lambda c: where(c)[:2], float(p["agreement"]))
    stat = np.full(layers, np.nan)
    for s in selected:
        layer = where(s["column"])[0]
        stat[layer] = np.fmax(stat[layer], s["separation"])
    evidence = groups[0] if groups and len(groups[0]["heads"]) >= int(p["min_heads"]) else None
    sensitive = sorted({h[0] for h in evidence["heads"]}) if evidence else []
    common.update(
        sensitive_layers=sensitive,
        layer_stats=[{"layer": i, "statistic": stat[i],
                      "selected_columns": sum(where(s["column"])[0] == i for s in selected)} for i in range(layers)],
        layer_statistic=[None if np.isnan(v) else float(v) for v in stat],
        layer_threshold=[float(p["min_separation"])] * layers,
        extra={"selected": [{"layer": where(s["column"])[0], "head": where(s["column"])[1],
                             "segment": where(s["column"])[2], "side": s["side"], "separation": s["separation"],
                             "weight": s["weight"], "shift": s["shift"]} for s in selected],
               "groups": [{"heads": [list(h) for h in g["heads"]], "columns": len(g["columns"])} for g in groups]},
    )
    if layers != num_layers and num_layers:
        common["extra"]["note"] = f"shares hold {layers} layers, the entropy {num_layers}"
    common["extra"]["n_selected"] = len(selected)
    if evidence is None:
        _trim(common["extra"])
        most = len(groups[0]["heads"]) if groups else 0
        return Detection(scores=np.zeros(n), flagged=np.zeros(n, bool), flagged_ids=[], verdict=NO_EVIDENCE,
                         reason=f"no minority seen by >= {p['min_heads']} heads ({len(selected)} columns selected, "
                         f"at most {most} heads agree)", **common)
    votes = np.stack([s["votes"] for s in selected], axis=1)
    init = np.mean(votes[:, evidence["columns"]], axis=1)
    post, sens, fpr, prior = (np.asarray(a, np.float64) for a in
                              dawid_skene(votes, np.clip(init, 0.05, 0.95), iters=int(p["ds_iters"])))
    for s, a, b in zip(common["extra"]["selected"], sens, fpr, strict=True):
        s.update(sensitivity=float(a), false_positive_rate=float(b))
    common["extra"]["prior"] = float(prior)
    _trim(common["extra"])
    flagged = post > 0.5
    cap = int(math.floor(p["max_share"] * n))
    if flagged.sum() > cap or flagged.sum() < p["min_group"]:
        reason = (f"the fused group holds {int(flagged.sum())} samples, outside [{p['min_group']}, {cap}]; "
                  "nothing flagged")
        return Detection(scores=post, flagged=np.zeros(n, bool), flagged_ids=[], verdict=NO_EVIDENCE, reason=reason,
                         **common)
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(flagged)]
    segs_used = sorted({where(selected[i]["column"])[2] for i in evidence["columns"]})
    signal = f"attention shares ({', '.join(segs_used)}) of {len(evidence['heads'])} heads"
    return Detection(scores=post, flagged=flagged, flagged_ids=flagged_ids,
                     verdict=flagged_verdict(len(flagged_ids), sensitive, signal), **common)
