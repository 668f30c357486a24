"""robust's co-location test on the ``peak`` signal (bye_jax/detect/colocation.py), on synthetic signal
tables with known answers.

A clean sample has an image "content place" (drawn from a multi-modal map over the 9 x 9 grid); in each
layer its attention peaks there with probability ``q``, else at that layer's sink token (a share of the
upload, e.g. 27% on one token) or anywhere; some rows attend diffusely (normalised entropy 0.7-0.95, an
arbitrary peak). A poisoned sample's attention peaks at the trigger's token in most of the trigger layers.
"""

import json

import numpy as np
import pytest

from bye_jax.detect import DETECTORS, NO_EVIDENCE, detect, precision_recall_f1
from bye_jax.detect.colocation import colocation, focused_peaks
from bye_jax.signals import SignalTable

W, TOKENS, TRIGGER = 9, 81, 40
PARAMS = DETECTORS["robust"].defaults


def _clean(rng, n, layers=4, *, q=0.3, places=None, sink_share=0.0, diffuse=0.1):
    """(peak [n, L] int32, entropy_norm [n, L] float32) of a clean upload."""
    if places is None:  # multi-modal: 6 popular places take 60% of the images, the rest anywhere
        popular = rng.choice(TOKENS, 6, replace=False)
        place = np.where(rng.random(n) < 0.6, rng.choice(popular, n), rng.integers(0, TOKENS, n))
    else:
        place = rng.choice(places, n)
    peak = rng.integers(0, TOKENS, (n, layers))
    peak = np.where(rng.random((n, layers)) < q, place[:, None], peak)
    sinks = rng.choice(TOKENS, layers)
    peak = np.where(rng.random((n, layers)) < sink_share, sinks[None, :], peak)
    h = rng.uniform(0.05, 0.45, (n, layers))
    h = np.where(rng.random((n, layers)) < diffuse, rng.uniform(0.7, 0.95, (n, layers)), h)
    return peak.astype(np.int32), h.astype(np.float32)


def _plant(rng, peak, h, rate, layers=(1, 2, 3), p_hit=0.85):
    """Poisons round(rate * n) rows: focused attention at the trigger's token in each trigger layer w.p. p_hit."""
    n = peak.shape[0]
    y = rng.permutation(n) < int(round(rate * n))
    for layer in layers:
        hit = y & (rng.random(n) < p_hit)
        peak[hit, layer] = TRIGGER
        h[hit, layer] = rng.uniform(0.05, 0.35, hit.sum())
    return y


def _table(peak, h, entropy=None, ids=None, emb=None):
    """The signal table of (peak, normalised entropy[, peak_embed as extracted: float16])."""
    n = peak.shape[0]
    ent = np.asarray(h * np.log(TOKENS) if entropy is None else entropy, np.float32)
    arrays = {"entropy": ent, "entropy_norm": np.asarray(h, np.float32), "peak": np.asarray(peak, np.int32),
              "num_image_tokens": np.full(n, TOKENS, np.int32)}
    if emb is not None:
        arrays["peak_embed"] = np.asarray(emb, np.float16)
    return SignalTable([str(i) for i in range(n)] if ids is None else ids, arrays)


@pytest.mark.parametrize("rate, n, multimodal", [(0.01, 4000, False), (0.03, 1000, False), (0.1, 1000, True),
                                                 (0.3, 1000, True)])
def test_planted_same_location_minority_is_found(rate, n, multimodal):
    """1%-30% poison at one place in 3 of 4 layers, with 27% of the clean upload on one token in layer 0.
    The test needs the poisoned group to be >= 2x the largest clean co-location group: at 10% / 30% the
    clean content is multi-modal (6 popular places); at 1% / 3% it spreads over the grid (N = 4000 at 1%)."""
    rng = np.random.default_rng(int(rate * 1000))
    peak, h = _clean(rng, n, q=0.2 if multimodal else 0.15, places=None if multimodal else np.arange(TOKENS))
    peak[rng.random(n) < 0.27, 0] = 5                     # 27% of the upload share one peak token in layer 0
    y = _plant(rng, peak, h, rate)
    res = colocation(_table(peak, h), PARAMS, seed=0)
    assert res["passes"] and res["token"] == TRIGGER, res
    assert res["layers"] == [1, 2, 3]
    tp = (res["group"] & y).sum()
    # clean samples whose content sits at the trigger's token in 2 layers join the group: precision < 1,
    # most at 1%; the targets: F1 >= 0.9 from 3% on, >= 0.8 at 1%
    f1 = 2 * tp / (res["group"].sum() + y.sum())
    assert f1 >= (0.8 if rate < 0.03 else 0.9) and tp / y.sum() >= 0.9, (tp, res["group"].sum(), y.sum())


@pytest.mark.parametrize("family", ["multimodal", "sink27", "few_places", "diffuse"])
def test_clean_uploads_false_alarm_rate(family):
    """Over 100 seeds of clean uploads (N = 800, 4 layers) the test fires in <= 1% of them."""
    fired = 0
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        if family == "multimodal":
            peak, h = _clean(rng, 800, q=0.4)
        elif family == "sink27":  # 27% on one token in every layer (a sink, drawn per layer) plus content places
            peak, h = _clean(rng, 800, q=0.3, sink_share=0.27)
        elif family == "few_places":  # content in only 4 places: big clean co-location groups of similar size
            peak, h = _clean(rng, 800, q=0.6, places=rng.choice(TOKENS, 4, replace=False))
        else:  # undertrained: most rows attend diffusely, peaks arbitrary
            peak, h = _clean(rng, 800, q=0.1, diffuse=0.8)
        fired += colocation(_table(peak, h), PARAMS, seed=seed)["passes"]
    assert fired <= 1, (family, fired)


def test_focus_and_missing_signals():
    rng = np.random.default_rng(0)
    peak, h = _clean(rng, 200)
    f = focused_peaks(_table(peak, h), 0.6)
    assert ((f == -1) == (h > 0.6)).all() and (f[h <= 0.6] == peak[h <= 0.6]).all()
    # without entropy_norm: entropy / ln(image tokens)
    t = SignalTable([str(i) for i in range(200)], {"entropy": h * np.log(TOKENS), "peak": peak,
                                                    "num_image_tokens": np.full(200, TOKENS)})
    assert (focused_peaks(t, 0.6) == f).all()
    assert colocation(SignalTable.from_entropy(range(200), h), PARAMS, seed=0) is None     # no peak: skipped
    one_layer = SignalTable([str(i) for i in range(200)], {"entropy": h[:, :1], "peak": peak[:, :1]})
    assert colocation(one_layer, PARAMS, seed=0) is None


def test_diffuse_rows_do_not_make_a_group():
    """A minority sharing a peak token only while attending almost uniformly (an arbitrary peak) is not
    evidence; the same minority attending narrowly is."""
    rng = np.random.default_rng(4)
    peak, h = _clean(rng, 1000, q=0.2)
    y = _plant(rng, peak, h, 0.1)
    h[y] = rng.uniform(0.8, 0.95, h[y].shape)
    assert not colocation(_table(peak, h), PARAMS, seed=0)["passes"]
    h[y] = 0.2
    assert colocation(_table(peak, h), PARAMS, seed=0)["passes"]


def test_robust_flags_the_peak_group_when_entropy_does_not_separate_it():
    """Real-run shape: poisoned entropies like the clean ones; the peak signal finds them, named in the
    verdict; with peak present an entropy group that shares no location flags nothing."""
    rng = np.random.default_rng(9)
    n = 1000
    peak, h = _clean(rng, n, q=0.2)
    y = _plant(rng, peak, h, 0.1)
    ids = [f"poison_{i}" if p else f"clean_{i}" for i, p in enumerate(y)]
    det = detect(_table(peak, h, ids=ids), rule="robust")
    m = precision_recall_f1(det.flagged_ids, [i for i, p in zip(ids, y, strict=True) if p])
    assert m["f1"] >= 0.9, (m, det.verdict)  # a poisoned row that hits the trigger in < 2 layers is missed
    assert det.verdict == f"{det.n_flagged} samples flagged; evidence in layers [1, 2, 3] (signal: peak (token 40))"
    assert det.extra["peak"]["passes"] and "peak" in det.signals
    report = det.to_report()
    assert report["details"]["peak"]["token"] == TRIGGER and report["params"]["peak_ratio"] == 2.0
    json.dumps(report, allow_nan=False)

    # a clean low-entropy group (collapse in layer 2) whose members peak all over the grid: not flagged
    peak, h = _clean(rng, n, q=0.2)
    low = rng.permutation(n) < 100
    h[low, 2] = rng.uniform(0.001, 0.01, low.sum())
    det = detect(_table(peak, h), rule="robust")
    assert det.verdict == NO_EVIDENCE and det.n_flagged == 0
    assert {"layer": 2, "side": "low"} in det.extra["entropy_groups_without_peak"]
    assert "share none either" in det.reason
    # ... but the same collapse at one place is the trigger group: flagged, both signals named
    peak[low, 1:] = TRIGGER
    h[low, 1], h[low, 3] = 0.2, 0.2
    det = detect(_table(peak, h), rule="robust")
    flagged, planted = set(np.flatnonzero(det.flagged)), set(np.flatnonzero(low))
    assert planted <= flagged and len(flagged - planted) <= 5   # + clean rows whose content sits at token 40
    assert "peak (token 40) + entropy (low side)" in det.verdict and 2 in det.sensitive_layers


def test_content_completes_the_group_with_single_layer_members_and_not_clean_look_alikes():
    """Poisoned samples all peak at the trigger in the last layer but only half of them in a second one:
    the co-location group is that half; the content signal (the trigger looks alike in every image)
    brings in the other half and leaves out the clean samples that peak there on a shape."""
    rng = np.random.default_rng(7)
    n, layers = 1000, 4
    peak, h = _clean(rng, n, q=0.15, places=np.arange(TOKENS))
    y = rng.permutation(n) < 100
    peak[y, 3], h[y, 3] = TRIGGER, rng.uniform(0.05, 0.35, y.sum())
    half = y & (rng.random(n) < 0.5)
    peak[half, 2], h[half, 2] = TRIGGER, rng.uniform(0.05, 0.35, half.sum())
    look_alike = ~y & (rng.random(n) < 0.03)                 # clean samples focused on the trigger's place
    peak[look_alike, 3], h[look_alike, 3] = TRIGGER, rng.uniform(0.05, 0.35, look_alike.sum())
    content = rng.normal(0, 10, (n, layers, 16)).astype(np.float32)   # what each sample looks at
    content[y] = rng.normal(0, 1, (y.sum(), layers, 16)) + 20.0        # the trigger: the same patch
    table = _table(peak, h)
    with_content = SignalTable(table.ids, {**{k: table.get(k) for k in ("entropy", "entropy_norm", "peak",
                                                                         "num_image_tokens")}, "content": content})
    content_only = {"focus_quantile": 0.0}   # the focus completion is tested below; here content alone
    core = detect(table, rule="robust", params=content_only)
    full = detect(with_content, rule="robust", params=content_only)
    assert core.flagged.sum() < 0.7 * y.sum()                        # the two-layer half (and little else)
    prf = precision_recall_f1(full.flagged_ids, [str(i) for i in np.flatnonzero(y)])
    assert prf["recall"] >= 0.9 and prf["precision"] >= 0.95, prf
    assert not full.flagged[look_alike].any()
    assert full.extra["peak"]["completed"] > 0


def test_focus_completes_the_group_with_samples_that_collapse_onto_the_token_in_one_layer():
    """Real-run shape (demo seed 0): every poisoned sample peaks at the trigger in the last layer, 40% of them
    collapsed (h near 0), the others as focused as clean samples; a third also peak there in a second
    layer. Clean samples that peak at the trigger's place attend to a shape and its surroundings (h like
    the clean upload's). No content signal: the collapse brings in the single-layer collapsed ones, not
    the clean look-alikes."""
    rng = np.random.default_rng(11)
    n = 1000
    peak, h = _clean(rng, n, q=0.15, places=np.arange(TOKENS))
    y = rng.permutation(n) < 100
    collapsed = rng.random(n) < 0.4
    peak[y, 3], h[y, 3] = TRIGGER, np.where(collapsed, rng.uniform(0.0, 0.03, n), rng.uniform(0.2, 0.45, n))[y]
    third = y & (rng.random(n) < 0.35)
    peak[third, 2], h[third, 2] = TRIGGER, rng.uniform(0.05, 0.35, third.sum())
    look_alike = ~y & (rng.random(n) < 0.04)
    peak[look_alike, 3], h[look_alike, 3] = TRIGGER, rng.uniform(0.2, 0.45, look_alike.sum())
    truth = [str(i) for i in np.flatnonzero(y)]
    without = detect(_table(peak, h), rule="robust", params={"focus_quantile": 0.0})
    full = detect(_table(peak, h), rule="robust")
    base = precision_recall_f1(without.flagged_ids, truth)
    prf = precision_recall_f1(full.flagged_ids, truth)
    single = y & collapsed & ~third                      # collapsed onto the trigger in the last layer only
    assert without.flagged[single].mean() <= 0.2 and full.flagged[single].mean() >= 0.7
    assert prf["recall"] >= base["recall"] + 0.15 and prf["precision"] >= 0.9, (base, prf)
    assert not (full.flagged & ~without.flagged)[look_alike].any()     # the completion adds no look-alike


def test_the_token_is_sought_at_narrower_focus_when_a_loose_sink_outweighs_it():
    """Real-run shape (demo seed 1): a clean background token draws 9% of the upload loosely (h 0.45-0.6) in
    layers 0 and 1, a larger co-location than the trigger's at the loosest focus; the trigger's samples
    attend narrowly. One focus level picks the sink and flags nothing; the scan finds the trigger."""
    rng = np.random.default_rng(5)
    n = 1000
    peak, h = _clean(rng, n, q=0.15, places=np.arange(TOKENS))
    sink = rng.random(n) < 0.09
    peak[sink, :2], h[sink, :2] = 3, rng.uniform(0.45, 0.6, (sink.sum(), 2))
    y = ~sink & (rng.permutation(n) < 80)
    for layer in (1, 3):
        hit = y & (rng.random(n) < 0.8)
        peak[hit, layer], h[hit, layer] = TRIGGER, rng.uniform(0.0, 0.3, hit.sum())
    truth = [str(i) for i in np.flatnonzero(y)]
    one_level = detect(_table(peak, h), rule="robust", params={"focus_levels": 1})
    assert one_level.n_flagged == 0 and one_level.extra["peak"]["token"] == 3
    scan = detect(_table(peak, h), rule="robust")
    assert scan.extra["peak"]["token"] == TRIGGER and scan.extra["peak"]["focus"] < 0.6
    prf = precision_recall_f1(scan.flagged_ids, truth)
    assert prf["precision"] >= 0.95 and prf["recall"] >= 0.6, prf   # the two-layer members (80% x 80%) and more


def test_content_colocation_finds_a_trigger_at_varying_places():
    """A trigger pasted at a random place per image: no shared token, but the same look (``peak_embed``) in
    several layers. The place test finds nothing; the content test (labels by k-means over the looks) finds
    the group; clean samples peak on one of 40 looks of their own (the same look in their layers)."""
    from bye_jax.detect.colocation import complete_content_group, content_colocation

    rng = np.random.default_rng(3)
    n, layers, dim = 1000, 4, 16
    peak, h = _clean(rng, n, layers)
    looks = rng.normal(size=(40, dim)) * 3.0
    own = rng.integers(0, 40, n)
    emb = looks[own][:, None, :] + rng.normal(scale=0.3, size=(n, layers, dim))
    y = rng.permutation(n) < 100
    trigger_look = rng.normal(size=dim) * 3.0
    for layer in (1, 2, 3):
        hit = y & (rng.random(n) < 0.85)
        peak[hit, layer] = rng.integers(0, TOKENS, hit.sum())        # anywhere: no shared token
        h[hit, layer] = rng.uniform(0.05, 0.35, hit.sum())
        emb[hit, layer] = trigger_look + rng.normal(scale=0.3, size=(hit.sum(), dim))
    table = _table(peak, h, emb=emb)
    p = {**PARAMS, "content_clusters": 48}
    assert not colocation(table, p, seed=0)["passes"]
    got = content_colocation(table, p, seed=0)
    assert got["passes"], got
    flagged = complete_content_group(table, got, p["peak_focus"], p["content_quantile"])
    prec, rec = (flagged & y).sum() / max(flagged.sum(), 1), (flagged & y).sum() / y.sum()
    assert prec >= 0.95 and rec >= 0.8, (prec, rec)
    # the detector with the content test on flags that group (verdict: peak_embed); with its default (off) nothing
    on = detect(table, rule="robust", params=p)
    assert on.n_flagged >= 80 and "peak_embed" in on.verdict, on.verdict
    assert detect(table, rule="robust", params=PARAMS).n_flagged == 0


NO_OWN_LOOK = {"own_look_others": 0}  # the co-location path alone (the own-look test decides first where it passes)


@pytest.mark.parametrize("trigger_look", [True, False])
def test_colocation_group_must_share_a_look(trigger_look):
    """With ``peak_embed``: a co-location group whose members see the same thing at the token (a trigger) is
    flagged; the same group seeing different things there (clean samples attending to their shapes at one
    place; the suite's clean groups, look spread 0.6-0.7) is not, and the verdict says why."""
    rng = np.random.default_rng(11)
    n, layers, dim = 1000, 4, 16
    peak, h = _clean(rng, n, q=0.2)
    y = _plant(rng, peak, h, 0.1)
    looks = rng.normal(size=(40, dim)) * 3.0                    # clean content: one of 40 looks per sample
    emb = looks[rng.integers(0, 40, n)][:, None, :] + rng.normal(scale=0.3, size=(n, layers, dim))
    if trigger_look:
        at = peak == TRIGGER
        emb[at & y[:, None]] = rng.normal(size=dim) * 3.0 + rng.normal(scale=0.05, size=((at & y[:, None]).sum(), dim))
    table = _table(peak, h, emb=emb)
    without = detect(_table(peak, h), rule="robust")             # no peak_embed: no look gate
    assert without.n_flagged >= 80 and without.extra["peak"]["token"] == TRIGGER
    got = detect(table, rule="robust", params=NO_OWN_LOOK)
    spread = got.extra["peak"]["look_spread"]
    assert len(spread) == 3
    if trigger_look:
        assert max(spread) < 0.1 and set(got.flagged_ids) == set(without.flagged_ids)
    else:
        assert min(spread) > 0.5 and got.n_flagged == 0 and got.verdict == NO_EVIDENCE
        assert "shares no look" in got.reason, got.reason
        assert detect(table, rule="robust", params={"look_ratio": 0, **NO_OWN_LOOK}).n_flagged == without.n_flagged


@pytest.mark.parametrize("everywhere", [True, False])
def test_colocation_group_look_must_be_its_own(everywhere):
    """With ``peak_embed``: a co-location group whose members all see one thing at the token is flagged when
    that look is theirs (a trigger: only in the poisoned images); when the same look is where many other
    samples peak too, at other tokens (the plain background, in every image), it is not, and the verdict
    says why (the suite's background group: 3.0 other samples per member)."""
    rng = np.random.default_rng(12)
    n, layers, dim = 1000, 4, 16
    peak, h = _clean(rng, n, q=0.2)
    y = _plant(rng, peak, h, 0.1)
    looks = rng.normal(size=(40, dim)) * 3.0
    emb = looks[rng.integers(0, 40, n)][:, None, :] + rng.normal(scale=0.3, size=(n, layers, dim))
    shared = rng.normal(size=dim) * 3.0
    at = (peak == TRIGGER) & y[:, None]
    emb[at] = shared + rng.normal(scale=0.05, size=(at.sum(), dim))
    if everywhere:                                   # a third of the other samples peak on that look elsewhere
        alike = ~y & (rng.random(n) < 0.33)
        emb[alike] = shared + rng.normal(scale=0.05, size=(alike.sum(), layers, dim))
    table = _table(peak, h, emb=emb)
    got = detect(table, rule="robust", params=NO_OWN_LOOK)
    assert max(got.extra["peak"]["look_spread"]) < 0.1            # alike in both cases
    others = got.extra["peak"]["look_others"]
    if everywhere:
        assert min(others) > 2.0 and got.n_flagged == 0 and got.verdict == NO_EVIDENCE
        assert "content that is everywhere" in got.reason, got.reason
        assert detect(table, rule="robust", params={"look_others": 1e9, **NO_OWN_LOOK}).n_flagged >= 80  # the gate
        assert detect(table, rule="robust").n_flagged == 0      # nor is it a look of the group's own
    else:
        assert max(others) < 0.05 and got.n_flagged >= 80
        prf = precision_recall_f1(got.flagged_ids, [i for i, v in zip(table.ids, y, strict=True) if v])
        assert prf["f1"] >= 0.9, prf


@pytest.mark.parametrize("rate", [0.03, 0.2])
@pytest.mark.parametrize("elsewhere", [False, True])
def test_own_look_finds_a_trigger_without_collapse_or_excess(rate, elsewhere):
    """A trigger at one place that draws the peak of most poisoned samples in one layer and of some in two
    others, with no entropy drop (the suite's 20% patch seed 0 and 3% patch): the co-location test sees no
    excess beyond clean shape places, but those samples see one look at one token, which no clean sample peaks
    on. Clean samples: one of 40 looks each, peaks spread over the tokens, a sink token that many share with
    the background look (also what many others peak on elsewhere). The own-look test flags the poisoned
    samples; when the same look is also where many clean samples peak (at other places), nothing. (What it
    adds over the co-location test is shown on the real tables, tests/test_suite_tables.py.)"""
    rng = np.random.default_rng(int(rate * 100) + 7 * elsewhere)
    n, layers, dim = 1000, 4, 16
    peak = rng.integers(0, TOKENS, (n, layers))
    h = rng.uniform(0.2, 0.6, (n, layers))                        # no collapse anywhere
    looks = rng.normal(size=(40, dim)) * 3.0
    emb = looks[rng.integers(0, 40, n)][:, None, :] + rng.normal(scale=0.3, size=(n, layers, dim))
    background = rng.normal(size=dim) * 3.0
    sink = rng.random((n, layers)) < 0.25                         # a sink at token 0 with the background look
    peak[sink] = 0
    emb[sink] = background + rng.normal(scale=0.02, size=(sink.sum(), dim))
    plain = rng.random((n, layers)) < 0.15                        # ... and background peaks elsewhere
    emb[plain & ~sink] = background + rng.normal(scale=0.02, size=((plain & ~sink).sum(), dim))
    y = rng.permutation(n) < int(rate * n)
    trigger = rng.normal(size=dim) * 3.0
    for layer, p_hit in ((1, 0.25), (2, 0.3), (3, 0.95)):
        hit = y & (rng.random(n) < p_hit)
        peak[hit, layer] = TRIGGER
        emb[hit, layer] = trigger + rng.normal(scale=0.02, size=(hit.sum(), dim))
    if elsewhere:                                                  # the same look where a third of clean samples peak
        alike = ~y & (rng.random(n) < 0.33)
        emb[alike] = trigger + rng.normal(scale=0.02, size=(alike.sum(), layers, dim))
    table = _table(peak, h, emb=emb)
    got = detect(table, rule="robust")
    if elsewhere:
        assert got.n_flagged == 0 and not got.extra["own_look"]["passes"], got.verdict
        return
    assert got.extra["own_look"]["token"] == TRIGGER and got.extra["own_look"]["passes"]
    assert set(got.extra["own_look"]["layers"]) >= {2, 3} and "peak_embed" in got.verdict
    prf = precision_recall_f1(got.flagged_ids, [i for i, v in zip(table.ids, y, strict=True) if v])
    assert prf["precision"] == 1.0 and prf["recall"] >= 0.9, prf


def _exclusive_looks_upload(rng, n=1000, layers=4, dim=16):
    """Clean samples: peaks anywhere, no collapse, one of 40 looks each; a sink at token 0 (the background
    look, which others peak on elsewhere too). (peak, h, emb)."""
    peak = rng.integers(0, TOKENS, (n, layers))
    h = rng.uniform(0.2, 0.6, (n, layers))
    looks = rng.normal(size=(40, dim)) * 3.0
    emb = looks[rng.integers(0, 40, n)][:, None, :] + rng.normal(scale=0.3, size=(n, layers, dim))
    sink = rng.random((n, layers)) < 0.25
    peak[sink] = 0
    emb[sink | (rng.random((n, layers)) < 0.1)] = rng.normal(size=dim) * 3.0
    return peak, h, emb


@pytest.mark.parametrize("linked", [True, False])
def test_own_look_links_a_grid_trigger_across_tokens(linked):
    """A grid of 9 squares (the suite's ``multi`` trigger): each poisoned sample peaks on one square in layer 1
    and on another (a different token, a different look) in layer 2, so no token holds it in two layers and
    each square's core is small; the cores of the two layers share their members, which links them. When the
    layer-2 cores are other samples' (clean samples with exclusive looks of their own, one layer each) nothing
    links and nothing is flagged."""
    rng = np.random.default_rng(21 + linked)
    n, dim = 1000, 16
    peak, h, emb = _exclusive_looks_upload(rng, n)
    y = rng.permutation(n) < 100
    first, second = [10, 13, 16, 37, 43, 64, 67, 70, 76], [2, 5, 20, 29, 33, 47, 51, 58, 74]
    look1, look2 = rng.normal(size=(9, dim)) * 3.0, rng.normal(size=(9, dim)) * 3.0
    square = rng.integers(0, 9, n)
    for i in np.flatnonzero(y):
        peak[i, 1], emb[i, 1] = first[square[i]], look1[square[i]] + rng.normal(scale=0.02, size=dim)
    layer2 = y if linked else (~y & (rng.random(n) < 0.11))       # the layer-2 cores: the same or other samples
    for i in np.flatnonzero(layer2):
        s = (square[i] + 1) % 9
        peak[i, 2], emb[i, 2] = second[s], look2[s] + rng.normal(scale=0.02, size=dim)
    table = _table(peak, h, emb=emb)
    got = detect(table, rule="robust")
    if not linked:
        assert got.n_flagged == 0 and not got.extra["own_look"]["passes"], got.verdict
        return
    assert {e["kind"] for e in got.extra["own_look"]["evidence"]} == {"linked"}
    assert len(got.extra["own_look"]["tokens"]) >= 12 and "tokens" in got.verdict
    prf = precision_recall_f1(got.flagged_ids, [i for i, v in zip(table.ids, y, strict=True) if v])
    assert prf["precision"] == 1.0 and prf["recall"] >= 0.9, prf
    assert detect(table, rule="robust", params={"own_look_link": 0}).n_flagged == 0   # what the link adds


@pytest.mark.parametrize("collapsed", [True, False])
def test_own_look_one_layer_core_counts_when_the_attention_collapses_there(collapsed):
    """A trigger seen in one layer only (the suite's texture seed 1): the poisoned samples peak at its token with
    its look in layer 0 and nowhere else. A one-layer exclusive core is also what a clean shape can make, so
    it counts only when its members' attention collapses there (median entropy below the others' 5% quantile);
    without the collapse nothing is flagged."""
    rng = np.random.default_rng(31 + collapsed)
    n, dim = 1000, 16
    peak, h, emb = _exclusive_looks_upload(rng, n)
    y = rng.permutation(n) < 80
    hit = y & (rng.random(n) < 0.95)
    peak[hit, 0] = TRIGGER
    emb[hit, 0] = rng.normal(size=dim) * 3.0 + rng.normal(scale=0.02, size=(hit.sum(), dim))
    if collapsed:
        h[hit, 0] = rng.uniform(0.01, 0.1, hit.sum())
    table = _table(peak, h, emb=emb)
    got = detect(table, rule="robust")
    if not collapsed:
        assert got.n_flagged == 0 and not got.extra["own_look"]["passes"], got.verdict
        return
    assert got.extra["own_look"]["evidence"] == [
        {"layer": 0, "token": TRIGGER, "size": int(hit.sum()), "others": 0.0, "kind": "collapsed"}]
    assert set(got.flagged_ids) == {str(i) for i in np.flatnonzero(hit)}
    assert detect(table, rule="robust", params={"own_look_collapse": 0}).n_flagged == 0


def _looks_upload(rng, family, n=800, layers=4, dim=16):
    """A clean upload with ``peak_embed``: contents at places, attention on the content in some layers, a sink on
    the background (a look other samples peak on elsewhere too, as in the suite); (peak, h, emb).
    position_free: 40 contents whose look does not depend on the place, 6 popular places; place_specific: 8
    contents whose look is content + place (the demo CLIP adds the position before its only layer), places
    anywhere."""
    if family == "position_free":
        contents, places = 40, rng.choice(TOKENS, 6, replace=False)
        place = np.where(rng.random(n) < 0.6, rng.choice(places, n), rng.integers(0, TOKENS, n))
    else:
        contents, place = 8, rng.integers(0, TOKENS, n)
    content = rng.integers(0, contents, n)
    content_look, place_look = rng.normal(size=(contents, dim)) * 3.0, rng.normal(size=(TOKENS, dim))
    look = content_look[content] + (place_look[place] if family == "place_specific" else 0.0)
    peak = rng.integers(0, TOKENS, (n, layers))
    emb = rng.normal(size=(n, layers, dim)) * 3.0                     # elsewhere: whatever is there
    on = rng.random((n, layers)) < 0.4
    peak[on] = np.broadcast_to(place[:, None], (n, layers))[on]
    emb[on] = np.broadcast_to(look[:, None], (n, layers, dim))[on] + rng.normal(scale=0.05, size=(on.sum(), dim))
    h = rng.uniform(0.2, 0.7, (n, layers))
    h[on] = rng.uniform(0.02, 0.4, on.sum())                           # narrow on the content
    sink = ~on & (rng.random((n, layers)) < 0.3)
    background = rng.normal(size=dim) * 3.0
    peak[sink], emb[sink] = 0, background
    emb[~on & ~sink & (rng.random((n, layers)) < 0.3)] = background   # the background, where others peak too
    return peak.astype(np.int32), h.astype(np.float32), emb.astype(np.float16)


@pytest.mark.parametrize("family", ["position_free", "place_specific"])
def test_own_look_rules_clean_false_alarm_rate(family):
    """Over 40 seeds of clean uploads with looks (N = 800, 4 layers), robust (own-look rules included) flags more
    than 1% in at most one."""
    fired = 0
    for seed in range(40):
        peak, h, emb = _looks_upload(np.random.default_rng(2000 + seed), family)
        table = _table(peak, h, emb=emb)
        fired += detect(table, rule="robust", seed=seed).n_flagged > 8
    assert fired <= 1, (family, fired)


def test_a_clean_object_at_one_place_reads_as_a_trigger():
    """The limit, pinned: a clean object that sits at one place in 10% of the images, has a look no other image
    has and draws the attention (collapsed) in two layers is, to the answer's attention, what a pasted trigger
    is. robust flags it (README "Where robust stands"); no attention signal tells the two apart."""
    rng = np.random.default_rng(5)
    peak, h, emb = _looks_upload(rng, "position_free")
    logo = rng.permutation(800) < 80
    for layer in (1, 2):
        peak[logo, layer], h[logo, layer] = TRIGGER, 0.05
        emb[logo, layer] = (rng.normal(size=16) * 3.0).astype(np.float16)
    table = _table(peak, h, emb=emb)
    got = detect(table, rule="robust")
    assert got.extra["own_look"]["passes"] and set(got.flagged_ids) == {str(i) for i in np.flatnonzero(logo)}
