r"""The built-in demo for several seeds: one row per seed and the worst case (issue 10's targets).

    python benchmarks/demo_seeds.py                                  # seeds 0, 1, 2 into runs/demo_seeds/
    python benchmarks/demo_seeds.py --seeds=0,1,2,3 --root=/tmp/ds --md=demo_seeds.md -- --config.finetune.epochs=20

Each seed is a separate `python -m bye_jax.filter --config=bye_jax/configs/demo.py --config.seed=S
--workdir=ROOT/sS` (anything after `--` is passed on to every run); a finished workdir is reused (the
demo caches its stages). The rows come from each run's results.json (detection as fractions); minutes are the run's wall
time, as measured when it first finished. Writes the table as markdown (--md, default ROOT/demo_seeds.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

TARGETS = "vanilla ASR >= 90, detection F1 >= 0.9, BYE ASR <= 2, BYE CP >= vanilla CP - 2, <= 10 min"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row_of(seed: int, results: dict, minutes: float) -> dict:
    det = results.get("detection") or {}
    ref = next((v for k, v in results.items() if k.startswith("detection_") and k.endswith("_rule")), {}) or {}
    van, bye = results["vanilla"], results["bye"]
    row = {"seed": seed, "base_cp": results.get("base", {}).get("cp"), "vanilla_cp": van["cp"],
           "vanilla_asr": van["asr"], "bye_cp": bye["cp"], "bye_asr": bye["asr"],
           "precision": det.get("precision"), "recall": det.get("recall"),
           "f1": det.get("f1"), "other_rule_f1": ref.get("f1"), "minutes": minutes}
    row["ok"] = {
        "vanilla ASR >= 90": (van["asr"] or 0) >= 90,
        "F1 >= 0.9": (row["f1"] or 0) >= 0.9,
        "BYE ASR <= 2": bye["asr"] is not None and bye["asr"] <= 2,
        "BYE CP within 2": None not in (bye["cp"], van["cp"]) and bye["cp"] >= van["cp"] - 2,
        "<= 10 min": minutes <= 10,
    }
    return row


def _f(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ("| seed | base CP | vanilla CP | vanilla ASR | BYE CP | BYE ASR | det. P | det. R | det. F1 | "
            "other rule F1 | minutes | targets |")
    lines = [head, "|" + "---:|" * 11 + "---|"]
    for r in rows:
        failed = [k for k, ok in r["ok"].items() if not ok]
        lines.append(f"| {r['seed']} | {_f(r['base_cp'])} | {_f(r['vanilla_cp'])} | {_f(r['vanilla_asr'])} | "
                     f"{_f(r['bye_cp'])} | {_f(r['bye_asr'])} | {_f(r['precision'])} | {_f(r['recall'])} | "
                     f"{_f(r['f1'])} | {_f(r['other_rule_f1'])} | {_f(r['minutes'], 1)} | "
                     f"{'all met' if not failed else 'FAIL: ' + ', '.join(failed)} |")
    worst = worst_case(rows)
    lines.append(f"| worst | {_f(worst['base_cp'])} | {_f(worst['vanilla_cp'])} | {_f(worst['vanilla_asr'])} | "
                 f"{_f(worst['bye_cp'])} | {_f(worst['bye_asr'])} | {_f(worst['precision'])} | "
                 f"{_f(worst['recall'])} | {_f(worst['f1'])} | {_f(worst['other_rule_f1'])} | "
                 f"{_f(worst['minutes'], 1)} | {'all met' if worst['all_ok'] else 'not all met'} |")
    return "\n".join(lines)


def worst_case(rows: list[dict]) -> dict:
    """Per column the value furthest from its target (lowest CP / ASR of vanilla / P / R / F1, highest
    BYE ASR and minutes; BYE CP: the row with the largest drop below vanilla)."""
    def pick(key, fn):
        vals = [r[key] for r in rows if r[key] is not None]
        return fn(vals) if vals else None

    drop = max(rows, key=lambda r: (r["vanilla_cp"] or 0) - (r["bye_cp"] or 0))
    return {"base_cp": pick("base_cp", min), "vanilla_cp": pick("vanilla_cp", min),
            "vanilla_asr": pick("vanilla_asr", min), "bye_cp": drop["bye_cp"], "bye_asr": pick("bye_asr", max),
            "precision": pick("precision", min), "recall": pick("recall", min), "f1": pick("f1", min),
            "other_rule_f1": pick("other_rule_f1", min), "minutes": pick("minutes", max),
            "all_ok": all(all(r["ok"].values()) for r in rows)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", default="runs/demo_seeds", help="workdirs ROOT/s<seed>")
    ap.add_argument("--md", default="", help="markdown output (default ROOT/demo_seeds.md)")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    import bye_jax

    config = Path(bye_jax.__file__).parent / "configs" / "demo.py"
    root = Path(args.root)
    rows = []
    for seed in seeds:
        workdir = root / f"s{seed}"
        cached = (workdir / "results.json").exists()
        cmd = [sys.executable, "-m", "bye_jax.filter", f"--config={config}", f"--config.seed={seed}",
               f"--workdir={workdir}", *extra]
        print(f"seed {seed}: {' '.join(cmd[1:])}" + (" (finished before: reusing it)" if cached else ""), flush=True)
        t0 = time.time()
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir.parent / f"s{seed}.log", "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        timing = workdir / "demo_seeds_minutes.json"
        if proc.returncode == 0 and not cached:
            timing.write_text(json.dumps({"minutes": (time.time() - t0) / 60, "cpu": _cpu()}))
        minutes = json.loads(timing.read_text())["minutes"] if timing.exists() else float("nan")
        if proc.returncode != 0:
            print(f"seed {seed}: the demo failed (exit {proc.returncode}); see {workdir.parent / f's{seed}.log'}",
                  file=sys.stderr)
            return 1
        rows.append(row_of(seed, json.loads((workdir / "results.json").read_text()), minutes))
        print(table(rows[-1:]).splitlines()[2], flush=True)
    md = table(rows)
    header = (f"Built-in demo, seeds {', '.join(map(str, seeds))}; machine: {_cpu()}, {_cpus()} CPU cores; "
              f"{time.strftime('%Y-%m-%d')}. CP / ASR in %, detection as fractions. Targets: {TARGETS}.")
    print("\n" + header + "\n\n" + md)
    out = Path(args.md or root / "demo_seeds.md")
    out.write_text(header + "\n\n" + md + "\n")
    print(f"\nwritten to {out}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    sys.exit(main())
