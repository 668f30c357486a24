from collections import deque

import numpy as np
import pytest
from PIL import Image

from bye_jax.data import triggers as T
from bye_jax.data.triggers import TRIGGERS, TriggerSpec, apply_trigger

W, H = 64, 48  # side = round(48 / 16) = 3


def gray(w=W, h=H, v=128):
    return Image.new("RGB", (w, h), (v, v, v))


def gradient(w=W, h=H):
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    arr = np.stack([jj * 255 // max(w - 1, 1), ii * 255 // max(h - 1, 1), (jj + ii) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def arr(img):
    return np.asarray(img, dtype=np.int64)


def black_mask(img):
    return (arr(img) == 0).all(-1)


def box_mask(boxes, w=W, h=H):
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def n_components(mask):
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        q = deque([(y, x)])
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
    return count


# --------------------------------------------------------------------------------------------- side rule


@pytest.mark.parametrize(
    "size, side",
    [
        ((336, 336), 21),
        ((448, 448), 28),
        ((64, 48), 3),
        ((640, 480), 30),
        ((24, 100), 2),
        ((40, 40), 3),
        ((8, 8), 1),
        ((7, 30), 1),
        ((1, 1), 1),
        ((2, 5), 1),
    ],
)
def test_side_rule(size, side):
    # 24/16 = 1.5 and 40/16 = 2.5 round half up (Python's round would give 2 and 2).
    assert T.trigger_side(size) == side


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (8, 8), (17, 5)])
def test_tiny_images_all_kinds(size):
    img = gray(*size)
    for kind in TRIGGERS:
        out = apply_trigger(img, kind, seed=3)
        assert out.size == size and out.mode == "RGB"
    assert black_mask(apply_trigger(img, "patch")).sum() == 1


# --------------------------------------------------------------------------------------------- patch


@pytest.mark.parametrize("img", [gray(), gradient()], ids=["gray", "gradient"])
def test_patch_exact(img):
    out = T.patch(img)
    s = 3
    x0, y0 = (W - s) // 2, (H - s) // 2
    assert (x0, y0) == (30, 22)
    expected = arr(img).copy()
    expected[y0 : y0 + s, x0 : x0 + s] = 0
    np.testing.assert_array_equal(arr(out), expected)
    assert T.patch_boxes("patch", (W, H)) == [(x0, y0, x0 + s, y0 + s)]


def test_patch_large_centre_and_side_override():
    out = T.patch(gray(336, 336))
    m = black_mask(out)
    assert m.sum() == 21 * 21
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (157, 157, 177, 177)
    assert black_mask(T.patch(gray(), side=10)).sum() == 100
    with pytest.raises(ValueError):
        T.patch(gray(), side=0)


def test_patch_color_and_non_rgb_input():
    out = T.patch(gray(), color=(255, 0, 0))
    assert tuple(arr(out)[23, 31]) == (255, 0, 0)
    out = T.patch(Image.new("L", (W, H), 128))
    assert out.mode == "RGB" and black_mask(out).sum() == 9


# --------------------------------------------------------------------------------------------- random_patch


def test_random_patch_bounds_and_determinism():
    img = gradient()
    positions = set()
    for seed in range(50):
        out = T.random_patch(img, seed=seed)
        boxes = T.patch_boxes("random_patch", (W, H), seed=seed)
        (x0, y0, x1, y1) = boxes[0]
        assert 0 <= x0 and x1 <= W and 0 <= y0 and y1 <= H and x1 - x0 == 3 and y1 - y0 == 3
        expected = arr(img).copy()
        expected[y0:y1, x0:x1] = 0
        np.testing.assert_array_equal(arr(out), expected)
        np.testing.assert_array_equal(arr(out), arr(T.random_patch(img, seed=seed)))
        positions.add((x0, y0))
    assert len(positions) > 30
    # corners reachable when the square nearly fills the image
    for seed in range(20):
        ((x0, y0, x1, y1),) = T.patch_boxes("random_patch", (5, 5), seed=seed, side=4)
        assert 0 <= x0 <= 1 and 0 <= y0 <= 1 and x1 <= 5 and y1 <= 5


# --------------------------------------------------------------------------------------------- texture


def test_texture_checkerboard():
    img = gray(256, 256)  # side 16, cell 4
    out = arr(T.texture(img))
    ((x0, y0, x1, y1),) = T.patch_boxes("texture", (256, 256))
    assert (x1 - x0) == 16
    sq = out[y0:y1, x0:x1]
    is_black = (sq == 0).all(-1)
    is_white = (sq == 255).all(-1)
    assert (is_black | is_white).all() and is_black.sum() == is_white.sum() == 128
    assert is_black[0, 0] and is_white[0, 4] and is_white[4, 0] and is_black[4, 4]
    assert is_black[:4, :4].all()
    outside = np.ones((256, 256), bool)
    outside[y0:y1, x0:x1] = False
    assert (out[outside] == 128).all()
    # custom cell, and min cell 2 on a small image (side 3): both colours present
    sq2 = arr(T.texture(img, cell=8))[y0:y1, x0:x1]
    assert (sq2[:8, :8] == 0).all() and (sq2[:8, 8:] == 255).all()
    small = arr(T.texture(gray()))[22:25, 30:33]
    assert (small == 0).all(-1).any() and (small == 255).all(-1).any()


# --------------------------------------------------------------------------------------------- dual / multi


@pytest.mark.parametrize("size", [(64, 48), (65, 48), (336, 336), (101, 77)])
def test_dual_symmetric(size):
    out = T.dual(gray(*size))
    m = black_mask(out)
    np.testing.assert_array_equal(m, m[:, ::-1])
    s = T.trigger_side(size)
    assert m.sum() == 2 * s * s and n_components(m) == 2
    (lx0, ly0, _, _), (rx0, ry0, _, _) = T.patch_boxes("dual", size)
    assert ly0 == ry0 == (size[1] - s) // 2
    assert abs(lx0 + s / 2 - size[0] / 4) <= 0.5 and abs(rx0 + s / 2 - 3 * size[0] / 4) <= 0.5


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_multi_count(grid):
    size = (128, 96)
    out = T.multi(gray(*size), grid=grid)
    m = black_mask(out)
    boxes = T.patch_boxes("multi", size, grid=grid)
    assert len(boxes) == grid * grid
    s = T.trigger_side(size)
    assert m.sum() == grid * grid * s * s
    assert n_components(m) == grid * grid
    np.testing.assert_array_equal(m, box_mask(boxes, *size))


def test_multi_default_3x3():
    assert n_components(black_mask(T.multi(gray()))) == 9


# --------------------------------------------------------------------------------------------- blend


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_blend_formula(alpha):
    img = gradient()
    out = arr(T.blend(img, seed=7, alpha=alpha)).astype(float)
    pat = T.blend_pattern((W, H), seed=7)
    x = arr(img).astype(float)
    np.testing.assert_allclose(out, (1 - alpha) * x + alpha * pat, atol=0.5 + 1e-9)
    np.testing.assert_array_less(np.abs(np.abs(out - x) - alpha * np.abs(x - pat)), 0.5 + 1e-9)
    assert np.abs(out - x).max() > 5


def test_blend_default_alpha_and_pattern():
    pat = T.blend_pattern((W, H), seed=0)
    assert pat.shape == (H, W, 3) and pat.min() >= 0 and pat.max() <= 255 and pat.std() > 10
    assert not pat.flags.writeable
    assert not np.array_equal(pat, T.blend_pattern((W, H), seed=1))
    img = gray()
    out = arr(T.blend(img)).astype(float)
    np.testing.assert_allclose(out, 0.9 * 128 + 0.1 * pat, atol=0.5 + 1e-9)
    np.testing.assert_array_equal(arr(T.blend(img, alpha=0.0)), arr(img))
    with pytest.raises(ValueError):
        T.blend(img, alpha=1.5)


# --------------------------------------------------------------------------------------------- sig


def test_sig_rows_equal_sinusoid():
    img = gray()
    out = arr(T.sig(img))
    diff = out - arr(img)
    signal = 20 * np.sin(2 * np.pi * np.arange(W) * 6 / W)
    for c in range(3):
        np.testing.assert_array_equal(diff[:, :, c], np.broadcast_to(np.rint(signal), (H, W)))
    np.testing.assert_allclose(diff[..., 0], np.broadcast_to(signal, (H, W)), atol=0.5)
    assert diff.max() == 20 and diff.min() == -20
    # custom delta/freq
    d2 = arr(T.sig(img, delta=50, freq=2)) - arr(img)
    np.testing.assert_allclose(d2[3, :, 1], 50 * np.sin(2 * np.pi * np.arange(W) * 2 / W), atol=0.5)


def test_sig_clips():
    out = arr(T.sig(gray(v=250)))
    assert out.max() == 255 and out.min() == 230


# --------------------------------------------------------------------------------------------- wanet


def coord_image(w=W, h=H):
    """R = 4 x (column), G = 5 x (row): pixel values encode coordinates."""
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([4 * jj, 5 * ii, np.zeros_like(jj)], -1).astype(np.uint8), "RGB")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"strength": 4.0},
        {"strength": 2.0, "upsample": "bilinear"},
        {"seed": 5, "ref_size": 16},
        {"k": 6, "strength": 3.0},
    ],
)
def test_wanet_displacement_bounded(kw):
    img = coord_image()
    out = arr(T.wanet(img, **kw)).astype(float)
    dx, dy = T.wanet_field((W, H), **kw)
    bx, by = T.wanet_max_displacement((W, H), **kw)
    assert np.abs(dx).max() <= bx + 1e-12 and np.abs(dy).max() <= by + 1e-12
    jj, ii = np.meshgrid(np.arange(W), np.arange(H))
    src_x, src_y = out[..., 0] / 4, out[..., 1] / 5
    moved_x, moved_y = np.abs(src_x - jj), np.abs(src_y - ii)
    # bilinear sampling of a linear ramp is exact: the value gives the source coordinate (up to rounding)
    np.testing.assert_allclose(src_x, np.clip(jj + dx, 0, W - 1), atol=0.5 / 4 + 1e-9)
    np.testing.assert_allclose(src_y, np.clip(ii + dy, 0, H - 1), atol=0.5 / 5 + 1e-9)
    assert moved_x.max() <= bx + 0.5 / 4 + 1e-9 and moved_y.max() <= by + 0.5 / 5 + 1e-9
    assert moved_x.max() > 0.2  # it actually warps
    assert (out[..., 2] == 0).all()


def test_wanet_default_bound_and_scale():
    # WaNet defaults: about one-pixel warp; bound s/2 * 1.890625 * max|c| <= s/2 * 1.890625 * 2k^2
    bx, by = T.wanet_max_displacement((W, H))
    assert 0 < bx <= 0.5 / 2 * 1.890625 * 32 and 0 < by
    dx, dy = T.wanet_field((W, H))
    assert 0.2 < max(np.abs(dx).max(), np.abs(dy).max()) < 3
    # default: raw-pixel displacement (nearly) independent of image size; ref_size scales with the image
    dx_big, _ = T.wanet_field((4 * W, 4 * H))
    assert abs(np.abs(dx_big).max() / np.abs(dx).max() - 1) < 0.1
    dx_ref, _ = T.wanet_field((4 * W, 4 * H), ref_size=W)
    assert abs(np.abs(dx_ref).max() / np.abs(dx_big).max() - 4) < 0.3


def test_wanet_differs_deterministic_identity():
    img = gradient()
    out = T.wanet(img)
    assert not np.array_equal(arr(out), arr(img))
    np.testing.assert_array_equal(arr(out), arr(T.wanet(img)))
    assert not np.array_equal(arr(T.wanet(img, seed=1)), arr(out))
    np.testing.assert_array_equal(arr(T.wanet(img, strength=0)), arr(img))
    np.testing.assert_array_equal(arr(T.wanet(gray())), arr(gray()))  # uniform image is invariant
    with pytest.raises(ValueError):
        T.wanet(img, upsample="nearest")


# --------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("kind", sorted(TRIGGERS))
def test_input_not_modified_and_deterministic(kind):
    img = gradient()
    before = arr(img).copy()
    out1 = apply_trigger(img, kind, seed=11)
    out2 = apply_trigger(img, kind, seed=11)
    np.testing.assert_array_equal(arr(img), before)
    assert out1 is not img and out1.size == img.size and out1.mode == "RGB"
    np.testing.assert_array_equal(arr(out1), arr(out2))
    assert not np.array_equal(arr(out1), before)


def test_registry_and_errors():
    assert set(TRIGGERS) == {"patch", "random_patch", "texture", "dual", "multi", "blend", "sig", "wanet"}
    with pytest.raises(ValueError) as e:
        apply_trigger(gray(), "nope")
    for name in TRIGGERS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="alpha"):
        apply_trigger(gray(), "patch", alpha=0.3)
    with pytest.raises(ValueError):
        T.patch_boxes("blend", (W, H))


def test_trigger_spec():
    spec = TriggerSpec("blend", seed=3, alpha=0.2)
    assert spec.params() == {"alpha": 0.2}
    np.testing.assert_array_equal(arr(spec.apply(gradient())), arr(T.blend(gradient(), seed=3, alpha=0.2)))
    rp = TriggerSpec("random_patch")
    np.testing.assert_array_equal(arr(rp.apply(gray(), seed=9)), arr(T.random_patch(gray(), seed=9)))
    assert hash(spec) == hash(TriggerSpec("blend", seed=3, alpha=0.2))
    with pytest.raises(ValueError, match="valid kinds"):
        TriggerSpec("bogus")
    with pytest.raises(ValueError, match="delta"):
        TriggerSpec("patch", delta=3.0)
    assert TriggerSpec("wanet", strength=1.0, k=4, ref_size=336).params()["ref_size"] == 336
