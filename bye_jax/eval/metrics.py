"""Evaluation metrics: clean performance (CP), attack success rate (ASR), detection P / R / F1.

CP and ASR are PERCENT (0-100), like the paper's tables; detection precision / recall / F1 are
FRACTIONS (0-1) in every JSON file (report.json, eval.json, results.json), shown as percent only in
rendered tables (bye_jax/eval/tables.py). Rates over an empty set are NaN (undefined,
not 0: an empty triggered set must not read as a perfect defence); `bye_jax.eval.main` writes them
as JSON null.

Answer matching
---------------
``exact_match(pred, ref)``
    Case-insensitive exact match after stripping (internal runs of whitespace count as one space):
    ``"  The Cat " == "the cat"``, but ``"cat." != "cat"``.
``normalize_answer(text)`` (VQA-style, for the ``normalized`` and ``contains`` modes), in order:
    1. lowercase (``str.lower``), strip;
    2. thousands separators between digits are dropped (``1,000`` -> ``1000``);
    3. apostrophes are deleted (``don't`` -> ``dont``); every other punctuation character (ASCII
       ``string.punctuation`` or Unicode category P*) becomes a space, except a period between two
       digits (``3.5`` stays);
    4. number words ``zero`` .. ``ten`` become digits (``two`` -> ``2``);
    5. the articles ``a``, ``an``, ``the`` are removed as whole words -- unless nothing else is left,
       so an option-letter answer ``"A"`` stays ``"a"`` (ScienceQA-style answers stay comparable);
    6. whitespace is collapsed to single spaces.
``contains_match(pred, ref)``
    The normalised reference occurs in the normalised prediction as a run of whole words
    (``"no"`` is not found in ``"north"``). An empty normalised reference matches only an empty
    normalised prediction.

``attack_success_rate(preds, target)``: percent of outputs containing the target text,
case-insensitive, whitespace runs collapsed (``"... BACKDOOR  attack! ..."`` counts).
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

UNITS = {"cp": "percent", "asr": "percent", "detection": "fraction"}  # the "units" entry of the JSON files

__all__ = [
    "CP_MODES",
    "attack_success_rate",
    "clean_performance",
    "contains_match",
    "detection_metrics",
    "exact_match",
    "normalize_answer",
    "normalized_match",
]

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")


def _squash(text: str) -> str:
    return " ".join(str(text).split())


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation (see the module docstring for the exact steps)."""
    text = _THOUSANDS.sub("", str(text).lower().strip())
    chars = []
    for i, ch in enumerate(text):
        if ch in "'\u2019":
            continue
        if ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
            chars.append(ch)
        elif _is_punct(ch):
            chars.append(" ")
        else:
            chars.append(ch)
    words = [_NUMBER_WORDS.get(w, w) for w in "".join(chars).split()]
    kept = [w for w in words if w not in _ARTICLES]
    return " ".join(kept if kept else words)


def exact_match(pred: str, ref: str) -> bool:
    """Case-insensitive exact match after stripping (whitespace runs collapsed)."""
    return _squash(pred).casefold() == _squash(ref).casefold()


def normalized_match(pred: str, ref: str) -> bool:
    """Exact match of the normalised texts."""
    return normalize_answer(pred) == normalize_answer(ref)


def contains_match(pred: str, ref: str) -> bool:
    """The normalised reference occurs, as whole words, in the normalised prediction."""
    r, p = normalize_answer(ref), normalize_answer(pred)
    if not r:
        return not p
    return f" {r} " in f" {p} "


CP_MODES = {"exact": exact_match, "normalized": normalized_match, "contains": contains_match}


def _aligned(preds, refs) -> tuple[list[str], list[str]]:
    if isinstance(refs, Mapping):
        if not isinstance(preds, Mapping):
            raise TypeError("refs is a mapping (id -> answer): preds must be one too")
        keys = list(refs)
        return [preds.get(k) or "" for k in keys], [refs[k] for k in keys]
    if isinstance(preds, Mapping):
        raise TypeError("preds is a mapping (id -> answer): refs must be one too")
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    return preds, refs


def clean_performance(preds: Sequence[str] | Mapping[str, str], refs: Sequence[str] | Mapping[str, str],
                      mode: str = "exact") -> float:
    """Percent of predictions matching their reference; NaN for an empty set.

    ``preds`` / ``refs``: aligned sequences, or mappings id -> text (scored over the ids of
    ``refs``; an id missing from ``preds`` counts as a wrong answer). ``mode``: ``exact``
    (`exact_match`), ``normalized`` (`normalized_match`) or ``contains`` (`contains_match`).
    """
    if mode not in CP_MODES:
        raise ValueError(f"mode must be one of {', '.join(CP_MODES)}, got {mode!r}")
    p, r = _aligned(preds, refs)
    if not r:
        return math.nan
    match = CP_MODES[mode]
    return 100.0 * sum(bool(match(a, b)) for a, b in zip(p, r, strict=True)) / len(r)


def attack_success_rate(preds: Iterable[str] | Mapping[str, str], target: str) -> float:
    """Percent of outputs containing ``target`` (case-insensitive, whitespace collapsed); NaN if empty."""
    t = _squash(target).casefold()
    if not t:
        raise ValueError("the target text is empty")
    outs = list(preds.values()) if isinstance(preds, Mapping) else list(preds)
    if not outs:
        return math.nan
    return 100.0 * sum(t in _squash(o).casefold() for o in outs) / len(outs)


def detection_metrics(report: str | os.PathLike | Mapping, poisoned_ids: Iterable[str] | None = None
                      ) -> dict[str, float]:
    """Detection ``{precision, recall, f1}`` as FRACTIONS in [0, 1] from a filter report (path or dict).

    With ``poisoned_ids`` the values are computed from the report's ``flagged_ids`` against them;
    otherwise the report's own ``precision`` / ``recall`` / ``f1`` (fractions, as
    `bye_jax.detect.precision_recall_f1` writes them) are used. Raises ValueError when the report
    cannot be read or has neither.
    """
    if isinstance(report, str | os.PathLike):
        path = Path(report)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the report {path}: {_squash(e)}") from e
    if not isinstance(report, Mapping):
        raise ValueError(f"the report is a JSON {type(report).__name__}, expected an object")
    if poisoned_ids is not None:
        if "flagged_ids" not in report:
            raise ValueError("the report has no flagged_ids")
        flagged, poisoned = {str(i) for i in report["flagged_ids"]}, {str(i) for i in poisoned_ids}
        tp = len(flagged & poisoned)
        p = tp / len(flagged) if flagged else 0.0
        r = tp / len(poisoned) if poisoned else 0.0
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        return {"precision": p, "recall": r, "f1": f1}
    missing = [k for k in ("precision", "recall", "f1") if k not in report]
    if missing:
        raise ValueError(f"the report has no {', '.join(missing)} (no ground truth in its dataset?)")
    return {k: float(report[k]) for k in ("precision", "recall", "f1")}
