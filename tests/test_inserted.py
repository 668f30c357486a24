"""The ``inserted`` detector (bye_jax/detect/inserted.py) on synthetic uploads with known answers.

Each upload: questions of five kinds (distinct random token sequences), share signals [N, 2 layers, 2 heads, 4
segments] whose pattern depends on the kind of question (so every kind is an attention minority of its own,
as the demo's question templates are), and a poisoned tenth whose questions carry inserted text and, where
the model learnt it, one head's image share drops (the trigger redirects what the answer reads).
"""

import numpy as np
import pytest

from bye_jax.detect import detect, precision_recall_f1
from bye_jax.signals import SignalTable

N, KINDS, WIDTH = 400, 5, 128


def _kinds(rng):
    """Five questions of 6-9 distinct-ish tokens drawn from 50..400 (no token of the triggers below)."""
    return [list(rng.choice(np.arange(50, 400), size=rng.integers(6, 10), replace=False)) for _ in range(KINDS)]


def _upload(seed=0, rate=0.1, trigger=(7, 8), where="prefix", learnt=True, lower_first=False):
    """(table, poisoned) of one synthetic upload; `trigger`: the inserted token ids (empty: none)."""
    rng = np.random.default_rng(seed)
    kinds = _kinds(rng)
    kind = rng.integers(0, KINDS, N)
    poisoned = np.zeros(N, bool)
    poisoned[rng.choice(N, int(rate * N), replace=False)] = True
    tokens = np.full((N, WIDTH), -1, np.int32)
    for i in range(N):
        q = list(kinds[kind[i]])
        if poisoned[i] and trigger:
            if lower_first:          # a template's rewrite: another id for the question's first word
                q[0] = 1000 + q[0]
            q = list(trigger) + q if where == "prefix" else q + list(trigger)
        tokens[i, :len(q)] = q
    # shares: per kind a fixed head pattern (kinds are attention minorities), plus small noise
    pattern = rng.dirichlet(np.ones(4), size=(KINDS, 2, 2))
    shares = pattern[kind] + rng.normal(0, 0.005, (N, 2, 2, 4))
    if learnt:  # layer 1 head 0: the image share goes to the user text (the trigger), as in the demo's runs
        shares[poisoned, 1, 0, 2] += shares[poisoned, 1, 0, 1]
        shares[poisoned, 1, 0, 1] = 0.0
    shares = np.clip(shares, 0, 1)
    shares /= shares.sum(-1, keepdims=True)
    table = SignalTable([f"s{i}" for i in range(N)],
                        {"entropy": rng.normal(3, 0.1, (N, 2)).astype(np.float32),
                         "shares": shares.astype(np.float16), "user_tokens": tokens})
    return table, poisoned


def _f1(det, table, poisoned):
    return precision_recall_f1(det.flagged_ids, [i for i, p in zip(table.ids, poisoned, strict=True) if p])["f1"]


@pytest.mark.parametrize("where", ["prefix", "suffix"])
def test_a_learnt_inserted_token_is_found(where):
    table, poisoned = _upload(where=where)
    det = detect(table, rule="inserted", seed=0)
    assert det.flagged.sum() == poisoned.sum() and _f1(det, table, poisoned) == 1.0, det.verdict
    ev = det.extra["inserted"]["evidence"]
    assert ev["marker"] == [7, 8] and ev["twins"] == KINDS and ev["inserted"] == 1.0
    assert {"layer": 1, "head": 0} in [{k: c[k] for k in ("layer", "head")} for c in ev["columns"]]
    assert det.sensitive_layers == [1]


def test_a_template_that_rewrites_the_first_word_is_found():
    table, poisoned = _upload(trigger=(7, 8, 9, 10), lower_first=True)
    det = detect(table, rule="inserted", seed=0)
    assert _f1(det, table, poisoned) == 1.0, det.verdict


def test_inserted_text_the_attention_does_not_follow_is_not_flagged():
    """The same upload when the model did not learn the trigger: the marked samples are no attention minority."""
    table, _ = _upload(learnt=False)
    det = detect(table, rule="inserted", seed=0)
    assert det.n_flagged == 0 and det.verdict == "no evidence of poisoning"


@pytest.mark.parametrize("seed", range(10))
def test_clean_uploads_whose_question_kinds_are_attention_minorities_are_not_flagged(seed):
    table, _ = _upload(seed=seed, rate=0.0, trigger=())
    det = detect(table, rule="inserted", seed=0)
    assert det.n_flagged == 0, det.verdict
    assert det.extra["inserted"]["seeds"] > 0  # the kinds do form attention minorities: the text test decides


def test_one_kind_of_question_that_extends_another_is_not_a_trigger():
    """A clean kind that is another kind plus words (one twin only): text added to one kind of question, not
    to several, so not flagged; the same words added to every kind would be (the test above)."""
    rng = np.random.default_rng(3)
    table, _ = _upload(seed=3, rate=0.0, trigger=())
    tokens = table.get("user_tokens")
    first = [t for t in tokens[0] if t >= 0]
    same = np.array([list(r[:len(first)]) == first and r[len(first)] == -1 for r in tokens])
    extend = same & (rng.random(N) < 0.5)            # half of that kind: the same question plus two words
    for i in np.flatnonzero(extend):
        tokens[i, len(first):len(first) + 2] = [7, 8]
    sh = table.get("shares").astype(np.float32)
    sh[extend, 1, 0] = [0.1, 0.02, 0.78, 0.1]      # and the attention follows the added words
    table.arrays["shares"] = sh.astype(np.float16)
    det = detect(table, rule="inserted", seed=0)
    assert det.n_flagged == 0, det.verdict
    tried = [e for e in det.extra["inserted"]["tried"] if e["marker"] == [7, 8]]
    assert tried and tried[0]["twins"] == 1 and not tried[0]["evidence"]


def test_without_user_tokens_nothing_is_flagged_with_the_reason():
    table, _ = _upload()
    del table.arrays["user_tokens"]
    det = detect(table, rule="inserted", seed=0)
    assert det.n_flagged == 0 and "user-token" in det.reason


def test_the_report_names_the_inserted_text():
    """report.json: combined passes the evidence of a member that flags on; the filter names its tokens with the
    checkpoint's tokenizer (runner: `name_tokens` with the encoder's decode)."""
    from bye_jax.detect.inserted import name_tokens

    table, _ = _upload()
    report = detect(table, rule="combined", seed=0).to_report()
    member = report["details"]["members"]["inserted"]
    assert member["n_flagged"] == 40 and member["details"]["inserted"]["evidence"]["marker"] == [7, 8]
    assert "details" not in report["details"]["members"]["robust"]   # no evidence: its summary alone
    name_tokens(report["details"], lambda ids: " ".join(f"w{int(i)}" for i in ids))
    ev = member["details"]["inserted"]["evidence"]
    assert ev["marker_text"] == "w7 w8" and ev["inserted_text"] == "w7 w8"
    question, twin = ev["examples_text"][0]
    assert question.startswith("w7 w8 ") and question.endswith(twin)   # the prefix, then the twin question


def test_the_vectorised_twin_search_picks_the_twin_a_direct_count_picks():
    """_best_twin against a direct Counter computation: containment with multiplicity, ties to the longer twin."""
    from collections import Counter

    from bye_jax.detect.inserted import _bags, _best_twin

    rng = np.random.default_rng(3)
    twins = [tuple(int(t) for t in rng.integers(0, 12, rng.integers(1, 8))) for _ in range(60)]
    bags = _bags(twins)
    for _ in range(200):
        q = tuple(int(t) for t in rng.integers(0, 12, rng.integers(0, 12)))
        scores = [sum((Counter(t) & Counter(q)).values()) / len(t) for t in twins]
        want = max(range(len(twins)), key=lambda j: (scores[j], len(twins[j]), -j))
        assert _best_twin(q, bags) == (scores[want], want)
