"""One entry point for every dataset a command reads: LLaVA JSON or TFDS, chosen by the config.

A data section of a config (``config.data`` of filter / extract / train, ``config.test`` and
``config.triggered`` of eval) holds::

    source       "llava_json" (default) | "tfds"
    annotations  LLaVA JSON file            (llava_json)
    image_root   its image folder           (llava_json; default: the JSON file's folder)
    tfds         TFDS dataset and feature keys (tfds; see bye_jax/data/tfds.py and configs/sources.py)
    keep_ids     optional JSON file: only the samples whose ids it lists are used -- a LLaVA list of
                 records (e.g. a filter's clean.json) or a list of ids. This is how one re-fine-tunes
                 on the filter's clean.json when the data lives in TFDS: same tfds section, plus
                 keep_ids=OUT/clean.json.
    max_aspect_ratio  images whose long side is more than this many times the short side are skipped
                 (default 64; the processor resizes the short side to the model's input size, so the
                 resized image grows with the ratio); 0 or None: no limit

`load_source` returns the validated samples, the skipped records (with reasons) and what outputs
must never overwrite; it raises `DatasetError` with a one-line reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bye_jax.data.llava_json import DEFAULT_MAX_ASPECT_RATIO, DatasetError, Sample, Skipped, load_dataset
from bye_jax.data.tfds import TfdsSpec, load_tfds, shard_bounds

__all__ = ["SOURCES", "Loaded", "is_configured", "load_source", "max_aspect_ratio_of", "missing_message",
           "read_keep_ids", "source_of"]

SOURCES = ("llava_json", "tfds")


@dataclass
class Loaded:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    label: str = ""  # names the dataset in messages: the JSON path, or tfds:NAME[split]
    annotations: Path | None = None  # the LLaVA JSON file, if that is the source
    protect: list[Path] = field(default_factory=list)  # input files that no output may replace


def _get(section, key: str, default=""):
    try:
        value = section[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def source_of(section) -> str:
    source = _get(section, "source", "llava_json") or "llava_json"
    if source not in SOURCES:
        raise DatasetError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    return source


def is_configured(section) -> bool:
    """Whether the section names a dataset at all (an empty one: nothing to read)."""
    if source_of(section) == "tfds":
        spec = _get(section, "tfds", None)
        return spec is not None and bool(_get(spec, "name") or _get(spec, "builder_dir"))
    return bool(_get(section, "annotations"))


def missing_message(section, where: str = "config.data") -> str:
    if source_of(section) == "tfds":
        return (f"{where}.tfds.name and {where}.tfds.builder_dir are both empty: name a prepared TFDS dataset "
                "or give its builder directory")
    return f"{where}.annotations is empty: give a LLaVA-format JSON file"


def max_aspect_ratio_of(section) -> float | None:
    """The section's ``max_aspect_ratio`` (default `DEFAULT_MAX_ASPECT_RATIO`; 0: no limit)."""
    value = _get(section, "max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value == 0 or 1 <= value < math.inf):
        raise DatasetError(f"max_aspect_ratio must be a number >= 1 (0: no limit), got {value!r}")
    return float(value) if value else None


def read_keep_ids(path: str | Path) -> set[str]:
    """Ids listed by a JSON file: a list of records with "id" (LLaVA JSON, e.g. clean.json) or of ids."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"keep_ids file {path}: cannot read it: {e.strerror or e}") from e
    except ValueError as e:
        raise DatasetError(f"keep_ids file {path}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise DatasetError(f"keep_ids file {path}: nested too deeply to read") from e
    if not isinstance(items, list):
        raise DatasetError(f"keep_ids file {path}: expected a JSON list of records or ids")
    ids = set()
    for i, item in enumerate(items):
        value = item.get("id") if isinstance(item, dict) else item
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DatasetError(f"keep_ids file {path}: item {i} has no string or integer id")
        ids.add(str(value))
    return ids


def load_source(section, *, max_image_pixels: int | None, shard: tuple[int, int] | None = None) -> Loaded:
    """Reads the section's dataset. `shard=(index, count)`: only that contiguous part of the usable
    samples (TFDS: of the split's examples, read from the start -- only that part is read)."""
    source = source_of(section)
    keep_path = _get(section, "keep_ids")
    keep = read_keep_ids(keep_path) if keep_path else None
    ratio = max_aspect_ratio_of(section)
    if source == "tfds":
        spec = TfdsSpec.from_config(_get(section, "tfds", {}))
        samples, skipped = load_tfds(spec, max_image_pixels=max_image_pixels, max_aspect_ratio=ratio, shard=shard,
                                     keep_ids=keep)
        return Loaded(samples, skipped, spec.label, None, [Path(keep_path)] if keep_path else [])
    annotations = Path(_get(section, "annotations"))
    samples, skipped = load_dataset(annotations, _get(section, "image_root") or None,
                                    max_image_pixels=max_image_pixels, max_aspect_ratio=ratio)
    if keep is not None:
        samples = [s for s in samples if s.id in keep]
        skipped = [s for s in skipped if s.id in keep]
    if shard is not None:
        start, end = shard_bounds(len(samples), *shard)
        samples = samples[start:end]
    protect = [annotations] + ([Path(keep_path)] if keep_path else [])
    return Loaded(samples, skipped, str(annotations), annotations, protect)
