"""Pure-JAX 1-D GMM (bye_jax.gmm) against scikit-learn's GaussianMixture."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from bye_jax.gmm import fill_nan_with_column_mean, fit_gmm_1d, fit_gmm_columns

N = 500  # most tests share this length so that one compiled program serves them


def sk_fit(x, n_init=1, **kw):
    """scikit-learn's fit, components sorted by mean, labels mapped to the sorted order."""
    x = np.asarray(x, np.float64)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        g = GaussianMixture(n_components=2, random_state=0, n_init=n_init, **kw).fit(x)
    order = np.argsort(g.means_.ravel())
    rank = np.argsort(order)
    return {
        "weights": g.weights_[order],
        "means": g.means_.ravel()[order],
        "variances": g.covariances_.ravel()[order],
        "labels": rank[g.predict(x)],
        "score": g.score(x),
        "lower_bound": g.lower_bound_,
        "n_iter": g.n_iter_,
        "converged": g.converged_,
    }


def assert_matches_sklearn(res, ref, x, *, labels=True):
    scale = np.std(x) or 1.0
    np.testing.assert_allclose(np.asarray(res.means), ref["means"], rtol=1e-3, atol=1e-3 * scale)
    np.testing.assert_allclose(np.asarray(res.variances), ref["variances"], rtol=1e-3)
    np.testing.assert_allclose(np.asarray(res.weights), ref["weights"], atol=1e-3)
    assert float(res.log_likelihood) == pytest.approx(ref["score"], abs=1e-4)
    assert float(res.lower_bound) == pytest.approx(ref["lower_bound"], abs=1e-4)
    if labels:
        np.testing.assert_array_equal(np.asarray(res.labels), ref["labels"])


def mixture(rng, n, frac, mu=(2.0, 5.5), sd=(0.3, 0.25)):
    m = int(round(n * frac))
    x = np.concatenate([rng.normal(mu[0], sd[0], m), rng.normal(mu[1], sd[1], n - m)])
    return rng.permutation(x)


def test_fixed_data_matches_sklearn():
    x = np.array([0.9, 4.9, 1.1, 5.2, 5.0, 1.0, 5.4, 4.7, 5.1])
    res = fit_gmm_1d(x)
    ref = sk_fit(x)
    assert_matches_sklearn(res, ref, x)
    assert int(res.n_iter) == ref["n_iter"] and bool(res.converged)
    np.testing.assert_array_equal(np.asarray(res.labels), (x > 3).astype(int))


@pytest.mark.parametrize("seed", range(4))
def test_random_mixtures_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    frac = [0.1, 0.3, 0.5, 0.05][seed]
    scale, shift = [(1.0, 0.0), (100.0, -7.0), (0.01, 3.0), (1.0, 0.0)][seed]
    x = mixture(rng, N, frac) * scale + shift
    res = fit_gmm_1d(x)
    ref = sk_fit(x)
    assert_matches_sklearn(res, ref, x)  # well separated: same labels
    assert int(res.n_iter) == ref["n_iter"]


@pytest.mark.parametrize("kind", ["overlapping", "normal", "uniform", "exponential"])
def test_hard_shapes_match_sklearn(kind):
    """Overlapping / unimodal data: EM stops on tol, so the trajectory must match too."""
    rng = np.random.default_rng(7)
    x = {
        "overlapping": lambda: mixture(rng, N, 0.3, mu=(0.0, 1.5), sd=(1.0, 0.7)),
        "normal": lambda: rng.normal(size=N),
        "uniform": lambda: rng.uniform(size=N),
        "exponential": lambda: 3.0 + 5.0 * rng.exponential(size=N),
    }[kind]()
    res = fit_gmm_1d(x)
    ref = sk_fit(x)
    assert_matches_sklearn(res, ref, x, labels=False)
    # labels agree except possibly for points sitting on the decision boundary
    assert np.mean(np.asarray(res.labels) != ref["labels"]) <= 0.01
    assert int(res.n_iter) == ref["n_iter"]


def test_n_init_matches_sklearn():
    rng = np.random.default_rng(11)
    x = mixture(rng, N, 0.3, mu=(0.0, 1.5), sd=(1.0, 0.7))
    res = fit_gmm_1d(x, n_init=3)
    ref = sk_fit(x, n_init=3)
    assert_matches_sklearn(res, ref, x, labels=False)


def test_options_tol_reg_max_iter():
    rng = np.random.default_rng(12)
    x = mixture(rng, N, 0.3, mu=(0.0, 1.5), sd=(1.0, 0.7))
    res = fit_gmm_1d(x, tol=1e-6, reg_covar=1e-2, max_iter=5)
    ref = sk_fit(x, tol=1e-6, reg_covar=1e-2, max_iter=5)
    assert_matches_sklearn(res, ref, x, labels=False)
    assert int(res.n_iter) == 5 and not bool(res.converged) and not ref["converged"]


def test_result_structure():
    rng = np.random.default_rng(13)
    x = mixture(rng, N, 0.2)
    res = fit_gmm_1d(x)
    assert np.all(np.diff(np.asarray(res.means)) >= 0)  # sorted by mean
    post = np.asarray(res.posteriors)
    assert post.shape == (N, 2)
    np.testing.assert_allclose(post.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.labels), post.argmax(axis=1))
    assert float(np.sum(res.weights)) == pytest.approx(1.0, abs=1e-6)
    # quantile-seeded k-means reaches the same fit on well-separated data
    q = fit_gmm_1d(x, init="quantile")
    np.testing.assert_allclose(np.asarray(q.means), np.asarray(res.means), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(q.labels), np.asarray(res.labels))
    with pytest.raises(ValueError):
        fit_gmm_1d(x, init="random")
    with pytest.raises(ValueError):
        fit_gmm_columns(x)  # 1-D input to the matrix API


def test_constant_column():
    x = np.full(N, 3.7)
    res = fit_gmm_1d(x)
    for field in ("weights", "means", "variances", "posteriors", "log_likelihood"):
        assert np.all(np.isfinite(np.asarray(getattr(res, field)))), field
    np.testing.assert_allclose(np.asarray(res.means), [3.7, 3.7], rtol=1e-6)
    assert float(res.means[0]) == float(res.means[1])
    np.testing.assert_allclose(np.asarray(res.variances), [1e-6, 1e-6], rtol=1e-4)
    assert np.unique(np.asarray(res.labels)).size == 1
    zero = fit_gmm_1d(np.zeros(N), reg_covar=1e-3)
    np.testing.assert_allclose(np.asarray(zero.means), [0.0, 0.0])
    np.testing.assert_allclose(np.asarray(zero.variances), [1e-3, 1e-3], rtol=1e-5)


def test_nan_replaced_by_column_mean():
    rng = np.random.default_rng(14)
    X = np.stack([mixture(rng, N, 0.1), rng.normal(size=N), np.full(N, np.nan),
                  mixture(rng, N, 0.3), rng.uniform(size=N), np.full(N, 1.5)], axis=1)
    X[[3, 50, 499], 0] = np.nan
    X[7, 1] = np.nan
    X[::2, 3] = np.nan
    filled = np.asarray(fill_nan_with_column_mean(X))
    assert not np.isnan(filled).any()
    np.testing.assert_allclose(filled[[3, 50, 499], 0], np.nanmean(X[:, 0]), rtol=1e-6)
    assert filled[7, 1] == pytest.approx(np.nanmean(X[:, 1]), rel=1e-6)
    np.testing.assert_array_equal(filled[:, 2], 0.0)  # all-NaN column -> 0

    res = fit_gmm_columns(X)
    ref = fit_gmm_columns(filled)
    for a, b in zip(res, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.isfinite(np.asarray(res.means)))
    assert np.all(np.isfinite(np.asarray(res.variances)))
    assert_matches_sklearn(res.column(0), sk_fit(filled[:, 0]), filled[:, 0])


def test_small_n():
    rng = np.random.default_rng(15)
    for n in (5, 9):
        for x in (mixture(rng, n, 0.4, sd=(0.1, 0.1)), rng.normal(size=n)):
            res = fit_gmm_1d(x)
            assert_matches_sklearn(res, sk_fit(x), x, labels=False)
    one = fit_gmm_1d(np.array([2.5]))  # N = 1 < k
    assert np.all(np.isfinite(np.asarray(one.means)))
    np.testing.assert_allclose(np.asarray(one.means), [2.5, 2.5])
    np.testing.assert_allclose(np.asarray(one.variances), [1e-6, 1e-6], rtol=1e-4)
    with pytest.raises(ValueError):
        fit_gmm_columns(np.zeros((0, 3)))


def test_columns_in_one_call_equal_per_column_calls():
    rng = np.random.default_rng(16)
    X = np.stack([
        mixture(rng, N, 0.1),
        rng.normal(size=N),
        mixture(rng, N, 0.4, mu=(-3.0, 10.0), sd=(1.0, 2.0)),
        np.full(N, -2.0),
        rng.uniform(size=N),
        3.0 + 5.0 * rng.exponential(size=N),
    ], axis=1)
    res = fit_gmm_columns(X)
    assert res.means.shape == (6, 2) and res.labels.shape == (6, N)
    assert res.posteriors.shape == (6, N, 2)
    for j in range(X.shape[1]):
        one = fit_gmm_1d(X[:, j])
        col = res.column(j)
        for name in ("weights", "means", "variances", "log_likelihood", "posteriors"):
            np.testing.assert_allclose(np.asarray(getattr(col, name)),
                                       np.asarray(getattr(one, name)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(col.labels), np.asarray(one.labels))
        assert int(col.n_iter) == int(one.n_iter)
        if j != 3:  # sklearn puts an empty component of a constant column at 0 (we don't)
            assert_matches_sklearn(col, sk_fit(X[:, j]), X[:, j], labels=j in (0, 2))
