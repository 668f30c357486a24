"""Fuzz: randomly corrupted LLaVA-JSON records (fixed seeds, a few seconds) never sink a scan (issue 14).

The reader either returns usable samples plus a one-line reason for every other record, or refuses the
whole file with one `DatasetError` line -- never another exception; what it accepts can be decoded and
written back (clean.json) unchanged; input files stay byte-identical. A couple of corrupted datasets also
go through `python -m bye_jax.filter --config.entropy_file` (no model needed): exit 0 with the reasons
in report.json, or one line on stderr, never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bye_jax.data.llava_json import DatasetError, load_dataset, load_image, write_subset
from bye_jax.jsonio import strict

REPO = Path(__file__).resolve().parents[1]
N_SEEDS = 200
N_GOOD = 24


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    data = bytearray(_png(1, 1, 0))
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _make_root(root: Path) -> list[str]:
    """Images (good and bad) under root/img; returns the good names."""
    img = root / "img"
    img.mkdir(parents=True)
    good = []
    for i in range(6):
        name = f"g{i}.png" if i % 2 else f"g{i}.jpg"
        if name.endswith(".png"):
            (img / name).write_bytes(_png(20 + i, 18, i))
        else:
            Image.open(io.BytesIO(_png(20 + i, 18, i))).save(img / name, "JPEG")
        good.append(f"img/{name}")
    png = _png(30, 20, 99)
    (img / "trunc.png").write_bytes(png[: len(png) // 2])
    (img / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (img / "empty.png").write_bytes(b"")
    (img / "bomb.png").write_bytes(_bomb_png(30_000, 30_000))
    (img / "wide.png").write_bytes(_png(650, 2, 5))
    (img / "sub").mkdir()
    (img / "loop").symlink_to(img / "loop")
    (root / "outside.png").write_bytes(_png(8, 8, 7))
    return good


def _record(i: int, image: str) -> dict:
    return {"id": f"s{i}" if i % 5 else f"poison_{i}", "image": image,
            "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                              {"from": "gpt", "value": f"thing {i}"}]}


def _nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


ODD_VALUES = [None, True, 0, -1, 2**70, 1.5, float("nan"), "", " ", "\n", "\ud800", "a\udfffb", "\x00",
              "x" * 5000, [], {}, ["a"], {"from": "human"}, "<image>", "日本語 \U0001f600"]
BAD_IMAGES = ["img/trunc.png", "img/garbage.jpg", "img/empty.png", "img/bomb.png", "img/wide.png", "img/sub",
              "img/loop", "img/missing.png", "../outside.png", "/etc/passwd", "img/" + "n" * 300 + ".png",
              "img/\x00.png", "img/\ud800.png", "img//g1.png", "img/./g1.png", "img/../img/g1.png", "C:\\x.png",
              "\\\\server\\share.png", ""]


def _mutate(rec: dict, rng: random.Random, pool: list[dict]):
    """One random corruption of a record (may return a non-dict)."""
    kind = rng.randrange(14)
    if not isinstance(rec, dict):
        return rng.choice(ODD_VALUES)
    r = dict(rec)  # copies of the parts a mutation edits (deepcopy would recurse into deep nests)
    convs = r.get("conversations")
    if isinstance(convs, list):
        r["conversations"] = convs = [dict(t) if isinstance(t, dict) else t for t in convs]
    if kind in (5, 6, 10) and not (isinstance(convs, list) and convs and all(isinstance(t, dict) for t in convs)):
        kind = 4
    if kind == 0:
        r["id"] = rng.choice(ODD_VALUES)
    elif kind == 1:
        r.pop(rng.choice(["id", "image", "conversations"]), None)
    elif kind in (2, 3):
        r["image"] = rng.choice(BAD_IMAGES)
    elif kind == 4:
        r["conversations"] = rng.choice(ODD_VALUES)
    elif kind == 5:
        rng.choice(convs)[rng.choice(["from", "value"])] = rng.choice(ODD_VALUES)
    elif kind == 6:
        convs.insert(rng.randrange(3), rng.choice(ODD_VALUES))
    elif kind == 7:
        r[rng.choice(["meta", "id", "image"])] = _nested(rng.choice([3, 63, 64, 65, 200, 800]))
    elif kind == 8:
        return rng.choice(ODD_VALUES)
    elif kind == 9:
        r["id"] = rng.choice(pool)["id"] if pool else r["id"]  # duplicate
    elif kind == 10:
        r["conversations"] = list(reversed(convs))
    elif kind == 11:
        r["poisoned"] = rng.choice(ODD_VALUES)
    elif kind == 12:
        r["note"] = rng.choice(ODD_VALUES)
    else:
        r["image"] = rng.choice(ODD_VALUES)
    return r


def _encode(records: list, rng: random.Random) -> bytes:
    """The JSON file, sometimes in another encoding or damaged as a whole."""
    kind = rng.randrange(10)
    if kind == 0:
        return json.dumps(records, ensure_ascii=False).encode("utf-8", "surrogatepass")  # CESU bytes
    if kind == 1:
        return json.dumps(records).encode("utf-16")
    if kind == 2:
        return b"\xef\xbb\xbf" + json.dumps(records).encode()
    if kind == 3:
        data = json.dumps(records).encode()
        return data[: rng.randrange(1, len(data))]
    if kind == 4:
        data = bytearray(json.dumps(records).encode())
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 5:
        return json.dumps({"data": records}).encode()
    if kind == 6:
        return b"[" * 100_000 + b"]" * 100_000
    return json.dumps(records, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _dataset(seed: int, root: Path, good: list[str], *, encode: bool = True) -> tuple[list, bytes]:
    rng = random.Random(seed)
    records: list = [_record(i, good[i % len(good)]) for i in range(N_GOOD)]
    for _ in range(rng.randrange(1, 12)):
        i = rng.randrange(len(records))
        records[i] = _mutate(records[i], rng, [r for r in records if isinstance(r, dict)])
    data = _encode(records, rng) if encode else json.dumps(records).encode("utf-8", "surrogatepass")
    return records, data


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return root, _make_root(root)


def test_corrupted_records_give_samples_and_reasons_or_one_line(image_root, tmp_path):
    root, good = image_root
    outcomes = {"loaded": 0, "refused": 0, "skipped": 0}
    reasons: set[str] = set()
    for seed in range(N_SEEDS):
        _, data = _dataset(seed, root, good)
        ann = root / f"train_{seed}.json"
        ann.write_bytes(data)
        before = _digest(root)
        try:
            samples, skipped = load_dataset(ann, num_workers=1 + seed % 3)
        except DatasetError as e:
            assert str(e) and "\n" not in str(e), (seed, str(e))
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
            outcomes["skipped"] += len(skipped)
            n_records = len(json.loads(data))  # the reader accepted it, so the file is a JSON list
            assert sorted([s.index for s in samples] + [s.index for s in skipped]) == list(range(n_records)), seed
            assert len({s.id for s in samples}) == len(samples), seed
            for s in skipped:
                assert s.reason and "\n" not in s.reason and len(s.reason) < 400, (seed, s)
                reasons.add(s.reason)
                (s.id + s.reason).encode("utf-8")  # printable, storable in report.json
            for s in samples:
                assert load_image(s.image_path).mode == "RGB"
                s.question.encode("utf-8")
            out = write_subset([s.raw for s in samples], tmp_path / f"clean_{seed}.json")
            text = out.read_bytes().decode("utf-8")  # strict UTF-8
            # the records as read, in strict JSON (a NaN / infinite number becomes null: bye_jax.jsonio)
            assert json.loads(text) == json.loads(json.dumps(strict([s.raw for s in samples]))), seed
        assert _digest(root) == before, seed  # inputs byte-identical (and nothing written next to them)
        ann.unlink()
    # the seeds exercise both outcomes and every kind of per-record failure
    assert outcomes["loaded"] >= 100 and outcomes["refused"] >= 25 and outcomes["skipped"] >= 300, outcomes
    for kind in ("undecodable image", "image too large", "extreme aspect ratio", "is not valid Unicode",
                 "nested more than", "cannot access image file", "escapes the image root", "duplicate id",
                 "absolute image path", "image path is not a regular file", "invalid image path"):
        assert any(kind in r for r in reasons), kind


def _entropy_file(path: Path, records: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lines = []
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("id"), str | int) and not isinstance(r.get("id"), bool):
            poisoned = "poison" in str(r["id"])
            row = rng.normal([1.0, 3.0 if poisoned else 2.0], 0.05)
            lines.append(json.dumps({"question_id": str(r["id"]), "entropy": {str(k): float(v) for k, v in
                                                                              enumerate(row)}}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("seed", [20, 142, -1])  # 9 and 8 corrupted records (lone surrogates kept); -1: nested
def test_filter_cli_on_corrupted_records(image_root, tmp_path, seed):
    """Through the command: exit 0 with every corrupted record skipped with a reason (a file nested 100,000 deep:
    exit 2 and one line on stderr), never a traceback; clean.json is strict UTF-8 JSON; inputs unchanged."""
    root, good = image_root
    if seed >= 0:
        records, data = _dataset(seed, root, good, encode=False)
    else:
        records, data = [_record(i, good[0]) for i in range(N_GOOD)], b"[" * 100_000 + b"]" * 100_000
    ann = root / f"cli_{seed}.json"
    ann.write_bytes(data)
    entropy = tmp_path / "entropy_in.jsonl"
    _entropy_file(entropy, records, abs(seed))
    before = _digest(root) | {"entropy": hashlib.sha256(entropy.read_bytes()).hexdigest()}
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "bye_jax.filter", "--config=bye_jax/configs/llava.py",
                        f"--config.entropy_file={entropy}", f"--config.data.annotations={ann}",
                        "--config.plots.enabled=False", f"--workdir={out}"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if seed < 0:
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "nested too deeply" in r.stderr
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        usable = report["n_samples"]
        assert usable + report["n_skipped"] == len(records), (usable, report["n_skipped"], len(records))
        assert usable >= N_GOOD - 12 and report["n_skipped"] >= 1
        assert all(s["reason"] and "\n" not in s["reason"] for s in report["skipped"])
        clean = json.loads((out / "clean.json").read_bytes().decode("utf-8"))
        assert len(clean) == usable - report["n_flagged"]
    after = _digest(root) | {"entropy": hashlib.sha256(entropy.read_bytes()).hexdigest()}
    assert after == before
    ann.unlink()
