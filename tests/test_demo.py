"""The built-in demo's whole loop on a very small setting (minutes of CPU in the real demo, seconds here)."""

import json

from bye_jax.configs.demo import get_config
from bye_jax.demo import run_demo


def test_demo_pipeline_end_to_end_small(tmp_path, capsys):
    c = get_config()
    c.data.n_pretrain, c.data.n_upload, c.data.n_test = 48, 40, 12
    c.arch.update(dict(image_size=24, patch_size=8, vision_hidden=32, text_hidden=32, text_layers=2,
                       intermediate=64))
    c.pretrain.epochs, c.finetune.epochs = 1, 1
    c.pretrain.batch_size = c.finetune.batch_size = 8
    c.eval.batch_size, c.batch_size = 12, 8
    c.plots.heatmaps_suspicious, c.plots.heatmaps_typical = 2, 1
    assert run_demo(c, tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for row in ("vanilla", "random_drop", "bye", "base"):
        assert set(results[row]) == {"cp", "asr"}
        assert 0 <= results[row]["cp"] <= 100 and 0 <= results[row]["asr"] <= 100
    assert set(results["detection"]) == {"precision", "recall", "f1"}
    assert "| Vanilla FT |" in (tmp_path / "results.md").read_text()
    upload = json.loads((tmp_path / "data/upload/train.json").read_text())
    assert sum(r["poisoned"] for r in upload) == 4  # 10% of 40, centre patch
    report = json.loads((tmp_path / "filter/report.json").read_text())
    clean = json.loads((tmp_path / "filter/clean.json").read_text())
    assert len(clean) == 40 - report["n_flagged"]
    assert json.loads((tmp_path / "random_drop/train.json").read_text()).__len__() == 32
    for model in ("base", "vanilla/merged", "bye/merged", "random_drop/merged"):
        assert (tmp_path / model / "model.safetensors").exists()
    out = capsys.readouterr().out
    assert "Detection (BYE)" in out and "for comparison, the official rule" in out
    # A rerun reuses every cached stage.
    assert run_demo(c, tmp_path) == 0
    out = capsys.readouterr().out
    assert "base model: cached" in out and "demo data: cached" in out
    assert "fine-tuning on" not in out and "evaluating" not in out  # nothing is recomputed


def test_pipeline_command_needs_its_inputs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "bye_jax.pipeline", f"--workdir={tmp_path}",
                        "--config.model=/nonexistent"], capture_output=True, text=True, timeout=300,
                       cwd=str(Path(__file__).parents[1]))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["bye_jax.pipeline: error: config.data.annotations is empty"]


def _small_config():
    c = get_config()
    c.data.n_pretrain, c.data.n_upload, c.data.n_test = 48, 40, 12
    c.arch.update(dict(image_size=24, patch_size=8, vision_hidden=32, text_hidden=32, text_layers=2,
                       intermediate=64))
    c.pretrain.epochs, c.finetune.epochs = 1, 1
    c.pretrain.batch_size = c.finetune.batch_size = 8
    return c


def test_run_seed_drives_the_fine_tunes_but_not_the_base():
    from bye_jax.demo import base_recipe

    c = get_config()
    recipe = base_recipe(c)
    c.seed = 3
    assert (c.finetune.seed, c.pretrain.seed) == (3, 0)
    assert base_recipe(c) == recipe
    c.base_seed = 1
    assert c.pretrain.seed == 1 and base_recipe(c) != recipe
    c.base_seed, c.finetune.lr = 0, 1e-2  # the base does not depend on the fine-tune either
    assert base_recipe(c) == recipe
    c.pretrain.lr = 1e-2
    assert base_recipe(c) != recipe


def test_build_base_uses_a_shipped_base_only_when_its_recipe_matches(tmp_path, monkeypatch, capsys):
    import bye_jax.demo as demo

    c = _small_config()
    built = demo.build_base(c, tmp_path / "a" / "base")
    assert "pre-training the base model" in capsys.readouterr().out
    assert json.loads((built / demo.RECIPE_FILE).read_text()) == demo.base_recipe(c)
    monkeypatch.setattr(demo, "BASE_ASSET", built)  # as if it shipped in the package
    c.seed = 5  # another run seed: same base
    copy = demo.build_base(c, tmp_path / "b" / "base")
    out = capsys.readouterr().out
    assert "shipped in the package" in out and "pre-training" not in out
    assert (copy / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert "cached" in (demo.build_base(c, copy), capsys.readouterr().out)[1]
    c.base_seed = 1  # another base: pre-trained, and the stale cached one is replaced
    other = demo.build_base(c, copy)
    out = capsys.readouterr().out
    assert "other settings: rebuilding" in out and "pre-training the base model" in out
    assert (other / "model.safetensors").read_bytes() != (built / "model.safetensors").read_bytes()



def test_shipped_base_matches_the_default_demo_config():
    from bye_jax.demo import BASE_ASSET, RECIPE_FILE, base_recipe
    from bye_jax.models.family import load_config

    assert (BASE_ASSET / "model.safetensors").exists(), "run python -m bye_jax.demo_base"
    assert json.loads((BASE_ASSET / RECIPE_FILE).read_text()) == base_recipe(get_config()), \
        "the demo config changed: rebuild the shipped base with python -m bye_jax.demo_base"
    size = sum(f.stat().st_size for f in BASE_ASSET.iterdir())
    assert size < 10e6, size
    cfg = load_config(BASE_ASSET)
    arch = get_config().arch
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.vision.image_size) == \
        (arch.text_hidden, arch.text_layers, arch.image_size)


def test_small_demo_learns_the_backdoor_and_detection_finds_it(tmp_path, capsys):
    """The shipped base and the demo's own fine-tune recipe on 320 uploaded samples, 25% poisoned: the whole
    loop in a few CPU minutes. The setting was chosen by the attack's success (with 10% of 320 the vanilla ASR
    was 42 / 12 / 48 for seeds 0 / 1 / 2; with 25%: 93 / 98 / 98). Measured on it (benchmarks/explore_demo.py
    --variant=u320p25, 2-core AMD EPYC, 2026-12-03), the default detector's co-location group was 3.5 / 4.7 /
    6.0 x the next token's excess (the gate is 2), P / R 0.90 / 0.56, 0.96 / 0.95, 0.96 / 0.88. The former
    setting (160 samples, lr 3e-3, 40 epochs) sat at 1.9-2.1 x: found or missed depending on the CPU. The
    bounds sit below the worst of those seeds (recall 0.56 on seed 0, the one run here), since float results
    differ between CPUs; the gate's margin is what makes "found" hold across machines."""
    c = get_config()
    c.data.n_upload, c.data.poison_rate, c.data.n_test = 320, 0.25, 60
    c.data.random_drop = 0  # no Random Drop baseline (test_demo_pipeline_end_to_end_small runs it)
    c.plots.heatmaps_suspicious, c.plots.heatmaps_typical = 2, 1
    assert run_demo(c, tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert "random_drop" not in results and not (tmp_path / "random_drop").exists()
    assert "| Random Drop |" not in (tmp_path / "results.md").read_text()
    assert "the pre-trained base shipped in the package" in capsys.readouterr().out  # no pre-training here
    assert results["vanilla"]["asr"] >= 80, results          # the attack took
    assert results["detection"]["precision"] >= 0.8, results  # and the default detector found it
    assert results["detection"]["recall"] >= 0.4, results
    kept = json.loads((tmp_path / "filter/clean.json").read_text())
    assert sum(r["poisoned"] for r in kept) <= 48, results  # BYE re-fine-tunes on at most 60% of the poison
