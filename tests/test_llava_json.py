"""Tests for bye_jax.data.llava_json: parsing, validation (skip reasons), image loading, writing."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bye_jax.data import llava_json as lj
from bye_jax.data.llava_json import (
    DatasetError,
    ImageError,
    Sample,
    load_dataset,
    load_image,
    to_rgb,
    write_subset,
)

# --------------------------------------------------------------------------- helpers


def rgb_image(size=(16, 12), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def save(img: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (CRC fixed, so only the size lies)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def rec(sid, image="img/a.png", question="<image>\nWhat is it?", answer="A cat.", **extra):
    r = {"id": sid, "image": image}
    r["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    r.update(extra)
    return r


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image root with a few valid images."""
    r = tmp_path / "data"
    save(rgb_image(seed=1), r / "img" / "a.png")
    save(rgb_image(seed=2), r / "img" / "b.jpg", "JPEG")
    return r


def load(root: Path, records, **kw):
    ann = write_json(root / "train.json", records)
    return load_dataset(ann, **kw)


def reasons(skipped):
    return {s.index: (s.id, s.reason) for s in skipped}


# --------------------------------------------------------------------------- valid samples


def test_valid_samples_parsed(root: Path):
    records = [
        rec("s0", question="<image>\n  What colour is the car?  "),
        rec(17, image="img/b.jpg", question="Describe <image> this\n"),
        rec("poison_3", question="Q?<image>", answer="Backdoor Attack!"),
        rec("s3", poisoned=True),
        rec("poison_4", poisoned=False),
        rec("s5", poisoned="yes"),  # not a boolean: falls back to the id
    ]
    samples, skipped = load(root, records)
    assert skipped == []
    assert [s.index for s in samples] == list(range(6))
    s0, s1, s2, s3, s4, s5 = samples
    assert isinstance(s0, Sample)
    assert s0.id == "s0" and s0.question == "What colour is the car?" and s0.answer == "A cat."
    assert s1.id == "17" and s1.question == "Describe  this"
    assert s1.image_path == (root / "img" / "b.jpg").resolve() and s1.image_path.is_absolute()
    assert s2.question == "Q?" and s2.answer == "Backdoor Attack!"
    assert [s.poisoned for s in samples] == [False, False, True, True, False, False]
    assert s0.raw == records[0]
    assert s1.raw["id"] == 17  # raw record untouched


def test_answer_is_first_gpt_turn_after_first_human(root: Path):
    convs = [
        {"from": "gpt", "value": "preamble"},
        {"from": "human", "value": "<image>\nfirst?"},
        {"from": "human", "value": "second?"},
        {"from": "gpt", "value": "answer one"},
        {"from": "gpt", "value": "answer two"},
    ]
    no_answer = [{"from": "human", "value": "<image> only a question"}]
    samples, skipped = load(
        root,
        [
            {"id": "a", "image": "img/a.png", "conversations": convs},
            {"id": "b", "image": "img/a.png", "conversations": no_answer},
        ],
    )
    assert not skipped
    assert samples[0].question == "first?" and samples[0].answer == "answer one"
    assert samples[1].question == "only a question" and samples[1].answer is None


def test_image_root_default_and_explicit(tmp_path: Path, root: Path):
    ann_dir = tmp_path / "ann"
    ann_dir.mkdir()
    ann = write_json(ann_dir / "d.json", [rec("x")])
    samples, skipped = load_dataset(ann, root)
    assert len(samples) == 1 and not skipped
    samples, skipped = load_dataset(ann)  # default root = ann_dir: image not there
    assert not samples and skipped[0].reason.startswith("image file not found")


# --------------------------------------------------------------------------- skip reasons


def test_bad_records_skipped_with_reason_and_index(root: Path):
    (root / "img" / "garbage.png").write_bytes(b"this is not an image at all")
    (root / "img" / "empty.jpg").write_bytes(b"")
    (root / "img" / "sub").mkdir()
    records = [
        rec("ok0"),  # 0
        ["not", "a", "dict"],  # 1
        {"image": "img/a.png", "conversations": rec("x")["conversations"]},  # 2 missing id
        rec("   "),  # 3 empty id
        rec("ok0"),  # 4 duplicate
        {"id": "noimg", "conversations": rec("x")["conversations"]},  # 5
        rec("missing", image="img/nope.png"),  # 6
        rec("garbage", image="img/garbage.png"),  # 7
        rec("empty", image="img/empty.jpg"),  # 8
        rec("noconv", conversations=[]),  # 9
        {"id": "noconv2", "image": "img/a.png"},  # 10
        rec("nohuman", conversations=[{"from": "gpt", "value": "hi"}]),  # 11
        rec("nonstr", question=["<image>", "q"]),  # 12
        rec("dir", image="img/sub"),  # 13
        rec("multi", image=["img/a.png", "img/b.jpg"]),  # 14
        rec(None),  # 15 null id
        rec(1.5),  # 16 float id
        rec("emptyimg", image=""),  # 17
        rec("ok1", image="img/b.jpg"),  # 18
        rec("badturn", conversations=["<image> q"]),  # 19
    ]
    samples, skipped = load(root, records)
    assert [s.id for s in samples] == ["ok0", "ok1"]
    assert [s.index for s in samples] == [0, 18]
    assert [s.index for s in skipped] == sorted(s.index for s in skipped)
    r = reasons(skipped)
    assert set(r) == set(range(1, 18)) | {19}
    expected = {
        1: ("#1", "record is not an object"),
        2: ("#2", "missing id"),
        3: ("#3", "empty id"),
        4: ("ok0", "duplicate id (first seen at index 0)"),
        5: ("noimg", "no image field"),
        6: ("missing", "image file not found"),
        7: ("garbage", "undecodable image"),
        8: ("empty", "undecodable image"),
        9: ("noconv", "no conversations"),
        10: ("noconv2", "no conversations"),
        11: ("nohuman", "no human turn"),
        12: ("nonstr", "question (human turn 0) is not a string"),
        13: ("dir", "image path is not a regular file"),
        14: ("multi", "image field is not a string"),
        15: ("#15", "missing id"),
        16: ("#16", "id is not a string or integer"),
        17: ("emptyimg", "empty image path"),
        19: ("badturn", "conversation turn 0 is not an object"),
    }
    for index, (sid, prefix) in expected.items():
        got_id, got_reason = r[index]
        assert got_id == sid, (index, got_id)
        assert got_reason.startswith(prefix), (index, got_reason)
        assert "\n" not in got_reason


def test_duplicate_of_skipped_record_is_still_duplicate(root: Path):
    samples, skipped = load(root, [rec("d", image="img/nope.png"), rec("d"), rec("5"), rec(5)])
    assert [s.id for s in samples] == ["5"]
    r = reasons(skipped)
    assert r[0][1].startswith("image file not found")
    assert r[1] == ("d", "duplicate id (first seen at index 0)")
    assert r[3] == ("5", "duplicate id (first seen at index 2)")


def test_path_escapes_rejected(tmp_path: Path, root: Path):
    outside = save(rgb_image(), tmp_path / "secret" / "outside.png")
    (root / "img" / "link.png").symlink_to(outside)
    (root / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    inside_target = root / "img" / "a.png"
    (root / "img" / "ok_link.png").symlink_to(inside_target)
    records = [
        rec("sym", image="img/link.png"),
        rec("symdir", image="linkdir/outside.png"),
        rec("dotdot", image="../secret/outside.png"),
        rec("dotdot2", image="img/../../secret/outside.png"),
        rec("abs", image=str(outside)),
        rec("abs_in", image=str(inside_target)),
        rec("inner_dotdot", image="img/../img/a.png"),
        rec("inner_link", image="img/ok_link.png"),
    ]
    opened: list[str] = []
    real_open = Image.open

    def spy_open(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(lj.Image, "open", spy_open)
    try:
        samples, skipped = load(root, records, num_workers=1)
    finally:
        mp.undo()
    r = reasons(skipped)
    assert r[0][1].startswith("image path escapes the image root")
    assert r[1][1].startswith("image path escapes the image root")
    assert r[2][1].startswith("image path escapes the image root")
    assert r[3][1].startswith("image path escapes the image root")
    assert r[4][1].startswith("absolute image path not allowed")
    assert r[5][1].startswith("absolute image path not allowed")
    assert [s.id for s in samples] == ["inner_dotdot", "inner_link"]
    assert samples[1].image_path == inside_target.resolve()
    assert not any("secret" in p for p in opened)  # nothing outside the root was opened


def test_root_symlink_is_resolved(tmp_path: Path, root: Path):
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    ann = write_json(tmp_path / "d.json", [rec("x")])
    samples, skipped = load_dataset(ann, alias)
    assert len(samples) == 1 and not skipped
    assert samples[0].image_path == (root / "img" / "a.png").resolve()


def test_truncated_images_skipped(root: Path):
    big = rgb_image((64, 48), seed=3)
    png = png_bytes(big)
    jpg = jpeg_bytes(big, quality=90)
    (root / "img" / "trunc.png").write_bytes(png[: len(png) // 2])
    (root / "img" / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "img" / "trailing.jpg").write_bytes(jpg + b"\x00extra trailing bytes")
    (root / "img" / "header_only.jpg").write_bytes(jpg[:200])
    records = [
        rec("tp", image="img/trunc.png"),
        rec("tj", image="img/trunc.jpg"),
        rec("trailing", image="img/trailing.jpg"),
        rec("hdr", image="img/header_only.jpg"),
    ]
    for kw in ({}, {"full_decode": True}, {"num_workers": 1}):
        samples, skipped = load(root, records, **kw)
        assert [s.id for s in samples] == ["trailing"], kw
        r = reasons(skipped)
        assert set(r) == {0, 1, 3}
        assert all(reason.startswith("undecodable image") for _, reason in r.values())
    assert load_image(root / "img" / "trailing.jpg").size == (64, 48)


def test_decompression_bomb_skipped(root: Path):
    (root / "img" / "bomb_err.png").write_bytes(bomb_png(20_000, 20_000))  # > 2x PIL limit: PIL raises
    (root / "img" / "bomb_warn.png").write_bytes(bomb_png(10_000, 10_000))  # > limit, < 2x: warning
    records = [rec("e", image="img/bomb_err.png"), rec("w", image="img/bomb_warn.png"), rec("ok")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes, and an error-filter does not break it
        samples, skipped = load(root, records)
    assert [s.id for s in samples] == ["ok"]
    r = reasons(skipped)
    assert r[0][1].startswith("image too large") and r[1][1].startswith("image too large")
    assert "100000000 pixels" in r[1][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image leaves filters alone
        with pytest.raises(ImageError, match="too large"):
            load_image(root / "img" / "bomb_warn.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="too large"):
            load_image(root / "img" / "bomb_warn.png")
    with pytest.raises(ImageError, match="too large"):
        load_image(root / "img" / "bomb_err.png")


def test_max_image_pixels_limit(root: Path):
    records = [rec("a"), rec("b", image="img/b.jpg")]  # both 16x12 = 192 pixels
    samples, skipped = load(root, records, max_image_pixels=191)
    assert not samples
    assert all(s.reason == "image too large: 16x12 = 192 pixels > limit 191" for s in skipped)
    samples, skipped = load(root, records, max_image_pixels=192)
    assert len(samples) == 2 and not skipped
    with pytest.raises(ImageError, match="too large"):
        load_image(root / "img" / "a.png", max_image_pixels=100)


def test_threaded_and_inline_validation_agree(root: Path):
    (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    records = [rec(f"s{i}", image=["img/a.png", "img/b.jpg", "img/bad.png"][i % 3]) for i in range(30)]
    a = load(root, records, num_workers=1)
    b = load(root, records, num_workers=4)
    assert [s.id for s in a[0]] == [s.id for s in b[0]]
    assert [(s.id, s.index, s.reason) for s in a[1]] == [(s.id, s.index, s.reason) for s in b[1]]
    assert len(a[0]) == 20 and len(a[1]) == 10


# --------------------------------------------------------------------------- whole-file errors


def test_whole_file_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="annotations file not found"):
        load_dataset(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="not a file"):
        load_dataset(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,]', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"not valid JSON: .* line 1 column"):
        load_dataset(bad)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(binary)
    obj = write_json(tmp_path / "obj.json", {"data": []})
    with pytest.raises(DatasetError, match="top level is a JSON dict, expected a list"):
        load_dataset(obj)
    ok = write_json(tmp_path / "ok.json", [])
    with pytest.raises(DatasetError, match="image root is not a folder"):
        load_dataset(ok, tmp_path / "no_such_dir")
    assert load_dataset(ok) == ([], [])
    assert issubclass(DatasetError, ValueError)


def test_inputs_unchanged(root: Path):
    (root / "img" / "garbage.png").write_bytes(b"junk")
    records = [rec("a"), rec("b", image="img/b.jpg"), rec("g", image="img/garbage.png"), rec("a")]
    ann = write_json(root / "train.json", records)
    files = [ann, *sorted((root / "img").iterdir())]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    samples, _ = load_dataset(ann, full_decode=True)
    for s in samples:
        load_image(s.image_path)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert before == after
    assert sorted(p.name for p in root.iterdir()) == ["img", "train.json"]


# --------------------------------------------------------------------------- image loading


def test_modes_loaded_as_rgb(tmp_path: Path):
    gray = Image.fromarray(np.full((8, 10), 77, np.uint8), "L")
    pal = rgb_image((10, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rgba_arr = np.zeros((8, 10, 4), np.uint8)
    rgba_arr[..., 0] = 200
    rgba_arr[:, :5, 3] = 255  # left half opaque red, right half fully transparent (stored red)
    rgba = Image.fromarray(rgba_arr, "RGBA")
    la = Image.fromarray(np.dstack([np.full((8, 10), 50, np.uint8), np.zeros((8, 10), np.uint8)]), "LA")
    cmyk = Image.new("CMYK", (10, 8), (0, 255, 255, 0))
    g16 = Image.fromarray(np.arange(80, dtype=np.uint16).reshape(8, 10) * 800)
    assert g16.mode == "I;16"
    bw = Image.new("1", (10, 8), 1)
    files = {
        "gray.png": gray,
        "pal.png": pal,
        "rgba.png": rgba,
        "la.png": la,
        "cmyk.jpg": cmyk,
        "g16.png": g16,
        "bw.png": bw,
        "gray.jpg": gray,
        "pal.gif": pal,
    }
    for name, img in files.items():
        save(img, tmp_path / name)
    for name in files:
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (10, 8), name
        assert np.asarray(out).dtype == np.uint8
    assert np.all(np.asarray(load_image(tmp_path / "gray.png")) == 77)
    assert np.all(np.asarray(load_image(tmp_path / "bw.png")) == 255)
    # palette: same colours as converting directly
    assert np.array_equal(np.asarray(load_image(tmp_path / "pal.png")), np.asarray(pal.convert("RGB")))
    # RGBA: default drops alpha (LLaVA behaviour); background composites
    dropped = np.asarray(load_image(tmp_path / "rgba.png"))
    assert np.all(dropped[..., 0] == 200) and np.all(dropped[..., 1:] == 0)
    white = np.asarray(load_image(tmp_path / "rgba.png", background=(255, 255, 255)))
    assert np.all(white[:, :5] == [200, 0, 0]) and np.all(white[:, 5:] == 255)
    assert np.all(np.asarray(load_image(tmp_path / "la.png", background=(255, 255, 255))) == 255)
    # CMYK (0,255,255,0) is red
    cm = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert cm[..., 0].mean() > 200 and cm[..., 1].mean() < 60
    # 16-bit gray is rescaled, not clipped
    out16 = np.asarray(load_image(tmp_path / "g16.png"))[..., 0].astype(int)
    expected = np.rint(np.arange(80).reshape(8, 10) * 800 / 257.0).astype(int)
    assert np.abs(out16 - expected).max() <= 1 and out16.max() < 255


def test_to_rgb_float_and_int_modes():
    f = Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "F")
    out = np.asarray(to_rgb(f))
    assert out.shape == (3, 4, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    i32 = Image.fromarray(np.arange(12, dtype=np.int32).reshape(3, 4) * 10, "I")
    assert np.asarray(to_rgb(i32))[-1, -1, 0] == 110  # small values kept as they are
    rgb = rgb_image()
    assert to_rgb(rgb) is rgb


def test_load_image_errors(tmp_path: Path):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="undecodable image") as e:
        load_image(tmp_path / "junk.png")
    assert isinstance(e.value, DatasetError)
    with pytest.raises(ImageError, match="cannot read the image file: No such file or directory$"):
        load_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- write_subset


def test_write_subset_roundtrip(tmp_path: Path, root: Path):
    records = [rec("é-1", question="<image>\n日本語?"), rec(2, image="img/b.jpg", poisoned=True)]
    ann = write_json(root / "train.json", records)
    samples, _ = load_dataset(ann)
    out = write_subset([s.raw for s in samples], tmp_path / "out" / "clean.json")
    assert out == (tmp_path / "out" / "clean.json").resolve()
    text = out.read_text(encoding="utf-8")
    assert "日本語" in text and "é-1" in text  # ensure_ascii=False
    assert text.startswith('[\n  {\n    "id"')  # indent=2
    assert json.loads(text) == records
    assert sorted(p.name for p in out.parent.iterdir()) == ["clean.json"]  # no temp file left
    assert (out.stat().st_mode & 0o777) == 0o644
    # overwrite an existing output atomically
    write_subset([], out)
    assert json.loads(out.read_text()) == []
    # the written subset reads back as the same samples
    sub = write_subset([s.raw for s in samples], root / "clean.json")
    samples2, skipped2 = load_dataset(sub)
    assert [s.id for s in samples2] == ["é-1", "2"] and not skipped2


def test_write_subset_refuses_input(tmp_path: Path, root: Path):
    ann = write_json(root / "train.json", [rec("a")])
    original = ann.read_bytes()
    load_dataset(ann)
    with pytest.raises(DatasetError, match="refusing to overwrite the input annotations file"):
        write_subset([], ann)
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        write_subset([], root / "img" / ".." / "train.json")
    link = tmp_path / "link.json"
    link.symlink_to(ann)
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        write_subset([], link)
    # explicit protect, for a file never loaded in this process
    other = write_json(tmp_path / "other.json", [rec("b")])
    other_bytes = other.read_bytes()
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        write_subset([], other, protect=[str(other)])
    hard = tmp_path / "hard.json"
    os.link(other, hard)
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        write_subset([], hard, protect=[other])
    with pytest.raises(DatasetError, match="is a folder"):
        write_subset([], tmp_path)
    assert ann.read_bytes() == original and other.read_bytes() == other_bytes
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- hostile records (issue 14)


def test_hostile_records_are_skipped_with_reasons_not_raised(root: Path, monkeypatch):
    """One record never sinks a scan: a name over 255 bytes (ENAMETOOLONG), a folder the process cannot
    enter and a file it cannot open (PermissionError; simulated, the tests run as root: Path.stat
    raises EACCES under locked/, the module's `open` raises it for img/noread.png), lone surrogates in
    id / question / answer / image path, a record nested deeper than the limit."""
    import errno
    import pathlib

    save(rgb_image(seed=4), root / "locked" / "c.png")
    save(rgb_image(seed=5), root / "img" / "noread.png")
    locked = (root / "locked").resolve()
    real_stat, real_open = pathlib.Path.stat, open

    def stat(self, *a, **k):
        if self.is_relative_to(locked) and self != locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *a, **k)

    def guarded_open(file, *a, **k):
        if str(file).endswith("noread.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    monkeypatch.setattr(lj, "open", guarded_open, raising=False)
    nested: list = []
    for _ in range(lj.MAX_RECORD_DEPTH + 5):
        nested = [nested]
    records = [
        rec("ok"),  # 0
        rec("long", image="img/" + "x" * 300 + ".png"),  # 1
        rec("locked", image="locked/c.png"),  # 2
        rec("noread", image="img/noread.png"),  # 3
        rec("q", question="<image>\nWhat is \ud800?"),  # 4
        rec("a", answer="A \udfff."),  # 5
        rec("id\ud83d"),  # 6
        rec("img", image="img/\udc80.png"),  # 7
        rec("deep", meta=nested),  # 8
        rec("emoji", question="<image>\nWhat is \U0001f600?"),  # 9: a real astral character is fine
    ]
    samples, skipped = load(root, records, num_workers=1)
    assert [s.id for s in samples] == ["ok", "emoji"]
    assert samples[1].question == "What is \U0001f600?"
    r = reasons(skipped)
    expected = {
        1: ("long", "cannot access image file 'img/xxx"),
        2: ("locked", "cannot access image file 'locked/c.png': Permission denied"),
        3: ("noread", "cannot read the image file: Permission denied"),
        4: ("q", "question (human turn 0) is not valid Unicode (lone surrogate U+D800 at character 16)"),
        5: ("a", "answer (gpt turn 1) is not valid Unicode (lone surrogate U+DFFF at character 2)"),
        6: ("#6", "id is not valid Unicode (lone surrogate U+D83D at character 2)"),
        7: ("img", "image path is not valid Unicode (lone surrogate U+DC80 at character 4)"),
        8: ("deep", f"record is nested more than {lj.MAX_RECORD_DEPTH} levels deep"),
    }
    assert set(r) == set(expected)
    for index, (sid, prefix) in expected.items():
        assert r[index][0] == sid and r[index][1].startswith(prefix), (index, r[index])
    assert r[1][1].endswith("File name too long")
    for _, reason in r.values():  # printable and storable: one line, valid UTF-8, no server path
        assert "\n" not in reason and len(reason) <= 300
        reason.encode("utf-8")
        assert str(root) not in reason


def test_json_nested_100000_deep_or_names_too_long_are_refused_in_one_line(tmp_path: Path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DatasetError, match="nested too deeply to read") as e:
        load_dataset(deep)
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="cannot read annotations file .*: File name too long$"):
        load_dataset(tmp_path / ("n" * 300 + ".json"))
    with pytest.raises(DatasetError, match="cannot open the image root .*: File name too long$"):
        load_dataset(write_json(tmp_path / "ok.json", []), tmp_path / ("r" * 300))
    inner = tmp_path / "inner.json"  # one record nested 100,000 deep among good ones: the file cannot be parsed
    inner.write_text('[{"id": "a"}, {"id": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}]", encoding="utf-8")
    with pytest.raises(DatasetError, match="nested too deeply to read"):
        load_dataset(inner)


def test_write_subset_never_crashes_on_what_it_read(tmp_path: Path, root: Path):
    """A lone surrogate in a field the reader does not check (kept in the raw record) is written as the same
    JSON escape; the file is valid UTF-8 and reads back to the same records."""
    records = [rec("s", note="bad \udc80 byte", question="<image>\n日本語?"), rec("t", image="img/b.jpg")]
    ann = write_json(root / "train.json", records)
    samples, skipped = load_dataset(ann)
    assert [s.id for s in samples] == ["s", "t"] and not skipped
    out = write_subset([s.raw for s in samples], tmp_path / "clean.json")
    data = out.read_bytes()
    data.decode("utf-8")  # strict UTF-8
    assert b"\\udc80" in data
    assert json.loads(data) == records
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(DatasetError, match="cannot write clean.json: RecursionError"):
        write_subset([{"id": "x", "n": nested}], tmp_path / "clean.json")
    assert json.loads(out.read_bytes()) == records  # the earlier file is intact


def test_extreme_aspect_ratio_is_skipped(root: Path):
    save(Image.new("RGB", (6500, 100)), root / "img" / "wide.png")  # 65:1
    save(Image.new("RGB", (100, 6400)), root / "img" / "tall.png")  # 64:1, at the limit
    save(Image.new("RGB", (1_000_000, 1)), root / "img" / "line.png")  # the 1,000,000 x 1
    records = [rec("wide", image="img/wide.png"), rec("tall", image="img/tall.png"),
               rec("line", image="img/line.png"), rec("ok")]
    samples, skipped = load(root, records)
    assert [s.id for s in samples] == ["tall", "ok"]
    r = reasons(skipped)
    assert r[0] == ("wide", "extreme aspect ratio: 6500x100 = 65:1 > limit 64:1")
    assert r[2] == ("line", "extreme aspect ratio: 1000000x1 = 1e+06:1 > limit 64:1")
    samples, skipped = load(root, records, max_aspect_ratio=None)
    assert len(samples) == 4 and not skipped
    samples, skipped = load(root, records, max_aspect_ratio=10)
    assert [s.id for s in samples] == ["ok"]
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        load_image(root / "img" / "line.png", max_aspect_ratio=64)


def test_big_images_are_reduced_before_resizing(tmp_path: Path):
    """Over REDUCE_ABOVE_PIXELS, load_image(reduce_to=n) shrinks by the integer factor keeping the short side
    >= REDUCE_GAP * n (JPEG via draft, PNG via a box reduce); smaller images come back pixel-identical."""
    side = 4200  # 17.6 M pixels > 4096^2
    x = np.linspace(0, 255, side, dtype=np.float32)
    arr = np.empty((side, side, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = x[None, :], x[:, None], 77
    big = Image.fromarray(arr)
    save(big, tmp_path / "big.png")
    save(big, tmp_path / "big.jpg", "JPEG")
    png = load_image(tmp_path / "big.png", reduce_to=336)
    assert png.size == (side // 4, side // 4)  # 4200 // (3 * 336) = 4
    expected = arr.reshape(side // 4, 4, side // 4, 4, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(np.asarray(png, np.float64) - expected).max() <= 0.5 + 1e-9  # a box average, rounded
    jpg = load_image(tmp_path / "big.jpg", reduce_to=336)
    assert jpg.size == (side // 4, side // 4)  # DCT-scaled decode at 1/4
    assert np.abs(np.asarray(jpg, np.float64) - expected).mean() < 2.0
    assert load_image(tmp_path / "big.png", reduce_to=1500).size == (side, side)  # 4200 < 2 * 3 * 1500
    assert load_image(tmp_path / "big.png").size == (side, side)  # no reduce_to: untouched
    small = rgb_image((3000, 2000), seed=9)  # 6 M pixels: under the threshold, untouched
    save(small, tmp_path / "small.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "small.png", reduce_to=336)), np.asarray(small))


def test_big_full_decodes_run_one_at_a_time_on_one_thread(root: Path, monkeypatch):
    """The threaded checks fully decode formats without a cheap check (BMP, TIFF, ...); images over
    REDUCE_ABOVE_PIXELS are decoded on one dedicated thread, so eight huge ones never sit in memory together
    (measured: eight 9000 x 9000 TIFFs peaked at 2.3 GB decoded in eight threads, 0.66 GB this way)."""
    import threading

    from PIL import ImageFile

    monkeypatch.setattr(lj, "REDUCE_ABOVE_PIXELS", 300)
    for i in range(6):
        save(rgb_image((20, 20) if i % 2 else (10, 10), seed=i), root / "img" / f"{i}.bmp", "BMP")
    threads: dict[tuple, str] = {}
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        threads[self.size] = threads.get(self.size, set()) | {threading.current_thread().name}
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    samples, skipped = load(root, [rec(f"b{i}", image=f"img/{i}.bmp") for i in range(6)], num_workers=4)
    assert len(samples) == 6 and not skipped
    assert all(name.startswith("bye_jax-big-decode") for name in threads[(20, 20)])  # 400 pixels > 300
    assert not any(name.startswith("bye_jax-big-decode") for name in threads[(10, 10)])
