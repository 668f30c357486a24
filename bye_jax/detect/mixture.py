"""1-D Gaussian mixtures with K = 1..K_max chosen by BIC, for every column at once (pure JAX).

One jitted function fits every column of X [N, C] with every K (vmapped over columns and over K:
a K-component model is the K_max-component one with the last K_max - K weights fixed at 0), from
two deterministic starts per K (sample quantiles, and the centres of the segments between the K-1
widest gaps of the sorted data: a separated group gets its own start), and keeps the better. The
rows are padded to a bucket (a power of two) with a validity mask, so tables of different sizes
share a few compiled shapes. Components come sorted by mean.

bye_jax/gmm.py is the scikit-learn-exact fit the reference rules need; this one trades that
for masks, K as an array axis, and few compilations.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_LOG_2PI = math.log(2.0 * math.pi)
COLUMN_ELEMENTS = 1 << 22  # rows x columns per jitted call (bounds memory: ~2 GB of EM temporaries)


class Mixtures(NamedTuple):
    """BIC-best fit per column: k [C], weights / means / variances [C, K_max] (sorted by mean; unused
    components have weight 0 and sit last), posteriors [C, N, K_max], bic [C, K_max] (every K)."""

    k: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    posteriors: np.ndarray
    bic: np.ndarray


def _log_joint(x, w, mu, var):
    """[N, K]: log w_j + log N(x | mu_j, var_j); -inf for unused components (w = 0)."""
    lp = -0.5 * (_LOG_2PI + jnp.log(var)) - (x[:, None] - mu) ** 2 / (2.0 * var)
    return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) + lp, -jnp.inf)


def _starts(xs, n, k, kmax):
    """Two starting mean vectors [2, kmax] from sorted valid data xs (invalid rows at the end)."""
    j = jnp.arange(kmax)
    q = (2.0 * j + 1.0) / (2.0 * k)
    quant = xs[jnp.clip(jnp.floor(q * (n - 1)).astype(jnp.int32), 0, xs.shape[0] - 1)]
    gaps = jnp.where(jnp.arange(xs.shape[0] - 1) < n - 1, xs[1:] - xs[:-1], -1.0)
    order = jnp.argsort(-gaps)                      # widest gaps first
    rank = jnp.argsort(order)                       # rank of each gap
    is_cut = rank < (k - 1)                         # the k-1 widest gaps cut the data
    seg = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(is_cut.astype(jnp.int32))])  # segment id per row
    valid = jnp.arange(xs.shape[0]) < n
    one = jax.nn.one_hot(seg, kmax) * valid[:, None]
    cnt = one.sum(0)
    gap_means = jnp.where(cnt > 0, (one * xs[:, None]).sum(0) / jnp.maximum(cnt, 1.0), quant)
    return jnp.stack([quant, gap_means])


def _em(x, valid, mu0, k, kmax, reg, iters):
    n = valid.sum()
    active = jnp.arange(kmax) < k
    mu0 = jnp.where(active, mu0, 0.0)
    var = jnp.full(kmax, jnp.sum(jnp.where(valid, (x - jnp.sum(jnp.where(valid, x, 0)) / n) ** 2, 0)) / n / k + reg)
    # one hard assignment to the nearest start gives the starting variances and weights
    d = jnp.where(active, (x[:, None] - mu0) ** 2, jnp.inf)
    hard = jax.nn.one_hot(jnp.argmin(d, axis=1), kmax) * valid[:, None]
    cnt = hard.sum(0)
    w = jnp.where(active, (cnt + 1.0) / (n + k), 0.0)
    var = jnp.where(cnt > 1, (hard * (x[:, None] - mu0) ** 2).sum(0) / jnp.maximum(cnt, 1.0), var) + reg
    mu = mu0

    def step(_, state):
        w, mu, var = state
        lj = _log_joint(x, w, mu, var)
        r = jnp.exp(lj - jax.scipy.special.logsumexp(lj, axis=1, keepdims=True)) * valid[:, None]
        nk = r.sum(0) + 1e-10
        mu_new = (r * x[:, None]).sum(0) / nk
        var_new = (r * (x[:, None] - mu_new) ** 2).sum(0) / nk + reg
        return (jnp.where(active, nk / n, 0.0), jnp.where(active, mu_new, mu), jnp.where(active, var_new, var))

    w, mu, var = jax.lax.fori_loop(0, iters, step, (w, mu, var))
    lj = _log_joint(x, w, mu, var)
    ll = jnp.sum(jnp.where(valid, jax.scipy.special.logsumexp(lj, axis=1), 0.0)) / n
    return w, mu, var, ll


def best_fits(z, valid, reg, kmax: int, iters: int, starts_of):
    """The best-likelihood EM fit of z [Np] (valid [Np]) per K = 1..kmax, from the start mean vectors
    `starts_of(k)` [S, kmax]: (weights, means, variances [kmax, kmax] sorted by mean, log-likelihood per
    sample [kmax]). K = 1 takes one EM step from one start: every step of a one-component mixture gives
    every valid row responsibility exactly 1, so the first step's (w, mu, var) is already the fixed point
    the other steps repeat."""

    def best(k, steps, starts):
        fits = jax.vmap(lambda m0: _em(z, valid, m0, k, kmax, reg, steps))(starts)
        b = jnp.argmax(jnp.where(jnp.isfinite(fits[3]), fits[3], -jnp.inf))
        w, mu, var, ll = (a[b] for a in fits)
        order = jnp.argsort(jnp.where(w > 0, mu, jnp.inf))
        return w[order], mu[order], var[order], ll

    one = best(1, 1, starts_of(1)[:1])
    if kmax == 1:
        return tuple(a[None] for a in one)
    more = jax.vmap(lambda k: best(k, iters, starts_of(k)))(jnp.arange(2, kmax + 1))
    return tuple(jnp.concatenate([a[None], b]) for a, b in zip(one, more, strict=True))


def standardise(x, valid):
    """(z, sorted z with invalid rows last, n, centre, scale) of one padded column."""
    n = valid.sum()
    centre = jnp.sum(jnp.where(valid, x, 0)) / n
    scale = jnp.sqrt(jnp.sum(jnp.where(valid, (x - centre) ** 2, 0)) / n)
    scale = jnp.where(scale > 0, scale, 1.0)
    z = jnp.where(valid, (x - centre) / scale, 0.0)
    return z, jnp.sort(jnp.where(valid, z, jnp.inf)), n, centre, scale


def posteriors(z, w, mu, var):
    """[Np, K] component posteriors of z under one mixture."""
    lj = _log_joint(z, w, mu, var)
    return jnp.exp(lj - jax.scipy.special.logsumexp(lj, axis=1, keepdims=True))


@partial(jax.jit, static_argnames=("kmax", "iters"))
def _fit(X, valid, reg, *, kmax, iters):
    """X [Np, C] (padded), valid [Np]; every column x every K=1..kmax."""

    def column(x):
        z, zs, n, centre, scale = standardise(x, valid)
        w, mu, var, ll = best_fits(z, valid, reg, kmax, iters, lambda k: _starts(zs, n, k, kmax))
        post = jax.vmap(lambda w, mu, var: posteriors(z, w, mu, var))(w, mu, var)
        k = jnp.arange(1, kmax + 1)
        bic = -2.0 * n * (ll - jnp.log(scale)) + (3.0 * k - 1.0) * jnp.log(n)
        return w, mu * scale + centre, var * scale**2, post, bic

    return jax.vmap(column, in_axes=1)(X)


def _bucket(n: int) -> int:
    return max(64, 1 << (int(n) - 1).bit_length())


def fit_bic(X, max_components: int = 4, *, reg: float = 1e-3, iters: int = 300) -> Mixtures:
    """BIC-best 1-D mixture (K = 1..max_components) of every column of X [N, C] (finite values).

    ``reg`` is added to every variance in units of the column's variance (a floor against
    components on a single value); ``iters`` EM steps from each of the two starts.
    """
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"need an [N >= 2, C] matrix, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("mixture fit: non-finite value")
    n, cols = X.shape
    rows = _bucket(n)
    Xp = np.pad(X, ((0, rows - n), (0, 0)))
    valid = jnp.asarray(np.arange(rows) < n)
    width = max(1, min(cols, COLUMN_ELEMENTS // rows))      # columns per call (memory), padded to one shape
    parts = []
    for start in range(0, cols, width):
        chunk = Xp[:, start:start + width]
        chunk = np.pad(chunk, ((0, 0), (0, width - chunk.shape[1])), mode="edge")
        out = _fit(jnp.asarray(chunk), valid, jnp.float32(reg), kmax=int(max_components), iters=int(iters))
        parts.append([np.asarray(a) for a in out])
    w, mu, var, post, bic = (np.concatenate([p[i] for p in parts])[:cols] for i in range(5))
    bic = np.asarray(bic, np.float64)                       # [C, K]
    best = np.argmin(np.where(np.isfinite(bic), bic, np.inf), axis=1)
    cols = np.arange(X.shape[1])
    return Mixtures(
        k=best + 1,
        weights=np.asarray(w, np.float64)[cols, best],
        means=np.asarray(mu, np.float64)[cols, best],
        variances=np.asarray(var, np.float64)[cols, best],
        posteriors=np.asarray(post, np.float32)[cols, best, :n],
        bic=bic,
    )
