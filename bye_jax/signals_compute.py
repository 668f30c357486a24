"""The signal table's per-layer values (bye_jax/signals.py) from the probe's outputs, as pure JAX.

Inputs per layer: the answer position's attention row [B, heads, S] (softmaxed over the causal row)
and, for ``content``, the attention-weighted image-token hidden state [B, hidden] that the probe
computes inside the layer (`weighted_image_hidden`). Everything is a reduction over S inside the
jitted step; only [B, L, ...] arrays leave the device (the share signals: one sum per head and prompt
segment, [B, L, heads, 4]). The entropy is `bye_jax.entropy`'s function, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bye_jax.entropy import LOG_EPS, image_entropy
from bye_jax.signals import SHARE_SEGMENTS, TOPK, USER_TOKENS

__all__ = ["image_distribution", "weighted_image_hidden", "image_grid_coords", "prompt_segments", "segment_shares",
           "text_peak", "user_tokens", "layer_signals", "batch_signals"]

_entropy = jax.vmap(image_entropy, in_axes=(0, 0, None))


def image_distribution(row: jax.Array, image_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Head-mean attention renormalised over the image positions, and the image share of the row.

    row [B, heads, S], image_mask [B, S] -> p [B, S] float32 (0 off the image, sums to 1 where the
    image has mass), image_mass [B] float32 (sum of the head-mean row over the image positions).
    """
    mean = jnp.mean(jnp.asarray(row, jnp.float32), axis=1)
    m = jnp.where(image_mask, mean, 0.0)
    mass = jnp.sum(m, axis=-1)
    p = m / jnp.where(mass > 0, mass, 1.0)[:, None]
    return p, mass


def weighted_image_hidden(row: jax.Array, image_mask: jax.Array, hidden: jax.Array) -> jax.Array:
    """sum_t p_t hidden[:, t] over the image positions: [B, hidden] float32 (p in hidden's dtype,
    accumulated in float32; no float32 copy of hidden)."""
    p, _ = image_distribution(row, image_mask)
    return jnp.einsum("bs,bsd->bd", p.astype(hidden.dtype), hidden, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)


def image_grid_coords(image_mask: jax.Array, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Per position: its index among the image tokens [B, S] int32 and its grid coordinates [B, S, 2].

    Image token j sits at (j // W, j % W) of the H x W `grid`; a sample whose image-token count is
    not H * W uses 1 x N. Coordinates are patch centres scaled to [0, 1].
    """
    h, w = grid
    index = jnp.cumsum(image_mask.astype(jnp.int32), axis=-1) - 1
    count = jnp.sum(image_mask.astype(jnp.int32), axis=-1, keepdims=True)  # [B, 1]
    on_grid = count == h * w
    j = jnp.maximum(index, 0)
    row = jnp.where(on_grid, j // w, 0)
    col = jnp.where(on_grid, j % w, j)
    rows = jnp.where(on_grid, h, 1).astype(jnp.float32)
    cols = jnp.where(on_grid, w, jnp.maximum(count, 1)).astype(jnp.float32)
    coords = jnp.stack([(row + 0.5) / rows, (col + 0.5) / cols], axis=-1)
    return index, coords


def prompt_segments(input_ids: jax.Array, attention_mask: jax.Array, image_token_id, answer_prefix: jax.Array
                    ) -> jax.Array:
    """Segment of every position [B, S] int32 (index into SHARE_SEGMENTS; -1 = padding).

    system: real tokens before the first image token; image: the image tokens; answer: the last
    `answer_prefix` [B] real tokens (the template's generation prompt); user: the other real tokens
    (the question and the template's text around it, after the image).
    """
    real = attention_mask.astype(bool)
    image = (input_ids == image_token_id) & real
    before_image = jnp.cumsum(image.astype(jnp.int32), axis=-1) == 0
    from_end = jnp.cumsum(real[:, ::-1].astype(jnp.int32), axis=-1)[:, ::-1]  # real tokens at or after each
    answer = real & ~image & (from_end <= answer_prefix[:, None])
    seg = jnp.where(before_image, 0, 2)
    seg = jnp.where(answer, 3, seg)
    seg = jnp.where(image, 1, seg)
    return jnp.where(real, seg, -1).astype(jnp.int32)


def segment_shares(row: jax.Array, segments: jax.Array) -> jax.Array:
    """Per head, the row's attention on each segment: [B, heads, len(SHARE_SEGMENTS)] float32."""
    one_hot = jax.nn.one_hot(segments, len(SHARE_SEGMENTS), dtype=jnp.float32)  # -1 (padding) -> zeros
    return jnp.einsum("bhs,bsk->bhk", jnp.asarray(row, jnp.float32), one_hot, precision=jax.lax.Precision.HIGHEST)


def text_peak(row: jax.Array, segments: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The user-text token the head-mean row peaks on: (token id [B] int32, its share of the head-mean
    user-text attention [B] float32); (-1, NaN) where the user text has no tokens or no attention.
    Ties go to the first position."""
    mean = jnp.mean(jnp.asarray(row, jnp.float32), axis=1)
    user = segments == SHARE_SEGMENTS.index("user")
    on_user = jnp.where(user, mean, -1.0)
    arg = jnp.argmax(on_user, axis=-1)
    b = jnp.arange(row.shape[0])
    mass = jnp.sum(jnp.where(user, mean, 0.0), axis=-1)
    ok = mass > 0
    token = jnp.where(ok, jnp.asarray(input_ids)[b, arg], -1).astype(jnp.int32)
    share = jnp.where(ok, on_user[b, arg] / jnp.where(ok, mass, 1.0), jnp.float32(jnp.nan))
    return token, share


def user_tokens(input_ids: jax.Array, segments: jax.Array, width: int = USER_TOKENS) -> jax.Array:
    """The user-text token ids of each prompt in order, [B, width] int32, -1 after the last; a question of more
    than `width` tokens keeps its first width // 2 and its last width - width // 2 (a prefix and a suffix)."""
    user = segments == SHARE_SEGMENTS.index("user")
    b, s = user.shape
    pos = jnp.arange(s)
    order = jnp.argsort(jnp.where(user, pos, s + pos), axis=-1)  # user positions first, in order
    count = jnp.sum(user, axis=-1, keepdims=True)
    head = width // 2
    k = jnp.arange(width)[None, :]
    # slot k reads user token k when the question fits, else the first `head` and the last width - head
    src = jnp.where((count <= width) | (k < head), k, count - width + k)
    src = jnp.clip(src, 0, s - 1)
    ids = jnp.take_along_axis(jnp.asarray(input_ids), jnp.take_along_axis(order, src, axis=-1), axis=-1)
    return jnp.where(k < count, ids, -1).astype(jnp.int32)


def layer_signals(row: jax.Array, image_mask: jax.Array, index: jax.Array, coords: jax.Array,
                  image_hidden: jax.Array | None = None, projection: jax.Array | None = None,
                  segments: jax.Array | None = None, eps: float = LOG_EPS,
                  input_ids: jax.Array | None = None, input_embed: jax.Array | None = None) -> dict[str, jax.Array]:
    """One layer's signals for a batch: {name: [B] or [B, k]} (see bye_jax/signals.py); `input_embed`
    [B, S, k]: the projected input embeddings, read at the peak image token (``peak_embed``)."""
    nan = jnp.float32(jnp.nan)
    p, mass = image_distribution(row, image_mask)
    ok = mass > 0
    entropy = _entropy(row, image_mask, jnp.float32(eps))
    count = jnp.sum(image_mask, axis=-1)
    log_n = jnp.log(jnp.maximum(count, 2).astype(jnp.float32))
    on_image = jnp.where(image_mask, p, -1.0)
    arg = jnp.argmax(on_image, axis=-1)
    b = jnp.arange(row.shape[0])
    top = jax.lax.top_k(jnp.where(image_mask, p, 0.0), min(TOPK, p.shape[-1]))[0]
    centroid = jnp.einsum("bs,bsc->bc", p, coords, precision=jax.lax.Precision.HIGHEST)
    out = {
        "entropy": entropy,
        "entropy_norm": jnp.where(count > 1, entropy / log_n, nan),
        "peak": jnp.where(ok, index[b, arg], -1).astype(jnp.int32),
        "peak_mass": jnp.where(ok, on_image[b, arg], nan),
        "topk_mass": jnp.where(ok, jnp.sum(top, axis=-1), nan),
        "centroid": jnp.where(ok[:, None], centroid, nan),
        "image_mass": mass,
    }
    if image_hidden is not None:
        content = jnp.dot(image_hidden.astype(jnp.float32), projection, precision=jax.lax.Precision.HIGHEST)
        out["content"] = jnp.where(ok[:, None], content, nan)
    if input_embed is not None:
        at_peak = jnp.asarray(input_embed, jnp.float32)[b, arg]
        out["peak_embed"] = jnp.where(ok[:, None], at_peak, nan)
    if segments is not None:
        shares = segment_shares(row, segments)
        mean = jnp.mean(shares, axis=1)
        image, user = mean[:, SHARE_SEGMENTS.index("image")], mean[:, SHARE_SEGMENTS.index("user")]
        out["shares"] = shares
        out["visual_text_ratio"] = jnp.where(user > 0, image / jnp.where(user > 0, user, 1.0), nan)
        if input_ids is not None:
            out["text_peak"], out["text_peak_mass"] = text_peak(row, segments, input_ids)
    return out


def batch_signals(rows: Sequence[jax.Array], image_mask: jax.Array, grid: tuple[int, int],
                  image_hiddens: Sequence[jax.Array] | None = None,
                  projection: jax.Array | None = None, segments: jax.Array | None = None,
                  input_ids: jax.Array | None = None, input_embed: jax.Array | None = None) -> dict[str, jax.Array]:
    """All layers: rows / image_hiddens one [B, heads, S] / [B, hidden] array per layer ->
    {name: [B, L, ...]} plus num_image_tokens [B]; with `segments` [B, S] (`prompt_segments`) also
    the share signals, and with the prompts' `input_ids` [B, S] too the text peak and the user tokens; with
    `input_embed` [B, S, k] (the decoder's projected input embeddings) also ``peak_embed``. Call inside a jit
    (one small result per layer)."""
    image_mask = jnp.asarray(image_mask, bool)
    index, coords = image_grid_coords(image_mask, grid)
    per_layer = [layer_signals(r, image_mask, index, coords,
                               None if image_hiddens is None else image_hiddens[i], projection, segments,
                               input_ids=input_ids, input_embed=input_embed)
                 for i, r in enumerate(rows)]
    out = {k: jnp.stack([s[k] for s in per_layer], axis=1) for k in per_layer[0]}
    out["num_image_tokens"] = jnp.sum(image_mask, axis=-1).astype(jnp.int32)
    if segments is not None and input_ids is not None:
        out["user_tokens"] = user_tokens(input_ids, segments)
    return out
