"""Qwen2.5-VL model inputs from a checkpoint directory, through transformers' own processor logic.

transformers' Qwen2_5_VLProcessor insists on a video processor, and Qwen2-VL's video processor
imports torchvision (unusable with the CPU build of torch). `ImageOnlyQwenProcessor` is the same
processor class with the video processor left out of its attributes: its ``__call__`` (image
processor, ``<|image_pad|>`` expansion to ``grid.prod() / merge**2`` tokens, ``mm_token_type_ids``)
is transformers' own, so images produce exactly what they produce for transformers. The image
processor (the PIL backend when torchvision is missing) and the tokenizer (with its chat template)
are loaded from the checkpoint.

`QwenPromptEncoder.encode` returns a `QwenPromptBatch`: token rows padded as PromptEncoder pads them,
``pixel_values`` [B, P, patch_dim] (each sample's patches, zero-padded to the longest image, P a
multiple of the merge unit), ``image_mask`` (``input_ids == image_token_id``) and
``extra = {"image_grid_thw": [B, 3]}``. One image per sample. Training (bye_jax/train/data.py) takes the
same layout from `vision_batch` and each image's token count from `image_token_count`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image

from bye_jax.models.inputs import PromptBatch, PromptEncoder, clean_question


@functools.cache
def image_only_processor_class(model_type: str = "qwen2_5_vl"):
    """transformers' processor class of `model_type` (Qwen2_5_VLProcessor / Qwen2VLProcessor) without
    its video processor."""
    import transformers

    base = transformers.Qwen2VLProcessor if model_type == "qwen2_vl" else transformers.Qwen2_5_VLProcessor

    class ImageOnlyQwenProcessor(base):
        __doc__ = f"{base.__name__} without the video processor (see bye_jax/models/qwen2_5_vl/inputs.py)."

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwenProcessor


def _model_type(path: str) -> str:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return str(json.load(f).get("model_type", "qwen2_5_vl"))
    except (OSError, ValueError, AttributeError):
        return "qwen2_5_vl"


def load_processor(checkpoint_dir: str | os.PathLike):
    """The checkpoint's image processor + tokenizer + chat template as one image-only Qwen processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path = os.fspath(checkpoint_dir)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        first = " ".join(str(e).split()).split(". ")[0]
        raise ValueError(f"{path}: no usable tokenizer / image processor files (tokenizer.json, "
                         f"preprocessor_config.json): {first}") from e
    template = getattr(tokenizer, "chat_template", None)
    return image_only_processor_class(_model_type(path))(image_processor, tokenizer, chat_template=template)


@dataclasses.dataclass(frozen=True)
class QwenPromptBatch:
    """A PromptBatch (same fields and methods as the families branch's bye_jax.models.inputs.PromptBatch)
    whose ``extra`` holds ``image_grid_thw`` [B, 3] int32 (t, h, w in patches)."""

    input_ids: np.ndarray  # [B, S] int32
    attention_mask: np.ndarray  # [B, S] int32, 1 = real token
    pixel_values: np.ndarray  # [B, P, patch_dim] float32, zero rows past each image's patches
    image_mask: np.ndarray | None = None  # [B, S] bool: input_ids == image_token_id
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    answer_prefix: np.ndarray | None = None  # [B] int32, as PromptBatch.answer_prefix (None: not known)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def image_grid_thw(self) -> np.ndarray:
        return self.extra["image_grid_thw"]

    def left_padded_to(self, seq_len: int, pad_id: int) -> QwenPromptBatch:
        """The same (left-padded) batch with more padding in front, up to `seq_len` tokens."""
        base = PromptBatch(self.input_ids, self.attention_mask, self.pixel_values).left_padded_to(seq_len, pad_id)
        if base.input_ids is self.input_ids:
            return self
        image_mask = (None if self.image_mask is None else
                      np.concatenate([np.zeros((self.batch_size, base.seq_len - self.seq_len), bool),
                                      self.image_mask], axis=1))
        return dataclasses.replace(self, input_ids=base.input_ids, attention_mask=base.attention_mask,
                                   image_mask=image_mask)


def pack_patches(pixel_values: np.ndarray, grid_thw: np.ndarray, bucket: int,
                 pad_patches_to: int | None = None) -> np.ndarray:
    """Processor output (all images' patches concatenated [sum_i t*h*w, patch_dim]) -> [B, P, patch_dim],
    P = the most patches of an image (or `pad_patches_to`) rounded up to a multiple of `bucket`."""
    counts = [int(np.prod(g)) for g in grid_thw]
    longest = max(counts)
    p = longest if pad_patches_to is None else int(pad_patches_to)
    if p < longest:
        raise ValueError(f"an image has {longest} patches, more than pad_patches_to={p}")
    p = -(-p // bucket) * bucket
    out = np.zeros((len(counts), p, pixel_values.shape[-1]), np.float32)
    start = 0
    for i, n in enumerate(counts):
        out[i, :n] = pixel_values[start:start + n]
        start += n
    if start != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, the grids {start}")
    return out


class QwenPromptEncoder(PromptEncoder):
    """PromptEncoder for Qwen2.5-VL checkpoints (dynamic resolution: image tokens vary per image).

    Patch rows are padded to a multiple of `patch_bucket` (a multiple of the merge unit), so that
    batches of different image sizes share a handful of compiled shapes.
    """

    patch_bucket_units = 64  # merge units (64 x 4 = 256 patches, 64 image tokens)

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        self.processor = load_processor(self.checkpoint_dir)
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self.image_token_id = int(self.processor.image_token_id)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"{self.checkpoint_dir}: the tokenizer has no {self.image_token!r} token")
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.eos_token_id = int(eos) if eos is not None else 0
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.bos_token_id = self.tokenizer.bos_token_id
        self.chat_template = self.processor.chat_template
        self.merge_size = int(self.processor.image_processor.merge_size)
        self.patch_bucket = self.patch_bucket_units * self.merge_size**2

    @functools.cached_property
    def context_length(self) -> int | None:
        from bye_jax.models.qwen2_5_vl.config import load_config

        try:
            return int(load_config(self.checkpoint_dir).text.max_position_embeddings)
        except (OSError, ValueError):
            return None

    @property
    def image_side(self) -> int | None:
        """Side of the largest square image the pixel budget (max_pixels) keeps at full size."""
        size = self.processor.image_processor.size
        longest = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
        return int(np.sqrt(longest)) if longest else None

    def image_tokens_for(self, image: PIL.Image.Image) -> int:
        """Image tokens the processor gives `image` (dynamic resolution: depends on its size)."""
        mm = self.processor._get_num_multimodal_tokens(image_sizes=[(image.height, image.width)])
        return int(mm.num_image_tokens[0])

    def image_token_grid(self, image: PIL.Image.Image) -> tuple[int, int]:
        """(rows, columns) of `image`'s image tokens in the prompt (its patch grid / merge size), e.g.
        to draw an attention heat-map over it."""
        grid = self.processor(images=[image.convert("RGB")], text=[self.image_token], return_tensors=None)
        _, h, w = (int(x) for x in np.asarray(grid["image_grid_thw"]).reshape(-1))
        return h // self.merge_size, w // self.merge_size

    variable_image_tokens = True  # training expands each sample's image into its own token count

    def image_token_count(self, image: PIL.Image.Image) -> int:
        return self.image_tokens_for(image)

    def vision_batch(self, images: Sequence[PIL.Image.Image]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Training batches' image inputs: per-sample blocks of patch rows (`pixels`), not the processor's
        rows of all images concatenated, so that gradient accumulation and data parallelism split them with
        the batch along its first axis; every sample is padded to the batch's largest image (rounded up to
        `patch_bucket`)."""
        return self.pixels(images)

    @functools.cached_property
    def image_tokens_per_image(self) -> int:
        """The most image tokens one image can take (the pixel budget's square), for length bounds."""
        side = self.image_side or 32
        return self.image_tokens_for(PIL.Image.new("RGB", (side, side)))

    def pixels(self, images: Sequence[PIL.Image.Image], *, pad_patches_to: int | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The model's image inputs alone: (pixel_values [B, P, patch_dim], {"image_grid_thw": [B, 3]})."""
        out = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="np")
        grid = np.asarray(out["image_grid_thw"], np.int32).reshape(-1, 3)
        pv = pack_patches(np.asarray(out["pixel_values"], np.float32), grid, self.patch_bucket, pad_patches_to)
        return pv, {"image_grid_thw": grid}

    def row_image_mask(self, ids: np.ndarray, row: int, extra: dict[str, np.ndarray]) -> np.ndarray:
        """The image tokens of one row; ValueError (one line) unless they are as many as its image grid gives."""
        is_image = np.asarray(ids) == self.image_token_id
        expected = int(np.prod(extra["image_grid_thw"][row])) // self.merge_size**2
        if int(is_image.sum()) != expected:
            raise ValueError(f"the prompt has {int(is_image.sum())} image tokens, its image's grid {expected} "
                             "(one image per prompt; was the image file replaced?)")
        return is_image

    def prompt_text(self, question: str) -> str:
        question = clean_question(question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, images: Sequence[PIL.Image.Image], questions: Sequence[str], *, pad_to: int | None = None,
               padding_side: str = "left", pad_patches_to: int | None = None) -> QwenPromptBatch:
        """Tokenize + preprocess a batch (one image per question); pads tokens to the longest prompt or
        ``pad_to``, and patches to the largest image or ``pad_patches_to`` (rounded up to `patch_bucket`)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            raise ValueError("empty batch")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        texts = [self.prompt_text(q) for q in questions]
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        out = self.processor(images=rgb, text=texts, padding=False, return_tensors=None)
        rows = [np.asarray(r, dtype=np.int64) for r in out["input_ids"]]
        grid = np.asarray(out["image_grid_thw"], np.int32).reshape(-1, 3)
        if grid.shape[0] != len(rows):
            raise ValueError(f"{grid.shape[0]} images for {len(rows)} prompts (one image per prompt)")
        unit = self.merge_size**2
        for r, g in zip(rows, grid, strict=True):
            if int(np.count_nonzero(r == self.image_token_id)) != int(np.prod(g)) // unit:
                raise ValueError("the prompt's image tokens do not match its image grid")
        pixel_values = pack_patches(np.asarray(out["pixel_values"], np.float32), grid, self.patch_bucket,
                                    pad_patches_to)
        longest = max(len(r) for r in rows)
        seq_len = longest if pad_to is None else int(pad_to)
        if longest > seq_len:
            raise ValueError(f"prompt of {longest} tokens does not fit pad_to={seq_len}")
        input_ids = np.full((len(rows), seq_len), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(rows), seq_len), dtype=np.int32)
        for i, r in enumerate(rows):
            sl = slice(seq_len - len(r), seq_len) if padding_side == "left" else slice(0, len(r))
            input_ids[i, sl] = r
            mask[i, sl] = 1
        return QwenPromptBatch(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                               image_mask=(input_ids == self.image_token_id) & (mask == 1),
                               extra={"image_grid_thw": grid})
