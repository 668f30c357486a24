"""Image-span attention entropy (bye_jax.entropy) on hand-made attention rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from bye_jax.entropy import batch_layer_entropies, image_entropy


def softmax(logits, axis=-1):
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_entropy(row, mask, eps=1e-8):
    """The specified order in float64: slice image span, mean over heads, renormalise, H."""
    m = np.asarray(row, np.float64)[:, np.asarray(mask, bool)].mean(axis=0)
    p = m / m.sum()
    return float(-np.sum(p * np.log(p + eps)))


def span_mask(s, start, stop):
    mask = np.zeros(s, bool)
    mask[start:stop] = True
    return mask


@pytest.mark.parametrize("t", [1, 2, 7, 576])
def test_uniform_over_image_positions_is_log_t(t):
    s, heads = t + 40, 4
    rng = np.random.default_rng(t)
    row = rng.random((heads, s))
    mask = span_mask(s, 10, 10 + t)
    row[:, mask] = rng.random((heads, 1))  # each head uniform over the image span
    row /= row.sum(axis=1, keepdims=True)
    h = float(image_entropy(jnp.asarray(row, jnp.float32), mask))
    assert h == pytest.approx(-np.log(1.0 / t + 1e-8), abs=5e-6)  # = log T - log(1 + T * 1e-8)
    assert h == pytest.approx(np.log(t), abs=1e-5)


def test_one_hot_is_zero():
    s = 50
    row = np.zeros((3, s), np.float32)
    row[:, 3] = 0.7  # text tokens
    row[:, 20] = 0.3  # a single image patch takes all the image mass
    h = float(image_entropy(row, span_mask(s, 10, 30)))
    assert abs(h) < 1e-6


def test_log_eps_convention_matches_numpy():
    rng = np.random.default_rng(0)
    heads, s = 8, 700
    mask = span_mask(s, 30, 606)  # 576 image tokens
    row = softmax(rng.normal(scale=3.0, size=(heads, s))).astype(np.float32)
    h = float(image_entropy(row, mask))
    assert h == pytest.approx(reference_entropy(row, mask), abs=1e-6)

    # many tiny probabilities: eps=1e-8 inside the log is visible and is what we compute
    t = 20000
    p = np.full(t, 0.5 / (t - 1))
    p[0] = 0.5
    row = np.concatenate([np.full(4, 0.1), 0.6 * p])[None, :].astype(np.float32)
    mask = np.r_[np.zeros(4, bool), np.ones(t, bool)]
    with_eps = reference_entropy(row, mask, eps=1e-8)
    without_eps = reference_entropy(row, mask, eps=0.0)
    assert without_eps - with_eps > 1e-4
    h = float(image_entropy(row, mask))
    assert h == pytest.approx(with_eps, abs=2e-5)
    assert float(image_entropy(row, mask, eps=0.0)) == pytest.approx(without_eps, abs=2e-5)


def test_order_of_operations_mean_then_renormalise():
    s = 12
    mask = span_mask(s, 2, 8)
    row = np.zeros((2, s))
    # head 0: almost all mass on text, a little spread evenly over the image
    row[0, :] = 0.9 / (s - 6)
    row[0, mask] = 0.1 / 6
    # head 1: most mass on the image, concentrated on one patch
    row[1, :] = 0.05 / (s - 6)
    row[1, mask] = [0.9, 0.01, 0.01, 0.01, 0.01, 0.01]
    row /= row.sum(axis=1, keepdims=True)

    specified = reference_entropy(row, mask)
    per_head = row[:, mask] / row[:, mask].sum(axis=1, keepdims=True)  # renormalise first
    p = per_head.mean(axis=0)
    other = float(-np.sum(p * np.log(p + 1e-8)))
    assert abs(specified - other) > 0.1

    h = float(image_entropy(row.astype(np.float32), mask))
    assert h == pytest.approx(specified, abs=1e-6)


def test_non_image_positions_ignored_and_mask_not_contiguous():
    rng = np.random.default_rng(1)
    heads, s = 4, 40
    mask = np.zeros(s, bool)
    mask[[3, 4, 9, 17, 18, 30]] = True
    row = softmax(rng.normal(size=(heads, s)))
    other = row.copy()
    other[:, ~mask] = rng.random((heads, (~mask).sum()))  # any text attention, not renormalised
    h1 = float(image_entropy(row.astype(np.float32), mask))
    h2 = float(image_entropy(other.astype(np.float32), mask))
    assert h1 == pytest.approx(reference_entropy(row, mask), abs=1e-6)
    assert h1 == h2


def test_no_image_mass_is_nan():
    row = np.full((2, 10), 0.1, np.float32)
    row[:, 4:6] = 0.0
    assert np.isnan(float(image_entropy(row, span_mask(10, 4, 6))))
    assert np.isnan(float(image_entropy(row, np.zeros(10, bool))))


def test_low_precision_input_is_computed_in_float32():
    rng = np.random.default_rng(2)
    row = softmax(rng.normal(size=(4, 64)))
    mask = span_mask(64, 8, 56)
    h = image_entropy(jnp.asarray(row, jnp.bfloat16), mask)
    assert h.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(row, jnp.bfloat16).astype(jnp.float32))
    assert float(h) == pytest.approx(reference_entropy(rounded, mask), abs=1e-6)


def test_batch_layer_entropies_equals_loop():
    rng = np.random.default_rng(3)
    num_layers, b, heads, s = 5, 3, 4, 48
    rows = softmax(rng.normal(scale=2.0, size=(num_layers, b, heads, s))).astype(np.float32)
    mask = np.zeros((b, s), bool)
    mask[0, 5:37] = True
    mask[1, 10:42] = True
    mask[2, [1, 2, 3, 40, 41]] = True
    rows[2, 1][:, mask[1]] = 0.0  # layer 2, sample 1: no image mass -> NaN

    out = batch_layer_entropies(rows, mask)
    assert out.shape == (b, num_layers) and out.dtype == jnp.float32
    loop = np.array([[float(image_entropy(rows[li, i], mask[i])) for li in range(num_layers)]
                     for i in range(b)])
    np.testing.assert_array_equal(np.isnan(out), np.isnan(loop))
    np.testing.assert_allclose(np.asarray(out), loop, rtol=1e-6, atol=1e-6, equal_nan=True)
    ref = np.array([[reference_entropy(rows[li, i], mask[i]) if rows[li, i][:, mask[i]].sum() > 0
                     else np.nan for li in range(num_layers)] for i in range(b)])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, equal_nan=True)

    # a list of per-layer [B, heads, S] arrays (the probe's output) gives the same matrix
    out_list = batch_layer_entropies([jnp.asarray(r) for r in rows], mask)
    np.testing.assert_allclose(np.asarray(out_list), np.asarray(out), rtol=1e-6, equal_nan=True)

    # one [S] mask shared by the batch
    shared = batch_layer_entropies(rows, mask[0])
    expect = batch_layer_entropies(rows, np.broadcast_to(mask[0], (b, s)))
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(expect))


def test_batch_layer_entropies_rejects_bad_shapes():
    with pytest.raises(ValueError):
        batch_layer_entropies(np.zeros((2, 3, 4), np.float32), np.ones((2, 4), bool))
    with pytest.raises(ValueError):
        batch_layer_entropies([], np.ones((2, 4), bool))
