"""InternVL prompts through transformers' own InternVLProcessor logic, without its video processor.

transformers' InternVLProcessor insists on a video processor (InternVL's imports torchvision, unusable
with the CPU build of torch): `image_only_processor_class` is the same class with the video processor
left out, so ``<IMG_CONTEXT>`` expands exactly as for transformers: ``<img>`` + image_seq_length
context tokens per tile + ``</img>``. The image processor (GotOcr2's; the PIL one without
torchvision), the tokenizer (with InternVL's named image tokens) and the chat template come from the
checkpoint, ``image_seq_length`` from processor_config.json.

Tiles: transformers' processor crops every image into tiles of the tower's size plus a thumbnail
(``crop_to_patches=True`` is its default, whatever preprocessor_config.json says), so the number of
image tokens varies per image; ``InternVLPromptEncoder(path, crop_to_patches=False)`` gives one view
(the image resized to one tile: the BYE paper's setting, image_seq_length tokens). pixel_values are
[B, P, C, H, W]: each sample's tiles, zero tiles after them up to the batch's most.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import PIL.Image

from bye_jax.models.inputs import PromptEncoder


@functools.cache
def image_only_processor_class():
    """transformers' InternVLProcessor without its video processor."""
    import transformers

    class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
        __doc__ = "InternVLProcessor without the video processor (see bye_jax/models/internvl/inputs.py)."

        crop_to_patches: bool | None = None  # None: the processor's default (tiles)

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if self.crop_to_patches is not None:
                kwargs.setdefault("crop_to_patches", self.crop_to_patches)
            return super().__call__(images=images, text=text, videos=videos, **kwargs)

    return ImageOnlyInternVLProcessor


def load_processor(checkpoint_dir: str | os.PathLike):
    """The checkpoint's image processor + tokenizer + chat template + image_seq_length as one processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path = os.fspath(checkpoint_dir)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        missing = [a for a in ("start_image_token", "end_image_token", "context_image_token", "video_token")
                   if getattr(tokenizer, a, None) is None]
        if missing:
            raise ValueError(f"the tokenizer names no {', '.join(missing)}")
        kwargs = {}
        conf = os.path.join(path, "processor_config.json")
        if os.path.isfile(conf):
            with open(conf, encoding="utf-8") as f:
                kwargs = {k: v for k, v in json.load(f).items() if k == "image_seq_length"}
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as e:
        first = " ".join(str(e).split()).split(". ")[0]
        raise ValueError(f"{path}: no usable InternVL tokenizer / image processor files (tokenizer.json, "
                         f"tokenizer_config.json, preprocessor_config.json): {first}") from e
    template = getattr(tokenizer, "chat_template", None)
    return image_only_processor_class()(image_processor, tokenizer, chat_template=template, **kwargs)


class InternVLPromptEncoder(PromptEncoder):
    """PromptEncoder for InternVL checkpoints; ``crop_to_patches``: None = the processor's default (tiles)."""

    variable_image_tokens = True

    def __init__(self, checkpoint_dir: str | os.PathLike, *, crop_to_patches: bool | None = None):
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        self.processor = load_processor(self.checkpoint_dir)
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self.image_token_id = int(self.processor.image_token_id)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.eos_token_id = int(eos) if eos is not None else 0
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.bos_token_id = self.tokenizer.bos_token_id
        self.chat_template = self.processor.chat_template
        self.image_kwargs = {} if crop_to_patches is None else {"crop_to_patches": bool(crop_to_patches)}
        self.processor.crop_to_patches = self.image_kwargs.get("crop_to_patches")
        self.image_seq_length = int(self.processor.image_seq_length)

    @property
    def image_side(self) -> int | None:
        """The largest side the tiling uses (huge images are only shrunk towards it)."""
        ip = self.processor.image_processor
        tile = int(ip.size["height"]) if hasattr(ip.size, "__getitem__") else int(ip.size.height)
        crop = self.image_kwargs.get("crop_to_patches", True)
        return tile * (int(getattr(ip, "max_patches", 1)) if crop else 1)

    def image_token_count(self, image: PIL.Image.Image) -> int:
        """``<IMG_CONTEXT>`` tokens of `image` (image_seq_length per tile; ``<img>`` / ``</img>`` not counted)."""
        mm = self.processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width)], **self.image_kwargs)
        return self.image_seq_length * int(mm.num_image_patches[0])

    @functools.cached_property
    def image_tokens_per_image(self) -> int:
        """The most ``<IMG_CONTEXT>`` tokens one image can take, for the prompt-length bound."""
        ip = self.processor.image_processor
        crop = self.image_kwargs.get("crop_to_patches", True)
        tiles = int(getattr(ip, "max_patches", 1)) + 1 if crop and int(getattr(ip, "max_patches", 1)) > 1 else 1
        return self.image_seq_length * tiles

    def prompt_length(self, question: str) -> int:
        """Tokens of the prompt at the most tiles (``<IMG_CONTEXT>`` -> ``<img>`` + N + ``</img>``)."""
        ids = self.tokenizer(self.prompt_text(question))["input_ids"]
        return len(ids) + ids.count(self.image_token_id) * (self.image_tokens_per_image + 1)  # + <img>, </img>

    def image_expansion(self, count: int) -> str:
        """``<img>`` + `count` context tokens + ``</img>``, as InternVLProcessor expands ``<IMG_CONTEXT>``."""
        return f"{self.processor.start_image_token}{self.image_token * count}{self.processor.end_image_token}"

    def vision_inputs(self, out, batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """[B, P, C, H, W]: each prompt's tiles (the processor lists all prompts' tiles one after another)."""
        tiles = np.asarray(out["pixel_values"], dtype=np.float32)
        if "num_patches" in out:
            counts = [int(n) for n in np.asarray(out["num_patches"]).reshape(-1)]
        else:
            per_row = [int(np.count_nonzero(np.asarray(r) == self.image_token_id)) for r in out["input_ids"]]
            if any(n % self.image_seq_length or n == 0 for n in per_row):
                raise ValueError(f"image-token counts {per_row} are not positive multiples of image_seq_length "
                                 f"{self.image_seq_length} (one image per prompt is supported)")
            counts = [n // self.image_seq_length for n in per_row]
        if tiles.ndim != 4 or len(counts) != batch_size or sum(counts) != tiles.shape[0]:
            raise ValueError(f"unexpected pixel_values shape {tiles.shape} for {batch_size} prompts with "
                             f"{counts} tiles")
        out_pv = np.zeros((batch_size, max(counts), *tiles.shape[1:]), np.float32)
        start = 0
        for i, n in enumerate(counts):
            out_pv[i, :n] = tiles[start:start + n]
            start += n
        return out_pv, {}

    def vision_batch(self, images):
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        out = self.processor.image_processor(images=rgb, return_tensors="np",
                                             crop_to_patches=self.image_kwargs.get("crop_to_patches", True))
        return self.vision_inputs(out, len(rgb))
