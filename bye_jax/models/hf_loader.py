"""Loads a Hugging Face checkpoint directory into a family's Flax NNX model.

The family's rule table (bye_jax/models/keys.py) maps every tensor name to exactly one model
parameter (and how to transform it); legacy on-disk names are first rewritten to the current layout.
All keys and shapes are checked from the safetensors headers before any data is read; a single error
names every unmatched, missing or mis-shaped key. The model is built with `nnx.eval_shape` (no
allocation) and filled one tensor at a time: each is cast to the configured dtype and placed with
`jax.device_put` (optionally onto a sharding), so a 7B model never exists twice in host memory. Each
tensor is checked for NaN / Inf on the host (after the cast, so a float16 overflow counts too)
before it is placed: a checkpoint with non-finite weights is refused with a `CheckpointError` naming
the tensor, instead of silently producing NaN attention.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bye_jax.models.keys import KeyTable, target_path
from bye_jax.models.safetensors_io import SafetensorsFile, checkpoint_files

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """The checkpoint does not match the model; the message names every offending key."""


def resolve_attn_impl(attn_impl: str | None, dtype: str) -> str:
    """'auto' / None -> cuDNN fused attention on GPU for 16-bit dtypes (it supports no float32),
    XLA everywhere else. On one H100 (LLaVA-1.5-7B, bf16, batch 48) cuDNN extracts 1.2x faster."""
    if attn_impl not in (None, "auto"):
        return attn_impl
    return "cudnn" if jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16") else "xla"


def abstract_model(family, cfg, dtype, attn_impl):
    """The family's model with shapes only (no allocation)."""
    return nnx.eval_shape(lambda: family.model_class(cfg, dtype=dtype, rngs=nnx.Rngs(0), attn_impl=attn_impl))


def plan_load(files: list[Path], expected: dict[tuple, tuple[int, ...]], tied: bool, keys: KeyTable):
    """Checks every key and shape from the headers; returns [(file, key, rule, path)] or raises."""
    plan, unmatched, misshaped, seen = [], [], [], {}
    for f in files:
        st = SafetensorsFile(f)
        try:
            for key in st.header:
                hit = keys.match(keys.normalize(key))
                if hit is None:
                    unmatched.append(key)
                    continue
                rule, m = hit
                if rule.target is None or (tied and rule.target == keys.lm_head):
                    continue
                path = target_path(rule, m)
                if path not in expected:
                    unmatched.append(key)
                    continue
                if path in seen:
                    unmatched.append(f"{key} (duplicate of {seen[path]})")
                    continue
                got = rule.shape_of(st.shape(key))
                if got != expected[path]:
                    misshaped.append(f"{key}: checkpoint {tuple(st.shape(key))} (as {got}), "
                                     f"model expects {expected[path]}")
                    continue
                seen[path] = key
                plan.append((f, key, rule, path))
        finally:
            st.close()
    missing = ["/".join(map(str, p)) for p in expected if p not in seen]
    problems = []
    if unmatched:
        problems.append(f"unexpected tensors: {', '.join(sorted(unmatched))}")
    if missing:
        problems.append(f"missing parameters: {', '.join(sorted(missing))}")
    if misshaped:
        problems.append(f"wrong shapes: {'; '.join(misshaped)}")
    if problems:
        raise CheckpointError(" | ".join(problems))
    return plan


# All-ones exponent = Inf or NaN; (bits & mask).max() < mask is ~4x faster than np.isfinite on bfloat16.
_EXPONENT_MASKS = {np.dtype(jnp.bfloat16): (np.uint16, 0x7F80), np.dtype(np.float16): (np.uint16, 0x7C00),
                   np.dtype(np.float32): (np.uint32, 0x7F800000)}


def _all_finite(host: np.ndarray) -> bool:
    if host.size == 0:
        return True
    if host.dtype in _EXPONENT_MASKS:
        uint, mask = _EXPONENT_MASKS[host.dtype]
        return int(np.bitwise_and(host.view(uint), mask).max()) < mask
    return bool(np.isfinite(host).all())


def _non_finite(cast: np.ndarray, key: str, file: Path, dtype: str) -> CheckpointError:
    """The error naming a tensor with NaN or Inf (counted in the dtype it is loaded as; index in the
    checkpoint's own layout)."""
    bad = ~np.isfinite(cast)
    n_nan, n_bad = int(np.isnan(cast).sum()), int(bad.sum())
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return CheckpointError(f"non-finite weights: tensor {key} in {file.name} has {n_nan} NaN and {n_bad - n_nan} "
                           f"infinite values (as {dtype}; first at index {first}); refusing to load it")


def load_weights(family, cfg, checkpoint_dir: str | Path, *, dtype: str = "float32", attn_impl: str | None = None,
                 sharding_for: Callable[[tuple, tuple], jax.sharding.Sharding | None] | None = None):
    """Builds `family`'s model of `cfg` and fills it from a HF checkpoint directory; returns (model, cfg).

    Use bye_jax.models.family.load_model (it reads the config and picks the family).
    sharding_for(path, shape) may return where each parameter goes (None: the default device).
    attn_impl: 'xla', 'cudnn', or None / 'auto' (see `resolve_attn_impl`).
    dtype float32 also sets jax's default matmul precision to 'highest' for the process when it is
    lower on an accelerator (CPU float32 matmuls are float32 already, and 'highest' slows XLA:CPU
    down by about a quarter): on GPUs jax's default is TF32 (entropies then miss the 1e-4 parity measured on an H100),
    on TPUs bfloat16 passes; float32 is asked for to get float32 numerics.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = Path(checkpoint_dir)
    jdtype = DTYPES[dtype]
    low = (None, "default", "bfloat16", "tensorfloat32")
    if dtype == "float32" and jax.default_backend() != "cpu" and jax.config.jax_default_matmul_precision in low:
        jax.config.update("jax_default_matmul_precision", "highest")  # (CPU float32 is float32 already)
    graphdef, abstract = nnx.split(abstract_model(family, cfg, jdtype, resolve_attn_impl(attn_impl, dtype)))
    flat = dict(nnx.to_flat_state(abstract))
    expected = {p: tuple(v.get_value().shape) for p, v in flat.items()}
    files = checkpoint_files(ckpt)
    plan = plan_load(files, expected, cfg.tie_word_embeddings, family.keys)
    handles = {f: SafetensorsFile(f) for f in files}
    try:
        for f, key, rule, path in plan:
            raw = handles[f].tensor(key)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, in one line
                host = np.ascontiguousarray(rule.transform.load(raw).astype(jdtype))
                if not _all_finite(host):
                    raise _non_finite(raw.astype(jdtype), key, f, dtype)
            sharding = sharding_for(path, host.shape) if sharding_for else None
            flat[path] = flat[path].replace(jax.device_put(host, sharding))
            del host
    finally:
        for h in handles.values():
            h.close()
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model, cfg
