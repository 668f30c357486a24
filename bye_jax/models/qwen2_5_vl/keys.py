"""Qwen2.5-VL / Qwen2-VL tensor names <-> Flax parameter paths (load and merged export).

On disk (the hub files and transformers 5's save_pretrained): ``visual.*``, ``model.*`` (the
decoder), ``lm_head.weight``; transformers' in-memory names are ``model.visual.*``,
``model.language_model.*``, ``lm_head.*``. `LEGACY_PREFIXES` normalise the former to the latter,
`SAVED_PREFIXES` map back. `RULE_SPECS` are (regex over the normalised name, target path with
regex groups, transform name) in the shape of bye_jax/models/keys.py's ``Rule`` on the families
branch; transforms: ``identity``, ``transpose`` (torch Linear [out, in] <-> [in, out]) and
``conv3d`` (patch_embed Conv3d [d, c, t, p, p] <-> matmul [c * t * p * p, d]).
"""

from __future__ import annotations

import re

import numpy as np

LEGACY_PREFIXES = (
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
)
SAVED_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
)

_V = r"model\.visual\."
_L = r"model\.language_model\."
_LIN = "transpose"
RULE_SPECS: tuple[tuple[str, str | None, str], ...] = (
    (_V + r"patch_embed\.proj\.weight$", "visual/patch_embed/proj/kernel", "conv3d"),
    (_V + r"blocks\.(\d+)\.(norm[12])\.(weight|bias)$", "visual/blocks/{0}/{1}/{2}", "identity"),
    (_V + r"blocks\.(\d+)\.(attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj|fc1|fc2))\.weight$",
     "visual/blocks/{0}/{1}/kernel", _LIN),
    (_V + r"blocks\.(\d+)\.(attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj|fc1|fc2))\.bias$",
     "visual/blocks/{0}/{1}/bias", "identity"),
    (_V + r"merger\.ln_q\.(weight|bias)$", "visual/merger/ln_q/{0}", "identity"),
    (_V + r"merger\.mlp\.0\.weight$", "visual/merger/fc1/kernel", _LIN),
    (_V + r"merger\.mlp\.0\.bias$", "visual/merger/fc1/bias", "identity"),
    (_V + r"merger\.mlp\.2\.weight$", "visual/merger/fc2/kernel", _LIN),
    (_V + r"merger\.mlp\.2\.bias$", "visual/merger/fc2/bias", "identity"),
    (_L + r"embed_tokens\.weight$", "language_model/embed_tokens/weight", "identity"),
    (_L + r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$",
     "language_model/layers/{0}/{1}/kernel", _LIN),
    (_L + r"layers\.(\d+)\.(self_attn\.[qkv]_proj)\.bias$", "language_model/layers/{0}/{1}/bias", "identity"),
    (_L + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$",
     "language_model/layers/{0}/{1}/weight", "identity"),
    (_L + r"norm\.weight$", "language_model/norm/weight", "identity"),
    (r"lm_head\.weight$", "lm_head/kernel", _LIN),
)
RULES = tuple((re.compile(p), target, transform) for p, target, transform in RULE_SPECS)


def normalize_key(key: str) -> str:
    for pattern, repl in LEGACY_PREFIXES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def saved_name(normalised: str) -> str:
    for old, new in SAVED_PREFIXES:
        if normalised.startswith(old):
            return new + normalised[len(old):]
    return normalised


def match(key: str) -> tuple[str, str | None, str, tuple] | None:
    """(pattern, target, transform, target path) of the single rule matching a normalised key."""
    hits = [(p, t, tr, m) for p, t, tr in RULES if (m := p.match(key))]
    if len(hits) > 1:
        raise AssertionError(f"rule table is ambiguous for {key}")
    if not hits:
        return None
    pattern, target, transform, m = hits[0]
    if target is None:
        return pattern.pattern, None, transform, ()
    parts = target.format(*m.groups()).replace(".", "/").split("/")
    return pattern.pattern, target, transform, tuple(int(x) if x.isdigit() else x for x in parts)


def load_transform(name: str, x: np.ndarray) -> np.ndarray:
    if name == "transpose":
        return x.T
    if name == "conv3d":
        return x.reshape(x.shape[0], -1).T
    return x


def load_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if name == "transpose":
        return tuple(shape)[::-1]
    if name == "conv3d":
        return (int(np.prod(shape[1:])), int(shape[0]))
    return tuple(shape)


def export_transform(name: str, x: np.ndarray, cfg) -> np.ndarray:
    """The inverse of `load_transform` (cfg: the Qwen2_5_VLConfig, for the Conv3d kernel shape)."""
    if name == "transpose":
        return x.T
    if name == "conv3d":
        v = cfg.vision
        return x.T.reshape(x.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return x


def module_name(path: tuple | str) -> str:
    """transformers' in-memory (normalised) parameter / module name of a model path ('/'-joined or a tuple)."""
    parts = [str(p) for p in (path.split("/") if isinstance(path, str) else path)]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if parts[:2] == ["visual", "merger"] and len(parts) > 2 and parts[2] in ("fc1", "fc2"):
        parts[2:3] = ["mlp", "0" if parts[2] == "fc1" else "2"]
    name = ".".join(parts)
    return name if parts[0] == "lm_head" else "model." + name
