"""The CPU probe-mode prefill attention (bye_jax/models/llama.py) against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bye_jax.models.llama import blocked_prefill, causal_blocked_attention
from bye_jax.models.masks import causal_padding_mask


@pytest.mark.parametrize("heads,kv_heads,block", [(4, 2, 4), (3, 3, 16), (4, 1, 5)])
def test_blocked_causal_attention_equals_dot_product_attention(heads, kv_heads, block):
    """Grouped-query heads, left padding, a length that is no multiple of the block, a block longer than
    the sequence: every real query position gets the same output as the unblocked XLA attention."""
    b, t, d = 3, 11, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (heads, kv_heads, kv_heads))
    attention_mask = np.ones((b, t), bool)
    attention_mask[1, :3] = False  # left padding
    attention_mask[2, :7] = False
    mask = causal_padding_mask(jnp.asarray(attention_mask))
    scale = d**-0.5
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    got = causal_blocked_attention(q, k, v, mask, scale, block=block)
    assert got.shape == want.shape and bool(jnp.all(jnp.isfinite(got)))
    real = attention_mask[:, :, None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5, atol=1e-6)


def test_blocked_prefill_only_for_xla_attention_on_cpu():
    on_cpu = jax.default_backend() == "cpu"
    assert blocked_prefill(None) == blocked_prefill("xla") == on_cpu
    assert not blocked_prefill("cudnn")
