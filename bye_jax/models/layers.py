"""Small building blocks shared by the CLIP and Llama ports.

Parameters mirror the Hugging Face layout (Linear kernels stored [in, out]) so that the loader's
rule table stays one line per tensor. Norms compute in float32 and cast back, like transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


# Module-level functions (not lambdas) so that two loads of one checkpoint have equal graphdefs
# and jitted steps taking the graphdef as a static argument do not recompile.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact, "gelu_new": gelu_tanh,
               "gelu_pytorch_tanh": gelu_tanh, "silu": jax.nn.silu, "relu": jax.nn.relu}


def activation(name: str):
    """transformers' ACT2FN for the activations LLaVA-style models use."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return ACTIVATIONS[name]


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out]; an optional LoRA adapter adds (x @ A @ B) * scale."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype
        self.lora_a: nnx.LoRAParam | None = None
        self.lora_b: nnx.LoRAParam | None = None
        self.lora_scale = 0.0

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.lora_a is not None:
            lora = (x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
            y = y + lora * jnp.asarray(self.lora_scale, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in float32, cast to the input dtype, then scale (as transformers)."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (num, features), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Tied output projection: x @ weight.T."""
        return x.astype(self.dtype) @ self.weight[...].astype(self.dtype).T
