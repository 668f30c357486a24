"""Batched greedy decoding for Qwen2.5-VL with a KV cache, jitted end to end.

As bye_jax/models/generate.py (left-padded prompts, a cache of S + max_new_tokens slots, pad_id after
EOS), with 3-D rotary positions: the prompt's come from `mrope_positions`; generated token i sits at
(max prompt position + 1 + i) on all three axes, as transformers' rope_deltas put it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bye_jax.models.llama import init_kv_cache
from bye_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

Array = jax.Array


def _greedy(model: Qwen2_5_VLForConditionalGeneration, input_ids, attention_mask, pixel_values, image_grid_thw,
            max_new_tokens: int, eos_id: int, pad_id: int) -> Array:
    b, s = input_ids.shape
    total = s + max_new_tokens
    am = attention_mask.astype(bool)
    cache = init_kv_cache(model.cfg.text, b, total, model.dtype)
    slot_valid = jnp.concatenate([am, jnp.ones((b, max_new_tokens), bool)], axis=1)
    causal = jnp.arange(total)[None, :] <= jnp.arange(s)[:, None]
    prefill_mask = causal[None, None] & slot_valid[:, None, None, :]
    positions = model.positions(input_ids, attention_mask, image_grid_thw)
    embeds = model.embed(input_ids, pixel_values, image_grid_thw)
    logits, cache = model.decode(embeds, positions, prefill_mask, cache, 0)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    next_pos = jnp.max(jnp.where(am[None], positions, 0), axis=(0, 2)) + 1  # [B]

    def step(carry, i):
        token, done, cache = carry
        out = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)
        mask = (jnp.arange(total)[None, :] <= s + i) & slot_valid
        emb = model.language_model.embed_tokens(jnp.clip(token, 0, model.cfg.text.vocab_size - 1))
        pos = jnp.broadcast_to((next_pos + i)[None, :, None], (3, b, 1))
        logits, cache = model.decode(emb[:, None], pos, mask[:, None, None, :], cache, s + i)
        return (jnp.argmax(logits, axis=-1).astype(jnp.int32), done, cache), out

    init = (first, jnp.zeros((b,), bool), cache)
    (last, done, _), tokens = jax.lax.scan(step, init, jnp.arange(max_new_tokens - 1))
    final = jnp.where(done, pad_id, last)
    return jnp.concatenate([tokens.T, final[:, None]], axis=1) if max_new_tokens > 1 else final[:, None]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _greedy_jit(graphdef, state, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens, eos_id,
                pad_id):
    model = nnx.merge(graphdef, state)
    return _greedy(model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens, eos_id, pad_id)


def greedy_generate(model: Qwen2_5_VLForConditionalGeneration, input_ids, attention_mask, pixel_values, *,
                    max_new_tokens: int, eos_id: int, pad_id: int, image_grid_thw) -> Array:
    """Returns the generated tokens [B, max_new_tokens] (pad_id after EOS). Prompts left-padded."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    graphdef, state = nnx.split(model)
    return _greedy_jit(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                       jnp.asarray(pixel_values), jnp.asarray(image_grid_thw), max_new_tokens, eos_id, pad_id)
