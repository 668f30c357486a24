"""InternViT (transformers' InternVLVisionModel) in Flax NNX.

Patch embedding (conv with bias, as a matmul), class token, absolute position embeddings (used at
the tower's own tile size: the processor's tiles always have it), pre-norm layers (LayerNorm or
RMSNorm by ``norm_type``) with optional q / k RMSNorm over the full width and layer-scale
``lambda_1`` / ``lambda_2`` on both residual branches, and a final LayerNorm unless
``use_mean_pooling``. Parameter names mirror transformers' modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bye_jax.models.clip import CLIPMLP
from bye_jax.models.internvl.config import InternVisionConfig
from bye_jax.models.layers import Dense, LayerNorm, RMSNorm

Array = jax.Array
QK_NORM_EPS = 1e-6  # InternVLVisionRMSNorm's default (the q / k norms are built without the config's eps)


def _norm(cfg: InternVisionConfig, *, dtype, param_dtype):
    norm = LayerNorm if cfg.norm_type == "layer_norm" else RMSNorm
    return norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)


class PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, c = cfg.patch_size, cfg.num_channels
        # Conv2d(c, d, p, stride=p) on one patch = a matmul over its flattened (c, p, p) values
        self.projection = Dense(c * p * p, cfg.hidden_size, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
        self.cfg = cfg

    def __call__(self, pixel_values: Array) -> Array:
        b, c, h, w = pixel_values.shape
        p = self.cfg.patch_size
        x = pixel_values.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
        return self.projection(x.reshape(b, (h // p) * (w // p), c * p * p))


class Embeddings(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        init = jax.nn.initializers.normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
        self.mask_token = nnx.Param(jnp.zeros((1, 1, d), param_dtype)) if cfg.use_mask_token else None  # unused
        self.patch_embeddings = PatchEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embeddings = (nnx.Param(init(rngs.params(), (1, cfg.patch_grid ** 2 + 1, d), param_dtype))
                                    if cfg.use_absolute_position_embeddings else None)
        self.cfg = cfg
        self.dtype = dtype

    def __call__(self, pixel_values: Array) -> Array:
        b, _, h, w = pixel_values.shape
        if h != self.cfg.tile_size or w != self.cfg.tile_size:
            raise ValueError(f"pixel_values are {h}x{w}, the vision tower expects "
                             f"{self.cfg.tile_size}x{self.cfg.tile_size} tiles")
        x = self.patch_embeddings(pixel_values.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings[...].astype(self.dtype)
        return x


class Attention(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, d, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Dense(d, d, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Dense(d, d, use_bias=cfg.attention_bias, **kw)
        self.projection_layer = Dense(d, d, use_bias=True, **kw)
        norm = dict(eps=QK_NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(d, **norm) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(d, **norm) if cfg.use_qk_norm else None
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_impl = attn_impl

    def __call__(self, x: Array) -> Array:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (b, t, self.num_heads, self.head_dim)
        out = jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                           scale=self.head_dim**-0.5, implementation=self.attn_impl)
        return self.projection_layer(out.reshape(b, t, -1))


class Layer(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        self.attention = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
        self.mlp = CLIPMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # fc1 -> act -> fc2, as CLIP's
        self.layernorm_before = _norm(cfg, dtype=dtype, param_dtype=param_dtype)
        self.layernorm_after = _norm(cfg, dtype=dtype, param_dtype=param_dtype)
        self.lambda_1 = nnx.Param(jnp.full((cfg.hidden_size,), 0.1, param_dtype))
        self.lambda_2 = nnx.Param(jnp.full((cfg.hidden_size,), 0.1, param_dtype))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x = x + self.lambda_1[...].astype(self.dtype) * self.attention(self.layernorm_before(x))
        return x + self.lambda_2[...].astype(self.dtype) * self.mlp(self.layernorm_after(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        self.layer = nnx.List([Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
                               for _ in range(cfg.num_layers)])


class InternVisionModel(nnx.Module):
    def __init__(self, cfg: InternVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attn_impl=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = Embeddings(cfg, **kw)
        self.encoder = Encoder(cfg, attn_impl=attn_impl, **kw)
        self.layernorm = (None if cfg.use_mean_pooling else
                          LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype))

    def features(self, pixel_values: Array, index: int | None) -> Array:
        """[B, C, H, W] tiles -> hidden state `index` of (embeddings, layer 1, ..., layer L) [B, 1 + P, D];
        None: the last hidden state (after the final LayerNorm when there is one). Later layers are not run."""
        x = self.embeddings(pixel_values)
        layers = self.encoder.layer if index is None else self.encoder.layer[:index]
        for layer in layers:
            x = layer(x)
        if index is None and self.layernorm is not None:
            x = self.layernorm(x)
        return x
