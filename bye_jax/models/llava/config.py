"""LLaVA-1.5 configuration (transformers' LlavaConfig, model_type 'llava')."""

from __future__ import annotations

import dataclasses
from typing import Any

from bye_jax.models.config import (
    SUPPORTED_PROJECTOR_ACTS,
    ConfigError,
    TextConfig,
    VisionConfig,
    clip_vision_config,
    llama_text_config,
)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    image_seq_length: int
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    tie_word_embeddings: bool = False

    @property
    def feature_layer_index(self) -> int:
        """Index into the CLIP hidden-state list (0 = embeddings, i = output of layer i)."""
        n = self.vision.num_layers + 1
        idx = self.vision_feature_layer + n if self.vision_feature_layer < 0 else self.vision_feature_layer
        if not 0 <= idx < n:
            raise ConfigError(f"vision_feature_layer {self.vision_feature_layer} out of range for "
                              f"{self.vision.num_layers} vision layers")
        return idx

    @property
    def num_image_tokens(self) -> int:
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra


def check_llava_fields(hf: Any) -> None:
    """The projector / feature-selection fields LLaVA and LLaVA-NeXT share."""
    if hf.projector_hidden_act not in SUPPORTED_PROJECTOR_ACTS:
        raise ConfigError(f"unsupported projector activation {hf.projector_hidden_act!r}")
    if not isinstance(hf.vision_feature_layer, int):
        raise ConfigError("a list of vision_feature_layer values is not supported")
    if hf.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"unknown vision_feature_select_strategy {hf.vision_feature_select_strategy!r}")


def tied_embeddings(hf: Any) -> bool:
    return bool(getattr(hf, "tie_word_embeddings", False) or getattr(hf.text_config, "tie_word_embeddings", False))


def from_hf_config(hf: Any) -> LlavaConfig:
    """Converts a transformers LlavaConfig object into a LlavaConfig dataclass."""
    if getattr(hf, "model_type", None) != "llava":
        raise ConfigError(f"expected a LLaVA checkpoint (model_type 'llava'), got {hf.model_type!r}")
    vision = clip_vision_config(hf.vision_config)
    text = llama_text_config(hf.text_config)
    check_llava_fields(hf)
    cfg = LlavaConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id),
        image_seq_length=int(getattr(hf, "image_seq_length", vision.num_patches)),
        vision_feature_layer=int(hf.vision_feature_layer),
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        tie_word_embeddings=tied_embeddings(hf))
    cfg.feature_layer_index  # validates the feature layer  # noqa: B018
    return cfg
