"""InternVL's tensor names: LLaVA's layout (bye_jax/models/llava/keys.py: the same legacy and
save_pretrained prefixes, the same decoder / lm_head rules) with InternViT's and the projector's tensors.
Parameter paths mirror transformers' module names, so `module_name` only swaps ``kernel`` for ``weight``."""

from __future__ import annotations

import re

from bye_jax.models.keys import IDENTITY, TRANSPOSE, KeyTable, Rule, conv_to_matmul
from bye_jax.models.llava.keys import LEGACY_PREFIXES, LLAMA_RULES, SAVED_PREFIXES

PATCH_EMBEDDING = conv_to_matmul(lambda cfg: (cfg.vision.num_channels, cfg.vision.patch_size, cfg.vision.patch_size))

_V = r"model\.vision_tower\."
_LAYER = _V + r"encoder\.layer\.(\d+)\."
_LINEAR = r"(attention\.(?:[qkv]_proj|projection_layer)|mlp\.fc[12])"
RULES: tuple[Rule, ...] = (
    Rule(re.compile(_V + r"embeddings\.(cls_token|mask_token|position_embeddings)$"), "vision_tower/embeddings/{0}"),
    Rule(re.compile(_V + r"embeddings\.patch_embeddings\.projection\.weight$"),
         "vision_tower/embeddings/patch_embeddings/projection/kernel", PATCH_EMBEDDING),
    Rule(re.compile(_V + r"embeddings\.patch_embeddings\.projection\.bias$"),
         "vision_tower/embeddings/patch_embeddings/projection/bias"),
    Rule(re.compile(_LAYER + _LINEAR + r"\.weight$"), "vision_tower/encoder/layer/{0}/{1}/kernel", TRANSPOSE),
    Rule(re.compile(_LAYER + _LINEAR + r"\.bias$"), "vision_tower/encoder/layer/{0}/{1}/bias"),
    Rule(re.compile(_LAYER + r"(attention\.[qk]_norm)\.weight$"), "vision_tower/encoder/layer/{0}/{1}/weight"),
    Rule(re.compile(_LAYER + r"(layernorm_before|layernorm_after)\.(weight|bias)$"),
         "vision_tower/encoder/layer/{0}/{1}/{2}"),
    Rule(re.compile(_LAYER + r"(lambda_[12])$"), "vision_tower/encoder/layer/{0}/{1}"),
    Rule(re.compile(_V + r"layernorm\.(weight|bias)$"), "vision_tower/layernorm/{0}"),
    Rule(re.compile(r"model\.multi_modal_projector\.layer_norm\.(weight|bias)$"),
         "multi_modal_projector/layer_norm/{0}", IDENTITY),
    Rule(re.compile(r"model\.multi_modal_projector\.(linear_[12])\.weight$"),
         "multi_modal_projector/{0}/kernel", TRANSPOSE),
    Rule(re.compile(r"model\.multi_modal_projector\.(linear_[12])\.bias$"), "multi_modal_projector/{0}/bias"),
) + LLAMA_RULES


def module_name(path: tuple | str) -> str:
    """transformers 5 in-memory parameter name of a model path (before the rules)."""
    parts = [str(p) for p in (path.split("/") if isinstance(path, str) else path)]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    name = ".".join(parts)
    return name if parts[0] == "lm_head" else "model." + name


KEYS = KeyTable(rules=RULES, legacy_prefixes=LEGACY_PREFIXES, saved_prefixes=SAVED_PREFIXES, module_name=module_name)
