"""Loads a Hugging Face LLaVA checkpoint directory into the Flax NNX port.

A regex rule table maps every tensor name to exactly one model parameter (and how to transform
it). Legacy on-disk names (language_model.model.*, vision_tower.*, ...) are first rewritten to the
current layout. All keys and shapes are checked from the safetensors headers before any data is
read; a single error names every unmatched, missing or mis-shaped key. The model is built with
`nnx.eval_shape` (no allocation) and filled one tensor at a time: each is cast to the configured
dtype and placed with `jax.device_put` (optionally onto a sharding), so a 7B model never exists
twice in host memory. Each tensor is checked for NaN / Inf on the host (after the cast, so a
float16 overflow counts too) before it is placed: a checkpoint with non-finite weights is refused
with a `CheckpointError` naming the tensor, instead of silently producing NaN attention.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bye_jax.models.config import LlavaConfig, load_config
from bye_jax.models.llava import LlavaForConditionalGeneration
from bye_jax.models.safetensors_io import SafetensorsFile, checkpoint_files

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """The checkpoint does not match the model; the message names every offending key."""


LEGACY_PREFIXES = (
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
)


def normalize_key(key: str) -> str:
    for pattern, repl in LEGACY_PREFIXES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _conv_to_matmul(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).T  # [d, c, p, p] -> [c*p*p, d]


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    target: str | None  # "a/b/{1}/c" with regex groups; None = ignore (non-persistent buffers)
    transform: Callable[[np.ndarray], np.ndarray] = _identity

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.transform is _transpose:
            return shape[::-1]
        if self.transform is _conv_to_matmul:
            return (int(np.prod(shape[1:])), shape[0])
        return shape


_V = r"model\.vision_tower\.(?:vision_model\.)?"
_L = r"model\.language_model\."
RULES: tuple[Rule, ...] = (
    Rule(re.compile(_V + r"embeddings\.class_embedding$"), "vision_tower/embeddings/class_embedding"),
    Rule(re.compile(_V + r"embeddings\.patch_embedding\.weight$"),
         "vision_tower/embeddings/patch_embedding", _conv_to_matmul),
    Rule(re.compile(_V + r"embeddings\.position_embedding\.weight$"),
         "vision_tower/embeddings/position_embedding"),
    Rule(re.compile(_V + r"embeddings\.position_ids$"), None),
    Rule(re.compile(_V + r"(pre_layrnorm|post_layernorm)\.(weight|bias)$"), "vision_tower/{0}/{1}"),
    Rule(re.compile(_V + r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$"),
         "vision_tower/layers/{0}/{1}/kernel", _transpose),
    Rule(re.compile(_V + r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.bias$"),
         "vision_tower/layers/{0}/{1}/bias"),
    Rule(re.compile(_V + r"encoder\.layers\.(\d+)\.(layer_norm[12])\.(weight|bias)$"),
         "vision_tower/layers/{0}/{1}/{2}"),
    Rule(re.compile(r"model\.multi_modal_projector\.(linear_[12])\.weight$"),
         "multi_modal_projector/{0}/kernel", _transpose),
    Rule(re.compile(r"model\.multi_modal_projector\.(linear_[12])\.bias$"), "multi_modal_projector/{0}/bias"),
    Rule(re.compile(_L + r"embed_tokens\.weight$"), "language_model/embed_tokens/weight"),
    Rule(re.compile(_L + r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$"),
         "language_model/layers/{0}/{1}/kernel", _transpose),
    Rule(re.compile(_L + r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.bias$"),
         "language_model/layers/{0}/{1}/bias"),
    Rule(re.compile(_L + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$"),
         "language_model/layers/{0}/{1}/weight"),
    Rule(re.compile(_L + r"layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$"), None),
    Rule(re.compile(_L + r"norm\.weight$"), "language_model/norm/weight"),
    Rule(re.compile(r"lm_head\.weight$"), "lm_head/kernel", _transpose),
)


def match_rule(key: str) -> tuple[Rule, re.Match] | None:
    """The single rule matching a normalised key (raises if several match: a table bug)."""
    hits = [(r, m) for r in RULES if (m := r.pattern.match(key))]
    if len(hits) > 1:
        raise AssertionError(f"rule table is ambiguous for {key}: {[h[0].pattern.pattern for h in hits]}")
    return hits[0] if hits else None


def target_path(rule: Rule, m: re.Match) -> tuple:
    parts = rule.target.format(*m.groups()).replace(".", "/").split("/")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def resolve_attn_impl(attn_impl: str | None, dtype: str) -> str:
    """'auto' / None -> cuDNN fused attention on GPU for 16-bit dtypes (it supports no float32),
    XLA everywhere else. On one H100 (LLaVA-1.5-7B, bf16, batch 48) cuDNN extracts 1.2x faster."""
    if attn_impl not in (None, "auto"):
        return attn_impl
    return "cudnn" if jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16") else "xla"


def _abstract_model(cfg: LlavaConfig, dtype, attn_impl):
    return nnx.eval_shape(lambda: LlavaForConditionalGeneration(
        cfg, dtype=dtype, rngs=nnx.Rngs(0), attn_impl=attn_impl))


def plan_load(files: list[Path], expected: dict[tuple, tuple[int, ...]], tied: bool):
    """Checks every key and shape from the headers; returns [(file, key, rule, path)] or raises."""
    plan, unmatched, misshaped, seen = [], [], [], {}
    for f in files:
        st = SafetensorsFile(f)
        try:
            for key in st.header:
                norm = normalize_key(key)
                hit = match_rule(norm)
                if hit is None:
                    unmatched.append(key)
                    continue
                rule, m = hit
                if rule.target is None or (tied and rule.target == "lm_head/kernel"):
                    continue
                path = target_path(rule, m)
                if path not in expected:
                    unmatched.append(key)
                    continue
                if path in seen:
                    unmatched.append(f"{key} (duplicate of {seen[path]})")
                    continue
                got = rule.shape_of(st.shape(key))
                if got != expected[path]:
                    misshaped.append(f"{key}: checkpoint {tuple(st.shape(key))} (as {got}), "
                                     f"model expects {expected[path]}")
                    continue
                seen[path] = key
                plan.append((f, key, rule, path))
        finally:
            st.close()
    missing = ["/".join(map(str, p)) for p in expected if p not in seen]
    problems = []
    if unmatched:
        problems.append(f"unexpected tensors: {', '.join(sorted(unmatched))}")
    if missing:
        problems.append(f"missing parameters: {', '.join(sorted(missing))}")
    if misshaped:
        problems.append(f"wrong shapes: {'; '.join(misshaped)}")
    if problems:
        raise CheckpointError(" | ".join(problems))
    return plan


# All-ones exponent = Inf or NaN; (bits & mask).max() < mask is ~4x faster than np.isfinite on bfloat16.
_EXPONENT_MASKS = {np.dtype(jnp.bfloat16): (np.uint16, 0x7F80), np.dtype(np.float16): (np.uint16, 0x7C00),
                   np.dtype(np.float32): (np.uint32, 0x7F800000)}


def _all_finite(host: np.ndarray) -> bool:
    if host.size == 0:
        return True
    if host.dtype in _EXPONENT_MASKS:
        uint, mask = _EXPONENT_MASKS[host.dtype]
        return int(np.bitwise_and(host.view(uint), mask).max()) < mask
    return bool(np.isfinite(host).all())


def _non_finite(cast: np.ndarray, key: str, file: Path, dtype: str) -> CheckpointError:
    """The error naming a tensor with NaN or Inf (counted in the dtype it is loaded as; index in the
    checkpoint's own layout)."""
    bad = ~np.isfinite(cast)
    n_nan, n_bad = int(np.isnan(cast).sum()), int(bad.sum())
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return CheckpointError(f"non-finite weights: tensor {key} in {file.name} has {n_nan} NaN and {n_bad - n_nan} "
                           f"infinite values (as {dtype}; first at index {first}); refusing to load it")


def load_llava(checkpoint_dir: str | Path, *, dtype: str = "float32", attn_impl: str | None = None,
               sharding_for: Callable[[tuple, tuple], jax.sharding.Sharding | None] | None = None,
               ) -> tuple[LlavaForConditionalGeneration, LlavaConfig]:
    """Loads a HF LLaVA checkpoint directory; returns (model, config).

    sharding_for(path, shape) may return where each parameter goes (None: the default device).
    attn_impl: 'xla', 'cudnn', or None / 'auto' (see `resolve_attn_impl`).
    dtype float32 also sets jax's default matmul precision to 'highest' for the process when it is
    lower on an accelerator (CPU float32 matmuls are float32 already, and 'highest' slows XLA:CPU
    down by about a quarter): on GPUs jax's default is TF32 (entropies then miss the 1e-4 parity measured on an H100),
    on TPUs bfloat16 passes; float32 is asked for to get float32 numerics.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = Path(checkpoint_dir)
    cfg = load_config(ckpt)
    jdtype = DTYPES[dtype]
    low = (None, "default", "bfloat16", "tensorfloat32")
    if dtype == "float32" and jax.default_backend() != "cpu" and jax.config.jax_default_matmul_precision in low:
        jax.config.update("jax_default_matmul_precision", "highest")  # (CPU float32 is float32 already)
    graphdef, abstract = nnx.split(_abstract_model(cfg, jdtype, resolve_attn_impl(attn_impl, dtype)))
    flat = dict(nnx.to_flat_state(abstract))
    expected = {p: tuple(v.get_value().shape) for p, v in flat.items()}
    files = checkpoint_files(ckpt)
    plan = plan_load(files, expected, cfg.tie_word_embeddings)
    handles = {f: SafetensorsFile(f) for f in files}
    try:
        for f, key, rule, path in plan:
            raw = handles[f].tensor(key)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, in one line
                host = np.ascontiguousarray(rule.transform(raw).astype(jdtype))
                if not _all_finite(host):
                    raise _non_finite(raw.astype(jdtype), key, f, dtype)
            sharding = sharding_for(path, host.shape) if sharding_for else None
            flat[path] = flat[path].replace(jax.device_put(host, sharding))
            del host
    finally:
        for h in handles.values():
            h.close()
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model, cfg
