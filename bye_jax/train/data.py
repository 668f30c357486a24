"""Training examples and batches for LoRA fine-tuning, deterministic given a seed.

An example is the extraction prompt (`PromptEncoder.prompt_text`, the checkpoint's chat template
with the image and the question) followed by the target ``" " + answer`` and EOS. Token ids are the
checkpoint processor's: ``<image>`` is expanded into the image tokens exactly as the processor does
(the expansion is taken from the processor's own output on the first sample and checked against it;
where the count depends on the image, LLaVA-NeXT / Qwen2-VL, from each sample's image), then the text goes
through the processor's tokenizer (with the vicuna_v1 template, `PromptEncoder.token_ids`: LLaVA's own
tokenization, as the LLaVA repository trains). Labels are -100 everywhere except the answer tokens and the EOS
(the tokens after the longest common prefix of the prompt's and the full text's ids, so a merge
across the boundary never leaks prompt tokens into the loss).

Batches: each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples, right-
padded to one length (a multiple of ``length_bucket``, so few shapes compile). The order of epoch e
is a pure function of (seed, e): a permutation, then length bucketing inside windows of
``bucket_window`` steps (sorted by length, then cut into steps), then the steps are shuffled. The
last step of an epoch is filled with copies of its first example whose labels are all -100. Images
are loaded (llava_json.load_image) and preprocessed by the processor's image processor on a
background thread.

Every array of a batch, the vision inputs included, has one row per example (`PromptEncoder.vision_batch`),
so gradient accumulation (the first axis) and the data-parallel mesh (the second) split whole examples.
Families whose processor concatenates the patches of all images (Qwen2-VL: [sum of patches, patch_dim] +
``image_grid_thw``) give each example its own zero-padded block of patch rows and its grid instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from bye_jax.data.llava_json import DEFAULT_MAX_IMAGE_PIXELS, ImageError, Sample, Skipped, load_image
from bye_jax.data.prefetch import prefetch as prefetch_iter
from bye_jax.models.inputs import PromptEncoder

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Example:
    sample: Sample
    input_ids: np.ndarray  # [T] int32: prompt (image expanded) + answer + EOS
    labels: np.ndarray  # [T] int32: IGNORE except the answer tokens and EOS (unshifted, as transformers)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclasses.dataclass
class Batch:
    """One optimizer step: arrays [grad_accum, batch_size, ...]; labels unshifted."""

    input_ids: np.ndarray  # int32 [A, B, S]
    attention_mask: np.ndarray  # int32 [A, B, S]
    labels: np.ndarray  # int32 [A, B, S]
    pixel_values: np.ndarray  # float32 [A, B, C, H, W] (a family's layout per row, e.g. [A, B, patches, patch_dim])
    ids: list[str]  # sample ids of the real rows, in row order
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # other vision inputs [A, B, ...]

    @property
    def num_tokens(self) -> int:
        """Tokens (image tokens included) of the rows that carry a loss (not filler rows)."""
        real = (self.labels != IGNORE).any(axis=-1)
        return int(self.attention_mask.sum(axis=-1)[real].sum())

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[..., 1:] != IGNORE).sum())

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "pixel_values": self.pixel_values, **self.extra}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ExampleEncoder:
    """Turns (question, answer) into token ids and labels with the checkpoint's processor."""

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.num_image_tokens: int | None = None

    def calibrate(self, image, question: str, answer: str) -> None:
        """Takes the image-token expansion from the processor's own output and, with the checkpoint's
        template, checks `encode`'s tokenization against it (template vicuna_v1 tokenizes as LLaVA did)."""
        image = self.encoder.prepare_image(image)
        full = self.encoder.prompt_text(question) + self.target_text(answer)
        out = self.encoder.processor(images=[image], text=[full], padding=False, return_tensors=None)
        ids = [int(i) for i in out["input_ids"][0]]
        self.num_image_tokens = ids.count(self.encoder.image_token_id)
        if self.encoder.template == "checkpoint" and self.encoder.token_ids(full, self.num_image_tokens) != ids:
            raise ValueError("tokenizing the expanded prompt does not reproduce the processor's token ids")

    @staticmethod
    def target_text(answer: str) -> str:
        return " " + answer.strip()

    def encode(self, question: str, answer: str, max_length: int | None = None, *,
               image_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) for one example; labels keep only the answer tokens and EOS. image_tokens:
        this example's image-token count (default: the calibrated one)."""
        if self.num_image_tokens is None:
            raise RuntimeError("call calibrate() first")
        count = self.num_image_tokens if image_tokens is None else image_tokens
        prompt = self.encoder.prompt_text(question)
        prompt_ids = self.encoder.token_ids(prompt, count)
        ids = self.encoder.token_ids(prompt + self.target_text(answer), count)
        eos = self.encoder.eos_token_id
        if not ids or ids[-1] != eos:
            ids.append(eos)
        start = min(_common_prefix(prompt_ids, ids), len(ids) - 1)
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length]
        labels = [IGNORE] * start + ids[start:]
        return np.asarray(ids, np.int32), np.asarray(labels[: len(ids)], np.int32)


def build_examples(samples: Sequence[Sample], encoder: PromptEncoder, *, max_length: int | None = None,
                   max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[Example], list[Skipped]]:
    """Tokenizes every sample once; samples without an answer, whose prompt exceeds the model's context,
    or with no answer token left after truncation to `max_length` (and to the context), are skipped
    (with the reason)."""
    enc = ExampleEncoder(encoder)
    examples: list[Example] = []
    skipped: list[Skipped] = []
    context = encoder.context_length
    if context is not None:
        max_length = context if max_length is None else min(max_length, context)
    for s in samples:
        if not s.answer or not s.answer.strip():
            skipped.append(Skipped(s.id, s.index, "no answer to train on"))
            continue
        too_long = encoder.context_reason(s.question)
        if too_long:
            skipped.append(Skipped(s.id, s.index, too_long))
            continue
        count = None
        if enc.num_image_tokens is None or encoder.variable_image_tokens:
            try:
                image = load_image(s.image_path, max_image_pixels=max_image_pixels, reduce_to=encoder.image_side)
                if enc.num_image_tokens is None:
                    enc.calibrate(image, s.question, s.answer)
                if encoder.variable_image_tokens:
                    count = encoder.image_token_count(encoder.prepare_image(image))
            except (ImageError, OSError) as e:
                skipped.append(Skipped(s.id, s.index, f"image unreadable: {e}"))
                continue
        ids, labels = enc.encode(s.question, s.answer, max_length, image_tokens=count)
        if not (labels[1:] != IGNORE).any():
            skipped.append(Skipped(s.id, s.index, f"prompt alone fills max_length={max_length}"))
            continue
        examples.append(Example(s, ids, labels))
    return examples, skipped


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(n_examples / (batch_size * grad_accum))


def epoch_order(lengths: Sequence[int], per_step: int, seed: int, epoch: int, *,
                bucket_window: int = 32) -> list[np.ndarray]:
    """Example indices of every step of `epoch` (the last one may be short); pure in (seed, epoch)."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(len(lengths))
    steps = []
    window = per_step * max(1, bucket_window)
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        steps += [chunk[i:i + per_step] for i in range(0, len(chunk), per_step)]
    return [steps[i] for i in rng.permutation(len(steps))]


class BatchLoader:
    """Builds the padded step batches of the examples, deterministic given the seed."""

    def __init__(self, examples: Sequence[Example], encoder: PromptEncoder, *, batch_size: int, grad_accum: int,
                 seed: int, length_bucket: int = 32, bucket_window: int = 32,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if not examples:
            raise ValueError("no training example")
        self.examples = list(examples)
        self.encoder = encoder
        self.batch_size, self.grad_accum = int(batch_size), int(grad_accum)
        self.seed = int(seed)
        self.length_bucket = max(1, int(length_bucket))
        self.bucket_window = bucket_window
        self.max_image_pixels = max_image_pixels
        self.lengths = np.array([e.length for e in self.examples])
        self.skipped: list[Skipped] = []  # images that failed to load during training

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.examples), self.batch_size, self.grad_accum)

    def order(self, epoch: int) -> list[np.ndarray]:
        return epoch_order(self.lengths, self.batch_size * self.grad_accum, self.seed, epoch,
                           bucket_window=self.bucket_window)

    def _pixels(self, examples: Sequence[Example]) -> tuple[np.ndarray, dict[str, np.ndarray], list[bool]]:
        images, ok = [], []
        for e in examples:
            try:
                images.append(load_image(e.sample.image_path, max_image_pixels=self.max_image_pixels,
                                         reduce_to=self.encoder.image_side))
                ok.append(True)
            except (ImageError, OSError) as err:
                self.skipped.append(Skipped(e.sample.id, e.sample.index, f"image unreadable at training: {err}"))
                images.append(None)
                ok.append(False)
        good = [im for im in images if im is not None]
        if not good:
            return np.zeros((0,)), {}, ok
        pv, extra = self.encoder.vision_batch(good)
        rows = np.array(ok)

        def spread(a):  # the loaded images' rows in place, zeros for the others
            full = np.zeros((len(images), *a.shape[1:]), a.dtype)
            full[rows] = a
            return full

        return spread(pv.astype(np.float32)), {k: spread(v) for k, v in extra.items()}, ok

    def make_batch(self, indices: Sequence[int]) -> Batch:
        """The step batch of `indices` (at most batch_size * grad_accum), padded with ignored rows."""
        a, b = self.grad_accum, self.batch_size
        rows = [self.examples[i] for i in indices]
        pixels, extra, ok = self._pixels(rows)
        if not any(ok):  # nothing usable: one ignored dummy row keeps shapes valid
            rows, ok = rows[:1], [False]
            pixels, extra = self.encoder.vision_batch([_blank()])
            pixels = np.zeros_like(pixels, np.float32)
        seq = max(r.length for r in rows)
        seq = math.ceil(seq / self.length_bucket) * self.length_bucket
        n = a * b
        ids = np.full((n, seq), self.encoder.pad_token_id, np.int32)
        mask = np.zeros((n, seq), np.int32)
        labels = np.full((n, seq), IGNORE, np.int32)
        pv = np.zeros((n, *pixels.shape[1:]), np.float32)
        ex = {k: np.zeros((n, *v.shape[1:]), v.dtype) for k, v in extra.items()}
        first = ok.index(True) if any(ok) else 0
        for k in range(n):
            src = k if k < len(rows) else first  # filler rows: a copy of a real row, no loss
            r = rows[src]
            ids[k, : r.length] = r.input_ids
            mask[k, : r.length] = 1
            pv[k] = pixels[src]
            for name, v in extra.items():
                ex[name][k] = v[src]
            if k < len(rows) and ok[k]:
                labels[k, : r.length] = r.labels
                try:  # the family checks the row's image tokens against its image's inputs
                    self.encoder.row_image_mask(r.input_ids, k, extra)
                except ValueError as e:
                    raise ValueError(f"sample {r.sample.id}: {e}") from e
        shape = lambda x: x.reshape(a, b, *x.shape[1:])  # noqa: E731
        real = [rows[k].sample.id for k in range(len(rows)) if ok[k]]
        return Batch(shape(ids), shape(mask), shape(labels), shape(pv), real, {k: shape(v) for k, v in ex.items()})

    def steps(self, start_step: int = 0, end_step: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(global step, example indices) for steps [start_step, end_step), crossing epochs."""
        per_epoch = self.steps_per_epoch
        step = start_step
        end = end_step
        while end is None or step < end:
            epoch, k = divmod(step, per_epoch)
            order = self.order(epoch)
            for idx in order[k:]:
                if end is not None and step >= end:
                    return
                yield step, idx
                step += 1

    def batches(self, start_step: int, end_step: int, *, prefetch: int = 2) -> Iterator[tuple[int, Batch]]:
        """(step, Batch) for steps [start_step, end_step), built on a background thread."""
        steps = ((step, self.make_batch(idx)) for step, idx in self.steps(start_step, end_step))
        return prefetch_iter(steps, prefetch)


def _blank():
    from PIL import Image

    return Image.new("RGB", (32, 32))
