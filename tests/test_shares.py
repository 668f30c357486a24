"""The shares detector (bye_jax/detect/shares.py) on synthetic share tables with known answers.

A table: N samples x L layers x H heads x 4 segments (system, image, user, answer), drawn on the
logit scale per head (a head's own profile + a continuous factor shared by every head, e.g. prompt
length + Student-t noise) and softmaxed, stored as float16 like extraction does. Clean tables are
multi-modal: in half of the heads an independent subgroup (10-40% of the samples, its own per head)
shifts one segment. A trigger moves the same poisoned samples in a few heads. Every table has
N = 500 rows and 3 x 6 heads, so the jitted mixture fit compiles once for the file. A trigger moves 6
heads: some of them also hold a clean subgroup, which with heavy tails needs more than the 3
components a column may have, so not every shifted head is selected.
"""

import json

import numpy as np
import pytest

from bye_jax.detect import NO_EVIDENCE, detect, precision_recall_f1
from bye_jax.detect.shares import NO_SHARES, dawid_skene
from bye_jax.signals import SHARE_SEGMENTS, SignalTable

N, L, H = 500, 3, 6
SEEDS = 20
IMAGE, USER = SHARE_SEGMENTS.index("image"), SHARE_SEGMENTS.index("user")


def share_table(seed, *, rate=0.0, heads=6, segment=IMAGE, shift=2.5, multimodal=True, dof=4):
    """(SignalTable, poisoned ids): `heads` random heads shift `segment` of the poisoned rows by `shift`
    on the logit scale."""
    rng = np.random.default_rng(seed)
    profile = rng.normal(0.0, 1.0, (L, H, 4))
    factor = rng.normal(0.0, 1.0, (N, 1, 1, 1)) * rng.normal(0.0, 0.3, (L, H, 4))
    logits = profile + factor + 0.25 * rng.standard_t(dof, (N, L, H, 4))
    if multimodal:
        for flat in rng.choice(L * H, L * H // 2, replace=False):
            group = rng.random(N) < rng.uniform(0.1, 0.4)
            logits[group, flat // H, flat % H, rng.integers(4)] += rng.choice([-1, 1]) * rng.uniform(1.5, 3.0)
    poisoned = rng.choice(N, int(round(rate * N)), replace=False)
    for flat in rng.choice(L * H, heads, replace=False):
        logits[poisoned[:, None], flat // H, flat % H, segment] += shift
    sh = np.exp(logits - logits.max(-1, keepdims=True))
    sh = (sh / sh.sum(-1, keepdims=True)).astype(np.float16)
    ids = [f"s{i}" for i in range(N)]
    entropy = rng.uniform(1.0, 3.0, (N, L)).astype(np.float32)
    return SignalTable(ids, {"entropy": entropy, "shares": sh}), [ids[i] for i in poisoned]


@pytest.mark.parametrize("rate,segment", [(0.03, IMAGE), (0.10, IMAGE), (0.30, IMAGE), (0.10, USER)])
def test_poisoned_minority_in_a_few_heads_is_found(rate, segment):
    table, poisoned = share_table(11, rate=rate, segment=segment)
    det = detect(table, rule="shares")
    m = precision_recall_f1(det.flagged_ids, poisoned)
    assert m["f1"] >= 0.95, (m, det.reason)
    assert det.verdict.startswith(f"{len(det.flagged_ids)} samples flagged") and "heads" in det.verdict
    assert len(det.extra["groups"][0]["heads"]) >= 3  # the shifted heads agree (min_heads = 3)
    assert det.scores.shape == (N,) and not det.score_low_is_suspect
    kept = {tuple(h) for h in det.extra["groups"][0]["heads"]}
    assert all(layer in det.sensitive_layers for layer, _ in kept)
    report = json.loads(json.dumps(det.to_report(), allow_nan=False))  # strict JSON
    assert report["detector"] == "shares" and report["n_flagged"] == len(det.flagged_ids)


def test_clean_multimodal_tables_stay_quiet_over_many_seeds():
    """The false-alarm bound: <= 1% flagged on every clean table (multi-modal, heavy-tailed)."""
    rates, selected = [], 0
    for seed in range(SEEDS):
        table, _ = share_table(1000 + seed)
        det = detect(table, rule="shares")
        rates.append(len(det.flagged_ids) / N)
        selected += len(det.extra["selected"])
        if not det.flagged_ids:
            assert det.verdict == NO_EVIDENCE
    assert max(rates) <= 0.01, rates
    assert selected > SEEDS * 4  # the clean modes are there (each head's own subgroup passes selection) ...
    # ... and are no evidence because no three heads see the same samples


def test_a_minority_seen_by_too_few_heads_is_no_evidence():
    table, _ = share_table(7, rate=0.1, heads=2, multimodal=False)
    det = detect(table, rule="shares")
    assert det.flagged_ids == [] and det.verdict == NO_EVIDENCE and "at most 2 heads agree" in det.reason
    det3 = detect(table, rule="shares", params={"min_heads": 2})
    assert len(det3.flagged_ids) > 0.9 * 0.1 * N


def test_unimodal_clean_selects_few_columns_that_never_agree():
    """AIC models a column's extremes as a small tight component now and then (a chance selection);
    no two heads select the same samples, so nothing is evidence."""
    for dof in (50, 4):  # nearly Gaussian; Student-t tails
        table, _ = share_table(3, multimodal=False, dof=dof)
        det = detect(table, rule="shares")
        assert det.flagged_ids == [] and len(det.extra["selected"]) <= 0.1 * L * H * 4, dof
        assert all(len(g["heads"]) == 1 for g in det.extra["groups"]), dof


def test_without_share_signals_nothing_is_flagged():
    table, _ = share_table(3, rate=0.1)
    det = detect(SignalTable(table.ids, {"entropy": table.entropy}), rule="shares")
    assert det.flagged_ids == [] and det.verdict == NO_SHARES and det.scores is None
    with pytest.raises(ValueError, match="unknown segment"):
        detect(table, rule="shares", params={"segments": "image,question"})


def test_dawid_skene_recovers_truth_and_rates():
    rng = np.random.default_rng(0)
    n, truth = 4000, rng.random(4000) < 0.2
    sens, fpr = np.array([0.95, 0.9, 0.8, 0.6, 0.5]), np.array([0.02, 0.05, 0.1, 0.3, 0.5])
    votes = np.where(truth[:, None], rng.random((n, 5)) < sens, rng.random((n, 5)) < fpr)
    post, s, f, prior = (np.asarray(a) for a in dawid_skene(votes, votes[:, :3].mean(1), iters=100))
    np.testing.assert_allclose(s, sens, atol=0.04)
    np.testing.assert_allclose(f, fpr, atol=0.03)
    assert abs(float(prior) - truth.mean()) < 0.02
    # better than any single column and than the majority vote
    acc = ((post > 0.5) == truth).mean()
    assert acc > max((votes[:, c] == truth).mean() for c in range(5))
    assert acc > ((votes.mean(1) > 0.5) == truth).mean()


def _with_entropy(table, rng, collapsed=()):
    """The table with clean entropies (nats, 81 image tokens: bimodal per layer) and an attention collapse
    (0.05-0.3 nats) of the `collapsed` rows in layers 0 and 2."""
    low = rng.random((N, 1)) < 0.5
    h = np.where(low, rng.normal(2.0, 0.15, (N, L)), rng.normal(3.6, 0.2, (N, L)))
    rows = np.asarray(collapsed, int)
    if rows.size:
        h[rows[:, None], [0, 2]] = rng.uniform(0.05, 0.3, (rows.size, 2))
    return SignalTable(table.ids, {**table.arrays, "entropy": np.clip(h, 0.0, np.log(81)).astype(np.float32)})


def test_combined_uses_each_signal_where_it_separates():
    rng = np.random.default_rng(5)
    # a trigger that moves the shares without a collapse: shares flags it, robust does not
    table, poisoned = share_table(21, rate=0.1, segment=USER)
    members = {"members": "robust,shares"}  # shares is not a default member (README "Detection")
    det = detect(_with_entropy(table, rng), rule="combined", params=members)
    assert precision_recall_f1(det.flagged_ids, poisoned)["f1"] >= 0.95, det.extra["members"]
    assert det.extra["members"]["robust"]["n_flagged"] == 0 and "shares" in det.verdict
    # a collapse with clean shares: robust flags it
    clean, _ = share_table(22)
    rows = rng.choice(N, 50, replace=False)
    det = detect(_with_entropy(clean, rng, rows), rule="combined", params=members)
    assert precision_recall_f1(det.flagged_ids, [f"s{i}" for i in rows])["f1"] >= 0.95, det.extra["members"]
    assert det.extra["members"]["shares"]["n_flagged"] == 0 and "robust" in det.verdict


def test_combined_is_quiet_on_clean_uploads():
    rng = np.random.default_rng(6)
    for seed in range(5):
        table, _ = share_table(2000 + seed)
        det = detect(_with_entropy(table, rng), rule="combined", params={"members": "robust,shares"})
        assert det.flagged_ids == [] and det.verdict == NO_EVIDENCE, det.extra["members"]
    with pytest.raises(ValueError, match="unknown or invalid detector"):
        detect(table, rule="combined", params={"members": "robust,combined"})


def test_mixtures_fitted_on_a_subsample_still_find_the_minority_in_every_row():
    """fit_rows < N: the mixtures see 300 of the 500 rows; the poisoned rows outside them are flagged too."""
    table, poisoned = share_table(11, rate=0.1)
    det = detect(table, rule="shares", params={"fit_rows": 300})
    m = precision_recall_f1(det.flagged_ids, poisoned)
    assert m["f1"] >= 0.95, (m, det.reason)
    fitted = np.random.default_rng(0).choice(N, 300, replace=False)  # the rows fit_columns draws
    outside = set(poisoned) - {table.ids[i] for i in fitted}
    assert len(outside) >= 15 and len(outside & set(det.flagged_ids)) >= 0.95 * len(outside)
