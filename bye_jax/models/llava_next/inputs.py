"""LLaVA-NeXT prompts: the checkpoint's own LlavaNextProcessor, plus where every image token comes from.

The processor expands ``<image>`` into base view + unpadded tile grid + one newline slot per grid row
(its count depends on the image size). `encode` adds ``image_slots`` (bye_jax/models/llava_next/layout.py)
for the model and an ``image_mask`` without the newline slots for the entropy and signals.
"""

from __future__ import annotations

import functools

import numpy as np

from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.llava_next.layout import NEWLINE, image_slots

PAD_SLOT = -2  # image_slots beyond a row's image tokens
SLOT_BUCKET = 64  # image_slots width is a multiple of this (few compiled shapes)


class LlavaNextPromptEncoder(PromptEncoder):
    @functools.cached_property
    def _cfg(self):
        from bye_jax.models.family import load_config

        return load_config(self.checkpoint_dir)

    @property
    def image_side(self) -> int | None:
        """The largest side of the tiling resolutions (huge images are only shrunk towards it)."""
        return max(max(p) for p in self._cfg.image_grid_pinpoints)

    @functools.cached_property
    def image_tokens_per_image(self) -> int:
        """The most tokens one image can take (no unpadding): the prompt-length bound for the context check."""
        cfg, s = self._cfg, self._cfg.patch_grid
        tile = cfg.vision.image_size
        return s * s + max((h // tile) * s * (w // tile) * s + (h // tile) * s for h, w in cfg.image_grid_pinpoints)

    variable_image_tokens = True

    def image_token_count(self, image) -> int:
        cfg = self._cfg
        return len(image_slots((image.height, image.width), cfg.image_grid_pinpoints, cfg.vision.image_size,
                               cfg.patch_grid))

    def vision_inputs(self, out, batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
        if pixel_values.ndim != 5 or pixel_values.shape[0] != batch_size:
            raise ValueError(f"unexpected pixel_values shape {pixel_values.shape} (expected [B, views, C, H, W])")
        sizes = np.asarray(out["image_sizes"], dtype=np.int64).reshape(batch_size, 2)
        cfg = self._cfg
        slots = [image_slots(tuple(hw), cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.patch_grid)
                 for hw in sizes]
        views = max(int(s[s >= 0].max()) // (cfg.patch_grid ** 2) + 1 for s in slots)
        if views > pixel_values.shape[1]:
            raise ValueError(f"the processor made {pixel_values.shape[1]} views, the tiling needs {views}")
        width = -(-max(len(s) for s in slots) // SLOT_BUCKET) * SLOT_BUCKET
        table = np.full((batch_size, width), PAD_SLOT, np.int32)
        for i, s in enumerate(slots):
            table[i, : len(s)] = s
        return pixel_values, {"image_slots": table, "image_sizes": sizes.astype(np.int32)}

    def row_image_mask(self, ids: np.ndarray, row: int, extra: dict[str, np.ndarray]) -> np.ndarray:
        """The image tokens that carry image features (newline slots excluded)."""
        is_image = ids == self.image_token_id
        slots = extra["image_slots"][row]
        slots = slots[slots != PAD_SLOT]
        if int(is_image.sum()) != len(slots):
            raise ValueError(f"the prompt has {int(is_image.sum())} image tokens, the image's layout {len(slots)} "
                             f"(one <image> per prompt is supported)")
        mask = np.zeros(len(ids), bool)
        mask[np.flatnonzero(is_image)[slots != NEWLINE]] = True
        return mask
