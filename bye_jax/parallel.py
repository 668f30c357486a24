"""Device mesh and shardings: data parallel over ('data', 'fsdp'), parameters sharded over 'fsdp'.

On one device everything is trivially replicated. On several devices the batch is split over both
mesh axes and each parameter is split along its largest dimension divisible by the fsdp size
(the rest replicated), which is what an inference-only FSDP needs. Multi-host start-up goes
through `jax.distributed.initialize()` when a coordinator is configured in the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-process runtime when the environment describes a multi-process job (a
    no-op once `bye_jax.multihost.setup` ran, as every command does first)."""
    from bye_jax.multihost import initialize

    initialize()


def check_mesh(data, fsdp) -> None:
    """ValueError (one line, naming the key) unless both sizes are ints >= 1 or -1, at most one -1.
    Needs no device, so commands check it before loading anything."""
    for key, value in (("data", data), ("fsdp", fsdp)):
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ValueError(f"mesh.{key} must be an integer >= 1, or -1 for all remaining devices; got {value!r}")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp can be -1")


def check_attn_impl(attn_impl: str, dtype: str) -> None:
    """ValueError (one line) unless the attention implementation can run here: 'cudnn' needs a GPU
    backend and a 16-bit dtype. Looks at the backend only for 'cudnn'."""
    if attn_impl not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attn_impl must be auto, xla or cudnn, got {attn_impl!r}")
    if attn_impl != "cudnn":
        return
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"attn_impl=cudnn needs dtype bfloat16 (cuDNN attention has no {dtype}); use auto or xla")
    maybe_initialize_distributed()
    backend = jax.default_backend()
    if backend != "gpu":
        raise ValueError(f"attn_impl=cudnn needs a GPU, this machine's JAX backend is {backend}; use auto or xla")


def make_mesh(data: int = -1, fsdp: int = 1, *, local: bool = False) -> Mesh:
    """Mesh of shape (data, fsdp) over every process's devices (`local`: this process's only);
    -1 takes all remaining devices."""
    check_mesh(data, fsdp)
    pool = jax.local_devices() if local else jax.devices()
    n = len(pool)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} available devices")
    devices = np.asarray(pool).reshape(data, fsdp)
    return Mesh(devices, ("data", "fsdp"))


def param_sharding(mesh: Mesh):
    """Returns sharding_for(path, shape) for the loader."""
    fsdp = mesh.shape["fsdp"]

    def sharding_for(path: tuple, shape: tuple[int, ...]) -> NamedSharding:
        del path
        if fsdp > 1:
            dims = sorted(range(len(shape)), key=lambda d: -shape[d])
            for d in dims:
                if shape[d] % fsdp == 0:
                    spec = [None] * len(shape)
                    spec[d] = "fsdp"
                    return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return sharding_for


@dataclass(frozen=True)
class Placement:
    """Where a run's parameters and batches go; both None on a single device (nothing moves)."""

    params: Callable[[tuple, tuple[int, ...]], NamedSharding] | None  # sharding_for(path, shape)
    batch: NamedSharding | None

    def put_batch(self, x):
        return jax.numpy.asarray(x) if self.batch is None else jax.device_put(x, self.batch)


def placement(data: int, fsdp: int, batch_size: int, batch_axis: int = 0, *, local: bool = False) -> Placement:
    """The mesh (data, fsdp) for a run with this per-step batch size, whose batch dimension is
    `batch_axis` of every input; `local`: over this process's devices only (each process computes its
    own batches, as extraction does). Raises ValueError with a one-line reason starting with the key."""
    check_mesh(data, fsdp)
    try:
        mesh = make_mesh(int(data), int(fsdp), local=local)
    except ValueError as e:
        raise ValueError(f"mesh: {e}") from e
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if shards == 1:
        return Placement(None, None)
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {shards} data shards of the mesh")
    spec = [None] * batch_axis + [("data", "fsdp")]
    return Placement(param_sharding(mesh), NamedSharding(mesh, P(*spec)))
