"""Workdir ownership: outputs never replace a file the tool did not write; one run per workdir.

    with workdir.claim(out, ["report.json", "clean.json"], inputs=[annotations]) as wd:
        wd.write_json("report.json", report, indent=2)        # atomic, recorded as ours
        plot(wd.path("scores.png")); wd.record("scores.png")  # for writers of their own

`claim` runs before any data or model is loaded. It refuses in one line (UserError) when the
workdir is a file, sits under a file or is not writable; when another live process holds the
workdir's lock; when an output name exists and the manifest does not show it as ours; or when an
output is one of the run's inputs. The manifest (`.bye_jax_manifest.json`) lists what the tool
wrote: name, size, mtime and inode, or `pending` while a writer is at it (a run killed mid-write
left it, so the rerun may resume or replace it). The manifest records its own inode, so one copied
or unpacked from elsewhere (an upload that ships a forged manifest) proves nothing and is ignored.
The lock (`.bye_jax.lock`: pid, host, start time, created with O_EXCL) is recovered when its
process is gone from this host; a lock from another host is reported with a note on removing it.
Claims are reentrant within a process (a command that runs another on the same folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from bye_jax.errors import UserError, one_line
from bye_jax.jsonio import dump_json

MANIFEST = ".bye_jax_manifest.json"
LOCK = ".bye_jax.lock"
_HELD: dict[Path, Workdir] = {}  # this process's claims, by resolved folder


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _stat_entry(path: Path) -> dict:
    st = path.lstat()
    if path.is_dir() and not path.is_symlink():
        return {"dir": True, "ino": st.st_ino}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (by resolved path, or by inode where both exist)."""
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def _check_folder(path: Path) -> None:
    """UserError unless `path` is (or can become) a folder: not a file, not under a file."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == path else f"is under {p}, which is a file"
                raise UserError(f"workdir {path} {where}, not a folder; choose another --workdir")
            return


class Workdir:
    """A claimed output folder (see the module docstring). Use as a context manager."""

    def __init__(self, path: Path):
        self.root = path  # the folder
        self.outputs: set[str] = set()
        self.inputs: list[Path] = []
        self._depth = 0
        self.created = False  # whether claim() made the folder
        self._manifest = self._load_manifest()

    # -- ownership --------------------------------------------------------------------------------
    def _load_manifest(self) -> dict[str, dict]:
        path = self.root / MANIFEST
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
                ino = os.fstat(f.fileno()).st_ino
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("ino") != ino or not isinstance(data.get("files"), dict):
            return {}  # not the file this tool wrote here (copied, unpacked or edited): proves nothing
        return {k: v for k, v in data["files"].items() if isinstance(v, dict)}

    def _save_manifest(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=MANIFEST + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                body = {"written_by": "bye_jax", "ino": os.fstat(f.fileno()).st_ino, "files": self._manifest}
                f.write(dump_json(body, indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.root / MANIFEST)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def owns(self, name: str) -> bool:
        """True when workdir/name is absent, or present and written by this tool."""
        target = self.root / name
        if not (target.exists() or target.is_symlink()):
            return True
        entry = self._manifest.get(name)
        if entry is None or target.is_symlink():
            return False
        if entry.get("pending"):
            return True
        try:
            return _stat_entry(target) == entry
        except OSError:
            return False

    def _check(self, names: Iterable[str]) -> None:
        for name in names:
            if Path(name).name != name or name in (MANIFEST, LOCK):
                raise ValueError(f"not a plain output name: {name!r}")
            target = self.root / name
            for source in self.inputs:
                if (target.exists() and same_file(target, source)) or (
                        target.is_dir() and source.resolve().is_relative_to(target.resolve())):
                    raise UserError(f"workdir {self.root}: output {name} would replace the input {source}; "
                                    "choose another --workdir")
            if not self.owns(name):
                raise UserError(f"workdir {self.root}: {name} exists and was not written by bye_jax (or was "
                                "changed since); choose another --workdir")

    def add(self, outputs: Iterable[str], inputs: Iterable[str | os.PathLike] = ()) -> None:
        """Claims more output names (same checks as `claim`). Names claimed earlier are not checked
        against the new inputs: what an outer command wrote may be an input of the one it runs."""
        outputs = list(outputs)
        self.inputs += [Path(p) for p in inputs if p]
        self._check(outputs)
        self.outputs.update(outputs)

    def protect(self, paths: Iterable[str | os.PathLike]) -> None:
        """UserError if any of `paths` (e.g. the images of the loaded samples) is a claimed output."""
        names = {n: self.root / n for n in self.outputs}
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):  # an image inside a dataset (TFDS): not a file here
                continue
            p = Path(p)
            if p.name in names and same_file(p, names[p.name]):
                raise UserError(f"workdir {self.root}: output {p.name} would replace the input {p}; "
                                "choose another --workdir")

    # -- writing ----------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """workdir/name for a writer of its own, marked as being written by us (call `record` after)."""
        if name not in self.outputs:
            self.add([name])
        self._manifest[name] = {"pending": True}
        self._save_manifest()
        return self.root / name

    def record(self, *names: str) -> None:
        """Records files written through `path()` as ours (names that do not exist are dropped)."""
        for name in names:
            target = self.root / name
            if target.exists() and not target.is_symlink():
                self._manifest[name] = _stat_entry(target)
            else:
                self._manifest.pop(name, None)
        self._save_manifest()

    @contextlib.contextmanager
    def writing(self, *names: str):
        """Marks names (files or folders) as being written by us for the block, then records them."""
        for name in names:
            self.path(name)
        try:
            yield self
        finally:
            self.record(*names)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Writes workdir/name atomically (temporary file, fsync, rename) and records it."""
        target = self.path(name)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.record(name)
        return target

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj, *, indent: int | None = 2, ensure_ascii: bool = True) -> Path:
        """Strict JSON (NaN / Inf -> null, see bye_jax.jsonio)."""
        return self.write_text(name, dump_json(obj, indent=indent, ensure_ascii=ensure_ascii))

    # -- lock ---------------------------------------------------------------------------------------
    def _lock(self) -> None:
        lock = self.root / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # serialises stale-lock recovery (not on every filesystem)
                fcntl.flock(dfd, fcntl.LOCK_EX)
            for attempt in range(2):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = self._holder(lock)
                    if attempt == 0 and self._stale(holder, lock):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(lock)
                        continue
                    raise UserError(self._busy_message(holder, lock)) from None
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(me) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                return
        except PermissionError as e:
            raise UserError(f"workdir {self.root} is not writable ({one_line(e.strerror)}); "
                            "choose another --workdir") from e
        finally:
            os.close(dfd)  # also drops the flock

    @staticmethod
    def _holder(lock: Path) -> dict:
        try:
            data = json.loads(lock.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict, lock: Path) -> bool:
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:  # killed while writing its lock (or not our file)
            try:
                return time.time() - lock.stat().st_mtime > 10
            except OSError:
                return True
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell from here
        if pid == os.getpid():
            return False
        return not _alive(pid, holder.get("start"))

    def _busy_message(self, holder: dict, lock: Path) -> str:
        who = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
               if holder.get("pid") else "another process")
        note = "" if holder.get("host") == socket.gethostname() else f" (if that run is gone, remove {lock})"
        return f"workdir {self.root} is in use by {who}{note}; wait for it or choose another --workdir"

    def release(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        _HELD.pop(self.root.resolve(), None)
        lock = self.root / LOCK
        if self._holder(lock).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(lock)
                if self.created and not any(self.root.iterdir()):  # a run that wrote nothing leaves nothing
                    self.root.rmdir()

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check(path: str | os.PathLike, outputs: Iterable[str], *, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """The ownership checks of `claim` without creating, locking or writing anything."""
    path = Path(path)
    _check_folder(path)
    if path.is_dir():
        wd = _HELD.get(path.resolve()) or Workdir(path)
        saved = wd.inputs
        wd.inputs = saved + [Path(p) for p in inputs if p]
        try:
            wd._check(outputs)
        finally:
            wd.inputs = saved


def claim(path: str | os.PathLike, outputs: Iterable[str], *,
          inputs: Iterable[str | os.PathLike] = ()) -> Workdir:
    """Creates the folder if needed, takes its lock and checks every output name (module docstring).
    Returns the Workdir (release it, or use `with`); UserError with a one-line reason otherwise."""
    path = Path(path)
    _check_folder(path)
    held = _HELD.get(path.resolve()) if path.is_dir() else None
    if held is not None:
        held.add(outputs, inputs)
        held._depth += 1
        return held
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise UserError(f"workdir {path} cannot be created ({one_line(e.strerror)}); choose another --workdir") from e
    except OSError as e:
        raise UserError(f"workdir {path} cannot be created: {one_line(e)}") from e
    wd = Workdir(path)
    wd.created = created
    wd._lock()
    wd._manifest = wd._load_manifest()  # again, now that no other run can be writing it
    wd._depth = 1
    _HELD[path.resolve()] = wd
    try:
        wd.add(outputs, inputs)
    except BaseException:
        wd.release()
        raise
    return wd
