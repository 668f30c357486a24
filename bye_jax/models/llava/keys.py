"""LLaVA's tensor names: transformers 5 in-memory names, the older save layouts, and the export layout.

Legacy on-disk names (``language_model.model.*``, ``vision_tower.*``, ...) are rewritten to the
in-memory layout (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``) before the
rules match; an export writes what transformers 5's save_pretrained writes.
"""

from __future__ import annotations

import re

from bye_jax.models.keys import TRANSPOSE, KeyTable, Rule, conv_to_matmul

LEGACY_PREFIXES = (
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
)

# transformers 5 in-memory names -> the names its save_pretrained writes (the inverse of LEGACY_PREFIXES).
SAVED_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)

PATCH_EMBEDDING = conv_to_matmul(lambda cfg: (cfg.vision.num_channels, cfg.vision.patch_size, cfg.vision.patch_size))

_V = r"model\.vision_tower\.(?:vision_model\.)?"
_L = r"model\.language_model\."
CLIP_RULES: tuple[Rule, ...] = (
    Rule(re.compile(_V + r"embeddings\.class_embedding$"), "vision_tower/embeddings/class_embedding"),
    Rule(re.compile(_V + r"embeddings\.patch_embedding\.weight$"),
         "vision_tower/embeddings/patch_embedding", PATCH_EMBEDDING),
    Rule(re.compile(_V + r"embeddings\.position_embedding\.weight$"),
         "vision_tower/embeddings/position_embedding"),
    Rule(re.compile(_V + r"embeddings\.position_ids$"), None),
    Rule(re.compile(_V + r"(pre_layrnorm|post_layernorm)\.(weight|bias)$"), "vision_tower/{0}/{1}"),
    Rule(re.compile(_V + r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$"),
         "vision_tower/layers/{0}/{1}/kernel", TRANSPOSE),
    Rule(re.compile(_V + r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.bias$"),
         "vision_tower/layers/{0}/{1}/bias"),
    Rule(re.compile(_V + r"encoder\.layers\.(\d+)\.(layer_norm[12])\.(weight|bias)$"),
         "vision_tower/layers/{0}/{1}/{2}"),
)
PROJECTOR_RULES: tuple[Rule, ...] = (
    Rule(re.compile(r"model\.multi_modal_projector\.(linear_[12])\.weight$"),
         "multi_modal_projector/{0}/kernel", TRANSPOSE),
    Rule(re.compile(r"model\.multi_modal_projector\.(linear_[12])\.bias$"), "multi_modal_projector/{0}/bias"),
)
LLAMA_RULES: tuple[Rule, ...] = (
    Rule(re.compile(_L + r"embed_tokens\.weight$"), "language_model/embed_tokens/weight"),
    Rule(re.compile(_L + r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$"),
         "language_model/layers/{0}/{1}/kernel", TRANSPOSE),
    Rule(re.compile(_L + r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.bias$"),
         "language_model/layers/{0}/{1}/bias"),
    Rule(re.compile(_L + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$"),
         "language_model/layers/{0}/{1}/weight"),
    Rule(re.compile(_L + r"layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$"), None),
    Rule(re.compile(_L + r"norm\.weight$"), "language_model/norm/weight"),
    Rule(re.compile(r"lm_head\.weight$"), "lm_head/kernel", TRANSPOSE),
)
RULES: tuple[Rule, ...] = CLIP_RULES + PROJECTOR_RULES + LLAMA_RULES


def module_name(path: tuple | str) -> str:
    """transformers 5 in-memory module / parameter name for a model path (before the rules)."""
    parts = [str(p) for p in (path.split("/") if isinstance(path, str) else path)]
    if parts[:2] == ["vision_tower", "layers"]:
        parts = ["vision_tower", "encoder", *parts[1:]]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if parts[:2] == ["vision_tower", "embeddings"] and parts[-1] in ("patch_embedding", "position_embedding"):
        parts.append("weight")
    name = ".".join(parts)
    return name if parts[0] == "lm_head" else "model." + name


KEYS = KeyTable(rules=RULES, legacy_prefixes=LEGACY_PREFIXES, saved_prefixes=SAVED_PREFIXES, module_name=module_name)
