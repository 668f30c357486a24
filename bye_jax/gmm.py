"""Pure-JAX EM for 1-D Gaussian mixtures, vmapped over columns (layers).

Semantics follow scikit-learn's ``GaussianMixture(n_components=k)`` (``covariance_type="full"``
on 1-D data, ``init_params="kmeans"``), which is what the BYE reference uses:

* initialisation: k-means labels -> one-hot responsibilities -> M-step (weights = nk / N);
* EM: E-step in log space (logsumexp), M-step with ``nk = sum(resp) + 10 * eps64``,
  ``var = sum(resp * (x - mu_new)^2) / nk + reg_covar``, ``weights = nk / sum(nk)`` (E and M
  fused into one pass over the data, moments taken around the previous means);
* stop when ``|lower_bound - previous| < tol`` (lower bound = mean log-likelihood per sample of
  the parameters *before* the M-step, as in scikit-learn) or after ``max_iter`` iterations;
* ``n_init`` runs, the one with the largest lower bound wins (the first on ties);
* a final E-step gives labels and posteriors (as ``fit_predict`` does).

``fit_gmm_columns`` vmaps the whole fit over columns: the EM and Lloyd loops are
``lax.while_loop``s, so under vmap they run until every column has stopped and a column that has
converged keeps its state (masked convergence); ``n_iter`` / ``converged`` are per column.
One compilation per (N, L, k, n_init, init, return_posteriors); tol, reg_covar and max_iter are
traced.

The k-means initialisation is a JAX port of scikit-learn's ``KMeans(n_clusters=k, n_init=1,
random_state=RandomState(seed))``:

* ``init="kmeans++"`` (default): greedy k-means++ with ``2 + int(log k)`` local trials, driven by
  the same NumPy ``RandomState(seed)`` draws scikit-learn consumes (the draws do not depend on
  the data, only on N, so they are precomputed on the host with NumPy and passed in as arrays;
  run i of ``n_init`` continues the stream, as scikit-learn's loop does). Distances and the
  cumulative sum are float32 here, float64 there, so with N ~ 1e5 a sampled candidate can
  occasionally be a neighbour (in data order) of scikit-learn's.
* ``init="quantile"``: deterministic seeds at the sample quantiles ``(2j + 1) / (2k)``; runs
  1..n_init-1 seed at k distinct data points drawn with ``jax.random`` from ``seed``.
* then Lloyd steps (nearest centre, ties to the lower index; centre = cluster mean) until the
  labels stop changing, or the summed squared centre shift is ``<= 1e-4 * var(x)``, or 300 steps;
  labels are then re-assigned to the final centres (scikit-learn's rules). An empty cluster keeps
  its centre (scikit-learn relocates it to a far point) and the initial M-step gives it that
  centre as mean (scikit-learn: 0 / 1e-15 = 0). Both only matter on degenerate data.

Numerics: computations are float32 (float64 when ``jax_enable_x64`` is on and the input is
float64). Every column is centred and scaled to unit standard deviation before the fit (with
``reg_covar`` scaled accordingly) and the results are reported in the original units, so the
fit is invariant to the units of the data. NaNs are replaced by the column mean first. A constant
column (or N = 1) gives equal means, variances equal to ``reg_covar`` and no NaN.

Components are sorted by mean, ascending; ``labels`` index the sorted components.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GMMResult", "fit_gmm_1d", "fit_gmm_columns", "fill_nan_with_column_mean"]

_NK_EPS = 10.0 * float(np.finfo(np.float64).eps)  # scikit-learn: nk + 10 * eps
_LOG_2PI = float(np.log(2.0 * np.pi))
KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4
# Iterative passes (Lloyd, EM) stream over the samples in chunks of this many, so the
# per-sample intermediates of one step stay in cache (about 3x faster on CPU than whole-column
# fusions, which XLA:CPU materialises in memory).
CHUNK = 2048


class GMMResult(NamedTuple):
    """A fitted 1-D mixture; components sorted by mean ascending.

    From ``fit_gmm_1d``: weights/means/variances [K], labels [N] int32, posteriors [N, K],
    scalars otherwise. From ``fit_gmm_columns``: every field gets a leading column axis
    (weights [L, K], labels [L, N], posteriors [L, N, K], log_likelihood [L], ...);
    ``result.column(j)`` returns the fit of column j.

    ``log_likelihood`` is the mean log-likelihood per sample of the returned parameters
    (scikit-learn's ``score(X)``); ``lower_bound`` is scikit-learn's ``lower_bound_`` (the mean
    log-likelihood computed in the last E-step, before the last M-step), used to pick the best
    of ``n_init`` runs. ``posteriors`` is None when ``return_posteriors=False``.
    """

    weights: jax.Array
    means: jax.Array
    variances: jax.Array
    log_likelihood: jax.Array
    lower_bound: jax.Array
    labels: jax.Array
    posteriors: jax.Array | None
    converged: jax.Array
    n_iter: jax.Array

    def column(self, j: int) -> GMMResult:
        """The fit of column ``j`` of a ``fit_gmm_columns`` result."""
        return GMMResult(*(None if a is None else a[j] for a in self))


def fill_nan_with_column_mean(X: jax.Array) -> jax.Array:
    """Replace NaNs in each column of X [N, L] by the mean of that column's other values.

    A column with no finite value becomes all zeros. Works on NumPy or JAX input, returns a JAX
    array; jittable.
    """
    X = jnp.asarray(X)
    nan = jnp.isnan(X)
    count = jnp.sum(~nan, axis=0)
    total = jnp.sum(jnp.where(nan, 0, X), axis=0)
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1), 0)
    return jnp.where(nan, mean.astype(X.dtype), X)


# ----------------------------------------------------------------------------- k-means


# Components are unrolled in Python (k is small and static): every per-sample quantity is a
# contiguous vector, which XLA vectorises far better than [N, k] arrays with a tiny minor axis.


def _chunk(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [N] -> (chunks [n_chunks, C], valid [n_chunks, C] bool), zero-padded at the end."""
    n = x.shape[0]
    c = min(CHUNK, n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    valid = (jnp.arange(n_chunks * c) < n).reshape(n_chunks, c)
    return jnp.pad(x, (0, pad)).reshape(n_chunks, c), valid


def _chunked_sum(fn, chunks: jax.Array, valid: jax.Array) -> jax.Array:
    """sum over chunks of fn(x_chunk, valid_chunk) (a vector of partial sums)."""
    if chunks.shape[0] == 1:
        return fn(chunks[0], valid[0])
    out = jax.eval_shape(fn, chunks[0], valid[0])

    def body(acc, xs):
        return acc + fn(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros(out.shape, out.dtype), (chunks, valid))
    return total


def _nearest(x: jax.Array, centres: jax.Array, k: int) -> jax.Array:
    """Index of the nearest centre for every x (ties to the lower index), int32."""
    best = (x - centres[0]) ** 2
    idx = jnp.zeros(x.shape, jnp.int32)
    for j in range(1, k):
        d = (x - centres[j]) ** 2
        closer = d < best
        idx = jnp.where(closer, j, idx)
        best = jnp.where(closer, d, best)
    return idx


def _kmeans_centres(chunks, valid, seeds: jax.Array, tol: jax.Array) -> jax.Array:
    """Lloyd k-means on chunked 1-D data from centres ``seeds`` [K]; returns final centres [K].

    scikit-learn stops when the labels do not change (strict convergence) or when the summed
    squared centre shift is <= tol. Unchanged labels give bit-identical centres, i.e. a shift of
    0 <= tol, so the shift test alone reproduces both rules without keeping the labels around.
    """
    k = seeds.shape[0]

    def cluster_sums(c, x, ok):
        idx = _nearest(x, c, k)
        out = []
        for j in range(k):
            member = (idx == j) & ok
            out += [jnp.sum(member.astype(x.dtype)), jnp.sum(jnp.where(member, x, 0))]
        return jnp.stack(out)

    def cond(state):
        i, _, done = state
        return (~done) & (i < KMEANS_MAX_ITER)

    def body(state):
        i, c, _ = state
        sums = _chunked_sum(partial(cluster_sums, c), chunks, valid).reshape(k, 2)
        count, total = sums[:, 0], sums[:, 1]
        new = jnp.where(count > 0, total / jnp.maximum(count, 1), c)
        return i + 1, new, jnp.sum((new - c) ** 2) <= tol

    _, centres, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), seeds, jnp.bool_(False)))
    return centres


def _quantile_seeds(x: jax.Array, k: int) -> jax.Array:
    q = (2.0 * np.arange(k) + 1.0) / (2.0 * k)
    return jnp.quantile(x, jnp.asarray(q, x.dtype))


def _random_seeds(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    n = x.shape[0]
    idx = jax.random.choice(key, n, shape=(k,), replace=n < k)
    return jnp.sort(x[idx])


def _n_local_trials(k: int) -> int:
    return 2 + int(np.log(k))


def _kmeanspp_draws(n: int, k: int, n_init: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy draws scikit-learn's GaussianMixture(random_state=seed) k-means++ makes.

    Returns first-centre indices [n_init] and uniforms [n_init, k - 1, n_local_trials].
    """
    rs = np.random.RandomState(seed)
    weights = np.ones(n, dtype=np.float64)
    first = np.empty(n_init, np.int32)
    uniforms = np.empty((n_init, max(k - 1, 0), _n_local_trials(k)), np.float64)
    for i in range(n_init):
        first[i] = rs.choice(n, p=weights / weights.sum())
        for c in range(k - 1):
            uniforms[i, c] = rs.uniform(size=_n_local_trials(k))
    return first, uniforms


def _kmeanspp_seeds(x: jax.Array, first: jax.Array, uniforms: jax.Array, k: int) -> jax.Array:
    """scikit-learn's greedy k-means++ on 1-D x [N] given its random draws; returns centres [K]."""
    n = x.shape[0]
    closest = (x - x[first]) ** 2
    pot = jnp.sum(closest)
    centres = [x[first]]
    for c in range(1, k):
        rand = uniforms[c - 1].astype(x.dtype) * pot
        # np.searchsorted(cumsum, rand) (side "left") == number of prefix sums below rand
        below = jnp.cumsum(closest)[None, :] < rand[:, None]
        cand = jnp.minimum(jnp.sum(below, axis=1, dtype=jnp.int32), n - 1)
        dist = jnp.minimum(closest[None, :], (x[None, :] - x[cand][:, None]) ** 2)
        pots = jnp.sum(dist, axis=1)
        best = jnp.argmin(pots)
        pot, closest = pots[best], dist[best]
        centres.append(x[cand[best]])
    return jnp.stack(centres)


# ----------------------------------------------------------------------------- EM


def _init_params(x, centres, reg, k):
    """scikit-learn's ``_initialize`` from one-hot k-means responsibilities: (w, mu, var).

    An empty cluster keeps its k-means centre as mean (scikit-learn gets 0 / 1e-15 = 0 there);
    this is what makes a constant column come out with two equal means.
    """
    n = x.shape[0]
    labels = _nearest(x, centres, k)
    nk, means, var = [], [], []
    for j in range(k):
        member = labels == j
        count = jnp.sum(member.astype(x.dtype))
        nj = count + _NK_EPS
        mu = jnp.where(count > 0, jnp.sum(jnp.where(member, x, 0)) / nj, centres[j])
        nk.append(nj)
        means.append(mu)
        var.append(jnp.sum(jnp.where(member, (x - mu) ** 2, 0)) / nj + reg)
    return jnp.stack(nk) / n, jnp.stack(means), jnp.stack(var)


def _log_resp(x, weights, means, var, k):
    """E-step pieces: ([log w_j + log N(x | mu_j, var_j) for each j], their logsumexp)."""
    const = jnp.log(weights) - 0.5 * (_LOG_2PI + jnp.log(var))
    half_prec = 0.5 / var
    wlp = [const[j] - (x - means[j]) ** 2 * half_prec[j] for j in range(k)]
    m = wlp[0]
    for j in range(1, k):
        m = jnp.maximum(m, wlp[j])
    lse = m + jnp.log(sum(jnp.exp(a - m) for a in wlp))
    return wlp, lse


def _em_step(chunks, valid, n, weights, means, var, reg, k):
    """One fused E+M step (a single pass over the data).

    Returns the mean log-likelihood of the incoming parameters (scikit-learn's lower bound) and
    the new (weights, means, variances). Moments are accumulated around the incoming means
    (shifted data), which keeps the one-pass variance accurate in float32.
    """

    def sums(x, ok):
        wlp, lse = _log_resp(x, weights, means, var, k)
        out = [jnp.sum(jnp.where(ok, lse, 0))]
        for j in range(k):
            r = jnp.where(ok, jnp.exp(wlp[j] - lse), 0)
            d = x - means[j]
            rd = r * d
            out += [jnp.sum(r), jnp.sum(rd), jnp.sum(rd * d)]
        return jnp.stack(out)

    total = _chunked_sum(sums, chunks, valid)
    moments = total[1:].reshape(k, 3)
    nk = moments[:, 0] + _NK_EPS
    s1 = moments[:, 1] / nk
    s2 = moments[:, 2] / nk
    new_var = jnp.maximum(s2 - s1 * s1, 0) + reg
    return total[0] / n, nk / jnp.sum(nk), means + s1, new_var


def _em_from_seeds(x, chunks, valid, seeds, reg, tol, km_tol, max_iter):
    """k-means init from ``seeds`` then EM; returns (weights, means, var, lower_bound, conv, n)."""
    k = seeds.shape[0]
    n = x.shape[0]
    weights, means, var = _init_params(x, _kmeans_centres(chunks, valid, seeds, km_tol), reg, k)

    def cond(state):
        i, _, _, _, _, conv = state
        return (~conv) & (i < max_iter)

    def body(state):
        i, w, mu, v, lb, _ = state
        lb_new, w, mu, v = _em_step(chunks, valid, n, w, mu, v, reg, k)
        return i + 1, w, mu, v, lb_new, jnp.abs(lb_new - lb) < tol

    init = (jnp.int32(0), weights, means, var, jnp.asarray(-jnp.inf, x.dtype), jnp.bool_(False))
    i, weights, means, var, lb, conv = jax.lax.while_loop(cond, body, init)
    return weights, means, var, lb, conv, i


def _fit_column(x, draws, tol, reg_covar, *, k, n_init, max_iter, init, return_posteriors):
    centre = jnp.mean(x)
    sd = jnp.std(x)
    scale = jnp.where(sd > 0, sd, 1.0).astype(x.dtype)
    z = (x - centre) / scale
    reg = reg_covar / scale**2
    km_tol = KMEANS_TOL * jnp.var(z)

    if init == "kmeans++":
        first, uniforms = draws
        seeds = [_kmeanspp_seeds(z, first[i], uniforms[i], k) for i in range(n_init)]
    else:
        seeds = [_quantile_seeds(z, k)]
        seeds += [_random_seeds(z, k, jax.random.fold_in(draws, i)) for i in range(1, n_init)]
    chunks, valid = _chunk(z)
    fit = partial(
        _em_from_seeds, z, chunks, valid, reg=reg, tol=tol, km_tol=km_tol, max_iter=max_iter
    )
    if n_init == 1:
        w, mu, var, lb, conv, n = fit(seeds[0])
    else:
        w, mu, var, lb, conv, n = jax.vmap(fit)(jnp.stack(seeds))
        best = jnp.argmax(jnp.where(jnp.isnan(lb), -jnp.inf, lb))  # first of ties wins
        w, mu, var, lb, conv, n = (a[best] for a in (w, mu, var, lb, conv, n))

    # final E-step, as scikit-learn's fit_predict; components sorted by mean
    order = jnp.argsort(mu, stable=True)
    w, mu, var = w[order], mu[order], var[order]
    wlp, lse = _log_resp(z, w, mu, var, k)
    ll = jnp.mean(lse)
    best = wlp[0]
    labels = jnp.zeros(z.shape, jnp.int32)
    for j in range(1, k):
        better = wlp[j] > best
        labels = jnp.where(better, j, labels)
        best = jnp.where(better, wlp[j], best)
    log_scale = jnp.log(scale)
    return GMMResult(
        weights=w,
        means=mu * scale + centre,
        variances=var * scale**2,
        log_likelihood=ll - log_scale,
        lower_bound=lb - log_scale,
        labels=labels,
        posteriors=jnp.stack([jnp.exp(a - lse) for a in wlp], axis=-1) if return_posteriors else None,
        converged=conv,
        n_iter=n,
    )


@partial(jax.jit, static_argnames=("k", "n_init", "init", "return_posteriors"))
def _fit_columns(X, draws, tol, reg_covar, max_iter, *, k, n_init, init, return_posteriors):
    X = fill_nan_with_column_mean(X)
    fit = partial(
        _fit_column, draws=draws, tol=tol, reg_covar=reg_covar, k=k, n_init=n_init,
        max_iter=max_iter, init=init, return_posteriors=return_posteriors,
    )
    return jax.vmap(fit)(X.T)


def _as_float(X) -> jax.Array:
    X = jnp.asarray(X)
    if not jnp.issubdtype(X.dtype, jnp.floating):
        return X.astype(jnp.float32)
    return X.astype(jnp.promote_types(X.dtype, jnp.float32))


def fit_gmm_columns(
    X,
    k: int = 2,
    *,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    n_init: int = 1,
    seed: int = 0,
    init: str = "kmeans++",
    return_posteriors: bool = True,
) -> GMMResult:
    """Fit a k-component 1-D Gaussian mixture to every column of X [N, L] in one jitted call.

    NaNs are replaced by their column's mean. Returns a ``GMMResult`` whose fields carry a
    leading column axis (see ``GMMResult``); components sorted by mean ascending.

    Options as scikit-learn's GaussianMixture (``seed`` plays ``random_state``); ``init`` is
    ``"kmeans++"`` (scikit-learn's k-means++ draws) or ``"quantile"`` (see the module docstring).
    Every column uses the same draws, as a loop of GaussianMixture(random_state=seed) would.
    """
    X = _as_float(X)
    if X.ndim != 2:
        raise ValueError(f"X must be [N, L], got shape {X.shape}")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must have at least one row and one column, got shape {X.shape}")
    if k < 1 or n_init < 1 or max_iter < 0:
        raise ValueError(f"need k >= 1, n_init >= 1, max_iter >= 0 (got {k}, {n_init}, {max_iter})")
    if init == "kmeans++":
        first, uniforms = _kmeanspp_draws(X.shape[0], int(k), int(n_init), seed)
        draws = (jnp.asarray(first), jnp.asarray(uniforms, X.dtype))
    elif init == "quantile":
        draws = jax.random.PRNGKey(seed)
    else:
        raise ValueError(f"init must be 'kmeans++' or 'quantile', got {init!r}")
    return _fit_columns(
        X, draws, jnp.asarray(tol, X.dtype), jnp.asarray(reg_covar, X.dtype),
        jnp.asarray(max_iter, jnp.int32), k=int(k), n_init=int(n_init), init=init,
        return_posteriors=bool(return_posteriors),
    )


def fit_gmm_1d(
    x,
    k: int = 2,
    *,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    n_init: int = 1,
    seed: int = 0,
    init: str = "kmeans++",
    return_posteriors: bool = True,
) -> GMMResult:
    """Fit a k-component Gaussian mixture to 1-D data x [N] (NaNs -> mean of x).

    Same options as scikit-learn's GaussianMixture; components sorted by mean ascending.
    """
    x = _as_float(x)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    res = fit_gmm_columns(
        x[:, None], k, tol=tol, reg_covar=reg_covar, max_iter=max_iter, n_init=n_init, seed=seed,
        init=init, return_posteriors=return_posteriors,
    )
    return res.column(0)
