"""Probe-mode pieces of bye_jax/models/llama.py: the CPU prefill attention against
jax.nn.dot_product_attention, and the sequence-chunked MLP against the plain one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bye_jax.models.config import TextConfig
from bye_jax.models.llama import LlamaMLP, LlamaModel, blocked_prefill, causal_blocked_attention, chunked_mlp
from bye_jax.models.masks import causal_padding_mask, last_token_index

TEXT = TextConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=4)


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


@pytest.mark.parametrize("max_bytes,chunks", [(0, 1), (10**9, 1), (2 * 40 * 4 * 4, 3), (1, 11)])
def test_chunked_mlp_equals_the_plain_mlp(max_bytes, chunks):
    """Budgets giving one chunk, three uneven chunks (11 positions) and one position per chunk."""
    mlp = LlamaMLP(TEXT, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, TEXT.hidden_size)), jnp.float32)
    hlo = jax.jit(lambda x: chunked_mlp(mlp, x, max_bytes)).lower(x).as_text()
    assert hlo.count("dot_general") == 3 * chunks  # gate, up and down per chunk
    np.testing.assert_allclose(chunked_mlp(mlp, x, max_bytes), mlp(x), rtol=1e-6, atol=1e-6)


def test_probe_mode_rows_and_hidden_state_same_with_mlp_chunking():
    """The decoder in probe mode with its MLPs chunked per position gives the plain decoder's attention
    rows and output (the chunking is threaded to every layer, and only in probe mode)."""
    model = LlamaModel(TEXT, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    b, t = 2, 9
    embeds = jnp.asarray(rng.normal(size=(b, t, TEXT.hidden_size)), jnp.float32)
    attention_mask = np.ones((b, t), bool)
    attention_mask[1, :2] = False
    mask = causal_padding_mask(jnp.asarray(attention_mask))
    positions = jnp.asarray(np.maximum(np.cumsum(attention_mask, -1) - 1, 0))
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    probe = last_token_index(jnp.asarray(attention_mask))
    runs, dots = [], []
    for chunk_bytes in (0, 1):
        model.probe_mlp_chunk_bytes = chunk_bytes
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, e, g=graphdef: fwd(nnx.merge(g, s), e, positions, mask, probe_index=probe))(
            state, embeds)
        dots.append(str(jaxpr).count("dot_general"))
        (hidden, _), inter = fwd(model, embeds, positions, mask, probe_index=probe)
        rows = [inter["layers"][i]["self_attn"]["attn_row"][0] for i in range(TEXT.num_layers)]
        runs.append((hidden, rows))
    (h0, rows0), (h1, rows1) = runs
    assert dots[1] - dots[0] == TEXT.num_layers * 3 * (t - 1)  # every layer's MLP: one chunk per position
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-6)
    for r0, r1 in zip(rows0, rows1, strict=True):
        np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-7)
