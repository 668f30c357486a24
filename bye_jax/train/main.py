"""LoRA fine-tuning end to end: base checkpoint + samples -> merged HF checkpoint + PEFT adapter.

    python -m bye_jax.train --config=bye_jax/configs/train.py --config.model=CKPT \
        --config.data.annotations=train.json --config.data.image_root=images --workdir=OUT

Library entry: `finetune(base_checkpoint, samples, workdir, config) -> Path` of the merged model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from bye_jax import multihost
from bye_jax import workdir as workdirs
from bye_jax.configs.runtime import prompt_options
from bye_jax.data.llava_json import Sample
from bye_jax.errors import UserError

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# What finetune writes in its workdir besides `adapter` and `merged` (unless moved by the config).
TRAIN_OUTPUTS = ("checkpoints", "train_log.jsonl", "train_metrics.json", "loss.png")


def _checkpoint_dtype(checkpoint: Path) -> str | None:
    try:
        conf = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (conf, conf.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if c.get(key) in EXPORT_DTYPES:
                return c[key]
    return None


def check_train_config(config):
    """The train config with defaults filled in; UserError (one line) if unusable here."""
    from bye_jax.parallel import check_attn_impl
    from bye_jax.train.loop import check_config, resolve_config

    config = resolve_config(config)
    try:
        check_config(config)
        check_attn_impl(config.attn_impl, config.dtype)
        prompt_options(config)
    except ValueError as e:
        raise UserError(f"config.{e}") from e
    return config


def finetune(base_checkpoint: str | os.PathLike, samples: Sequence[Sample], workdir: str | os.PathLike,
             config=None, *, progress: bool = True, callback=None) -> Path:
    """Fine-tunes the base checkpoint with LoRA on `samples`; returns the merged checkpoint dir.

    `config`: a train config (bye_jax/configs/train.py; missing keys take its defaults; its
    `model` key is ignored in favour of `base_checkpoint`). Writes workdir/checkpoints (orbax,
    resumed by a rerun), workdir/train_log.jsonl, workdir/train_metrics.json, workdir/loss.png (the
    loss curve), the PEFT adapter (config.adapter_dir or workdir/adapter) and the merged model
    (config.merged_dir or workdir/merged). Raises runner.UserError with a one-line reason on bad inputs.
    """
    config = check_train_config(config)
    export_dtype = config.export_dtype or _checkpoint_dtype(Path(base_checkpoint)) or config.dtype
    if export_dtype not in EXPORT_DTYPES:
        raise UserError(f"config.export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {export_dtype!r}")
    if not samples:
        raise UserError("no training sample")
    outputs = [n for n, moved in (("adapter", config.adapter_dir), ("merged", config.merged_dir)) if not moved]
    claim = lambda: workdirs.claim(workdir, TRAIN_OUTPUTS + tuple(outputs), inputs=[base_checkpoint])  # noqa: E731
    with multihost.claim_on_primary(claim, workdir) as wd:  # process 0 alone writes the workdir
        wd.protect(s.image_path for s in samples)
        return _finetune(base_checkpoint, samples, wd, config, export_dtype, progress, callback)


def _finetune(base_checkpoint, samples, wd: workdirs.Workdir, config, export_dtype, progress, callback) -> Path:
    from bye_jax.models import family
    from bye_jax.models.config import ConfigError
    from bye_jax.models.hf_loader import CheckpointError
    from bye_jax.models.safetensors_io import SafetensorsError
    from bye_jax.train.loop import CHECKPOINT_DIR, LOG_FILE, train

    workdir = wd.root
    impl = None if config.attn_impl == "auto" else config.attn_impl
    try:
        model, cfg = family.load_model(base_checkpoint, dtype=config.dtype, attn_impl=impl)
        encoder = family.load_encoder(base_checkpoint, **prompt_options(config))
    except (CheckpointError, ConfigError, SafetensorsError, OSError) as e:
        raise UserError(f"checkpoint {base_checkpoint} does not load: {e}") from e
    except ValueError as e:
        raise UserError(f"checkpoint {base_checkpoint}: {e}") from e
    wd.path(CHECKPOINT_DIR), wd.path(LOG_FILE)
    try:
        metrics = train(model, cfg, samples, encoder, config=config, workdir=workdir, progress=progress,
                        callback=callback)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from e
    finally:
        wd.record(CHECKPOINT_DIR, LOG_FILE)
    # process 0 exports while the others wait for it: on every process `finetune` returns once the
    # merged model exists, and an export failure is raised on every process
    return Path(multihost.from_primary(lambda: _export(base_checkpoint, model, cfg, wd, config, export_dtype,
                                                      metrics)))


def _export(base_checkpoint, model, cfg, wd, config, export_dtype, metrics) -> str:
    from bye_jax.models import family
    from bye_jax.models.hf_export import save_hf_checkpoint, save_peft_adapter
    from bye_jax.models.lora import merge_lora
    from bye_jax.train.curves import plot_loss_curve
    from bye_jax.train.loop import LOG_FILE

    adapter = Path(config.adapter_dir or wd.path("adapter"))
    if not config.full_finetune:
        projector = family.family_of(model).projector_module
        save_peft_adapter(model, adapter, os.fspath(base_checkpoint), config.lora.rank, config.lora.alpha,
                          modules_to_save=[name for name, on in ((projector, config.train_projector),
                                                                 ("lm_head", config.train_lm_head)) if on] or None)
    merge_lora(model)
    merged = save_hf_checkpoint(model, cfg, base_checkpoint, config.merged_dir or wd.path("merged"),
                                dtype=export_dtype)
    wd.record(*[n for n in ("adapter", "merged") if n in wd.outputs])
    metrics.update(merged_dir=str(merged), adapter_dir=str(adapter), export_dtype=export_dtype)
    wd.write_json("train_metrics.json", metrics, indent=2)
    plot_loss_curve(wd.root / LOG_FILE, wd.path("loss.png"), metrics["steps_per_epoch"])
    wd.record("loss.png")
    return str(merged)


def _num(x) -> str:
    return "nan" if x is None else f"{x:.4f}"


def _run(config, workdir) -> int:
    from bye_jax.runner import load_inputs, require_data

    if not workdir:
        raise UserError("--workdir is required")
    if not config.model:
        raise UserError("config.model is empty: give a Hugging Face checkpoint directory (--config.model=DIR)")
    require_data(config.data)
    check_train_config(config)
    inputs = [config.model, config.data.get("annotations"), config.data.get("keep_ids")]
    claim = lambda: workdirs.claim(workdir, TRAIN_OUTPUTS, inputs=inputs)  # noqa: E731
    with multihost.claim_on_primary(claim, workdir):  # before anything is loaded
        inputs = load_inputs(config)  # the whole split on every process (each builds the same global batches)
        merged = finetune(config.model, inputs.samples, workdir, config)
    if not multihost.is_primary():  # process 0 wrote the outputs and reports them
        return 0
    metrics = json.loads((Path(workdir) / "train_metrics.json").read_text())
    losses, tps = metrics["losses"], metrics["tokens_per_s"]  # strict JSON: NaN was written as null
    print(f"train: {metrics['n_examples']} examples, {metrics['total_steps']} steps"
          + (f" (resumed at {metrics['start_step']})" if metrics["start_step"] else "")
          + (f", loss {_num(losses[0])} -> {_num(losses[-1])}" if losses else "")
          + (f", {tps:,.0f} tokens/s" if tps is not None else ""))
    print("loss per epoch: " + " ".join(_num(x) for x in metrics["epoch_losses"])
          + f" (curve: {Path(workdir) / 'loss.png'})")
    print(f"merged model: {merged}\nadapter: {metrics['adapter_dir']}")
    skipped = [(s.id, s.reason) for s in inputs.skipped] + [tuple(s) for s in metrics["skipped"]]
    for sid, reason in skipped[:20]:
        print(f"  skipped {sid}: {reason}")
    if len(skipped) > 20:
        print(f"  ... {len(skipped) - 20} more")
    return 0


def main() -> None:
    from bye_jax import cli

    cli.define_flags(str(cli.CONFIGS / "train.py"))
    cli.run(_run, "bye_jax.train")


if __name__ == "__main__":
    main()
