"""Qwen2.5-VL / Qwen2-VL configuration dataclasses, read from a Hugging Face checkpoint's config.json.

transformers parses config.json (filling the defaults partial configs rely on); the fields the JAX
code needs are copied into frozen dataclasses. The language model reuses the Llama port's
`TextConfig` (Qwen2 differs only in its biases and its multimodal rotary positions, both handled in
`model.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bye_jax.models.config import ConfigError, TextConfig

MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
SUPPORTED_VISION_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")
SUPPORTED_TEXT_TYPES = ("qwen2_5_vl_text", "qwen2_vl_text")


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    # "qwen2_5_vl": RMSNorm, gated MLP, window attention; "qwen2_vl": LayerNorm, fc1 / fc2 MLP, full attention
    variant: str = "qwen2_5_vl"

    @property
    def windowed(self) -> bool:
        return self.variant == "qwen2_5_vl"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (channels x temporal patch x patch x patch), the processor's rows."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window in merged units (transformers' vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    vision: Qwen2_5_VisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False


def _text_config(t: Any) -> tuple[TextConfig, tuple[int, ...]]:
    params = dict(getattr(t, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default", "mrope"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only the default multimodal rope)")
    if getattr(t, "use_sliding_window", False):
        raise ConfigError("use_sliding_window=True is not supported (transformers' eager attention ignores it)")
    if t.hidden_act != "silu":
        raise ConfigError(f"unsupported language-model activation {t.hidden_act!r}")
    head_dim = t.hidden_size // t.num_attention_heads  # Qwen2_5_VLAttention ignores any head_dim field
    section = tuple(int(s) for s in params.get("mrope_section", (16, 24, 24)))
    if sum(section) != head_dim // 2:
        raise ConfigError(f"mrope_section {list(section)} must sum to head_dim / 2 = {head_dim // 2}")
    text = TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads, head_dim=head_dim,
        rms_norm_eps=t.rms_norm_eps, rope_theta=float(params.get("rope_theta", 1000000.0)),
        max_position_embeddings=t.max_position_embeddings, attention_bias=True, mlp_bias=False,
        hidden_act=t.hidden_act)
    return text, section


def _vision_config(v: Any, model_type: str) -> Qwen2_5_VisionConfig:
    if v.hidden_act not in SUPPORTED_VISION_ACTS:
        raise ConfigError(f"unsupported vision activation {v.hidden_act!r}")
    vparams = dict(getattr(v, "rope_parameters", None) or {})
    if vparams.get("rope_type", "axial") != "axial":
        raise ConfigError(f"vision rope_type {vparams['rope_type']!r} is not supported (only 'axial')")
    common = dict(num_layers=v.depth, num_heads=v.num_heads, patch_size=int(v.patch_size),
                  temporal_patch_size=int(v.temporal_patch_size), in_channels=v.in_channels,
                  spatial_merge_size=v.spatial_merge_size, hidden_act=v.hidden_act,
                  rope_theta=float(vparams.get("rope_theta", 10000.0)), variant=model_type)
    if model_type == "qwen2_vl":  # embed_dim is the tower's width, hidden_size the merger's output
        return Qwen2_5_VisionConfig(
            hidden_size=v.embed_dim, intermediate_size=int(v.embed_dim * v.mlp_ratio), out_hidden_size=v.hidden_size,
            window_size=0, fullatt_block_indexes=tuple(range(v.depth)), **common)
    return Qwen2_5_VisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
        window_size=v.window_size, fullatt_block_indexes=tuple(int(i) for i in v.fullatt_block_indexes), **common)


def from_hf_config(hf: Any) -> Qwen2_5_VLConfig:
    """Converts a transformers Qwen2_5_VLConfig / Qwen2VLConfig object into a Qwen2_5_VLConfig dataclass."""
    if getattr(hf, "model_type", None) not in MODEL_TYPES:
        raise ConfigError(f"expected a Qwen2.5-VL or Qwen2-VL checkpoint (model_type 'qwen2_5_vl' or "
                          f"'qwen2_vl'), got {hf.model_type!r}")
    if getattr(hf.text_config, "model_type", None) not in SUPPORTED_TEXT_TYPES:
        raise ConfigError(f"unsupported language model {hf.text_config.model_type!r}")
    vision = _vision_config(hf.vision_config, hf.model_type)
    if vision.windowed and vision.window_units < 1:
        raise ConfigError(f"window_size {vision.window_size} is smaller than one merged patch")
    if vision.out_hidden_size != hf.text_config.hidden_size:
        raise ConfigError(f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size "
                          f"{hf.text_config.hidden_size}")
    text, section = _text_config(hf.text_config)
    tie = bool(getattr(hf, "tie_word_embeddings", False) or getattr(hf.text_config, "tie_word_embeddings", False))
    return Qwen2_5_VLConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id), video_token_id=int(hf.video_token_id),
        vision_start_token_id=int(hf.vision_start_token_id), mrope_section=section, tie_word_embeddings=tie)


def load_config(checkpoint_dir: str | Path) -> Qwen2_5_VLConfig:
    """Reads config.json of a HF Qwen2.5-VL / Qwen2-VL checkpoint directory (no network)."""
    from transformers import AutoConfig

    path = Path(checkpoint_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for malformed configs
        raise ConfigError(f"{path}/config.json: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return from_hf_config(hf)
