"""Tensor-name rule tables: Hugging Face checkpoint keys <-> Flax model parameter paths.

A family's `KeyTable` maps every on-disk tensor name to exactly one model parameter (load) and back
(export). On-disk names are first normalised by `legacy_prefixes` (older save layouts -> the names
of transformers' in-memory modules); `rules` then match the normalised name. On export,
`module_name(path)` gives the normalised name of a parameter and `saved_prefixes` turn it into the
layout transformers' `save_pretrained` writes. Every rule's `Transform` says how a tensor's layout
changes on the way in (torch [out, in] -> Flax [in, out], conv -> matmul) and back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Transform:
    """How one tensor changes layout: `load` (torch -> Flax), `export` (Flax -> torch, may use the
    family's config), `shape` (torch shape -> Flax shape, from the headers alone)."""

    name: str
    load: Callable[[np.ndarray], np.ndarray]
    export: Callable[[np.ndarray, Any], np.ndarray]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]


IDENTITY = Transform("identity", lambda x: x, lambda x, cfg: x, lambda s: tuple(s))
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x, cfg: x.T, lambda s: tuple(s)[::-1])


def conv_to_matmul(kernel_shape: Callable[[Any], tuple[int, ...]]) -> Transform:
    """Conv weight [d, c, *k] <-> matmul kernel [c * prod(k), d] over flattened (c, *k) patches;
    kernel_shape(cfg) = (c, *k) for the export."""
    return Transform(
        "conv_to_matmul",
        lambda x: x.reshape(x.shape[0], -1).T,
        lambda x, cfg: x.T.reshape(x.shape[1], *kernel_shape(cfg)),
        lambda s: (int(np.prod(s[1:])), int(s[0])))


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    target: str | None  # "a/b/{1}/c" with regex groups; None = ignore (non-persistent buffers)
    transform: Transform = IDENTITY

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.transform.shape(tuple(shape))


@dataclass(frozen=True)
class KeyTable:
    """One family's tensor names (see the module docstring)."""

    rules: tuple[Rule, ...]
    legacy_prefixes: tuple[tuple[re.Pattern, str], ...]  # on-disk prefix -> normalised prefix
    saved_prefixes: tuple[tuple[str, str], ...]  # normalised prefix -> save_pretrained's prefix
    module_name: Callable[[tuple | str], str]  # model path -> normalised (transformers in-memory) name
    lm_head: str = "lm_head/kernel"  # the target skipped when the embeddings are tied

    def normalize(self, key: str) -> str:
        for pattern, repl in self.legacy_prefixes:
            if pattern.match(key):
                return pattern.sub(repl, key, count=1)
        return key

    def saved_name(self, normalised: str) -> str:
        for old, new in self.saved_prefixes:
            if normalised.startswith(old):
                return new + normalised[len(old):]
        return normalised

    def match(self, key: str) -> tuple[Rule, re.Match] | None:
        """The single rule matching a normalised key (raises if several match: a table bug)."""
        hits = [(r, m) for r in self.rules if (m := r.pattern.match(key))]
        if len(hits) > 1:
            raise AssertionError(f"rule table is ambiguous for {key}: {[h[0].pattern.pattern for h in hits]}")
        return hits[0] if hits else None


def target_path(rule: Rule, m: re.Match) -> tuple:
    """The model path a matched rule names (digits become int indices)."""
    parts = rule.target.format(*m.groups()).replace(".", "/").split("/")
    return tuple(int(p) if p.isdigit() else p for p in parts)
