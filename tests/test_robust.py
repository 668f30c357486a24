"""The robust detector on synthetic signal tables with known answers (bye_jax/detect/robust.py).

Entropies are drawn per layer in nats for 81 image tokens (ln 81 = 4.39, the demo's 9 x 9 grid).
Every table has N = 1000 rows and 6 layers, so the jitted mixture fits compile once for the file.
"""

import json
import math

import numpy as np
import pytest

from bye_jax.detect import DETECTORS, NO_EVIDENCE, NOT_ENOUGH, detect, precision_recall_f1
from bye_jax.signals import SignalTable

N, L = 1000, 6
HMAX = math.log(81)


def _clean(kind, rng):
    """[N, L] clean entropies of one family."""
    if kind == "unimodal":
        X = rng.normal(rng.uniform(1.5, 3.5, L), rng.uniform(0.1, 0.4, L), (N, L))
    elif kind == "bimodal":  # two clean modes (the demo's colours), each >= 40% of the upload
        low = rng.random((N, 1)) < rng.uniform(0.4, 0.6, L)
        X = np.where(low, rng.normal(1.8, 0.15, (N, L)), rng.normal(3.8, 0.2, (N, L)))
    elif kind == "heavy":  # Student-t (3 dof) tails on the log scale, reflected below ln 81 (no pile-up there)
        X = np.exp(np.log(rng.uniform(1.5, 3.0, L)) + 0.12 * rng.standard_t(3, (N, L)))
        X = HMAX - np.abs(HMAX - X)
    elif kind == "wide":
        X = rng.uniform(0.3, 4.3, (N, L))
    elif kind == "undertrained":  # attention nearly flat everywhere
        X = HMAX - np.abs(rng.normal(0.0, 0.03, (N, L)))
    else:
        raise KeyError(kind)
    return np.clip(X, 0.0, HMAX)


def _poison(X, rng, rate, layers, *, low=True):
    """Poisons round(rate * N) rows: an attention collapse (entropy ~0.01-0.3 nats) in `layers`, or with
    low=False a spread to nearly uniform (entropy within 0.01-0.03 of ln 81)."""
    y = rng.permutation(N) < int(round(rate * N))
    for layer in layers:
        k = int(y.sum())
        X[y, layer] = (np.exp(rng.normal(np.log(0.05), 0.8, k)).clip(1e-4, 0.4) if low
                       else HMAX - rng.uniform(0.01, 0.03, k))
    ids = [f"poison_{i}" if p else f"clean_{i}" for i, p in enumerate(y)]
    return X, ids, y


def _table(X, ids=None, norm=False, **signals):
    arrays = {"entropy": np.asarray(X, np.float32), **signals}
    if norm:
        arrays["entropy_norm"] = np.asarray(X / HMAX, np.float32)
    return SignalTable([str(i) for i in range(len(X))] if ids is None else ids, arrays)


def _f1(det, ids, y):
    return precision_recall_f1(det.flagged_ids, [i for i, p in zip(ids, y, strict=True) if p])["f1"]


@pytest.mark.parametrize("kind", ["unimodal", "bimodal", "heavy", "wide", "undertrained"])
def test_clean_uploads_give_no_evidence(kind):
    """False-alarm bound: on clean tables (entropies alone and with entropy_norm), over seeds, nothing
    beyond 1% is flagged and the verdict is 'no evidence of poisoning'."""
    for seed in range(4):
        X = _clean(kind, np.random.default_rng(seed))
        for norm in (False, True):
            det = detect(_table(X, norm=norm), rule="robust")
            assert det.verdict == NO_EVIDENCE, (kind, seed, norm, det.verdict)
            assert det.n_flagged <= 0.01 * N


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.3])
def test_low_entropy_minority_found_over_multimodal_clean(rate):
    rng = np.random.default_rng(11)
    X, ids, y = _poison(_clean("bimodal", rng), rng, rate, layers=(1, 4))
    det = detect(_table(X, ids), rule="robust")
    assert _f1(det, ids, y) >= 0.97, det.verdict
    assert det.sensitive_layers == [1, 4]
    assert det.verdict == f"{det.n_flagged} samples flagged; evidence in layers [1, 4] (signal: entropy (low side))"
    official = detect(X, ids, "official")  # the reference rule splits the clean modes instead
    assert _f1(official, ids, y) < _f1(det, ids, y) - 0.3


def test_poison_in_one_layer_of_six_heavy_tailed_clean():
    rng = np.random.default_rng(3)
    X, ids, y = _poison(_clean("heavy", rng), rng, 0.05, layers=(5,))
    det = detect(_table(X, ids), rule="robust")
    assert det.sensitive_layers == [5]
    assert _f1(det, ids, y) >= 0.97
    stat = det.layer_statistic
    assert stat[5] > det.layer_threshold[5] and all(s is None or s <= 2.0 or i == 5 for i, s in enumerate(stat))


def test_higher_entropy_poison_found_with_entropy_norm_only():
    """A tight group near uniform attention: the high side is tested when the table knows ln(image tokens)."""
    rng = np.random.default_rng(5)
    X = _clean("unimodal", rng)
    X[:, 2] = rng.normal(2.0, 0.4, N).clip(0.0, HMAX)
    X, ids, y = _poison(X, rng, 0.1, layers=(2,), low=False)
    with_norm = detect(_table(X, ids, norm=True), rule="robust")
    assert with_norm.sensitive_layers == [2] and "high side" in with_norm.verdict
    assert _f1(with_norm, ids, y) >= 0.97
    alone = detect(_table(X, ids), rule="robust")  # entropy alone: the high side is not tested
    assert alone.verdict == NO_EVIDENCE and alone.extra["sides"] == ["low"]


def test_location_signal_keeps_trigger_group_and_drops_clean_narrow_attention():
    rng = np.random.default_rng(7)
    X, ids, y = _poison(_clean("unimodal", rng), rng, 0.1, layers=(0, 3))
    centroid = rng.uniform(0, 1, (N, L, 2)).astype(np.float32)
    centroid[y] = 0.5 + rng.normal(0, 0.02, (int(y.sum()), L, 2))   # the trigger's place, every poisoned sample
    content = rng.normal(0, 1, (N, L, 8)).astype(np.float16)
    content[y] = (np.ones(8) + rng.normal(0, 0.05, (int(y.sum()), L, 8))).astype(np.float16)
    det = detect(_table(X, ids, centroid=centroid, content=content), rule="robust")
    assert _f1(det, ids, y) >= 0.97 and "shared" in det.verdict
    assert det.extra["location"]["ratio"] < 0.2

    # the same low-entropy group attending all over the picture, to unrelated content: not a trigger
    spread = rng.uniform(0, 1, (N, L, 2)).astype(np.float32)
    noise = rng.normal(0, 1, (N, L, 8)).astype(np.float16)
    det = detect(_table(X, ids, centroid=spread, content=noise), rule="robust")
    assert det.verdict == NO_EVIDENCE and det.n_flagged == 0
    assert "neither a location nor a content" in det.reason


def test_not_enough_samples_and_registry():
    X = _clean("unimodal", np.random.default_rng(0))[:15]
    det = detect(X, rule="robust")
    assert det.verdict == NOT_ENOUGH and det.n_flagged == 0 and not det.flagged.any()
    assert {"official", "paper", "robust"} <= set(DETECTORS)
    assert DETECTORS["robust"].defaults["min_share"] == 0.005
    with pytest.raises(ValueError, match="no parameter"):
        detect(_clean("unimodal", np.random.default_rng(0)), rule="robust", params={"nope": 1})


def test_parameters_change_the_decision_and_reach_the_report():
    rng = np.random.default_rng(2)
    X, ids, y = _poison(_clean("unimodal", rng), rng, 0.1, layers=(2,))
    assert detect(_table(X, ids), rule="robust").n_flagged == int(y.sum())
    strict = detect(_table(X, ids), rule="robust", params={"max_share": 0.05})  # a 10% group is too large
    assert strict.verdict == NO_EVIDENCE
    report = strict.to_report()
    assert report["detector"] == report["rule"] == "robust" and report["params"]["max_share"] == 0.05
    assert len(report["layer_statistic"]["values"]) == L == len(report["layer_statistic"]["thresholds"])
    json.dumps(report, allow_nan=False)
