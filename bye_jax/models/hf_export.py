"""Writes a model back out: a Hugging Face checkpoint directory, and PEFT LoRA adapters (any family).

`save_hf_checkpoint` inverts the family's rule table (bye_jax/models/keys.py): every parameter gets
the on-disk name the SOURCE checkpoint used for it (so a llava-hf hub checkpoint comes back in the
hub layout), else the name `save_pretrained` of transformers 5 writes (for LLaVA
``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.*``,
``multi_modal_projector.*``). Kernels are transposed back to torch's [out, in], the patch-embedding
matmul goes back to a conv weight, a tied lm_head is omitted. LoRA adapters still attached are
folded in on the way out (the model is not modified). Each generated name is checked against the
loader's rules, so what is written always loads back into the same parameter.

Tensors are written one at a time (device -> host -> file) by a small streaming safetensors writer:
the model is never held twice in host memory. No torch import.

`save_peft_adapter` writes adapter_config.json and adapter_model.safetensors in PEFT's layout for
the transformers 5 module names (LLaVA: (``base_model.model.model.language_model.layers.0.self_attn.
q_proj.lora_A.weight`` [r, in], ``...lora_B.weight`` [out, r])).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from bye_jax.models.family import family_of
from bye_jax.models.keys import KeyTable, target_path
from bye_jax.models.lora import iter_dense, merged_kernel, path_str
from bye_jax.models.safetensors_io import SafetensorsFile, checkpoint_files

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
            np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
            np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
            np.dtype(np.bool_): "BOOL"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_MAX_SHARD_BYTES = 50 * 10**9  # transformers 5's save_pretrained default ("50GB")

# ------------------------------------------------------------------------------------ key names

def _check_name(keys: KeyTable, key: str, path: tuple):
    hit = keys.match(keys.normalize(key))
    if hit is None or hit[0].target is None or target_path(*hit) != path:
        raise AssertionError(f"export name {key!r} does not load back into {path_str(path)}")
    return hit[0]


def _source_names(keys: KeyTable, src: Path | None) -> tuple[dict[tuple, str], list[tuple[Path, str]]]:
    """({model path: on-disk key} and [(file, key)] of rule-ignored buffers) of a source checkpoint."""
    names, buffers = {}, []
    if src is None:
        return names, buffers
    try:
        files = checkpoint_files(src)
    except ValueError:
        return names, buffers  # no weights there (e.g. a checkpoint being built)
    for f in files:
        st = SafetensorsFile(f)
        try:
            for key in st.header:
                hit = keys.match(keys.normalize(key))
                if hit is None:
                    continue
                if hit[0].target is None:
                    buffers.append((f, key))
                else:
                    names[target_path(*hit)] = key
        finally:
            st.close()
    return names, buffers


# ------------------------------------------------------------------------------ safetensors out

class _Entry:
    def __init__(self, name: str, shape: tuple, dtype: np.dtype, fetch: Callable[[], np.ndarray]):
        self.name, self.shape, self.dtype, self.fetch = name, tuple(int(s) for s in shape), np.dtype(dtype), fetch

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _write_safetensors(path: Path, entries: list[_Entry], metadata: dict[str, str] | None = None) -> None:
    """Streams `entries` into one safetensors file (header first, then each tensor as fetched)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for e in entries:
            arr = np.ascontiguousarray(e.fetch(), dtype=e.dtype)
            if arr.shape != e.shape:
                raise AssertionError(f"{e.name}: shape {arr.shape}, expected {e.shape}")
            f.write(arr.tobytes())
            del arr
    os.replace(tmp, path)


def _write_sharded(out_dir: Path, entries: list[_Entry], max_shard_bytes: int, stem: str = "model") -> list[Path]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = out_dir / f"{stem}.safetensors"
        _write_safetensors(path, shards[0], meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        path = out_dir / f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(path, shard, meta)
        paths.append(path)
        weight_map.update({e.name: path.name for e in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return paths


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ------------------------------------------------------------------------------- HF checkpoint

def _param_entries(model, cfg, keys: KeyTable, names: dict[tuple, str], np_dtype) -> list[_Entry]:
    merged = {tuple(int(p) if p.isdigit() else p for p in path.split("/")) + ("kernel",): dense
              for path, dense in iter_dense(model) if dense.lora_a is not None}
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("lora_a", "lora_b"):
            continue
        if not isinstance(var, nnx.Param) or isinstance(var, nnx.LoRAParam):
            continue
        key = names.get(path) or keys.saved_name(keys.module_name(path))
        rule = _check_name(keys, key, path)
        value = var.get_value()
        shape = rule.transform.export(np.empty(value.shape, np.bool_), cfg).shape
        dense = merged.get(path)

        def fetch(rule=rule, value=value, dense=dense):
            x = _host(merged_kernel(dense) if dense is not None else value)
            return rule.transform.export(x.astype(np_dtype), cfg)

        entries.append(_Entry(key, shape, np_dtype, fetch))
    return entries


def save_weights(model, cfg, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 layout_from: str | os.PathLike | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Writes only the weights (model.safetensors, or shards + index) into out_dir.

    Key names mirror the checkpoint at `layout_from` where it has the parameter, else
    save_pretrained's layout. Returns the written files.
    """
    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(NP_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = family_of(model).keys
    names, buffers = _source_names(keys, Path(layout_from) if layout_from is not None else None)
    entries = _param_entries(model, cfg, keys, names, NP_DTYPES[dtype])
    for f, key in buffers:  # non-persistent buffers some old checkpoints carry (position_ids, ...)
        st = SafetensorsFile(f)
        arr = np.array(st.tensor(key))
        st.close()
        entries.append(_Entry(key, arr.shape, arr.dtype, lambda arr=arr: arr))
    entries.sort(key=lambda e: e.name)
    for stale in list(out.iterdir()):
        if stale.name in WEIGHT_INDEXES or stale.name.endswith(".safetensors"):
            stale.unlink()
    return _write_sharded(out, entries, max_shard_bytes)


def _has_weights(ckpt: Path) -> bool:
    try:
        return bool(checkpoint_files(ckpt))
    except ValueError:
        return False


def _copy_side_files(src: Path, out: Path, dtype: str) -> None:
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name in WEIGHT_INDEXES:
            continue
        if f.name.startswith("adapter_"):
            continue
        if f.name == "config.json":
            conf = json.loads(f.read_text())
            for c in (conf, conf.get("text_config"), conf.get("vision_config")):
                if isinstance(c, dict):
                    for k in ("dtype", "torch_dtype"):
                        if k in c:
                            c[k] = dtype
            (out / f.name).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(f, out / f.name)


def save_hf_checkpoint(model, cfg, src_checkpoint_dir: str | os.PathLike | None,
                       out_dir: str | os.PathLike, dtype: str = "float32", *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes `model` (adapters folded in) as a HF checkpoint directory of its family; returns out_dir.

    Copies config.json (its dtype set to `dtype`), tokenizer, processor and chat-template files
    (every top-level file but weights, weight indexes and adapter files) from the source checkpoint;
    `src_checkpoint_dir` may be out_dir itself when that holds no weights yet (building a new
    checkpoint), or None (weights only). The source checkpoint is never modified.
    """
    out = Path(out_dir)
    src = Path(src_checkpoint_dir) if src_checkpoint_dir is not None else None
    same = src is not None and out.exists() and src.resolve() == out.resolve()
    if same and _has_weights(src):
        raise ValueError(f"{out} holds the source checkpoint's weights; write the export elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    if src is not None and not same:
        if not (src / "config.json").is_file():
            raise ValueError(f"{src}: no config.json (expected a Hugging Face checkpoint directory)")
        _copy_side_files(src, out, dtype)
    save_weights(model, cfg, out, dtype=dtype, layout_from=src, max_shard_bytes=max_shard_bytes)
    return out


# -------------------------------------------------------------------------------- PEFT adapter

def _peft_target_regex(adapted: Iterable[str], all_modules: Iterable[str]) -> str:
    """A regex (PEFT fullmatches it against module names) selecting exactly the `adapted` modules."""
    adapted, all_modules = set(adapted), list(all_modules)
    groups: dict[str, set[str]] = {}
    for name in adapted:
        parts = name.split(".")
        parent = r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts[:-1])
        groups.setdefault(parent, set()).add(re.escape(parts[-1]))
    pattern = "|".join(f"{parent}\\.({'|'.join(sorted(leaves))})" for parent, leaves in sorted(groups.items()))
    if all(bool(re.fullmatch(pattern, m)) == (m in adapted) for m in all_modules):
        return pattern
    return "|".join(re.escape(n) for n in sorted(adapted))  # layers differ in their targets


def peft_key(keys: KeyTable, path: str, which: str) -> str:
    """PEFT's saved key for the adapter of the Dense at `path`; which = 'A' | 'B'."""
    return f"base_model.model.{keys.module_name(path)}.lora_{which}.weight"


def save_peft_adapter(model, out_dir: str | os.PathLike, base_model_path: str | os.PathLike, rank: int,
                      alpha: float, target_modules: str | list[str] | None = None, *,
                      modules_to_save: list[str] | None = None, dtype: str = "float32") -> Path:
    """adapter_config.json + adapter_model.safetensors in PEFT's layout for the model's adapters.

    target_modules: what goes into the config (PEFT fullmatches a string against module names,
    suffix-matches list entries); None derives a regex that selects exactly the adapted modules.
    modules_to_save: top-level sub-modules trained in full (e.g. ["multi_modal_projector"]), saved
    as PEFT does (``base_model.model.model.multi_modal_projector.linear_1.weight``).
    """
    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(NP_DTYPES)}, got {dtype!r}")
    np_dtype = NP_DTYPES[dtype]
    keys, cfg = family_of(model).keys, model.cfg
    module_name = keys.module_name
    dense = list(iter_dense(model))
    adapted = [(p, d) for p, d in dense if d.lora_a is not None]
    if not adapted:
        raise ValueError("the model has no LoRA adapter (merged already?)")
    scale = float(alpha) / float(rank)
    for p, d in adapted:
        if d.lora_a.shape[1] != rank or not np.isclose(d.lora_scale, scale, rtol=1e-6):
            raise ValueError(f"{p}: adapter rank {d.lora_a.shape[1]} / scale {d.lora_scale} do not match "
                             f"rank={rank}, alpha={alpha}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for p, d in adapted:
        a, b = d.lora_a, d.lora_b
        entries.append(_Entry(peft_key(keys, p, "A"), a.shape[::-1], np_dtype,
                              lambda a=a: _host(a[...]).astype(np_dtype).T))
        entries.append(_Entry(peft_key(keys, p, "B"), b.shape[::-1], np_dtype,
                              lambda b=b: _host(b[...]).astype(np_dtype).T))
    for prefix in modules_to_save or []:
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if path[0] != prefix or isinstance(var, nnx.LoRAParam):
                continue
            rule = _check_name(keys, module_name(path), path)
            value = var.get_value()
            shape = rule.transform.export(np.empty(value.shape, np.bool_), cfg).shape
            entries.append(_Entry("base_model.model." + module_name(path), shape, np_dtype,
                                  lambda rule=rule, value=value: rule.transform.export(
                                      _host(value).astype(np_dtype), cfg)))
    entries.sort(key=lambda e: e.name)
    _write_safetensors(out / "adapter_model.safetensors", entries, {"format": "pt"})
    if target_modules is None:
        target_modules = _peft_target_regex([module_name(p) for p, _ in adapted],
                                            [module_name(p) for p, _ in dense])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.fspath(base_model_path),
        "r": int(rank), "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": 0.0, "target_modules": target_modules, "bias": "none",
        "modules_to_save": list(modules_to_save) if modules_to_save else None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
