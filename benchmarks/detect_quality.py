"""Detection quality of every registered detector over a suite of signal tables.

    python benchmarks/detect_quality.py SUITE_DIR_OR_FILES... [--detectors=robust,official,paper]
    python benchmarks/detect_quality.py --suite benchmarks/data/detect_suite [--md=table.md] [--match='blend_*,sig_*']

``--suite``: the tables written by benchmarks/detect_suite.py (labels and metadata in each npz), grouped
by trigger x poison rate, with the vanilla ASR / CP of each checkpoint, and a summary of issue 9's and
issue 12's "Done when" criteria for every detector (`suite_criteria`); ``--md`` also writes that markdown
to a file; ``--match`` picks tables of the folder by name (globs).

A suite entry is a signal table with labels: ``*.npz`` in the signals.npz layout (``ids`` + named
arrays, bye_jax/signals.py) with a boolean ``poisoned`` [N] array (else "poison" in an id marks a poisoned
row), a reference-format ``entropy.jsonl`` (labels from the ids), or a demo run folder (``filter/signals.npz``
with the labels from the ``poisoned`` field of ``data/upload/train.json``, e.g. benchmarks/explore_demo.py's
runs: ``python benchmarks/detect_quality.py runs/explore_demo/demo_*_s*``). For each table and detector it prints
precision / recall / F1 and the flag rate; for tables without poison (clean uploads) the flag rate and
the verdict are what count. ``oracle`` is the best single-layer entropy threshold chosen WITH the labels
(either direction), for that table only: an upper reference, not a detector. ``share oracle`` is the same
over the per-head segment shares (signals.py ``shares``: the best single (layer, head, segment) share
threshold, either direction; "-" for tables without shares), the reference for the share signals that
the ``shares`` / ``combined`` detectors read (issue 12).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bye_jax.detect import DETECTORS, detect, precision_recall_f1
from bye_jax.extract import read_entropy_jsonl
from bye_jax.signals import SignalTable, load_npz

RUN_TABLE, RUN_LABELS = Path("filter") / "signals.npz", Path("data") / "upload" / "train.json"


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / RUN_TABLE).is_file() and (path / RUN_LABELS).is_file()


def load_suite_entry(path: Path) -> tuple[SignalTable, np.ndarray]:
    """(table without the label array, poisoned [N] bool)."""
    if is_run(path):
        table = load_npz(path / RUN_TABLE)
        labels = {str(r["id"]): bool(r.get("poisoned", False)) for r in json.loads((path / RUN_LABELS).read_text())}
        missing = [i for i in table.ids if i not in labels]
        if missing:
            raise ValueError(f"{path}: {len(missing)} table ids not in {RUN_LABELS} (first: {missing[0]!r})")
        return table, np.array([labels[i] for i in table.ids])
    if path.suffix == ".npz":
        table = load_npz(path)
        labels = table.arrays.pop("poisoned", None)
        truth = (np.asarray(labels, bool) if labels is not None
                 else np.array(["poison" in str(i) for i in table.ids]))
        return table, truth
    t = read_entropy_jsonl(path)
    return SignalTable.from_entropy(t.ids, t.matrix), np.array(["poison" in i for i in t.ids])


def oracle_f1(entropy: np.ndarray, truth: np.ndarray) -> tuple[float, int, str]:
    """Best F1 of 'flag if entropy of layer l is below (or above) a threshold', with labels: (F1, l, side).
    Works on any [N, F] feature matrix (l is then the column)."""
    best = (0.0, -1, "")
    pos = truth.sum()
    if pos == 0:
        return best
    for layer in range(entropy.shape[1]):
        col = entropy[:, layer]
        fill = np.nanmean(col) if np.isfinite(col).any() else 0.0
        x = np.nan_to_num(col, nan=fill, posinf=fill, neginf=fill)
        for side, order in (("low", np.argsort(x, kind="stable")), ("high", np.argsort(-x, kind="stable"))):
            tp = np.cumsum(truth[order])
            k = np.arange(1, len(x) + 1)
            f1 = 2 * tp / (k + pos)
            i = int(np.argmax(f1))
            if f1[i] > best[0]:
                best = (float(f1[i]), layer, side)
    return best


def share_oracle_f1(table: SignalTable, truth: np.ndarray) -> tuple[float, str]:
    """Best F1 of 'flag if the share of segment s in head h of layer l is below (or above) a threshold',
    with labels, over every (layer, head, segment): (F1, "layer l head h <segment> <side>"); (0.0, "-")
    without shares or poison."""
    from bye_jax.signals import SHARE_SEGMENTS

    shares = table.arrays.get("shares")
    if shares is None or not truth.any():
        return 0.0, "-"
    shares = np.asarray(shares, np.float64)
    n, layers, heads, segs = shares.shape
    f1, col, side = oracle_f1(shares.reshape(n, -1), truth)
    if col < 0:
        return 0.0, "-"
    layer, head, seg = np.unravel_index(col, (layers, heads, segs))
    name = SHARE_SEGMENTS[seg] if segs == len(SHARE_SEGMENTS) else f"segment {seg}"
    return f1, f"layer {layer} head {head} {name} {side}"


def run(paths: list[Path], detectors: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        table, truth = load_suite_entry(path)
        ids = np.asarray(table.ids, dtype=object)
        poisoned = list(ids[truth])
        o_f1, o_layer, o_side = oracle_f1(np.asarray(table.entropy, np.float64), truth)
        s_f1, s_where = share_oracle_f1(table, truth)
        for name in detectors:
            t0 = time.time()
            det = detect(table, None, name)
            m = precision_recall_f1(det.flagged_ids, poisoned)
            rows.append({"table": path.name, "n": table.num_samples, "poisoned": int(truth.sum()), "detector": name,
                         "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
                         "flag_rate": det.n_flagged / max(table.num_samples, 1), "verdict": det.verdict,
                         "oracle_f1": o_f1, "oracle": f"layer {o_layer} {o_side}" if o_layer >= 0 else "-",
                         "share_oracle_f1": s_f1, "share_oracle": s_where, "seconds": time.time() - t0})
    return rows


# ------------------------------------------------------------------------------ --suite mode

LARGE_SHARE = 0.05  # "a large share": more than this fraction of the clean samples flagged
CLEAN_MAX = 0.01    # clean uploads: at most this fraction flagged
# issue 12's triggers: non-patch image triggers, text triggers and the dual-key (image + text) trigger
NON_PATCH = ("blend", "sig", "wanet", "prefix", "suffix", "template", "dual_key")


def _suite_module():
    import importlib.util

    if "detect_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location("detect_suite", Path(__file__).with_name("detect_suite.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["detect_suite"] = module
        spec.loader.exec_module(module)
    return sys.modules["detect_suite"]


def suite_rows(paths: list[Path], detectors: list[str]) -> list[dict]:
    """One row per (suite table, detector): its metadata, P / R / F1, flag rates and the oracle."""
    load_table = _suite_module().load_table
    rows = []
    for path in paths:
        table, truth, meta = load_table(path)
        ids = np.asarray(table.ids, dtype=object)
        poisoned, n_clean = list(ids[truth]), int((~truth).sum())
        o_f1, o_layer, o_side = oracle_f1(np.asarray(table.entropy, np.float64), truth)
        s_f1, s_where = share_oracle_f1(table, truth)
        for name in detectors:
            det = detect(table, None, name)
            m = precision_recall_f1(det.flagged_ids, poisoned)
            rows.append({"table": path.stem, "detector": name, "n": table.num_samples, "poisoned": int(truth.sum()),
                         "seed": meta.get("seed"), "rate": float(meta.get("rate", truth.mean())),
                         "trigger": meta.get("trigger", "?"), "trigger_params": meta.get("trigger_params", ""),
                         "tag": meta.get("tag", ""), "step": meta.get("checkpoint_step"),
                         "epoch": meta.get("epoch"), "asr": meta.get("asr"), "cp": meta.get("cp"),
                         "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
                         "flag_rate": det.n_flagged / max(table.num_samples, 1),
                         "clean_flag_rate": m["fp"] / max(n_clean, 1), "verdict": det.verdict,
                         "oracle_f1": o_f1, "oracle": f"layer {o_layer} {o_side}" if o_layer >= 0 else "-",
                         "share_oracle_f1": s_f1, "share_oracle": s_where})
    return rows


def _group(row: dict) -> str:
    tag = f"{row['tag']}: " if row.get("tag") else ""  # detect_suite --tag: another fine-tune
    if row["poisoned"] == 0:
        return f"{tag}clean upload"
    settings = f" ({row['trigger_params']})" if row.get("trigger_params") else ""
    return f"{tag}{row['trigger']}{settings} {100 * row['rate']:g}%"


def suite_criteria(rows: list[dict], large_share: float = LARGE_SHARE) -> dict[str, list[dict]]:
    """Issue 9's and issue 12's "Done when" per detector: [{criterion, n (tables it applies to), failed
    [table names]}]."""
    def asr(r):
        return -1.0 if r["asr"] is None else r["asr"]

    checks = [
        (f"clean uploads: flags <= {100 * CLEAN_MAX:g}%", lambda r: r["poisoned"] == 0,
         lambda r: r["flag_rate"] <= CLEAN_MAX),
        (f"backdoor not learnt (ASR < 80): clean samples flagged <= {100 * large_share:g}%",
         lambda r: r["poisoned"] > 0 and asr(r) < 80, lambda r: r["clean_flag_rate"] <= large_share),
        ("oracle F1 >= 0.9: F1 >= 0.9 x oracle", lambda r: r["poisoned"] > 0 and r["oracle_f1"] >= 0.9,
         lambda r: r["f1"] >= 0.9 * r["oracle_f1"]),
        ("patch / random_patch, 3%, ASR >= 80: F1 >= 0.9",
         lambda r: r["trigger"] in ("patch", "random_patch") and np.isclose(r["rate"], 0.03) and asr(r) >= 80,
         lambda r: r["f1"] >= 0.9),
        ("patch / random_patch, 1%, ASR >= 80: F1 >= 0.8",
         lambda r: r["trigger"] in ("patch", "random_patch") and np.isclose(r["rate"], 0.01) and asr(r) >= 80,
         lambda r: r["f1"] >= 0.8),
        ("blend / sig / wanet / text / dual_key, 10%, ASR >= 80: F1 >= 0.9",
         lambda r: r["trigger"] in NON_PATCH and np.isclose(r["rate"], 0.1) and asr(r) >= 80,
         lambda r: r["f1"] >= 0.9),
        ("blend / sig / wanet / text / dual_key, 3%, ASR >= 80: F1 >= 0.8",
         lambda r: r["trigger"] in NON_PATCH and np.isclose(r["rate"], 0.03) and asr(r) >= 80,
         lambda r: r["f1"] >= 0.8),
    ]
    out: dict[str, list[dict]] = {}
    for name in dict.fromkeys(r["detector"] for r in rows):
        mine = [r for r in rows if r["detector"] == name]
        out[name] = [{"criterion": text, "n": sum(map(applies, mine)),
                      "failed": [r["table"] for r in mine if applies(r) and not ok(r)]}
                     for text, applies, ok in checks]
    return out


def _num(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def suite_markdown(rows: list[dict], criteria: dict[str, list[dict]]) -> str:
    """Per trigger x rate group: one line per table (every detector's P / R / F1 and flag rate), the
    group's mean F1; then the criteria summary."""
    detectors = list(criteria)
    by_table: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_table.setdefault(r["table"], {})[r["detector"]] = r
    groups: dict[tuple, list[str]] = {}
    for table, per in by_table.items():
        r = next(iter(per.values()))
        key = (r.get("tag") or "", r["poisoned"] > 0, r["trigger"] if r["poisoned"] else "",
               r.get("trigger_params") or "", r["rate"])
        groups.setdefault(key, []).append(table)
    lines = []
    for key in sorted(groups):
        first = next(iter(by_table[groups[key][0]].values()))
        lines += ["", f"### {_group(first)}", "",
                  "| table | seed | step (epoch) | ASR | CP | N | poisoned | oracle F1 | share oracle F1 | "
                  + " | ".join(f"{d} P / R / F1 (flagged)" for d in detectors) + " |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(detectors)]
        for table in sorted(groups[key], key=lambda t: (by_table[t][detectors[0]]["seed"] or 0,
                                                        by_table[t][detectors[0]]["step"] or 0)):
            per, r = by_table[table], by_table[table][detectors[0]]
            oracle = f"{r['oracle_f1']:.2f} ({r['oracle']})" if r["poisoned"] else "-"
            share = (f"{r['share_oracle_f1']:.2f} ({r['share_oracle']})"
                     if r["poisoned"] and r.get("share_oracle", "-") != "-" else "-")
            cells = [f"{per[d]['precision']:.2f} / {per[d]['recall']:.2f} / {per[d]['f1']:.2f} "
                     f"({100 * per[d]['flag_rate']:.1f}%)" for d in detectors]
            lines.append(f"| {table} | {r['seed']} | {r['step']} ({_num(r['epoch'], '{:g}')}) | {_num(r['asr'])} | "
                         f"{_num(r['cp'])} | {r['n']} | {r['poisoned']} | {oracle} | {share} | "
                         + " | ".join(cells) + " |")
        stat = "flag rate" if not key[1] else "F1"
        means = [np.mean([by_table[t][d]["flag_rate" if not key[1] else "f1"] for t in groups[key]]) for d in detectors]
        lines.append(f"| mean {stat} | | | | | | | | | " + " | ".join(
            (f"{100 * m:.1f}%" if not key[1] else f"{m:.2f}") for m in means) + " |")
    lines += ["", "### Issue 9 and 12 criteria", "", "| criterion | " + " | ".join(detectors) + " |",
              "|---|" + "---|" * len(detectors)]
    for i, first in enumerate(criteria[detectors[0]]):
        cells = []
        for d in detectors:
            c = criteria[d][i]
            cells.append("n/a (no table)" if not c["n"] else
                         f"{'PASS' if not c['failed'] else 'FAIL'} {c['n'] - len(c['failed'])}/{c['n']}"
                         + (f" (fails: {', '.join(c['failed'][:3])}{', ...' if len(c['failed']) > 3 else ''})"
                            if c["failed"] else ""))
        lines.append(f"| {first['criterion']} | " + " | ".join(cells) + " |")
    return "\n".join(lines[1:]) + "\n"


def run_suite(folder: Path, detectors: list[str], md: Path | None = None, large_share: float = LARGE_SHARE,
              match: str = "*.npz", rows_json: Path | None = None) -> int:
    files = sorted(set(Path(folder).glob(match)) if "," not in match
                   else {f for m in match.split(",") if m for f in Path(folder).glob(m)})
    files = [f for f in files if f.suffix == ".npz" and not f.name.endswith(".tmp.npz")]
    if not files:
        print(f"detect_quality: error: no suite tables ({match}) in {folder}", file=sys.stderr)
        return 2
    rows = suite_rows(files, detectors)
    if rows_json is not None:
        Path(rows_json).write_text(json.dumps(rows, indent=0, default=str) + "\n")
    text = suite_markdown(rows, suite_criteria(rows, large_share))
    print(text, end="")
    if md is not None:
        Path(md).write_text(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="suite directories or table files")
    ap.add_argument("--detectors", default=",".join(sorted(DETECTORS)))
    ap.add_argument("--suite", type=Path, help="a folder of benchmarks/detect_suite.py tables (grouped report)")
    ap.add_argument("--md", type=Path, help="with --suite: also write the markdown report to this file")
    ap.add_argument("--large-share", type=float, default=LARGE_SHARE,
                    help="with --suite: the share of clean samples flagged that counts as large (ASR < 80)")
    ap.add_argument("--match", default="*.npz",
                    help="with --suite: the tables to read, comma-separated globs in the folder (e.g. 'blend_*,sig_*')")
    ap.add_argument("--json", type=Path, help="with --suite: also write every (table, detector) row to this JSON file")
    args = ap.parse_args(argv)
    unknown = [d for d in args.detectors.split(",") if d and d not in DETECTORS]
    if unknown:
        ap.error(f"unknown detector {unknown[0]!r}; registered: {', '.join(sorted(DETECTORS))}")
    if args.suite is not None:
        if args.paths:
            ap.error("give either --suite or table paths, not both")
        return run_suite(args.suite, [d for d in args.detectors.split(",") if d], args.md, args.large_share,
                         args.match, args.json)
    if not args.paths:
        ap.error("give suite directories / table files, or --suite")
    files = []
    for p in args.paths:
        if is_run(p):
            files.append(p)
        elif p.is_dir():
            files += sorted([*p.glob("*.npz"), *p.glob("*.jsonl")])
        else:
            files.append(p)
    if not files:
        print("detect_quality: no .npz / .jsonl tables or run folders found", file=sys.stderr)
        return 2
    suite_tables = [f for f in files if f.suffix == ".npz" and _suite_module().stored_digest(f) is not None]
    if suite_tables:
        ap.error(f"{suite_tables[0]} is a detect_suite table: read its folder with --suite")
    detectors = [d for d in args.detectors.split(",") if d]
    rows = run(files, detectors)
    print("| table | N | poisoned | detector | P | R | F1 | flagged | oracle F1 | share oracle F1 | verdict |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        oracle = f"{r['oracle_f1']:.2f} ({r['oracle']})" if r["poisoned"] else "-"
        share = f"{r['share_oracle_f1']:.2f} ({r['share_oracle']})" if r["share_oracle"] != "-" else "-"
        print(f"| {r['table']} | {r['n']} | {r['poisoned']} | {r['detector']} | {r['precision']:.2f} | "
              f"{r['recall']:.2f} | {r['f1']:.2f} | {100 * r['flag_rate']:.1f}% | {oracle} | {share} | "
              f"{r['verdict']} |")
    for name in detectors:
        clean = [r["flag_rate"] for r in rows if r["detector"] == name and r["poisoned"] == 0]
        if clean:
            print(f"{name}: clean uploads {len(clean)}, flag rate mean {100 * np.mean(clean):.2f}% "
                  f"max {100 * np.max(clean):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
