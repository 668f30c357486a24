"""Where each of a LLaVA-NeXT image's tokens comes from (anyres tiling, unpadding, newline slots).

transformers' LlavaNextModel.pack_image_features lays out one image's features as: the base view's
s x s tokens (the image resized to one tile), then the tiles' joint grid (nph * s rows, npw * s
columns, tiles in row-major order) with the rows or columns added by the letterbox padding removed
(`unpad_image`), each remaining row followed by the ``image_newline`` embedding. `image_slots`
gives, per image token in prompt order, the index of its feature in the image's [tiles * s * s]
vision features, or -1 for a newline slot. Host-side numpy, from the original image size alone.
"""

from __future__ import annotations

import numpy as np

NEWLINE = -1


def best_resolution(image_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers' select_best_resolution: the (height, width) the image is tiled at."""
    from transformers.image_processing_utils import select_best_resolution

    h, w = select_best_resolution(tuple(int(x) for x in image_hw), [list(p) for p in pinpoints])
    return int(h), int(w)


def unpadded_window(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of the tiles' feature grid kept by transformers' unpad_image."""
    original_height, original_width = (int(x) for x in image_hw)
    current_height, current_width = grid_hw
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return slice(padding, current_height - padding), slice(0, current_width)
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return slice(0, current_height), slice(padding, current_width - padding)


def num_tiles(image_hw: tuple[int, int], pinpoints, tile_size: int) -> int:
    """Views the processor makes of the image: the base view plus the tiles."""
    h, w = best_resolution(image_hw, pinpoints)
    return 1 + (h // tile_size) * (w // tile_size)


def image_slots(image_hw: tuple[int, int], pinpoints, tile_size: int, side: int) -> np.ndarray:
    """int32 [N]: per image token, its feature index (view * side**2 + row * side + col), or NEWLINE."""
    h, w = best_resolution(image_hw, pinpoints)
    nph, npw = h // tile_size, w // tile_size
    hw = side * side
    base = np.arange(hw, dtype=np.int64)
    rows = np.arange(nph * side)[:, None]  # global feature row / column of the tiles' joint grid
    cols = np.arange(npw * side)[None, :]
    tile = 1 + (rows // side) * npw + cols // side
    index = tile * hw + (rows % side) * side + cols % side
    keep_rows, keep_cols = unpadded_window(image_hw, (nph * side, npw * side))
    index = index[keep_rows, keep_cols]
    grid = np.concatenate([index, np.full((index.shape[0], 1), NEWLINE)], axis=1).reshape(-1)
    return np.concatenate([base, grid]).astype(np.int32)
