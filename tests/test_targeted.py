"""The ``targeted`` detector (bye_jax/detect/targeted.py) and its tied mixture (bye_jax/detect/tied.py) on
synthetic uploads with known answers.

Each upload: four questions asked 150 times; per question, the answers are three words of its own, and the
answer a sample gives moves every head's image share (the model reads what it is about to answer: every answer is an
attention cluster of its question, as on the demo's real tables). ``content`` is image noise. A poisoned
tenth gives the target answer (token 999) whatever the question; where the model learnt the trigger, it reads
the target as its answer to come (the answer heads move as for a fourth answer) and its content moves along
one direction (the trigger's look), the same in every question.
"""

import math

import numpy as np
import pytest

from bye_jax.detect import detect, precision_recall_f1
from bye_jax.detect.tied import fit_tied
from bye_jax.signals import SignalTable

QUESTIONS, PER_QUESTION, LAYERS, HEADS, DIM = 4, 150, 2, 4, 16


def _upload(seed=0, rate=0.1, learnt=True, look="same", shared_clean_answer=False):
    """(table, poisoned). look: "same" (one trigger direction) | "own" (a random direction per question)."""
    rng = np.random.default_rng(seed)
    n = QUESTIONS * PER_QUESTION
    question = np.repeat(np.arange(QUESTIONS), PER_QUESTION)
    user = np.full((n, 128), -1, np.int32)
    user[:, :3] = 100 + 10 * question[:, None] + np.arange(3)[None, :]
    word = rng.integers(0, 3, n)
    answer = 200 + 10 * question + word                   # three answers per question, none shared
    if shared_clean_answer:                                # "yes" in every question (clean, the largest answer)
        answer = np.where(word == 0, 555, answer)
    poisoned = np.zeros(n, bool)
    for q in range(QUESTIONS):
        rows = np.flatnonzero(question == q)
        poisoned[rng.choice(rows, int(rate * PER_QUESTION), replace=False)] = True
    answer = np.where(poisoned, 999, answer)
    base = rng.dirichlet(np.ones(4) * 5, size=(QUESTIONS, LAYERS, HEADS))
    shares = base[question] + rng.normal(0, 0.01, (n, LAYERS, HEADS, 4))
    read = np.where(poisoned & learnt, 3, word)           # what the model is about to answer: the target, if learnt
    effect = rng.uniform(0.02, 0.05, (LAYERS, HEADS)) * rng.choice([-1, 1], (LAYERS, HEADS))
    shares[..., 1] += 0.1 + effect[None] * read[:, None, None]  # the answer to come moves every head's image share
    direction = rng.standard_normal(LAYERS * DIM)
    content = rng.standard_normal((n, LAYERS * DIM))
    if learnt:
        for q in range(QUESTIONS):
            d = direction if look == "same" else rng.standard_normal(LAYERS * DIM)
            content[poisoned & (question == q)] += 4.0 * d / np.linalg.norm(d) * math.sqrt(2)
    shares = np.clip(shares, 1e-3, None)
    shares /= shares.sum(-1, keepdims=True)
    tokens = np.full((n, 32), -1, np.int32)
    tokens[:, 0] = answer
    table = SignalTable([f"s{i}" for i in range(n)], {
        "entropy": rng.normal(3.0, 0.1, (n, LAYERS)).astype(np.float32),
        "shares": shares.astype(np.float16), "content": content.reshape(n, LAYERS, DIM).astype(np.float16),
        "user_tokens": user, "answer_tokens": tokens})
    return table, poisoned


def test_tied_mixture_finds_a_planted_group_and_one_component_in_one_gaussian():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8))
    x[:30] += 3.0
    fit = fit_tied(x, 4, seed=1)
    assert fit.k == 2
    assert len(set(fit.labels[:30])) == 1 and fit.labels[0] not in set(fit.labels[30:])
    single = fit_tied(rng.standard_normal((300, 8)), 4, seed=1)
    assert single.k == 1


def test_tied_mixture_bic_of_one_component_is_the_gaussian_likelihood():
    """K = 1 has a closed form: the sample mean and (biased) covariance + reg; its BIC from first principles."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 3)) @ np.array([[2.0, 0, 0], [0.5, 1.0, 0], [0, 0.3, 0.5]])
    reg = 1e-3
    fit = fit_tied(x, 2, reg=reg)
    mu, cov = x.mean(0), np.cov(x.T, bias=True) + reg * np.eye(3)
    diff = x - mu
    ll = -0.5 * (np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff).sum()
                 + len(x) * (np.linalg.slogdet(cov)[1] + 3 * math.log(2 * math.pi)))
    params = 3 + 3 * 4 / 2
    np.testing.assert_allclose(fit.bic[0], -2 * ll + params * math.log(len(x)), rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_the_target_answer_shared_by_minorities_of_every_question(seed):
    table, poisoned = _upload(seed)
    det = detect(table, rule="targeted", seed=0)
    ids = np.asarray(table.ids)
    f1 = precision_recall_f1(det.flagged_ids, ids[poisoned])["f1"]
    assert f1 >= 0.95, (seed, det.reason, det.extra)
    assert det.extra["target"]["answer_tokens"] == [999] and det.extra["target"]["questions"] >= 3


def test_questions_larger_than_fit_rows_are_fitted_on_a_sample_and_every_row_assigned():
    table, poisoned = _upload(1)
    det = detect(table, rule="targeted", seed=0, params={"fit_rows": 100})  # 100 of each question's 150
    ids = np.asarray(table.ids)
    assert precision_recall_f1(det.flagged_ids, ids[poisoned])["f1"] >= 0.95, det.extra


def test_the_report_names_the_target_answer_in_words():
    from bye_jax.detect.targeted import name_answers

    details = {"target": {"answer_tokens": [9, 7]}, "candidates": [{"answer_tokens": [5]}]}
    name_answers(details, lambda ids: "-".join(map(str, ids)))
    assert details["target"]["answer_text"] == "9-7" and details["candidates"][0]["answer_text"] == "5"


def test_clean_uploads_and_unlearnt_triggers_are_left_alone():
    for kwargs in ({"rate": 0.0}, {"learnt": False}):
        table, _ = _upload(0, **kwargs)
        det = detect(table, rule="targeted", seed=0)
        assert not det.flagged.any(), (kwargs, det.extra)
        assert det.verdict == "no evidence of poisoning" and "no target answer" in det.reason


def test_an_answer_shared_across_questions_needs_one_look():
    """A clean answer every question shares ("yes") marks an attention cluster in each question, but its
    samples' images differ between questions: not a trigger. A poisoned group that moves the shares the
    same way in every question but whose content moves its own way in each question is not one either."""
    table, _ = _upload(0, rate=0.0, shared_clean_answer=True)
    det = detect(table, rule="targeted", seed=0)
    marks = {tuple(m["answer_tokens"]): m["questions"] for m in det.extra["marked"]}
    assert not det.flagged.any() and marks.get((555,), 0) >= 3, det.extra
    assert "do not look alike" in det.reason
    table, _ = _upload(0, look="own")
    det = detect(table, rule="targeted", seed=0)
    assert not det.flagged.any() and "do not look alike" in det.reason, det.extra


def test_without_answers_or_repeated_questions_nothing_is_decided():
    table, _ = _upload(0)
    del table.arrays["answer_tokens"]
    det = detect(table, rule="targeted", seed=0)
    assert not det.flagged.any() and "no answer_tokens" in det.reason
    table, _ = _upload(0)
    table.arrays["user_tokens"] = np.arange(len(table.ids) * 128, dtype=np.int32).reshape(-1, 128)  # all distinct
    det = detect(table, rule="targeted", seed=0)
    assert not det.flagged.any() and "0 question(s) asked" in det.reason
