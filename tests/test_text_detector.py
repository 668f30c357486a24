"""The ``text`` detector (bye_jax/detect/text.py) on synthetic signal tables with known answers.

A clean sample asks one of a few question templates; in each layer the answer position's attention peaks
on one of its question's words: the template's keyword, the question mark (the question's last token,
shared by every template) or another word, holding an ordinary share of the user-text attention
(0.15-0.45). A poisoned sample carries the trigger token after its question; a model that learnt it puts
most of its text attention there (0.6-0.95) in the trigger layers.
"""

import numpy as np
import pytest

from bye_jax.detect import DETECTORS, NO_EVIDENCE, detect, precision_recall_f1
from bye_jax.signals import SignalTable

KEYWORDS = np.array([11, 12, 13, 14, 15])   # one per template
QMARK, TRIGGER, VOCAB = 20, 99, np.arange(30, 80)
LAYERS = 4


def _clean(rng, n, *, p_key=0.45, p_qmark=0.3, templates=5, weights=None):
    """(text_peak [n, L] int32, text_peak_mass [n, L] float32, template [n]) of a clean upload."""
    template = rng.choice(templates, n, p=weights)
    u = rng.random((n, LAYERS))
    peak = np.where(u < p_key, KEYWORDS[template][:, None],
                    np.where(u < p_key + p_qmark, QMARK, rng.choice(VOCAB, (n, LAYERS))))
    mass = rng.uniform(0.15, 0.45, (n, LAYERS))
    return peak.astype(np.int32), mass.astype(np.float32), template


def _plant(rng, peak, mass, rate, layers=(1, 2, 3), p_hit=0.9, depth=(0.6, 0.95)):
    n = peak.shape[0]
    y = rng.permutation(n) < int(round(rate * n))
    for layer in layers:
        hit = y & (rng.random(n) < p_hit)
        peak[hit, layer] = TRIGGER
        mass[hit, layer] = rng.uniform(*depth, hit.sum())
    return y


def _table(peak, mass):
    n = peak.shape[0]
    rng = np.random.default_rng(0)
    return SignalTable([str(i) for i in range(n)], {"entropy": rng.uniform(3, 4, (n, LAYERS)).astype(np.float32),
                                                    "text_peak": peak, "text_peak_mass": mass})


@pytest.mark.parametrize("rate", [0.03, 0.1, 0.3])
def test_a_learnt_text_trigger_is_found(rate):
    rng = np.random.default_rng(int(rate * 100))
    peak, mass, _ = _clean(rng, 800)
    y = _plant(rng, peak, mass, rate)
    det = detect(_table(peak, mass), rule="text", seed=0)
    assert det.extra["text_peak"]["token"] == TRIGGER and det.extra["text_peak"]["passes"]
    assert det.sensitive_layers == [1, 2, 3]
    score = precision_recall_f1(det.flagged_ids, [str(i) for i in np.flatnonzero(y)])
    assert score["f1"] >= 0.95, (score, det.verdict)
    assert "text peak (token 99)" in det.verdict


def test_question_templates_alone_are_not_flagged():
    """Five templates: each template's samples peak on its keyword in every layer (a co-location group of
    ~20% per template), all on the question mark often (a token of every question: > max_share)."""
    for seed in range(3):
        peak, mass, _ = _clean(np.random.default_rng(seed), 800)
        det = detect(_table(peak, mass), rule="text", seed=0)
        assert det.n_flagged == 0 and det.verdict == NO_EVIDENCE, det.reason


def test_the_question_mark_common_to_all_is_not_a_group():
    """Most samples peak on the question's last token in every layer: too large a group to be a trigger."""
    peak, mass, _ = _clean(np.random.default_rng(1), 800, p_key=0.1, p_qmark=0.8)
    det = detect(_table(peak, mass), rule="text", seed=0)
    assert det.n_flagged == 0 and det.extra["text_peak"]["token"] != QMARK


def test_one_dominant_template_with_question_word_attention_is_not_flagged():
    """One template of 20% whose samples all peak on its keyword in every layer, the other 80% spread over
    their words: the co-location test alone would take the template for a trigger (a minority peaking on one
    token, far beyond the next); its members put the share a question word gets on it, not a trigger's."""
    rng = np.random.default_rng(3)
    n = 800
    peak, mass, template = _clean(rng, n, p_key=0.05, p_qmark=0.05)
    one = template == 0
    peak[one] = KEYWORDS[0]
    det = detect(_table(peak, mass), rule="text", seed=0)
    info = det.extra["text_peak"]
    assert info["token"] == KEYWORDS[0] and info["passes"] and not info["deep"]
    assert det.n_flagged == 0 and "a question word, not a trigger" in det.reason


def test_a_template_word_that_takes_over_the_attention_is_indistinguishable():
    """The stated limit: a clean template of 10% whose keyword draws a trigger's share of the text attention
    in every layer looks exactly like a learnt trigger in this signal, and is flagged. (At 20% of the upload
    in 4 of 4 layers the permutation null already rejects it: a token that 20% of every layer peaks on meets
    itself across 4 layers by chance about as often.)"""
    for share, flagged in ((0.1, True), (0.2, False)):
        rng = np.random.default_rng(3)
        rest = (1 - share) / 4
        peak, mass, template = _clean(rng, 800, p_key=0.05, p_qmark=0.05, weights=[share, rest, rest, rest, rest])
        one = template == 0
        peak[one] = KEYWORDS[0]
        mass[one] = rng.uniform(0.6, 0.95, (one.sum(), LAYERS))
        det = detect(_table(peak, mass), rule="text", seed=0)
        assert det.extra["text_peak"]["token"] == KEYWORDS[0]
        assert det.n_flagged == (one.sum() if flagged else 0), (share, det.reason)


def test_a_trigger_the_model_did_not_learn_is_not_flagged():
    """Poisoned samples whose attention rests on the trigger token like on any question word (an untrained
    checkpoint): no deeper than the rest, nothing flagged."""
    rng = np.random.default_rng(4)
    peak, mass, _ = _clean(rng, 800)
    _plant(rng, peak, mass, 0.1, depth=(0.15, 0.45))
    det = detect(_table(peak, mass), rule="text", seed=0)
    assert det.n_flagged == 0


def test_without_the_text_peak_signal_nothing_is_flagged():
    rng = np.random.default_rng(0)
    table = SignalTable([str(i) for i in range(100)], {"entropy": rng.uniform(3, 4, (100, 4)).astype(np.float32)})
    det = detect(table, rule="text", seed=0)
    assert det.n_flagged == 0 and "no text-peak signal" in det.reason
    assert "text" in DETECTORS


def test_combined_defaults_to_robust_text_inserted_and_targeted():
    """combined's default members: robust (image), text, inserted and targeted; shares only on request (it flags
    19-25% of the suite's real clean uploads, BENCHMARKS.md). A text trigger the answer peaks on reaches combined
    through text (this table has no user or answer tokens: inserted and targeted add nothing)."""
    from bye_jax.detect.combined import DEFAULTS as COMBINED

    assert COMBINED["members"] == "robust,text,inserted,targeted"
    rng = np.random.default_rng(7)
    peak, mass, _ = _clean(rng, 800)
    y = _plant(rng, peak, mass, 0.1)
    det = detect(_table(peak, mass), rule="combined", seed=0)
    assert set(det.extra["members"]) == {"robust", "text", "inserted", "targeted"}
    assert precision_recall_f1(det.flagged_ids, [str(i) for i in np.flatnonzero(y)])["f1"] >= 0.95
    assert "text:" in det.verdict
