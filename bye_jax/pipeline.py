"""The whole provider loop (python -m bye_jax.pipeline): fine-tune on the upload -> BYE filter ->
re-fine-tune from the BASE model on clean.json -> evaluate; plus the paper's Random Drop baseline.

    python -m bye_jax.pipeline --config=bye_jax/configs/pipeline.py --config.model=BASE_CKPT \
        --config.data.annotations=upload.json --config.data.image_root=IMAGES \
        --config.test.annotations=test.json --config.triggered.annotations=test_triggered.json --workdir=OUT

Any data section may be TFDS instead (``.source=tfds``, as for the filter); the BYE re-fine-tune then
re-selects the upload's samples by the ids in clean.json (``data.keep_ids``).

Writes OUT/{vanilla,bye,random_drop}/merged (HF checkpoints), OUT/filter (the filter's outputs),
OUT/eval/{vanilla,random_drop,bye,base}/eval.json + predictions.jsonl, OUT/results.json and
OUT/results.md. results.json: ``cp`` / ``asr`` in percent, ``detection`` precision / recall / f1 as
fractions in [0, 1] (its ``units`` entry says so; results.md shows percent).

Every stage records what it was built from (bye_jax/stages.py, a stage.json in its folder) and is reused
on a rerun only while that is unchanged: a changed ``finetune.*`` reruns every fine-tune, a changed
``detect.*`` reruns the filter (not the extraction, not the vanilla fine-tune, not Random Drop), and
whatever reads a stage's output reruns when that output changed (the BYE fine-tune when clean.json
lists other samples), each evaluation when its model or ``eval.*`` changed. Settings that change neither
results nor samples (checkpoint frequency, output folders, the filter's batch sizes) are left out.

Over several processes (bye_jax/multihost.py; every process runs the same command) each stage runs as
its command does: the fine-tunes on one mesh over every process's devices, the extraction and the
evaluations each process on its share; process 0 alone decides which stages are cached, detects, and
writes every record and output, and the others wait for it wherever they read what it wrote (the
merged models, clean.json). The workdir must then be on a filesystem every host sees.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from bye_jax import multihost
from bye_jax import workdir as workdirs
from bye_jax.configs.runtime import prompt_items, prompt_options
from bye_jax.data.llava_json import DatasetError, load_dataset, write_subset
from bye_jax.errors import UserError, one_line
from bye_jax.eval.metrics import UNITS
from bye_jax.stages import FileDigests, Stage, config_items, digest_samples

EVAL_ROWS = ("vanilla", "random_drop", "bye", "base")
STAGES = ("vanilla", "filter", "bye", "random_drop", "eval")  # folders in the workdir, one per stage
OUTPUTS = STAGES + ("results.json", "results.md", "digests.json")
# finetune.* keys that do not change a fine-tune's result (the samples come from the pipeline)
FINETUNE_BOOKKEEPING = ("finetune.model", "finetune.data.annotations", "finetune.data.image_root",
                        "finetune.data.source", "finetune.data.keep_ids", "finetune.data.tfds",
                        "finetune.checkpoint_every", "finetune.keep_checkpoints", "finetune.merged_dir",
                        "finetune.adapter_dir", "finetune.mesh")


def _log(msg: str) -> None:
    if multihost.is_primary():
        print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _primary(fn, *, share: bool = True):
    """fn() on process 0 alone (it writes the workdir), the others waiting for it; see
    `multihost.from_primary`."""
    return multihost.from_primary(fn, share=share)


def load_samples(path: Path, image_root: Path | None = None):
    """The usable samples of a LLaVA-JSON file (skipped ones are logged); UserError if unreadable."""
    try:
        samples, skipped = load_dataset(path, image_root)
    except DatasetError as e:
        raise UserError(str(e)) from e
    if skipped:
        _log(f"{path}: {len(skipped)} samples skipped ({skipped[0].reason})")
    return samples


def load_split(section, where: str, max_image_pixels: int | None):
    """The usable samples of a data section (LLaVA JSON or TFDS; skipped ones are logged)."""
    from bye_jax.runner import load_section

    inputs = load_section(section, max_image_pixels=max_image_pixels, where=where)
    if inputs.skipped:
        _log(f"{inputs.label}: {len(inputs.skipped)} samples skipped ({inputs.skipped[0].reason})")
    return inputs


def _require(section, where: str) -> None:
    from bye_jax.data.sources import is_configured, missing_message, source_of
    try:
        if is_configured(section):
            return
        message = missing_message(section, where) if source_of(section) == "tfds" else f"{where}.annotations is empty"
    except DatasetError as e:
        raise UserError(f"{where}.{e}") from e
    raise UserError(message)


def check_config(config) -> None:
    """Up-front checks of the filter, fine-tune and eval settings (UserError with a one-line reason), so
    a bad key fails before hours of fine-tuning rather than after."""
    from bye_jax.eval.metrics import CP_MODES
    from bye_jax.runner import _check_config as check_filter_config
    from bye_jax.runner import check_devices
    from bye_jax.train.loop import check_config as check_train_config
    from bye_jax.train.loop import resolve_config

    check_filter_config(config, need_model=False)
    check_devices(config)
    from bye_jax.parallel import check_attn_impl

    try:
        finetune = resolve_config(config.finetune)
        check_train_config(finetune)
        check_attn_impl(finetune.attn_impl, finetune.dtype)
    except ValueError as e:
        raise UserError(f"config.finetune.{e}") from e
    ev = config.eval
    if ev.cp_mode not in CP_MODES:
        raise UserError(f"config.eval.cp_mode must be one of {', '.join(CP_MODES)}, got {ev.cp_mode!r}")
    if ev.batch_size < 1 or ev.max_new_tokens < 1:
        raise UserError(f"config.eval.batch_size and max_new_tokens must be >= 1, got {ev.batch_size} and "
                        f"{ev.max_new_tokens}")
    if not str(config.data.target).strip():
        raise UserError("config.data.target is empty")
    if not 0 <= config.data.random_drop < 1:
        raise UserError(f"config.data.random_drop must be in [0, 1), got {config.data.random_drop}")


def finetune_config(config):
    """The fine-tune's config: `finetune.*` with the pipeline's `prompt` (one prompt format for every stage)."""
    ft = config.finetune.copy_and_resolve_references()
    with ft.unlocked():
        ft.prompt = ml_collections.ConfigDict(prompt_options(config))
    return ft


def _finetune(config, base: Path, base_digest: str, samples, workdir: Path, label: str) -> tuple[Path, str]:
    """A cached LoRA fine-tune from `base`; returns the merged checkpoint and the stage digest."""
    from bye_jax.train.main import finetune

    stage = Stage(workdir, label, config_items(config, "finetune", exclude=FINETUNE_BOOKKEEPING) | prompt_items(config),
                  {"base": base_digest, "samples": digest_samples(samples)})
    merged = workdir / "merged"
    outputs = [workdir / n for n in ("checkpoints", "merged", "adapter", "train_log.jsonl", "train_metrics.json")]
    if not _primary(lambda: stage.prepare(outputs, log=_log)):
        _log(f"{label}: LoRA fine-tuning on {len(samples)} samples")
        finetune(base, samples, workdir, finetune_config(config))  # returns once process 0 wrote `merged`
        _primary(lambda: stage.done({"n_samples": len(samples)}))
    return merged, stage.digest


def _evaluate(config, key: str, checkpoint: Path, model_digest: str, test, triggered, workdir: Path) -> dict:
    """CP / ASR of a checkpoint (cached in workdir/eval/KEY), in config.dtype / attn_impl."""
    from bye_jax.eval.main import evaluate, load_model, write_eval
    stage = Stage(workdir / "eval" / key, f"evaluation of {key}",
                  config_items(config, "eval", "data.target", "dtype", "attn_impl", "length_bucket",
                               "data.max_image_pixels") | prompt_items(config),
                  {"model": model_digest, "test": digest_samples(test), "triggered": digest_samples(triggered)})
    out = stage.dir / "eval.json"
    cached = _primary(lambda: json.loads(out.read_text()) if stage.prepare([out, stage.dir / "predictions.jsonl"],
                                                                            log=_log) else None)
    if cached is not None:
        return cached
    _log(f"evaluating {key}")
    model, encoder = load_model(checkpoint, dtype=config.dtype, attn_impl=config.attn_impl,
                                prompt=prompt_options(config))
    try:
        result = evaluate(model, encoder, test, triggered, target=config.data.target, cp_mode=config.eval.cp_mode,
                          batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens,
                          length_bucket=config.length_bucket, max_image_pixels=config.data.max_image_pixels or None,
                          progress=True)
    except ValueError as e:
        raise UserError(f"evaluating {checkpoint}: {one_line(e)}") from e
    rows = result.pop("predictions")
    result.update(model=str(checkpoint), max_new_tokens=int(config.eval.max_new_tokens))
    def write() -> None:
        write_eval(stage.dir, result, rows)
        stage.done({"cp": result["cp"], "asr": result["asr"]})

    _primary(write)  # the answers are every process's (gathered); process 0 writes them
    return result


def _filter(config, vanilla: Path, vanilla_digest: str, upload, workdir: Path) -> dict:
    """The BYE filter on the vanilla model, cached in two stages: the entropies, then detection and the
    outputs (a changed detect.* reuses the entropies); returns the report."""
    from bye_jax.runner import run_filter, summary

    fdir = workdir / "filter"
    entropies = Stage(fdir, "attention entropies",
                      config_items(config, "dtype", "attn_impl", "data.max_image_pixels") | prompt_items(config),
                      {"model": vanilla_digest, "samples": digest_samples(upload)}, record="entropy_stage.json")
    stage = Stage(fdir, "BYE filter", config_items(config, "detect", "seed", "plots"),
                  {"entropies": entropies.digest})

    def plan() -> dict:  # process 0: what is cached
        if entropies.state() == "done" and stage.prepare(log=_log):
            report = json.loads((fdir / "report.json").read_text())
            print(summary(report, fdir))
            return {"cached": True}
        extract_files = ("entropy.jsonl", "entropy.npy", "entropy_ids.json", "signals.npz", "signals_parts",
                         "extract_manifest.json")
        extract = not entropies.prepare([fdir / n for n in extract_files], log=_log)
        stage.prepare([fdir / n for n in ("report.json", "clean.json", "flagged.json", "layer_separation.png",
                                          "scores.png", "attention_heatmaps.png")])
        return {"cached": False, "extract": extract}

    todo = _primary(plan)
    if todo["cached"]:
        return _primary(lambda: json.loads((fdir / "report.json").read_text()), share=False)
    fcfg = _copy(config)  # the filter reads model / data / detect / batch_size keys
    fcfg.model, fcfg.entropy_file = str(vanilla), ""  # entropies of the vanilla model, extracted here
    _log("BYE: attention entropies of the fine-tuned model, then detection")
    report = run_filter(fcfg, fdir)  # every process extracts its part; returns once process 0 wrote the outputs

    def finish() -> dict:
        if todo["extract"]:
            entropies.done({"n_samples": report["n_samples"]})
        stage.done({"n_flagged": report["n_flagged"]})
        print(summary(report, fdir))
        return report

    return _primary(finish, share=False)


def _checks(results: dict) -> dict[str, bool]:
    """The demo's targets (issue: F1 >= 0.9, ASR after cleaning <= 2%, CP within 2 points)."""
    v, b, det = results["vanilla"], results["bye"], results["detection"]
    return {
        "attack learnt (vanilla ASR >= 50%)": (v["asr"] or 0) >= 50,
        "detection F1 >= 0.9": (det.get("f1") or 0) >= 0.9,
        "ASR after BYE <= 2%": b["asr"] is not None and b["asr"] <= 2,
        "CP after BYE within 2 points of vanilla": None not in (b["cp"], v["cp"]) and b["cp"] >= v["cp"] - 2,
    }


def _copy(config):
    config = config.copy_and_resolve_references()
    config.unlock()
    return config


def run_pipeline(config, workdir: Path, base: Path, upload_path: Path | None, test, triggered, *,
                 upload_root: Path | None = None, dataset: str = "") -> dict:
    """Vanilla FT, BYE and Random Drop from `base`; returns the results dict (None on processes other
    than 0). The upload is the LLaVA JSON file `upload_path`, or with None the data section config.data
    (LLaVA JSON or TFDS). `config` is not modified. Refuses (one line) outputs of the workdir it did not
    write."""
    inputs = [base] + ([upload_path] if upload_path is not None else [])
    with claim_pipeline(workdir, OUTPUTS, inputs) as wd, wd.writing(*STAGES, "digests.json"):
        return _run_pipeline(config, workdir, base, upload_path, test, triggered, upload_root, dataset, wd)


def claim_pipeline(workdir, outputs, inputs=()):
    """Process 0's claim of the workdir with the ownership checks of every stage (`check_stages`; a
    failure is raised on every process); a stand-in that writes nothing on the other processes."""
    def claim():
        wd = workdirs.claim(workdir, outputs, inputs=inputs)
        try:
            check_stages(Path(workdir))
        except BaseException:
            wd.release()
            raise
        return wd

    return multihost.claim_on_primary(claim, workdir)


def check_stages(workdir: Path) -> None:
    """The ownership checks of every stage's outputs, before the first stage starts (one line)."""
    from bye_jax.runner import FILTER_OUTPUTS
    from bye_jax.train.main import TRAIN_OUTPUTS

    for stage in ("vanilla", "filter", "bye", "random_drop"):
        outputs = FILTER_OUTPUTS if stage == "filter" else TRAIN_OUTPUTS + ("adapter", "merged")
        workdirs.check(Path(workdir) / stage, outputs + (("train.json",) if stage == "random_drop" else ()))


def _run_pipeline(config, workdir, base, upload_path, test, triggered, upload_root, dataset, wd) -> dict:
    from bye_jax.detect import detect, precision_recall_f1
    from bye_jax.eval.tables import results_markdown, write_results

    t0 = time.time()
    config = _copy(config)
    config.finetune.merged_dir = config.finetune.adapter_dir = ""  # each fine-tune writes into its own folder
    if upload_path is not None:
        config.data.source, config.data.keep_ids = "llava_json", ""
        config.data.annotations = str(upload_path)
        config.data.image_root = str(upload_root or Path(upload_path).parent)
    _require(config.data, "config.data")
    check_config(config)
    workdir = Path(workdir)
    pixels = config.data.max_image_pixels or None
    uploaded = load_split(config.data, "config.data", pixels)
    upload = uploaded.samples

    def digest_base() -> str:  # process 0 (it keeps the memo of file digests)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            return FileDigests(workdir / "digests.json").path(base)
        except OSError as e:
            raise UserError(f"base checkpoint {base}: {e.strerror or e}") from e

    base_digest = _primary(digest_base)
    vanilla, vanilla_digest = _finetune(config, base, base_digest, upload, workdir / "vanilla", "vanilla")

    report = _filter(config, vanilla, vanilla_digest, upload, workdir)  # None on processes other than 0
    other = "official" if config.detect.rule != "official" else "paper"

    def compare() -> dict:  # process 0: the other rule on the same matrix
        table = np.load(workdir / "filter" / "entropy.npy")
        ids = json.loads((workdir / "filter" / "entropy_ids.json").read_text())
        alt = detect(table, ids, other, config.detect.tau, params=dict(config.detect.get(other) or {}),
                     seed=config.seed)
        alt_prf = precision_recall_f1(alt.flagged_ids, [s.id for s in upload if s.poisoned])
        print(f"for comparison, the {other} rule on the same matrix: sensitive layers "
              f"{alt.sensitive_layers or 'none'}, {alt.n_flagged} flagged, F1 {alt_prf['f1']:.3f}"
              + (f" ({alt.reason})" if alt.reason else ""))
        return alt_prf

    alt_prf = _primary(compare, share=False)

    clean_section = config.data.copy_and_resolve_references()  # the upload's samples listed in clean.json
    clean_section.keep_ids = str(workdir / "filter" / "clean.json")
    clean = load_split(clean_section, "clean.json of the filter", pixels).samples
    bye, bye_digest = _finetune(config, base, base_digest, clean, workdir / "bye", "BYE")

    models = {"vanilla": (vanilla, vanilla_digest), "bye": (bye, bye_digest), "base": (Path(base), base_digest)}
    if config.data.random_drop > 0:  # 0: no Random Drop baseline
        models["random_drop"] = _random_drop(config, base, base_digest, upload, uploaded.protect, workdir)

    results = {"dataset": dataset} if dataset else {}
    results["units"] = dict(UNITS)
    for key in (k for k in EVAL_ROWS if k in models):
        r = _evaluate(config, key, *models[key], test, triggered, workdir)
        results[key] = {"cp": r["cp"], "asr": r["asr"]}

    def finish() -> dict:  # process 0: results.json / results.md and the summary
        results["detection"] = {k: report.get(k) for k in ("precision", "recall", "f1")}
        results[f"detection_{other}_rule"] = {k: alt_prf[k] for k in ("precision", "recall", "f1")}
        results["seconds"] = round(time.time() - t0, 1)
        results["checks"] = _checks(results)
        with wd.writing("results.json", "results.md"):
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

    return _primary(finish, share=False)


def _random_drop(config, base, base_digest, upload, protect, workdir: Path) -> tuple[Path, str]:
    """The paper's Random Drop baseline: a fine-tune on a seeded random (1 - data.random_drop) of the upload."""
    rng = np.random.default_rng(config.seed)
    keep = np.sort(rng.permutation(len(upload))[: int(round(len(upload) * (1 - config.data.random_drop)))])
    dropped = [upload[i] for i in keep]
    drop_json = workdir / "random_drop" / "train.json"

    def write_drop() -> None:  # a record of the samples kept (the fine-tune reads them from memory)
        with workdirs.claim(drop_json.parent, ["train.json"]) as stage, stage.writing("train.json"):
            write_subset([s.raw for s in dropped], drop_json, protect=protect)

    _primary(write_drop)
    return _finetune(config, base, base_digest, dropped, workdir / "random_drop", "random drop")


def main() -> None:
    from bye_jax import cli
    def _run(config, workdir):
        if not workdir:
            raise UserError("--workdir is required")
        if not config.model:
            raise UserError("config.model is empty")
        for name in ("data", "test", "triggered"):
            _require(config[name], f"config.{name}")
        check_config(config)
        inputs = [config.model] + [config[n].annotations for n in ("data", "test", "triggered")
                                   if config[n].get("source", "llava_json") != "tfds" and config[n].annotations]
        with claim_pipeline(workdir, OUTPUTS, inputs):  # before anything is loaded; process 0 writes
            pixels = config.data.max_image_pixels or None
            test, triggered = (load_split(config[name], f"config.{name}", pixels).samples
                               for name in ("test", "triggered"))
            run_pipeline(config, Path(workdir), Path(config.model), None, test, triggered)
        return 0

    cli.define_flags(str(cli.CONFIGS / "pipeline.py"))
    cli.run(_run, "bye_jax.pipeline")


if __name__ == "__main__":
    main()
