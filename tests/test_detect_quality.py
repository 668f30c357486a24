"""benchmarks/detect_quality.py: suite entries from demo run folders (signals.npz + the upload's labels)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from bye_jax.signals import SignalTable, save_npz

_spec = importlib.util.spec_from_file_location("detect_quality",
                                               Path(__file__).parents[1] / "benchmarks" / "detect_quality.py")
detect_quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(detect_quality)


def _run(root: Path, ids, poisoned, extra_ids=()):
    (root / "filter").mkdir(parents=True)
    (root / "data" / "upload").mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_npz(SignalTable(list(ids), {"entropy": rng.random((len(ids), 3)).astype(np.float32)}),
             root / "filter" / "signals.npz")
    rows = [{"id": i, "poisoned": p} for i, p in zip(ids, poisoned, strict=True)] + [{"id": i} for i in extra_ids]
    (root / "data" / "upload" / "train.json").write_text(json.dumps(rows))


def test_run_folder_labels_come_from_the_annotations(tmp_path, capsys):
    ids = [f"up{i:03d}" for i in range(30)]          # no "poison" in the ids: the field is the truth
    poisoned = [i % 10 == 0 for i in range(30)]
    _run(tmp_path / "run_a", ids, poisoned, extra_ids=["skipped_sample"])
    table, truth = detect_quality.load_suite_entry(tmp_path / "run_a")
    assert table.ids == ids and truth.tolist() == poisoned
    assert detect_quality.main([str(tmp_path / "run_a"), "--detectors=official"]) == 0
    out = capsys.readouterr().out
    assert "| run_a | 30 | 3 | official |" in out


def test_run_folder_with_ids_missing_from_the_labels_is_refused(tmp_path):
    _run(tmp_path / "run_b", ["a", "b"], [True, False])
    (tmp_path / "run_b" / "data" / "upload" / "train.json").write_text(json.dumps([{"id": "a", "poisoned": True}]))
    with pytest.raises(ValueError, match="1 table ids not in"):
        detect_quality.load_suite_entry(tmp_path / "run_b")
