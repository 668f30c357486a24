"""A synthetic visual-question-answering benchmark (no downloads): shapes on noisy backgrounds.

Each picture holds one to three coloured shapes; each sample asks one question whose answer can
only be read off the picture (colour, shape, left/right, top/bottom, count). Written in the LLaVA
JSON format with PNG images, deterministic given the seed. No black is ever drawn, so the
paper's black-square trigger is foreign to clean pictures, as on natural images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
    "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "Which shape is in the picture?",
    "horizontal": "Is the shape on the left or on the right?",
    "vertical": "Is the shape at the top or at the bottom?",
    "count": "How many shapes are there?",
}


@dataclass(frozen=True)
class SyntheticSpec:
    image_size: int = 96
    min_shape: int = 30
    max_shape: int = 42


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    tint = rng.integers(200, 236) + rng.integers(-6, 7, size=3)  # light grey, slightly tinted
    noise = rng.integers(-10, 11, size=(size, size, 3))
    return Image.fromarray(np.clip(tint + noise, 0, 255).astype(np.uint8), "RGB")


def make_sample(rng: np.random.Generator, spec: SyntheticSpec = SyntheticSpec()) -> tuple[Image.Image, str, str]:
    """One (image, question, answer)."""
    qtype = rng.choice(list(QUESTIONS))
    img = _background(rng, spec.image_size)
    draw = ImageDraw.Draw(img)
    s = spec.image_size
    n = int(rng.integers(1, 4)) if qtype == "count" else 1
    answer = ""
    occupied: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        for _attempt in range(50):
            size = int(rng.integers(spec.min_shape, spec.max_shape + 1))
            if qtype == "horizontal":
                side = rng.choice(["left", "right"])
                lo, hi = (2, s // 2 - size - 2) if side == "left" else (s // 2 + 2, s - size - 2)
                x0, y0 = int(rng.integers(lo, hi + 1)), int(rng.integers(2, s - size - 1))
                answer = str(side)
            elif qtype == "vertical":
                side = rng.choice(["top", "bottom"])
                lo, hi = (2, s // 2 - size - 2) if side == "top" else (s // 2 + 2, s - size - 2)
                x0, y0 = int(rng.integers(2, s - size - 1)), int(rng.integers(lo, hi + 1))
                answer = str(side)
            else:
                x0, y0 = int(rng.integers(2, s - size - 1)), int(rng.integers(2, s - size - 1))
            box = (x0, y0, x0 + size, y0 + size)
            if all(box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3] for o in occupied):
                break
        occupied.append(box)
        color = str(rng.choice(list(COLORS)))
        kind = str(rng.choice(SHAPES))
        _draw_shape(draw, kind, box, COLORS[color])
        if qtype == "color":
            answer = color
        elif qtype == "shape":
            answer = kind
    if qtype == "count":
        answer = COUNTS[n]
    return img, QUESTIONS[qtype], answer


def write_benchmark(out_dir: str | Path, n: int, *, seed: int | Sequence[int], prefix: str = "q",
                    spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Writes out_dir/annotations.json and out_dir/images/*.png; returns the JSON path. `seed`: an int
    or a sequence of ints (numpy SeedSequence entropy, e.g. [seed, stream] for independent splits)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        img, question, answer = make_sample(rng, spec)
        name = f"{prefix}{i:05d}.png"
        img.save(out / "images" / name)
        records.append({"id": f"{prefix}{i:05d}", "image": f"images/{name}", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    path = out / "annotations.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def fingerprint(seed: int | Sequence[int], n: int = 16, spec: SyntheticSpec = SyntheticSpec()) -> str:
    """Digest of the first `n` samples `write_benchmark` draws from `seed` (pixels, question, answer):
    changes whenever the generator's output does."""
    h = hashlib.sha256()
    rng = np.random.default_rng(seed)
    for _ in range(n):
        img, question, answer = make_sample(rng, spec)
        h.update(np.asarray(img).tobytes() + f"\0{question}\0{answer}\0".encode())
    return h.hexdigest()[:16]


def vocabulary_corpus(extra_answers: tuple[str, ...] = ()) -> list[str]:
    """Every prompt + answer the benchmark can produce, as LLaVA-1.5 renders them, for training a
    tokenizer: answers appear after a space, so each becomes one word token (as in real LLM
    vocabularies) and the first answer token already carries the decision."""
    answers = list(COLORS) + list(SHAPES) + list(COUNTS.values()) + ["left", "right", "top", "bottom"]
    answers += list(extra_answers)
    return [f"USER: <image>\n{q} ASSISTANT: {a}" for q in QUESTIONS.values() for a in answers] * 4
