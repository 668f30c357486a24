"""The ``inserted`` detector: a minority whose questions are other questions of the upload with the same
text inserted, and whose answer attention that text moves (a learnt text trigger).

Inputs: the signal table's ``shares`` [N, L, H, 4] (the answer position's attention share per layer, head
and prompt segment) and ``user_tokens`` [N, T] (the user-text token ids, bye_jax/signals.py). A text
trigger (a rare token before or after the question, a syntactic template around it) is text that the
attacker adds to a minority of questions of every kind; once the model has learnt it, it moves the
answer position's attention in some heads (the trigger redirects what the answer reads). Per table:

1. Attention seeds: the minorities of the per-(layer, head, segment) share columns that the ``shares``
   detector selects (detect/shares.py, steps 1-3, its defaults: a mixture component of 0.5-35% of the
   samples, separated from its neighbours by >= 2 standard deviations on the logit scale).
2. Marker: per seed, the tokens present in >= ``marker_in`` of its samples and in at most ``marker_lift``
   times that share of the others; the marked set is every sample holding all of them, and it must hold
   >= ``seed_cover`` of the seed (a seed that is part of the trigger group grows into all of it).
3. Insertion: a marked sample's question is another question with text added when some unmarked
   question ("twin", >= ``min_twin_tokens`` tokens) lies inside it (>= ``containment`` of the twin's
   tokens, counted with multiplicity) and the sample's tokens other than the marker lie inside the twin
   (>= ``containment`` of them). Evidence needs >= ``inserted_share`` of the marked samples inserted,
   their twins >= ``min_twins`` distinct questions (the text is added to questions of several kinds), and
   the marked set within [``min_share``, ``max_share``] of the upload and >= ``min_group`` samples.
   A clean kind of question does not pass: its own words are its marker, and without them no other
   question remains (its remainder is not inside any unmarked question).

The seed with evidence and the largest marked set wins; its marked samples are flagged. At most
``max_seeds`` seeds are read, most separated first, and at most ``max_markers`` markers get the insertion test,
those with most marked samples inside their seeds first (the twin search: one vectorised containment per
distinct checked question against <= ``max_twins_searched`` twins). No labels, no clean reference data. Without
``shares`` or ``user_tokens`` (an older table): nothing flagged, with the reason.

What it cannot tell: a benign instruction added to a minority of questions of several kinds (e.g. a
fixed "Answer in one word.") that moves the answer's attention reads exactly as a trigger; the report
names the marker tokens so that a person can tell. With unique questions (no unmarked twin of a
triggered question in the upload), nothing is flagged.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, flagged_verdict
from bye_jax.detect.registry import register
from bye_jax.detect.shares import DEFAULTS as SHARES_DEFAULTS
from bye_jax.detect.shares import _jaccard, column_of, select_columns, share_matrix
from bye_jax.signals import SHARE_SEGMENTS, SignalTable

__all__ = ["DEFAULTS", "token_pairs", "markers", "response", "insertion", "inserted", "name_tokens"]

DEFAULTS = {
    "min_share": 0.005,        # smallest marked set (share of the samples) reported as poisoned
    "min_group": 5,            # ... and at least this many samples
    "max_share": 0.35,         # largest marked set
    "min_samples": 20,         # fewer rows: "not enough samples to decide"
    "marker_lift": 2.5,        # a marker token is >= this x more frequent in an attention seed than overall (4 until
                               # 2026-12-05: 2.5 proposed on one miss, then checked on 12 tables made after; BENCHMARKS)
    "same_marked": 0.9,        # tokens whose marked sets overlap this much (Jaccard) form one marker
    "min_response": 0.25,      # marked samples inside the seeds they are enriched in (lift >= marker_lift)
    "containment": 0.85,       # a twin lies inside the marked question: this share of its tokens
    "extra_agreement": 0.6,    # Jaccard of a sample's inserted text with the consensus inserted text
    "min_twin_tokens": 3,      # a twin has at least this many tokens
    "inserted_share": 0.8,     # marked samples with a twin and the consensus inserted text, at least
    "min_twins": 2,            # distinct twin questions, at least
    "max_seeds": 64,           # seeds read, most separated first
    "max_checked": 256,        # marked samples whose twin is searched (evenly spaced), at most
    "max_twins_searched": 4096,  # distinct unmarked questions searched, at most (evenly spaced)
    "max_markers": 16,         # markers whose insertion is tested, at most (highest response first)
}
NO_INPUT = "no share or user-token signals in the signal table (extracted before signal version 5?)"


def _questions(tokens: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in row if t >= 0) for row in np.asarray(tokens)]


def token_pairs(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (row, token id) pairs of a [N, T] token array (-1 = none), as two int64 arrays."""
    tokens = np.asarray(tokens, np.int64)
    rows = np.repeat(np.arange(tokens.shape[0]), tokens.shape[1])
    flat = tokens.reshape(-1)
    keep = flat >= 0
    pairs = np.unique(np.stack([rows[keep], flat[keep]], axis=1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    return pairs[:, 0], pairs[:, 1]


def markers(pairs: tuple[np.ndarray, np.ndarray], n: int, seeds: list[np.ndarray], p: dict,
            bounds: tuple[int, int]) -> list[tuple[list[int], np.ndarray]]:
    """Step 2: [(marker tokens, marked [N] bool)]: tokens >= marker_lift x enriched in some seed, held by
    [bounds] samples, grouped by their marked sets (Jaccard >= same_marked; marked = holding all of them).
    One bincount over the (row, token) pairs per seed: linear in the upload's tokens."""
    lo, hi = bounds
    rows, toks = pairs
    if not len(toks):
        return []
    total = np.bincount(toks)
    candidates: set[int] = set()
    for seed in seeds:
        inside = np.bincount(toks[seed[rows]], minlength=len(total))
        ok = ((inside >= p["min_group"]) & (total >= lo) & (total <= hi)
              & (inside / max(int(seed.sum()), 1) >= p["marker_lift"] * total / n))
        candidates.update(int(t) for t in np.flatnonzero(ok))

    def held(t: int) -> np.ndarray:
        m = np.zeros(n, bool)
        m[rows[toks == t]] = True
        return m

    out: list[tuple[list[int], np.ndarray]] = []
    for t in sorted(candidates, key=lambda t: (total[t], t)):
        mine = held(t)
        for tokens, marked in out:
            if _jaccard(mine, marked) >= p["same_marked"]:
                tokens.append(t)
                marked &= mine
                break
        else:
            out.append(([t], mine))
    return [(sorted(tokens), marked) for tokens, marked in out if lo <= marked.sum() <= hi]


def enriched(marked: np.ndarray, seed: np.ndarray, p: dict) -> bool:
    """The seed holds >= min_group marked samples, marker_lift x their share of the upload."""
    both = int((marked & seed).sum())
    return both >= p["min_group"] and both / seed.sum() >= p["marker_lift"] * marked.mean()


def response(marked: np.ndarray, seeds: list[np.ndarray], hits: list[bool]) -> float:
    """Share of the marked samples inside the seeds they are enriched in (`hits`, per seed: `enriched`)."""
    inside = np.zeros_like(marked)
    for seed, hit in zip(seeds, hits, strict=True):
        if hit:
            inside |= seed
    return float((inside & marked).sum() / max(marked.sum(), 1))


def _bags(questions: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token-count bags of non-empty `questions` in one flat layout: (tokens, counts, start offsets, sizes)."""
    bags = [np.unique(np.asarray(q, np.int64), return_counts=True) for q in questions]
    starts = np.cumsum([0] + [len(t) for t, _ in bags[:-1]]).astype(np.int64)
    return (np.concatenate([t for t, _ in bags]), np.concatenate([c for _, c in bags]), starts,
            np.asarray([len(q) for q in questions], np.int64))


def _best_twin(question: tuple[int, ...], bags) -> tuple[float, int]:
    """(containment, index) of the twin bag most contained in `question` (share of the twin's tokens, counted
    with multiplicity); ties: the longer twin, then the first."""
    toks, counts, starts, sizes = bags
    vocab, mine = np.unique(np.asarray(question, np.int64), return_counts=True)
    at = np.clip(np.searchsorted(vocab, toks), 0, max(len(vocab) - 1, 0))
    held = np.where(vocab[at] == toks, mine[at], 0) if len(vocab) else np.zeros_like(toks)
    score = np.add.reduceat(np.minimum(counts, held), starts) / sizes
    j = int(np.lexsort((-sizes, -score))[0])
    return float(score[j]), j


def insertion(questions: list[tuple[int, ...]], marked: np.ndarray, p: dict) -> dict:
    """Step 3: {inserted (share of the checked marked samples that are a twin plus the consensus inserted
    text), twins (distinct twin questions), checked, text (the consensus inserted tokens), examples}."""
    marked = np.asarray(marked, bool)
    twins = sorted({q for q, m in zip(questions, marked, strict=True) if not m and len(q) >= p["min_twin_tokens"]})
    if len(twins) > p["max_twins_searched"]:
        twins = [twins[i] for i in np.linspace(0, len(twins) - 1, int(p["max_twins_searched"])).astype(int)]
    bags = _bags(twins) if twins else None
    rows = np.flatnonzero(marked)
    if len(rows) > p["max_checked"]:
        rows = rows[np.linspace(0, len(rows) - 1, int(p["max_checked"])).astype(int)]
    matches, found = [], {}  # (row, twin index, inserted text as a Counter); found: per distinct question
    for i in rows if twins else []:
        if questions[i] not in found:
            found[questions[i]] = _best_twin(questions[i], bags)
        best, best_j = found[questions[i]]
        if best >= p["containment"]:
            matches.append((i, best_j, Counter(questions[i]) - Counter(twins[best_j])))
    held = Counter(t for _, _, extra in matches for t in extra)
    consensus = Counter({t: 1 for t, c in held.items() if c >= 0.5 * max(len(matches), 1)})
    agree = [(i, j) for i, j, extra in matches
             if sum((Counter(set(extra)) & consensus).values()) / max(len(set(extra) | set(consensus)), 1)
             >= p["extra_agreement"]]
    examples = [(list(questions[i]), list(twins[j])) for i, j in agree[:3]]
    # the inserted text in the order of the first example (a readable phrase), else by id
    text = [t for t in examples[0][0] if t in consensus] if examples else sorted(consensus)
    return {"inserted": len(agree) / len(rows) if len(rows) else 0.0, "twins": len({j for _, j in agree}),
            "checked": int(len(rows)), "text": text, "examples": examples}


def name_tokens(details, decode) -> None:
    """Adds the text of the token ids in a report's inserted evidence (in place; `decode`: ids -> str): the
    marker and the consensus inserted text (in the order of the first example question), and the (question,
    twin) examples, wherever they sit in `details`."""
    if isinstance(details, dict):
        if "marker" in details and "examples" in details:
            first = details["examples"][0][0] if details["examples"] else []
            marker = set(details["marker"])
            details["marker_text"] = decode([t for t in first if t in marker] if first else details["marker"])
            details["inserted_text"] = decode(details.get("text", []))
            details["examples_text"] = [[decode(q), decode(t)] for q, t in details["examples"]]
        for v in details.values():
            name_tokens(v, decode)
    elif isinstance(details, list):
        for v in details:
            name_tokens(v, decode)


@register("inserted", DEFAULTS)
def inserted(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """A minority whose questions are others with the same text inserted, seen in the answer's attention."""
    p = params
    n, num_layers = table.num_samples, table.num_layers
    common = dict(rule="inserted", tau=float(tau), layer_stats=[{"layer": i} for i in range(num_layers)],
                  score_gmm=None, statistic_name="separation of the attention seed's share column",
                  layer_threshold=[None] * num_layers, score_name="1 for a sample holding the marker",
                  score_low_is_suspect=False, signals=["shares", "user_tokens"])
    sh, tokens = table.get("shares"), table.get("user_tokens")
    if sh is None or tokens is None or np.asarray(tokens).ndim != 2:
        return Detection(sensitive_layers=[], scores=None, flagged=np.zeros(n, bool), flagged_ids=[],
                         verdict=NO_EVIDENCE, layer_statistic=[None] * num_layers,
                         reason=NO_INPUT + "; nothing flagged", **{**common, "signals": []})
    heads = sh.shape[2]
    segs = list(range(len(SHARE_SEGMENTS)))
    raw = share_matrix(sh, segs)
    selected = sorted(select_columns(raw, dict(SHARES_DEFAULTS)), key=lambda s: -s["separation"])
    selected = selected[: int(p["max_seeds"])]
    seeds = [np.asarray(s["votes"], bool) for s in selected]
    questions = _questions(tokens)
    bounds = (max(int(p["min_group"]), int(np.ceil(p["min_share"] * n))), int(np.floor(p["max_share"] * n)))
    found = markers(token_pairs(tokens), n, seeds, p, bounds)
    hits = [[enriched(marked, g, p) for g in seeds] for _, marked in found]
    reacts = [response(marked, seeds, h) for (_, marked), h in zip(found, hits, strict=True)]
    tested = {int(k) for k in np.argsort([-r for r in reacts], kind="stable")[: int(p["max_markers"])]
              if reacts[k] >= p["min_response"]}
    tried, best = [], None
    for m, ((marker, marked), hit, react) in enumerate(zip(found, hits, reacts, strict=True)):
        test = insertion(questions, marked, p) if m in tested else \
            {"inserted": 0.0, "twins": 0, "checked": 0, "text": [], "examples": []}
        ok = react >= p["min_response"] and test["inserted"] >= p["inserted_share"] and test["twins"] >= p["min_twins"]
        cols = [dict(zip(("layer", "head", "segment"), column_of(s["column"], heads, segs), strict=True),
                     separation=s["separation"]) for s, h in zip(selected, hit, strict=True) if h]
        entry = {"marker": marker, "marked": int(marked.sum()), "response": react, "columns": cols[:8],
                 **{k: test[k] for k in ("inserted", "twins", "checked", "text")}, "evidence": ok,
                 "examples": test["examples"]}
        tried.append(entry)
        if ok and (best is None or marked.sum() > best[1].sum()):
            best = (entry, marked)
    stat = [None] * num_layers
    for e in tried:
        for c in e["columns"] if e["evidence"] else []:
            if c["layer"] < num_layers:
                stat[c["layer"]] = max(stat[c["layer"]] or 0.0, c["separation"])
    common["extra"] = {"inserted": {"seeds": len(seeds), "tried": tried[:16]}}
    if best is None:
        why = (f"{len(seeds)} attention seeds, {len(tried)} enriched token sets, none whose samples' questions are "
               f"other questions of the upload with the same text inserted")
        return Detection(sensitive_layers=[], scores=np.zeros(n), flagged=np.zeros(n, bool), flagged_ids=[],
                         verdict=NO_EVIDENCE, layer_statistic=stat, reason=why, **common)
    entry, marked = best
    common["extra"]["inserted"]["evidence"] = entry
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(marked)]
    layers = sorted({c["layer"] for c in entry["columns"]})
    return Detection(sensitive_layers=layers, scores=marked.astype(np.float64), flagged=marked.copy(),
                     flagged_ids=flagged_ids, layer_statistic=stat,
                     verdict=flagged_verdict(len(flagged_ids), layers, f"inserted text (tokens {entry['marker']})"),
                     **common)
