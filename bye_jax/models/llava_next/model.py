"""LLaVA-NeXT (transformers' LlavaNextForConditionalGeneration) in Flax NNX.

LLaVA-1.5's model (CLIP tower, projector, Llama / Mistral decoder) run on every view of an image:
pixel_values [B, P, C, H, W] (the processor's views, zero-padded to the batch's largest P) go
through the tower as B * P tiles; each image token then takes the feature its `image_slots` entry
names (bye_jax/models/llava_next/layout.py: base view, unpadded tile grid) or, for -1, the learned
``image_newline`` vector. Padding views are computed and never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bye_jax.models.llava.model import LlavaForConditionalGeneration
from bye_jax.models.llava_next.config import LlavaNextConfig

Array = jax.Array


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, cfg: LlavaNextConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs,
                 attn_impl: str | None = None):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
        param_dtype = dtype if param_dtype is None else param_dtype
        std = cfg.text.hidden_size ** -0.5
        self.image_newline = nnx.Param(jax.nn.initializers.normal(std)(rngs.params(), (cfg.text.hidden_size,),
                                                                       param_dtype))

    def image_features(self, pixel_values: Array) -> Array:
        """[B, P, C, H, W] views -> [B, P * tokens_per_view, text_hidden]."""
        b, p = pixel_values.shape[:2]
        feats = super().image_features(pixel_values.reshape(b * p, *pixel_values.shape[2:]))
        return feats.reshape(b, p * feats.shape[1], feats.shape[2])

    def embed(self, input_ids: Array, pixel_values: Array | None, image_slots: Array | None = None,
              image_sizes: Array | None = None) -> Array:
        """Token embeddings with image features at the image-token positions.

        image_slots [B, N] int32: the k-th image token of a row takes feature image_slots[b, k] of its
        views (-1: image_newline). image_sizes: the processor's (height, width) per image, accepted
        with its other outputs (image_slots already encodes the layout they give).
        """
        vocab = self.cfg.text.vocab_size
        embeds = self.language_model.embed_tokens(jnp.clip(input_ids, 0, vocab - 1))
        if pixel_values is None:
            return embeds
        if image_slots is None:
            raise ValueError("LLaVA-NeXT needs image_slots with pixel_values (see its PromptEncoder)")
        feats = self.image_features(pixel_values).astype(embeds.dtype)
        is_image = input_ids == self.cfg.image_token_id
        k = jnp.clip(jnp.cumsum(is_image, axis=-1) - 1, 0, image_slots.shape[1] - 1)
        slot = jnp.take_along_axis(image_slots, k, axis=1)
        gathered = jnp.take_along_axis(feats, jnp.clip(slot, 0, feats.shape[1] - 1)[..., None], axis=1)
        newline = self.image_newline[...].astype(embeds.dtype)
        gathered = jnp.where((slot >= 0)[..., None], gathered, newline)
        return jnp.where(is_image[..., None], gathered, embeds)
