"""Gaussian mixtures with one covariance shared by the components ("tied"), K = 1..K_max chosen by BIC (pure JAX).

For a few thousand rows in a few dimensions (a question's samples on the leading principal components of
their share signals: detect/targeted.py). Per K, ``starts`` EM runs, vmapped over K and starts (a K-component
model is the K_max-component one with the components from K on switched off), each from k-means: k-means++
seeds (``jax.random`` from ``seed``), ``KMEANS_STEPS`` Lloyd steps, the components' first parameters from
that hard split (as scikit-learn's k-means start); the best likelihood per K is kept. The rows are padded to
a power of two with a validity mask (few compiled shapes). BIC counts (K - 1) weights, K * d means and
d (d + 1) / 2 covariance entries. The covariance gets ``reg`` x the identity (the data are standardised).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bye_jax.detect.mixture import _bucket

_LOG_2PI = math.log(2.0 * math.pi)
KMEANS_STEPS = 20  # Lloyd steps from the k-means++ seeds before EM


class TiedFit(NamedTuple):
    """The BIC-best fit: k, weights [k], means [k, d], covariance [d, d], labels [N] (most probable
    component), bic [K_max] (every K)."""

    k: int
    weights: np.ndarray
    means: np.ndarray
    covariance: np.ndarray
    labels: np.ndarray
    bic: np.ndarray


def _log_joint(x, w, mu, cov):
    """[N, k] log(w_j) + log N(x | mu_j, cov)."""
    diff = x[:, None, :] - mu[None, :, :]  # [N, k, d]
    maha = jnp.einsum("nki,ij,nkj->nk", diff, jnp.linalg.inv(cov), diff)
    logdet = jnp.linalg.slogdet(cov)[1]
    return jnp.log(jnp.maximum(w, 1e-30))[None, :] - 0.5 * (maha + logdet + x.shape[1] * _LOG_2PI)


def _seed_means(x, valid, key, k: int):
    """k-means++ seeds among the valid rows."""
    n = x.shape[0]
    key, first = jax.random.split(key)
    idx0 = jax.random.choice(first, n, p=valid / jnp.sum(valid))
    means = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[idx0])
    for j in range(1, k):
        d2 = jnp.min(jnp.sum((x[:, None, :] - means[None, :j, :]) ** 2, axis=-1), axis=1) * valid
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, n, p=d2 / jnp.maximum(jnp.sum(d2), 1e-30))
        means = means.at[j].set(x[idx])
    return means


def _em(x, valid, key, reg, k, *, kmax: int, iters: int):
    """One EM run of a k-component model (the kmax-component one with components >= k switched off), from
    k-means: (log-likelihood, weights, means, covariance)."""
    n = jnp.sum(valid)
    d = x.shape[1]
    active = jnp.arange(kmax) < k

    def log_joint(w, mu, cov):
        return jnp.where(active[None, :], _log_joint(x, w, mu, cov), -jnp.inf)

    def m_step(r):
        r = r * valid[:, None]
        nk = jnp.sum(r, axis=0)
        mu = (r.T @ x) / jnp.maximum(nk, 1e-10)[:, None]
        diff = x[:, None, :] - mu[None, :, :]
        cov = jnp.einsum("nk,nki,nkj->ij", r, diff, diff) / n + reg * jnp.eye(d, dtype=x.dtype)
        return nk / n, mu, cov

    def hard(mu):
        dist = jnp.where(active[None, :], jnp.sum((x[:, None, :] - mu[None]) ** 2, axis=-1), jnp.inf)
        return jax.nn.one_hot(jnp.argmin(dist, axis=1), kmax, dtype=x.dtype)

    def lloyd(_, mu):
        r = hard(mu) * valid[:, None]
        return jnp.where(jnp.sum(r, 0)[:, None] > 0, (r.T @ x) / jnp.maximum(jnp.sum(r, 0), 1.0)[:, None], mu)

    mu = jax.lax.fori_loop(0, KMEANS_STEPS, lloyd, _seed_means(x, valid, key, kmax))  # the k-means start

    def step(_, state):
        lj = log_joint(*state)
        return m_step(jnp.exp(lj - jax.nn.logsumexp(lj, axis=1, keepdims=True)))

    w, mu, cov = jax.lax.fori_loop(0, iters, step, m_step(hard(mu)))
    ll = jnp.sum(jax.nn.logsumexp(log_joint(w, mu, cov), axis=1) * valid)
    return ll, w, mu, cov


@partial(jax.jit, static_argnames=("kmax", "starts", "iters"))
def _fits(x, valid, key, reg, *, kmax: int, starts: int, iters: int):
    """The best of `starts` runs for every K = 1..kmax (vmapped over K and starts): ll [kmax], weights
    [kmax, kmax], means [kmax, kmax, d], covariances [kmax, d, d]."""
    keys = jax.random.split(key, kmax * starts).reshape(kmax, starts, -1)
    ks = jnp.arange(1, kmax + 1)
    run = jax.vmap(jax.vmap(lambda kk, k: _em(x, valid, kk, reg, k, kmax=kmax, iters=iters), (0, None)), (0, 0))
    ll, w, mu, cov = run(keys, ks)
    ll = jnp.where(jnp.isfinite(ll), ll, -jnp.inf)
    b = jnp.argmax(ll, axis=1)
    pick = jnp.arange(kmax)
    return ll[pick, b], w[pick, b], mu[pick, b], cov[pick, b]


def fit_tied(x: np.ndarray, max_components: int = 6, *, starts: int = 8, iters: int = 100, reg: float = 1e-3,
             seed: int = 0) -> TiedFit:
    """BIC-best tied mixture of the rows of x [N, d] (N >= 2) with K = 1..max_components."""
    x = np.asarray(x, np.float32)
    n, d = x.shape
    size = _bucket(n)
    xp = np.zeros((size, d), np.float32)
    xp[:n] = x
    valid = np.zeros(size, np.float32)
    valid[:n] = 1.0
    ll, w, mu, cov = (np.asarray(a) for a in _fits(jnp.asarray(xp), jnp.asarray(valid), jax.random.PRNGKey(seed),
                                                   jnp.float32(reg), kmax=max_components, starts=starts, iters=iters))
    ks = np.arange(1, max_components + 1)
    bic = -2.0 * ll + ((ks - 1) + ks * d + d * (d + 1) / 2) * math.log(n)
    best = int(np.nanargmin(bic))
    k = best + 1
    w, mu, cov = w[best, :k], mu[best, :k], cov[best]
    fit = TiedFit(k, w, mu, cov, np.zeros(0, np.int64), bic)
    return fit._replace(labels=assign(fit, x))


def assign(fit: TiedFit, x: np.ndarray) -> np.ndarray:
    """[N] the most probable component of each row of x under `fit`."""
    lj = _log_joint(jnp.asarray(x, jnp.float32), jnp.asarray(fit.weights), jnp.asarray(fit.means),
                    jnp.asarray(fit.covariance))
    return np.asarray(jnp.argmax(lj, axis=1))
