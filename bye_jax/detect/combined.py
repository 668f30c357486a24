"""The ``combined`` detector: every member detector where it finds evidence, quiet where none does.

Members (``members``, comma-separated registered names; default ``robust,text,inserted,targeted``) run on the same
table, each with its parameters from ``member_params`` over its defaults: the filter passes each member's
own section (``--config.detect.robust.min_share=0.01`` tunes robust alone and inside combined). A sample
is flagged when any member with evidence flags it (union):
the image co-location / collapse signal (robust) catches patch triggers (and the image key of a
dual-key trigger), the text co-location signal (text) a text trigger the answer's attention peaks on,
inserted text that moves the answer's attention shares (inserted) prefix / suffix / template text
triggers (and the text key of a dual-key trigger), and one answer shared by attention minorities of several
questions whose images look alike (targeted) a whole-image trigger such as SIG, where the upload repeats its
questions. A member that finds nothing, or whose input is
missing (no text peak, no user or answer tokens), adds nothing. ``shares`` (per-head segment shares)
is not a default member: on the real clean uploads of the detection suite it flags 19-25% of every
upload (BENCHMARKS.md, issue-12 section); ``members=robust,shares,text,inserted,targeted`` adds it.
The upload's flagged share is capped at ``max_share``; beyond it nothing is flagged.

False alarms: a clean upload is flagged only when some member flags it, so the combined false-alarm
rate is at most the sum of the members' (each <= 1% on the clean tables of its tests).
"""

from __future__ import annotations

import math

import numpy as np

from bye_jax.detect.base import NO_EVIDENCE, Detection, flagged_verdict
from bye_jax.detect.registry import DETECTORS, _params, register
from bye_jax.signals import SignalTable

DEFAULTS = {
    "members": "robust,text,inserted,targeted",  # registered detectors
    "max_share": 0.35,           # no verdict flags more than this share of the upload
    "min_samples": 20,
    "member_params": {},         # {member: its parameters}; the filter fills it from config.detect.<member>
}


def _members(spec) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in names if s not in DETECTORS or s == "combined"]
    if bad or not names:
        known = ", ".join(sorted(n for n in DETECTORS if n != "combined"))
        raise ValueError(f"detect.combined.members: unknown or invalid detector(s) {bad or names!r}; known: {known}")
    return list(dict.fromkeys(names))


@register("combined", DEFAULTS)
def combined(table: SignalTable, params: dict, *, tau: float, seed: int) -> Detection:
    """Union of the member detectors' flags where they find evidence; quiet where none does."""
    n, num_layers = table.num_samples, table.num_layers
    results = {}
    given = dict(params.get("member_params") or {})
    for name in _members(params["members"]):
        det = DETECTORS[name]
        mine = _params(det, given.get(name))  # its defaults with the given ones over them; unknown -> ValueError
        results[name] = det.fn(table, mine, tau=tau, seed=seed)
        results[name].params = mine
    with_evidence = [name for name, r in results.items() if r.flagged_ids]
    flagged = np.zeros(n, bool)
    scores = np.zeros(n)
    for name in with_evidence:
        flagged |= results[name].flagged
        s = results[name].scores
        if s is not None:
            scores = np.maximum(scores, np.where(results[name].score_low_is_suspect, 0.0, np.asarray(s, np.float64)))
    layers = sorted({int(i) for name in with_evidence for i in results[name].sensitive_layers})
    stat = [max((v for r in results.values() if i < len(r.layer_statistic) and (v := r.layer_statistic[i]) is not None),
                default=None) for i in range(num_layers)]
    common = dict(
        rule="combined", tau=float(tau), sensitive_layers=layers, score_gmm=None, scores=scores,
        layer_stats=[{"layer": i, **{name: (r.layer_stats[i] if i < len(r.layer_stats) else None)
                                     for name, r in results.items()}} for i in range(num_layers)],
        statistic_name="largest member statistic (each member's own: see details)", layer_statistic=stat,
        layer_threshold=[None] * num_layers, score_name="largest member score of the members with evidence",
        score_low_is_suspect=False, signals=sorted({s for r in results.values() for s in r.signals}),
        extra={"members": {name: {"verdict": r.verdict, "n_flagged": r.n_flagged, "reason": r.reason,
                                  "sensitive_layers": r.sensitive_layers,
                                  **({"details": r.extra} if r.flagged_ids and r.extra else {})}
                           for name, r in results.items()}},
    )
    cap = int(math.floor(params["max_share"] * n))
    if not flagged.any() or flagged.sum() > cap:
        reason = ("no member finds evidence" if not flagged.any() else
                  f"the members flag {int(flagged.sum())} samples together, more than {cap}; nothing flagged")
        return Detection(flagged=np.zeros(n, bool), flagged_ids=[], verdict=NO_EVIDENCE, reason=reason, **common)
    ids = list(table.ids)
    flagged_ids = [ids[i] for i in np.flatnonzero(flagged)]
    signal = " + ".join(f"{name}: {results[name].n_flagged}" for name in with_evidence)
    return Detection(flagged=flagged, flagged_ids=flagged_ids,
                     verdict=flagged_verdict(len(flagged_ids), layers, signal), **common)
