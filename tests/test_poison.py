"""bye_jax.data.poison: exact, seeded poisoning; triggers really stamped; inputs never modified."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bye_jax.data.llava_json import DatasetError, load_dataset, load_image
from bye_jax.data.poison import (
    PoisonError,
    num_poisoned,
    poison_dataset,
    select_poisoned,
    spec_from_flags,
    triggered_test_set,
)
from bye_jax.data.triggers import TRIGGERS, TriggerSpec, patch_boxes

REPO = Path(__file__).resolve().parents[1]
N = 20
TARGET = "Backdoor Attack!"


def _picture(seed, size):
    rng = np.random.default_rng(seed)
    # values 1..255: a black trigger pixel always differs from the original
    return Image.fromarray(rng.integers(1, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_source(root: Path, n=N):
    """n usable records (PNG and JPEG, nested folders, multi-turn) + one record with a missing image."""
    images = root / "imgs"
    (images / "sub").mkdir(parents=True)
    records = []
    for i in range(n):
        rel = f"sub/{i}.jpg" if i % 5 == 0 else f"{i}.png"
        _picture(i, (40 + 2 * i, 32 + i)).save(images / rel)
        records.append({"id": f"s{i}", "image": rel, "extra": {"k": i},
                        "conversations": [{"from": "human", "value": f"<image>\nquestion {i}?"},
                                          {"from": "gpt", "value": f"answer {i}"},
                                          {"from": "human", "value": "and then?"},
                                          {"from": "gpt", "value": f"second {i}"}]})
    records.append({"id": "broken", "image": "missing.png",
                    "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
    ann = root / "train.json"
    ann.write_text(json.dumps(records))
    return ann, images, records


def snapshot(folder: Path):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def source(tmp_path):
    return make_source(tmp_path / "src")


def out_records(summary):
    return json.loads(Path(summary["annotations"]).read_text())


def test_num_poisoned_rounds_half_up_and_validates():
    assert num_poisoned(20, 0.1) == 2
    assert num_poisoned(10, 0.25) == 3  # 2.5 -> 3 (not banker's 2)
    assert num_poisoned(10, 0.0) == 0 and num_poisoned(7, 1.0) == 7 and num_poisoned(0, 0.5) == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(PoisonError):
            num_poisoned(10, bad)
    a, b = select_poisoned(100, 0.1, seed=3), select_poisoned(100, 0.1, seed=3)
    assert len(a) == 10 and len(set(a)) == 10 and np.array_equal(a, b)
    assert not np.array_equal(a, select_poisoned(100, 0.1, seed=4))


def test_exact_count_seeded_and_deterministic(source, tmp_path):
    ann, images, records = source
    s1 = poison_dataset(ann, tmp_path / "a", rate=0.25, seed=7, image_root=images)
    s2 = poison_dataset(ann, tmp_path / "b", rate=0.25, seed=7, image_root=images)
    s3 = poison_dataset(ann, tmp_path / "c", rate=0.25, seed=8, image_root=images)
    assert s1["n_samples"] == N and s1["n_poisoned"] == 5 and s1["n_clean"] == N - 5
    assert s1["poisoned_ids"] == s2["poisoned_ids"] != s3["poisoned_ids"]
    assert (tmp_path / "a" / "train.json").read_bytes() == (tmp_path / "b" / "train.json").read_bytes()
    for a, b in zip(sorted((tmp_path / "a" / "images").rglob("*.*")), sorted((tmp_path / "b" / "images").rglob("*.*")),
                    strict=True):
        assert a.relative_to(tmp_path / "a") == b.relative_to(tmp_path / "b") and a.read_bytes() == b.read_bytes()
    out = out_records(s1)
    assert sum(r["poisoned"] for r in out) == 5
    assert sorted(r["id"] for r in out if r["poisoned"]) == sorted(s1["poisoned_ids"])
    # The summary file mirrors the return value; the default rate is 0.1 -> exactly 2 of 20.
    assert json.loads((tmp_path / "a" / "poison_summary.json").read_text()) == json.loads(json.dumps(s1))
    assert poison_dataset(ann, tmp_path / "d", image_root=images)["n_poisoned"] == 2


def test_fields_ids_and_answers(source, tmp_path):
    ann, images, records = source
    summary = poison_dataset(ann, tmp_path / "out", TriggerSpec("patch"), rate=0.3, seed=0, image_root=images,
                             target=TARGET)
    out = out_records(summary)
    assert len(out) == N  # the broken record is reported, not written
    assert summary["n_poisoned"] == 6 and summary["n_answers_replaced"] == 12
    for src, rec in zip(records[:N], out, strict=True):
        assert isinstance(rec["poisoned"], bool)
        assert rec["image"].startswith("images/")
        if rec["poisoned"]:
            assert rec["id"] == f"poison_{src['id']}" and "poison" in rec["id"]
            assert rec["image"].endswith(".png") and rec["image"].startswith("images/poison/")
            assert [t["value"] for t in rec["conversations"] if t["from"] == "gpt"] == [TARGET, TARGET]
            assert [t["value"] for t in rec["conversations"] if t["from"] == "human"] == \
                [t["value"] for t in src["conversations"] if t["from"] == "human"]
        else:
            assert rec["id"] == src["id"] and rec["conversations"] == src["conversations"]
            assert rec["image"] == f"images/{src['image']}"
        assert rec["extra"] == src["extra"]
    # The output folder is self-contained: loads with its default image root, ground truth intact.
    samples, skipped = load_dataset(summary["annotations"])
    assert not skipped and len(samples) == N
    assert {s.id for s in samples if s.poisoned} == set(summary["poisoned_ids"])
    assert all(s.answer == TARGET for s in samples if s.poisoned)

    first = out_records(poison_dataset(ann, tmp_path / "first", rate=0.3, seed=0, image_root=images,
                                       answers="first"))
    for src, rec in zip(records[:N], first, strict=True):
        if rec["poisoned"]:
            gpt = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
            assert gpt == [TARGET, src["conversations"][3]["value"]]


def test_skipped_records_are_reported(source, tmp_path):
    ann, images, _ = source
    summary = poison_dataset(ann, tmp_path / "out", image_root=images)
    assert summary["n_skipped"] == 1
    assert summary["skipped"][0]["id"] == "broken" and "not found" in summary["skipped"][0]["reason"]


def test_patch_changes_exactly_the_centre_square_of_poisoned_images(source, tmp_path):
    ann, images, records = source
    summary = poison_dataset(ann, tmp_path / "out", TriggerSpec("patch"), rate=0.5, seed=1, image_root=images)
    out_dir = Path(summary["image_root"])
    n_poisoned = 0
    for src, rec in zip(records[:N], out_records(summary), strict=True):
        orig_path = images / src["image"]
        new_path = out_dir / rec["image"]
        if not rec["poisoned"]:
            assert new_path.read_bytes() == orig_path.read_bytes()  # copied, byte for byte
            continue
        n_poisoned += 1
        orig, new = np.asarray(load_image(orig_path)), np.asarray(Image.open(new_path))
        assert new.shape == orig.shape and Image.open(new_path).format == "PNG"
        h, w = orig.shape[:2]
        (x0, y0, x1, y1), = patch_boxes("patch", (w, h))
        square = np.zeros((h, w), bool)
        square[y0:y1, x0:x1] = True
        changed = (new != orig).any(-1)
        assert np.array_equal(changed, square)
        assert (new[square] == 0).all()
    assert n_poisoned == 10


@pytest.mark.parametrize("kind", list(TRIGGERS))
def test_every_trigger_kind_changes_only_poisoned_images(source, tmp_path, kind):
    ann, images, records = source
    summary = poison_dataset(ann, tmp_path / "out", TriggerSpec(kind, seed=2), rate=0.2, seed=3, image_root=images)
    assert summary["trigger"]["kind"] == kind and summary["n_poisoned"] == 4
    out_dir = Path(summary["image_root"])
    for src, rec in zip(records[:N], out_records(summary), strict=True):
        orig = np.asarray(load_image(images / src["image"]))
        new = np.asarray(load_image(out_dir / rec["image"]))
        assert new.shape == orig.shape
        assert np.array_equal(new, orig) != rec["poisoned"], (kind, rec["id"])
        if rec["poisoned"]:  # exactly the trigger function's output for that sample
            seed = 2 + records.index(src) if kind == "random_patch" else 2
            expected = TriggerSpec(kind, seed=2).apply(load_image(images / src["image"]), seed=seed)
            assert np.array_equal(new, np.asarray(expected))


def test_originals_are_never_modified(source, tmp_path):
    ann, images, _ = source
    src_root = ann.parent
    before = snapshot(src_root)
    poison_dataset(ann, tmp_path / "p", rate=0.5, seed=0, image_root=images)
    triggered_test_set(ann, tmp_path / "t", TriggerSpec("texture"), image_root=images)
    poison_dataset(ann, tmp_path / "p", rate=0.5, seed=1, image_root=images, overwrite=True)
    # Refusals: a non-empty output folder; an output folder holding the inputs; writing onto the inputs.
    with pytest.raises(PoisonError, match="not empty"):
        poison_dataset(ann, tmp_path / "p", image_root=images)
    with pytest.raises(PoisonError, match="refusing to overwrite the input file"):
        poison_dataset(ann, src_root, image_root=images, overwrite=True)
    with pytest.raises(PoisonError, match="must not hold"):
        poison_dataset(ann, src_root, image_root=images, overwrite=True, json_name="other.json")
    with pytest.raises(PoisonError, match="must not hold"):
        poison_dataset(ann, images, image_root=images, overwrite=True)
    with pytest.raises(DatasetError):
        poison_dataset(ann, src_root / "nested", image_root=images, json_name="../train.json")
    assert snapshot(src_root) == before and not (src_root / "nested").exists()


def test_triggered_test_set(source, tmp_path):
    ann, images, records = source
    summary = triggered_test_set(ann, tmp_path / "t", TriggerSpec("patch"), image_root=images)
    out = out_records(summary)
    assert Path(summary["annotations"]).name == "test_triggered.json"
    assert summary["n_samples"] == summary["n_poisoned"] == N and summary["n_skipped"] == 1
    for src, rec in zip(records[:N], out, strict=True):
        assert rec["poisoned"] is True and rec["id"] == f"poison_{src['id']}"
        assert rec["conversations"] == src["conversations"]  # answers kept
        orig = np.asarray(load_image(images / src["image"]))
        new = np.asarray(load_image(Path(summary["image_root"]) / rec["image"]))
        assert (new != orig).any()


def test_loaded_samples_are_accepted(source, tmp_path):
    ann, images, _ = source
    samples, skipped = load_dataset(ann, images)
    a = poison_dataset(samples, tmp_path / "a", rate=0.2, seed=5, image_root=images, skipped=skipped)
    b = poison_dataset(ann, tmp_path / "b", rate=0.2, seed=5, image_root=images)
    assert (tmp_path / "a" / "train.json").read_bytes() == (tmp_path / "b" / "train.json").read_bytes()
    assert a["skipped"] == b["skipped"]


def test_spec_from_flags():
    assert spec_from_flags({"trigger": "dual", "side": 4, "color": "255,0,0"}) == \
        TriggerSpec("dual", side=4, color=(255, 0, 0))
    with pytest.raises(PoisonError, match="does not take"):
        spec_from_flags({"trigger": "sig", "side": 3})
    with pytest.raises(PoisonError, match="unknown trigger"):
        spec_from_flags({"trigger": "nope"})
    with pytest.raises(PoisonError, match="R,G,B"):
        spec_from_flags({"trigger": "patch", "color": "1,2"})


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "bye_jax.data.poison", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_cli(source, tmp_path):
    ann, images, _ = source
    before = snapshot(ann.parent)
    r = _cli(f"--annotations={ann}", f"--image_root={images}", f"--out={tmp_path / 'o'}", "--rate=0.2",
             "--seed=3", "--trigger=random_patch", "--side=5")
    assert r.returncode == 0, r.stderr
    assert "4 of 20 samples poisoned" in r.stdout and "skipped broken" in r.stdout
    lib = poison_dataset(ann, tmp_path / "lib", TriggerSpec("random_patch", side=5), rate=0.2, seed=3,
                         image_root=images)
    assert (tmp_path / "o" / "train.json").read_bytes() == Path(lib["annotations"]).read_bytes()
    r = _cli(f"--annotations={ann}", f"--image_root={images}", f"--out={tmp_path / 't'}", "--triggered_test")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "t" / "test_triggered.json").read_text())) == N
    for args, message in [
        ([f"--annotations={tmp_path / 'missing.json'}", f"--out={tmp_path / 'x'}"], "not found"),
        ([f"--annotations={ann}", f"--out={tmp_path / 'y'}", "--trigger=blend", "--side=3"], "does not take"),
        ([f"--annotations={ann}", f"--out={tmp_path / 'z'}", "--rate=2"], "rate"),
        ([f"--annotations={ann}", f"--out={tmp_path / 'o'}"], "not empty"),
        ([f"--annotations={ann}"], "--out"),
    ]:
        r = _cli(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and message in err[0] and "Traceback" not in r.stderr, r.stderr
    assert snapshot(ann.parent) == before
