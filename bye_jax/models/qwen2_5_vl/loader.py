"""Loads a Hugging Face Qwen2.5-VL checkpoint directory into the Flax NNX port.

The same procedure as bye_jax/models/hf_loader.py (every key and shape checked from the safetensors
headers before any data is read, one error naming every unmatched / missing / mis-shaped key; the
model built with `nnx.eval_shape` and filled one tensor at a time, each checked for NaN / Inf), with
this family's rule table (keys.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bye_jax.models import hf_loader
from bye_jax.models.hf_loader import DTYPES, CheckpointError, resolve_attn_impl
from bye_jax.models.qwen2_5_vl import keys
from bye_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, load_config
from bye_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration
from bye_jax.models.safetensors_io import SafetensorsFile, checkpoint_files


def plan_load(files: list[Path], expected: dict[tuple, tuple[int, ...]], tied: bool):
    """[(file, key, transform, path)] for every tensor, or a CheckpointError naming every problem."""
    plan, unmatched, misshaped, seen = [], [], [], {}
    for f in files:
        st = SafetensorsFile(f)
        try:
            for key in st.header:
                hit = keys.match(keys.normalize_key(key))
                if hit is None:
                    unmatched.append(key)
                    continue
                _, target, transform, path = hit
                if target is None or (tied and path == ("lm_head", "kernel")):
                    continue
                if path not in expected:
                    unmatched.append(key)
                    continue
                if path in seen:
                    unmatched.append(f"{key} (duplicate of {seen[path]})")
                    continue
                got = keys.load_shape(transform, st.shape(key))
                if got != expected[path]:
                    misshaped.append(f"{key}: checkpoint {tuple(st.shape(key))} (as {got}), "
                                     f"model expects {expected[path]}")
                    continue
                seen[path] = key
                plan.append((f, key, transform, path))
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


def abstract_model(cfg: Qwen2_5_VLConfig, dtype, attn_impl):
    return nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(
        cfg, dtype=dtype, rngs=nnx.Rngs(0), attn_impl=attn_impl))


def load_qwen2_5_vl(checkpoint_dir: str | Path, *, dtype: str = "float32", attn_impl: str | None = None,
                    sharding_for: Callable[[tuple, tuple], jax.sharding.Sharding | None] | None = None,
                    ) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig]:
    """Loads a HF Qwen2.5-VL checkpoint directory; returns (model, config). Arguments as hf_loader.load_llava."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = Path(checkpoint_dir)
    cfg = load_config(ckpt)
    jdtype = DTYPES[dtype]
    low = (None, "default", "bfloat16", "tensorfloat32")
    if dtype == "float32" and jax.default_backend() != "cpu" and jax.config.jax_default_matmul_precision in low:
        jax.config.update("jax_default_matmul_precision", "highest")
    graphdef, abstract = nnx.split(abstract_model(cfg, jdtype, resolve_attn_impl(attn_impl, dtype)))
    flat = dict(nnx.to_flat_state(abstract))
    expected = {p: tuple(v.get_value().shape) for p, v in flat.items()}
    files = checkpoint_files(ckpt)
    plan = plan_load(files, expected, cfg.tie_word_embeddings)
    handles = {f: SafetensorsFile(f) for f in files}
    try:
        for f, key, transform, path in plan:
            raw = handles[f].tensor(key)
            with np.errstate(over="ignore", invalid="ignore"):
                host = np.ascontiguousarray(keys.load_transform(transform, raw).astype(jdtype))
                if not hf_loader._all_finite(host):
                    raise hf_loader._non_finite(raw.astype(jdtype), key, f, dtype)
            sharding = sharding_for(path, host.shape) if sharding_for else None
            flat[path] = flat[path].replace(jax.device_put(host, sharding))
            del host
    finally:
        for h in handles.values():
            h.close()
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg
