"""Image-span attention entropy (BYE step 2), as pure JAX functions.

For one query position (the last prompt position) and one decoder layer, BYE takes the attention
row that was softmaxed over the whole causal row, keeps the image-token positions, averages over
heads, renormalises the kept values to sum to 1 and takes the Shannon entropy in nats with 1e-8
inside the log::

    m_t = mean_h row[h, t]            (t over image positions)
    p_t = m_t / sum_t' m_t'
    H   = -sum_t p_t * log(p_t + 1e-8)

The order is part of the method: slicing and the head mean commute, but renormalising each head
before the mean gives a different number. Everything is computed in float32. A row with no
attention mass on the image span (or no image position at all) gives NaN; the detector replaces
NaNs by the layer mean.

Image positions are given as a boolean mask rather than a slice so that the functions are
jittable and work for any number and placement of image tokens (contiguous or not).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["image_entropy", "batch_layer_entropies"]

LOG_EPS = 1e-8


def image_entropy(row: jax.Array, image_mask: jax.Array, eps: float = LOG_EPS) -> jax.Array:
    """Entropy (nats, float32 scalar) of one attention row restricted to the image positions.

    Args:
      row: [heads, S] attention probabilities of one query position, already softmaxed over the
        whole (causal) row of length S. Any float dtype; computed in float32.
      image_mask: [S] bool, True at image-token positions.
      eps: added inside the log (the reference uses 1e-8).

    Returns:
      float32 scalar H = -sum p log(p + eps); NaN when the image mass is 0.
    """
    row = jnp.asarray(row, jnp.float32)
    mask = jnp.asarray(image_mask, bool)
    mean = jnp.mean(row, axis=0)  # [S] mean over heads (commutes with the slice)
    m = jnp.where(mask, mean, 0.0)
    total = jnp.sum(m)
    ok = total > 0
    p = m / jnp.where(ok, total, 1.0)
    terms = jnp.where(mask, p * jnp.log(p + jnp.float32(eps)), 0.0)
    h = -jnp.sum(terms)
    return jnp.where(ok, h, jnp.nan).astype(jnp.float32)


# vmapped over samples: row [B, heads, S], mask [B, S] -> [B]
_per_sample = jax.vmap(image_entropy, in_axes=(0, 0, None))
# vmapped over layers: rows [L, B, heads, S], mask [B, S] -> [L, B]
_per_layer = jax.vmap(_per_sample, in_axes=(0, None, None))


@jax.jit
def _entropies_stacked(rows: jax.Array, mask: jax.Array, eps: jax.Array) -> jax.Array:
    return _per_layer(rows, mask, eps).T


@jax.jit
def _entropies_list(rows: tuple[jax.Array, ...], mask: jax.Array, eps: jax.Array) -> jax.Array:
    # One small [B] result per layer; never stacks the L attention rows into one big array.
    return jnp.stack([_per_sample(r, mask, eps) for r in rows], axis=1)


def batch_layer_entropies(
    rows: jax.Array | Sequence[jax.Array],
    image_mask: jax.Array,
    eps: float = LOG_EPS,
) -> jax.Array:
    """Image-span entropies for a batch of samples at every layer.

    Args:
      rows: [L, B, heads, S] array, or a tuple/list of L arrays [B, heads, S] (the probe's
        per-layer output), attention of the last prompt position softmaxed over S.
      image_mask: [B, S] bool (or [S], shared by the whole batch).
      eps: added inside the log.

    Returns:
      [B, L] float32 entropies (NaN where a sample has no image mass at a layer).
    """
    if isinstance(rows, (list, tuple)):
        if not rows:
            raise ValueError("rows is empty: expected one [B, heads, S] array per layer")
        batch = rows[0].shape[0]
        mask = jnp.broadcast_to(jnp.asarray(image_mask, bool), (batch, rows[0].shape[-1]))
        return _entropies_list(tuple(rows), mask, jnp.float32(eps))
    rows = jnp.asarray(rows)
    if rows.ndim != 4:
        raise ValueError(f"rows must be [L, B, heads, S], got shape {rows.shape}")
    mask = jnp.broadcast_to(jnp.asarray(image_mask, bool), (rows.shape[1], rows.shape[-1]))
    return _entropies_stacked(rows, mask, jnp.float32(eps))
