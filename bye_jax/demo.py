"""The built-in demo: the whole BYE loop on a synthetic benchmark, nothing downloaded.

synthetic shapes VQA -> poison 10% of the upload (centre patch) -> small LLaVA built from scratch and
pre-trained on clean data (cached) -> LoRA fine-tune on the upload (vanilla) -> BYE filter ->
re-fine-tune from the base on clean.json (BYE) and on a random 80% (Random Drop) -> CP / ASR of all
three -> results.json / results.md. The model is a small stand-in for LLaVA-1.5, not the paper's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bye_jax.data.llava_json import load_dataset, write_subset


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load(path: Path, image_root: Path | None = None):
    samples, skipped = load_dataset(path, image_root)
    if skipped:
        _log(f"{path}: {len(skipped)} samples skipped ({skipped[0].reason})")
    return samples


def prepare_data(config, data_dir: Path) -> dict[str, Path]:
    """Synthetic splits + the poisoned upload + the triggered test set (each cached)."""
    from bye_jax.data.poison import poison_dataset, triggered_test_set
    from bye_jax.data.synthetic import write_benchmark
    from bye_jax.data.triggers import TriggerSpec

    d, seed = config.data, config.seed
    paths = {}
    for name, n, s in (("pretrain", d.n_pretrain, seed + 1), ("upload_clean", d.n_upload, seed + 2),
                       ("test", d.n_test, seed + 3)):
        ann = data_dir / name / "annotations.json"
        if not ann.exists():
            write_benchmark(data_dir / name, n, seed=s, prefix=f"{name[:2]}")
        paths[name] = ann
    spec = TriggerSpec(kind=d.trigger)
    upload = data_dir / "upload" / "train.json"
    if not upload.exists():
        summary = poison_dataset(paths["upload_clean"], data_dir / "upload", spec, rate=d.poison_rate, seed=seed,
                                 target=d.target, overwrite=True)
        _log(f"upload: {summary['n_samples']} samples, {summary['n_poisoned']} poisoned with '{d.trigger}'")
    paths["upload"] = upload
    trig = data_dir / "test_triggered" / "test_triggered.json"
    if not trig.exists():
        triggered_test_set(paths["test"], data_dir / "test_triggered", spec, overwrite=True)
    paths["test_triggered"] = trig
    return paths


def build_base(config, paths: dict[str, Path], out: Path) -> Path:
    """A new LLaVA-architecture HF checkpoint, pre-trained on clean data; cached in `out`."""
    if (out / "model.safetensors").exists():
        _log(f"base model: cached in {out}")
        return out
    from flax import nnx

    from bye_jax.data.synthetic import vocabulary_corpus
    from bye_jax.models.build import write_llava_checkpoint_files
    from bye_jax.models.config import load_config
    from bye_jax.models.hf_export import save_hf_checkpoint
    from bye_jax.models.inputs import PromptEncoder
    from bye_jax.models.llava import LlavaForConditionalGeneration
    from bye_jax.runner import UserError
    from bye_jax.train.loop import train

    staging = out.with_name(out.name + ".tmp")
    write_llava_checkpoint_files(staging, corpus=vocabulary_corpus((config.data.target,)), **config.arch)
    cfg = load_config(staging)
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(config.seed))
    samples = _load(paths["pretrain"])
    _log(f"pre-training the base model on {len(samples)} clean samples")
    try:
        metrics = train(model, cfg, samples, PromptEncoder(staging), config=config.pretrain,
                        workdir=out.with_name(out.name + "_pretrain"))
    except ValueError as e:
        raise UserError(f"pre-training: {str(e).splitlines()[0]}") from e
    _log(f"pre-training loss {metrics['losses'][0]:.3f} -> {metrics['losses'][-1]:.3f}")
    save_hf_checkpoint(model, cfg, staging, staging, dtype="float32")
    staging.rename(out)
    return out


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


def run_demo(config, workdir: Path) -> int:
    from bye_jax.detect import detect, precision_recall_f1
    from bye_jax.eval.tables import results_markdown, write_results
    from bye_jax.runner import run_filter, summary

    t0 = time.time()
    workdir = Path(workdir)
    paths = prepare_data(config, workdir / "data")
    base = build_base(config, paths, workdir / "base")
    upload = _load(paths["upload"])
    test, triggered = _load(paths["test"]), _load(paths["test_triggered"])

    vanilla = _finetune(config, base, upload, workdir / "vanilla", "vanilla")

    fcfg = config  # the filter reads model / data / detect / batch_size keys of this config
    with fcfg.unlocked():
        fcfg.model = str(vanilla)
        fcfg.data.annotations = str(paths["upload"])
        fcfg.data.image_root = ""
    cached = workdir / "filter" / "report.json"
    if cached.exists() and (workdir / "filter" / "clean.json").exists():
        _log(f"BYE filter: cached in {cached.parent}")
        report = json.loads(cached.read_text())
    else:
        _log("BYE: extracting attention entropies from the fine-tuned model")
        report = run_filter(fcfg, workdir / "filter")
    print(summary(report, workdir / "filter"))
    other = "paper" if config.detect.rule != "paper" else "official"
    table = np.load(workdir / "filter" / "entropy.npy")
    ids = json.loads((workdir / "filter" / "entropy_ids.json").read_text())
    alt = detect(table, ids, other, config.detect.tau, seed=config.seed)
    truth = [s.id for s in upload if s.poisoned]
    alt_prf = precision_recall_f1(alt.flagged_ids, truth)
    print(f"for comparison, the {other} rule on the same matrix: sensitive layers {alt.sensitive_layers or 'none'}, "
          f"{alt.n_flagged} flagged, F1 {alt_prf['f1']:.3f}" + (f" ({alt.reason})" if alt.reason else ""))

    clean = _load(workdir / "filter" / "clean.json", paths["upload"].parent)  # paths relative to the upload
    bye = _finetune(config, base, clean, workdir / "bye", "BYE")

    rng = np.random.default_rng(config.seed)
    keep = np.sort(rng.permutation(len(upload))[: int(round(len(upload) * (1 - config.data.random_drop)))])
    drop_json = workdir / "random_drop" / "train.json"
    if not drop_json.exists():
        drop_json.parent.mkdir(parents=True, exist_ok=True)
        write_subset([upload[i].raw for i in keep], drop_json, protect=[paths["upload"]])
    dropped = [upload[i] for i in keep]
    random_drop = _finetune(config, base, dropped, workdir / "random_drop", "random drop")

    results = {"dataset": "synthetic shapes VQA (built-in demo), 10% poisoned, centre patch"}
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
    print(f"base model before fine-tuning: CP {results['base']['cp']:.1f}  ASR {results['base']['asr']:.1f}")
    print(f"demo finished in {results['seconds']:.0f}s; results in {workdir / 'results.json'} and results.md, "
          f"plots in {workdir / 'filter'}")
    return 0
