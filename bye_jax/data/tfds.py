"""TFDS datasets as a data source: the same validated `Sample`s as a LLaVA-JSON dataset.

Needs the ``tfds`` extra (``pip install 'bye_jax[tfds]'``: tensorflow-datasets and TensorFlow);
without it every entry point raises `DatasetError` saying so. bye_jax never downloads: the dataset
must already be prepared, either under a data_dir (``name`` [+ ``data_dir``], e.g. "my_vqa" or
"my_vqa/config:1.0.0") or as a builder directory (``builder_dir``: the folder holding
dataset_info.json and the record files, opened with ``tfds.builder_from_directory``).

Each example of ``split`` becomes one sample; the feature keys are configurable (nested features
as "a/b"): ``id_key`` (text or integer; empty: the id is "<split>:<index>"), ``image_key`` (an
Image feature), ``question_key`` (text; ``<image>`` removed and whitespace stripped, as for LLaVA
JSON), ``answer_key`` (text, optional) and ``poisoned_key`` (boolean ground truth, optional; without
it "poison" in the id is the ground truth). ``Sample.index`` is the example's position in the split,
``Sample.raw`` a LLaVA-style record ({"id", "conversations", ["poisoned"], "tfds": {name or
builder_dir, data_dir, split, index}}) -- what the filter writes to clean.json / flagged.json.
Bad examples (empty id or question, undecodable or too large image, duplicate id, ...) are skipped
with a one-line reason, never dropped silently.

Images: decoding is skipped while reading (``tfds.decode.SkipDecoding``), so a sample keeps the
encoded image (PNG/JPEG bytes, as stored), checked like a LLaVA-JSON image file and decoded only
when a consumer calls `load_image`. Datasets in a random-access format (array_record, parquet) are
not held at all: the sample keeps a reference (split, index) and the record is read again on use,
so memory stays flat whatever the dataset's size. TFRecord datasets cannot be read at random, so
their samples hold the encoded bytes: memory ~ the encoded size of the examples read by this
host. Prepare larger-than-memory datasets with ``file_format="array_record"`` (``tfds build
--file_format=array_record``, or convert with ``tfds convert_format``), or let each host read its own shard.

Per-host sharding: ``shard=(index, count)`` reads only the index-th of ``count`` contiguous,
near-equal parts of the split (``tfds.even_splits``; the first ``n % count`` parts get one example
more), with the indices still counted in the whole split, so the parts are disjoint and cover the
split (`process_shard` gives (jax.process_index(), jax.process_count())).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bye_jax.data.llava_json import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_TOKEN,
    DatasetError,
    EncodedImage,
    Sample,
    Skipped,
    _one_line,
    check_image,
    extract_question,
    is_poisoned,
)

__all__ = ["INSTALL_HINT", "TfdsImage", "TfdsSpec", "load_tfds", "process_shard", "shard_bounds"]

log = logging.getLogger(__name__)

INSTALL_HINT = "install bye_jax[tfds] (pip install 'bye_jax[tfds]')"
_CHECK_CHUNK = 256  # examples whose images are checked together (bounds the bytes in flight)


@dataclass(frozen=True)
class TfdsSpec:
    """Which TFDS dataset and split, and which features hold what."""

    name: str = ""  # registered or prepared dataset name ("name[/config][:version]") under data_dir
    data_dir: str = ""  # default: TFDS's own (~/tensorflow_datasets or $TFDS_DATA_DIR)
    builder_dir: str = ""  # instead of name: a prepared builder directory (holds dataset_info.json)
    split: str = "train"  # any TFDS split expression ("train", "train[:1000]", "validation[10%:]")
    id_key: str = "id"
    image_key: str = "image"
    question_key: str = "question"
    answer_key: str = "answer"  # "": no answers
    poisoned_key: str = ""  # "": ground truth from the id ("poison" in it)

    @classmethod
    def from_config(cls, c) -> TfdsSpec:
        keys = cls.__dataclass_fields__
        return cls(**{k: str(c[k]) for k in keys if k in c and c[k] is not None})

    @property
    def label(self) -> str:
        return f"tfds:{self.name or self.builder_dir}[{self.split}]"

    def reference(self) -> dict:
        """Where a sample came from, as written into its record (plus "index")."""
        ref = {"builder_dir": self.builder_dir} if self.builder_dir else {"name": self.name}
        if self.data_dir and not self.builder_dir:
            ref["data_dir"] = self.data_dir
        ref["split"] = self.split
        return ref


# ------------------------------------------------------------------------------------- helpers


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """[start, end) of the index-th of `count` contiguous parts of range(n) (tfds.even_splits sizes)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    q, r = divmod(n, count)
    start = index * q + min(index, r)
    return start, start + q + (index < r)


def process_shard() -> tuple[int, int] | None:
    """(jax.process_index(), jax.process_count()) on a multi-host run, else None."""
    import jax

    count = jax.process_count()
    return (jax.process_index(), count) if count > 1 else None


def _import_tfds():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ info lines on stderr
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError(f"the tfds data source needs TensorFlow Datasets ({_one_line(e)}): {INSTALL_HINT}") from e
    return tfds


def _hide_gpus_from_tensorflow() -> None:
    """TensorFlow only feeds data here; keep it off the accelerators JAX uses."""
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError as e:
        raise DatasetError(f"reading TFRecord datasets needs TensorFlow ({_one_line(e)}): {INSTALL_HINT}") from e
    except (RuntimeError, ValueError):  # already initialised: too late, and harmless on CPU builds
        pass


def _error(spec: TfdsSpec, what: str, e: BaseException) -> DatasetError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DatasetError(f"{spec.label}: {what}: {_one_line(text)}")


def _open_builder(tfds, spec: TfdsSpec):
    if bool(spec.name) == bool(spec.builder_dir):
        raise DatasetError("the tfds source needs exactly one of tfds.name and tfds.builder_dir")
    if spec.builder_dir:
        folder = Path(spec.builder_dir)
        if not (folder / "dataset_info.json").is_file():
            raise DatasetError(f"tfds.builder_dir {folder} is not a prepared TFDS builder directory "
                               "(no dataset_info.json)")
        try:
            return tfds.builder_from_directory(str(folder))
        except Exception as e:
            raise _error(spec, "cannot open the builder directory", e) from e
    try:
        builder = tfds.builder(spec.name, data_dir=spec.data_dir or None)
    except Exception as e:
        raise _error(spec, "no such TFDS dataset" + (f" in {spec.data_dir}" if spec.data_dir else ""), e) from e
    if not builder.is_prepared():
        raise DatasetError(f"{spec.label}: not prepared in {builder.data_dir} (bye_jax never downloads: "
                           "prepare it first, e.g. with `tfds build`, and give tfds.data_dir)")
    return builder


def _feature(tfds, features, key: str, spec: TfdsSpec):
    node = features
    for part in key.split("/"):
        if not isinstance(node, tfds.features.FeaturesDict) or part not in node.keys():
            names = ", ".join(sorted(_flat_keys(tfds, features)))
            raise DatasetError(f"{spec.label}: no feature {key!r} (features: {names})")
        node = node[part]
    return node


def _flat_keys(tfds, features, prefix: str = "") -> list[str]:
    out = []
    for k in features.keys():
        f = features[k]
        if isinstance(f, tfds.features.FeaturesDict):
            out += _flat_keys(tfds, f, f"{prefix}{k}/")
        else:
            out.append(prefix + k)
    return out


def _check_features(tfds, builder, spec: TfdsSpec) -> None:
    features = builder.info.features
    if not spec.image_key:
        raise DatasetError("tfds.image_key is empty")
    if not spec.question_key:
        raise DatasetError("tfds.question_key is empty")
    image = _feature(tfds, features, spec.image_key, spec)
    if not isinstance(image, tfds.features.Image):
        raise DatasetError(f"{spec.label}: feature {spec.image_key!r} is a {type(image).__name__}, "
                           "not an Image feature (one image per example)")
    for what, key in (("id", spec.id_key), ("question", spec.question_key), ("answer", spec.answer_key),
                      ("poisoned", spec.poisoned_key)):
        if not key:
            continue
        f = _feature(tfds, features, key, spec)
        if isinstance(f, tfds.features.FeaturesDict) or tuple(getattr(f, "shape", ())) != ():
            raise DatasetError(f"{spec.label}: feature {key!r} ({what}) is not a scalar "
                               f"({type(f).__name__}, shape {getattr(f, 'shape', None)})")


def _get(example: dict, key: str) -> Any:
    for part in key.split("/"):
        example = example[part]
    return example


def _nested(key: str, value) -> dict:
    out: Any = value
    for part in reversed(key.split("/")):
        out = {part: out}
    return out


def _text(value) -> tuple[str | None, str | None]:
    """(text, reason) from a scalar text / string feature value."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "not valid UTF-8"
    if isinstance(value, str):
        return value, None
    return None, f"not text ({type(value).__name__})"


def _parse_id(value, index: int) -> tuple[str, str | None]:
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, bool | np.bool_):
        return f"#{index}", f"id is not a string or integer ({type(value).__name__})"
    if isinstance(value, int | np.integer):
        return str(int(value)), None
    text, reason = _text(value)
    if reason:
        return f"#{index}", f"id is {reason}"
    if not text.strip():
        return f"#{index}", "empty id"
    return text, None


class TfdsImage:
    """A lazy image reference into a random-access TFDS split: read (not decoded) on each use."""

    __slots__ = ("_reader", "_local", "name")

    def __init__(self, reader: _RandomAccessReader, local: int, name: str):
        self._reader, self._local, self.name = reader, local, name

    def read_bytes(self) -> bytes:
        return self._reader.image_bytes(self._local)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"TfdsImage({self.name!r})"


class _RandomAccessReader:
    def __init__(self, source, image_key: str):
        self.source, self.image_key = source, image_key
        self._lock = threading.Lock()  # one reader shared by the consumers' prefetch threads

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        with self._lock:
            return self.source[i]

    def image_bytes(self, i: int) -> bytes:
        value = _get(self[i], self.image_key)
        return bytes(value.item() if isinstance(value, np.ndarray) else value)


def _examples(tfds, builder, spec: TfdsSpec, split) -> tuple[Iterator[dict], _RandomAccessReader | None]:
    """(examples of `split` in order with the image left encoded, the random-access reader or None)."""
    decoders = _nested(spec.image_key, tfds.decode.SkipDecoding())
    random_access = {f.value for f in tfds.core.file_adapters.FileFormat.with_random_access()}
    formats = {f.value for f in builder.info.available_file_formats()}
    if not formats and builder.info.file_format is not None:
        formats = {builder.info.file_format.value}
    if formats & random_access:
        try:
            reader = _RandomAccessReader(builder.as_data_source(split=split, decoders=decoders), spec.image_key)
        except Exception as e:
            raise _error(spec, "cannot read the split", e) from e
        return (reader[i] for i in range(len(reader))), reader
    _hide_gpus_from_tensorflow()
    try:
        # one file at a time: the examples come in split order (the default interleaves 16 files)
        ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False,
                                read_config=tfds.ReadConfig(interleave_cycle_length=1))
    except Exception as e:
        raise _error(spec, "cannot read the split", e) from e
    return iter(tfds.as_numpy(ds)), None


# ------------------------------------------------------------------------------------- public API


def load_tfds(
    spec: TfdsSpec,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    full_decode: bool = False,
    shard: tuple[int, int] | None = None,
    keep_ids: set[str] | None = None,
    num_workers: int | None = None,
) -> tuple[list[Sample], list[Skipped]]:
    """Read and validate a TFDS split (or this host's shard of it) as `Sample`s.

    Returns (samples, skipped) in split order. `shard=(index, count)`: only that contiguous part
    (see the module docstring). `keep_ids`: only examples with these ids are considered at all
    (others are neither samples nor skipped). Image checks as for LLaVA JSON (`check_image`: pixel
    count, aspect ratio, integrity; only the first duplicate of an id is kept). Raises `DatasetError`
    (one line) when the extra is missing, the dataset cannot be opened, a feature key is wrong, or
    the records cannot be read.
    """
    tfds = _import_tfds()
    builder = _open_builder(tfds, spec)
    _check_features(tfds, builder, spec)
    try:
        n_split = builder.info.splits[spec.split].num_examples
    except Exception as e:
        raise _error(spec, f"no split {spec.split!r} (splits: {', '.join(builder.info.splits)})", e) from e
    split, offset = spec.split, 0
    if shard is not None:
        index, count = shard
        start, _ = shard_bounds(n_split, index, count)
        parts = tfds.even_splits(spec.split, n=count)
        try:
            offset = sum(builder.info.splits[p].num_examples for p in parts[:index])
        except Exception as e:
            raise _error(spec, "cannot shard the split", e) from e
        if offset != start:  # tfds.even_splits changed how it sizes the parts
            raise DatasetError(f"{spec.label}: shard {index}/{count} starts at {offset}, expected {start}")
        split = parts[index]
    examples, reader = _examples(tfds, builder, spec, split)

    ref = spec.reference()
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    first_seen: dict[str, int] = {}
    pending: list[tuple[int, str, str, str, str | None, bool | None, bytes]] = []
    n_read = n_ignored = 0
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 1 else None

    def flush():
        check = lambda item: check_image(item[6], max_image_pixels, full_decode, max_aspect_ratio)
        reasons = list(pool.map(check, pending)) if pool is not None else [check(p) for p in pending]
        for (index, sid, raw_q, question, answer, poisoned, data), reason in zip(pending, reasons, strict=True):
            if reason is not None:
                skipped.append(Skipped(sid, index, reason))
                continue
            name = f"{spec.label}[{index}]"
            image = TfdsImage(reader, index - offset, name) if reader is not None else EncodedImage(data, name)
            record = {"id": sid, "conversations": [
                {"from": "human", "value": raw_q if IMAGE_TOKEN in raw_q else f"{IMAGE_TOKEN}\n{raw_q}"}]}
            if answer is not None:
                record["conversations"].append({"from": "gpt", "value": answer})
            if poisoned is not None:
                record["poisoned"] = poisoned
            record["tfds"] = {**ref, "index": index}
            samples.append(Sample(id=sid, image_path=image, question=question, answer=answer,
                                  poisoned=is_poisoned(record, sid), index=index, raw=record))
        pending.clear()

    try:
        for local, example in enumerate(examples):
            n_read += 1
            index = offset + local
            if spec.id_key:
                sid, reason = _parse_id(_get(example, spec.id_key), index)
            else:
                sid, reason = f"{spec.split}:{index}", None
            if keep_ids is not None and sid not in keep_ids:
                n_ignored += 1
                continue
            if reason is None:
                if sid in first_seen:
                    reason = f"duplicate id (first seen at index {first_seen[sid]})"
                else:
                    first_seen[sid] = index
            raw_q = answer = poisoned = data = None
            if reason is None:
                raw_q, why = _text(_get(example, spec.question_key))
                if why:
                    reason = f"question is {why}"
                elif not extract_question(raw_q):
                    reason = "empty question"
            if reason is None and spec.answer_key:
                answer, why = _text(_get(example, spec.answer_key))
                if why:
                    reason = f"answer is {why}"
            if reason is None and spec.poisoned_key:
                flag = _get(example, spec.poisoned_key)
                poisoned = bool(flag.item() if isinstance(flag, np.ndarray) else flag)
            if reason is None:
                value = _get(example, spec.image_key)
                data = bytes(value.item() if isinstance(value, np.ndarray) else value)
                if not data:
                    reason = "empty image"
            if reason is not None:
                skipped.append(Skipped(sid, index, reason))
                continue
            pending.append((index, sid, raw_q, extract_question(raw_q), answer, poisoned, data))
            if len(pending) >= _CHECK_CHUNK:
                flush()
        flush()
    except DatasetError:
        raise
    except Exception as e:  # corrupt record files, a TensorFlow error, ...
        raise _error(spec, f"reading example {offset + n_read}", e) from e
    finally:
        if pool is not None:
            pool.shutdown()

    skipped.sort(key=lambda s: s.index)
    where = f" (shard {shard[0]} of {shard[1]})" if shard else ""
    if n_ignored:
        log.info("%s%s: %d examples not in keep_ids", spec.label, where, n_ignored)
    if skipped:
        log.warning("%s%s: %d of %d examples skipped", spec.label, where, len(skipped), n_read - n_ignored)
    return samples, skipped
