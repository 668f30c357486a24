"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration, model_type 'qwen2_5_vl'): a ViT with
2-D rotary positions, window attention and a 2 x 2 patch merger (dynamic resolution: the number of
image tokens varies per image), and a Qwen2 decoder with multimodal 3-D rotary positions.

Modules: config (dataclasses from the HF config), vision / model (Flax NNX), keys (HF tensor-name
rules), loader, inputs (image-only processor adapter), generate (greedy decoding), family (the
registry entry; needs bye_jax/models/family.py).
"""

import importlib.util

from bye_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, from_hf_config
from bye_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

if importlib.util.find_spec("bye_jax.models.family") is not None:  # the family registry is present
    from bye_jax.models.qwen2_5_vl.family import FAMILY  # noqa: F401

__all__ = ["Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "from_hf_config"]
