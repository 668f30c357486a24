"""The whole provider loop (python -m bye_jax.pipeline): fine-tune on the upload -> BYE filter ->
re-fine-tune from the BASE model on clean.json -> evaluate; plus the paper's Random Drop baseline.

    python -m bye_jax.pipeline --config=bye_jax/configs/pipeline.py --config.model=BASE_CKPT \
        --config.data.annotations=upload.json --config.data.image_root=IMAGES \
        --config.test.annotations=test.json --config.triggered.annotations=test_triggered.json --workdir=OUT

Writes OUT/{vanilla,bye,random_drop}/merged (HF checkpoints), OUT/filter (the filter's outputs),
OUT/results.json ({"detection": {precision, recall, f1}, "vanilla": {cp, asr}, "random_drop": ...,
"bye": ...}) and OUT/results.md. Every stage is cached in OUT, so a rerun resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bye_jax.data.llava_json import DatasetError, load_dataset, write_subset


def _log(msg: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_samples(path: Path, image_root: Path | None = None):
    """The usable samples of a LLaVA-JSON file (skipped ones are logged); UserError if unreadable."""
    from bye_jax.runner import UserError

    try:
        samples, skipped = load_dataset(path, image_root)
    except DatasetError as e:
        raise UserError(str(e)) from e
    if skipped:
        _log(f"{path}: {len(skipped)} samples skipped ({skipped[0].reason})")
    return samples


def _evaluate(config, checkpoint: Path, test, triggered) -> dict:
    from bye_jax.eval.main import evaluate
    from bye_jax.models.hf_loader import load_llava
    from bye_jax.models.inputs import PromptEncoder

    model, _ = load_llava(checkpoint)
    res = evaluate(model, PromptEncoder(checkpoint), test, triggered, target=config.data.target,
                   cp_mode=config.eval.cp_mode, batch_size=config.eval.batch_size,
                   max_new_tokens=config.eval.max_new_tokens)
    res.pop("predictions")
    return res


def _finetune(config, base: Path, samples, workdir: Path, label: str) -> Path:
    from bye_jax.train.main import finetune

    merged = workdir / "merged"
    if (merged / "model.safetensors").exists():
        _log(f"{label}: cached in {merged}")
        return merged
    _log(f"{label}: LoRA fine-tuning on {len(samples)} samples")
    return finetune(base, samples, workdir, config.finetune)


def _checks(results: dict) -> dict[str, bool]:
    """The demo's targets (issue: F1 >= 0.9, ASR after cleaning <= 2%, CP within 2 points)."""
    v, b, det = results["vanilla"], results["bye"], results["detection"]
    return {
        "attack learnt (vanilla ASR >= 50%)": (v["asr"] or 0) >= 50,
        "detection F1 >= 0.9": (det.get("f1") or 0) >= 0.9,
        "ASR after BYE <= 2%": b["asr"] is not None and b["asr"] <= 2,
        "CP after BYE within 2 points of vanilla": None not in (b["cp"], v["cp"]) and b["cp"] >= v["cp"] - 2,
    }


def run_pipeline(config, workdir: Path, base: Path, upload_path: Path, test, triggered, *,
                 upload_root: Path | None = None, dataset: str = "") -> dict:
    """Vanilla FT, BYE and Random Drop from `base` on the upload; returns the results dict."""
    from bye_jax.detect import detect, precision_recall_f1
    from bye_jax.eval.tables import results_markdown, write_results
    from bye_jax.runner import run_filter, summary

    t0 = time.time()
    workdir = Path(workdir)
    upload = load_samples(upload_path, upload_root)
    image_root = Path(upload_root) if upload_root else upload_path.parent
    vanilla = _finetune(config, base, upload, workdir / "vanilla", "vanilla")

    fcfg = config  # the filter reads model / data / detect / batch_size keys of this config
    with fcfg.unlocked():
        fcfg.model = str(vanilla)
        fcfg.data.annotations = str(upload_path)
        fcfg.data.image_root = str(image_root)
    cached = workdir / "filter" / "report.json"
    if cached.exists() and (workdir / "filter" / "clean.json").exists():
        _log(f"BYE filter: cached in {cached.parent}")
        report = json.loads(cached.read_text())
    else:
        _log("BYE: extracting attention entropies from the fine-tuned model")
        report = run_filter(fcfg, workdir / "filter")
    print(summary(report, workdir / "filter"))
    other = "official" if config.detect.rule != "official" else "paper"
    table = np.load(workdir / "filter" / "entropy.npy")
    ids = json.loads((workdir / "filter" / "entropy_ids.json").read_text())
    alt = detect(table, ids, other, config.detect.tau, params=dict(config.detect.get(other) or {}), seed=config.seed)
    truth = [s.id for s in upload if s.poisoned]
    alt_prf = precision_recall_f1(alt.flagged_ids, truth)
    print(f"for comparison, the {other} rule on the same matrix: sensitive layers {alt.sensitive_layers or 'none'}, "
          f"{alt.n_flagged} flagged, F1 {alt_prf['f1']:.3f}" + (f" ({alt.reason})" if alt.reason else ""))

    clean = load_samples(workdir / "filter" / "clean.json", image_root)  # image paths are relative to the upload
    bye = _finetune(config, base, clean, workdir / "bye", "BYE")

    rng = np.random.default_rng(config.seed)
    keep = np.sort(rng.permutation(len(upload))[: int(round(len(upload) * (1 - config.data.random_drop)))])
    drop_json = workdir / "random_drop" / "train.json"
    if not drop_json.exists():
        drop_json.parent.mkdir(parents=True, exist_ok=True)
        write_subset([upload[i].raw for i in keep], drop_json, protect=[upload_path])
    dropped = [upload[i] for i in keep]
    random_drop = _finetune(config, base, dropped, workdir / "random_drop", "random drop")

    results = {"dataset": dataset} if dataset else {}
    for key, ckpt in (("vanilla", vanilla), ("random_drop", random_drop), ("bye", bye)):
        _log(f"evaluating {key}")
        r = _evaluate(config, ckpt, test, triggered)
        results[key] = {"cp": r["cp"], "asr": r["asr"]}
    results["base"] = {k: v for k, v in _evaluate(config, base, test, triggered).items() if k in ("cp", "asr")}
    results["detection"] = {k: report.get(k) for k in ("precision", "recall", "f1")}
    results[f"detection_{other}_rule"] = {k: alt_prf[k] for k in ("precision", "recall", "f1")}
    results["seconds"] = round(time.time() - t0, 1)
    results["checks"] = _checks(results)
    write_results(results, workdir)
    print(results_markdown(results))
    for name, ok in results["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not results["checks"]["attack learnt (vanilla ASR >= 50%)"]:
        print("WARNING: the vanilla fine-tune did not learn the backdoor, so there is no backdoor for BYE to "
              "find in this run: read the detection numbers as what BYE flags on a model without one.")
    base_cp, base_asr = results["base"]["cp"], results["base"]["asr"]
    print(f"base model before fine-tuning: CP {base_cp}  ASR {base_asr}")
    print(f"finished in {results['seconds']:.0f}s; results in {workdir / 'results.json'} and results.md, "
          f"plots in {workdir / 'filter'}")
    return results


def main() -> None:
    from bye_jax import cli
    from bye_jax.runner import UserError

    def _run(config, workdir):
        if not workdir:
            raise UserError("--workdir is required")
        for key in ("model", "data.annotations", "test.annotations", "triggered.annotations"):
            node = config
            for part in key.split("."):
                node = node[part]
            if not node:
                raise UserError(f"config.{key} is empty")
        test, triggered = (load_samples(Path(sec.annotations), Path(sec.image_root) if sec.image_root else None)
                           for sec in (config.test, config.triggered))
        run_pipeline(config, Path(workdir), Path(config.model), Path(config.data.annotations), test, triggered,
                     upload_root=Path(config.data.image_root) if config.data.image_root else None)
        return 0

    cli.define_flags(str(cli.CONFIGS / "pipeline.py"))
    cli.run(_run, "bye_jax.pipeline")


if __name__ == "__main__":
    main()

