"""Device mesh and shardings: data parallel over ('data', 'fsdp'), parameters split by their role.

The mesh has three axes: `data` and `fsdp` split the batch, `fsdp` also splits the parameters, and
`tensor` (size 1 unless asked for) splits attention heads, MLP columns and the vocabulary, for a
model that does not fit one device at batch 1. Each parameter's spec comes from two small tables,
like the logical-axis rules of flax / maxtext:

  PARAM_RULES   parameter path regex -> logical axes of its dimensions, e.g. a q_proj kernel
                [hidden, heads * head_dim] is ("embed", "heads"), the token embedding ("vocab", "embed");
  LOGICAL_RULES logical axis -> mesh axes, in priority order: vocab -> (tensor, fsdp), heads / mlp ->
                tensor, embed -> fsdp. A mesh axis serves one dimension of a parameter (the rule
                listed first gets it) and only when it divides that dimension.

So attention and MLP kernels split their hidden dimension over `fsdp` (heads / MLP columns over
`tensor`), embeddings and the output layer split the vocabulary, and norms and biases stay
replicated. A parameter no rule names (a model family added later) falls back to its largest
dimension divisible by the fsdp size. On one device everything is trivially replicated.
Multi-process start-up: bye_jax/multihost.py.
"""

from __future__ import annotations

import math
import re
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


def check_mesh(data, fsdp, tensor=1) -> None:
    """ValueError (one line, naming the key) unless data / fsdp are ints >= 1 or -1 (at most one -1)
    and tensor an int >= 1. Needs no device, so commands check it before loading anything."""
    for key, value in (("data", data), ("fsdp", fsdp)):
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ValueError(f"mesh.{key} must be an integer >= 1, or -1 for all remaining devices; got {value!r}")
    if isinstance(tensor, bool) or not isinstance(tensor, int) or tensor < 1:
        raise ValueError(f"mesh.tensor must be an integer >= 1; got {tensor!r}")
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


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, local: bool = False) -> Mesh:
    """Mesh of shape (data, fsdp, tensor) over every process's devices (`local`: this process's only);
    -1 takes all remaining devices."""
    check_mesh(data, fsdp, tensor)
    pool = jax.local_devices() if local else jax.devices()
    n = len(pool)
    if data == -1:
        data = n // (fsdp * tensor)
    if fsdp == -1:
        fsdp = n // (data * tensor)
    if data < 1 or fsdp < 1 or data * fsdp * tensor != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} does not cover the {n} available devices")
    devices = np.asarray(pool).reshape(data, fsdp, tensor)
    return Mesh(devices, ("data", "fsdp", "tensor"))


# Parameter path ('/'-joined, layer numbers included) -> logical axes of its dimensions. First match wins.
_IN = r"q_proj|k_proj|v_proj|query|key|value"  # hidden -> heads
_OUT = r"o_proj|out_proj"  # heads -> hidden
_UP = r"gate_proj|up_proj|fc1|linear_1"  # hidden -> MLP columns (linear_1: the projector)
_DOWN = r"down_proj|fc2|linear_2"  # MLP columns -> hidden
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r".*(embed_tokens|wte|word_embeddings)/(weight|embedding)", ("vocab", "embed")),
    (r".*lm_head/kernel", ("embed", "vocab")),
    (rf".*({_IN})/kernel", ("embed", "heads")),
    (rf".*({_OUT})/kernel", ("heads", "embed")),
    (rf".*({_UP})/kernel", ("embed", "mlp")),
    (rf".*({_DOWN})/kernel", ("mlp", "embed")),
    (rf".*({_IN}|{_UP}|lm_head)/lora_a", ("embed", None)),  # LoRA: [in, rank] and [rank, out]
    (r".*lm_head/lora_b", (None, "vocab")),
    (rf".*({_IN})/lora_b", (None, "heads")),
    (rf".*({_UP})/lora_b", (None, "mlp")),
    (rf".*({_OUT})/lora_a", ("heads", None)),
    (rf".*({_DOWN})/lora_a", ("mlp", None)),
    (rf".*({_OUT}|{_DOWN})/lora_b", (None, "embed")),
    (r".*(patch_embedding|position_embedding)", (None, "embed")),
    (r".*(bias|norm[^/]*/(weight|scale)|class_embedding)", ()),
)
# Logical axis -> mesh axes, in priority order (an earlier rule claims its mesh axes first).
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocab", ("tensor", "fsdp")),
    ("heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("embed", ("fsdp",)),
)


def path_name(path) -> str:
    """'/'-joined names of a parameter path (nnx path tuple or a jax key path)."""
    parts = []
    for p in path or ():
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return "/".join(parts)


def logical_axes(path) -> tuple[str | None, ...] | None:
    """The logical axes PARAM_RULES gives this parameter (() = replicated), None when no rule names it."""
    name = path_name(path)
    for pattern, axes in PARAM_RULES:
        if re.fullmatch(pattern, name):
            return axes
    return None


def spec_for(path, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> P:
    """The PartitionSpec of a parameter on a mesh of these axis sizes (see the module docstring)."""
    axes = logical_axes(path)
    if axes is None or len(axes) != len(shape):
        return _largest_divisible(shape, mesh_shape.get("fsdp", 1)) if axes is None or axes else P()
    spec: list = [None] * len(shape)
    used: set[str] = set()
    for logical, mesh_axes in LOGICAL_RULES:
        for d, name in enumerate(axes):
            if name != logical:
                continue
            chosen = [a for a in mesh_axes if a not in used and mesh_shape.get(a, 1) > 1]
            while chosen and shape[d] % math.prod(mesh_shape[a] for a in chosen):
                chosen.pop()  # the mesh axes that divide the dimension, in rule order
            if chosen:
                spec[d] = chosen[0] if len(chosen) == 1 else tuple(chosen)
                used.update(chosen)
    return P(*spec)


def _largest_divisible(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp > 1:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % fsdp == 0:
                spec = [None] * len(shape)
                spec[d] = "fsdp"
                return P(*spec)
    return P()


def param_sharding(mesh: Mesh):
    """Returns sharding_for(path, shape) for the loader (and for training's parameter trees)."""
    sizes = dict(mesh.shape)

    def sharding_for(path, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, spec_for(path, tuple(shape), sizes))

    return sharding_for


@dataclass(frozen=True)
class Placement:
    """Where a run's parameters and batches go; both None on a single device (nothing moves)."""

    params: Callable[[tuple, tuple[int, ...]], NamedSharding] | None  # sharding_for(path, shape)
    batch: NamedSharding | None
    batch_axis: int = 0

    def put_batch(self, x):
        """The global batch `x` (every process holds it whole) as an array split over the mesh; over
        several processes each contributes its own rows (`jax.make_array_from_process_local_data`)."""
        if self.batch is None:
            return jax.numpy.asarray(x)
        if self.batch.is_fully_addressable:
            return jax.device_put(x, self.batch)
        x = np.asarray(x)
        spans = [index[self.batch_axis] for index in self.batch.addressable_devices_indices_map(x.shape).values()]
        lo, hi = min(s.start or 0 for s in spans), max(x.shape[self.batch_axis] if s.stop is None else s.stop
                                                         for s in spans)
        local = x[(slice(None),) * self.batch_axis + (slice(lo, hi),)]
        return jax.make_array_from_process_local_data(self.batch, local, x.shape)


def placement(data: int, fsdp: int, batch_size: int, batch_axis: int = 0, *, tensor: int = 1,
              local: bool = False) -> Placement:
    """The mesh (data, fsdp, tensor) for a run with this per-step batch size, whose batch dimension is
    `batch_axis` of every input; `local`: over this process's devices only (each process computes its
    own batches, as extraction does). Raises ValueError with a one-line reason starting with the key."""
    check_mesh(data, fsdp, tensor)
    try:
        mesh = make_mesh(int(data), int(fsdp), int(tensor), local=local)
    except ValueError as e:
        raise ValueError(f"mesh: {e}") from e
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if mesh.size == 1:
        return Placement(None, None)
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {shards} data shards of the mesh")
    spec = [None] * batch_axis + [("data", "fsdp")]
    return Placement(param_sharding(mesh), NamedSharding(mesh, P(*spec)), batch_axis)
