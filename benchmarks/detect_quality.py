"""Detection quality of every registered detector over a suite of signal tables.

    python benchmarks/detect_quality.py SUITE_DIR_OR_FILES... [--detectors=robust,official,paper]

A suite entry is a signal table with labels: ``*.npz`` in the signals.npz layout (``ids`` + named
arrays, bye_jax/signals.py) with a boolean ``poisoned`` [N] array (else "poison" in an id marks a poisoned
row), a reference-format ``entropy.jsonl`` (labels from the ids), or a demo run folder (``filter/signals.npz``
with the labels from the ``poisoned`` field of ``data/upload/train.json``, e.g. benchmarks/explore_demo.py's
runs: ``python benchmarks/detect_quality.py runs/explore_demo/demo_*_s*``). For each table and detector it prints
precision / recall / F1 and the flag rate; for tables without poison (clean uploads) the flag rate and
the verdict are what count. ``oracle`` is the best single-layer entropy threshold chosen WITH the labels
(either direction), for that table only: an upper reference, not a detector.
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
    """Best F1 of 'flag if entropy of layer l is below (or above) a threshold', with labels: (F1, l, side)."""
    best = (0.0, -1, "")
    pos = truth.sum()
    if pos == 0:
        return best
    for layer in range(entropy.shape[1]):
        x = np.nan_to_num(entropy[:, layer], nan=np.nanmean(entropy[:, layer]))
        for side, order in (("low", np.argsort(x, kind="stable")), ("high", np.argsort(-x, kind="stable"))):
            tp = np.cumsum(truth[order])
            k = np.arange(1, len(x) + 1)
            f1 = 2 * tp / (k + pos)
            i = int(np.argmax(f1))
            if f1[i] > best[0]:
                best = (float(f1[i]), layer, side)
    return best


def run(paths: list[Path], detectors: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        table, truth = load_suite_entry(path)
        ids = np.asarray(table.ids, dtype=object)
        poisoned = list(ids[truth])
        o_f1, o_layer, o_side = oracle_f1(np.asarray(table.entropy, np.float64), truth)
        for name in detectors:
            t0 = time.time()
            det = detect(table, None, name)
            m = precision_recall_f1(det.flagged_ids, poisoned)
            rows.append({"table": path.name, "n": table.num_samples, "poisoned": int(truth.sum()), "detector": name,
                         "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
                         "flag_rate": det.n_flagged / max(table.num_samples, 1), "verdict": det.verdict,
                         "oracle_f1": o_f1, "oracle": f"layer {o_layer} {o_side}" if o_layer >= 0 else "-",
                         "seconds": time.time() - t0})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="suite directories or table files")
    ap.add_argument("--detectors", default=",".join(sorted(DETECTORS)))
    args = ap.parse_args(argv)
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
    detectors = [d for d in args.detectors.split(",") if d]
    rows = run(files, detectors)
    print("| table | N | poisoned | detector | P | R | F1 | flagged | oracle F1 | verdict |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        oracle = f"{r['oracle_f1']:.2f} ({r['oracle']})" if r["poisoned"] else "-"
        print(f"| {r['table']} | {r['n']} | {r['poisoned']} | {r['detector']} | {r['precision']:.2f} | "
              f"{r['recall']:.2f} | {r['f1']:.2f} | {100 * r['flag_rate']:.1f}% | {oracle} | {r['verdict']} |")
    for name in detectors:
        clean = [r["flag_rate"] for r in rows if r["detector"] == name and r["poisoned"] == 0]
        if clean:
            print(f"{name}: clean uploads {len(clean)}, flag rate mean {100 * np.mean(clean):.2f}% "
                  f"max {100 * np.max(clean):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
