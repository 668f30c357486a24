"""Results JSON + a markdown table in the BYE paper's layout.

``results`` (every part optional; None = not measured). CP and ASR are percent (0-100); detection
precision / recall / F1 are fractions (0-1), as in report.json and eval.json, and are shown as percent
only in the rendered table. results.json says so in its ``units`` entry::

    {"dataset": "ScienceQA",                              # optional title
     "units": {"cp": "percent", "asr": "percent", "detection": "fraction"},
     "detection": {"precision": 0.9882, "recall": 0.9469, "f1": 0.9671},
     "vanilla": {"cp": 91.72, "asr": 97.32}, "random_drop": {"cp": .., "asr": ..}, "bye": {"cp": .., "asr": ..}}

`results_markdown` renders (detection in percent)::

    | Method | CP | ASR |
    |---|---:|---:|
    | Vanilla FT | 91.72 | 97.32 |
    | Random Drop | 89.54 | 97.12 |
    | BYE | 89.64 | 0.05 |

    Detection (BYE) P / R / F1 (%): 98.82 / 94.69 / 96.71

Rows missing from ``results`` are left out; a missing number prints as ``-``.

    python -m bye_jax.eval.tables --vanilla=runs/vanilla/eval.json --random_drop=runs/drop/eval.json \
        --bye=runs/bye/eval.json --report=runs/scan/report.json --dataset=ScienceQA --out=runs/results

For a `python -m bye_jax.pipeline` run in OUT, the same table as OUT/results.md comes from
OUT/eval/{vanilla,random_drop,bye}/eval.json and --report=OUT/filter/report.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from bye_jax.eval.metrics import UNITS, detection_metrics
from bye_jax.jsonio import dump_json

__all__ = ["ROWS", "collect_results", "results_markdown", "write_results"]

ROWS = (("vanilla", "Vanilla FT"), ("random_drop", "Random Drop"), ("bye", "BYE"))


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{float(x):.2f}"


def _percent(x):
    return None if x is None else 100.0 * float(x)


def _check_fractions(detection: Mapping) -> None:
    for k in ("precision", "recall", "f1"):
        x = detection.get(k)
        if x is not None and not (isinstance(x, float) and math.isnan(x)) and not 0 <= float(x) <= 1:
            raise ValueError(f"detection {k} is {x}: expected a fraction in [0, 1] (detection metrics are "
                             "fractions in the JSON files, percent only in tables)")


def results_markdown(results: Mapping) -> str:
    """The markdown table (rows Vanilla FT, Random Drop, BYE; columns CP, ASR) + the detection line (in %)."""
    lines = []
    if results.get("dataset"):
        lines += [f"**{results['dataset']}** (CP / ASR in %)", ""]
    rows = [(label, results[key]) for key, label in ROWS if results.get(key) is not None]
    if rows:
        lines += ["| Method | CP | ASR |", "|---|---:|---:|"]
        lines += [f"| {label} | {_num(r.get('cp'))} | {_num(r.get('asr'))} |" for label, r in rows]
    det = results.get("detection")
    if det is not None:
        _check_fractions(det)
        if rows:
            lines.append("")
        p, r, f1 = (_num(_percent(det.get(k))) for k in ("precision", "recall", "f1"))
        lines.append(f"Detection (BYE) P / R / F1 (%): {p} / {r} / {f1}")
    return "\n".join(lines) + "\n"


def _load(source) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {' '.join(str(e).split())}") from e


def collect_results(*, vanilla=None, random_drop=None, bye=None, report=None, dataset: str | None = None) -> dict:
    """Builds ``results`` from eval.json files / dicts of the three runs and a filter report.json.

    Without ``report``, the BYE run's own ``detection`` entry (eval with ``config.report``) is used.
    """
    results: dict = {}
    if dataset:
        results["dataset"] = dataset
    results["units"] = dict(UNITS)
    for key, source in (("vanilla", vanilla), ("random_drop", random_drop), ("bye", bye)):
        if source is not None:
            ev = _load(source)
            results[key] = {"cp": ev.get("cp"), "asr": ev.get("asr")}
            if key == "bye" and report is None and ev.get("detection"):
                results["detection"] = dict(ev["detection"])
                _check_fractions(results["detection"])
    if report is not None:
        results["detection"] = detection_metrics(report if isinstance(report, Mapping) else os.fspath(report))
    return results


def write_results(results: Mapping, out_dir: str | os.PathLike, name: str = "results") -> tuple[Path, Path]:
    """Writes out_dir/{name}.json and out_dir/{name}.md; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    js.write_text(dump_json(dict(results), indent=2))  # strict JSON: NaN -> null
    md.write_text(results_markdown(results))
    return js, md


def main() -> None:
    from absl import app, flags

    for key, label in ROWS:
        flags.DEFINE_string(key, None, f"eval.json of the {label} run.")
    flags.DEFINE_string("report", None, "report.json of bye_jax.filter (detection P / R / F1).")
    flags.DEFINE_string("dataset", None, "Dataset name for the table title.")
    flags.DEFINE_string("out", None, "Output folder for results.json and results.md.")

    def _main(argv) -> int:
        fl = flags.FLAGS
        prog = "bye_jax.eval.tables"
        if len(argv) > 1:
            print(f"{prog}: error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        try:
            results = collect_results(vanilla=fl.vanilla, random_drop=fl.random_drop, bye=fl.bye, report=fl.report,
                                      dataset=fl.dataset)
            if fl.out:
                write_results(results, fl.out)
        except (ValueError, OSError) as e:
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        print(results_markdown(results), end="")
        return 0

    app.run(_main)


if __name__ == "__main__":
    main()
