"""InternVL configuration (transformers' InternVLConfig, model_type 'internvl': the ``-hf`` checkpoints).

An InternViT tower (`InternVisionConfig`), pixel shuffle by ``1 / downsample_ratio``, a LayerNorm-MLP
projector, and a Qwen2 or Llama decoder (bye_jax.models.config.TextConfig; Qwen2 = q/k/v biases).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bye_jax.models.config import ConfigError, TextConfig, llama_text_config

TEXT_MODEL_TYPES = ("qwen2", "llama")
SUPPORTED_VISION_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu")
SUPPORTED_PROJECTOR_ACTS = SUPPORTED_VISION_ACTS


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    tile_size: int  # square input side in pixels (config image_size); the processor's tiles
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"  # or "rms_norm"
    attention_bias: bool = False
    use_qk_norm: bool = False
    use_mask_token: bool = False
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True  # False: a final LayerNorm on the last hidden state

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_grid(self) -> int:
        return self.tile_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    vision: InternVisionConfig
    text: TextConfig
    image_token_id: int
    image_seq_length: int
    downsample: int = 2  # 1 / downsample_ratio: pixel shuffle folds downsample x downsample patches
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    @property
    def token_grid(self) -> int:
        """Image tokens per side of one tile."""
        return self.vision.patch_grid // self.downsample

    @property
    def feature_index(self) -> int | None:
        """Index into (embeddings, layer 1, ..., layer L) of the features; None: the last hidden state
        (after the final LayerNorm when the tower has one), as transformers' ``vision_feature_layer == -1``."""
        if self.vision_feature_layer == -1:
            return None
        n = self.vision.num_layers + 1
        return self.vision_feature_layer % n


def _square(value: Any, name: str) -> int:
    sides = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value), int(value))
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ConfigError(f"vision {name} {list(sides)} is not square (InternVL's pixel shuffle needs a square grid)")
    return sides[0]


def vision_config(v: Any) -> InternVisionConfig:
    if getattr(v, "model_type", None) != "internvl_vision":
        raise ConfigError(f"unsupported vision tower {getattr(v, 'model_type', None)!r} (InternViT only)")
    if v.hidden_act not in SUPPORTED_VISION_ACTS:
        raise ConfigError(f"unsupported vision activation {v.hidden_act!r}")
    if v.norm_type not in ("layer_norm", "rms_norm"):
        raise ConfigError(f"unsupported vision norm_type {v.norm_type!r}")
    tile, patch = _square(v.image_size, "image_size"), _square(v.patch_size, "patch_size")
    if tile % patch or v.hidden_size % v.num_attention_heads:
        raise ConfigError(f"vision image_size {tile} / patch_size {patch} / heads {v.num_attention_heads} "
                          f"do not divide evenly")
    return InternVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, tile_size=tile, patch_size=patch, num_channels=v.num_channels,
        layer_norm_eps=float(v.layer_norm_eps), hidden_act=v.hidden_act, norm_type=v.norm_type,
        attention_bias=bool(v.attention_bias), use_qk_norm=bool(v.use_qk_norm), use_mask_token=bool(v.use_mask_token),
        use_absolute_position_embeddings=bool(v.use_absolute_position_embeddings),
        use_mean_pooling=bool(v.use_mean_pooling))


def text_config(t: Any) -> TextConfig:
    """Qwen2 (q/k/v biases, no o_proj bias) or Llama; Qwen2's sliding window is refused."""
    text = llama_text_config(t, TEXT_MODEL_TYPES)
    if t.model_type == "qwen2":
        if getattr(t, "use_sliding_window", False):
            raise ConfigError("use_sliding_window=True is not supported (full causal attention only)")
        text = dataclasses.replace(text, attention_bias=False, qkv_bias=True)
    return text


def from_hf_config(hf: Any) -> InternVLConfig:
    """Converts a transformers InternVLConfig object into an InternVLConfig dataclass."""
    if getattr(hf, "model_type", None) != "internvl":
        raise ConfigError(f"expected an InternVL checkpoint (model_type 'internvl'), got {hf.model_type!r}")
    vision = vision_config(hf.vision_config)
    text = text_config(hf.text_config)
    if not isinstance(hf.vision_feature_layer, int):
        raise ConfigError("a list of vision_feature_layer values is not supported")
    if not -(vision.num_layers + 1) <= hf.vision_feature_layer <= vision.num_layers:
        raise ConfigError(f"vision_feature_layer {hf.vision_feature_layer} is out of range for "
                          f"{vision.num_layers} vision layers")
    if hf.vision_feature_select_strategy != "default":
        raise ConfigError(f"vision_feature_select_strategy {hf.vision_feature_select_strategy!r} is not supported "
                          f"(only 'default': the class token is dropped)")
    if hf.projector_hidden_act not in SUPPORTED_PROJECTOR_ACTS:
        raise ConfigError(f"unsupported projector activation {hf.projector_hidden_act!r}")
    inverse = 1.0 / float(hf.downsample_ratio)
    down = int(round(inverse))
    if down < 1 or abs(inverse - down) > 1e-6 or vision.patch_grid % down:
        raise ConfigError(f"downsample_ratio {hf.downsample_ratio} must be 1 / n with n dividing the "
                          f"{vision.patch_grid} x {vision.patch_grid} patch grid")
    side = vision.patch_grid // down
    if int(hf.image_seq_length) != side * side:
        raise ConfigError(f"image_seq_length {hf.image_seq_length} != {side * side} tokens per tile "
                          f"({vision.patch_grid} patches per side, downsampled {down}x)")
    return InternVLConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id), image_seq_length=side * side,
        downsample=down, vision_feature_layer=int(hf.vision_feature_layer),
        projector_hidden_act=hf.projector_hidden_act, tie_word_embeddings=bool(hf.tie_word_embeddings))
