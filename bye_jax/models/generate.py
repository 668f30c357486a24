"""Batched greedy decoding with a KV cache, jitted end to end.

Prompts are LEFT padded (so every sample's next token goes into the same cache slot). The prompt
is prefilled into a cache of length S + max_new_tokens; each step then feeds one token. After a
sample emits EOS it keeps producing `pad_id`, like transformers' greedy generate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bye_jax.models.llama import init_kv_cache
from bye_jax.models.masks import positions_from_mask

Array = jax.Array


def _greedy(model, input_ids, attention_mask, pixel_values, extra, max_new_tokens: int, eos_id: int,
            pad_id: int) -> Array:
    b, s = input_ids.shape
    total = s + max_new_tokens
    am = attention_mask.astype(bool)
    cache = init_kv_cache(model.cfg.text, b, total, model.dtype)
    # Cache slots: the prompt (with its padding) then one slot per generated token.
    slot_valid = jnp.concatenate([am, jnp.ones((b, max_new_tokens), bool)], axis=1)
    causal = jnp.arange(total)[None, :] <= jnp.arange(s)[:, None]
    prefill_mask = causal[None, None] & slot_valid[:, None, None, :]
    positions = positions_from_mask(attention_mask)
    embeds = model.embed(input_ids, pixel_values, **extra)
    logits, cache = model.decode(embeds, positions, prefill_mask, cache, 0)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    next_pos = positions[:, -1] + 1

    def step(carry, i):
        token, done, cache = carry
        out = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)
        mask = (jnp.arange(total)[None, :] <= s + i) & slot_valid
        emb = model.language_model.embed_tokens(jnp.clip(token, 0, model.cfg.text.vocab_size - 1))
        logits, cache = model.decode(emb[:, None], (next_pos + i)[:, None], mask[:, None, None, :],
                                     cache, s + i)
        return (jnp.argmax(logits, axis=-1).astype(jnp.int32), done, cache), out

    init = (first, jnp.zeros((b,), bool), cache)
    (last, done, _), tokens = jax.lax.scan(step, init, jnp.arange(max_new_tokens - 1))
    final = jnp.where(done, pad_id, last)
    return jnp.concatenate([tokens.T, final[:, None]], axis=1) if max_new_tokens > 1 else final[:, None]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _greedy_jit(graphdef, state, input_ids, attention_mask, pixel_values, extra, max_new_tokens, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    return _greedy(model, input_ids, attention_mask, pixel_values, extra, max_new_tokens, eos_id, pad_id)


def greedy_generate(model, input_ids, attention_mask, pixel_values, *, max_new_tokens: int, eos_id: int,
                    pad_id: int, **extra) -> Array:
    """Returns the generated tokens [B, max_new_tokens] (pad_id after EOS). Prompts left-padded.

    For models with a Llama decoder whose `embed(input_ids, pixel_values, **extra)` gives the prompt
    embeddings and `decode` runs them against a KV cache (the LLaVA families)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    graphdef, state = nnx.split(model)
    return _greedy_jit(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                       jnp.asarray(pixel_values), {k: jnp.asarray(v) for k, v in extra.items()},
                       max_new_tokens, eos_id, pad_id)
