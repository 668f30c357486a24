"""Position and attention masks from a [B, S] attention mask (left or right padding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def positions_from_mask(attention_mask: Array) -> Array:
    """Token positions that skip padding (left or right): cumsum(mask) - 1, pads at 0."""
    am = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(am, axis=-1) - 1, 0) * am


def causal_padding_mask(attention_mask: Array) -> Array:
    """[B, 1, S, S] boolean: query i sees key j iff j <= i and j is a real token."""
    s = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


def last_token_index(attention_mask: Array) -> Array:
    """Index of the last real token per sample (works for left and right padding)."""
    s = attention_mask.shape[-1]
    idx = jnp.where(attention_mask.astype(bool), jnp.arange(s)[None], -1)
    return jnp.max(idx, axis=-1)
