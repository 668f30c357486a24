"""Every command fails in one line, non-zero, without a traceback, before loading data or a model
(issue 14, findings 7 and 9): flags and config files, the workdir, the mesh, the attention kernel,
safetensors headers, the tokenizer; plus the strict-JSON helper and the pixel-limit message."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from bye_jax.data.llava_json import ImageError, check_image, load_image
from bye_jax.jsonio import dump_json
from bye_jax.models.safetensors_io import SafetensorsError, read_header

REPO = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent_bye_jax/x"  # a model / dataset that would fail if anything tried to load it
COMMANDS = {  # module -> (config file, flags naming the model and the data)
    "bye_jax.filter": ("llava.py", [f"--config.model={MISSING}", f"--config.data.annotations={MISSING}.json"]),
    "bye_jax.extract": ("llava.py", [f"--config.model={MISSING}", f"--config.data.annotations={MISSING}.json"]),
    "bye_jax.train": ("train.py", [f"--config.model={MISSING}", f"--config.data.annotations={MISSING}.json"]),
    "bye_jax.eval": ("eval.py", [f"--config.model={MISSING}", f"--config.test.annotations={MISSING}.json"]),
    "bye_jax.pipeline": ("pipeline.py", [f"--config.model={MISSING}", f"--config.data.annotations={MISSING}.json",
                                         f"--config.test.annotations={MISSING}.json",
                                         f"--config.triggered.annotations={MISSING}.json"]),
}


def _run(module, *args, config=None):
    config = config or f"bye_jax/configs/{COMMANDS[module][0]}"
    return subprocess.run([sys.executable, "-m", module, f"--config={config}", *args], capture_output=True,
                          text=True, cwd=str(REPO), timeout=600)


def _one_line(r, *needles, code=2):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("bye_jax."), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_flag_and_config_file_errors(module, tmp_path):
    _one_line(_run(module, "--config.foo=1", f"--workdir={tmp_path}"), "unknown config key config.foo")
    _one_line(_run(module, f"--workdir={tmp_path}", config=str(tmp_path / "missing.py")),
              "--config file not found")
    _one_line(_run(module, "--no_such_flag", f"--workdir={tmp_path}"), "no_such_flag")


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_workdir_that_is_a_file_fails_before_loading(module, tmp_path):
    (tmp_path / "out").write_text("mine")
    r = _run(module, *COMMANDS[module][1], f"--workdir={tmp_path / 'out'}")
    _one_line(r, "is a file")  # not the missing model or dataset: nothing was loaded
    assert (tmp_path / "out").read_text() == "mine"


def test_workdir_under_a_file_or_not_writable(tmp_path):
    (tmp_path / "f").write_text("mine")
    _one_line(_run("bye_jax.filter", *COMMANDS["bye_jax.filter"][1], f"--workdir={tmp_path / 'f' / 'out'}"),
              "which is a file")
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a folder no one may write to
        locked = Path("/sys/kernel")
        if not locked.is_dir():
            pytest.skip("no unwritable folder for root on this machine")
    else:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o555)
    _one_line(_run("bye_jax.filter", *COMMANDS["bye_jax.filter"][1], f"--workdir={locked}"), "not writable")


@pytest.mark.parametrize("module", ["bye_jax.filter", "bye_jax.extract", "bye_jax.pipeline"])
def test_bad_mesh_fails_before_loading(module, tmp_path):
    _one_line(_run(module, *COMMANDS[module][1], "--config.mesh.fsdp=0", f"--workdir={tmp_path}"), "mesh.fsdp")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN attention is available on a GPU")
@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_cudnn_on_cpu_fails_before_loading(module, tmp_path):
    key = "finetune.attn_impl" if module == "bye_jax.pipeline" else "attn_impl"
    line = _one_line(_run(module, *COMMANDS[module][1], f"--config.{key}=cudnn", "--config.dtype=bfloat16",
                          *(["--config.finetune.dtype=bfloat16"] if module == "bye_jax.pipeline" else []),
                          f"--workdir={tmp_path / 'out'}"), "cudnn needs a GPU")
    assert "nonexistent" not in line


# -- checkpoints ------------------------------------------------------------------------------------------


def _write_safetensors(path: Path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header, message", [
    ([1, 2], "is a JSON list, not an object"),
    ({"w": [1, 2]}, "header entry is a JSON list"),
    ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, "no 'shape'"),
    ({"w": {"shape": [1], "data_offsets": [0, 4]}}, "no 'dtype'"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "no 'data_offsets'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape is not a list"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}}, "data_offsets is not"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "need 8"),
])
def test_malformed_safetensors_headers(tmp_path, header, message):
    _write_safetensors(tmp_path / "m.safetensors", header, b"\0" * 4)
    with pytest.raises(SafetensorsError, match=message) as info:
        read_header(tmp_path / "m.safetensors")
    assert "\n" not in str(info.value)


def test_valid_safetensors_header_still_reads(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _write_safetensors(tmp_path / "m.safetensors", header, np.arange(2, dtype=np.float32).tobytes())
    got, start = read_header(tmp_path / "m.safetensors")
    assert got == {"w": header["w"]} and start == 8 + len(json.dumps(header).encode())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_extract import make_dataset
    from tiny_checkpoints import make_tiny_llava

    root = tmp_path_factory.mktemp("cli_errors")
    ckpt = make_tiny_llava(root / "ckpt", text_layers=2, seed=1)
    ann, images = make_dataset(root, n=4)
    return ckpt, ann, images


@pytest.mark.parametrize("damage, message", [
    ("list_header", "not an object"),
    ("no_shape", "no 'shape'"),
    ("no_tokenizer", "no usable tokenizer"),
])
def test_broken_checkpoint_fails_in_one_line(tiny, tmp_path, damage, message):
    ckpt, ann, images = tiny
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    st = broken / "model.safetensors"
    if damage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (broken / name).unlink()
    else:
        raw = st.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        if damage == "list_header":
            header = list(header)
        else:
            name = next(k for k in header if k != "__metadata__")
            del header[name]["shape"]
        _write_safetensors(st, header, raw[8 + n:])
    r = _run("bye_jax.extract", f"--config.model={broken}", f"--config.data.annotations={ann}",
             f"--config.data.image_root={images}", f"--workdir={tmp_path / 'out'}")
    _one_line(r, message)


# -- item 9 ---------------------------------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no pixel data (PIL reads the size from IHDR)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_decompression_bomb_message_quotes_the_configured_limit(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20_000, 20_000))  # 4e8 pixels: over twice PIL's own limit
    reason = check_image(bomb, 1_000_000)
    assert reason == "image too large: 400000000 pixels > limit 1000000 (max_image_pixels)"
    with pytest.raises(ImageError, match=r"400000000 pixels > limit 5000 \(max_image_pixels\)"):
        load_image(bomb, max_image_pixels=5000)


def test_dump_json_is_strict():
    obj = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32("nan"),
           "d": np.arange(2), "e": (np.int64(3), np.bool_(True))}
    text = dump_json(obj)
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": None, "d": [0, 1], "e": [3, True]}
    assert "NaN" not in text and "Infinity" not in text
