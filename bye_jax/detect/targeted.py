"""The ``targeted`` detector: one answer that attention-distinct minorities of several different questions share,
on images that look alike to the model (a dirty-label backdoor whose trigger need not be a patch).

A backdoor makes the tuned model answer the attacker's target whatever the question, so the poisoned samples
of the upload share one answer across questions, and the model reads them differently from the other samples
of the same question. Neither alone is a trigger: in a clean upload the samples of one question whose answer is
"red" are also read differently from the others (the model attends to what it is about to answer), and clean
answers repeat across questions ("yes"). What sets a backdoor apart is all three together:

1. Questions. Samples are grouped by their question (``user_tokens``: the same user text); questions asked
   >= ``min_question`` times are used (fewer than ``min_questions`` such questions: nothing to decide).
2. Attention minorities. Per question, the ``shares`` on the logit scale, standardised within the question,
   projected on their ``components`` leading principal components, get a tied-covariance Gaussian mixture
   (detect/tied.py, K = 1..``max_components`` by BIC: the answers of a question make clusters of their own,
   and the poisoned samples need a component besides them); every component but the largest holding
   ``min_group``..``max_fraction`` of the question's samples is a minority.
3. Shared answer. A minority is marked by an answer (``answer_tokens``) that >= ``purity`` of its members
   give, or that it holds (>= ``purity`` of the question's samples giving it sit in the minority, which
   may hold a cluster of other samples besides: >= ``min_purity`` of it gives the answer), and that at most
   ``outside`` x that share of the question's other samples give. An answer is a candidate target when it
   marks a minority in >= ``min_questions`` different questions (per question the one it marks most); its
   picks are those minorities' members that give it.
4. Same look. The picks must share an image content (``content``, standardised): a ridge discriminant
   fitted on all but one question's picks (against the other samples of those questions) must separate the
   left-out question's picks from its question's other samples with AUROC >= ``min_transfer``, for every
   question in turn. A trigger is one image feature; "yes" to "is there a dog?" and "yes" to "is it
   red?" are not.
5. Flags. The samples that give the target answer and either are picks or sit on the picks' side of the
   discriminant fitted on all of them (Gaussian class scores, prior = their share): at least ``min_group``,
   at most ``max_share`` of the upload, else nothing.

Without ``answer_tokens`` (a table extracted before SIGNALS_VERSION 6), ``shares``, ``content`` or
``user_tokens``: nothing flagged, and the reason says which is missing. Uploads whose questions are all
different (free-form instructions) give no question asked often enough: no verdict (see README).
"""

from __future__ import annotations

import math

import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, flagged_verdict
from bye_jax.detect.registry import register
from bye_jax.detect.tied import assign, fit_tied
from bye_jax.signals import SignalTable

__all__ = ["DEFAULTS", "question_groups", "minorities", "marked_answers", "transfer", "targeted", "name_answers"]

DEFAULTS = {
    "min_question": 40,        # samples of a question for its minorities to be looked for
    "min_questions": 3,        # different questions whose minorities share the answer
    "components": 8,           # principal components of a question's share logits
    "max_components": 6,       # K = 1..max_components per question, by BIC (a question's answers make clusters)
    "starts": 8,               # EM starts per K
    "min_group": 5,            # samples in a minority, and in a verdict
    "max_fraction": 0.5,       # a minority holds at most this share of its question
    "purity": 0.8,             # share of a minority's members that give its answer, or of the answer's samples
                               # of the question that sit in the minority ...
    "min_purity": 0.3,         # ... with at least this share of the minority giving it
    "outside": 0.2,            # the answer among the question's other samples: at most this x the purity
    "min_transfer": 0.9,       # leave-one-question-out content AUROC, every question
    "ridge": 1.0,              # added to the content covariance (standardised units)
    "max_share": 0.35,         # no verdict flags more than this share of the upload
    "eps": 1e-4,               # floor inside the share logit
    "fit_rows": 4096,          # a question's axes and mixture from this many random samples of it (0: all)
    "min_samples": 20,
}
NEEDS = ("answer_tokens", "shares", "content", "user_tokens")


def _rows_as_keys(tokens: np.ndarray) -> np.ndarray:
    """[N] int: equal rows get equal keys (-1 padding included)."""
    return np.unique(np.asarray(tokens), axis=0, return_inverse=True)[1].reshape(-1)


def question_groups(user_tokens: np.ndarray, min_question: int) -> list[np.ndarray]:
    """Row indices of every question asked >= min_question times (largest first)."""
    keys = _rows_as_keys(user_tokens)
    counts = np.bincount(keys)
    groups = [np.flatnonzero(keys == q) for q in np.flatnonzero(counts >= min_question)]
    return sorted(groups, key=len, reverse=True)


def _share_logits(shares: np.ndarray, eps: float) -> np.ndarray:
    s = np.clip(np.nan_to_num(np.asarray(shares, np.float64).reshape(len(shares), -1), nan=0.0), eps, 1 - eps)
    return np.log(s) - np.log1p(-s)


def minorities(shares: np.ndarray, rows: np.ndarray, p: dict, seed: int) -> list[np.ndarray]:
    """The attention minorities of one question: row indices of each component but the largest. A question of
    more than ``fit_rows`` samples gets its principal axes and mixture from that many random ones (generator
    ``seed``); every sample is then assigned to its most probable component."""
    x = _share_logits(shares[rows], float(p["eps"]))  # one question's rows at a time (100k x 4096 columns: 3 GB)
    fit = np.arange(len(rows))
    if p["fit_rows"] and len(rows) > p["fit_rows"]:
        fit = np.sort(np.random.default_rng(seed).choice(len(rows), int(p["fit_rows"]), replace=False))
    mean, sd = x[fit].mean(0), x[fit].std(0)
    keep = sd > 1e-8
    if not keep.any():
        return []
    z = (x[:, keep] - mean[keep]) / sd[keep]
    c = min(int(p["components"]), int(keep.sum()), len(fit) - 1)
    axes = np.linalg.svd(z[fit], full_matrices=False)[2][:c]
    mixture = fit_tied(z[fit] @ axes.T, int(p["max_components"]), starts=int(p["starts"]), seed=seed)
    labels = mixture.labels if len(fit) == len(rows) else assign(mixture, z @ axes.T)
    sizes = np.bincount(labels, minlength=mixture.k)
    largest = int(np.argmax(sizes))
    return [rows[labels == j] for j in range(mixture.k)
            if j != largest and p["min_group"] <= sizes[j] <= p["max_fraction"] * len(rows)]


def marked_answers(answers: np.ndarray, groups: list[np.ndarray], minors: list[list[np.ndarray]], p: dict
                   ) -> dict[int, dict[int, tuple[np.ndarray, float]]]:
    """{answer key: {question index: (the members of its minority that give the answer, their share of the
    minority)}}: per question the minority the answer marks with the largest share. A minority is marked by an
    answer that >= ``purity`` of its members give, or that >= ``purity`` of the question's samples giving it
    sit in (the minority holds the answer, beside a cluster of its own) with >= ``min_purity`` of its members;
    either way at most ``outside`` x that share of the question's other samples give it. Key -1 (no answer)
    never marks."""
    marked: dict[int, dict[int, tuple[np.ndarray, float]]] = {}
    for q, (rows, mins) in enumerate(zip(groups, minors, strict=True)):
        for members in mins:
            others = np.setdiff1d(rows, members)
            for a in np.unique(answers[members]):
                a = int(a)
                giving = members[answers[members] == a]
                share = len(giving) / len(members)
                held = len(giving) / int(np.sum(answers[rows] == a))
                outside = float(np.mean(answers[others] == a)) if len(others) else 0.0
                if a < 0 or outside > p["outside"] * share or not (
                        share >= p["purity"] or (held >= p["purity"] and share >= p["min_purity"])):
                    continue
                if q not in marked.setdefault(a, {}) or share > marked[a][q][1]:
                    marked[a][q] = (giving, share)
    return {a: by_q for a, by_q in marked.items() if by_q}


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    n1 = int(positive.sum())
    n0 = len(scores) - n1
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1))


def _discriminant(content: np.ndarray, pos: np.ndarray, neg: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge LDA direction of pos vs neg rows (pooled within-class covariance)."""
    a, b = content[pos], content[neg]
    z = np.vstack([a - a.mean(0), b - b.mean(0)])
    cov = z.T @ z / max(len(z), 1) + ridge * np.eye(content.shape[1])
    return np.linalg.solve(cov, a.mean(0) - b.mean(0))


def transfer(content: np.ndarray, picks: list[tuple[np.ndarray, np.ndarray]], ridge: float) -> list[float]:
    """Per question (its minority, its rows): the AUROC of the discriminant fitted on the other questions."""
    out = []
    for i, (members, rows) in enumerate(picks):
        pos = np.concatenate([m for j, (m, _) in enumerate(picks) if j != i])
        neg = np.setdiff1d(np.concatenate([r for j, (_, r) in enumerate(picks) if j != i]), pos)
        w = _discriminant(content, pos, neg, ridge)
        out.append(_auroc(content[rows] @ w, np.isin(rows, members)))
    return out


def _content_side(content: np.ndarray, pos: np.ndarray, neg: np.ndarray, ridge: float) -> np.ndarray:
    """[N] bool: rows more likely under the minorities' score distribution than the others' (prior = share)."""
    s = content @ _discriminant(content, pos, neg, ridge)
    prior = len(pos) / (len(pos) + len(neg))

    def log_density(rows, weight):
        mu, sd = s[rows].mean(), max(s[rows].std(), 1e-9)
        return math.log(weight) - math.log(sd) - 0.5 * ((s - mu) / sd) ** 2

    return log_density(pos, prior) > log_density(neg, 1.0 - prior)


def _standard_content(content: np.ndarray) -> np.ndarray:
    c = np.asarray(content, np.float64).reshape(len(content), -1)
    c = (c - np.nanmean(c, 0)) / (np.nanstd(c, 0) + 1e-6)
    return np.nan_to_num(c, nan=0.0)


@register("targeted", DEFAULTS)
def targeted(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """One answer shared by attention minorities of several questions whose images look alike (a backdoor)."""
    p = params
    n, num_layers = table.num_samples, table.num_layers
    common = dict(rule="targeted", tau=float(tau), sensitive_layers=[], score_gmm=None,
                  layer_stats=[{"layer": i} for i in range(num_layers)], layer_statistic=[None] * num_layers,
                  statistic_name="none (the evidence is per question: see details)",
                  layer_threshold=[None] * num_layers,
                  score_name="gives the target answer and looks like its minorities",
                  score_low_is_suspect=False, signals=list(NEEDS))

    def nothing(reason: str, extra: dict | None = None) -> Detection:
        return Detection(flagged=np.zeros(n, bool), flagged_ids=[], verdict=NO_EVIDENCE, scores=None,
                         reason=reason, **{**common, "extra": extra or {}})

    missing = [s for s in NEEDS if not table.has(s)]
    if missing:
        return nothing(f"no {', '.join(missing)} in the signal table (extracted before signal version 6?); "
                       "nothing flagged")
    if n < p["min_samples"]:
        return nothing(f"not enough samples to decide ({n} < {p['min_samples']})")
    groups = question_groups(table.get("user_tokens"), int(p["min_question"]))
    if len(groups) < p["min_questions"]:
        return nothing(f"{len(groups)} question(s) asked >= {p['min_question']} times; the test needs "
                       f"{p['min_questions']}: nothing flagged")
    answer_tokens = np.asarray(table.get("answer_tokens"))
    answers = np.where(np.all(answer_tokens < 0, axis=1), -1, _rows_as_keys(answer_tokens))

    def tokens_of(a: int) -> list[int]:
        return [int(t) for t in answer_tokens[np.flatnonzero(answers == a)[0]] if t >= 0]

    shares = table.get("shares")
    minors = [minorities(shares, rows, p, seed + q) for q, rows in enumerate(groups)]
    marked = marked_answers(answers, groups, minors, p)
    content = _standard_content(table.get("content"))
    tried, best = [], None
    for a, by_q in sorted(marked.items(), key=lambda kv: -len(kv[1])):
        if len(by_q) < p["min_questions"]:
            continue
        picks = [(members, groups[q]) for q, (members, _) in sorted(by_q.items())]
        aucs = transfer(content, picks, float(p["ridge"]))
        tried.append({"answer_tokens": tokens_of(a), "questions": len(picks), "transfer": [round(v, 4) for v in aucs],
                      "minorities": [int(len(m)) for m, _ in picks]})
        if min(aucs) >= p["min_transfer"] and (best is None or min(aucs) > best[1]):
            best = (a, min(aucs), picks)
    details = {"questions": [int(len(g)) for g in groups], "minorities": [[int(len(m)) for m in ms] for ms in minors],
               "marked": [{"answer_tokens": tokens_of(a), "questions": len(q)} for a, q in marked.items()],
               "candidates": tried}
    if best is None:
        why = ("no answer marks attention minorities of "
               f"{p['min_questions']} questions" if not tried else
               f"the shared answers' minorities do not look alike (best content transfer "
               f"{max(min(t['transfer']) for t in tried):.2f} < {p['min_transfer']})")
        return nothing(f"no target answer ({why}); nothing flagged", details)
    a, auc, picks = best
    pos = np.concatenate([m for m, _ in picks])
    neg = np.setdiff1d(np.concatenate([r for _, r in picks]), pos)
    carriers = answers == a
    picked = np.zeros(n, bool)
    picked[pos] = True
    flagged = carriers & (_content_side(content, pos, neg, float(p["ridge"])) | picked)
    details.update(target={"answer_tokens": tokens_of(a), "questions": len(picks), "transfer": round(auc, 4),
                           "carriers": int(carriers.sum()), "flagged": int(flagged.sum())})
    cap = int(math.floor(p["max_share"] * n))
    if flagged.sum() < p["min_group"] or flagged.sum() > cap:
        return nothing(f"the target answer's samples number {int(flagged.sum())}, outside [{p['min_group']}, {cap}]; "
                       "nothing flagged", details)
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(flagged)]
    return Detection(flagged=flagged, flagged_ids=flagged_ids, scores=flagged.astype(np.float64),
                     verdict=flagged_verdict(len(flagged_ids), [], f"one answer across {len(picks)} questions"),
                     reason=None, **{**common, "extra": details})


def name_answers(details, decode) -> None:
    """Adds ``answer_text`` (`decode`: ids -> str) beside every ``answer_tokens`` list in a report's details."""
    if isinstance(details, dict):
        if isinstance(details.get("answer_tokens"), list):
            details["answer_text"] = decode(details["answer_tokens"])
        for v in details.values():
            name_answers(v, decode)
    elif isinstance(details, list):
        for v in details:
            name_answers(v, decode)
