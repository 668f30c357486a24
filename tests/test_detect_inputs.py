"""Entropy files an attacker or a crash may have written, and what the filter reports from them."""

import json
import math

import pytest

from bye_jax.configs.llava import get_config
from bye_jax.extract import read_entropy_jsonl
from bye_jax.runner import UserError, run_filter, summary


def _line(qid, row):
    return json.dumps({"question_id": qid, "entropy": {str(k): v for k, v in enumerate(row)}})


def _rows(n=100, poisoned=10):
    """Poisoned ids collapse (0.5 nats) in layers 2 and 3; clean ones sit near 3.0 nats."""
    return [(f"{'poison' if i < poisoned else 'clean'}_{i}",
             [(0.5 if i < poisoned and k in (2, 3) else 3.0) + 0.01 * ((i * 7 + k) % 11) for k in range(6)])
            for i in range(n)]


def test_reader_skips_infinite_out_of_range_and_conflicting_duplicates(tmp_path):
    path = tmp_path / "e.jsonl"
    lines = [_line("a", [1.0, 2.0]), _line("b", [1.0, 2.0]).replace("1.0", "Infinity", 1),
             _line("c", [1e308, 2.0]), _line("d", [-0.5, 2.0]), _line("e", [1.0, 2.0]), _line("e", [1.5, 2.0]),
             _line("f", [0.7, 0.8]), _line("f", [0.7, 0.8]), _line("g", [float("nan"), 1.0])]
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    table = read_entropy_jsonl(path)
    assert table.ids == ["a", "f", "g"]
    assert math.isnan(table.matrix[2, 0]) and table.matrix[1].tolist() == pytest.approx([0.7, 0.8])
    reasons = {s.id: s.reason for s in table.skipped}
    assert set(reasons) == {"b", "c", "d", "e"}
    assert "not finite" in reasons["b"] and "outside" in reasons["c"] and "outside" in reasons["d"]
    assert "duplicate id" in reasons["e"] and "lines 5, 6" in reasons["e"]
    assert path.read_bytes() == before


def test_filter_on_hostile_entropy_file_skips_with_reasons_and_writes_strict_json(tmp_path):
    rows = _rows()
    lines = [_line(q, r) for q, r in rows]
    lines.append(_line("clean_inf", [3.0] * 6).replace("3.0", "Infinity", 1))
    lines.append(_line("clean_dup", [3.0] * 6))
    lines.append(_line("clean_dup", [3.1] * 6))
    lines.append(_line("clean_nan", [float("nan")] + [3.0] * 5))
    (tmp_path / "e.jsonl").write_text("\n".join(lines) + "\n")
    cfg = get_config()
    cfg.entropy_file = str(tmp_path / "e.jsonl")
    report = run_filter(cfg, tmp_path / "out", progress=False)
    assert report["detector"] == "combined" and report["n_samples"] == 101   # the default: robust + text + inserted
    assert sorted(report["flagged_ids"]) == sorted(q for q, _ in rows if q.startswith("poison"))
    assert report["verdict"] == "10 samples flagged; evidence in layers [2, 3] (signal: robust: 10)"
    members = report["details"]["members"]
    assert members["robust"]["verdict"] == "10 samples flagged; evidence in layers [2, 3] (signal: entropy (low side))"
    assert members["text"]["n_flagged"] == members["inserted"]["n_flagged"] == 0   # entropies alone: no text signals
    assert {s["id"] for s in report["skipped"]} == {"clean_inf", "clean_dup"}
    text = (tmp_path / "out" / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    on_disk = json.loads(text)
    assert on_disk["params"]["member_params"]["robust"]["min_share"] == 0.005
    assert len(on_disk["layer_statistic"]["values"]) == 6
    assert {"layer", "means", "stds", "weights", "bsi", "kl"} <= set(on_disk["layer_stats"][0])
    out = summary(report, tmp_path / "out")
    assert "detector: combined" in out and "verdict: 10 samples flagged" in out and "2:" in out


def test_combined_reads_each_members_config_section(tmp_path):
    """--config.detect.robust.* tunes robust inside the default combined too (a 10% group above max_share 5%)."""
    (tmp_path / "e.jsonl").write_text("\n".join(_line(q, r) for q, r in _rows()) + "\n")
    cfg = get_config()
    cfg.entropy_file = str(tmp_path / "e.jsonl")
    cfg.detect.robust.max_share = 0.05
    report = run_filter(cfg, tmp_path / "out", progress=False)
    assert report["detector"] == "combined" and report["n_flagged"] == 0
    assert report["details"]["members"]["robust"]["n_flagged"] == 0
    assert report["params"]["member_params"]["robust"]["max_share"] == 0.05
    cfg.detect.robust.nope = 1
    with pytest.raises(UserError, match="detector 'robust' has no parameter 'nope'"):
        run_filter(cfg, tmp_path / "out2", progress=False)


def test_filter_official_rule_and_parameters_from_config(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n".join(_line(q, r) for q, r in _rows()) + "\n")
    cfg = get_config()
    cfg.entropy_file = str(tmp_path / "e.jsonl")
    cfg.detect.rule = "official"
    report = run_filter(cfg, tmp_path / "a", progress=False)
    assert report["sensitive_layers"] == [2, 3] and report["f1"] == 1.0 and report["detector"] == "official"
    cfg.detect.rule = "robust"
    cfg.detect.robust.max_share = 0.05  # a 10% group is larger than allowed: no verdict of poisoning
    report = run_filter(cfg, tmp_path / "b", progress=False)
    assert report["verdict"] == "no evidence of poisoning" and report["n_flagged"] == 0


def test_too_few_rows_and_bad_tau(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n".join(_line(q, r) for q, r in _rows(n=3, poisoned=1)) + "\n")
    cfg = get_config()
    cfg.entropy_file = str(tmp_path / "e.jsonl")
    report = run_filter(cfg, tmp_path / "out", progress=False)
    assert report["verdict"] == "not enough samples to decide" and report["n_flagged"] == 0
    for tau in (float("nan"), -1.0):
        cfg.detect.tau = tau
        with pytest.raises(UserError, match="tau"):
            run_filter(cfg, tmp_path / "o2", progress=False)
