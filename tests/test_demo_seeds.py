"""benchmarks/demo_seeds.py: rows, targets and the worst case from results.json dicts."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("demo_seeds", Path(__file__).parents[1] / "benchmarks" / "demo_seeds.py")
demo_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_seeds)


def _results(van_cp, van_asr, bye_cp, bye_asr, f1):
    return {"base": {"cp": 80.0, "asr": 0.0}, "vanilla": {"cp": van_cp, "asr": van_asr},
            "bye": {"cp": bye_cp, "asr": bye_asr}, "random_drop": {"cp": 1.0, "asr": 1.0},
            "detection": {"precision": 1.0, "recall": f1, "f1": f1}, "detection_paper_rule": {"f1": 0.5}}


def test_rows_targets_and_worst_case():
    good = demo_seeds.row_of(0, _results(90.0, 95.0, 89.0, 1.0, 0.95), minutes=6.0)
    assert all(good["ok"].values())
    bad = demo_seeds.row_of(1, _results(88.0, 60.0, 84.0, 3.0, 0.5), minutes=11.0)
    assert [k for k, ok in bad["ok"].items() if not ok] == list(bad["ok"])  # every target missed
    worst = demo_seeds.worst_case([good, bad])
    assert (worst["vanilla_asr"], worst["bye_asr"], worst["f1"], worst["bye_cp"], worst["minutes"]) == \
        (60.0, 3.0, 0.5, 84.0, 11.0)
    assert not worst["all_ok"]
    md = demo_seeds.table([good, bad])
    assert md.count("\n") == 4 and "| worst |" in md and "FAIL: vanilla ASR >= 90" in md
