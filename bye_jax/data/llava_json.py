"""LLaVA-format datasets: reading, validation, image loading, and writing subsets.

A dataset is a JSON file holding a list of records::

    {"id": "000123", "image": "coco/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

plus an image root folder (default: the JSON file's folder). `load_dataset` validates every
record before any model work and returns the usable `Sample`s together with a `Skipped` entry
(id, index, one-line reason) for every record it refuses. Problems with the file as a whole
raise `DatasetError`. Input files are only ever read.

Image checks during validation are cheap: the header is read and the pixel count is checked
against ``max_image_pixels`` before anything is decoded; PNGs are then checked with
``Image.verify()`` (chunk CRCs, catches truncation); JPEGs are verified and, when the file does
not end with the EOI marker, decoded at 1/8 scale to tell truncated files from ones with trailing
bytes; any other format is decoded fully. ``full_decode=True`` decodes every image fully.

Colour handling in `load_image` (see `to_rgb`): by default alpha is dropped with a plain
``convert("RGB")`` -- what LLaVA's training and evaluation scripts (and the BYE reference) do,
so entropies match the reference; pass ``background=(255, 255, 255)`` to composite on white
instead (what transformers' ``convert_to_rgb`` does). 16-bit and 32-bit integer / float images
are rescaled to 8 bits instead of being clipped. EXIF orientation is not applied (LLaVA does
not apply it either).

Hostile records never sink a scan: a name the filesystem refuses (over 255 bytes), a folder or
file the process may not open, a lone surrogate (the JSON escape "\\ud800", not a character) in
the id, question, answer or image path, a record nested more than MAX_RECORD_DEPTH levels, an
image whose long side is over ``max_aspect_ratio`` times its short side (the processor resizes the
short side to the model's input size, so the resized image grows with the ratio) each skip only
their record; a file nested too deeply to parse is refused in one line. `write_subset` writes
whatever `load_dataset` read (lone surrogates stay JSON escapes). `load_image(reduce_to=...)`
shrinks images over REDUCE_ABOVE_PIXELS before the consumer's processor resizes them.

Images need not be files: a `Sample.image_path` may instead be an `ImageSource`, any object with
``read_bytes()`` returning the encoded image (PNG, JPEG, ...) and a ``str()`` naming it for error
messages -- `EncodedImage` (bytes held in memory) or the lazy TFDS record reference of
`bye_jax.data.tfds`. `load_image` and `check_image` take either.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from bye_jax.jsonio import dump_json

__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DatasetError",
    "EncodedImage",
    "ImageError",
    "ImageSource",
    "Sample",
    "Skipped",
    "check_image",
    "extract_question",
    "is_poisoned",
    "load_dataset",
    "load_image",
    "to_rgb",
    "write_subset",
]

log = logging.getLogger(__name__)

# PIL's own default for Image.MAX_IMAGE_PIXELS (the decompression-bomb warning threshold).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Long side / short side. The processor resizes the SHORT side to the model's input size, so the
# resized image has (input size)^2 x ratio pixels: a 1,000,000 x 1 image would need terabytes.
DEFAULT_MAX_ASPECT_RATIO = 64.0
# Deepest JSON nesting accepted in one record (LLaVA records are ~4 deep); deeper ones are skipped, so
# writing clean.json never hits Python's recursion limit.
MAX_RECORD_DEPTH = 64
# load_image(reduce_to=...): images over this many pixels are shrunk before the processor resizes them,
# by an integer factor that keeps their short side >= REDUCE_GAP x the processor's size.
REDUCE_ABOVE_PIXELS = 4096 * 4096
REDUCE_GAP = 3

IMAGE_TOKEN = "<image>"
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "assistant"})

# check_image decodes images over REDUCE_ABOVE_PIXELS one at a time, on this one thread (the checks run in
# threads: eight 9000 x 9000 TIFFs decoded at once peaked at 2.3 GB; one at a time on their own threads still
# at 1.9 GB, each thread's malloc arena keeping its freed image).
_BIG_DECODER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bye_jax-big-decode")

# Annotation files read by load_dataset in this process; write_subset refuses to replace them.
_LOADED_ANNOTATIONS: set[Path] = set()


class DatasetError(ValueError):
    """A problem with the dataset as a whole (or a refused write); the message is one line."""


class ImageError(DatasetError):
    """An image that cannot be used: undecodable, too large, unsupported mode."""


@runtime_checkable
class ImageSource(Protocol):
    """An image that is not a file of its own: ``read_bytes()`` gives the encoded image."""

    def read_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image (PNG, JPEG, ...) held in memory, e.g. read from a TFDS record."""

    data: bytes = field(repr=False)
    name: str  # for messages, e.g. "tfds:my_dataset/train[12]"

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.name


ImageRef = Path | ImageSource


def _open_binary(src: str | os.PathLike | ImageSource | bytes):
    """A binary file object for PIL's Image.open: the opened file, or the encoded bytes in a BytesIO.

    Raises OSError when the file cannot be opened or the source cannot be read (no permission, name
    too long, gone, ...): the caller reports it as unreadable, not as undecodable.
    """
    if isinstance(src, str | os.PathLike):
        return open(src, "rb")  # noqa: SIM115 - the caller closes it
    return io.BytesIO(src if isinstance(src, bytes) else src.read_bytes())


def _os_reason(e: BaseException) -> str:
    """An OSError's own words without the path (which may be long, or a server path)."""
    return getattr(e, "strerror", None) or _one_line(_no_buffer_repr(e)) or type(e).__name__


@dataclass(frozen=True)
class Sample:
    id: str
    image_path: ImageRef  # LLaVA JSON: resolved path inside the image root; TFDS: an ImageSource
    question: str  # first human turn, "<image>" removed, whitespace stripped
    answer: str | None  # first gpt turn after the first human turn
    poisoned: bool | None  # ground truth (see is_poisoned)
    index: int  # position in the JSON list (TFDS: in the split)
    raw: dict = field(repr=False, compare=False)  # the original record, untouched


@dataclass
class Skipped:
    id: str
    index: int
    reason: str


# --------------------------------------------------------------------------- helpers


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_unicode(what: str, text: str) -> str | None:
    """Reason when `text` holds a lone surrogate (JSON allows the escape "\\ud800"; it is not a character:
    tokenizers and UTF-8 writers fail on it), else None."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"{what} is not valid Unicode (lone surrogate U+{ord(m.group()):04X} at character {m.start()})"


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests deeper than `limit` lists / objects (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _no_buffer_repr(e: BaseException) -> str:
    """PIL names an in-memory image by its BytesIO repr (an address): say "encoded bytes" instead."""
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(encoded bytes)", str(e))


def is_poisoned(record: dict, sample_id: str) -> bool:
    """Ground truth: a boolean ``poisoned`` field if present, else whether "poison" is in the id.

    The id test is case-sensitive, as in the BYE reference code.
    """
    flag = record.get("poisoned")
    if isinstance(flag, bool):
        return flag
    return "poison" in sample_id


def extract_question(text: str) -> str:
    """The prompt question: ``<image>`` removed wherever it appears, whitespace stripped."""
    return text.replace(IMAGE_TOKEN, "").strip()


def _parse_id(record: dict, index: int) -> tuple[str, str | None]:
    """(id, reason or None). Missing / bad ids get the placeholder ``#<index>``."""
    placeholder = f"#{index}"
    if "id" not in record or record["id"] is None:
        return placeholder, "missing id"
    raw_id = record["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return placeholder, f"id is not a string or integer ({type(raw_id).__name__})"
    sid = str(raw_id)
    if not sid.strip():
        return placeholder, "empty id"
    reason = _not_unicode("id", sid)
    if reason:
        return placeholder, reason
    return sid, None


def _role(turn: dict) -> str | None:
    """A turn's "from" when it is a string (any other JSON value, even an unhashable one, is no role)."""
    role = turn.get("from")
    return role if isinstance(role, str) else None


def _parse_conversations(record: dict) -> tuple[str | None, str | None, str | None]:
    """(question, answer, reason). reason is None when the record is usable."""
    convs = record.get("conversations")
    if convs is None:
        return None, None, "no conversations"
    if not isinstance(convs, list):
        return None, None, f"conversations is not a list ({type(convs).__name__})"
    if not convs:
        return None, None, "no conversations (empty list)"
    human_at = None
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            return None, None, f"conversation turn {i} is not an object"
        if human_at is None and _role(turn) in HUMAN_ROLES:
            human_at = i
    if human_at is None:
        return None, None, "no human turn in conversations"
    value = convs[human_at].get("value")
    if not isinstance(value, str):
        return None, None, f"question (human turn {human_at}) is not a string ({type(value).__name__})"
    reason = _not_unicode(f"question (human turn {human_at})", value)
    if reason:
        return None, None, reason
    answer = None
    for i, turn in enumerate(convs[human_at + 1 :], human_at + 1):
        if _role(turn) in GPT_ROLES:
            ans = turn.get("value")
            answer = ans if isinstance(ans, str) else None
            reason = _not_unicode(f"answer (gpt turn {i})", answer) if answer is not None else None
            if reason:
                return None, None, reason
            break
    return extract_question(value), answer, None


def _resolve_image(rel: Any, root: Path) -> tuple[Path | None, str | None]:
    """Resolve an image field inside ``root`` (already resolved). Never touches files outside."""
    if rel is None:
        return None, "no image field"
    if not isinstance(rel, str):
        return (
            None,
            f"image field is not a string ({type(rel).__name__}); multi-image samples are unsupported",
        )
    if not rel.strip():
        return None, "empty image path"
    reason = _not_unicode("image path", rel)
    if reason:
        return None, reason
    try:
        rel_path = Path(rel)
        if rel_path.is_absolute() or rel.startswith(("/", "\\")) or rel_path.drive:
            return None, f"absolute image path not allowed: {_one_line(rel)}"
        resolved = (root / rel_path).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops, ...
        return None, f"invalid image path {_one_line(rel)!r}: {_os_reason(e)}"
    if not resolved.is_relative_to(root):
        return None, f"image path escapes the image root: {_one_line(rel)}"
    try:  # stat can fail for other reasons than absence: a name over 255 bytes, a folder without access
        if not resolved.exists():
            return None, f"image file not found: {_one_line(rel)}"
        if not resolved.is_file():
            return None, f"image path is not a regular file: {_one_line(rel)}"
    except OSError as e:
        return None, f"cannot access image file {_one_line(rel)!r}: {_os_reason(e)}"
    return resolved, None


def _size_reason(size: tuple[int, int], max_pixels: int | None, max_aspect_ratio: float | None) -> str | None:
    """Why an image of this (header) size is refused: too many pixels, or a too extreme aspect ratio."""
    w, h = size
    if w < 1 or h < 1:
        return f"image has no pixels ({w}x{h})"
    if max_pixels is not None and w * h > max_pixels:
        return f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}"
    if max_aspect_ratio is not None and max(w, h) > max_aspect_ratio * min(w, h):
        return f"extreme aspect ratio: {w}x{h} = {max(w, h) / min(w, h):.4g}:1 > limit {max_aspect_ratio:g}:1"
    return None


def _bomb_reason(error: Exception, max_pixels: int | None) -> str:
    """PIL refused the image size before our own check ran: quote the configured limit, not PIL's."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    if found is None:
        return f"image too large: {_one_line(error)}"
    n = int(found.group(1))
    if max_pixels is not None and n > max_pixels:
        return f"image too large: {n} pixels > limit {max_pixels} (max_image_pixels)"
    return f"image too large: {n} pixels > PIL's decoder limit (max_image_pixels {max_pixels} allows it)"


def check_image(path: Path | bytes | ImageSource, max_pixels: int | None, full_decode: bool = False,
                max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> str | None:
    """Reason the image (a file, its encoded bytes, or an `ImageSource`) is unusable, or None.

    Decodes nothing before the size checks (pixel count, aspect ratio); see the module docstring for
    what is checked. A file that cannot be opened (permissions, ...) is "cannot read the image file".
    """
    try:
        f = _open_binary(path)
    except OSError as e:
        return f"cannot read the image file: {_os_reason(e)}"
    except Exception as e:  # an ImageSource that fails in its own way
        return f"cannot read the image: {type(e).__name__}: {_one_line(e)}"
    try:
        with f:
            with Image.open(f) as im:
                reason = _size_reason(im.size, max_pixels, max_aspect_ratio)
                if reason:
                    return reason
                fmt = im.format
                if full_decode or fmt not in ("PNG", "JPEG", "MPO"):
                    if im.size[0] * im.size[1] > REDUCE_ABOVE_PIXELS:  # memory: one big image at a time
                        _BIG_DECODER.submit(im.load).result()
                    else:
                        im.load()
                    return None
                im.verify()  # PNG: chunk CRCs (catches truncation); JPEG: little
            if fmt in ("JPEG", "MPO"):
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b"\xff\xd9":  # truncated, or just trailing bytes: a cheap reduced decode tells
                    f.seek(0)
                    with Image.open(f) as im:
                        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _bomb_reason(e, max_pixels)
    except Exception as e:  # any decoder failure makes the sample unusable
        return f"undecodable image: {type(e).__name__}: {_one_line(_no_buffer_repr(e))}"
    return None


def _read_annotations(path: Path) -> list:
    try:
        if not path.exists():
            raise DatasetError(f"annotations file not found: {path}")
        if not path.is_file():
            raise DatasetError(f"annotations path is not a file: {path}")
        data = path.read_bytes()
    except OSError as e:  # no access, a name too long, ...
        raise DatasetError(f"cannot read annotations file {_one_line(path)}: {_os_reason(e)}") from e
    try:
        records = json.loads(data)
    except RecursionError as e:
        raise DatasetError(f"annotations file {path} is nested too deeply to read (JSON lists / objects "
                           "nested beyond Python's recursion limit)") from e
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"annotations file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"annotations file {path} is not valid JSON: {_one_line(e)}") from e
    if not isinstance(records, list):
        raise DatasetError(
            f"annotations file {path}: top level is a JSON {type(records).__name__}, "
            "expected a list of samples"
        )
    return records


# --------------------------------------------------------------------------- public API


def load_dataset(
    annotations: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    full_decode: bool = False,
    num_workers: int | None = None,
) -> tuple[list[Sample], list[Skipped]]:
    """Read and validate a LLaVA-format dataset.

    Returns (samples, skipped), both in JSON-list order. Every record is checked (structure,
    nesting depth, id, conversations, valid Unicode in id / question / answer / image path, image
    path confinement and access, image header / integrity); a refused record gets a `Skipped` with
    a one-line reason. A duplicate id is skipped at every occurrence after the first one (whether
    or not the first one was usable), so an id names at most one sample. Raises `DatasetError` if
    the file is missing, unreadable, not JSON (or nested too deeply to parse), or its top level is
    not a list, or if the image root is not a folder.

    max_image_pixels: width*height limit checked before decoding (None: no own limit; PIL's
    global Image.MAX_IMAGE_PIXELS error threshold still applies). max_aspect_ratio: limit on long
    side / short side (None: none). full_decode: decode every image fully instead of the cheap
    checks. num_workers: threads for the image checks (default min(8, cpu count); <= 1 runs them
    inline).
    """
    ann_path = Path(annotations)
    records = _read_annotations(ann_path)
    _LOADED_ANNOTATIONS.add(ann_path.resolve())

    root = Path(image_root) if image_root is not None else ann_path.resolve().parent
    try:
        if not root.is_dir():
            raise DatasetError(f"image root is not a folder: {root}")
        root = root.resolve()
    except OSError as e:
        raise DatasetError(f"cannot open the image root {_one_line(root)}: {_os_reason(e)}") from e

    skipped: list[Skipped] = []
    pending: list[tuple[int, str, Path, str, str | None, dict]] = []
    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            skipped.append(Skipped(f"#{index}", index, f"record is not an object ({type(record).__name__})"))
            continue
        sid, reason = _parse_id(record, index)
        if reason is None:
            if sid in first_seen:
                reason = f"duplicate id (first seen at index {first_seen[sid]})"
            else:
                first_seen[sid] = index
        if reason is None and _depth_exceeds(record, MAX_RECORD_DEPTH):
            reason = f"record is nested more than {MAX_RECORD_DEPTH} levels deep"
        if reason is None:
            question, answer, reason = _parse_conversations(record)
        if reason is None:
            image_path, reason = _resolve_image(record.get("image"), root)
        if reason is not None:
            skipped.append(Skipped(sid, index, reason))
            continue
        pending.append((index, sid, image_path, question, answer, record))

    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    check = lambda item: check_image(item[2], max_image_pixels, full_decode, max_aspect_ratio)
    # Silence PIL's bomb warning for the checks (our own limit reports it); the filter is set
    # here, in the calling thread, never inside the worker threads.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if num_workers > 1 and len(pending) > 1:
            with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
                image_reasons = list(pool.map(check, pending))
        else:
            image_reasons = [check(item) for item in pending]

    samples: list[Sample] = []
    for (index, sid, image_path, question, answer, record), reason in zip(
        pending, image_reasons, strict=True
    ):
        if reason is not None:
            skipped.append(Skipped(sid, index, reason))
            continue
        samples.append(
            Sample(
                id=sid,
                image_path=image_path,
                question=question,
                answer=answer,
                poisoned=is_poisoned(record, sid),
                index=index,
                raw=record,
            )
        )
    skipped.sort(key=lambda s: s.index)
    if skipped:
        log.warning("%s: %d of %d records skipped", ann_path, len(skipped), len(records))
    return samples, skipped


def to_rgb(im: Image.Image, background: Sequence[int] | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha / transparency: dropped (plain ``convert("RGB")``, LLaVA's behaviour) when
    ``background`` is None, else composited onto that colour. 16/32-bit integer modes are
    rescaled to 0..255 (values above 255 are taken as 16-bit, above 65535 scaled by the max);
    float images in [0, 1] are scaled by 255, others clipped to 0..255.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im)
        if mode == "F":
            arr = np.nan_to_num(arr.astype(np.float64))
            hi = float(arr.max()) if arr.size else 0.0
            arr = arr * 255.0 if hi <= 1.0 else arr
        else:
            arr = arr.astype(np.float64)
            hi = float(arr.max()) if arr.size else 0.0
            if hi > 65535:
                arr = arr * (255.0 / hi)
            elif hi > 255:
                arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = "A" in mode or "a" in mode or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    try:
        if background is not None and has_alpha:
            rgba = im.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (*tuple(background)[:3], 255))
            return Image.alpha_composite(base, rgba).convert("RGB")
        if mode in ("La", "RGBa"):  # premultiplied: go through the straight-alpha mode first
            im = im.convert("LA" if mode == "La" else "RGBA")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image mode {mode} to RGB: {_one_line(e)}") from e


def _reduce_factor(size: tuple[int, int], reduce_to: int | None) -> int:
    """Integer shrink factor for a big image whose short side will be resized to `reduce_to` (1: none)."""
    w, h = size
    if reduce_to is None or reduce_to < 1 or w * h <= REDUCE_ABOVE_PIXELS:
        return 1
    return max(1, min(w, h) // (REDUCE_GAP * reduce_to))


def load_image(
    path: str | os.PathLike | ImageSource,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = None,
    background: Sequence[int] | None = None,
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode an image file (or an `ImageSource`) into an RGB PIL image (see `to_rgb` for colours).

    The pixel-count limit (and, when given, the aspect-ratio limit) is checked from the header
    before decoding, and again on the decoded size. Raises `ImageError` (a `DatasetError`) with a
    one-line reason if the file cannot be read, is too large, cannot be decoded, or has a mode that
    cannot be converted. Does not change warning filters (thread-safe); paths are expected to come
    from a validated `Sample` (which passed `load_dataset`'s aspect-ratio limit).

    reduce_to: the short side the consumer's processor resizes to. An image over REDUCE_ABOVE_PIXELS
    pixels is then shrunk by the integer factor that keeps its short side >= REDUCE_GAP x reduce_to
    (JPEG: decoded at that scale with ``draft``; other formats: ``Image.reduce``, a box average,
    after decoding), so a batch of huge images holds small ones; smaller images are returned
    untouched (bit-identical input for the processor, as in the reference).
    """
    try:
        f = _open_binary(path)
    except OSError as e:
        raise ImageError(f"{path}: cannot read the image file: {_os_reason(e)}") from e
    except Exception as e:
        raise ImageError(f"{path}: cannot read the image: {type(e).__name__}: {_one_line(e)}") from e
    try:
        with f, Image.open(f) as im:
            reason = _size_reason(im.size, max_image_pixels, max_aspect_ratio)
            if reason:
                raise ImageError(f"{path}: {reason}")
            factor = _reduce_factor(im.size, reduce_to)
            if factor > 1 and im.format in ("JPEG", "MPO"):
                im.draft(None, (-(-im.size[0] // factor), -(-im.size[1] // factor)))  # DCT scaling: >= size
            im.load()
            reason = _size_reason(im.size, max_image_pixels, max_aspect_ratio)  # what was decoded
            if reason:
                raise ImageError(f"{path}: decoded {reason}")
            rgb = to_rgb(im, background)
            factor = _reduce_factor(rgb.size, reduce_to)
            return rgb.reduce(factor) if factor > 1 else rgb
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: {_bomb_reason(e, max_image_pixels)}") from e
    except Exception as e:
        raise ImageError(f"{path}: undecodable image: {type(e).__name__}: {_one_line(_no_buffer_repr(e))}") from e


def write_subset(
    records: list[dict],
    path: str | os.PathLike,
    *,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``records`` as a LLaVA JSON list (indent=2, ensure_ascii=False), atomically.

    The JSON is written to a temporary file in the target folder and moved into place with
    os.replace, so readers never see a partial file. Refuses (DatasetError) to overwrite any
    annotations file read by `load_dataset` in this process or listed in ``protect`` (compared
    by resolved path, and by inode where both exist). Creates the parent folder. Returns the
    resolved target path.
    """
    target = Path(path)
    resolved = target.resolve()
    guarded = set(_LOADED_ANNOTATIONS) | {Path(p).resolve() for p in protect}
    for g in guarded:
        same = g == resolved
        if not same and resolved.exists() and g.exists():
            try:
                same = os.path.samefile(g, resolved)
            except OSError:
                same = False
        if same:
            raise DatasetError(f"refusing to overwrite the input annotations file {g}")
    if resolved.is_dir():
        raise DatasetError(f"cannot write the subset: {resolved} is a folder")

    try:  # strict JSON: NaN / Infinity -> null
        text = dump_json(list(records), indent=2, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere (JSON allows the escape): keep it escaped
        text = dump_json(list(records), indent=2, ensure_ascii=True)
    except (RecursionError, ValueError, TypeError) as e:
        raise DatasetError(f"cannot write {resolved.name}: {type(e).__name__}: {_one_line(e)}") from e
    resolved.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=resolved.parent, prefix=f".{resolved.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600: keep the replaced file's mode, else the usual 0644
        mode = stat.S_IMODE(resolved.stat().st_mode) if resolved.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, resolved)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return resolved
