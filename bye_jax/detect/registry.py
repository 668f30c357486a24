"""Detectors by name: ``@register("name", defaults={...})`` on ``fn(table, params, *, tau, seed)``.

``params`` is a plain dict: the detector's defaults updated with its config section
(``config.detect.<name>``, e.g. ``--config.detect.robust.min_share=0.005``). ``run_detector`` checks
the input once for every detector (shape, no infinite value, enough rows) so a detector never sees
an infinite entropy and never decides on a handful of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bye_jax.detect.base import MIN_SAMPLES, NOT_ENOUGH, Detection, check_entropy, check_tau
from bye_jax.signals import SignalTable

__all__ = ["Detector", "DETECTORS", "register", "get_detector", "run_detector", "as_table"]

DetectFn = Callable[..., Detection]


@dataclass(frozen=True)
class Detector:
    name: str
    fn: DetectFn
    defaults: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


DETECTORS: dict[str, Detector] = {}


def register(name: str, defaults: Mapping[str, Any] | None = None, doc: str = ""):
    """Decorator: makes ``fn(table, params, *, tau, seed) -> Detection`` the detector ``name``."""

    def wrap(fn: DetectFn) -> DetectFn:
        if name in DETECTORS:
            raise ValueError(f"detector {name!r} is registered twice")
        DETECTORS[name] = Detector(name, fn, dict(defaults or {}), doc or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def get_detector(name: str) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]


def as_table(data, ids: Sequence[Hashable] | None = None) -> SignalTable:
    """A SignalTable from a table or an [N, L] entropy matrix (ids default to 0..N-1)."""
    if isinstance(data, SignalTable):
        return data
    X = np.asarray(data, np.float32)
    ids = list(range(X.shape[0])) if ids is None else list(ids)
    if len(ids) != X.shape[0]:
        raise ValueError(f"{len(ids)} ids for {X.shape[0]} rows of the entropy matrix")
    return SignalTable(ids, {"entropy": X})


def _params(det: Detector, params: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(det.defaults)
    for k, v in dict(params or {}).items():
        if k not in out:
            raise ValueError(f"detector {det.name!r} has no parameter {k!r}; known: {', '.join(sorted(out)) or 'none'}")
        out[k] = v
    return out


def not_enough(name: str, table: SignalTable, tau: float, params: dict, minimum: int) -> Detection:
    n = table.num_samples
    return Detection(
        rule=name, tau=tau, sensitive_layers=[], layer_stats=[], scores=None, score_gmm=None,
        flagged=np.zeros(n, bool), flagged_ids=[], verdict=NOT_ENOUGH, params=params,
        reason=f"{n} samples; at least {minimum} are needed to decide; nothing flagged",
    )


def run_detector(name: str, data, ids: Sequence[Hashable] | None = None, *, params: Mapping[str, Any] | None = None,
                 tau: float = 2.0, seed: int = 0) -> Detection:
    """Runs the registered detector ``name`` on a SignalTable (or an [N, L] entropy matrix + ids)."""
    det = get_detector(name)
    tau = check_tau(tau)
    p = _params(det, params)
    table = as_table(data, ids)
    check_entropy(table.entropy)
    minimum = max(MIN_SAMPLES, int(p.get("min_samples", MIN_SAMPLES)))
    if table.num_samples < minimum:
        return not_enough(name, table, tau, p, minimum)
    res = det.fn(table, p, tau=tau, seed=seed)
    res.params = p
    return res
