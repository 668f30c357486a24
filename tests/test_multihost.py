"""Several processes on localhost (gloo collectives, 2 fake CPU devices each): extraction gives a
one-process run's results, process 0 alone writes, and a run interrupted with one process count
resumes with another. Launch errors are one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_extract import _run_until, make_dataset
from tiny_checkpoints import make_tiny_llava

from bye_jax.data.llava_json import load_dataset
from bye_jax.errors import UserError
from bye_jax.extract import EntropyExtractor, load_signals
from bye_jax.models.family import load_model
from bye_jax.models.inputs import PromptEncoder
from bye_jax.multihost import check_distributed

REPO = Path(__file__).resolve().parents[1]

# Records every write-like file operation under $SPY_WORKDIR into $SPY_LOG at exit (a process's
# sitecustomize: loaded before the command runs).
SPY = textwrap.dedent('''
    import atexit, builtins, io, json, os
    _root = os.path.realpath(os.environ["SPY_WORKDIR"])
    _seen = []
    _open, _os_open = builtins.open, os.open

    def _note(op, path):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except TypeError:
            return
        if p == _root or p.startswith(_root + os.sep):
            _seen.append([op, p])

    def _spy_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            _note("open", file)
        return _open(file, mode, *a, **k)

    def _spy_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _note("os.open", path)
        return _os_open(path, flags, *a, **k)

    def _wrap(name):
        real = getattr(os, name)
        def spy(path, *a, **k):
            _note(name, path)
            return real(path, *a, **k)
        setattr(os, name, spy)

    builtins.open = io.open = _spy_open
    os.open = _spy_os_open
    for _name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
        _wrap(_name)
    atexit.register(lambda: _open(os.environ["SPY_LOG"], "w").write(json.dumps(_seen)))
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    ckpt = make_tiny_llava(root / "ckpt", text_layers=3, kv_heads=2, seed=3)
    model, _ = load_model(ckpt)
    return root, ckpt, model, PromptEncoder(ckpt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(ckpt, ann, images, work, cache, *extra) -> list[str]:
    return [sys.executable, "-m", "bye_jax.extract", "--config=bye_jax/configs/llava.py", f"--config.model={ckpt}",
            f"--config.data.annotations={ann}", f"--config.data.image_root={images}", "--config.batch_size=2",
            f"--config.compile_cache_dir={cache}", f"--workdir={work}", *extra]


def _env(spy_dir: Path | None = None, **extra) -> dict:
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    if spy_dir is not None:
        path.insert(0, str(spy_dir))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}  # the tiny model compiles in < 1 s


def _launch(cmd: list[str], n: int, env_of=lambda p: _env()) -> list[list[str]]:
    """The per-process command lines of an n-process localhost run of `cmd`."""
    address = f"127.0.0.1:{_free_port()}"
    return [cmd + [f"--config.distributed.coordinator_address={address}", f"--config.distributed.num_processes={n}",
                   f"--config.distributed.process_id={p}"] for p in range(n)]


def _run_all(cmds: list[list[str]], envs: list[dict], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, cwd=REPO)
             for c, e in zip(cmds, envs, strict=True)]
    out = []
    try:
        for p, c in zip(procs, cmds, strict=True):
            text, _ = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(c, p.returncode, text, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _entropies(work: Path) -> tuple[list[str], np.ndarray]:
    records = [json.loads(line) for line in (work / "entropy.jsonl").read_text().splitlines()]
    return [r["question_id"] for r in records], np.array([[r["entropy"][str(i)] for i in range(len(r["entropy"]))]
                                                          for r in records])


def _assert_same_results(work: Path, reference: Path) -> None:
    ids, values = _entropies(work)
    ref_ids, ref_values = _entropies(reference)
    assert ids == ref_ids
    np.testing.assert_allclose(values, ref_values, rtol=0, atol=1e-5)
    got, want = load_signals(work), load_signals(reference)
    assert got.ids == want.ids and sorted(got.arrays) == sorted(want.arrays)
    for name, a in want.arrays.items():
        b = got.arrays[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == np.float16:  # stored in float16: float32 values 1e-7 apart may round 1 ulp apart
            assert np.all(np.abs(a.astype(np.float32) - b.astype(np.float32)) <= np.spacing(np.abs(a))), name
        elif a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)


def test_bad_distributed_settings_are_one_line_errors(setup, tmp_path):
    from ml_collections import ConfigDict

    def check(**kw):
        section = ConfigDict(dict(coordinator_address="", num_processes=-1, process_id=-1))
        section.update(kw)
        with pytest.raises(UserError) as e:
            check_distributed(section)
        return str(e.value)

    assert "host:port" in check(coordinator_address="localhost")
    assert "port in 1..65535" in check(coordinator_address="localhost:99999")
    assert "num_processes must be an integer >= 1" in check(num_processes=0)
    assert "process_id=2 must be < num_processes=2" in check(coordinator_address="h:1", num_processes=2, process_id=2)
    assert "needs coordinator_address and process_id" in check(num_processes=2)
    assert check_distributed(ConfigDict(dict(coordinator_address="h:1234", num_processes=2, process_id=1))) == \
        ("h:1234", 2, 1)
    # through the command: one line, exit 2, before anything is loaded
    root, ckpt, _, _ = setup
    ann, images = make_dataset(tmp_path / "data", n=2)
    done = subprocess.run(_command(ckpt, ann, images, tmp_path / "w", setup[0] / "cache",
                                   "--config.distributed.coordinator_address=nohost"),
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bye_jax.extract: error: config.distributed.coordinator_address must be host:port with a port in 1..65535, "
        "got 'nohost'"]
    assert not (tmp_path / "w").exists()


def test_two_processes_filter_what_one_extracts_and_only_process_0_writes(setup, tmp_path):
    """`bye_jax.filter` over 2 processes: the extraction (collective) gives one process's entropies and
    signals; process 0 alone detects and writes the report, clean.json and flagged.json."""
    root, ckpt, model, enc = setup
    ann, images = make_dataset(tmp_path / "data", n=13)  # odd: the processes' parts differ in size
    samples, _ = load_dataset(ann, images)
    EntropyExtractor(model, enc, batch_size=2).run(samples, tmp_path / "one", progress=False)
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    work = tmp_path / "two"
    cmd = _command(ckpt, ann, images, work, setup[0] / "cache", "--config.detect.rule=official",
                   "--config.detect.tau=1.0", "--config.plots.enabled=False")
    cmds = _launch([cmd[0], "-m", "bye_jax.filter", *cmd[3:]], 2)
    envs = [_env(spy, SPY_WORKDIR=str(work), SPY_LOG=str(tmp_path / f"writes{p}.json")) for p in range(2)]
    runs = _run_all(cmds, envs)
    for p, r in enumerate(runs):
        assert r.returncode == 0 and "Traceback" not in r.stdout, f"process {p}: {r.stdout[-3000:]}"
    assert "samples: 13  skipped: 0  layers: 3" in runs[0].stdout and "samples:" not in runs[1].stdout
    _assert_same_results(work, tmp_path / "one")
    report = json.loads((work / "report.json").read_text())
    clean, flagged = (json.loads((work / n).read_text()) for n in ("clean.json", "flagged.json"))
    assert report["n_samples"] == 13 and 0 < report["n_flagged"] < 13  # this random model's layers separate
    assert sorted(r["id"] for r in flagged) == sorted(report["flagged_ids"]) and len(clean) + len(flagged) == 13
    writes = [json.loads((tmp_path / f"writes{p}.json").read_text()) for p in range(2)]
    assert any(path.endswith("entropy.jsonl") for _, path in writes[0])  # the spy sees process 0's writes
    assert writes[1] == []  # process 1 never wrote, created or removed anything in the workdir
    assert list((setup[0] / "cache").glob("jit__signal_step-*"))  # the compilation cache is on


def test_compile_cache_dir_empty_turns_the_cache_off(tmp_path):
    import jax

    from bye_jax import multihost

    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir, multihost._STATE["cache"])
    try:
        assert multihost.enable_compile_cache(str(tmp_path / "c")) == str(tmp_path / "c")
        assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert multihost.enable_compile_cache("") is None
        assert not jax.config.jax_enable_compilation_cache
        (tmp_path / "file").write_text("x")
        with pytest.raises(UserError, match="compile_cache_dir .*cannot create it"):
            multihost.enable_compile_cache(str(tmp_path / "file" / "sub"))
    finally:
        jax.config.update("jax_enable_compilation_cache", before[0])
        jax.config.update("jax_compilation_cache_dir", before[1])
        multihost._STATE["cache"] = before[2]


@pytest.fixture(scope="module")
def longer(setup, tmp_path_factory):
    """64 samples and a one-process run's results on them."""
    root, ckpt, model, enc = setup
    data = tmp_path_factory.mktemp("longer")
    ann, images = make_dataset(data, n=64)
    samples, _ = load_dataset(ann, images)
    EntropyExtractor(model, enc, batch_size=2).run(samples, data / "full", progress=False)
    return ann, images, samples, data / "full"


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_interrupted_run_resumes_with_another_process_count(setup, longer, tmp_path, first, then):
    root, ckpt, model, enc = setup
    ann, images, samples, reference = longer
    work = tmp_path / "w"
    cmd = _command(ckpt, ann, images, work, setup[0] / "cache", "--config.chunk_size=8")
    # the first run, interrupted (SIGINT to process 0; every process stops after the same batch)
    cmds = _launch(cmd, first) if first > 1 else [cmd]
    helpers = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
               for c in cmds[1:]]
    try:
        rc, out, shown = _run_until(cmds[0], _env(), REPO, 8, signal.SIGINT)
        helper_rcs = [h.wait(timeout=120) for h in helpers]
    finally:
        for h in helpers:
            if h.poll() is None:
                h.kill()
    assert rc == 130 and all(r == 130 for r in helper_rcs), out[-3000:]
    kept = _entropies(work)[0]
    assert shown <= len(kept) < len(samples)
    # the rest, with the other process count
    cmds = _launch(cmd, then) if then > 1 else [cmd]
    runs = _run_all(cmds, [_env()] * len(cmds))
    assert all(r.returncode == 0 for r in runs), runs[0].stdout[-3000:]
    assert f"extract: {len(samples) - len(kept)} samples in" in runs[0].stdout
    _assert_same_results(work, reference)


def test_two_processes_train_what_one_does(setup, tmp_path):
    from safetensors.numpy import load_file

    from bye_jax.configs.train import get_config
    from bye_jax.train.main import finetune

    root, ckpt, _, _ = setup
    ann, images = make_dataset(tmp_path / "data", n=8)
    settings = {"batch_size": 4, "grad_accum": 1, "epochs": 1, "lora.rank": 4, "lora.alpha": 8.0, "lr": 5e-3,
                "length_bucket": 64}  # one batch shape: one compilation
    config = get_config()
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        section = config
        for p in parents:
            section = section[p]
        section[leaf] = value
    samples, _ = load_dataset(ann, images)
    finetune(ckpt, samples, tmp_path / "one", config, progress=False)  # one process, one device
    cmd = [sys.executable, "-m", "bye_jax.train", "--config=bye_jax/configs/train.py", f"--config.model={ckpt}",
           f"--config.data.annotations={ann}", f"--config.data.image_root={images}",
           f"--config.compile_cache_dir={setup[0] / 'cache'}", f"--workdir={tmp_path / 'two'}",
           *(f"--config.{k}={v}" for k, v in settings.items())]
    runs = _run_all(_launch(cmd, 2), [_env()] * 2, timeout=600)  # 2 processes x 2 devices: batch 4 over 4
    for p, r in enumerate(runs):
        assert r.returncode == 0 and "Traceback" not in r.stdout, f"process {p}: {r.stdout[-3000:]}"
    assert "train: 8 examples, 2 steps" in runs[0].stdout and "train:" not in runs[1].stdout
    one, two = (load_file(tmp_path / w / "adapter" / "adapter_model.safetensors") for w in ("one", "two"))
    assert sorted(one) == sorted(two) and len(one) > 0
    assert any(np.abs(v).max() > 0 for k, v in one.items() if "lora_B" in k)  # the steps moved the adapter
    for key, value in one.items():
        np.testing.assert_allclose(two[key], value, rtol=0, atol=1e-5, err_msg=key)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / w / "train_log.jsonl").read_text().splitlines()]
              for w in ("one", "two")]
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    # the checkpoint the 2 processes wrote together resumes in one process (at its last step: export only)
    finetune(ckpt, samples, tmp_path / "two", config, progress=False)
    assert json.loads((tmp_path / "two" / "train_metrics.json").read_text())["start_step"] == 2
    again = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for key, value in two.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_two_processes_eval_what_one_does_and_only_process_0_writes(setup, tmp_path):
    from bye_jax.configs.eval import get_config
    from bye_jax.eval.main import run_eval

    root, ckpt, _, _ = setup
    long_question = {"id": "too_long", "image": "0.png",  # over the 2048-token context: skipped in the last batch
                     "conversations": [{"from": "human", "value": "<image>\n" + "red " * 2100},
                                       {"from": "gpt", "value": "red"}]}
    test, test_images = make_dataset(tmp_path / "test", n=13, extra=[long_question])  # 7 batches of 2: 4 + 3
    trig, trig_images = make_dataset(tmp_path / "trig", n=5)  # 3 batches: 2 + 1
    settings = {"batch_size": 2, "max_new_tokens": 4, "length_bucket": 64, "target": "red"}
    config = get_config()
    config.update({"model": str(ckpt), **settings, "compile_cache_dir": str(setup[0] / "cache")})
    config.test.update(annotations=str(test), image_root=str(test_images))
    config.triggered.update(annotations=str(trig), image_root=str(trig_images))
    run_eval(config, tmp_path / "one", progress=False)  # one process
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    work = tmp_path / "two"
    cmd = [sys.executable, "-m", "bye_jax.eval", "--config=bye_jax/configs/eval.py", f"--config.model={ckpt}",
           f"--config.test.annotations={test}", f"--config.test.image_root={test_images}",
           f"--config.triggered.annotations={trig}", f"--config.triggered.image_root={trig_images}",
           f"--config.compile_cache_dir={setup[0] / 'cache'}", f"--workdir={work}",
           *(f"--config.{k}={v}" for k, v in settings.items())]
    envs = [_env(spy, SPY_WORKDIR=str(work), SPY_LOG=str(tmp_path / f"writes{p}.json")) for p in range(2)]
    runs = _run_all(_launch(cmd, 2), envs)
    for p, r in enumerate(runs):
        assert r.returncode == 0 and "Traceback" not in r.stdout, f"process {p}: {r.stdout[-3000:]}"
    assert "eval: CP" in runs[0].stdout and "eval:" not in runs[1].stdout
    one, two = (json.loads((tmp_path / w / "eval.json").read_text()) for w in ("one", "two"))
    assert one.pop("seconds") >= 0 and two.pop("seconds") >= 0
    assert two == one
    assert one["n_test"] == 13 and one["n_triggered"] == 5
    assert [s["id"] for s in one["skipped"]] == ["too_long"] and "context" in one["skipped"][0]["reason"]
    assert (work / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    writes = [json.loads((tmp_path / f"writes{p}.json").read_text()) for p in range(2)]
    assert any(Path(path).name.startswith(".eval.json.") for _, path in writes[0])  # written via a temp file
    assert writes[1] == []  # process 1 never wrote, created or removed anything in the workdir


# Makes generation fail on the process that loads it (its sitecustomize): preparing its first batch raises.
FAIL_GENERATION = textwrap.dedent('''
    import bye_jax.eval.generate as _generate

    def _fail(*args, **kwargs):
        raise RuntimeError("injected failure")
        yield

    _generate._batches = _fail
''')
# Answers without the model (its sitecustomize): nothing to compile, the test is about the processes' exchange.
FAKE_GENERATION = textwrap.dedent('''
    import numpy as np
    import bye_jax.eval.generate as _generate

    class _Fake:
        @staticmethod
        def greedy_generate(model, input_ids, *args, max_new_tokens, **kwargs):
            return np.zeros((len(input_ids), max_new_tokens), np.int32)

    _generate.family_of = lambda model: _Fake
''')


def test_a_process_failing_in_generation_stops_every_process_with_one_line(setup, tmp_path):
    """Process 1 fails on its first batch while process 0 has more to do (its answers faked: no
    compilation): without the per-batch status exchange process 0 would wait at the answers' gather
    forever (the timeout fails the test)."""
    root, ckpt, _, _ = setup
    test, test_images = make_dataset(tmp_path / "test", n=6)  # 3 batches of 2: process 0 has 2, process 1 has 1
    bad, fake = tmp_path / "bad", tmp_path / "fake"
    for folder, code in ((bad, FAIL_GENERATION), (fake, FAKE_GENERATION)):
        folder.mkdir()
        (folder / "sitecustomize.py").write_text(code)
    cmd = [sys.executable, "-m", "bye_jax.eval", "--config=bye_jax/configs/eval.py", f"--config.model={ckpt}",
           f"--config.test.annotations={test}", f"--config.test.image_root={test_images}", "--config.batch_size=2",
           "--config.max_new_tokens=4", "--config.length_bucket=64", "--config.target=red",
           f"--config.compile_cache_dir={setup[0] / 'cache'}", f"--workdir={tmp_path / 'w'}"]
    runs = _run_all(_launch(cmd, 2), [_env(fake), _env(bad)], timeout=150)
    for p, r in enumerate(runs):
        lines = [line for line in r.stdout.splitlines() if line.startswith("bye_jax.eval: error:")]
        assert r.returncode == 2 and "Traceback" not in r.stdout and len(lines) == 1, f"process {p}: {r.stdout[-3000:]}"
        assert "generation (test) failed on process 1 of 2: RuntimeError: injected failure" in lines[0], lines[0]
    assert not (tmp_path / "w" / "eval.json").exists()


def test_default_compile_cache_dir_follows_xdg_cache_home(monkeypatch):
    from bye_jax.configs.llava import get_config
    from bye_jax.configs.runtime import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert default_cache_dir() == "/srv/cache/bye_jax/jax" == get_config().compile_cache_dir
    for unusable in ("relative/cache", ""):  # the XDG spec ignores a relative path
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        assert default_cache_dir() == "~/.cache/bye_jax/jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert get_config().compile_cache_dir == "~/.cache/bye_jax/jax"
