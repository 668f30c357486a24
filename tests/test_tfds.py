"""TFDS as a data source: samples and skip reasons from a small TFDS dataset written here (TFRecord and
array_record), per-host shards, keep_ids, one-line errors, and the filter / train / eval commands on it
(same entropies as the same data as LLaVA JSON). Skipped without the tfds extra."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CI"):  # CI installs the tfds extra: a failing import must fail there, not skip
    import tensorflow_datasets as tfds
else:
    tfds = pytest.importorskip("tensorflow_datasets")

from test_extract import QUESTIONS  # noqa: E402
from tiny_checkpoints import make_tiny_image  # noqa: E402

from bye_jax.configs.llava import get_config  # noqa: E402
from bye_jax.data.llava_json import DatasetError, EncodedImage, load_image  # noqa: E402
from bye_jax.data.sources import load_source, read_keep_ids  # noqa: E402
from bye_jax.data.tfds import TfdsImage, TfdsSpec, load_tfds, shard_bounds  # noqa: E402
from bye_jax.extract import read_entropy_jsonl  # noqa: E402
from bye_jax.runner import UserError, load_section, run_filter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 12


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def good_examples():
    """The same 12 samples as test_extract.make_dataset: (id, PIL image, question, answer, poisoned)."""
    out = []
    for i in range(N_GOOD):
        sid = f"poison_{i}" if i % 4 == 0 else f"s{i}"
        out.append((sid, make_tiny_image(i, (36 + 3 * i, 30 + i)), f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}",
                    "red", i % 4 == 0))
    return out


# (id, image: array | encoded bytes, question, reason it is skipped)
BAD = [
    ("no_question", None, "<image>\n   ", "empty question"),
    ("broken", b"\x89PNG\r\n\x1a\n this is not an image", "what", "undecodable image"),
    ("s1", None, "what", "duplicate id (first seen at index 1)"),
    ("", None, "what", "empty id"),
    ("big", np.zeros((60, 60, 3), np.uint8), "what", "image too large"),
    ("wide", np.zeros((1, 65, 3), np.uint8), "what", "extreme aspect ratio"),  # 65:1 > the default 64:1
]
MAX_PIXELS = 3000  # "big" is over it, the good images (at most 69 x 41) are not


def write_tfds(data_dir: Path, name: str, file_format: str) -> Path:
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(None, None, 3)),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "meta": {"poisoned": np.bool_},  # nested, read as "meta/poisoned"
    })
    examples = [{"id": sid, "image": np.asarray(im), "question": q, "answer": a, "meta": {"poisoned": p}}
                for sid, im, q, a, p in good_examples()]
    for sid, image, q, _ in BAD:
        examples.append({"id": sid, "image": np.asarray(make_tiny_image(99, (20, 20))) if image is None else image,
                         "question": q, "answer": "x", "meta": {"poisoned": False}})
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=features, split_datasets={"train": list(enumerate(examples))},
        data_dir=data_dir, file_format=file_format, disable_shuffling=True)
    return Path(builder.data_dir)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    return {fmt: write_tfds(root / "data", f"tiny_vqa_{fmt}", fmt) for fmt in ("tfrecord", "array_record")}, root


def spec_for(builder_dir, **kw):
    return TfdsSpec(builder_dir=str(builder_dir), poisoned_key="meta/poisoned", **kw)


# ------------------------------------------------------------------------------------------- reader


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_samples_and_skip_reasons_match_what_was_written(written, fmt):
    dirs, _ = written
    samples, skipped = load_tfds(spec_for(dirs[fmt]), max_image_pixels=MAX_PIXELS)
    good = good_examples()
    assert [s.id for s in samples] == [g[0] for g in good]
    assert [s.index for s in samples] == list(range(N_GOOD))
    assert [s.question for s in samples] == [QUESTIONS[i % len(QUESTIONS)] for i in range(N_GOOD)]
    assert all(s.answer == "red" for s in samples)
    assert [s.poisoned for s in samples] == [g[4] for g in good]
    kind = EncodedImage if fmt == "tfrecord" else TfdsImage
    for s, (_, image, *_) in zip(samples, good, strict=True):
        assert isinstance(s.image_path, kind)
        assert np.array_equal(np.asarray(load_image(s.image_path)), np.asarray(image))
        assert s.raw["tfds"] == {"builder_dir": str(dirs[fmt]), "split": "train", "index": s.index}
        assert s.raw["poisoned"] == s.poisoned and s.raw["conversations"][1] == {"from": "gpt", "value": "red"}
    assert [(k.id, k.index) for k in skipped] == [
        ("no_question", 12), ("broken", 13), ("s1", 14), ("#15", 15), ("big", 16), ("wide", 17)]
    for k, (_, _, _, reason) in zip(skipped, BAD, strict=True):
        assert k.reason.startswith(reason), (k.reason, reason)


def test_name_and_data_dir_open_the_same_dataset_and_ground_truth_falls_back_to_ids(written):
    dirs, root = written
    by_name, _ = load_tfds(TfdsSpec(name="tiny_vqa_tfrecord", data_dir=str(root / "data")),
                           max_image_pixels=MAX_PIXELS)
    by_dir, _ = load_tfds(spec_for(dirs["tfrecord"]), max_image_pixels=MAX_PIXELS)
    assert [s.id for s in by_name] == [s.id for s in by_dir]
    assert [s.poisoned for s in by_name] == [s.poisoned for s in by_dir]  # "poison" in the id
    assert "poisoned" not in by_name[0].raw
    assert by_name[0].raw["tfds"] == {"name": "tiny_vqa_tfrecord", "data_dir": str(root / "data"),
                                      "split": "train", "index": 0}
    no_ids, _ = load_tfds(spec_for(dirs["tfrecord"], id_key="", answer_key=""), max_image_pixels=MAX_PIXELS)
    assert no_ids[0].id == "train:0" and no_ids[0].answer is None
    assert len(no_ids) == N_GOOD + 2  # the duplicate and the empty-id examples are fine by index


def test_shard_bounds_are_disjoint_and_cover_everything():
    for n in range(0, 23):
        for count in range(1, 7):
            parts = [shard_bounds(n, i, count) for i in range(count)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            assert max(e - s for s, e in parts) - min(e - s for s, e in parts) <= 1
    with pytest.raises(ValueError):
        shard_bounds(10, 3, 3)


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_per_host_shards_are_disjoint_and_cover_the_split(written, fmt):
    dirs, _ = written
    spec = spec_for(dirs[fmt])
    full, full_skipped = load_tfds(spec, max_image_pixels=MAX_PIXELS)
    by_index = {s.index: s.id for s in full} | {k.index: k.id for k in full_skipped}
    for count in (2, 3, 5):
        seen = []
        for host in range(count):
            samples, skipped = load_tfds(spec, max_image_pixels=MAX_PIXELS, shard=(host, count))
            indices = sorted([s.index for s in samples] + [k.index for k in skipped])
            start, end = shard_bounds(len(by_index), host, count)
            assert indices == list(range(start, end))  # this host read exactly its contiguous part
            # same ids at the same indices (the duplicate "s1" is only a duplicate on the host that saw both)
            assert all(by_index[s.index] == s.id for s in samples)
            seen += indices
        assert sorted(seen) == sorted(by_index) and len(seen) == len(set(seen))


def test_split_order_of_a_shuffled_many_file_tfrecord_dataset(tmp_path):
    """Examples come in split order (what split slices and the random-access formats index), not interleaved."""
    features = tfds.features.FeaturesDict({"id": tfds.features.Text(), "image": tfds.features.Image(shape=(4, 4, 3)),
                                           "question": tfds.features.Text()})
    examples = [(i, {"id": f"e{i}", "image": np.full((4, 4, 3), i, np.uint8), "question": "q"}) for i in range(80)]
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="shuffled", version="1.0.0", features=features, split_datasets={"train": examples},
        data_dir=tmp_path, download_config=tfds.download.DownloadConfig(num_shards=2))
    assert len(builder.info.splits["train"].filenames) == 2  # 40 each: more than the interleave block (16)
    samples, skipped = load_tfds(TfdsSpec(builder_dir=builder.data_dir, answer_key=""))
    assert not skipped and len(samples) == 80
    for s in samples[::7]:
        (one,) = tfds.as_numpy(builder.as_dataset(split=f"train[{s.index}:{s.index + 1}]"))
        assert one["id"].decode() == s.id
        assert np.array_equal(np.asarray(load_image(s.image_path)), one["image"])
    parts = [load_tfds(TfdsSpec(builder_dir=builder.data_dir, answer_key=""), shard=(h, 3))[0] for h in range(3)]
    assert [(s.index, s.id) for part in parts for s in part] == [(s.index, s.id) for s in samples]


def test_keep_ids_and_the_llava_json_source_shard(written, tmp_path):
    dirs, _ = written
    (tmp_path / "keep.json").write_text(json.dumps([{"id": "s2"}, {"id": "poison_4"}, {"id": "broken"}]))
    assert read_keep_ids(tmp_path / "keep.json") == {"s2", "poison_4", "broken"}
    cfg = get_config()
    cfg.data.source = "tfds"
    cfg.data.tfds.builder_dir = str(dirs["tfrecord"])
    cfg.data.keep_ids = str(tmp_path / "keep.json")
    loaded = load_source(cfg.data, max_image_pixels=MAX_PIXELS)
    assert [s.id for s in loaded.samples] == ["s2", "poison_4"]
    assert [k.id for k in loaded.skipped] == ["broken"]
    assert loaded.annotations is None and loaded.label.startswith("tfds:")


@pytest.mark.parametrize("change, message", [
    ({"question_key": "nope"}, "no feature 'nope'"),
    ({"image_key": "question"}, "not an Image feature"),
    ({"split": "validation"}, "no split 'validation'"),
    ({"builder_dir": "/nonexistent/dir"}, "not a prepared TFDS builder directory"),
    ({"builder_dir": "", "name": "no_such_dataset_xyz"}, "no such TFDS dataset"),
    ({"name": "also_a_name"}, "exactly one of"),
])
def test_bad_tfds_settings_raise_one_line_errors(written, change, message):
    dirs, _ = written
    spec = TfdsSpec(**{**spec_for(dirs["tfrecord"]).__dict__, **change})
    with pytest.raises(DatasetError, match=message) as e:
        load_tfds(spec)
    assert "\n" not in str(e.value)


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as without the extra
    cfg = get_config()
    cfg.data.source = "tfds"
    cfg.data.tfds.name = "anything"
    with pytest.raises(UserError, match=r"install bye_jax\[tfds\]"):
        load_section(cfg.data, max_image_pixels=None)
    cfg.data.source = "csv"
    with pytest.raises(UserError, match="config.data.source must be one of llava_json, tfds"):
        load_section(cfg.data, max_image_pixels=None)


# --------------------------------------------------------------------------------- the commands


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=str(REPO),
                          timeout=600)


@pytest.fixture(scope="module")
def as_llava_json(tmp_path_factory):
    """The 12 good samples as a LLaVA-JSON dataset (same pixels, PNG files)."""
    root = tmp_path_factory.mktemp("json")
    (root / "images").mkdir()
    records = []
    for i, (sid, image, q, a, p) in enumerate(good_examples()):
        (root / "images" / f"{i}.png").write_bytes(_png(image))
        records.append({"id": sid, "image": f"{i}.png", "poisoned": p,
                        "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json", root / "images"


def test_filter_on_tfds_matches_llava_json_and_clean_json_retrains(written, as_llava_json, tiny_llava_dir, tmp_path):
    dirs, _ = written
    ann, images = as_llava_json
    out = tmp_path / "tfds_out"
    r = _cli("bye_jax.filter", "--config=bye_jax/configs/llava.py", f"--config.model={tiny_llava_dir}",
             "--config.data.source=tfds", f"--config.data.tfds.builder_dir={dirs['array_record']}",
             "--config.data.tfds.poisoned_key=meta/poisoned", f"--config.data.max_image_pixels={MAX_PIXELS}",
             "--config.batch_size=4", "--config.plots.heatmaps_typical=1", f"--workdir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"samples: {N_GOOD}" in r.stdout and f"skipped: {len(BAD)}" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert {s["id"] for s in report["skipped"]} == {"no_question", "broken", "s1", "#15", "big", "wide"}
    assert "f1" in report and report["n_poisoned"] == 3
    assert (out / "attention_heatmaps.png").stat().st_size > 1000  # TFDS images decoded for the plots

    cfg = get_config()
    cfg.model = str(tiny_llava_dir)
    cfg.data.annotations, cfg.data.image_root = str(ann), str(images)
    cfg.batch_size, cfg.plots.enabled = 4, False
    ref = run_filter(cfg, tmp_path / "json_out", progress=False)
    a, b = read_entropy_jsonl(out / "entropy.jsonl"), read_entropy_jsonl(tmp_path / "json_out" / "entropy.jsonl")
    assert a.ids == b.ids
    np.testing.assert_allclose(a.matrix, b.matrix, rtol=0, atol=1e-6)
    assert report["flagged_ids"] == ref["flagged_ids"]

    clean = json.loads((out / "clean.json").read_text())
    flagged = json.loads((out / "flagged.json").read_text())
    ids = [g[0] for g in good_examples()]  # dataset order
    assert [c["id"] for c in clean] == [s for s in ids if s not in set(report["flagged_ids"])]
    assert [c["id"] for c in flagged] == [s for s in ids if s in set(report["flagged_ids"])]
    assert all(c["tfds"]["builder_dir"] == str(dirs["array_record"]) for c in clean + flagged)
    assert read_keep_ids(out / "clean.json") == {c["id"] for c in clean}

    # Re-fine-tune on clean.json with the TFDS source (keep_ids), one short epoch.
    from test_train import small_config

    from bye_jax.train.main import _run

    tcfg = small_config(epochs=1, batch_size=2, grad_accum=1)
    with tcfg.unlocked():
        tcfg.model = str(tiny_llava_dir)
        tcfg.data.source = "tfds"
        tcfg.data.tfds.builder_dir = str(dirs["tfrecord"])
        tcfg.data.keep_ids = str(out / "clean.json")
        tcfg.data.max_image_pixels = MAX_PIXELS
    assert _run(tcfg, str(tmp_path / "ft")) == 0
    metrics = json.loads((tmp_path / "ft" / "train_metrics.json").read_text())
    assert metrics["n_examples"] == len(clean) and (tmp_path / "ft" / "merged" / "config.json").exists()


def test_eval_reads_tfds_splits(written):
    from bye_jax.configs.eval import get_config as eval_config
    from bye_jax.eval.main import _check_config, _load_split

    dirs, _ = written
    cfg = eval_config()
    cfg.model = "unused"
    with pytest.raises(UserError, match="nothing to evaluate"):
        _check_config(cfg)
    cfg.test.source = "tfds"
    cfg.test.tfds.builder_dir = str(dirs["tfrecord"])
    cfg.test.tfds.split = "train[:6]"
    _check_config(cfg)
    samples, skipped = _load_split(cfg.test, "test", MAX_PIXELS)
    assert [s.id for s in samples] == [g[0] for g in good_examples()[:6]] and not skipped
    cfg.triggered.source = "tfds"
    cfg.triggered.tfds.builder_dir = str(dirs["tfrecord"])
    cfg.triggered.tfds.question_key = "nope"
    with pytest.raises(UserError, match="config.triggered: .*no feature 'nope'"):
        _load_split(cfg.triggered, "triggered", MAX_PIXELS)


def test_cli_tfds_error_is_one_line(written, tiny_llava_dir, tmp_path):
    dirs, _ = written
    r = _cli("bye_jax.extract", "--config=bye_jax/configs/llava.py", f"--config.model={tiny_llava_dir}",
             "--config.data.source=tfds", f"--config.data.tfds.builder_dir={dirs['tfrecord']}",
             "--config.data.tfds.image_key=picture", f"--workdir={tmp_path}")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "no feature 'picture'" in err[0], r.stderr
