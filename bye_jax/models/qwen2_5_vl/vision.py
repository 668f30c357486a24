"""Qwen2.5-VL vision tower (transformers' Qwen2_5_VisionTransformerPretrainedModel) in Flax NNX;
Qwen2-VL's (Qwen2VisionTransformerPretrainedModel: LayerNorm, fc1 / fc2 MLP, no windows) with it.

Dynamic resolution with static shapes: each sample's image is a row of `P` flattened patches
(the processor's rows, in its merge-block-major order, zero-padded to the batch's longest image) and
its grid (t, h, w) in patches. Everything transformers derives from the grid on the host (2-D rotary
positions, the window permutation, window and image attention segments, the inverse permutation
after the merger) is computed here with jnp from the traced grid, so padding and batch composition
never change the compiled shapes. Window attention is a block-diagonal mask over the padded row
(`fullatt_block_indexes` layers see the whole image); padding patches only see each other.
One image per sample (one still image: t = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bye_jax.models.clip import CLIPMLP
from bye_jax.models.layers import Dense, LayerNorm, RMSNorm, activation
from bye_jax.models.llama import apply_rope
from bye_jax.models.qwen2_5_vl.config import Qwen2_5_VisionConfig

Array = jax.Array
VISION_NORM_EPS = 1e-6  # transformers hard-codes it for the vision blocks and the merger


class VisionLayout:
    """Per-sample index tables derived from the grid [B, 3] for `P` padded patches (all jnp)."""

    def __init__(self, cfg: Qwen2_5_VisionConfig, grid_thw: Array, num_patches: int):
        m = cfg.spatial_merge_size
        ws = cfg.window_units if cfg.windowed else 1 << 20  # Qwen2-VL: one window (no permutation)
        units = num_patches // cfg.merge_unit
        grid = grid_thw.astype(jnp.int32)
        lh = grid[:, 1] // m
        lw = jnp.maximum(grid[:, 2] // m, 1)
        n_units = grid[:, 0] * lh * (grid[:, 2] // m)
        u = jnp.arange(units)[None, :]
        valid_u = u < n_units[:, None]
        row, col = u // lw[:, None], u % lw[:, None]
        windows_per_row = lw // ws + 1  # transformers pads every row of windows by ws - lw % ws units
        window = (row // ws) * windows_per_row[:, None] + col // ws
        key = jnp.where(valid_u, window * units + u, units * units * 4 + u)
        self.unit_perm = jnp.argsort(key, axis=-1)  # window order -> unit index [B, U]
        self.unit_unperm = jnp.argsort(self.unit_perm, axis=-1)  # unit index -> window order [B, U]
        mu = cfg.merge_unit
        self.token_perm = (self.unit_perm[:, :, None] * mu + jnp.arange(mu)).reshape(-1, num_patches)
        valid_sorted = jnp.take_along_axis(valid_u, self.unit_perm, axis=1)
        win_sorted = jnp.where(valid_sorted, jnp.take_along_axis(window, self.unit_perm, axis=1), -1)
        self.window_segment = jnp.repeat(win_sorted, mu, axis=1)  # [B, P], -1 = padding
        self.image_segment = jnp.repeat(jnp.where(valid_sorted, 0, -1), mu, axis=1)
        # 2-D positions of every patch in the processor's order (merge-block-major), then permuted
        j = jnp.arange(mu)
        h_pos = (row[:, :, None] * m + j // m).reshape(-1, num_patches)
        w_pos = (col[:, :, None] * m + j % m).reshape(-1, num_patches)
        self.h_pos = jnp.take_along_axis(h_pos, self.token_perm, axis=1)
        self.w_pos = jnp.take_along_axis(w_pos, self.token_perm, axis=1)

    @staticmethod
    def segment_mask(segment: Array) -> Array:
        """[B, 1, P, P]: tokens attend within their own segment."""
        return (segment[:, :, None] == segment[:, None, :])[:, None]


def vision_rope(cfg: Qwen2_5_VisionConfig, h_pos: Array, w_pos: Array) -> tuple[Array, Array]:
    """Axial 2-D rotary tables [B, P, head_dim] (float32): h and w frequencies side by side, twice."""
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
    inv = jnp.asarray(inv_freq, jnp.float32)
    freqs = jnp.concatenate([h_pos.astype(jnp.float32)[..., None] * inv, w_pos.astype(jnp.float32)[..., None] * inv],
                            axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        d = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(d, 3 * d, **kw)
        self.proj = Dense(d, d, **kw)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_impl = attn_impl

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # rotary embedding in float32, cast back (apply_rotary_pos_emb_vision)
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.head_dim**-0.5,
                                           implementation=self.attn_impl)
        return self.proj(out.reshape(b, t, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def vision_norm(cfg: Qwen2_5_VisionConfig, *, dtype, param_dtype):
    """RMSNorm (Qwen2.5-VL) or LayerNorm (Qwen2-VL), eps 1e-6."""
    norm = RMSNorm if cfg.variant == "qwen2_5_vl" else LayerNorm
    return norm(cfg.hidden_size, eps=VISION_NORM_EPS, dtype=dtype, param_dtype=param_dtype)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        self.norm1 = vision_norm(cfg, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = vision_norm(cfg, dtype=dtype, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
        mlp = VisionMLP if cfg.variant == "qwen2_5_vl" else CLIPMLP  # Qwen2-VL: fc1 -> act -> fc2
        self.mlp = mlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """The block norm, then each merge block's patches concatenated -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: Qwen2_5_VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        wide = cfg.hidden_size * cfg.merge_unit
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = vision_norm(cfg, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(wide, wide, **kw)  # transformers: merger.mlp.0
        self.fc2 = Dense(wide, cfg.out_hidden_size, **kw)  # transformers: merger.mlp.2
        self.merge_unit = cfg.merge_unit

    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        x = self.ln_q(x).reshape(b, t // self.merge_unit, d * self.merge_unit)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        # Conv3d(C, d, (tp, p, p), stride = kernel, bias=False) on one patch = a matmul
        self.proj = Dense(cfg.patch_dim, cfg.hidden_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, patches: Array) -> Array:
        return self.proj(patches)


class Qwen2_5_VisionModel(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, attn_impl=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, attn_impl=attn_impl, **kw) for _ in range(cfg.num_layers)])
        self.merger = PatchMerger(cfg, **kw)
        self.cfg = cfg
        self.dtype = dtype

    def __call__(self, pixel_values: Array, grid_thw: Array) -> Array:
        """pixel_values [B, P, patch_dim] (P a multiple of the merge unit), grid_thw [B, 3] ->
        merged image features [B, P / merge_unit, out_hidden] in the processor's (raster) order;
        rows past a sample's h * w / merge_unit features are padding."""
        b, p, _ = pixel_values.shape
        if p % self.cfg.merge_unit:
            raise ValueError(f"{p} patches per image is not a multiple of the merge unit {self.cfg.merge_unit}")
        layout = VisionLayout(self.cfg, grid_thw, p)
        x = self.patch_embed(pixel_values.astype(self.dtype))
        x = jnp.take_along_axis(x, layout.token_perm[..., None], axis=1)
        cos, sin = vision_rope(self.cfg, layout.h_pos, layout.w_pos)
        window_mask = layout.segment_mask(layout.window_segment)
        full_mask = layout.segment_mask(layout.image_segment)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_mask if i in self.cfg.fullatt_block_indexes else window_mask)
        merged = self.merger(x)
        return jnp.take_along_axis(merged, layout.unit_unperm[..., None], axis=1)
