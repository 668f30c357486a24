"""Workdir ownership and lock (bye_jax/workdir.py): no output replaces a file the tool did not write,
one run per workdir, a stale lock is recovered. Issue 14, findings 1 and 8."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bye_jax import workdir as workdirs
from bye_jax.configs.llava import get_config
from bye_jax.errors import UserError
from bye_jax.runner import run_filter

REPO = Path(__file__).resolve().parents[1]
N = 24


def _strict_json(text: str):
    def bad(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_upload(folder: Path, image_names=None) -> tuple[Path, Path]:
    """A dataset folder (annotations + images side by side) and an entropy file for its ids, elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = image_names or [f"{i}.png" for i in range(N)]
    records, lines = [], []
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / name)
        sid = f"poison_{i}" if i < 4 else f"s{i}"
        records.append({"id": sid, "image": name,
                        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
        row = {str(k): float((0.5 if i < 4 and k == 1 else 3.0) + 0.05 * rng.random()) for k in range(3)}
        lines.append(json.dumps({"question_id": sid, "entropy": row}))
    (folder / "train.json").write_text(json.dumps(records))
    ent = folder.parent / f"{folder.name}_entropy.jsonl"
    ent.write_text("\n".join(lines) + "\n")
    return folder / "train.json", ent


def _filter_cli(*args):
    return subprocess.run([sys.executable, "-m", "bye_jax.filter", "--config=bye_jax/configs/llava.py", *args],
                          capture_output=True, text=True, cwd=str(REPO), timeout=600)


def _one_line_failure(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# -- finding 1: the dataset folder as the workdir ----------------------------------------------------------


@pytest.mark.parametrize("foreign", ["entropy.jsonl", "report.json", "scores.png", "layer_separation.png"])
def test_dataset_folder_as_workdir_is_refused_and_left_untouched(tmp_path, foreign):
    names = [f"{i}.png" for i in range(N)]
    if foreign.endswith(".png"):
        names[5] = foreign  # an image of the upload that has an output's name
    ann, ent = make_upload(tmp_path / "upload", names)
    if foreign == "entropy.jsonl":  # the annotations themselves under an output's name
        ann = ann.rename(ann.with_name("entropy.jsonl"))
    elif foreign == "report.json":
        (tmp_path / "upload" / "report.json").write_text('{"mine": "a report of the uploader"}')
    before = _snapshot(tmp_path / "upload")
    r = _filter_cli(f"--config.entropy_file={ent}", f"--config.data.annotations={ann}",
                    f"--workdir={tmp_path / 'upload'}")
    line = _one_line_failure(r, foreign, "choose another --workdir")
    assert "not written by bye_jax" in line or "would replace the input" in line
    assert _snapshot(tmp_path / "upload") == before


def test_rerun_reuses_its_own_files_but_never_a_changed_or_copied_one(tmp_path):
    ann, ent = make_upload(tmp_path / "upload")
    cfg = get_config()
    cfg.entropy_file, cfg.data.annotations = str(ent), str(ann)
    cfg.detect.rule = "official"  # robust needs >= 20 samples to decide; this is about reuse, not detection
    out = tmp_path / "out"
    first = run_filter(cfg, out, progress=False)
    second = run_filter(cfg, out, progress=False)  # the same workdir again: all outputs are ours
    assert second["flagged_ids"] == first["flagged_ids"] == [f"poison_{i}" for i in range(4)]
    assert not (out / workdirs.LOCK).exists()
    manifest = json.loads((out / workdirs.MANIFEST).read_text())
    assert {"entropy.jsonl", "report.json", "clean.json", "flagged.json", "layer_separation.png",
            "scores.png"} <= set(manifest["files"])

    copy = tmp_path / "copy"  # a copied workdir (or one unpacked from an upload) proves nothing
    shutil.copytree(out, copy)
    with pytest.raises(UserError, match="not written by bye_jax"):
        run_filter(cfg, copy, progress=False)

    edited = (out / "clean.json").read_text().replace('"a"', '"b"')
    (out / "clean.json").write_text(edited)  # the user edited an output: it is theirs now
    with pytest.raises(UserError, match="clean.json exists and was not written by bye_jax"):
        run_filter(cfg, out, progress=False)
    assert (out / "clean.json").read_text() == edited
    assert not (out / workdirs.LOCK).exists()  # a refused run releases its lock


def test_output_that_is_an_image_of_the_loaded_samples_is_refused(tmp_path):
    """An output we wrote earlier that the upload now uses as an image is an input, not ours to replace."""
    ann, ent = make_upload(tmp_path / "upload")
    cfg = get_config()
    cfg.entropy_file, cfg.data.annotations = str(ent), str(ann)
    run_filter(cfg, tmp_path / "upload", progress=False)
    records = json.loads(ann.read_text())
    records[3]["image"] = "scores.png"
    (tmp_path / "upload" / "train2.json").write_text(json.dumps(records))
    cfg.data.annotations = str(tmp_path / "upload" / "train2.json")
    before = (tmp_path / "upload" / "scores.png").read_bytes()
    with pytest.raises(UserError, match="output scores.png would replace the input"):
        run_filter(cfg, tmp_path / "upload", progress=False)
    assert (tmp_path / "upload" / "scores.png").read_bytes() == before


def test_strict_json_and_no_server_paths_in_report(tmp_path):
    ann, ent = make_upload(tmp_path / "upload")
    records = json.loads(ann.read_text())
    records[7]["weight"] = float("nan")  # json.dumps writes NaN; Python's reader accepts it
    ann.write_text(json.dumps(records))
    cfg = get_config()
    cfg.entropy_file, cfg.data.annotations = str(ent), str(ann)
    report = run_filter(cfg, tmp_path / "out", progress=False)
    text = (tmp_path / "out" / "report.json").read_text()
    _strict_json(text)
    assert str(tmp_path) not in text and report["files"][0] == "report.json"
    clean = _strict_json((tmp_path / "out" / "clean.json").read_text())
    assert next(r for r in clean if r["id"] == "s7")["weight"] is None


# -- the API --------------------------------------------------------------------------------------------


def test_claim_api_records_and_refuses(tmp_path):
    (tmp_path / "theirs.txt").write_text("x")
    with workdirs.claim(tmp_path, ["a.json", "b.bin"]) as wd:
        wd.write_json("a.json", {"x": float("inf"), "y": np.float32(2.5)})
        with wd.writing("b.bin"):
            (tmp_path / "b.bin").write_bytes(b"123")
        assert wd.owns("a.json") and wd.owns("b.bin") and not wd.owns("theirs.txt")
        with pytest.raises(UserError, match="theirs.txt exists and was not written by bye_jax"):
            wd.path("theirs.txt")
        with workdirs.claim(tmp_path, ["c.txt"]) as again:  # reentrant within a process
            assert again is wd
        with wd.writing("base"):  # an earlier stage's output is a later stage's input
            (tmp_path / "base").mkdir()
        with workdirs.claim(tmp_path, ["results.json"], inputs=[tmp_path / "base"]):
            pass
        assert (tmp_path / workdirs.LOCK).exists()
    assert not (tmp_path / workdirs.LOCK).exists()
    assert _strict_json((tmp_path / "a.json").read_text()) == {"x": None, "y": 2.5}
    with pytest.raises(UserError, match="would replace the input"):
        workdirs.claim(tmp_path, ["a.json"], inputs=[tmp_path / "a.json"])
    with workdirs.claim(tmp_path, ["a.json", "b.bin"]):  # a later run: both are ours
        pass


def test_symlink_at_an_output_name_is_never_ours(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    out = tmp_path / "out"
    with workdirs.claim(out, ["report.json"]) as wd:
        wd.write_json("report.json", {})
    (out / "report.json").unlink()
    (out / "report.json").symlink_to(target)
    with pytest.raises(UserError, match="report.json exists and was not written"):
        workdirs.claim(out, ["report.json"])
    assert target.read_text() == "keep"


def test_forged_manifest_is_ignored(tmp_path):
    (tmp_path / "report.json").write_text("theirs")
    st = (tmp_path / "report.json").stat()
    forged = {"written_by": "bye_jax", "ino": 1, "files": {"report.json": {
        "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}}}
    (tmp_path / workdirs.MANIFEST).write_text(json.dumps(forged))
    with pytest.raises(UserError, match="not written by bye_jax"):
        workdirs.claim(tmp_path, ["report.json"])


@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_workdir_that_is_a_file_is_refused(tmp_path, kind):
    (tmp_path / "f").write_text("x")
    path = tmp_path / "f" if kind == "file" else tmp_path / "f" / "sub"
    with pytest.raises(UserError, match="is a file" if kind == "file" else "which is a file"):
        workdirs.claim(path, ["report.json"])
    assert (tmp_path / "f").read_text() == "x"


# -- finding 8: one run per workdir ----------------------------------------------------------------------

HOLDER = """
import sys, time
from bye_jax import workdir
try:
    wd = workdir.claim(sys.argv[1], ["report.json"])
except Exception as e:
    print("refused:", e, flush=True)
    sys.exit(3)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
wd.release()
"""


def _holder(folder, seconds):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=env)


def test_second_run_refuses_and_a_killed_runs_lock_is_recovered(tmp_path):
    ann, ent = make_upload(tmp_path / "upload")
    out = tmp_path / "out"
    holder = _holder(out, 120)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = (f"--config.entropy_file={ent}", f"--config.data.annotations={ann}", f"--workdir={out}")
        r = _filter_cli(*args)
        _one_line_failure(r, f"is in use by process {holder.pid} on {socket.gethostname()}")
        assert not (out / "report.json").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (out / workdirs.LOCK).exists()  # left behind by the killed run
        r = _filter_cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not (out / workdirs.LOCK).exists()
        assert len((out / "entropy.jsonl").read_text().splitlines()) == N
    finally:
        holder.kill()
        holder.wait()


def test_two_processes_racing_for_one_workdir_one_wins(tmp_path):
    for _ in range(3):
        out = tmp_path / f"race{_}"
        a, b = _holder(out, 3), _holder(out, 3)
        results = sorted(p.stdout.readline().split(":")[0].strip() for p in (a, b))
        for p in (a, b):
            p.wait()
        assert results == ["locked", "refused"], results


def test_lock_of_another_host_is_not_broken_and_a_reused_pid_is(tmp_path):
    lock = tmp_path / workdirs.LOCK
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(UserError, match="in use by process 1 on elsewhere since then .*remove"):
        workdirs.claim(tmp_path, [])
    # a live pid of this host whose start time differs: the pid was reused, the lock is stale
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "0"}))
    os_pid_is_ours = workdirs._proc_start(os.getpid()) is not None
    if os_pid_is_ours:  # Linux: /proc tells the start time
        with pytest.raises(UserError, match="in use"):  # own pid: never broken
            workdirs.claim(tmp_path, [])
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            lock.write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(), "start": "0"}))
            with workdirs.claim(tmp_path, []):
                assert json.loads(lock.read_text())["pid"] == os.getpid()
        finally:
            child.kill()
            child.wait()


def _interactive_signals():
    """The child gets SIGINT / SIGTERM as a command started from a terminal does. A child inherits an
    ignored disposition (a test run started in the background, `cmd &` in a script, ignores SIGINT) and the
    forking thread's signal mask (native code loaded by earlier tests may leave signals blocked in it): in
    the full suite of a clean-clone CI run the SIGINT never reached the command and the test timed out."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def test_interrupt_and_terminate_exit_in_one_line_and_release_the_lock(tmp_path):
    ann, _ = make_upload(tmp_path / "upload")
    fifo = tmp_path / "entropy_fifo.jsonl"
    os.mkfifo(fifo)  # reading it blocks: the run is busy when the signal comes
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        out = tmp_path / f"out_{code}"
        p = subprocess.Popen([sys.executable, "-m", "bye_jax.filter", "--config=bye_jax/configs/llava.py",
                              f"--config.entropy_file={fifo}", f"--config.data.annotations={ann}",
                              f"--workdir={out}"], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=_interactive_signals)
        deadline = time.time() + 300
        while not (out / workdirs.LOCK).exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert p.returncode == code, (p.returncode, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and word in lines[0] and "Traceback" not in err, err[-2000:]
        assert not (out / workdirs.LOCK).exists()


def test_report_reasons_name_images_relative_to_the_image_root(tmp_path):
    from bye_jax.runner import _relative

    root = tmp_path / "data" / "images"
    reason = f"image unreadable at extraction: {root.resolve()}/sub/x.png: undecodable image"
    assert _relative(reason, [tmp_path / "out", root]) == "image unreadable at extraction: sub/x.png: undecodable image"
