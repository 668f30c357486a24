"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration) in Flax NNX, with the BYE probe.

Vision tower (vision.py) -> merged image features written into the token embeddings at the
``input_ids == image_token_id`` positions (a cumulative-sum gather, static shapes) -> Qwen2 decoder
(the Llama port with q/k/v biases and no o_proj bias) with multimodal 3-D rotary positions
(`mrope_positions`, transformers' get_rope_index computed on the device from the image grid) ->
lm_head (tied or not). The probe is the Llama port's: every decoder layer sows ``attn_row`` (and,
given a probe mask, ``image_hidden``) under ``language_model/layers/<i>/self_attn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bye_jax.models.layers import Dense, Embed, RMSNorm
from bye_jax.models.llama import (
    PROBE_MLP_CHUNK_BYTES,
    KVCache,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    blocked_prefill,
)
from bye_jax.models.masks import causal_padding_mask, last_token_index
from bye_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from bye_jax.models.qwen2_5_vl.vision import Qwen2_5_VisionModel

Array = jax.Array

# LoRA's default targets: every linear layer of the Qwen2 decoder (as LLaVA's: PEFT's "all-linear" on the LM).
LORA_TARGET = r"language_model/layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)"


def mrope_positions(input_ids: Array, attention_mask: Array, image_grid_thw: Array, image_token_id: int,
                    merge: int) -> Array:
    """[3, B, S] (temporal, height, width) positions as transformers' get_rope_index, one image per sample.

    Text before the image counts 0, 1, ...; image token k (k-th image token of the row) of an image
    starting at position s with a merged grid (h', w') gets (s, s + k // w', s + k % w'); text after it
    continues from s + max(h', w'). Padding positions are 0. A row without image tokens gets 1-D positions.
    """
    real = attention_mask.astype(bool)
    idx = jnp.cumsum(real, axis=-1) - 1
    is_image = (input_ids == image_token_id) & real
    before = jnp.cumsum(is_image, axis=-1) - is_image  # image tokens strictly before each position
    grid = image_grid_thw.astype(jnp.int32)
    lh, lw = grid[:, 1:2] // merge, jnp.maximum(grid[:, 2:3] // merge, 1)
    text = idx - before + jnp.where(before > 0, jnp.maximum(lh, lw), 0)
    start = idx - before
    t = jnp.where(is_image, start, text)
    h = jnp.where(is_image, start + before // lw, text)
    w = jnp.where(is_image, start + before % lw, text)
    return jnp.where(real[None], jnp.stack([t, h, w]), 0).astype(jnp.int32)


def mrope_cos_sin(positions: Array, head_dim: int, theta: float, section: tuple[int, ...], dtype):
    """cos/sin [B, T, head_dim] of 3-D positions [3, B, T]: frequency chunk i (sizes `section`) uses
    axis i % 3, in the rotate-half layout; computed in float32 (Qwen2_5_VLRotaryEmbedding)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [3, B, T, hd/2]
    axis = np.repeat(np.arange(len(section)) % 3, section)
    one_hot = jnp.asarray(axis[None, :] == np.arange(3)[:, None], jnp.float32)  # [3, hd/2]
    chosen = jnp.sum(freqs * one_hot[:, None, None, :], axis=0)  # exact: one non-zero term per entry
    emb = jnp.concatenate([chosen, chosen], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Qwen2Attention(LlamaAttention):
    """Llama attention with biases on q, k, v and none on o (transformers' Qwen2_5_VLAttention)."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        d, n, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, n * hd, use_bias=True, **kw)
        self.k_proj = Dense(d, kv * hd, use_bias=True, **kw)
        self.v_proj = Dense(d, kv * hd, use_bias=True, **kw)
        self.o_proj = Dense(n * hd, d, use_bias=False, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = n, kv, hd
        self.attn_impl = attn_impl
        self.blocked_prefill = blocked_prefill(attn_impl)


class Qwen2DecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Qwen2Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Qwen2TextModel(LlamaModel):
    """The Llama decoder stack with Qwen2 layers, called with 3-D positions [3, B, T]."""

    def __init__(self, cfg, section: tuple[int, ...], *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, attn_impl=None):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.layers = nnx.List([
            Qwen2DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
            for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = False  # gradient checkpointing (see LlamaModel)
        self.probe_mlp_chunk_bytes = PROBE_MLP_CHUNK_BYTES
        self.section = tuple(section)

    def __call__(self, embeds: Array, positions: Array, mask: Array, *, probe_index=None, probe_mask=None,
                 kv_cache: KVCache | None = None, cache_index=None) -> tuple[Array, KVCache | None]:
        """As LlamaModel, with positions [3, B, T]."""
        cos, sin = mrope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.section, self.dtype)
        return self.run_layers(embeds, cos, sin, mask, probe_index=probe_index, probe_mask=probe_mask,
                               kv_cache=kv_cache, cache_index=cache_index)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs,
                 attn_impl: str | None = None):
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual = Qwen2_5_VisionModel(cfg.vision, attn_impl=attn_impl, **kw)
        self.language_model = Qwen2TextModel(cfg.text, cfg.mrope_section, attn_impl=attn_impl, **kw)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, **kw))
        self.cfg = cfg
        self.dtype = dtype

    def embed(self, input_ids: Array, pixel_values: Array | None, image_grid_thw: Array | None) -> Array:
        """Token embeddings with each sample's image features written at its image-token positions."""
        vocab = self.cfg.text.vocab_size
        embeds = self.language_model.embed_tokens(jnp.clip(input_ids, 0, vocab - 1))
        if pixel_values is None:
            return embeds
        feats = self.visual(pixel_values, image_grid_thw).astype(embeds.dtype)
        is_image = input_ids == self.cfg.image_token_id
        slot = jnp.clip(jnp.cumsum(is_image, axis=-1) - 1, 0, feats.shape[1] - 1)
        gathered = jnp.take_along_axis(feats, slot[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, embeds)

    def positions(self, input_ids: Array, attention_mask: Array, image_grid_thw: Array | None) -> Array:
        if image_grid_thw is None:
            image_grid_thw = jnp.zeros((input_ids.shape[0], 3), jnp.int32)
        return mrope_positions(input_ids, attention_mask, image_grid_thw, self.cfg.image_token_id,
                               self.cfg.vision.spatial_merge_size)

    def logits(self, hidden: Array) -> Array:
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, input_ids: Array, pixel_values: Array | None, attention_mask: Array, *,
                 image_grid_thw: Array | None = None, positions: Array | None = None,
                 probe_index: Array | None = None, probe_mask: Array | None = None,
                 logits: str | None = "all") -> Array | None:
        """Prefill forward. pixel_values [B, P, patch_dim] (one image per sample, zero-padded rows),
        image_grid_thw [B, 3]; positions [3, B, S] (default: `mrope_positions`).

        probe_index [B]: query position whose attention row each decoder layer sows ('attn_row'
        [B, heads, S]); probe_mask [B, S] (with probe_index): each layer also sows 'image_hidden'.
        logits: 'all' [B, S, V], 'last' [B, V] at the last real token, or None.
        """
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("Qwen2.5-VL needs image_grid_thw with pixel_values")
        if positions is None:
            positions = self.positions(input_ids, attention_mask, image_grid_thw)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        if probe_index is None:
            probe_mask = None
        hidden, _ = self.language_model(embeds, positions, causal_padding_mask(attention_mask),
                                        probe_index=probe_index, probe_mask=probe_mask)
        if logits is None:
            return None
        if logits == "last":
            b = hidden.shape[0]
            hidden = hidden[jnp.arange(b), last_token_index(attention_mask)]
        return self.logits(hidden).astype(jnp.float32)

    def decode(self, embeds: Array, positions: Array, mask: Array, kv_cache: KVCache,
               cache_index) -> tuple[Array, KVCache]:
        """Runs `embeds` [B, T, D] at positions [3, B, T] against the cache; last-position logits [B, V]."""
        hidden, kv_cache = self.language_model(embeds, positions, mask, kv_cache=kv_cache, cache_index=cache_index)
        return self.logits(hidden[:, -1]).astype(jnp.float32), kv_cache
