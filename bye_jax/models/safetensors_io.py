"""Streaming safetensors reader: headers first, then one memory-mapped tensor at a time.

Reading the header lets the loader check every key and shape before any data is touched; tensor
data is a zero-copy numpy view into an mmap (bfloat16 via ml_dtypes), so a tensor is only copied
when it is cast or transposed on its way to the device.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    pass


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Returns ({name: {dtype, shape, data_offsets}}, data_start)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
        raw = f.read(n)
        size = os.fstat(f.fileno()).st_size
    if len(raw) != n:
        raise SafetensorsError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise SafetensorsError(f"{path}: unreadable safetensors header ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path, name, info, size - 8 - n)
    return header, 8 + n


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    """SafetensorsError (one line) unless `info` is {dtype, shape, data_offsets} inside the file."""
    where = f"{path}: tensor {name[:200]!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: header entry is a JSON {type(info).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise SafetensorsError(f"{where}: header entry has no {key!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(info["dtype"], str):
        raise SafetensorsError(f"{where}: dtype is not a string")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise SafetensorsError(f"{where}: data_offsets is not [begin, end] inside the file's {data_size} data bytes")
    if info["dtype"] in DTYPES:
        need = math.prod(shape) * np.dtype(DTYPES[info["dtype"]]).itemsize
        if offsets[1] - offsets[0] != need:
            raise SafetensorsError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, its shape and "
                                   f"dtype need {need}")


class SafetensorsFile:
    """One .safetensors file, memory-mapped; `tensor(name)` is a read-only numpy view."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header, self._start = read_header(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        arr = np.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=self._start + begin)
        return arr.reshape(info["shape"])

    def close(self) -> None:
        try:
            self._mmap.close()
        except BufferError:  # a caller still holds a view; the mmap closes when it is collected
            pass
        self._file.close()


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = checkpoint_dir / "model.safetensors.index.json"
    single = checkpoint_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index}: malformed index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (checkpoint_dir / f).is_file()]
        if missing:
            raise SafetensorsError(f"{index}: shard files missing: {', '.join(missing)}")
        return [checkpoint_dir / f for f in files]
    if single.is_file():
        return [single]
    raise SafetensorsError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json "
                           "(only safetensors checkpoints are supported)")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for path in files:
        st = SafetensorsFile(path)
        try:
            for name in st.header:
                yield name, st.tensor(name)
        finally:
            st.close()
