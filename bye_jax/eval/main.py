"""CP / ASR evaluation of a fine-tuned LLaVA checkpoint (python -m bye_jax.eval).

    python -m bye_jax.eval --config=bye_jax/configs/eval.py --config.model=CKPT \
        --config.test.annotations=test.json --config.triggered.annotations=trig/test_triggered.json \
        [--config.report=scan/report.json] --workdir=OUT

CP: percent of clean test samples whose greedy answer matches the first gpt answer (``cp_mode``);
ASR: percent of triggered test samples whose answer contains the target text. Writes
OUT/eval.json (``cp``, ``asr`` in percent, ``n_test``, ``n_triggered``, ``detection`` precision /
recall / f1 as fractions in [0, 1] when ``report`` is given, ``units``, and the settings) and
OUT/predictions.jsonl (one line per sample: split, id, question, prediction, reference, and
``correct`` / ``attack_success``). A metric over an empty set is null.
Test samples without a gpt answer, and images that fail to decode at generation time, are
listed under ``skipped`` and left out of the counts.

Over several processes (bye_jax/multihost.py) each process generates for its share of the batches
(bye_jax/eval/generate.py) and process 0 alone claims the workdir and writes both files, the same
files a one-process run writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from bye_jax import multihost
from bye_jax.configs.runtime import prompt_options
from bye_jax.data.llava_json import DEFAULT_MAX_IMAGE_PIXELS, Sample, Skipped
from bye_jax.data.poison import DEFAULT_TARGET
from bye_jax.errors import UserError
from bye_jax.eval.generate import generate_answers
from bye_jax.eval.metrics import CP_MODES, UNITS, attack_success_rate, clean_performance, detection_metrics
from bye_jax.jsonio import dump_json

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval.py"
EVAL_OUTPUTS = ("eval.json", "predictions.jsonl")


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def evaluate(model, encoder, test_samples: Sequence[Sample], triggered_samples: Sequence[Sample], *,
             target: str = DEFAULT_TARGET, cp_mode: str = "exact", batch_size: int = 8, max_new_tokens: int = 32,
             length_bucket: int = 32, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
             progress: bool = False) -> dict:
    """Greedy answers for both sets -> ``{cp, asr, n_test, n_triggered, cp_mode, target, n_skipped,
    skipped, predictions}`` (percent; None for an empty set; ``predictions``: one dict per sample)."""
    if cp_mode not in CP_MODES:
        raise ValueError(f"cp_mode must be one of {', '.join(CP_MODES)}, got {cp_mode!r}")
    if not target or not target.strip():
        raise ValueError("the target text is empty")
    skipped: list[Skipped] = [Skipped(s.id, s.index, "no gpt answer to compare with")
                              for s in test_samples if s.answer is None]
    test = [s for s in test_samples if s.answer is not None]
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, length_bucket=length_bucket,
              progress=progress, skipped=skipped, max_image_pixels=max_image_pixels)
    test_out = generate_answers(model, encoder, test, desc="test", **kw) if test else {}
    trig_out = generate_answers(model, encoder, triggered_samples, desc="triggered", **kw) if triggered_samples else {}

    refs = {s.id: s.answer for s in test if s.id in test_out}
    match = CP_MODES[cp_mode]
    rows = [{"split": "test", "id": s.id, "question": s.question, "prediction": test_out[s.id],
             "reference": s.answer, "correct": bool(match(test_out[s.id], s.answer))}
            for s in test if s.id in test_out]
    needle = " ".join(target.split()).casefold()
    rows += [{"split": "triggered", "id": s.id, "question": s.question, "prediction": trig_out[s.id],
              "reference": s.answer, "attack_success": needle in " ".join(trig_out[s.id].split()).casefold()}
             for s in triggered_samples if s.id in trig_out]
    return {
        "cp": _nan_to_none(clean_performance(test_out, refs, mode=cp_mode)),
        "asr": _nan_to_none(attack_success_rate(trig_out, target)),
        "n_test": len(refs),
        "n_triggered": len(trig_out),
        "cp_mode": cp_mode,
        "target": target,
        "n_skipped": len(skipped),
        "skipped": [{"id": s.id, "index": s.index, "reason": s.reason} for s in skipped],
        "predictions": rows,
    }


# ------------------------------------------------------------------------------------------- command


def _check_config(config) -> None:
    if config.dtype not in ("float32", "bfloat16"):
        raise UserError(f"config.dtype must be float32 or bfloat16, got {config.dtype!r}")
    if config.batch_size < 1:
        raise UserError(f"config.batch_size must be >= 1, got {config.batch_size}")
    if config.max_new_tokens < 1:
        raise UserError(f"config.max_new_tokens must be >= 1, got {config.max_new_tokens}")
    if config.cp_mode not in CP_MODES:
        raise UserError(f"config.cp_mode must be one of {', '.join(CP_MODES)}, got {config.cp_mode!r}")
    if not config.target.strip():
        raise UserError("config.target is empty")
    if not config.model:
        raise UserError("config.model is empty: give a Hugging Face LLaVA checkpoint directory (--config.model=DIR)")
    try:
        prompt_options(config)
    except ValueError as e:
        raise UserError(f"config.{e}") from e
    if not _has_data(config.test, "test") and not _has_data(config.triggered, "triggered"):
        raise UserError("nothing to evaluate: set config.test.annotations and/or config.triggered.annotations "
                        "(or their .source=tfds and .tfds.name / .tfds.builder_dir)")
    from bye_jax.parallel import check_attn_impl

    try:
        check_attn_impl(config.attn_impl, config.dtype)
    except ValueError as e:
        raise UserError(f"config.{e}") from e


def _has_data(section, name: str) -> bool:
    from bye_jax.data.llava_json import DatasetError
    from bye_jax.data.sources import is_configured
    try:
        return is_configured(section)
    except DatasetError as e:  # a bad source name
        raise UserError(f"config.{name}.{e}") from e


def _load_split(section, name: str, max_image_pixels) -> tuple[list[Sample], list[Skipped]]:
    from bye_jax.runner import load_section

    inputs = load_section(section, max_image_pixels=max_image_pixels, where=f"config.{name}")
    return inputs.samples, inputs.skipped


def load_model(checkpoint, *, dtype: str = "float32", attn_impl: str = "auto", prompt: dict | None = None):
    """(model, PromptEncoder) of a HF checkpoint of any registered family (`prompt`: load_encoder's
    template / image_aspect); UserError with a one-line reason if it does not load."""
    from bye_jax.models import family
    from bye_jax.models.config import ConfigError
    from bye_jax.models.hf_loader import CheckpointError
    from bye_jax.models.safetensors_io import SafetensorsError
    impl = None if attn_impl == "auto" else attn_impl
    try:
        model, cfg = family.load_model(checkpoint, dtype=dtype, attn_impl=impl)
        encoder = family.load_encoder(checkpoint, **(prompt or {}))
    except (CheckpointError, ConfigError, SafetensorsError, OSError) as e:
        raise UserError(f"checkpoint {checkpoint} does not load: {' '.join(str(e).split())}") from e
    except ValueError as e:
        raise UserError(f"checkpoint {checkpoint}: {' '.join(str(e).split())}") from e
    if encoder.image_token_id != cfg.image_token_id:
        raise UserError(f"checkpoint {checkpoint}: processor image token {encoder.image_token_id} != model "
                        f"image_token_id {cfg.image_token_id}")
    return model, encoder


def write_eval(workdir: str | Path, result: dict, rows: Sequence[dict]) -> None:
    """workdir/predictions.jsonl (one row per sample), then workdir/eval.json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "predictions.jsonl", "w", encoding="utf-8") as f:  # strict JSON: NaN / Inf -> null
        for row in rows:
            f.write(dump_json(row, ensure_ascii=False) + "\n")
    (workdir / "eval.json").write_text(dump_json(result, indent=2, ensure_ascii=False))


def run_eval(config, workdir: str | Path, *, progress: bool = True) -> dict:
    """The eval command as a library call: writes workdir/eval.json and predictions.jsonl (process 0);
    returns eval.json's dict (on every process)."""
    from bye_jax import workdir as workdirs

    t0 = time.time()
    _check_config(config)
    inputs = [config.model, config.report] + [sec.get(k) for sec in (config.test, config.triggered)
                                              for k in ("annotations", "keep_ids")]
    claim = lambda: workdirs.claim(workdir, EVAL_OUTPUTS, inputs=inputs)  # noqa: E731
    with multihost.claim_on_primary(claim, workdir) as wd:  # before anything is loaded; process 0 writes
        return _run_eval(config, wd, t0, progress)


def _run_eval(config, wd, t0: float, progress: bool) -> dict:
    test, test_skipped = _load_split(config.test, "test", config.max_image_pixels)
    trig, trig_skipped = _load_split(config.triggered, "triggered", config.max_image_pixels)
    wd.protect(s.image_path for s in (*test, *trig))
    detection = None
    if config.report:
        try:
            detection = detection_metrics(config.report)
        except ValueError as e:
            raise UserError(f"config.report: {e}") from e
    model, encoder = load_model(config.model, dtype=config.dtype, attn_impl=config.attn_impl,
                                prompt=prompt_options(config))
    try:
        result = evaluate(model, encoder, test, trig, target=config.target, cp_mode=config.cp_mode,
                          batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                          length_bucket=config.length_bucket, max_image_pixels=config.max_image_pixels,
                          progress=progress)
    except ValueError as e:
        raise UserError(" ".join(str(e).split())) from e
    rows = result.pop("predictions")
    loaded = [{"id": s.id, "index": s.index, "reason": s.reason, "split": split}
              for split, group in (("test", test_skipped), ("triggered", trig_skipped)) for s in group]
    result["skipped"] = loaded + result["skipped"]
    result["n_skipped"] = len(result["skipped"])
    if detection is not None:
        result["detection"] = detection
    result["units"] = dict(UNITS)
    result.update(model=str(config.model), max_new_tokens=int(config.max_new_tokens),
                  seconds=round(time.time() - t0, 2))
    if not multihost.is_primary():
        return result
    wd.write_text("predictions.jsonl", "".join(dump_json(row, ensure_ascii=False) + "\n" for row in rows))
    wd.write_json("eval.json", result, indent=2, ensure_ascii=False)
    return result


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _run(config, workdir) -> int:
    if not workdir:
        raise UserError("--workdir is required")
    r = run_eval(config, workdir)
    if not multihost.is_primary():  # process 0 wrote the files and reports them
        return 0
    line = (f"eval: CP {_fmt(r['cp'])} ({r['cp_mode']}, {r['n_test']} samples)  ASR {_fmt(r['asr'])} "
            f"({r['n_triggered']} triggered)")
    if "detection" in r:
        d = r["detection"]
        line += f"  detection P {d['precision']:.3f} R {d['recall']:.3f} F1 {d['f1']:.3f}"
    print(line)
    for s in r["skipped"][:20]:
        print(f"  skipped {s['id']}: {s['reason']}")
    print(f"outputs in {workdir}: eval.json, predictions.jsonl")
    return 0


def main() -> None:
    from bye_jax import cli

    cli.define_flags(str(CONFIG))
    cli.run(_run, "bye_jax.eval")


if __name__ == "__main__":
    main()
