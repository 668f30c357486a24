"""Strict JSON out: every file the tool writes parses with any JSON reader (no NaN / Infinity).

Non-finite floats become null (a missing value); numpy scalars and arrays become plain numbers
and lists; tuples and sets become lists.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def strict(obj: Any) -> Any:
    """A copy of `obj` that json.dumps(allow_nan=False) accepts: NaN / +-Inf -> None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return strict(float(obj))
    return obj


def dump_json(obj: Any, *, indent: int | None = None, ensure_ascii: bool = True) -> str:
    """json.dumps of strict(obj) with allow_nan=False (a newline is added when indented)."""
    text = json.dumps(strict(obj), indent=indent, ensure_ascii=ensure_ascii, allow_nan=False)
    return text + "\n" if indent is not None else text
