"""InternVL (transformers' InternVLForConditionalGeneration) in Flax NNX, with the BYE probe.

pixel_values [B, P, C, H, W]: each sample's tiles (the processor's views: tiles then a thumbnail, or
one view), zero-padded to the batch's largest P. All B * P tiles go through InternViT; the class
token is dropped, each tile's patch grid is pixel-shuffled (``downsample`` x ``downsample`` patches
folded into one token, transformers' exact reshapes) and projected (LayerNorm -> Linear -> act ->
Linear). The k-th image token of a row takes the row's k-th tile feature (LLaVA's cumulative-sum
gather, bye_jax/models/llava/model.py), so padding tiles are computed and never read. The decoder,
probe, logits and KV-cache decoding are LLaVA's (bye_jax/models/llama.py: Qwen2 through
``TextConfig.qkv_bias``), with ordinary 1-D rotary positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bye_jax.models.internvl.config import InternVLConfig
from bye_jax.models.internvl.vision import InternVisionModel
from bye_jax.models.layers import Dense, LayerNorm, activation
from bye_jax.models.llama import LlamaModel
from bye_jax.models.llava.model import LlavaForConditionalGeneration

Array = jax.Array
PROJECTOR_NORM_EPS = 1e-5  # the projector's nn.LayerNorm is built with torch's default eps


def pixel_shuffle(x: Array, r: int) -> Array:
    """transformers' InternVLModel.pixel_shuffle with scale 1 / r: [B, h, w, C] -> [B, h / r, w / r, C * r * r]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w // r, c * r).transpose(0, 2, 1, 3)
    x = x.reshape(b, w // r, h // r, c * r * r)
    return x.transpose(0, 2, 1, 3)


class InternVLProjector(nnx.Module):
    def __init__(self, cfg: InternVLConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        wide = cfg.vision.hidden_size * cfg.downsample ** 2
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = LayerNorm(wide, eps=PROJECTOR_NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Dense(wide, cfg.text.hidden_size, **kw)
        self.linear_2 = Dense(cfg.text.hidden_size, cfg.text.hidden_size, **kw)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, cfg: InternVLConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs,
                 attn_impl: str | None = None):
        """attn_impl: None (auto), 'xla' or 'cudnn' for jax.nn.dot_product_attention."""
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = InternVisionModel(cfg.vision, attn_impl=attn_impl, **kw)
        self.multi_modal_projector = InternVLProjector(cfg, **kw)
        self.language_model = LlamaModel(cfg.text, attn_impl=attn_impl, **kw)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, **kw))
        self.cfg = cfg
        self.dtype = dtype

    def tile_features(self, tiles: Array) -> Array:
        """[T, C, H, W] tiles -> [T, image_seq_length, text_hidden] projected image tokens."""
        feats = self.vision_tower.features(tiles, self.cfg.feature_index)[:, 1:]  # class token dropped
        t, _, d = feats.shape
        side = self.cfg.vision.patch_grid
        feats = pixel_shuffle(feats.reshape(t, side, side, d), self.cfg.downsample)
        return self.multi_modal_projector(feats.reshape(t, -1, feats.shape[-1]))

    def image_features(self, pixel_values: Array) -> Array:
        """[B, P, C, H, W] tiles -> [B, P * image_seq_length, text_hidden] (tile-major, as the prompt lists them)."""
        if pixel_values.ndim != 5:
            raise ValueError(f"InternVL expects pixel_values [B, tiles, C, H, W], got shape {pixel_values.shape}")
        b, p = pixel_values.shape[:2]
        feats = self.tile_features(pixel_values.reshape(b * p, *pixel_values.shape[2:]))
        return feats.reshape(b, p * feats.shape[1], feats.shape[2])
