"""Qwen2.5-VL's entry in the model-family registry (bye_jax/models/family.py, families branch)."""

from __future__ import annotations

import re

from bye_jax.models.family import Family
from bye_jax.models.keys import IDENTITY, TRANSPOSE, KeyTable, Rule, conv_to_matmul
from bye_jax.models.qwen2_5_vl import keys
from bye_jax.models.qwen2_5_vl.config import MODEL_TYPES, Qwen2_5_VLConfig, from_hf_config
from bye_jax.models.qwen2_5_vl.generate import greedy_generate
from bye_jax.models.qwen2_5_vl.inputs import QwenPromptEncoder
from bye_jax.models.qwen2_5_vl.model import LORA_TARGET, Qwen2_5_VLForConditionalGeneration

PATCH_EMBED = conv_to_matmul(lambda cfg: (cfg.vision.in_channels, cfg.vision.temporal_patch_size,
                                          cfg.vision.patch_size, cfg.vision.patch_size))
TRANSFORMS = {"identity": IDENTITY, "transpose": TRANSPOSE, "conv3d": PATCH_EMBED}
KEYS = KeyTable(
    rules=tuple(Rule(re.compile(p), target, TRANSFORMS[t]) for p, target, t in keys.RULE_SPECS),
    legacy_prefixes=keys.LEGACY_PREFIXES, saved_prefixes=keys.SAVED_PREFIXES, module_name=keys.module_name)


def image_grid(cfg: Qwen2_5_VLConfig) -> tuple[int, int]:
    """Dynamic resolution: no fixed grid; 1 x 1 makes every sample's location features use 1 x N."""
    return 1, 1


FAMILY = Family(
    name="qwen2_5_vl",
    model_types=MODEL_TYPES,
    config_from_hf=from_hf_config,
    model_class=Qwen2_5_VLForConditionalGeneration,
    keys=KEYS,
    encoder=QwenPromptEncoder,
    lora_target=LORA_TARGET,
    image_grid=image_grid,
    variable_image_tokens=True,
    generate=greedy_generate,
    vision_module="visual",
    projector_module=None,  # the patch merger is part of the vision tower
)
