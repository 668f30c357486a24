"""Backdoor triggers stamped into raw PIL RGB images.

Every trigger is a pure function ``fn(image, *, seed=0, **params) -> PIL.Image.Image``: it returns a
new RGB image and never modifies its input. Outputs are fully determined by the image, the seed and
the parameters (kinds without randomness accept and ignore ``seed`` so that all share one signature).

Kinds (``TRIGGERS``):

* ``patch``        -- the BYE paper's default: a solid black square at the image centre.
* ``random_patch`` -- the same square at a seeded random position, always fully inside the image.
* ``texture``      -- a black/white checkerboard square of the same side at the centre.
* ``dual``         -- two squares mirror-symmetric about the vertical centre line (1/4 and 3/4 width).
* ``multi``        -- an ``grid x grid`` (default 3 x 3) regular grid of squares.
* ``blend``        -- full-image blend with a fixed seeded noise pattern (Chen et al. 2017).
* ``sig``          -- additive horizontal sinusoid (SIG, Barni et al. 2019).
* ``wanet``        -- smooth, nearly invisible warping field (WaNet, Nguyen & Tran 2021).

Documented choices
------------------
Square side (``trigger_side``)
    ``side = max(1, floor(min(W, H) / 16 + 0.5))`` -- 1/16 of the shorter side, rounded half *up*
    (not Python's banker's rounding), at least 1 px. E.g. 336 -> 21, 448 -> 28, 24 -> 2, 8 -> 1.
Centre position
    top-left corner ``((W - side) // 2, (H - side) // 2)``; when ``W - side`` is odd the square sits
    half a pixel left of the true centre (same for rows).
Pixel rounding
    Float results are rounded with ``np.rint`` (half to even) and clipped to [0, 255].
blend
    ``pattern = uniform integer noise in [0, 255]`` of ``pattern_size x pattern_size x 3`` drawn from
    ``np.random.default_rng(seed)``, resized to (W, H) with PIL bilinear; the pattern is therefore the
    same (up to resizing) for every image. ``out = rint((1 - alpha) * img + alpha * pattern)``,
    default alpha 0.1, so ``|out - img| <= alpha * |img - pattern| + 0.5`` everywhere.
sig
    ``out[i, j, c] = clip(rint(img[i, j, c] + delta * sin(2 pi j freq / W)))``: a signal that varies
    along columns j and is constant down each column, identical on all channels. Defaults delta 20,
    freq 6 (Barni et al.'s values).
wanet
    Control grid ``c ~ U[-1, 1]^(2, k, k)`` (seeded, k = 4), normalised so ``mean|c| = 1``, upsampled to
    (H, W) with align-corners interpolation (``bicubic``, Keys a = -0.75 with border replication like
    PyTorch, as WaNet; or ``bilinear``) to a field ``N``. WaNet adds ``s * N / size`` to the identity
    grid in normalised [-1, 1] coordinates; converted to pixels (align_corners=True) and per axis:

        dx = s * N_x * (W - 1) / (2 * R_x),   dy = s * N_y * (H - 1) / (2 * R_y)

    with ``R_x = W, R_y = H`` by default (exactly WaNet's warp at this resolution: displacement is in
    raw pixels, independent of the image size), or ``R_x = R_y = ref_size`` to apply the warp WaNet
    would apply at a ``ref_size x ref_size`` image, scaled with the image. Each output pixel (i, j) is
    bilinearly sampled at source ``(clip(j + dx, 0, W - 1), clip(i + dy, 0, H - 1))`` (border clamp).
    Bound: ``|dx| <= s / 2 * max|N_x| * (W - 1) / R_x`` (likewise for y); ``max|N| <= max|c|`` for
    bilinear and ``<= 1.890625 * max|c|`` for bicubic (sum of |Keys weights| squared), and
    ``max|c| <= 2 k^2`` because ``mean|c| = 1``. ``wanet_field`` returns the exact field and
    ``wanet_max_displacement`` the bound from the actual control grid. With the defaults (s 0.5, k 4)
    the displacement is about 0.5-1 px, as in WaNet.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "TRIGGERS",
    "TriggerSpec",
    "apply_trigger",
    "blend",
    "blend_pattern",
    "dual",
    "multi",
    "patch",
    "patch_boxes",
    "random_patch",
    "sig",
    "texture",
    "trigger_param_names",
    "trigger_side",
    "wanet",
    "wanet_field",
    "wanet_max_displacement",
]

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
Color = tuple[int, int, int]

BLACK: Color = (0, 0, 0)
WHITE: Color = (255, 255, 255)

# ---------------------------------------------------------------------------------------------------------
# helpers


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _to_array(image: Image.Image) -> np.ndarray:
    """A fresh, writable uint8 (H, W, 3) copy of ``image`` (converted to RGB if needed)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8, copy=True)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="RGB")


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def trigger_side(size: tuple[int, int]) -> int:
    """Square side for an image of ``size = (W, H)``: ``max(1, floor(min(W, H) / 16 + 0.5))``."""
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return max(1, _round_half_up(min(w, h) / 16))


def _resolve_side(size: tuple[int, int], side: int | None) -> int:
    if side is None:
        return trigger_side(size)
    side = int(side)
    if side < 1 or side > min(size):
        raise ValueError(f"side must be in [1, {min(size)}] for image size {size}, got {side}")
    return side


def _clamp_corner(x0: int, y0: int, side: int, size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    return min(max(x0, 0), w - side), min(max(y0, 0), h - side)


def _centre_box(size: tuple[int, int], side: int) -> Box:
    w, h = size
    x0, y0 = (w - side) // 2, (h - side) // 2
    return (x0, y0, x0 + side, y0 + side)


def _random_box(size: tuple[int, int], side: int, seed: int) -> Box:
    w, h = size
    rng = np.random.default_rng(seed)
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    return (x0, y0, x0 + side, y0 + side)


def _dual_boxes(size: tuple[int, int], side: int) -> list[Box]:
    w, h = size
    xl, y0 = _clamp_corner(_round_half_up(w / 4 - side / 2), (h - side) // 2, side, size)
    xr = w - side - xl  # exact mirror image of the left square
    return [(xl, y0, xl + side, y0 + side), (xr, y0, xr + side, y0 + side)]


def _grid_boxes(size: tuple[int, int], side: int, grid: int) -> list[Box]:
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    w, h = size
    boxes = []
    for r in range(grid):
        for c in range(grid):
            cx, cy = (c + 1) * w / (grid + 1), (r + 1) * h / (grid + 1)
            x0, y0 = _clamp_corner(_round_half_up(cx - side / 2), _round_half_up(cy - side / 2), side, size)
            boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def patch_boxes(
    kind: str, size: tuple[int, int], *, seed: int = 0, side: int | None = None, grid: int = 3
) -> list[Box]:
    """Boxes ``(x0, y0, x1, y1)`` (exclusive ends) covered by a square-patch trigger on a ``size`` image.

    ``kind`` is one of ``patch``, ``random_patch``, ``texture``, ``dual``, ``multi``. Useful for tests
    and for mapping the trigger onto image tokens.
    """
    s = _resolve_side(size, side)
    if kind in ("patch", "texture"):
        return [_centre_box(size, s)]
    if kind == "random_patch":
        return [_random_box(size, s, seed)]
    if kind == "dual":
        return _dual_boxes(size, s)
    if kind == "multi":
        return _grid_boxes(size, s, grid)
    raise ValueError(f"{kind!r} is not a patch trigger; valid: patch, random_patch, texture, dual, multi")


def _fill(arr: np.ndarray, boxes: list[Box], color: Color) -> np.ndarray:
    col = np.asarray(color, dtype=np.uint8).reshape(3)
    for x0, y0, x1, y1 in boxes:
        arr[y0:y1, x0:x1] = col
    return arr


# ---------------------------------------------------------------------------------------------------------
# patch-type triggers


def patch(image: Image.Image, *, seed: int = 0, side: int | None = None, color: Color = BLACK) -> Image.Image:
    """Solid square (default black, side ``trigger_side``) at the image centre. ``seed`` is ignored."""
    del seed
    arr = _to_array(image)
    size = (arr.shape[1], arr.shape[0])
    return _to_image(_fill(arr, [_centre_box(size, _resolve_side(size, side))], color))


def random_patch(
    image: Image.Image, *, seed: int = 0, side: int | None = None, color: Color = BLACK
) -> Image.Image:
    """Solid square at a uniformly random position (``default_rng(seed)``), fully inside the image.

    Seed it per sample (e.g. with the sample index) to vary the position across samples.
    """
    arr = _to_array(image)
    size = (arr.shape[1], arr.shape[0])
    return _to_image(_fill(arr, [_random_box(size, _resolve_side(size, side), seed)], color))


def texture(
    image: Image.Image,
    *,
    seed: int = 0,
    side: int | None = None,
    cell: int | None = None,
    colors: tuple[Color, Color] = (BLACK, WHITE),
) -> Image.Image:
    """Checkerboard square at the centre; cells of ``cell`` px (default ``max(2, side // 4)``).

    The top-left cell gets ``colors[0]`` (black). If ``cell >= side`` the square is a single black cell.
    ``seed`` is ignored.
    """
    del seed
    arr = _to_array(image)
    size = (arr.shape[1], arr.shape[0])
    s = _resolve_side(size, side)
    cell = max(2, s // 4) if cell is None else int(cell)
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    x0, y0, x1, y1 = _centre_box(size, s)
    idx = np.arange(s) // cell
    odd = (idx[:, None] + idx[None, :]) % 2 == 1
    board = np.where(odd[..., None], np.asarray(colors[1], np.uint8), np.asarray(colors[0], np.uint8))
    arr[y0:y1, x0:x1] = board
    return _to_image(arr)


def dual(image: Image.Image, *, seed: int = 0, side: int | None = None, color: Color = BLACK) -> Image.Image:
    """Two squares centred at about (W/4, H/2) and (3W/4, H/2), exact mirror images about the vertical
    centre line (right corner ``x = W - side - x_left``). ``seed`` is ignored."""
    del seed
    arr = _to_array(image)
    size = (arr.shape[1], arr.shape[0])
    return _to_image(_fill(arr, _dual_boxes(size, _resolve_side(size, side)), color))


def multi(
    image: Image.Image, *, seed: int = 0, side: int | None = None, grid: int = 3, color: Color = BLACK
) -> Image.Image:
    """``grid x grid`` squares centred at ((c+1) W/(grid+1), (r+1) H/(grid+1)); side defaults to
    ``trigger_side`` (squares may touch/overlap only on tiny images). ``seed`` is ignored."""
    del seed
    arr = _to_array(image)
    size = (arr.shape[1], arr.shape[0])
    return _to_image(_fill(arr, _grid_boxes(size, _resolve_side(size, side), int(grid)), color))


# ---------------------------------------------------------------------------------------------------------
# full-image triggers


@functools.lru_cache(maxsize=64)
def _blend_pattern_cached(seed: int, pattern_size: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(pattern_size, pattern_size, 3), dtype=np.uint8)
    pat = np.array(
        Image.fromarray(noise, mode="RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float64
    )
    pat.setflags(write=False)
    return pat


def blend_pattern(size: tuple[int, int], *, seed: int = 0, pattern_size: int = 224) -> np.ndarray:
    """The fixed blend pattern for an image of ``size = (W, H)``: float64 (H, W, 3), values in [0, 255].

    Uniform integer noise of ``pattern_size^2 x 3`` from ``default_rng(seed)`` resized bilinearly.
    The returned array is read-only (cached).
    """
    if pattern_size < 1:
        raise ValueError(f"pattern_size must be >= 1, got {pattern_size}")
    return _blend_pattern_cached(int(seed), int(pattern_size), (int(size[0]), int(size[1])))


def blend(image: Image.Image, *, seed: int = 0, alpha: float = 0.1, pattern_size: int = 224) -> Image.Image:
    """``out = rint((1 - alpha) * img + alpha * pattern)`` with ``pattern = blend_pattern(...)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    arr = _to_array(image).astype(np.float64)
    pat = blend_pattern((arr.shape[1], arr.shape[0]), seed=seed, pattern_size=pattern_size)
    return _to_image(_float_to_uint8((1.0 - alpha) * arr + alpha * pat))


def sig(image: Image.Image, *, seed: int = 0, delta: float = 20.0, freq: float = 6.0) -> Image.Image:
    """SIG: ``out = clip(rint(img + delta * sin(2 pi j freq / W)))`` over columns j. ``seed`` ignored."""
    del seed
    arr = _to_array(image).astype(np.float64)
    w = arr.shape[1]
    signal = delta * np.sin(2.0 * np.pi * np.arange(w) * freq / w)
    return _to_image(_float_to_uint8(arr + signal[None, :, None]))


# ---------------------------------------------------------------------------------------------------------
# WaNet

_KEYS_A = -0.75  # PyTorch's bicubic coefficient
_BICUBIC_GAIN = 1.890625  # (sum of |Keys weights| at t = 0.5)^2: worst-case 2-D overshoot factor


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic weights for taps at offsets -1, 0, 1, 2 given fractional position t in [0, 1)."""
    a = _KEYS_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _interp_matrix(n_out: int, n_in: int, mode: str) -> np.ndarray:
    """(n_out, n_in) align-corners interpolation matrix (border-replicated taps for bicubic)."""
    m = np.zeros((n_out, n_in))
    u = np.zeros(n_out) if n_out == 1 or n_in == 1 else np.arange(n_out) * (n_in - 1) / (n_out - 1)
    i0 = np.minimum(np.floor(u).astype(int), n_in - 1)
    t = u - i0
    rows = np.arange(n_out)
    if mode == "bilinear":
        i1 = np.minimum(i0 + 1, n_in - 1)
        np.add.at(m, (rows, i0), 1 - t)
        np.add.at(m, (rows, i1), t)
    elif mode == "bicubic":
        w = _cubic_weights(t)
        for tap, off in enumerate((-1, 0, 1, 2)):
            np.add.at(m, (rows, np.clip(i0 + off, 0, n_in - 1)), w[:, tap])
    else:
        raise ValueError(f"upsample must be 'bicubic' or 'bilinear', got {mode!r}")
    return m


def _wanet_control_grid(seed: int, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1.0, 1.0, size=(2, k, k))
    return c / np.mean(np.abs(c))


def _wanet_scale(size: tuple[int, int], strength: float, ref_size: int | None) -> tuple[float, float]:
    w, h = size
    rx, ry = (w, h) if ref_size is None else (ref_size, ref_size)
    if rx < 1 or ry < 1:
        raise ValueError(f"ref_size must be >= 1, got {ref_size}")
    return strength * (w - 1) / (2.0 * rx), strength * (h - 1) / (2.0 * ry)


def wanet_field(
    size: tuple[int, int],
    *,
    seed: int = 0,
    k: int = 4,
    strength: float = 0.5,
    upsample: str = "bicubic",
    ref_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel displacement fields ``(dx, dy)``, each float64 (H, W), of the WaNet warp (see module doc)."""
    w, h = size
    c = _wanet_control_grid(int(seed), int(k))
    my, mx = _interp_matrix(h, k, upsample), _interp_matrix(w, k, upsample)
    nx, ny = my @ c[0] @ mx.T, my @ c[1] @ mx.T
    sx, sy = _wanet_scale(size, strength, ref_size)
    return sx * nx, sy * ny


def wanet_max_displacement(
    size: tuple[int, int],
    *,
    seed: int = 0,
    k: int = 4,
    strength: float = 0.5,
    upsample: str = "bicubic",
    ref_size: int | None = None,
) -> tuple[float, float]:
    """Documented a-priori bound ``(bx, by)`` in pixels on ``|dx|``, ``|dy|``:
    ``s / 2 * gain * max|c_axis| * (size - 1) / R`` with gain 1 (bilinear) or 1.890625 (bicubic)."""
    if upsample not in ("bicubic", "bilinear"):
        raise ValueError(f"upsample must be 'bicubic' or 'bilinear', got {upsample!r}")
    c = _wanet_control_grid(int(seed), int(k))
    gain = _BICUBIC_GAIN if upsample == "bicubic" else 1.0
    sx, sy = _wanet_scale(size, strength, ref_size)
    return abs(sx) * gain * float(np.abs(c[0]).max()), abs(sy) * gain * float(np.abs(c[1]).max())


def _bilinear_sample(arr: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    x0 = np.clip(np.floor(xs).astype(np.intp), 0, w - 1)
    y0 = np.clip(np.floor(ys).astype(np.intp), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    wx, wy = (xs - x0)[..., None], (ys - y0)[..., None]
    top = arr[y0, x0] * (1 - wx) + arr[y0, x1] * wx
    bot = arr[y1, x0] * (1 - wx) + arr[y1, x1] * wx
    return top * (1 - wy) + bot * wy


def wanet(
    image: Image.Image,
    *,
    seed: int = 0,
    k: int = 4,
    strength: float = 0.5,
    upsample: str = "bicubic",
    ref_size: int | None = None,
) -> Image.Image:
    """WaNet warp: bilinear resampling at ``(clip(j + dx), clip(i + dy))`` with ``wanet_field``'s field.

    ``strength == 0`` returns an identical copy.
    """
    arr = _to_array(image)
    h, w = arr.shape[:2]
    if strength == 0:
        return _to_image(arr)
    dx, dy = wanet_field((w, h), seed=seed, k=k, strength=strength, upsample=upsample, ref_size=ref_size)
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    xs, ys = np.clip(jj + dx, 0, w - 1), np.clip(ii + dy, 0, h - 1)
    return _to_image(_float_to_uint8(_bilinear_sample(arr.astype(np.float64), xs, ys)))


# ---------------------------------------------------------------------------------------------------------
# registry

TriggerFn = Callable[..., Image.Image]

TRIGGERS: dict[str, TriggerFn] = {
    "patch": patch,
    "random_patch": random_patch,
    "texture": texture,
    "dual": dual,
    "multi": multi,
    "blend": blend,
    "sig": sig,
    "wanet": wanet,
}


def _get(kind: str) -> TriggerFn:
    try:
        return TRIGGERS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown trigger kind {kind!r}; valid kinds: {', '.join(TRIGGERS)}") from None


def _param_names(kind: str) -> list[str]:
    return [p for p in inspect.signature(_get(kind)).parameters if p not in ("image", "seed")]


def trigger_param_names(kind: str) -> list[str]:
    """The parameters image trigger `kind` takes (besides image and seed); ValueError for an unknown kind."""
    return _param_names(kind)


def apply_trigger(image: Image.Image, kind: str, *, seed: int = 0, **params: Any) -> Image.Image:
    """Stamp trigger ``kind`` into ``image`` (returns a new image). Raises ValueError for an unknown kind
    (listing the valid ones) or a parameter the kind does not take (listing the ones it does)."""
    fn = _get(kind)
    unknown = sorted(set(params) - set(_param_names(kind)))
    if unknown:
        raise ValueError(f"trigger {kind!r} got unknown parameter(s) {unknown}; valid: {_param_names(kind)}")
    return fn(image, seed=seed, **params)


@dataclasses.dataclass(frozen=True)
class TriggerSpec:
    """Tidy, hashable trigger configuration. ``None`` fields use the kind's default; setting a field the
    kind does not use raises ValueError. ``spec.apply(img, seed=i)`` overrides the seed (per sample)."""

    kind: str = "patch"
    seed: int = 0
    side: int | None = None
    color: Color | None = None
    cell: int | None = None
    grid: int | None = None
    alpha: float | None = None
    pattern_size: int | None = None
    delta: float | None = None
    freq: float | None = None
    strength: float | None = None
    k: int | None = None
    upsample: str | None = None
    ref_size: int | None = None

    def __post_init__(self) -> None:
        valid = _param_names(self.kind)  # also validates kind
        bad = sorted(n for n, v in self.params().items() if n not in valid)
        if bad:
            raise ValueError(f"trigger {self.kind!r} does not take {bad}; valid: {valid}")

    def params(self) -> dict[str, Any]:
        """The explicitly set (non-None) parameters, excluding kind and seed."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("kind", "seed") and getattr(self, f.name) is not None
        }

    def apply(self, image: Image.Image, *, seed: int | None = None) -> Image.Image:
        return apply_trigger(image, self.kind, seed=self.seed if seed is None else seed, **self.params())
