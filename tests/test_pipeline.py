"""The pipeline's stage caching (reruns what changed, nothing else), one unit for detection metrics, its
config left untouched, TFDS data, and progress output that stays short in a log."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bye_jax.progress import PlainProgress, progress
from bye_jax.stages import FileDigests, Stage, config_items, digest_samples

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ progress


def test_plain_progress_prints_about_ten_lines_for_a_long_loop(capsys):
    bar = progress(5000, "train", unit="step")  # stdout is captured, not a terminal
    assert isinstance(bar, PlainProgress)
    with bar:
        for i in range(5000):
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
            bar.update(1)
    lines = capsys.readouterr().out.splitlines()
    assert 10 <= len(lines) <= 12, lines
    assert all(line.startswith("train: ") for line in lines)
    assert lines[0].startswith("train: 500/5000 (10%)") and "step/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("train: 5000/5000 (100%)") and "loss=0.0002" in lines[-1]


def test_plain_progress_time_lines_resume_and_early_stop():
    out = io.StringIO()
    bar = PlainProgress(100, "eval", "sample", initial=40, interval=0.0, stream=out)  # every update is late
    bar.update(3)
    bar.update(2)
    assert out.getvalue().splitlines()[0].startswith("eval: 43/100 (43%)")
    assert len(out.getvalue().splitlines()) == 2
    out2 = io.StringIO()
    early = PlainProgress(1000, "extract", "sample", stream=out2)
    early.update(7)
    early.close()  # stopped before the first 10%: says where
    assert out2.getvalue().splitlines() == [out2.getvalue().splitlines()[0]]
    assert out2.getvalue().startswith("extract: 7/1000 (1%)")


def test_progress_is_a_bar_on_a_terminal_and_silent_when_disabled(monkeypatch, capsys):
    from tqdm import tqdm

    monkeypatch.setattr("bye_jax.progress._interactive", lambda: True)
    bar = progress(10, "x")
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = progress(10, "x", enabled=False)
    quiet.update(10)
    quiet.close()
    assert "x:" not in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- stages


def test_stage_states_and_what_prepare_clears(tmp_path):
    out = tmp_path / "s" / "result.txt"
    make = lambda lr: Stage(tmp_path / "s", "toy", {"finetune.lr": lr}, {"data": "abc"})  # noqa: E731
    st = make(0.1)
    assert st.state() == "new" and not st.prepare([out])
    out.write_text("half")  # killed before done(): same identity resumes on what it left
    assert make(0.1).state() == "partial" and not make(0.1).prepare([out]) and out.read_text() == "half"
    make(0.1).done({"n": 1})
    assert make(0.1).state() == "done" and make(0.1).prepare([out]) and out.exists()
    assert make(0.2).state() == "stale" and make(0.2).changes() == ["finetune.lr"]
    logs = []
    assert not make(0.2).prepare([out], log=logs.append) and not out.exists()
    assert logs == ["toy: rerun, changed: finetune.lr"]
    rec = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert rec["status"] == "running" and rec["config"] == {"finetune.lr": 0.2} and rec["inputs"] == {"data": "abc"}
    assert Stage(tmp_path / "s", "toy", {"finetune.lr": 0.2}, {"data": "abd"}).changes() == ["input data"]


def test_config_items_and_digests(tmp_path):
    from bye_jax.configs.pipeline import get_config
    from bye_jax.data.llava_json import load_dataset

    c = get_config()
    items = config_items(c, "detect", "seed")
    assert {k: items[k] for k in ("detect.rule", "detect.tau", "seed")} == {"detect.rule": "combined",
                                                                           "detect.tau": 2.0, "seed": 0}
    assert any(k.startswith("detect.robust.") for k in items)  # each detector's own section counts too
    assert all(k.startswith("detect.") or k == "seed" for k in items)
    assert "finetune.lora.rank" in config_items(c, "finetune")
    kept = config_items(c, "finetune", exclude=("finetune.data.tfds", "finetune.lr"))
    assert "finetune.lr" not in kept and "finetune.lora.rank" in kept and "finetune.data.max_image_pixels" in kept
    assert not any(k.startswith("finetune.data.tfds.") for k in kept)
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    digests = FileDigests(tmp_path / "memo.json")
    first = digests.path(f)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert FileDigests(tmp_path / "memo.json").memo[str(f.resolve())][2] == first  # remembered on disk
    f.write_bytes(b"abd")
    assert digests.path(f) != first
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    d1 = digests.path(tmp_path / "d")
    (tmp_path / "d" / "a").write_text("2")
    assert digests.path(tmp_path / "d") != d1

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    rec = {"id": "a", "image": "i.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                           {"from": "gpt", "value": "x"}]}
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    (tmp_path / "b.json").write_text(json.dumps([{**rec, "conversations": [rec["conversations"][0],
                                                                           {"from": "gpt", "value": "y"}]}]))
    a, b = (load_dataset(tmp_path / n)[0] for n in ("a.json", "b.json"))
    assert digest_samples(a) == digest_samples(load_dataset(tmp_path / "a.json")[0]) != digest_samples(b)


# ------------------------------------------------------------------------------------ the pipeline


def tiny_config(model_dir):
    """The pipeline on the tiny random checkpoint: one short LoRA epoch, a few generated tokens."""
    from bye_jax.configs.pipeline import get_config

    c = get_config()
    c.model = str(model_dir)
    c.data.target = "red"
    c.batch_size, c.plots.enabled = 4, False
    c.finetune.lora.rank, c.finetune.lora.alpha = 4, 8.0
    c.finetune.epochs, c.finetune.batch_size, c.finetune.grad_accum, c.finetune.checkpoint_every = 1, 4, 1, 0
    c.eval.batch_size, c.eval.max_new_tokens = 6, 2
    # the reference rule (robust needs >= 20 samples to decide; these 12 are about caching, not detection);
    # this random model's layers separate by more than tau = 1: some samples are flagged
    c.detect.rule, c.detect.tau = "official", 1.0
    return c


def _records(root: Path) -> dict[str, int]:
    """mtime of every stage record (rewritten whenever its stage runs)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*stage.json")}


def _changed(before: dict, after: dict) -> set[str]:
    assert set(after) == set(before)
    return {k for k in before if after[k] != before[k]}


@pytest.fixture(scope="module")
def json_run(tmp_path_factory, tiny_llava_dir):
    """One pipeline run on 12 LLaVA-JSON samples (3 poisoned by id); later tests rerun it in place."""
    from test_extract import make_dataset

    from bye_jax.pipeline import load_samples, run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    ann, images = make_dataset(root / "data", n=12)
    samples = load_samples(ann, images)
    test, triggered = samples[:6], samples[6:]
    c = tiny_config(tiny_llava_dir)
    c.data.annotations, c.data.image_root = str(ann), str(images)
    c.lock()
    before = c.to_dict()
    run_pipeline(c, root / "out", tiny_llava_dir, None, test, triggered)
    assert c.to_dict() == before  # the caller's config is not modified
    assert json.loads((root / "out/filter/report.json").read_text())["n_flagged"] > 0
    return c, root / "out", test, triggered


def test_rerun_with_nothing_changed_recomputes_nothing(json_run, tiny_llava_dir, capsys):
    from bye_jax.pipeline import run_pipeline

    c, out, test, triggered = json_run
    records = _records(out)
    assert set(records) == {"vanilla/stage.json", "filter/stage.json", "filter/entropy_stage.json", "bye/stage.json",
                            "random_drop/stage.json", "eval/vanilla/stage.json", "eval/bye/stage.json",
                            "eval/random_drop/stage.json", "eval/base/stage.json"}
    assert all(json.loads((out / k).read_text())["status"] == "done" for k in records)
    merged = (out / "vanilla/merged/model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    run_pipeline(c, out, tiny_llava_dir, None, test, triggered)
    assert _records(out) == records
    assert (out / "vanilla/merged/model.safetensors").stat().st_mtime_ns == merged
    log = capsys.readouterr().out
    for name in ("vanilla", "BYE filter", "BYE", "random drop", "evaluation of vanilla", "evaluation of base"):
        assert f"{name}: cached" in log
    assert "fine-tuning on" not in log and "evaluating" not in log and "entropies of the" not in log


def test_changed_detect_tau_reruns_the_filter_not_the_vanilla_finetune(json_run, tiny_llava_dir, capsys):
    """The filter reruns on the cached entropies; so do the BYE fine-tune, whose clean.json changed, and its
    evaluation; the vanilla fine-tune, Random Drop and their evaluations do not."""
    from bye_jax.pipeline import run_pipeline

    c, out, test, triggered = json_run
    before = _records(out)
    c2 = c.copy_and_resolve_references()
    with c2.unlocked():
        c2.detect.tau = 1e9  # nothing separates by a billion standard deviations: nothing is flagged
    capsys.readouterr()
    run_pipeline(c2, out, tiny_llava_dir, None, test, triggered)
    assert _changed(before, _records(out)) == {"filter/stage.json", "bye/stage.json", "eval/bye/stage.json"}
    log = capsys.readouterr().out
    assert "BYE filter: rerun, changed: detect.tau" in log and "BYE: LoRA fine-tuning on 12 samples" in log
    assert "vanilla: cached" in log and "attention entropies: cached" in log
    assert json.loads((out / "filter/report.json").read_text())["n_flagged"] == 0
    assert json.loads((out / "bye/train_metrics.json").read_text())["n_examples"] == 12


def test_changed_finetune_setting_reruns_every_finetune(json_run, tiny_llava_dir):
    from bye_jax.pipeline import run_pipeline

    c, out, test, triggered = json_run
    before = _records(out)
    c2 = c.copy_and_resolve_references()
    with c2.unlocked():
        c2.detect.tau = 1e9
        c2.finetune.lr = 1e-3
        c2.finetune.checkpoint_every = 7  # bookkeeping only: not part of any identity
    run_pipeline(c2, out, tiny_llava_dir, None, test, triggered)
    # every fine-tune and what reads one; only the base model's evaluation stays
    assert _changed(before, _records(out)) == set(before) - {"eval/base/stage.json"}
    assert json.loads((out / "vanilla/stage.json").read_text())["config"]["finetune.lr"] == 1e-3


def test_results_units_and_the_tables_command_agree_with_results_md(json_run):
    _, out, _, _ = json_run
    results = json.loads((out / "results.json").read_text())
    assert results["units"] == {"cp": "percent", "asr": "percent", "detection": "fraction"}
    report = json.loads((out / "filter/report.json").read_text())
    for k in ("precision", "recall", "f1"):
        assert results["detection"][k] == report[k] and 0 <= results["detection"][k] <= 1
    for key in ("vanilla", "random_drop", "bye", "base"):
        ev = json.loads((out / "eval" / key / "eval.json").read_text())
        assert results[key] == {"cp": ev["cp"], "asr": ev["asr"]}
    r = subprocess.run([sys.executable, "-m", "bye_jax.eval.tables", f"--vanilla={out / 'eval/vanilla/eval.json'}",
                        f"--random_drop={out / 'eval/random_drop/eval.json'}", f"--bye={out / 'eval/bye/eval.json'}",
                        f"--report={out / 'filter/report.json'}"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    md = (out / "results.md").read_text()
    assert r.stdout in md  # the same table and detection line, in the same unit
    det = results["detection"]
    assert (f"Detection (BYE) P / R / F1 (%): {100 * det['precision']:.2f} / {100 * det['recall']:.2f} / "
            f"{100 * det['f1']:.2f}") in md


def test_evaluation_loads_in_the_configured_dtype_and_fails_in_one_line(tmp_path, monkeypatch):
    import bye_jax.models.family as family
    import bye_jax.models.hf_loader as hf_loader
    from bye_jax.configs.pipeline import get_config
    from bye_jax.pipeline import _evaluate
    from bye_jax.runner import UserError

    c = get_config()
    c.dtype, c.attn_impl = "bfloat16", "xla"
    seen = {}

    def fake_load(path, dtype, attn_impl, **kw):
        seen.update(dtype=dtype, attn_impl=attn_impl)
        raise hf_loader.CheckpointError("no model.safetensors\n in it")

    monkeypatch.setattr(family, "load_model", fake_load)
    with pytest.raises(UserError) as e:
        _evaluate(c, "vanilla", tmp_path / "ckpt", "digest", [], [], tmp_path)
    assert seen == {"dtype": "bfloat16", "attn_impl": "xla"}
    assert str(e.value) == f"checkpoint {tmp_path / 'ckpt'} does not load: no model.safetensors in it"
    assert json.loads((tmp_path / "eval/vanilla/stage.json").read_text())["status"] == "running"  # not done


# --------------------------------------------------------------------------------------------- TFDS


def test_pipeline_on_tfds_data(tmp_path, tiny_llava_dir):
    pytest.importorskip("tensorflow_datasets")
    from test_tfds import BAD, MAX_PIXELS, N_GOOD, write_tfds

    from bye_jax.pipeline import load_split, run_pipeline

    builder = write_tfds(tmp_path / "tfds", "tiny_vqa_pipeline", "tfrecord")
    c = tiny_config(tiny_llava_dir)
    for name, split in (("data", "train"), ("test", "train[:6]"), ("triggered", "train[6:12]")):
        c[name].source = "tfds"
        c[name].tfds.builder_dir = str(builder)
        c[name].tfds.split = split
    c.data.tfds.poisoned_key = "meta/poisoned"
    c.data.max_image_pixels = MAX_PIXELS
    test, triggered = (load_split(c[n], f"config.{n}", MAX_PIXELS).samples for n in ("test", "triggered"))
    results = run_pipeline(c, tmp_path / "out", tiny_llava_dir, None, test, triggered)
    report = json.loads((tmp_path / "out/filter/report.json").read_text())
    assert report["n_samples"] == N_GOOD and report["n_skipped"] == len(BAD) and report["n_poisoned"] == 3
    assert report["n_flagged"] > 0
    clean = json.loads((tmp_path / "out/filter/clean.json").read_text())
    assert all(r["tfds"]["builder_dir"] == str(builder) for r in clean)
    bye = json.loads((tmp_path / "out/bye/train_metrics.json").read_text())
    assert bye["n_examples"] == len(clean) == N_GOOD - report["n_flagged"]  # clean.json re-selected from TFDS
    drop = json.loads((tmp_path / "out/random_drop/train_metrics.json").read_text())
    assert drop["n_examples"] == round(N_GOOD * 0.8)
    assert results["vanilla"]["cp"] is not None and results["units"]["detection"] == "fraction"
    ev = json.loads((tmp_path / "out/eval/vanilla/eval.json").read_text())
    assert ev["n_test"] == 6 and ev["n_triggered"] == 6
