"""Configuration dataclasses of the shared building blocks (CLIP vision tower, Llama decoder).

transformers parses config.json (it fills the defaults that partial configs such as
llava-hf/llava-1.5-7b-hf rely on); the fields the JAX code needs are copied into frozen
dataclasses so modules never touch transformers objects. Each family's own config (e.g.
bye_jax/models/llava/config.py) holds these plus its own fields.
"""

from __future__ import annotations

import dataclasses
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
    qkv_bias: bool | None = None  # biases on q / k / v only (None: attention_bias; Qwen2: True, o_proj none)

    @property
    def has_qkv_bias(self) -> bool:
        return self.attention_bias if self.qkv_bias is None else self.qkv_bias


def _rope_theta(text: Any) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" in params and params["rope_type"] not in (None, "default"):
        raise ConfigError(f"rope_type {params['rope_type']!r} is not supported (only 'default')")
    scaling = getattr(text, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"rope scaling {scaling!r} is not supported")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(text, "rope_theta", 10000.0) or 10000.0)


def clip_vision_config(v: Any) -> VisionConfig:
    """transformers' CLIPVisionConfig -> VisionConfig (ConfigError for an unsupported tower)."""
    if getattr(v, "model_type", None) not in ("clip_vision_model", "clip"):
        raise ConfigError(f"unsupported vision tower {v.model_type!r} (CLIP only)")
    if v.hidden_act not in SUPPORTED_VISION_ACTS:
        raise ConfigError(f"unsupported vision activation {v.hidden_act!r}")
    return VisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)


def llama_text_config(t: Any, model_types: tuple[str, ...] = ("llama", "vicuna")) -> TextConfig:
    """transformers' LlamaConfig (or a config of the same architecture) -> TextConfig."""
    if getattr(t, "model_type", None) not in model_types:
        raise ConfigError(f"unsupported language model {t.model_type!r} ({' / '.join(model_types)} only)")
    if t.hidden_act != "silu":
        raise ConfigError(f"unsupported language-model activation {t.hidden_act!r}")
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads, head_dim=head_dim,
        rms_norm_eps=t.rms_norm_eps, rope_theta=_rope_theta(t),
        max_position_embeddings=t.max_position_embeddings,
        attention_bias=bool(getattr(t, "attention_bias", False)),
        mlp_bias=bool(getattr(t, "mlp_bias", False)),
        hidden_act=t.hidden_act)
