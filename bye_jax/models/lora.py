"""LoRA adapters on the model's `Dense` layers (PEFT semantics), merging, and adapter access.

`Dense` (layers.py) already carries two optional `nnx.LoRAParam` slots: ``lora_a`` [in, r] and
``lora_b`` [r, out], and computes ``y = x @ kernel + (x @ lora_a @ lora_b) * lora_scale``.
`add_lora` fills them the way PEFT does for ``nn.Linear``: A ~ kaiming_uniform(a=sqrt(5)) on the
torch weight [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0 (so a new adapter changes nothing);
scale = alpha / rank. LoRA params are float32 (a master copy) whatever the model's dtype.

Targets are chosen by a regex over a Dense layer's module path, its parts joined with '/'
(``language_model/layers/3/self_attn/q_proj``), matched with `re.fullmatch` (as PEFT matches a
string ``target_modules`` against full module names).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bye_jax.models.layers import Dense

# Every linear layer of the Llama decoder (what LLaVA's LoRA recipe and PEFT's "all-linear" adapt).
DEFAULT_TARGET = r"language_model/layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)"


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def iter_dense(model: nnx.Module) -> Iterator[tuple[str, Dense]]:
    """(path, layer) for every `Dense` in the model, in graph order."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Dense):
            yield path_str(path), module


def matching_dense(model: nnx.Module, target: str) -> list[tuple[str, Dense]]:
    try:
        pattern = re.compile(target)
    except re.error as e:
        raise ValueError(f"LoRA target {target!r} is not a valid regex: {e}") from e
    return [(p, d) for p, d in iter_dense(model) if pattern.fullmatch(p)]


def add_lora(model: nnx.Module, *, rank: int, alpha: float, target: str = DEFAULT_TARGET,
             rngs: nnx.Rngs) -> list[str]:
    """Adds a fresh LoRA adapter (in place) to every Dense whose path fullmatches `target`.

    Returns the adapted paths. Raises ValueError when nothing matches or a layer already has one.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    hits = matching_dense(model, target)
    if not hits:
        raise ValueError(f"LoRA target {target!r} matches no Dense layer (paths look like "
                         f"{next(iter_dense(model))[0]!r})")
    for path, dense in hits:
        if dense.lora_a is not None:
            raise ValueError(f"{path} already has a LoRA adapter")
        fan_in, fan_out = dense.kernel.shape
        bound = 1.0 / np.sqrt(fan_in)
        # numpy draws seeded by the layer's key: no per-shape compilation of jax.random on the host
        rng = np.random.default_rng(np.asarray(jax.random.key_data(rngs.params())).ravel().tolist())
        a = jnp.asarray(rng.uniform(-bound, bound, (fan_in, rank)).astype(np.float32))
        dense.lora_a = nnx.data(nnx.LoRAParam(a))
        dense.lora_b = nnx.data(nnx.LoRAParam(jnp.zeros((rank, fan_out), jnp.float32)))
        dense.lora_scale = float(alpha) / float(rank)
    return [p for p, _ in hits]


def lora_paths(model: nnx.Module) -> list[str]:
    """Paths of the Dense layers that currently carry an adapter."""
    return [p for p, d in iter_dense(model) if d.lora_a is not None]


def lora_delta(dense: Dense) -> jax.Array:
    """The adapter's kernel update a @ b * scale, [in, out], float32."""
    a = dense.lora_a[...].astype(jnp.float32)
    b = dense.lora_b[...].astype(jnp.float32)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * jnp.float32(dense.lora_scale)


def merged_kernel(dense: Dense) -> jax.Array:
    """kernel + a @ b * scale in the kernel's dtype (the kernel itself when there is no adapter)."""
    kernel = dense.kernel[...]
    if dense.lora_a is None:
        return kernel
    return (kernel.astype(jnp.float32) + lora_delta(dense)).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> list[str]:
    """Folds every adapter into its kernel and removes it (in place); returns the merged paths."""
    merged = []
    for path, dense in iter_dense(model):
        if dense.lora_a is None:
            continue
        dense.kernel[...] = merged_kernel(dense)
        dense.lora_a = None
        dense.lora_b = None
        dense.lora_scale = 0.0
        merged.append(path)
    return merged


def lora_weights(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{path: (a [in, r], b [r, out], scale)} as host float32 arrays."""
    return {p: (np.asarray(d.lora_a[...], np.float32), np.asarray(d.lora_b[...], np.float32), float(d.lora_scale))
            for p, d in iter_dense(model) if d.lora_a is not None}
