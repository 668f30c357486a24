"""Fuzz: randomly corrupted entropy files and safetensors headers (fixed seeds, seconds; issue 14).

An entropy file either reads as a table whose rows every detector accepts (bad rows skipped with a
reason) or is refused with one ValueError line; a safetensors file either loads or is refused with one
SafetensorsError line -- never another exception, never a changed input. Two corrupted entropy files
also go through `python -m bye_jax.filter --config.entropy_file`: exit 0, or one line on stderr, no
traceback.
"""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bye_jax.detect import DETECTORS, detect
from bye_jax.extract import read_entropy_jsonl
from bye_jax.models.safetensors_io import SafetensorsError, SafetensorsFile

REPO = Path(__file__).resolve().parents[1]
N_ROWS, N_LAYERS = 40, 4
JUNK = ["Infinity", "-Infinity", "NaN", "1e308", "-1", "1e999", '"x"', "null", "true", "[]", "{}", "[[[[1]]]]",
        '"\\ud800"', "0", "99999", '{"0": 1}']


def _entropy_lines(rng: random.Random) -> list[str]:
    lines = []
    for i in range(N_ROWS):
        low = i < 4  # a few collapsed rows, so detectors have something to find
        row = {str(k): round((0.2 if low and k == 1 else 3.0) + rng.random() * 0.3, 4) for k in range(N_LAYERS)}
        lines.append(json.dumps({"question_id": f"{'poison' if low else 'clean'}_{i}", "entropy": row}))
    return lines


def _mutate_entropy(rng: random.Random, lines: list[str]) -> bytes:
    lines = list(lines)
    for _ in range(rng.randint(1, 4)):
        k = rng.randrange(len(lines))
        op = rng.randrange(8)
        if op == 0:  # a value replaced by junk
            key = f'"{rng.randrange(N_LAYERS)}": '
            lines[k] = lines[k].replace(key, f'{key}{rng.choice(JUNK)}, "z": ', 1)
        elif op == 1:  # an id repeated with other values
            lines.insert(rng.randrange(len(lines)), lines[k].replace("3.", "2.", 1))
        elif op == 2:  # a line cut short
            lines[k] = lines[k][: rng.randrange(len(lines[k]) + 1)]
        elif op == 3:  # a layer removed
            lines[k] = lines[k].replace(f', "{N_LAYERS - 1}": ', ', "x": ', 1)
        elif op == 4:  # a field renamed or retyped
            field = rng.choice(['"entropy"', '"question_id"'])
            lines[k] = lines[k].replace(field, rng.choice(['"e"', '1', '"entropy"']), 1)
        elif op == 5:  # a whole record replaced by junk
            lines[k] = rng.choice(JUNK + ["[" * 5000 + "]" * 5000])
        elif op == 6:  # a value out of range
            lines[k] = lines[k].replace('"0": ', f'"0": {rng.choice(["-0.5", "1e30", "-1e-3"])}, "y": ', 1)
        else:  # a blank line
            lines.insert(k, "")
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    if rng.random() < 0.15:  # bytes that are not UTF-8
        i = rng.randrange(len(data))
        data = data[:i] + b"\xff\xfe" + data[i:]
    return data


def test_corrupted_entropy_files_read_or_refuse_in_one_line(tmp_path):
    outcomes = {"read": 0, "refused": 0}
    for seed in range(150):
        rng = random.Random(seed)
        path = tmp_path / f"e{seed}.jsonl"
        path.write_bytes(_mutate_entropy(rng, _entropy_lines(rng)))
        before = path.read_bytes()
        try:
            table = read_entropy_jsonl(path)
        except ValueError as e:  # JSON / UTF-8 / layer-count problems: one line
            assert "\n" not in str(e) and str(e), (seed, str(e))
            outcomes["refused"] += 1
            continue
        finally:
            assert path.read_bytes() == before, seed
        outcomes["read"] += 1
        m = table.matrix
        assert len(set(table.ids)) == len(table.ids), seed
        assert not np.isinf(m).any() and (np.isnan(m) | (m >= -1e-6)).all(), seed
        assert all(s.reason and "\n" not in s.reason for s in table.skipped), seed
        if not table.ids:
            continue
        for name in DETECTORS:
            det = detect(m, table.ids, name, 2.0, seed=0)
            assert det.verdict and set(det.flagged_ids) <= set(table.ids), (seed, name)
            json.dumps(det.to_report(), allow_nan=False)  # strict JSON out
    assert outcomes["read"] >= 10 and outcomes["refused"] >= 10, outcomes  # the fuzz reaches both paths


@pytest.mark.parametrize("seed", [3, 11])
def test_corrupted_entropy_file_through_the_filter_command(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "entropy_in.jsonl"
    lines = _entropy_lines(rng)
    lines[5] = lines[5].replace('"0": ', '"0": Infinity, "z": ', 1)
    lines.append(lines[7].replace("3.", "2.", 1))
    path.write_bytes(_mutate_entropy(rng, lines))
    before = path.read_bytes()
    r = subprocess.run([sys.executable, "-m", "bye_jax.filter", "--config=bye_jax/configs/llava.py",
                        f"--config.entropy_file={path}", f"--workdir={tmp_path / 'out'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr + r.stdout
    if r.returncode != 0:
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    else:
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["verdict"] and report["n_skipped"] >= 1  # the Infinity row at least, with its reason
    assert path.read_bytes() == before


def _safetensors_bytes(rng: random.Random) -> bytes:
    header, blobs, offset = {}, [], 0
    for i in range(3):
        shape = [rng.randint(1, 4), rng.randint(1, 4)]
        data = np.arange(math.prod(shape), dtype=np.float32).tobytes()
        header[f"w{i}"] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    return _pack(header, b"".join(blobs))


def _pack(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def _mutate_safetensors(rng: random.Random, blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    op = rng.randrange(9)
    name = rng.choice([k for k in header if k != "__metadata__"])
    values = [None, -1, 2**70, "F32", "Q9", [], [1, 2, 3], [-1, 4], {}, [1.5, 2], ["a"], [0, 10**9], True]
    if op == 0:
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(values)
    elif op == 1:
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 2:
        header[name] = rng.choice(values)
    elif op == 3:
        return _pack(rng.choice([[header], "header", 7, None]), data)
    elif op == 4:  # the length field lies
        return struct.pack("<Q", rng.choice([0, n + 5, 2**63, n - 3])) + blob[8:]
    elif op == 5:  # truncated file
        return blob[: rng.randrange(len(blob))]
    elif op == 6:  # a byte of the header flipped
        i = 8 + rng.randrange(n)
        return blob[:i] + bytes([blob[i] ^ (1 << rng.randrange(8))]) + blob[i + 1:]
    elif op == 7:  # deep nesting inside the header
        return _pack(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", data)
    else:  # the data section cut
        data = data[: len(data) // 2]
    return _pack(header, data)


def test_corrupted_safetensors_headers_load_or_refuse_in_one_line(tmp_path):
    outcomes = {"loaded": 0, "refused": 0}
    for seed in range(200):
        rng = random.Random(seed)
        path = tmp_path / f"m{seed}.safetensors"
        path.write_bytes(_mutate_safetensors(rng, _safetensors_bytes(rng)))
        before = path.read_bytes()
        try:
            st = SafetensorsFile(path)
            try:
                for name in st.header:
                    st.tensor(name).sum()
            finally:
                st.close()
            outcomes["loaded"] += 1
        except SafetensorsError as e:
            assert str(e) and "\n" not in str(e), (seed, str(e))
            outcomes["refused"] += 1
        assert path.read_bytes() == before, seed
    assert outcomes["refused"] > 100 and outcomes["loaded"] >= 1, outcomes
