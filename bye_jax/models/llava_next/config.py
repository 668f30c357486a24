"""LLaVA-NeXT configuration (transformers' LlavaNextConfig, model_type 'llava_next')."""

from __future__ import annotations

import dataclasses
from typing import Any

from bye_jax.models.config import ConfigError, clip_vision_config, llama_text_config
from bye_jax.models.llava.config import LlavaConfig, check_llava_fields, tied_embeddings

TEXT_MODEL_TYPES = ("llama", "vicuna", "mistral")


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width) resolutions of the anyres tiling

    @property
    def patch_grid(self) -> int:
        """Feature tokens per side of one tile (image_size // patch_size)."""
        return self.vision.image_size // self.vision.patch_size


def _context(t: Any) -> int:
    """max_position_embeddings, or Mistral's sliding window when smaller: within the window, sliding-window
    attention equals full causal attention, so longer prompts are refused as exceeding the context."""
    window = getattr(t, "sliding_window", None) if getattr(t, "use_sliding_window", True) is not False else None
    return int(min(t.max_position_embeddings, window)) if window else int(t.max_position_embeddings)


def from_hf_config(hf: Any) -> LlavaNextConfig:
    """Converts a transformers LlavaNextConfig object into a LlavaNextConfig dataclass."""
    if getattr(hf, "model_type", None) != "llava_next":
        raise ConfigError(f"expected a LLaVA-NeXT checkpoint (model_type 'llava_next'), got {hf.model_type!r}")
    vision = clip_vision_config(hf.vision_config)
    text = llama_text_config(hf.text_config, TEXT_MODEL_TYPES)
    text = dataclasses.replace(text, max_position_embeddings=_context(hf.text_config))
    check_llava_fields(hf)
    if hf.vision_feature_select_strategy != "default":
        raise ConfigError("LLaVA-NeXT with vision_feature_select_strategy 'full' is not supported (its tiles "
                          "do not form a patch grid)")
    pinpoints = tuple((int(h), int(w)) for h, w in hf.image_grid_pinpoints)
    if not pinpoints or any(h % vision.image_size or w % vision.image_size for h, w in pinpoints):
        raise ConfigError(f"image_grid_pinpoints {list(map(list, pinpoints))} must be non-empty multiples of the "
                          f"vision image size {vision.image_size}")
    cfg = LlavaNextConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id),
        image_seq_length=int(getattr(hf, "image_seq_length", vision.num_patches)),
        vision_feature_layer=int(hf.vision_feature_layer),
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        tie_word_embeddings=tied_embeddings(hf), image_grid_pinpoints=pinpoints)
    cfg.feature_layer_index  # validates the feature layer  # noqa: B018
    return cfg
