r"""Issue 13's "Done when", as one script: the CLI over 2 processes gives what it gives on 1.

Builds a tiny random LLaVA checkpoint and a small LLaVA-JSON dataset (the tests' helpers, no
downloads), then runs the commands exactly as a user would, as subprocesses on localhost:

  extract  `python -m bye_jax.extract --config=bye_jax/configs/llava.py ... --workdir=A` once, and the
           same line twice at the same time with `--config.distributed.{coordinator_address=127.0.0.1:PORT,
           num_processes=2,process_id=0|1} --workdir=B`; entropy.jsonl and every signals.npz array
           must agree within 1e-5 (float16 arrays: within 1 ulp of their stored value).
  train    `python -m bye_jax.train` (2 steps) the same two ways; the adapter and the merged
           checkpoint's parameters must agree within 1e-5.
  eval     `python -m bye_jax.eval` of the one-process run's merged checkpoint the same two ways;
           eval.json (but its `seconds`) and predictions.jsonl must be identical.
  filter   `python -m bye_jax.filter` (extraction + detection, with its plots) the same two ways, and
           again with `--config.entropy_file=` (the one-process filter's entropy.jsonl, no model):
           report.json (but timings) within 1e-5 (relative), clean.json / flagged.json identical,
           entropies within 1e-5.
  pipeline `python -m bye_jax.pipeline` (fine-tune -> extract -> filter -> re-fine-tune from the base
           on clean.json, Random Drop, four evaluations) on the tiny checkpoint the same two ways:
           the vanilla / BYE / Random Drop adapters and merged models, the filter's entropies and
           report, results.json and every eval.json (but timings and the workdir's own path) within
           1e-5 (numbers in JSON relative to max(1, |x|)); clean.json, flagged.json, Random Drop's
           train.json and every predictions.jsonl identical; then the 2-process command once more:
           every stage must be reused from its record.
  demo     the built-in demo (`python -m bye_jax.filter --config=bye_jax/configs/demo.py`) on a very
           small setting (tests/test_demo.py's: its base is pre-trained in the run, over every process)
           the same two ways: the base, the three fine-tunes, the filter's outputs and results.json as
           for the pipeline, the poisoned upload identical; report.json's numbers within 1e-3 (relative):
           the robust detector's mixture statistics move ~5e-4 when the entropies move 5e-7 (the
           2-process fine-tunes' adapters differ from 1 process's by ~1e-6: float32 sums over 4 devices
           in another order); detection itself runs once, on process 0, on the gathered table.
  cache    the one-process extraction again, into a fresh workdir with the same compile cache
           folder: wall times of both runs and the compilation share the command prints.

Every process sees 2 fake CPU devices (XLA_FLAGS), so the 2-process runs use a 4-device mesh.
Prints a table; exits 1 if an agreement check fails.

    python benchmarks/multiprocess_check.py [--samples 13] [--keep DIR] [--only extract,train,filter,pipeline,demo]

(`train` includes eval, of its merged checkpoint; `extract` includes the compile-cache timing.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # bye_jax from this clone; the tests' helpers
TOLERANCE = 1e-5
TRAIN = {"batch_size": 4, "grad_accum": 1, "epochs": 1, "lora.rank": 4, "lora.alpha": 8.0, "lr": 5e-3,
         "length_bucket": 64}  # 8 examples: 2 steps of one batch shape
# the pipeline on the tiny checkpoint (tests/test_pipeline.py's tiny_config): one short LoRA epoch per
# fine-tune, 2 generated tokens; the reference rule (robust needs >= 20 samples to decide)
PIPELINE = {"data.target": "red", "batch_size": 4, "plots.enabled": False, "finetune.lora.rank": 4,
            "finetune.lora.alpha": 8.0, "finetune.epochs": 1, "finetune.batch_size": 4, "finetune.grad_accum": 1,
            "finetune.checkpoint_every": 0, "eval.batch_size": 6, "eval.max_new_tokens": 2, "detect.rule": "official",
            "detect.tau": 1.0}
FILTER = {"detect.rule": "official", "detect.tau": 1.0}
DEMO = {"data.n_pretrain": 48, "data.n_upload": 40, "data.n_test": 12, "arch.image_size": 24, "arch.patch_size": 8,
        "arch.vision_hidden": 32, "arch.text_hidden": 32, "arch.text_layers": 2, "arch.intermediate": 64,
        "pretrain.epochs": 1, "finetune.epochs": 1, "pretrain.batch_size": 8, "finetune.batch_size": 8,
        "eval.batch_size": 12, "batch_size": 8, "plots.heatmaps_suspicious": 2, "plots.heatmaps_typical": 1}
PARTS = ("extract", "train", "filter", "pipeline", "demo")
TIMING_KEYS = ("seconds", "extract_timing")  # in report.json / results.json: wall times, not results


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the tiny model compiles in < 1 s: cache it anyway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], processes: int = 1, timeout: int = 900) -> tuple[float, list[str]]:
    """Runs `cmd` as one process or as `processes` concurrent ones (one localhost coordinator);
    (wall seconds, each process's output). A failing process ends the script."""
    if processes > 1:
        address = f"127.0.0.1:{_free_port()}"
        cmds = [cmd + [f"--config.distributed.coordinator_address={address}",
                       f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={p}"]
                for p in range(processes)]
    else:
        cmds = [cmd]
    t = time.time()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
             for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.time() - t
    for p, (proc, out) in enumerate(zip(procs, outs, strict=True)):
        if proc.returncode != 0:
            sys.exit(f"multiprocess_check: process {p} of {' '.join(cmds[p][:3])} exited {proc.returncode}:\n"
                     f"{out[-3000:]}")
    return seconds, outs


def _entropy(work: Path) -> tuple[list[str], np.ndarray]:
    records = [json.loads(line) for line in (work / "entropy.jsonl").read_text().splitlines()]
    return [r["question_id"] for r in records], np.array(
        [[r["entropy"][str(i)] for i in range(len(r["entropy"]))] for r in records], np.float64)


def _compare_extract(one: Path, two: Path) -> list[tuple[str, float, bool]]:
    """(what, max abs diff, within tolerance) for entropy.jsonl and each signals.npz array."""
    ids1, e1 = _entropy(one)
    ids2, e2 = _entropy(two)
    if ids1 != ids2:
        return [("entropy.jsonl ids", float("inf"), False)]
    rows = [("entropy.jsonl", float(np.abs(e1 - e2).max()), bool(np.abs(e1 - e2).max() <= TOLERANCE))]
    with np.load(one / "signals.npz") as a, np.load(two / "signals.npz") as b:
        if sorted(a.files) != sorted(b.files):
            return rows + [("signals.npz arrays", float("inf"), False)]
        for name in sorted(a.files):
            x, y = a[name], b[name]
            if x.shape != y.shape or x.dtype != y.dtype:
                rows.append((f"signals.npz {name}", float("inf"), False))
            elif x.dtype.kind not in "fiub":  # ids and other strings: equal or not
                rows.append((f"signals.npz {name}", 0.0 if np.array_equal(x, y) else float("inf"),
                             bool(np.array_equal(x, y))))
            else:
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                # float16 is stored rounded: float32 values 1e-7 apart may land 1 ulp apart
                bound = np.spacing(np.abs(x)).astype(np.float64) if x.dtype == np.float16 else TOLERANCE
                rows.append((f"signals.npz {name}", float(diff.max(initial=0.0)), bool(np.all(diff <= bound))))
    return rows


def _compare_train(one: Path, two: Path) -> list[tuple[str, float, bool]]:
    rows = []
    for label, pattern in (("adapter", "adapter/*.safetensors"), ("merged", "merged/*.safetensors")):
        a, b = {}, {}
        for f in sorted(one.glob(pattern)):
            a.update(load_file(f))
        for f in sorted(two.glob(pattern)):
            b.update(load_file(f))
        if not a or sorted(a) != sorted(b):
            rows.append((f"{label} tensors", float("inf"), False))
            continue
        diff = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max(initial=0.0)) for k in a)
        rows.append((f"{label} ({len(a)} tensors)", diff, diff <= TOLERANCE))
    moved = any(np.abs(v).max() > 0 for f in one.glob("adapter/*.safetensors")
                for k, v in load_file(f).items() if "lora_B" in k)
    rows.append(("adapter moved from its init (lora_B != 0)", float("nan"), bool(moved)))
    return rows


def _compare_eval(one: Path, two: Path) -> list[tuple[str, float, bool]]:
    a, b = (json.loads((w / "eval.json").read_text()) for w in (one, two))
    a.pop("seconds", None), b.pop("seconds", None)
    same_rows = (one / "predictions.jsonl").read_text() == (two / "predictions.jsonl").read_text()
    return [(f"eval.json (CP {a['cp']}, ASR {a['asr']}; all but seconds)", float("nan"), a == b),
            (f"predictions.jsonl ({a['n_test'] + a['n_triggered']} rows)", float("nan"), same_rows)]


def _without_timing(path: Path) -> dict:
    d = json.loads(path.read_text())
    for key in TIMING_KEYS:
        d.pop(key, None)
    return d


def _json_diff(a, b, roots: tuple[str, str]) -> float:
    """The largest difference between two JSON values: numbers relative to max(1, |a|, |b|) (statistics
    of a mixture fit, e.g. a KL of 6.7, carry the entropies' 1e-7 differences amplified), anything else 0
    when equal (strings once each run's workdir is named alike) and inf when not."""
    if isinstance(a, dict) and isinstance(b, dict):
        if sorted(a) != sorted(b):
            return float("inf")
        return max((_json_diff(a[k], b[k], roots) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf")
        return max((_json_diff(x, y, roots) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) | isinstance(b, bool):
        return abs(float(a) - float(b)) / max(1.0, abs(float(a)), abs(float(b)))
    if isinstance(a, str) and isinstance(b, str):
        return 0.0 if a.replace(roots[0], "WORK") == b.replace(roots[1], "WORK") else float("inf")
    return 0.0 if a == b else float("inf")


def _same_files(one: Path, two: Path, names: list[str]) -> list[tuple[str, float, bool]]:
    """Identical bytes; JSON reports (but their timings, and with each run's workdir named alike) within
    the tolerance."""
    rows = []
    for name in names:
        a, b = one / name, two / name
        if not a.exists() or not b.exists():
            rows.append((f"{name} (missing)", float("nan"), False))
        elif name.endswith(("report.json", "results.json", "eval.json")):
            diff = _json_diff(_without_timing(a), _without_timing(b), (str(one), str(two)))
            rows.append((f"{name} (all but timings; relative)", diff, diff <= TOLERANCE))
        elif name.endswith("entropy.jsonl"):
            (ids1, e1), (ids2, e2) = _entropy(one / Path(name).parent), _entropy(two / Path(name).parent)
            diff = float(np.abs(e1 - e2).max()) if ids1 == ids2 and e1.shape == e2.shape else float("inf")
            rows.append((name, diff, diff <= TOLERANCE))
        else:
            rows.append((name, float("nan"), a.read_bytes() == b.read_bytes()))
    return rows


def _compare_filter(one: Path, two: Path) -> list[tuple[str, float, bool]]:
    report = json.loads((one / "report.json").read_text())
    rows = _same_files(one, two, ["report.json", "clean.json", "flagged.json", "entropy.jsonl"])
    rows[0] = (f"report.json ({report['n_flagged']} of {report['n_samples']} flagged; all but timings; relative)",
               *rows[0][1:])
    return rows + [_flags(one, two, "report.json")]


def _compare_pipeline(one: Path, two: Path) -> list[tuple[str, float, bool]]:
    results = json.loads((one / "results.json").read_text())
    summary = ", ".join(f"{k} CP {results[k]['cp']} ASR {results[k]['asr']}" for k in ("vanilla", "bye"))
    rows = _same_files(one, two, ["results.json", "filter/entropy.jsonl", "filter/report.json", "filter/clean.json",
                                  "filter/flagged.json", "random_drop/train.json"]
                       + [f"eval/{k}/{f}" for k in ("vanilla", "random_drop", "bye", "base")
                          for f in ("eval.json", "predictions.jsonl")])
    rows[0] = (f"results.json ({summary}; all but seconds; relative)", *rows[0][1:])
    rows.append(_flags(one, two, "filter/report.json"))
    for stage in ("vanilla", "bye", "random_drop"):
        rows += [(f"{stage}/{w}", d, ok) for w, d, ok in _compare_train(one / stage, two / stage)
                 if not w.startswith("adapter moved")]
    return rows


def _flags(one: Path, two: Path, report: str) -> tuple[str, float, bool]:
    a, b = (json.loads((w / report).read_text()) for w in (one, two))
    same = all(a.get(k) == b.get(k) for k in ("flagged_ids", "sensitive_layers", "verdict"))
    return f"{report}: flagged ids, sensitive layers, verdict ({a['n_flagged']} flagged)", float("nan"), same


def _compare_demo(one: Path, two: Path) -> list[tuple[str, float, bool]]:
    rows = [(w + "; bound 1e-3", d, d <= 1e-3) if w.startswith("filter/report.json (") else (w, d, ok)
            for w, d, ok in _compare_pipeline(one, two)]
    rows += _same_files(one, two, ["data/upload/train.json", "data/test_triggered/test_triggered.json"])
    a, b = (load_file(w / "base" / "model.safetensors") for w in (one, two))
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max(initial=0.0)) for k in a) \
        if sorted(a) == sorted(b) else float("inf")
    return rows + [(f"base (pre-trained in the run, {len(a)} tensors)", diff, diff <= TOLERANCE)]


def _records(work: Path) -> dict[str, int]:
    """mtime of every stage record (rewritten whenever its stage runs)."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*stage.json")}


def _compile_seconds(out: str) -> float | None:
    found = re.findall(r"with its compilation: ([\d.]+)s", out)
    return float(found[-1]) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=13, help="extraction samples (odd: the 2 shares differ)")
    ap.add_argument("--keep", default="", help="folder for the checkpoint, data and workdirs (default: a temp dir)")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if not parts or not parts <= set(PARTS):
        sys.exit(f"multiprocess_check: --only takes {', '.join(PARTS)}; got {args.only!r}")
    if args.samples < 2:
        sys.exit("multiprocess_check: --samples must be >= 2")

    from test_extract import make_dataset
    from tiny_checkpoints import make_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        ckpt = make_tiny_llava(root / "ckpt", text_layers=3, kv_heads=2, seed=3)
        ann, images = make_dataset(root / "data", n=args.samples)
        train_ann, train_images = make_dataset(root / "train_data", n=8)
        py = [sys.executable, "-m"]
        extract = py + ["bye_jax.extract", "--config=bye_jax/configs/llava.py", f"--config.model={ckpt}",
                        f"--config.data.annotations={ann}", f"--config.data.image_root={images}",
                        "--config.batch_size=2"]
        train = py + ["bye_jax.train", "--config=bye_jax/configs/train.py", f"--config.model={ckpt}",
                      f"--config.data.annotations={train_ann}", f"--config.data.image_root={train_images}",
                      *(f"--config.{k}={v}" for k, v in TRAIN.items())]
        cache = lambda name: f"--config.compile_cache_dir={root / name}"  # noqa: E731

        timings, checks, out_cold, out_warm = {}, [], "", ""
        if "extract" in parts:
            timings["extract, 1 process (cold cache)"], (out_cold,) = _run(
                extract + [cache("cache_one"), f"--workdir={root / 'extract_one'}"])
            timings["extract, 2 processes"], _ = _run(
                extract + [cache("cache_two"), f"--workdir={root / 'extract_two'}"], processes=2)
            timings["extract, 1 process (warm cache)"], (out_warm,) = _run(
                extract + [cache("cache_one"), f"--workdir={root / 'extract_again'}"])
            checks += [("extract " + w, d, ok)
                       for w, d, ok in _compare_extract(root / "extract_one", root / "extract_two")]
        if "train" in parts:
            timings["train, 1 process"], _ = _run(train + [cache("cache_train"), f"--workdir={root / 'train_one'}"])
            timings["train, 2 processes"], _ = _run(
                train + [cache("cache_train_two"), f"--workdir={root / 'train_two'}"], processes=2)
            evaluate = py + ["bye_jax.eval", "--config=bye_jax/configs/eval.py",
                             f"--config.model={root / 'train_one' / 'merged'}",
                             f"--config.test.annotations={ann}", f"--config.test.image_root={images}",
                             f"--config.triggered.annotations={train_ann}",
                             f"--config.triggered.image_root={train_images}",
                             "--config.batch_size=2", "--config.max_new_tokens=4", "--config.length_bucket=64",
                             "--config.target=red", cache("cache_eval")]
            timings["eval, 1 process"], _ = _run(evaluate + [f"--workdir={root / 'eval_one'}"])
            timings["eval, 2 processes"], _ = _run(evaluate + [f"--workdir={root / 'eval_two'}"], processes=2)
            checks += [("train " + w, d, ok) for w, d, ok in _compare_train(root / "train_one", root / "train_two")]
            checks += [("eval " + w, d, ok) for w, d, ok in _compare_eval(root / "eval_one", root / "eval_two")]
        if "filter" in parts:
            filt = py + ["bye_jax.filter", "--config=bye_jax/configs/llava.py", f"--config.model={ckpt}",
                         f"--config.data.annotations={ann}", f"--config.data.image_root={images}",
                         "--config.batch_size=2", *(f"--config.{k}={v}" for k, v in FILTER.items()),
                         cache("cache_filter")]
            timings["filter, 1 process"], _ = _run(filt + [f"--workdir={root / 'filter_one'}"])
            timings["filter, 2 processes"], _ = _run(filt + [f"--workdir={root / 'filter_two'}"], processes=2)
            from_file = filt + [f"--config.entropy_file={root / 'filter_one' / 'entropy.jsonl'}"]
            timings["filter --config.entropy_file, 1 process"], _ = _run(
                from_file + [f"--workdir={root / 'file_one'}"])
            timings["filter --config.entropy_file, 2 processes"], _ = _run(
                from_file + [f"--workdir={root / 'file_two'}"], processes=2)
            checks += [("filter " + w, d, ok)
                       for w, d, ok in _compare_filter(root / "filter_one", root / "filter_two")]
            checks += [("filter entropy_file " + w, d, ok) for w, d, ok in _same_files(
                root / "file_one", root / "file_two", ["report.json", "clean.json", "flagged.json", "entropy.jsonl"])]
        if "pipeline" in parts:
            upload_ann, upload_images = make_dataset(root / "upload", n=12)  # 3 ids say 'poison'
            test_ann, test_images = make_dataset(root / "test", n=6)
            pipeline = py + ["bye_jax.pipeline", "--config=bye_jax/configs/pipeline.py", f"--config.model={ckpt}",
                             f"--config.data.annotations={upload_ann}", f"--config.data.image_root={upload_images}",
                             f"--config.test.annotations={test_ann}", f"--config.test.image_root={test_images}",
                             f"--config.triggered.annotations={train_ann}",
                             f"--config.triggered.image_root={train_images}",
                             *(f"--config.{k}={v}" for k, v in PIPELINE.items()), cache("cache_pipeline")]
            timings["pipeline, 1 process"], _ = _run(pipeline + [f"--workdir={root / 'pipeline_one'}"])
            timings["pipeline, 2 processes"], _ = _run(pipeline + [f"--workdir={root / 'pipeline_two'}"],
                                                       processes=2)
            records = _records(root / "pipeline_two")
            timings["pipeline rerun, 2 processes (all cached)"], (rerun, _) = _run(
                pipeline + [f"--workdir={root / 'pipeline_two'}"], processes=2)
            checks += [("pipeline " + w, d, ok)
                       for w, d, ok in _compare_pipeline(root / "pipeline_one", root / "pipeline_two")]
            cached = rerun.count(": cached (")
            checks.append((f"pipeline rerun: {len(records)} stage records unchanged, {cached} 'cached' lines",
                           float("nan"), _records(root / "pipeline_two") == records and len(records) == 9
                           and cached == 8))

        if "demo" in parts:
            demo = py + ["bye_jax.filter", "--config=bye_jax/configs/demo.py", cache("cache_demo"),
                         *(f"--config.{k}={v}" for k, v in DEMO.items())]
            timings["demo (small), 1 process"], _ = _run(demo + [f"--workdir={root / 'demo_one'}"])
            timings["demo (small), 2 processes"], _ = _run(demo + [f"--workdir={root / 'demo_two'}"], processes=2)
            checks += [("demo " + w, d, ok) for w, d, ok in _compare_demo(root / "demo_one", root / "demo_two")]

        print(f"\n{args.samples} extraction / filter / eval test samples, 8 training examples (2 steps) / eval "
              f"triggered samples; pipeline: 12 upload, 6 test, 8 triggered samples; tolerance {TOLERANCE:g}\n")
        print(f"{'check: 1 process vs 2':<80} {'max abs diff':>12}  ok")
        for what, diff, ok in checks:
            print(f"{what:<80} {'-' if np.isnan(diff) else f'{diff:.3g}':>12}  {'yes' if ok else 'NO'}")
        print(f"\n{'run':<44} {'wall s':>8} {'compile s':>10}")
        for what, seconds in timings.items():
            out = out_cold if "cold" in what else out_warm if "warm" in what else ""
            comp = _compile_seconds(out)
            print(f"{what:<44} {seconds:>8.1f} {'' if comp is None else f'{comp:.1f}':>10}")
        if "extract" in parts:
            cold, warm = timings["extract, 1 process (cold cache)"], timings["extract, 1 process (warm cache)"]
            print(f"\nwarm-cache start-up: {warm:.1f}s vs {cold:.1f}s cold ({cold / warm:.2f}x); first batch of each "
                  f"shape (compilation or cache load): {_compile_seconds(out_cold)}s -> {_compile_seconds(out_warm)}s")
        failed = [w for w, _, ok in checks if not ok]
        if failed:
            print(f"FAILED: {', '.join(failed)}")
            return 1
        print("all agreement checks passed")
        return 0


if __name__ == "__main__":
    sys.exit(main())
