"""Model configuration dataclasses, read from a Hugging Face checkpoint's config.json.

transformers parses config.json (it fills the defaults that partial configs such as
llava-hf/llava-1.5-7b-hf rely on); the fields the JAX code needs are copied into frozen
dataclasses so modules never touch transformers objects.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

SUPPORTED_VISION_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
SUPPORTED_PROJECTOR_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu")


class ConfigError(ValueError):
    """A checkpoint configuration this port does not support."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"


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


def _rope_theta(text: Any) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" in params and params["rope_type"] not in (None, "default"):
        raise ConfigError(f"rope_type {params['rope_type']!r} is not supported (only 'default')")
    scaling = getattr(text, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"rope scaling {scaling!r} is not supported")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(text, "rope_theta", 10000.0) or 10000.0)


def from_hf_config(hf: Any) -> LlavaConfig:
    """Converts a transformers LlavaConfig object into a LlavaConfig dataclass."""
    if getattr(hf, "model_type", None) != "llava":
        raise ConfigError(f"expected a LLaVA checkpoint (model_type 'llava'), got {hf.model_type!r}")
    v, t = hf.vision_config, hf.text_config
    if getattr(v, "model_type", None) not in ("clip_vision_model", "clip"):
        raise ConfigError(f"unsupported vision tower {v.model_type!r} (CLIP only)")
    if getattr(t, "model_type", None) not in ("llama", "vicuna"):
        raise ConfigError(f"unsupported language model {t.model_type!r} (Llama only)")
    if v.hidden_act not in SUPPORTED_VISION_ACTS:
        raise ConfigError(f"unsupported vision activation {v.hidden_act!r}")
    if hf.projector_hidden_act not in SUPPORTED_PROJECTOR_ACTS:
        raise ConfigError(f"unsupported projector activation {hf.projector_hidden_act!r}")
    if t.hidden_act != "silu":
        raise ConfigError(f"unsupported language-model activation {t.hidden_act!r}")
    if not isinstance(hf.vision_feature_layer, int):
        raise ConfigError("a list of vision_feature_layer values is not supported")
    if hf.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"unknown vision_feature_select_strategy {hf.vision_feature_select_strategy!r}")
    vision = VisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    text = TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads, head_dim=head_dim,
        rms_norm_eps=t.rms_norm_eps, rope_theta=_rope_theta(t),
        max_position_embeddings=t.max_position_embeddings,
        attention_bias=bool(getattr(t, "attention_bias", False)),
        mlp_bias=bool(getattr(t, "mlp_bias", False)),
        hidden_act=t.hidden_act)
    tie = bool(getattr(hf, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False))
    cfg = LlavaConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id),
        image_seq_length=int(getattr(hf, "image_seq_length", vision.num_patches)),
        vision_feature_layer=int(hf.vision_feature_layer),
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        tie_word_embeddings=tie)
    cfg.feature_layer_index  # validates the feature layer  # noqa: B018
    return cfg


def load_config(checkpoint_dir: str | Path) -> LlavaConfig:
    """Reads config.json of a HF LLaVA checkpoint directory (no network)."""
    from transformers import AutoConfig

    path = Path(checkpoint_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for malformed configs
        raise ConfigError(f"{path}/config.json: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return from_hf_config(hf)
