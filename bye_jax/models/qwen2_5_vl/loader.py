"""Loads a Hugging Face Qwen2.5-VL / Qwen2-VL checkpoint directory into the Flax NNX port: the registry's
generic loader (bye_jax/models/hf_loader.py: every key and shape checked from the safetensors headers
first, one error naming every problem, tensors streamed one at a time and checked for NaN / Inf) with
this family's rule table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax

from bye_jax.models.family import load_model
from bye_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from bye_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration


def load_qwen2_5_vl(checkpoint_dir: str | Path, *, dtype: str = "float32", attn_impl: str | None = None,
                    sharding_for: Callable[[tuple, tuple], jax.sharding.Sharding | None] | None = None,
                    ) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig]:
    """(model, config) of a Qwen2.5-VL / Qwen2-VL checkpoint; arguments as family.load_model."""
    return load_model(checkpoint_dir, dtype=dtype, attn_impl=attn_impl, sharding_for=sharding_for)
