"""CLIP ViT vision tower (transformers' CLIPVisionModel) in Flax NNX.

Pre-layernorm transformer with a class token and learned position embeddings. Only the layers
up to the requested feature layer are run: LLaVA reads hidden state `vision_feature_layer`, so
later layers (kept for checkpoint fidelity) never cost compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bye_jax.models.config import VisionConfig
from bye_jax.models.layers import Dense, LayerNorm, activation

Array = jax.Array


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        init = jax.nn.initializers.normal(0.02)
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), param_dtype))
        # Conv2d(c, d, p, stride=p, bias=False) as a matmul over flattened (c, p, p) patches.
        self.patch_embedding = nnx.Param(init(rngs.params(), (c * p * p, d), param_dtype))
        self.position_embedding = nnx.Param(init(rngs.params(), (cfg.num_patches + 1, d), param_dtype))
        self.cfg = cfg
        self.dtype = dtype

    def __call__(self, pixel_values: Array) -> Array:
        b, c, h, w = pixel_values.shape
        p = self.cfg.patch_size
        if h != self.cfg.image_size or w != self.cfg.image_size:
            raise ValueError(f"pixel_values are {h}x{w}, the vision tower expects "
                             f"{self.cfg.image_size}x{self.cfg.image_size}")
        x = pixel_values.astype(self.dtype).reshape(b, c, h // p, p, w // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        patches = x @ self.patch_embedding[...].astype(self.dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding[...].astype(self.dtype)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        d = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj = Dense(d, d, **kw), Dense(d, d, **kw)
        self.v_proj, self.out_proj = Dense(d, d, **kw), Dense(d, d, **kw)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_impl = attn_impl

    def __call__(self, x: Array) -> Array:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim**-0.5,
                                           implementation=self.attn_impl)
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                       attn_impl=attn_impl)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = CLIPMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionModel(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, attn_impl=None):
        self.embeddings = CLIPEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, **norm)  # sic: transformers' spelling
        self.layers = nnx.List([
            CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
            for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(cfg.hidden_size, **norm)

    def hidden_state(self, pixel_values: Array, index: int) -> Array:
        """transformers' `hidden_states[index]`: 0 = embeddings after pre_layrnorm, i = layer i's output."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers[:index]:
            x = layer(x)
        return x
