"""BYE detection (bye_jax.detect) against a scikit-learn re-implementation of the reference."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from bye_jax.detect import (
    DETECTORS,
    MIN_SAMPLES,
    NO_EVIDENCE,
    NOT_ENOUGH,
    RULES,
    Detection,
    LayerStats,
    detect,
    fill_nan_with_layer_mean,
    get_detector,
    json_safe,
    layer_stats,
    official_rule,
    paper_rule,
    precision_recall_f1,
    select_layers,
)

N, L = 500, 12
POISON_LAYERS = (2, 5, 9)


def sk_gmm(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(n_components=2, random_state=0).fit(np.asarray(x, float)[:, None])


def reference_detect(X, tau=2.0):
    """The reference clustering script, restated with scikit-learn (NaN -> layer mean)."""
    X = np.array(X, float)
    col_mean = np.nanmean(X, axis=0)
    X = np.where(np.isnan(X), col_mean, X)
    sensitive, stats = [], []
    for layer in range(X.shape[1]):
        g = sk_gmm(X[:, layer])
        mu = g.means_.ravel()
        sd = np.sqrt(g.covariances_.ravel())
        stats.append((np.sort(mu), sd[np.argsort(mu)]))
        if abs(mu[0] - mu[1]) > tau * (sd[0] + sd[1]):
            sensitive.append(layer)
    if not sensitive:
        return [], np.array([], int), stats
    scores = X[:, sensitive].mean(axis=1)
    g = sk_gmm(scores)
    labels = g.predict(scores[:, None])
    low = int(np.argmin(g.means_.ravel()))
    return sensitive, np.flatnonzero(labels == low), stats


def synthetic(seed, *, poison_mu=2.0, poison_sd=0.4, rate=0.1, nan=True):
    """Entropy-like matrix: clean layers unimodal, poisoned samples low in POISON_LAYERS."""
    rng = np.random.default_rng(seed)
    X = rng.normal(rng.uniform(4.5, 6.0, L), rng.uniform(0.15, 0.4, L), size=(N, L))
    poisoned = rng.permutation(N) < int(rate * N)
    for layer in POISON_LAYERS:
        X[poisoned, layer] = rng.normal(poison_mu, poison_sd, poisoned.sum())
    if nan:
        X[rng.integers(0, N, 5), rng.integers(0, L, 5)] = np.nan
    ids = [f"poison_{i}" if p else f"clean_{i}" for i, p in enumerate(poisoned)]
    return X, ids, poisoned


@pytest.mark.parametrize(
    "seed, kw, expected_layers",
    [
        (0, {}, [2, 5, 9]),
        (1, {}, [2, 5, 9]),
        (2, {"rate": 0.05}, [2, 5, 9]),
        # weak poison: only layer 2 passes (the others are >= 0.2 away from the threshold),
        # one poisoned sample is missed; we must agree with scikit-learn on all of it
        (3, {"poison_mu": 3.8, "poison_sd": 0.35}, [2]),
        (10, {"poison_mu": 3.5, "poison_sd": 0.4}, [2, 9]),
    ],
)
def test_matches_sklearn_reference(seed, kw, expected_layers):
    X, ids, poisoned = synthetic(seed, **kw)
    ref_layers, ref_flagged, ref_stats = reference_detect(X)
    det = detect(X, ids)
    assert isinstance(det, Detection)
    assert det.reason is None
    assert ref_layers == expected_layers
    assert det.sensitive_layers == ref_layers
    assert det.flagged_ids == [ids[i] for i in ref_flagged]
    np.testing.assert_array_equal(np.flatnonzero(det.flagged), ref_flagged)
    for layer, (mu, sd) in enumerate(ref_stats):
        st = det.layer_stats[layer]
        assert st["layer"] == layer
        np.testing.assert_allclose(st["means"], mu, rtol=1e-3)
        np.testing.assert_allclose(st["stds"], sd, rtol=1e-3)
    true_ids = [i for i, p in zip(ids, poisoned, strict=True) if p]
    m = precision_recall_f1(det.flagged_ids, true_ids)
    if seed < 3:  # well separated: perfect detection
        assert m["f1"] == 1.0
    else:
        assert m["precision"] == 1.0 and m["recall"] >= 0.95


def test_tau_zero_selects_every_layer_like_sklearn():
    X, ids, _ = synthetic(4)
    ref_layers, ref_flagged, _ = reference_detect(X, tau=0.0)
    det = detect(X, ids, tau=0.0)
    assert det.sensitive_layers == ref_layers == list(range(L))
    np.testing.assert_array_equal(np.flatnonzero(det.flagged), ref_flagged)


def test_layer_stats_fields():
    X, _, _ = synthetic(0, nan=False)
    stats = layer_stats(X)
    for layer in range(L):
        g = sk_gmm(X[:, layer])
        order = np.argsort(g.means_.ravel())
        mu = g.means_.ravel()[order]
        sd = np.sqrt(g.covariances_.ravel())[order]
        w = g.weights_[order]
        np.testing.assert_allclose(stats.means[layer], mu, rtol=1e-3)
        np.testing.assert_allclose(stats.stds[layer], sd, rtol=1e-3)
        np.testing.assert_allclose(stats.weights[layer], w, atol=1e-3)
        gap = mu[1] - mu[0]
        assert stats.bsi[layer] == pytest.approx(gap / np.hypot(sd[0], sd[1]), rel=1e-3)
        assert stats.official_sep[layer] == pytest.approx(gap / (sd[0] + sd[1]), rel=1e-3)
        kl = np.log(sd[1] / sd[0]) + (sd[0] ** 2 + gap**2) / (2 * sd[1] ** 2) - 0.5
        assert stats.kl[layer] == pytest.approx(kl, rel=1e-3)
    dicts = stats.to_dicts()
    assert len(dicts) == L
    assert {"layer", "means", "stds", "weights", "bsi", "kl"} <= set(dicts[0])


def test_no_sensitive_layer_flags_nothing():
    rng = np.random.default_rng(5)
    X = rng.normal(5.5, 0.3, size=(N, L))
    ref_layers, _, _ = reference_detect(X)
    assert ref_layers == []  # the reference would crash here
    det = detect(X, [f"s{i}" for i in range(N)])
    assert det.sensitive_layers == []
    assert det.flagged_ids == [] and det.n_flagged == 0 and not det.flagged.any()
    assert det.scores is None and det.score_gmm is None
    assert isinstance(det.reason, str) and "no sensitive layer" in det.reason
    assert len(det.layer_stats) == L
    report = det.to_report()
    assert report["n_flagged"] == 0 and report["sensitive_layers"] == []


def test_paper_rule_differs_on_constructed_layer():
    """A 50/50 layer with |mu1 - mu2| = 3.5 sd: official ratio 1.75 (< 2), BSI 2.47 (>= 2)."""
    X, ids, _ = synthetic(6, nan=False)
    rng = np.random.default_rng(6)
    half = rng.permutation(N) < N // 2
    X[:, 7] = np.where(half, rng.normal(5.5, 0.3, N), rng.normal(5.5 - 3.5 * 0.3, 0.3, N))
    stats = layer_stats(X)
    assert 1.5 < stats.official_sep[7] < 1.95 and stats.bsi[7] > 2.2

    official = detect(X, ids, rule="official")
    paper = detect(X, ids, rule="paper")
    assert official.sensitive_layers == list(POISON_LAYERS)
    assert paper.sensitive_layers == sorted([*POISON_LAYERS, 7])
    assert reference_detect(X)[0] == official.sensitive_layers
    assert paper.rule == "paper" and official.rule == "official"


def test_rules_registry_and_errors():
    assert set(RULES) >= {"official", "paper"}
    X, ids, _ = synthetic(0)
    with pytest.raises(ValueError, match="unknown rule"):
        detect(X, ids, rule="nope")
    with pytest.raises(ValueError):
        detect(X, ids[:-1])
    with pytest.raises(ValueError):
        detect(np.zeros(5))


def test_nan_handling_and_default_ids():
    X, ids, _ = synthetic(0)
    assert np.isnan(X).any()
    filled = fill_nan_with_layer_mean(X)
    assert not np.isnan(filled).any()
    nan_rows, nan_cols = np.nonzero(np.isnan(X))
    np.testing.assert_allclose(filled[nan_rows, nan_cols], np.nanmean(X, axis=0)[nan_cols])
    det = detect(X)
    det_filled = detect(filled, list(range(N)))
    assert det.flagged_ids == det_filled.flagged_ids
    assert all(isinstance(i, int) for i in det.flagged_ids)
    np.testing.assert_allclose(det.scores, filled[:, list(POISON_LAYERS)].mean(axis=1))
    assert np.isfinite(det.scores).all()


def test_report_fields():
    X, ids, _ = synthetic(1)
    report = detect(X, ids).to_report()
    for key in ("sensitive_layers", "layer_stats", "flagged_ids", "n_flagged", "num_layers"):
        assert key in report
    assert report["num_layers"] == L
    assert report["n_flagged"] == len(report["flagged_ids"])
    import json

    json.dumps(report)  # JSON-ready


def test_precision_recall_f1():
    m = precision_recall_f1(["a", "b", "c", "d"], ["a", "b", "e"])
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    perfect = precision_recall_f1([1, 2], {2, 1})
    assert perfect["precision"] == perfect["recall"] == perfect["f1"] == 1.0
    nothing_flagged = precision_recall_f1([], ["a"])
    assert nothing_flagged["precision"] == 0.0 and nothing_flagged["recall"] == 0.0
    assert nothing_flagged["f1"] == 0.0
    clean = precision_recall_f1([], [])
    assert clean == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}
    no_hit = precision_recall_f1(["x"], ["y"])
    assert no_hit["f1"] == 0.0 and no_hit["precision"] == 0.0


def _stats(means, stds, bsi):
    means, stds = np.asarray(means, float), np.asarray(stds, float)
    gap = np.abs(means[:, 1] - means[:, 0])
    return LayerStats(means=means, stds=stds, weights=np.full(means.shape, 0.5), bsi=np.asarray(bsi, float),
                      official_sep=gap / stds.sum(axis=1), kl=np.zeros(len(means)))


def test_official_rule_boundary_is_strict():
    """Exactly at |mu1 - mu2| == tau (sd1 + sd2) a layer is NOT sensitive (the reference's `>`)."""
    stats = _stats([[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]], [[0.5, 0.5], [0.5, 0.4999], [0.5, 0.5001]], [0, 0, 0])
    assert official_rule(stats, 2.0).tolist() == [False, True, False]
    assert select_layers(stats, "official", 2.0) == [1]


def test_paper_rule_boundary_is_inclusive():
    """Exactly at BSI == tau a layer IS sensitive (the paper's `>=`)."""
    stats = _stats([[1.0, 3.0]] * 3, [[0.5, 0.5]] * 3, [2.0, 1.9999999, 2.0000001])
    assert paper_rule(stats, 2.0).tolist() == [True, False, True]
    assert select_layers(stats, "paper", 2.0) == [0, 2]


@pytest.mark.parametrize("tau", [float("nan"), -0.5, float("inf"), "two"])
def test_bad_tau_is_refused(tau):
    X, ids, _ = synthetic(0)
    with pytest.raises(ValueError, match="tau"):
        detect(X, ids, tau=tau)


def test_infinite_entropy_is_refused_not_used():
    X, ids, _ = synthetic(0)
    X[3, 2] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        detect(X, ids)


@pytest.mark.parametrize("rule", ["official", "paper", "robust"])
def test_too_few_rows_flag_nothing(rule):
    X, ids, _ = synthetic(0)
    det = detect(X[:MIN_SAMPLES - 1], ids[:MIN_SAMPLES - 1], rule)
    assert det.verdict == NOT_ENOUGH and det.n_flagged == 0 and not det.flagged.any()
    assert "samples" in det.reason


def test_verdicts_and_strict_json_report():
    X, ids, poisoned = synthetic(1)
    det = detect(X, ids)
    assert det.verdict == f"{int(poisoned.sum())} samples flagged; evidence in layers [2, 5, 9] (signal: entropy)"
    report = det.to_report()
    assert report["detector"] == "official" and report["verdict"] == det.verdict
    assert report["layer_statistic"]["values"] == pytest.approx([s["official_sep"] for s in report["layer_stats"]])
    assert report["layer_statistic"]["thresholds"] == [2.0] * L
    rng = np.random.default_rng(5)
    clean = detect(rng.normal(5.5, 0.3, size=(N, L)))
    assert clean.verdict == NO_EVIDENCE
    assert json_safe({"a": [float("nan"), np.float32(np.inf), np.int64(3)]}) == {"a": [None, None, 3]}
    import json

    json.dumps(report, allow_nan=False)


def test_registry_lists_every_detector_with_a_config_section():
    from bye_jax.configs.llava import get_config

    c = get_config()
    assert c.detect.rule == "combined"
    for name, det in DETECTORS.items():
        assert get_detector(name) is det
        assert c.detect[name].to_dict() == det.defaults
    with pytest.raises(ValueError, match="unknown"):
        get_detector("nope")
