"""LLaVA (transformers' LlavaForConditionalGeneration) in Flax NNX.

CLIP vision tower -> hidden state `vision_feature_layer` (class token dropped for 'default') ->
2-layer projector -> merged into the token embeddings at the image-token positions (static shapes:
a cumulative-sum gather, no per-sample Python loop) -> Llama decoder -> lm_head (tied or not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bye_jax.models.clip import CLIPVisionModel
from bye_jax.models.layers import Dense, activation
from bye_jax.models.llama import KVCache, LlamaModel
from bye_jax.models.llava.config import LlavaConfig
from bye_jax.models.masks import causal_padding_mask, last_token_index, positions_from_mask

Array = jax.Array


class LlavaProjector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Dense(cfg.vision.hidden_size, cfg.text.hidden_size, **kw)
        self.linear_2 = Dense(cfg.text.hidden_size, cfg.text.hidden_size, **kw)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs,
                 attn_impl: str | None = None):
        """attn_impl: None (auto), 'xla' or 'cudnn' for jax.nn.dot_product_attention."""
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = CLIPVisionModel(cfg.vision, attn_impl=attn_impl, **kw)
        self.multi_modal_projector = LlavaProjector(cfg, **kw)
        self.language_model = LlamaModel(cfg.text, attn_impl=attn_impl, **kw)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, **kw))
        self.cfg = cfg
        self.dtype = dtype

    def image_features(self, pixel_values: Array) -> Array:
        """[B, C, H, W] -> [B, num_image_tokens, text_hidden]."""
        feats = self.vision_tower.hidden_state(pixel_values, self.cfg.feature_layer_index)
        if self.cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def embed(self, input_ids: Array, pixel_values: Array | None) -> Array:
        """Token embeddings with image features written at the image-token positions."""
        vocab = self.cfg.text.vocab_size
        embeds = self.language_model.embed_tokens(jnp.clip(input_ids, 0, vocab - 1))
        if pixel_values is None:
            return embeds
        feats = self.image_features(pixel_values).astype(embeds.dtype)
        is_image = input_ids == self.cfg.image_token_id
        slot = jnp.clip(jnp.cumsum(is_image, axis=-1) - 1, 0, feats.shape[1] - 1)
        gathered = jnp.take_along_axis(feats, slot[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, embeds)

    def logits(self, hidden: Array) -> Array:
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, input_ids: Array, pixel_values: Array | None, attention_mask: Array, *,
                 positions: Array | None = None, probe_index: Array | None = None,
                 probe_mask: Array | None = None, logits: str | None = "all", **extra) -> Array | None:
        """Prefill forward. logits: 'all' [B, S, V], 'last' [B, V] at the last real token, or None.

        probe_index [B]: query position whose attention row each layer sows (nnx.Intermediate
        'attn_row'); use `last_token_index(attention_mask)` for BYE's answer position.
        probe_mask [B, S] (the image positions, `PromptBatch.image_mask`): each layer also sows
        'image_hidden' [B, hidden], its input hidden state averaged over those positions with the
        probe row's weights (bye_jax/models/llama.py). extra: the family's other vision inputs.
        """
        if positions is None:
            positions = positions_from_mask(attention_mask)
        embeds = self.embed(input_ids, pixel_values, **extra)
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
        """Runs `embeds` [B, T, D] against the cache; returns last-position logits [B, V] and the cache."""
        hidden, kv_cache = self.language_model(embeds, positions, mask, kv_cache=kv_cache,
                                               cache_index=cache_index)
        return self.logits(hidden[:, -1]).astype(jnp.float32), kv_cache
