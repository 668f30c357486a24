"""`python -m bye_jax.filter` / `bye_jax.extract` end to end on a tiny checkpoint, and its failures."""

import json
import subprocess
import sys

import pytest
from test_extract import make_dataset
from tiny_checkpoints import make_tiny_llava

from bye_jax.configs.llava import get_config
from bye_jax.extract import read_entropy_jsonl
from bye_jax.runner import UserError, run_filter

BAD_RECORDS = [
    {"id": "escape", "image": "../outside.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},
    {"id": "nofile", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},
    {"id": "s1", "image": "1.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},  # duplicate
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = make_tiny_llava(root / "ckpt", text_layers=3, seed=4)
    ann, images = make_dataset(root, n=12, extra=BAD_RECORDS)
    return ckpt, ann, images


def _cli(module, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_filter_end_to_end(data, tmp_path):
    ckpt, ann, images = data
    before = ann.read_bytes()
    out = tmp_path / "out"
    r = _cli("bye_jax.filter", "--config=bye_jax/configs/llava.py", f"--config.model={ckpt}",
             f"--config.data.annotations={ann}", f"--config.data.image_root={images}", "--config.batch_size=4",
             f"--workdir={out}", cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "samples: 12" in r.stdout and "skipped: 3" in r.stdout
    assert ann.read_bytes() == before
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert str(out) not in text and str(images) not in text  # no server paths (issue 14)
    assert report["files"][:2] == ["report.json", "entropy.jsonl"] and "attention_heatmaps.png" in report["files"]
    for key in ("n_samples", "n_skipped", "skipped", "num_layers", "sensitive_layers", "layer_stats",
                "flagged_ids", "n_flagged", "precision", "recall", "f1"):
        assert key in report, key
    assert report["n_samples"] == 12 and report["num_layers"] == 3
    timing = report["extract_timing"]  # compilation (each shape's first batch) apart from the steady state
    assert timing["compiled_shapes"] >= 1 and 0 < timing["compile_seconds"] <= timing["seconds"]
    assert {s["id"] for s in report["skipped"]} == {"escape", "nofile", "s1"}
    assert all(s["reason"] for s in report["skipped"])
    assert {"layer", "means", "stds", "weights", "bsi", "kl"} <= set(report["layer_stats"][0])
    records = json.loads(before)
    clean = json.loads((out / "clean.json").read_text())
    flagged = json.loads((out / "flagged.json").read_text())
    flagged_ids = set(report["flagged_ids"])
    assert [r["id"] for r in flagged] == [r["id"] for r in records[:12] if r["id"] in flagged_ids]
    assert clean == [r for r in records[:12] if r["id"] not in flagged_ids]
    table = read_entropy_jsonl(out / "entropy.jsonl")
    assert sorted(table.ids) == sorted(r["id"] for r in records[:12])
    assert (out / "layer_separation.png").stat().st_size > 1000
    assert (out / "attention_heatmaps.png").stat().st_size > 1000

    # Clustering an existing entropy.jsonl (no model) reproduces the same decision.
    cfg = get_config()
    cfg.entropy_file = str(out / "entropy.jsonl")
    cfg.data.annotations = str(ann)
    cfg.data.image_root = str(images)
    again = run_filter(cfg, tmp_path / "again", progress=False)
    assert again["flagged_ids"] == report["flagged_ids"]
    assert again["sensitive_layers"] == report["sensitive_layers"]
    assert json.loads((tmp_path / "again" / "clean.json").read_text()) == clean


def test_entropy_file_without_annotations_uses_ids_as_ground_truth(tmp_path):
    lines = [json.dumps({"question_id": f"{'poison' if i < 10 else 'clean'}_{i}",
                         "entropy": {str(k): (0.5 if i < 10 and k in (2, 3) else 3.0) + 0.01 * ((i * 7 + k) % 11)
                                     for k in range(6)}}) for i in range(100)]
    (tmp_path / "e.jsonl").write_text("\n".join(lines) + "\n")
    cfg = get_config()
    cfg.entropy_file = str(tmp_path / "e.jsonl")
    report = run_filter(cfg, tmp_path / "out", progress=False)
    assert report["sensitive_layers"] == [2, 3]
    assert sorted(report["flagged_ids"]) == sorted(f"poison_{i}" for i in range(10))
    assert report["f1"] == 1.0
    assert not (tmp_path / "out" / "clean.json").exists()  # no annotations: nothing to clean


@pytest.mark.parametrize("args, message", [
    (["--config.data.annotations=/nonexistent/train.json"], "train.json"),
    (["--config.dtype=float64"], "dtype"),
    (["--config.detect.rule=magic"], "rule"),
])
def test_bad_config_fails_in_one_line(data, tmp_path, args, message):
    ckpt, ann, images = data
    base = [f"--config.model={ckpt}", f"--config.data.annotations={ann}", f"--workdir={tmp_path}"]
    r = _cli("bye_jax.filter", f"--config={get_config.__module__.replace('.', '/')}.py", *base, *args,
             cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr, r.stderr


def test_checkpoint_that_does_not_load_fails_in_one_line(data, tmp_path):
    _, ann, images = data
    bogus = tmp_path / "ckpt"
    bogus.mkdir()
    (bogus / "config.json").write_text("{not json")
    r = _cli("bye_jax.extract", "--config=bye_jax/configs/llava.py", f"--config.model={bogus}",
             f"--config.data.annotations={ann}", f"--config.data.image_root={images}", f"--workdir={tmp_path / 'o'}",
             cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "does not load" in err[0], r.stderr


def test_unreadable_annotations_raise_user_error(tmp_path):
    (tmp_path / "a.json").write_text("[{")
    cfg = get_config()
    cfg.model = str(tmp_path)
    cfg.data.annotations = str(tmp_path / "a.json")
    with pytest.raises(UserError, match="a.json"):
        run_filter(cfg, tmp_path / "o", progress=False)
