"""A workdir's extraction results and their identity: what a rerun may resume.

Files (all in the workdir):
  extract_manifest.json  the run identity (checkpoint digest, settings that change values, signal-set
                         version), written before the first row; after a finished run also each row's
                         input digest ("inputs": {id: digest}).
  signals_parts/part-NNNNNN.npz
                         one file per flushed chunk: ids, input digests and the chunk's signal arrays
                         (fsynced, renamed into place); merged into signals.npz when the run finishes.
  signals.npz            the finished signal table (bye_jax/signals.py).
A rerun resumes only under the same identity (else `WorkdirMismatch`: the caller refuses in one line)
and only the rows whose input digest still matches; the others are recomputed.

Checkpoint digest: sha256 over config.json and the other small text files of the checkpoint
directory (tokenizer, processor, chat template: *.json, *.jinja, *.txt, *.model), and per weight
file (*.safetensors) its name, size, mtime and header, plus 64 blocks of 4 KiB spread over its data.
Not a hash of all weight bytes (minutes for a 7B model); a rewritten checkpoint gets a new mtime, and
a copy that does not keep mtimes is (safely) seen as another checkpoint.

Input digest of a sample: sha256 of the question and the image: for an image file its resolved path,
size and mtime (a stat, cheap for a whole dataset at resume); for an image held elsewhere (TFDS) the
sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from bye_jax.signals import SIGNALS_FILE, SignalTable, load_npz, save_npz

MANIFEST_FILE = "extract_manifest.json"
PARTS_DIR = "signals_parts"
MANIFEST_FORMAT = 1
_TEXT_SUFFIXES = (".json", ".jinja", ".txt", ".model")
_TEXT_LIMIT = 64 << 20
_SAMPLES, _BLOCK = 64, 4096


class WorkdirMismatch(ValueError):
    """The workdir holds results of another model or other settings (or of unknown identity)."""


def checkpoint_digest(checkpoint_dir: str | os.PathLike) -> str:
    """A digest of a Hugging Face checkpoint directory (see the module docstring)."""
    h = hashlib.sha256()
    root = Path(checkpoint_dir)
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        if path.suffix == ".safetensors":
            _weights_digest(h, path)
        elif path.suffix in _TEXT_SUFFIXES and path.stat().st_size <= _TEXT_LIMIT:
            h.update(f"file {path.name}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _weights_digest(h, path: Path) -> None:
    st = path.stat()
    h.update(f"weights {path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        n = min(n, max(st.st_size - 8, 0), 256 << 20)
        h.update(f.read(n))
        start, size = 8 + n, st.st_size - 8 - n
        for i in range(_SAMPLES if size > 0 else 0):
            f.seek(start + size * i // _SAMPLES)
            h.update(f.read(_BLOCK))


def input_digest(question: str, image, answer: str | None = None) -> str | None:
    """Digest of one sample's inputs (question + image, and the answer the ``answer_tokens`` signal stores);
    None when the image cannot be read."""
    h = hashlib.sha256(question.encode("utf-8", "surrogatepass"))
    if answer is not None:
        h.update(b"\0answer " + answer.encode("utf-8", "surrogatepass"))
    try:
        if isinstance(image, (str, os.PathLike)):
            path = Path(image).resolve()
            st = path.stat()
            h.update(f"\0file {path}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogatepass"))
        else:
            h.update(b"\0bytes ")
            h.update(hashlib.sha256(image.read_bytes()).digest())
    except (OSError, ValueError):
        return None
    return h.hexdigest()[:32]


class SignalStore:
    """The workdir's rows (signals.npz + part files), keyed by id, under one run identity."""

    def __init__(self, workdir: Path, identity: dict):
        self.workdir = Path(workdir)
        self.identity = identity
        self.parts = self.workdir / PARTS_DIR
        self._tables: list[SignalTable] = []
        self._where: dict[str, tuple[int, int]] = {}  # id -> (table, row)
        self.digests: dict[str, str] = {}

    # -- opening ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Checks the identity (WorkdirMismatch), then loads every stored row; a first run writes the manifest."""
        manifest_path = self.workdir / MANIFEST_FILE
        leftovers = [n for n in ("entropy.jsonl", SIGNALS_FILE, PARTS_DIR) if (self.workdir / n).exists()]
        if not manifest_path.exists():
            if leftovers:
                raise WorkdirMismatch(f"workdir {self.workdir} holds extraction results ({', '.join(leftovers)}) "
                                      "without a run identity (another tool or an older version); use another "
                                      "--workdir or delete it")
            _write_json(manifest_path, {"format": MANIFEST_FORMAT, "identity": self.identity})
            return
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            theirs = manifest["identity"]
            assert isinstance(theirs, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise WorkdirMismatch(f"workdir {self.workdir}: unreadable {MANIFEST_FILE} ({type(e).__name__}); "
                                  "use another --workdir or delete it") from e
        if theirs != self.identity:
            keys = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
            differ = f"{', '.join(keys)} differ{'s' if len(keys) == 1 else ''}"
            raise WorkdirMismatch(f"workdir {self.workdir} holds results of another model/settings ({differ}); "
                                  "use another --workdir or delete it")
        inputs = manifest.get("inputs") or {}
        npz = self.workdir / SIGNALS_FILE
        if npz.exists():
            table = _read_table(npz)
            if table is not None:
                self._add(table, [inputs.get(i) for i in table.ids])
        for part in sorted(self.parts.glob("part-*.npz")) if self.parts.is_dir() else []:
            if part.name.endswith(".tmp.npz"):
                continue
            table = _read_table(part)
            if table is not None and "input_digest" in table.arrays:
                digests = [str(d) for d in table.arrays.pop("input_digest")]
                self._add(table, digests)

    def _add(self, table: SignalTable, digests: Sequence[str | None]) -> None:
        k = len(self._tables)
        self._tables.append(table)
        for row, (qid, digest) in enumerate(zip(table.ids, digests, strict=True)):
            if digest:
                self._where[qid] = (k, row)
                self.digests[qid] = digest
            else:  # a row without a known input digest is recomputed
                self._where.pop(qid, None)
                self.digests.pop(qid, None)

    # -- rows ------------------------------------------------------------------------------------
    def __contains__(self, qid: str) -> bool:
        return qid in self._where

    @property
    def ids(self) -> list[str]:
        return list(self._where)

    def drop(self, ids: Iterable[str]) -> None:
        for qid in ids:
            self._where.pop(qid, None)
            self.digests.pop(qid, None)

    def entropy_row(self, qid: str) -> np.ndarray:
        k, row = self._where[qid]
        return self._tables[k].entropy[row]

    def table(self, ids: Sequence[str]) -> SignalTable:
        """The stored rows of `ids` (all stored), in that order, as one table."""
        names = list(self._tables[self._where[ids[0]][0]].arrays) if ids else ["entropy"]
        arrays = {}
        for name in names:
            arrays[name] = np.stack([self._tables[k].arrays[name][r] for k, r in (self._where[i] for i in ids)]) \
                if ids else np.zeros((0, 0), np.float32)
        return SignalTable(list(ids), arrays)

    # -- writing ---------------------------------------------------------------------------------
    def append(self, ids: Sequence[str], digests: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        """Writes one chunk as a part file (fsynced, then renamed into place) and adds its rows."""
        self.parts.mkdir(parents=True, exist_ok=True)
        seq = 1 + max((int(p.name[5:11]) for p in self.parts.glob("part-??????.npz")), default=-1)
        path = self.parts / f"part-{seq:06d}.npz"
        tmp = self.parts / f"part-{seq:06d}.tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.asarray(ids, dtype=str), input_digest=np.asarray(digests, dtype=str), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._add(SignalTable(list(ids), dict(arrays)), digests)

    def finish(self, order: Sequence[str]) -> SignalTable:
        """Merges every stored row (`order` first) into signals.npz and the manifest; removes the parts."""
        seen = set(order)
        ids = [i for i in order if i in self._where] + [i for i in self._where if i not in seen]
        table = self.table(ids)
        save_npz(table, self.workdir / SIGNALS_FILE)
        _write_json(self.workdir / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "identity": self.identity,
                                                   "inputs": {i: self.digests[i] for i in ids}})
        if self.parts.is_dir():
            for p in self.parts.iterdir():
                p.unlink()
            self.parts.rmdir()
        return table


def _read_table(path: Path) -> SignalTable | None:
    """A stored table, or None when the file is unreadable (its rows are then recomputed)."""
    try:
        return load_npz(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
