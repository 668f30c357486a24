"""Llama decoder (transformers' LlamaModel; Qwen2 via `TextConfig.qkv_bias`) in Flax NNX, with the BYE probe.

Attention runs through `jax.nn.dot_product_attention` (cuDNN on GPU when asked, XLA elsewhere).
In probe mode every layer recomputes, from the same post-RoPE q and k, the softmax attention row
of ONE query position per sample and sows it as `attn_row` [B, heads, S] (nnx.Intermediate), read
with `nnx.capture`. The full [S, S] map is never formed. Given a `probe_mask` [B, S] (the image
positions), each layer also sows `image_hidden` [B, hidden] float32: the hidden state entering the
layer averaged over those positions with the row's head-mean weights renormalised over them (the
signal table's ``content`` before its projection), reduced inside the layer; and the decoder sows once
`input_embed` [B, S, CONTENT_DIM] float32: its input embeddings (for the image positions, the projector's
output) times the fixed `content_projection` (the signal table's ``peak_embed`` is read from it at each
layer's peak image token; projected at once, so no [B, S, hidden] copy is kept).

In probe mode (extraction: no gradients, no cache) each layer's MLP runs over the sequence in chunks
(`chunked_mlp`) when its [B, T, intermediate] activations would exceed `PROBE_MLP_CHUNK_BYTES`: at the
LLaVA-1.5-7B shape (batch 48, 616 tokens) they are the extraction's largest buffers (0.65 GB each in
bfloat16). Each position's MLP is independent of the others, so the result is the same up to matmul
rounding (bit-identical in float32 in the tests; entropies within 0.0023 nats in bfloat16 on an H200).

An optional KV cache (a tuple of (k, v) per layer, [B, S_max, kv_heads, head_dim]) supports
prefill + greedy decoding; new keys are written at `cache_index`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bye_jax.models.config import TextConfig
from bye_jax.models.layers import Dense, Embed, RMSNorm
from bye_jax.signals import content_projection
from bye_jax.signals_compute import weighted_image_hidden

Array = jax.Array
KVCache = tuple[tuple[Array, Array], ...]

# Probe-mode MLP activations above this many bytes ([B, T, intermediate] of one projection) are computed
# over the sequence in chunks; LlamaModel.probe_mlp_chunk_bytes = 0 turns chunking off.
PROBE_MLP_CHUNK_BYTES = 256 * 2**20


def rope_cos_sin(positions: Array, head_dim: int, theta: float, dtype) -> tuple[Array, Array]:
    """cos/sin tables [B, T, head_dim] in transformers' rotate-half layout, computed in float32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, D]; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def probe_attention_row(q: Array, k: Array, key_mask: Array, probe_index: Array, scale: float) -> Array:
    """Softmax attention row of query `probe_index[b]` over all keys, per head: [B, heads, S].

    q [B, T, N, D] (post-RoPE), k [B, S, K, D] with N = K * G (grouped-query heads share kv head
    n // G, as transformers' repeat_kv), key_mask [B, S] keys this query may see. float32.
    """
    b, _, n, d = q.shape
    kv_heads = k.shape[2]
    qp = q[jnp.arange(b), probe_index].reshape(b, kv_heads, n // kv_heads, d)
    # float32 accumulation without a float32 copy of k (k in bfloat16 is [B, S, K, D]: large)
    scores = jnp.einsum("bkgd,bskd->bkgs", qp, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, n, -1) * scale
    scores = jnp.where(key_mask[:, None, :], scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


CPU_QUERY_BLOCK = 128  # query rows per block of the CPU causal attention (measured faster than 64 and unblocked)


def blocked_prefill(attn_impl: str | None) -> bool:
    """Whether probe-mode prefill runs `causal_blocked_attention`: XLA attention on a CPU backend (decided
    when the model is built; on one 2-core CPU it made extraction 13.5% faster per batch)."""
    return attn_impl in (None, "auto", "xla") and jax.default_backend() == "cpu"


def causal_blocked_attention(q: Array, k: Array, v: Array, mask: Array, scale: float,
                             block: int = CPU_QUERY_BLOCK) -> Array:
    """Causal self-attention in query blocks, for XLA:CPU: block j's queries meet only keys [0, end_j),
    the keys a causal mask can leave them, so most of the masked upper triangle is never computed; the
    scores, softmax and values are plain einsums in [B, heads, T, S] layout (on CPU about half the time
    of jax.nn.dot_product_attention's XLA path at 600 tokens). Masked keys get weight exactly 0, as
    there; a query with no visible key (a padding position) gets finite values, never read.
    q [B, T, N, D], k / v [B, T, K, D] (N = K * G, grouped-query heads share kv head n // G),
    mask [B, 1, T, T] causal (j > i never allowed). Returns [B, T, N, D]."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    qt = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv, n // kv, d).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    outs = []
    for start in range(0, t, block):
        end = min(t, start + block)
        s = jnp.einsum("bkgtd,bksd->bkgts", qt[:, :, :, start:end], kt[:, :, :end])
        s = jnp.where(mask[:, :, None, start:end, :end], s, jnp.finfo(s.dtype).min)
        e = jnp.exp(s - s.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", p, vt[:, :, :end]))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, D]
    return out.reshape(b, n, t, d).transpose(0, 2, 1, 3)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        d, n, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, n * hd, use_bias=cfg.has_qkv_bias, **kw)
        self.k_proj = Dense(d, kv * hd, use_bias=cfg.has_qkv_bias, **kw)
        self.v_proj = Dense(d, kv * hd, use_bias=cfg.has_qkv_bias, **kw)
        self.o_proj = Dense(n * hd, d, use_bias=cfg.attention_bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = n, kv, hd
        self.attn_impl = attn_impl
        self.blocked_prefill = blocked_prefill(attn_impl)

    def __call__(self, x, cos, sin, mask, *, probe_index=None, probe_mask=None, probe_hidden=None,
                 cache=None, cache_index=None):
        """probe_hidden: the layer's input hidden state [B, T, D], weighted by the probe row over
        `probe_mask` when that is given (sown as `image_hidden`)."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if cache is not None:
            k_cache, v_cache = cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            cache = (k, v)
        scale = self.head_dim**-0.5
        if probe_index is not None and cache is None and self.blocked_prefill:  # extraction on CPU
            out = causal_blocked_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale)
        else:
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                               scale=scale, implementation=self.attn_impl)
        if probe_index is not None:
            key_mask = mask[jnp.arange(b), 0, probe_index]
            row = probe_attention_row(q, k, key_mask, probe_index, scale)
            # Finish the row before the layer's output is used: otherwise XLA may schedule every
            # layer's probe at the end and keep all layers' q and k alive (GBs at 7B, batch 48).
            if probe_mask is not None:
                hid = weighted_image_hidden(row, probe_mask, probe_hidden)
                out, row, hid = jax.lax.optimization_barrier((out, row, hid))
                self.sow(nnx.Intermediate, "image_hidden", hid)
            else:
                out, row = jax.lax.optimization_barrier((out, row))
            self.sow(nnx.Intermediate, "attn_row", row)
        return self.o_proj(out.reshape(b, t, -1)), cache


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def chunked_mlp(mlp: LlamaMLP, x: Array, max_bytes: int) -> Array:
    """`mlp(x)` for x [B, T, D], run over the sequence in near-equal chunks, one after another, so that
    each chunk's [B, chunk, intermediate] activations stay within `max_bytes`; one plain call when they
    fit or `max_bytes` is 0. The chunks are unrolled and ordered by optimization barriers (chunk i + 1's
    input is released only with chunk i's output): a lax.map loop would make XLA copy the MLP weights
    into its loop state."""
    b, t, _ = x.shape
    per_position = b * mlp.gate_proj.kernel.shape[-1] * jnp.dtype(x.dtype).itemsize
    chunks = 1 if max_bytes <= 0 else min(t, -(-per_position * t // max_bytes))
    if chunks <= 1:
        return mlp(x)
    bounds = np.linspace(0, t, chunks + 1).round().astype(int)
    outs, piece = [], x[:, bounds[0]:bounds[1]]
    for i in range(chunks):
        out = mlp(piece)
        if i + 1 < chunks:
            out, piece = jax.lax.optimization_barrier((out, x[:, bounds[i + 1]:bounds[i + 2]]))
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attn_impl=None):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                        attn_impl=attn_impl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, *, probe_index=None, probe_mask=None, cache=None, cache_index=None,
                 mlp_chunk_bytes: int = 0):
        """mlp_chunk_bytes: run the MLP in sequence chunks of activations within this size (`chunked_mlp`)."""
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, probe_index=probe_index,
                                  probe_mask=probe_mask, probe_hidden=x, cache=cache, cache_index=cache_index)
        x = x + h
        return x + chunked_mlp(self.mlp, self.post_attention_layernorm(x), mlp_chunk_bytes), cache


class LlamaModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, attn_impl=None):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.layers = nnx.List([
            LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attn_impl=attn_impl)
            for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = False  # gradient checkpointing: recompute each layer's activations in the backward pass
        self.probe_mlp_chunk_bytes = PROBE_MLP_CHUNK_BYTES  # probe mode's MLP chunking (0: off)

    def __call__(self, embeds: Array, positions: Array, mask: Array, *, probe_index=None, probe_mask=None,
                 kv_cache: KVCache | None = None, cache_index=None) -> tuple[Array, KVCache | None]:
        """embeds [B, T, D]; positions [B, T]; mask [B, 1, T, S] (True = may attend); probe_mask [B, S]
        (with probe_index): positions whose attention-weighted hidden state each layer sows."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        return self.run_layers(embeds, cos, sin, mask, probe_index=probe_index, probe_mask=probe_mask,
                               kv_cache=kv_cache, cache_index=cache_index)

    def run_layers(self, embeds: Array, cos: Array, sin: Array, mask: Array, *, probe_index=None, probe_mask=None,
                   kv_cache: KVCache | None = None, cache_index=None) -> tuple[Array, KVCache | None]:
        """The decoder stack after the rotary tables (`__call__`'s arguments, cos / sin [B, T, head_dim])."""
        x = embeds.astype(self.dtype)
        if probe_index is not None and probe_mask is not None:
            proj = jnp.asarray(content_projection(x.shape[-1]), x.dtype)
            embed = jnp.einsum("bsd,dk->bsk", x, proj, preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST)
            self.sow(nnx.Intermediate, "input_embed", embed)
        new_cache = []
        plain = kv_cache is None and probe_index is None
        for i, layer in enumerate(self.layers):
            if self.remat and plain:
                x = _remat_layer(layer, x, cos, sin, mask)
                continue
            x, c = layer(x, cos, sin, mask, probe_index=probe_index, probe_mask=probe_mask,
                         cache=None if kv_cache is None else kv_cache[i], cache_index=cache_index,
                         mlp_chunk_bytes=self.probe_mlp_chunk_bytes if probe_index is not None and kv_cache is None
                         else 0)
            new_cache.append(c)
        return self.norm(x), (tuple(new_cache) if kv_cache is not None else None)


def _remat_layer(layer: LlamaDecoderLayer, x, cos, sin, mask):
    """One decoder layer under jax.checkpoint: only its inputs are kept for the backward pass."""
    graphdef, state = nnx.split(layer)

    def run(state, x, cos, sin, mask):
        return nnx.merge(graphdef, state)(x, cos, sin, mask)[0]

    return jax.checkpoint(run)(state, x, cos, sin, mask)


def init_kv_cache(cfg: TextConfig, batch: int, length: int, dtype) -> KVCache:
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
