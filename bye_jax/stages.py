"""Stage records: a cached stage is reused only while the settings and inputs it was built from are unchanged.

A stage (pre-training, a fine-tune, the filter, an evaluation...) has an identity: the config keys it
reads (flattened to dotted names) and the digests of its inputs (a checkpoint's files, the samples it
reads, an upstream stage's digest). `Stage.prepare()` compares that identity with DIR/stage.json:

- same identity, finished: the outputs are reused (prepare returns True);
- same identity, not finished (a killed run): the stage runs again on what it left (resuming);
- anything else (other settings or inputs, or outputs without a record): the stage's outputs are
  deleted and it runs from scratch.

`Stage.done()` writes the record once the outputs are complete, so a stage killed half-way never
reads as finished. Samples are identified by their records (id, question, answer, image path or
TFDS reference, ground truth), not by the image bytes: images are assumed not to change in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["FileDigests", "Stage", "config_items", "digest_json", "digest_samples"]

RECORD = "stage.json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _plain(value):
    if hasattr(value, "to_dict"):  # ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def config_items(config, *keys: str, exclude: Iterable[str] = ()) -> dict:
    """{dotted key: value} of the named keys / subtrees of a ConfigDict (or nested dict), without the keys
    and subtrees named in `exclude` (settings that do not change the outputs)."""
    out: dict = {}
    exclude = tuple(exclude)

    def walk(prefix: str, value) -> None:
        if any(prefix == x or prefix.startswith(x + ".") for x in exclude):
            return
        value = _plain(value)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        walk(key, node)
    return out


def digest_json(obj) -> str:
    return hashlib.sha256(json.dumps(_plain(obj), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def digest_samples(samples: Sequence) -> str:
    """The identity of a list of samples (bye_jax.data.llava_json.Sample), in order."""
    h = hashlib.sha256()
    for s in samples:
        image = str(s.image_path) if isinstance(s.image_path, str | os.PathLike) else None
        h.update(json.dumps([s.id, s.question, s.answer, image, s.poisoned, _plain(s.raw)], sort_keys=True,
                            ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


class FileDigests:
    """sha256 of files and directories, remembered by (path, size, mtime) in an optional JSON memo so a
    large checkpoint is read once, not on every rerun."""

    def __init__(self, memo: str | os.PathLike | None = None):
        self.memo_path = Path(memo) if memo else None
        self.memo: dict = {}
        if self.memo_path and self.memo_path.exists():
            try:
                self.memo = json.loads(self.memo_path.read_text())
            except ValueError:
                self.memo = {}

    def file(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key, stamp = str(path), [st.st_size, st.st_mtime_ns]
        known = self.memo.get(key)
        if known and known[:2] == stamp:
            return known[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        self.memo[key] = [*stamp, h.hexdigest()]
        if self.memo_path:
            self.memo_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.memo_path, json.dumps(self.memo, indent=1))
        return h.hexdigest()

    def path(self, path: str | os.PathLike) -> str:
        """A file's digest, or a directory's: the names and digests of every file below it."""
        path = Path(path)
        if not path.is_dir():
            return self.file(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != RECORD)
        return digest_json([[p.relative_to(path).as_posix(), self.file(p)] for p in files])


class Stage:
    """One cached stage: its directory, the config items and input digests it is built from."""

    def __init__(self, directory: str | os.PathLike, name: str, config: Mapping, inputs: Mapping[str, str],
                 record: str = RECORD):
        self.dir, self.name = Path(directory), name
        self.config, self.inputs = _plain(dict(config)), dict(inputs)
        self.record_path = self.dir / record
        self.digest = digest_json({"name": name, "config": self.config, "inputs": self.inputs})

    def previous(self) -> dict | None:
        try:
            rec = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def state(self) -> str:
        """done | partial (same identity, not finished) | stale (another identity) | new (no record)."""
        rec = self.previous()
        if rec is None:
            return "new"
        if rec.get("digest") != self.digest:
            return "stale"
        return "done" if rec.get("status") == "done" else "partial"

    def changes(self) -> list[str]:
        """What differs from the record: changed config keys and inputs."""
        rec = self.previous() or {}
        old_cfg, old_in = rec.get("config", {}), rec.get("inputs", {})
        keys = sorted(k for k in set(old_cfg) | set(self.config) if old_cfg.get(k) != self.config.get(k))
        ins = sorted(k for k in set(old_in) | set(self.inputs) if old_in.get(k) != self.inputs.get(k))
        return keys + [f"input {k}" for k in ins]

    def prepare(self, outputs: Iterable[str | os.PathLike] = (), log=None, *, resume: bool = True) -> bool:
        """True when the finished outputs can be reused; otherwise clears `outputs` (unless `resume` and a
        run with the same identity was interrupted: it goes on from what that left) and records the stage
        as running."""
        state = self.state()
        if state == "done":
            if log:
                log(f"{self.name}: cached ({self.record_path})")
            return True
        if state == "stale":
            if log:
                changed = self.changes()
                log(f"{self.name}: rerun, " + (f"changed: {', '.join(changed[:8])}"
                                               + (" ..." if len(changed) > 8 else "") if changed else "new identity"))
        if state != "partial" or not resume:
            for p in outputs:
                p = Path(p)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write("running")
        return False

    def done(self, outputs: Mapping | None = None) -> None:
        """Marks the stage finished (call after its outputs are complete)."""
        self._write("done", outputs)

    def _write(self, status: str, outputs: Mapping | None = None) -> None:
        rec = {"name": self.name, "digest": self.digest, "status": status, "config": self.config,
               "inputs": self.inputs, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if outputs:
            rec["outputs"] = _plain(dict(outputs))
        _atomic_write(self.record_path, json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
