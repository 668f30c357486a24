"""Model inputs from a Hugging Face LLaVA checkpoint directory, via the checkpoint's own processor.

The prompt is the checkpoint's chat template applied to one user turn [image, question] with the
generation prompt; without a template, LLaVA-1.5's ``USER: <image>\\n{question} ASSISTANT:``.
``<image>`` is expanded into the image tokens by the processor itself (transformers'
LlavaProcessor), so the token ids are exactly what transformers feeds its own model. Padding is
done here (left by default), with the tokenizer's pad id (else eos, else 0) and mask 0.

`context_reason` tells, before any image is loaded, whether a question's prompt (image tokens
included) exceeds the text model's context (``max_position_embeddings``); every consumer skips
such samples with that reason. `image_side` is the size the processor resizes images to
(``load_image(reduce_to=...)`` shrinks huge images towards it first).

A family whose processor differs subclasses `PromptEncoder` (bye_jax/models/family.py): its
`vision_inputs` gives the model's extra inputs (`PromptBatch.extra`), `row_image_mask` the image
positions the signals use (`PromptBatch.image_mask`, e.g. without newline slots), and
`image_token_count` the expansion of one image when it depends on the image.

Fidelity with the original LLaVA repository (the BYE paper's extraction script, llava/eval/model_vqa.py),
as options (`PromptEncoder(template=..., image_aspect=...)`, the commands' ``--config.prompt.*``):
``template="vicuna_v1"`` is LLaVA's ``conv_vicuna_v1`` prompt (``"{system} USER: <image>\\n{question}
ASSISTANT:"``) tokenized as ``tokenizer_image_token`` does (the text around ``<image>`` tokenized chunk
by chunk, one BOS; the image token then expanded as the processor would); ``image_aspect="pad"`` pads
every image to a square with the image processor's mean colour first (``expand2square``, LLaVA's
``image_aspect_ratio=pad``). The defaults, ``"checkpoint"`` / ``"processor"``, are the HF checkpoint's
chat template and processor.

No torch import here (transformers itself may import it when it is installed).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image

DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
TEMPLATES = ("checkpoint", "vicuna_v1")
IMAGE_ASPECTS = ("processor", "pad")
TILES = ("processor", "off")  # off: one view where the processor tiles (a family encoder's crop_to_patches=False)
# llava/conversation.py conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"), one user turn with an image
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VICUNA_V1_TEMPLATE = VICUNA_V1_SYSTEM + " USER: <image>\n{question} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"
_SENTINEL = "QUESTIONSENTINEL7d1f"


def expand_to_square(image: PIL.Image.Image, fill: tuple[int, ...]) -> PIL.Image.Image:
    """The image centred on a square of colour `fill` (LLaVA's expand2square; square images unchanged)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = PIL.Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def clean_question(text: str) -> str:
    """The question as it goes into the prompt: ``<image>`` removed, whitespace stripped."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    input_ids: np.ndarray  # [B, S] int32
    attention_mask: np.ndarray  # [B, S] int32, 1 = real token
    pixel_values: np.ndarray  # [B, 3, H, W] float32 (a family's processor may give another layout)
    # the image positions the entropy and signals use, [B, S] bool; None: input_ids == image token
    image_mask: np.ndarray | None = None
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # the model's other vision inputs
    # [B] int32: the prompt's last tokens that follow the question (the template's generation prompt,
    # e.g. " ASSISTANT:"): the answer-prefix segment of the share signals; None when not known
    answer_prefix: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def left_padded_to(self, seq_len: int, pad_id: int) -> PromptBatch:
        """The same (left-padded) batch with more padding in front, up to `seq_len` tokens."""
        extra = seq_len - self.seq_len
        if extra <= 0:
            return self
        b = self.batch_size
        ids = np.concatenate([np.full((b, extra), pad_id, np.int32), self.input_ids], axis=1)
        mask = np.concatenate([np.zeros((b, extra), np.int32), self.attention_mask], axis=1)
        image_mask = (None if self.image_mask is None else
                      np.concatenate([np.zeros((b, extra), bool), self.image_mask], axis=1))
        return PromptBatch(ids, mask, self.pixel_values, image_mask, self.extra, self.answer_prefix)


class PromptEncoder:
    """Builds prompts and batched numpy inputs with the checkpoint's own processor."""

    template = "checkpoint"  # class defaults for subclasses with their own __init__ (the checkpoint's format)
    image_aspect = "processor"

    def __init__(self, checkpoint_dir: str | os.PathLike, *, template: str = "checkpoint",
                 image_aspect: str = "processor"):
        from transformers import AutoProcessor

        if template not in TEMPLATES:
            raise ValueError(f"prompt template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {', '.join(IMAGE_ASPECTS)}, got {image_aspect!r}")
        self.template = template
        self.image_aspect = image_aspect
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        try:
            self.processor = AutoProcessor.from_pretrained(self.checkpoint_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' messages run over lines
            first = " ".join(str(e).split()).split(". ")[0]
            raise ValueError(f"{self.checkpoint_dir}: no usable tokenizer / processor files (tokenizer.json, "
                             f"tokenizer_config.json, processor_config.json): {first}") from e
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{self.checkpoint_dir}: the processor has no tokenizer")
        image_token = getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER
        image_token_id = getattr(self.processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"{self.checkpoint_dir}: the tokenizer has no {image_token!r} token")
        self.image_token: str = image_token
        self.image_token_id: int = int(image_token_id)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.eos_token_id: int = int(eos) if eos is not None else 0
        self.pad_token_id: int = int(pad) if pad is not None else self.eos_token_id
        self.bos_token_id: int | None = self.tokenizer.bos_token_id
        self.chat_template: str | None = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )

    # ------------------------------------------------------------------ limits

    @functools.cached_property
    def context_length(self) -> int | None:
        """The text model's context (``max_position_embeddings`` of config.json); None if unknown."""
        from bye_jax.models.family import load_config

        try:
            return int(load_config(self.checkpoint_dir).text.max_position_embeddings)
        except (OSError, ValueError):
            return None

    @property
    def image_side(self) -> int | None:
        """The side length the processor resizes images to (the short side; for a fixed height x width,
        the larger of the two); None if the processor does not say."""
        size = getattr(getattr(self.processor, "image_processor", None), "size", None)
        get = (lambda k: size.get(k)) if hasattr(size, "get") else (lambda k: getattr(size, k, None))
        if get("shortest_edge"):
            return int(get("shortest_edge"))
        sides = [int(v) for v in (get("height"), get("width")) if v]
        return max(sides) if sides else None

    @functools.cached_property
    def image_tokens_per_image(self) -> int:
        """How many tokens the processor expands one ``<image>`` into (fixed for LLaVA-1.5)."""
        side = self.image_side or 32
        blank = PIL.Image.new("RGB", (side, side))
        out = self.processor(images=[blank], text=[self.image_token], padding=False, return_tensors=None)
        return int(np.count_nonzero(np.asarray(out["input_ids"][0]) == self.image_token_id))

    def prompt_length(self, question: str) -> int:
        """Tokens of the prompt for `question`, image tokens included (the row length `encode` gives)."""
        ids = self.token_ids(self.prompt_text(question), 1)
        return len(ids) + ids.count(self.image_token_id) * (self.image_tokens_per_image - 1)

    def token_ids(self, text: str, image_tokens: int) -> list[int]:
        """Token ids of a prompt text (with its ``<image>``) whose image takes `image_tokens` tokens: the
        tokenizer on the expanded text (`image_expansion`), or with template vicuna_v1, LLaVA's
        tokenizer_image_token (the chunks around the image token tokenized apart, the first chunk's BOS
        kept, the others' dropped)."""
        tok = self.image_token
        if self.template != "vicuna_v1":
            return list(self.tokenizer(text.replace(tok, self.image_expansion(image_tokens)))["input_ids"])
        chunks = [list(self.tokenizer(c)["input_ids"]) for c in text.split(tok)]
        bos = self.bos_token_id
        offset = int(bool(chunks[0]) and bos is not None and chunks[0][0] == bos)
        ids = chunks[0][:offset]
        for i, c in enumerate(chunks):
            if i:
                ids += [self.image_token_id] * image_tokens
            ids += c[offset:]
        return ids

    def prepare_image(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The image as the image processor gets it: RGB, padded to a square with image_aspect="pad"."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if self.image_aspect == "pad":
            mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            rgb = expand_to_square(rgb, tuple(int(x * 255) for x in mean))
        return rgb

    def context_reason(self, question: str) -> str | None:
        """Why the question cannot be used with this model (its prompt exceeds the context), or None."""
        limit = self.context_length
        if limit is None:
            return None
        n = self.prompt_length(question)
        return f"prompt of {n} tokens exceeds the model's context of {limit}" if n > limit else None

    # ------------------------------------------------------------------ prompts

    def prompt_text(self, question: str) -> str:
        """The prompt string (before ``<image>`` expansion) for one question."""
        question = clean_question(question)
        if self.template == "vicuna_v1":
            return VICUNA_V1_TEMPLATE.replace("<image>", self.image_token).format(question=question)
        if not self.chat_template:
            return DEFAULT_TEMPLATE.format(question=question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )

    @functools.cached_property
    def _template_around_question(self) -> tuple[str, str]:
        """The prompt text before and after the question (found with a sentinel question)."""
        head, sep, tail = self.prompt_text(_SENTINEL).partition(_SENTINEL)
        return (head, tail) if sep else (self.prompt_text(""), "")

    def answer_prefix_length(self, question: str) -> int:
        """Tokens at the end of the prompt that follow the question: the template's generation prompt
        (e.g. ``ASSISTANT:``), found from the template (a sentinel question) and the tokenizer's offsets."""
        head, tail = self._template_around_question
        text = self.prompt_text(question)
        question = clean_question(question)
        if not tail or text != head + question + tail:  # the template changes the question: search it
            at = text.rfind(question) if question else -1
            if at < 0:
                return 0
            tail = text[at + len(question):]
        boundary = len(text) - len(tail)
        try:
            enc = self.tokenizer(text, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer: count the tokens the tail adds
            return max(0, len(self.tokenizer(text)["input_ids"]) - len(self.tokenizer(text[:boundary])["input_ids"]))
        n = 0
        for start, end in reversed(enc["offset_mapping"]):
            if end > start and start < boundary:
                break
            n += 1  # a token of the tail, or a special token added after it
        return n

    def answer_tokens(self, answers: Sequence[str | None], width: int) -> np.ndarray:
        """[n, width] int32: each answer's token ids (whitespace stripped, no special tokens), its first `width`,
        -1 after the last; all -1 for no answer. Not a model input: what the ``answer_tokens`` signal stores."""
        out = np.full((len(answers), width), -1, np.int32)
        for i, text in enumerate(answers):
            if text and text.strip():
                ids = self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"][:width]
                out[i, :len(ids)] = ids
        return out

    # ----------------------------------------------------------------- encoding

    def encode(
        self,
        images: Sequence[PIL.Image.Image],
        questions: Sequence[str],
        *,
        pad_to: int | None = None,
        padding_side: str = "left",
    ) -> PromptBatch:
        """Tokenize + preprocess a batch; pads to the longest prompt or to ``pad_to``."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            raise ValueError("empty batch")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        texts = [self.prompt_text(q) for q in questions]
        rgb = [self.prepare_image(im) for im in images]
        if self.template == "checkpoint":  # the processor's own token ids
            out = self.processor(images=rgb, text=texts, padding=False, return_tensors=None)
            rows = [np.asarray(r, dtype=np.int64) for r in out["input_ids"]]
            pixel_values, extra = self.vision_inputs(out, len(rows))
        else:
            rows = [np.asarray(self.token_ids(t, self.image_token_count(im)), dtype=np.int64)
                    for t, im in zip(texts, rgb, strict=True)]
            pixel_values, extra = self.vision_batch(rgb)

        longest = max(len(r) for r in rows)
        seq_len = longest if pad_to is None else int(pad_to)
        if longest > seq_len:
            raise ValueError(f"prompt of {longest} tokens does not fit pad_to={seq_len}")
        input_ids = np.full((len(rows), seq_len), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(rows), seq_len), dtype=np.int32)
        image_mask = np.zeros((len(rows), seq_len), dtype=bool)
        for i, r in enumerate(rows):
            sl = slice(seq_len - len(r), seq_len) if padding_side == "left" else slice(0, len(r))
            input_ids[i, sl] = r
            mask[i, sl] = 1
            image_mask[i, sl] = self.row_image_mask(r, i, extra)
        prefix = np.asarray([self.answer_prefix_length(q) for q in questions], np.int32)
        return PromptBatch(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                           image_mask=image_mask, extra=extra, answer_prefix=prefix)

    # ------------------------------------------------------------- family hooks

    def vision_inputs(self, out, batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(pixel_values, the model's other vision inputs) from the processor's output."""
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
        if pixel_values.ndim != 4 or pixel_values.shape[0] != batch_size:
            raise ValueError(f"unexpected pixel_values shape {pixel_values.shape}")
        return pixel_values, {}

    variable_image_tokens = False  # whether an image's token count depends on the image (then: image_token_count)

    def image_token_count(self, image: PIL.Image.Image) -> int:
        """How many tokens ``<image>`` expands into for `image` (fixed here)."""
        return self.image_tokens_per_image

    def image_expansion(self, count: int) -> str:
        """The text the processor puts in place of the image placeholder for `count` image tokens."""
        return self.image_token * count

    def vision_batch(self, images: Sequence[PIL.Image.Image]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(pixel_values, extra) of images alone, one row per image in every array (training batches build
        the token ids themselves, and split these rows with them)."""
        rgb = [self.prepare_image(im) for im in images]
        return self.vision_inputs(self.processor.image_processor(images=rgb, return_tensors="np"), len(rgb))

    def row_image_mask(self, ids: np.ndarray, row: int, extra: dict[str, np.ndarray]) -> np.ndarray:
        """The image positions of one unpadded row the signals use (here: every image token)."""
        return ids == self.image_token_id

    def num_image_tokens(self, batch: PromptBatch) -> np.ndarray:
        """Image positions per row (`PromptBatch.image_mask`), [B]."""
        if batch.image_mask is not None:
            return (batch.image_mask & (batch.attention_mask == 1)).sum(axis=1)
        return ((batch.input_ids == self.image_token_id) & (batch.attention_mask == 1)).sum(axis=1)

    def decode(self, token_ids, *, skip_special_tokens: bool = True) -> str:
        ids = np.asarray(token_ids).reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
