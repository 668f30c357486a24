"""Batched greedy answers for LLaVA-JSON samples (the model's replies used by CP and ASR).

Samples are sorted by question length and cut into batches of exactly ``batch_size`` (the last one
is filled up with copies of its first sample, whose outputs are dropped), so every batch has the
same shape; prompts are LEFT padded up to a multiple of ``length_bucket`` tokens, so only a handful
of shapes compile. Images are decoded and preprocessed on a background thread while the device
decodes the previous batch. Generation is the model family's greedy decoding (for LLaVA
`bye_jax.models.generate.greedy_generate`: KV cache, jitted); the answer is the generated tokens up
to the first EOS, decoded with the checkpoint's tokenizer (special tokens skipped) and stripped --
what ``tokenizer.decode(transformers generate output[prompt_len:],
skip_special_tokens=True).strip()`` gives.

Over several processes (bye_jax/multihost.py) every process is given the same samples and generates
for a contiguous, balanced share of the batches (the batches a one-process run makes, so every
answer is the one it gives); answers and skipped samples are then gathered on every process. The
processes agree after every batch whether each is done or failed (`multihost.step_status`): an
error on one process (an exception while generating or preparing a batch) stops every process with
the same one-line error instead of leaving the others waiting at the gather.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from bye_jax import multihost
from bye_jax.data.llava_json import DEFAULT_MAX_IMAGE_PIXELS, ImageError, Sample, Skipped, load_image
from bye_jax.data.prefetch import prefetch
from bye_jax.data.tfds import shard_bounds
from bye_jax.models.family import family_of
from bye_jax.models.inputs import PromptBatch, PromptEncoder
from bye_jax.progress import progress as progress_bar

__all__ = ["decode_answer", "generate_answers"]


def decode_answer(encoder: PromptEncoder, tokens) -> str:
    """Generated token ids -> text: cut at the first EOS, special tokens skipped, stripped."""
    ids = np.asarray(tokens).reshape(-1)
    eos = np.flatnonzero(ids == encoder.eos_token_id)
    if eos.size:
        ids = ids[: eos[0]]
    return encoder.decode(ids, skip_special_tokens=True).strip()


def _batches(encoder: PromptEncoder, samples: Sequence[Sample], batch_size: int, length_bucket: int,
             max_image_pixels: int | None, skipped: list[Skipped]) -> Iterator[tuple[list[Sample], PromptBatch]]:
    for start in range(0, len(samples), batch_size):
        chunk, images = [], []
        for s in samples[start:start + batch_size]:
            too_long = encoder.context_reason(s.question)
            if too_long:
                skipped.append(Skipped(s.id, s.index, too_long))
                continue
            try:
                images.append(load_image(s.image_path, max_image_pixels=max_image_pixels,
                                         reduce_to=encoder.image_side))
                chunk.append(s)
            except (ImageError, OSError) as e:
                skipped.append(Skipped(s.id, s.index, f"image unreadable at generation: {e}"))
        if not chunk:
            continue
        pad = batch_size - len(chunk)  # fixed batch shape: fill with copies, outputs dropped
        batch = encoder.encode(images + images[:1] * pad, [s.question for s in chunk] + [chunk[0].question] * pad,
                               padding_side="left")
        bucket = math.ceil(batch.seq_len / length_bucket) * length_bucket
        yield chunk, batch.left_padded_to(bucket, encoder.pad_token_id)


def generate_answers(
    model,
    encoder: PromptEncoder,
    samples: Sequence[Sample],
    *,
    batch_size: int,
    max_new_tokens: int,
    length_bucket: int = 32,
    progress: bool = True,
    skipped: list[Skipped] | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    desc: str = "generate",
) -> dict[str, str]:
    """Greedy answers ``{sample id: text}`` (in the order of ``samples``) for LLaVA-JSON samples.

    A sample whose prompt exceeds the model's context, or whose image cannot be decoded any more, is
    appended to ``skipped`` (when given, with the reason) and its id is left out of the result.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    length_bucket = max(1, int(length_bucket))
    skipped = [] if skipped is None else skipped
    order = sorted(samples, key=lambda s: len(s.question))  # similar lengths together: less padding
    count = multihost.process_count()
    if count > 1:  # this process's batches: those of a one-process run, cut into contiguous shares
        first, end = shard_bounds(math.ceil(len(order) / batch_size), multihost.process_index(), count)
        order = order[first * batch_size:end * batch_size]
    answers: dict[str, str] = {}
    mine: list[Skipped] = []
    bar = progress_bar(len(order), desc, unit="sample", enabled=progress and multihost.is_primary())
    batches = prefetch(_batches(encoder, order, int(batch_size), length_bucket, max_image_pixels, mine))
    fam = family_of(model)
    try:
        while True:  # over processes: one round per batch, so a failure anywhere stops every process
            item, error = None, None
            try:
                item = next(batches, None)
                if item is not None:
                    chunk, batch = item
                    tokens = np.asarray(fam.greedy_generate(
                        model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                        max_new_tokens=int(max_new_tokens), eos_id=encoder.eos_token_id,
                        pad_id=encoder.pad_token_id, **batch.extra))
                    for s, row in zip(chunk, tokens[: len(chunk)], strict=True):
                        answers[s.id] = decode_answer(encoder, row)
                    bar.update(len(chunk))
            except Exception as e:  # noqa: BLE001 - told to every process, then raised on each
                if count == 1:
                    raise
                error = multihost.describe(e)
            if count == 1:
                if item is None:
                    break
            elif multihost.step_status(item is None and error is None, error, what=f"generation ({desc})"):
                break
    finally:
        batches.close()
        bar.close()
    if count > 1:  # every process's answers and skipped samples, in process (= batch) order
        parts = multihost.allgather_json({"answers": answers, "skipped": [[s.id, s.index, s.reason] for s in mine]})
        answers = {k: v for part in parts for k, v in part["answers"].items()}
        mine = [Skipped(i, int(k), reason) for part in parts for i, k, reason in part["skipped"]]
    skipped.extend(mine)
    return {s.id: answers[s.id] for s in samples if s.id in answers}
