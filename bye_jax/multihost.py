"""Process start-up and the few host-level collectives a multi-process run needs.

`setup(config)` runs once per process before any JAX computation (every command calls it through
`cli.run`): it turns on JAX's persistent compilation cache (`config.compile_cache_dir`, default
$XDG_CACHE_HOME/bye_jax/jax or ~/.cache/bye_jax/jax; "" disables it) and starts JAX's multi-process runtime from
`config.distributed`:

  coordinator_address  "host:port" of process 0's coordinator ("" = auto-detect)
  num_processes        total number of processes (-1 = auto-detect)
  process_id           this process's index in [0, num_processes) (-1 = auto-detect)

With all three empty, a job that the environment describes as multi-process (a TPU pod slice,
a SLURM job with several tasks, an Open MPI launch, or JAX_COORDINATOR_ADDRESS) is initialised
through `jax.distributed.initialize()`'s own cluster detection; anything else runs as one process.
On CPU the cross-process collectives use gloo.

The collectives move host bytes (`allgather_bytes`, `from_primary`): each process computes on its
own devices and process 0 (`is_primary`) alone writes files.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bye_jax.configs.runtime import default_cache_dir
from bye_jax.errors import UserError, one_line

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID",
                "MEGASCALE_COORDINATOR_ADDRESS")
_STATE = {"initialized": False, "cache": None}


# ---------------------------------------------------------------------------- configuration

def _int_or_auto(section, key: str, minimum: int) -> int:
    value = section.get(key, -1)
    if value is None or value == "":
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or (value < minimum and value != -1):
        raise UserError(f"config.distributed.{key} must be an integer >= {minimum}, or -1 to auto-detect; "
                        f"got {value!r}")
    return value


def check_distributed(section) -> tuple[str, int, int]:
    """(coordinator_address, num_processes, process_id) of a config.distributed section (None or a
    missing key = auto); UserError (one line) on a bad value."""
    if section is None:
        return "", -1, -1
    address = section.get("coordinator_address", "") or ""
    if not isinstance(address, str):
        raise UserError(f"config.distributed.coordinator_address must be host:port, got {address!r}")
    address = address.strip()
    if address:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UserError(f"config.distributed.coordinator_address must be host:port with a port in 1..65535, "
                            f"got {address!r}")
    num = _int_or_auto(section, "num_processes", 1)
    pid = _int_or_auto(section, "process_id", 0)
    if num != -1 and pid != -1 and pid >= num:
        raise UserError(f"config.distributed.process_id={pid} must be < num_processes={num}")
    if num > 1 and not _cluster_described():
        missing = [k for k, v in (("coordinator_address", address), ("process_id", pid != -1)) if not v]
        if missing:
            raise UserError(f"config.distributed.num_processes={num} needs {' and '.join(missing)} (no TPU pod, "
                            "SLURM or Open MPI environment to detect them from)")
    return address, num, pid


def _cluster_described() -> bool:
    """Whether the environment describes a multi-process job that JAX can detect by itself."""
    env = os.environ
    if any(env.get(k) for k in _CLUSTER_ENV):
        return True
    for key in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(key, "").isdigit() and int(env[key]) > 1 and ("SLURM_JOB_ID" in env or key.startswith("OMPI")):
            return True
    return False


# ----------------------------------------------------------------------------------- start-up

def setup(config) -> None:
    """Compilation cache and multi-process runtime of a command's config (see the module docstring).
    Idempotent; a config without these keys gets the defaults."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    section = get("distributed", None)
    address, num, pid = check_distributed(section)
    cache = get("compile_cache_dir", None)
    enable_compile_cache(default_cache_dir() if cache is None else cache)
    initialize(address, num, pid)


def enable_compile_cache(path: str) -> str | None:
    """Turns JAX's persistent compilation cache on in `path` ("" turns it off); returns the folder."""
    import jax

    if not isinstance(path, str):
        raise UserError(f"config.compile_cache_dir must be a folder path or \"\" (off), got {path!r}")
    if _STATE["cache"] == path:
        return path or None
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        _STATE["cache"] = path
        return None
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"config.compile_cache_dir {path}: cannot create it ({type(e).__name__}: {one_line(e)}); "
                        "give another folder or \"\" to disable the cache") from e
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    _STATE["cache"] = path
    return str(folder)


def initialize(address: str = "", num_processes: int = -1, process_id: int = -1) -> None:
    """Starts JAX's multi-process runtime when asked for (or the environment describes a cluster);
    one process otherwise. Once per process, before the first JAX computation."""
    if _STATE["initialized"]:
        return
    explicit = bool(address) or num_processes > 1
    if num_processes == 1 or not (explicit or _cluster_described()):
        _STATE["initialized"] = True
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in (("coordinator_address", address or None),
                                ("num_processes", None if num_processes == -1 else num_processes),
                                ("process_id", None if process_id == -1 else process_id)) if v is not None}
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        message = one_line(e)
        _STATE["initialized"] = True
        if "already" in message.lower() and "initializ" in message.lower():
            return
        if not explicit:  # auto-detection found nothing usable (e.g. a single-host TPU VM): one process
            print(f"bye_jax: running as one process (multi-process auto-detection: {message})", file=sys.stderr)
            return
        _STATE["initialized"] = False
        where = f" (coordinator {address})" if address else ""
        raise UserError(f"config.distributed: cannot start the multi-process runtime{where}: {message}") from e
    _STATE["initialized"] = True


# -------------------------------------------------------------------------------- collectives

def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


def is_primary() -> bool:
    """Whether this is process 0, the only one that writes files."""
    return process_index() == 0


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order (the same list on every process)."""
    if process_count() == 1:
        return [data]
    import numpy as np
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int64))
    sizes = [int(n) for n in np.asarray(sizes).reshape(-1)]
    padded = np.zeros(max(max(sizes), 1), np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    stacked = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [stacked[p, :n].tobytes() for p, n in enumerate(sizes)]


def allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order."""
    return [json.loads(b.decode("utf-8")) for b in allgather_bytes(json.dumps(obj).encode("utf-8"))]


def from_primary(fn: Callable[[], object], *, share: bool = True):
    """Runs fn() on process 0 alone; every process gets its JSON-serialisable result (`share=False`:
    process 0 gets the result, any object, the others None). A failure there is raised on every
    process (a UserError stays one, anything else becomes a ValueError with its message), so no
    process waits forever for process 0."""
    if process_count() == 1:
        return fn()
    payload, result = {}, None
    if is_primary():
        try:
            result = fn()
            payload = {"ok": result if share else None}
        except Exception as e:  # noqa: BLE001 - told to every process, then raised here as it was
            allgather_json({"error": str(e), "user": isinstance(e, UserError)})
            raise
    got = allgather_json(payload)[0]
    if "error" in got:
        raise (UserError if got["user"] else ValueError)(got["error"])
    return result if is_primary() or not share else got["ok"]


class StepFailed(UserError):
    """A step of a loop that every process runs together failed on one process (raised on every one)."""


def step_status(done: bool, error: str | None = None, what: str = "this step") -> bool:
    """One round of a loop whose processes must stop together (a collective: every process calls it
    once per round, also after its own part is done): every process's (done, error) is exchanged.
    Returns whether every process is done; raises `StepFailed` (one line) on every process when any
    process reports an error, so no process waits forever at the next collective for one that stopped."""
    if process_count() == 1:
        if error:
            raise StepFailed(f"{what} failed: {error}")
        return done
    parts = allgather_json({"done": bool(done), "error": error})
    failed = [(p, part["error"]) for p, part in enumerate(parts) if part["error"]]
    if failed:
        p, message = failed[0]
        others = f" (and on process {', '.join(str(q) for q, _ in failed[1:])})" if len(failed) > 1 else ""
        raise StepFailed(f"{what} failed on process {p} of {len(parts)}{others}: {message}; every process stopped")
    return all(part["done"] for part in parts)


def describe(e: BaseException) -> str:
    """An exception as one line: its message, with its type unless it is a UserError."""
    return one_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {one_line(e)}"


class ElsewhereWorkdir:
    """Stands for a claimed workdir (bye_jax/workdir.py) on a process other than 0, which writes nothing."""

    def __init__(self, root):
        self.root = Path(root)
        self.outputs: set[str] = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def path(self, name: str) -> Path:
        return self.root / name

    def protect(self, paths) -> None:
        del paths

    def record(self, *names: str) -> None:
        del names

    def writing(self, *names: str):
        import contextlib

        return contextlib.nullcontext()


def claim_on_primary(claim: Callable[[], object], root):
    """Process 0's `claim()` of a workdir (its failure raised on every process); an `ElsewhereWorkdir`
    on the other processes."""
    wd = from_primary(claim, share=False)
    return wd if is_primary() else ElsewhereWorkdir(root)


def host_local(tree):
    """`tree` with every array that spans other processes' devices gathered whole into this process
    (a collective: every process calls it on the same tree)."""
    import jax

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return jax.numpy.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(one, tree)
