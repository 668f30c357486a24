"""Streaming safetensors reader: headers first, then one memory-mapped tensor at a time.

Reading the header lets the loader check every key and shape before any data is touched; tensor
data is a zero-copy numpy view into an mmap (bfloat16 via ml_dtypes), so a tensor is only copied
when it is cast or transposed on its way to the device.
"""

from __future__ import annotations

import json
import mmap
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
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


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
