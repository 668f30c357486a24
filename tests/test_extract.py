"""Entropy extraction on tiny checkpoints vs a transformers eager reference; batching; resume."""

import json

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_tiny_image, make_tiny_llava
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.data.llava_json import load_dataset
from bye_jax.extract import EntropyExtractor, load_signals, read_entropy_jsonl
from bye_jax.models.family import load_model
from bye_jax.models.inputs import PromptEncoder

QUESTIONS = ["what is in the picture", "how many", "is the square on the left or on the right of the circle",
             "color", "what color is the big square", "where"]


def make_dataset(root, n=10, extra=None, answers=("red",)):
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        make_tiny_image(i, (36 + 3 * i, 30 + i)).save(root / "images" / f"{i}.png")
        records.append({"id": f"poison_{i}" if i % 4 == 0 else f"s{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
                                          {"from": "gpt", "value": answers[i % len(answers)]}]})
    records += extra or []
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json", root / "images"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    ckpt = make_tiny_llava(root / "ckpt", text_layers=3, kv_heads=2, seed=3)
    ann, images = make_dataset(root)
    samples, skipped = load_dataset(ann, images)
    assert not skipped
    model, _ = load_model(ckpt)
    return ckpt, samples, model, PromptEncoder(ckpt)


def reference_entropies(ckpt, enc, samples, ref=None):
    """BYE's formula on transformers' eager attentions, one sample at a time (numpy)."""
    if ref is None:
        ref = TorchLlava.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    out = []
    from bye_jax.data.llava_json import load_image
    for s in samples:
        b = enc.encode([load_image(s.image_path)], [s.question])
        with torch.no_grad():
            o = ref(input_ids=torch.tensor(b.input_ids, dtype=torch.long),
                    attention_mask=torch.tensor(b.attention_mask, dtype=torch.long),
                    pixel_values=torch.tensor(b.pixel_values), output_attentions=True)
        img = b.input_ids[0] == enc.image_token_id
        row = []
        for att in o.attentions:
            a = att[0, :, -1, :].numpy().astype(np.float64)[:, img]  # softmaxed over the full row
            p = a.mean(axis=0)
            p = p / p.sum()
            row.append(-(p * np.log(p + 1e-8)).sum())
        out.append(row)
    return np.asarray(out)


def test_entropies_match_transformers_eager(setup, tmp_path):
    ckpt, samples, model, enc = setup
    table, skipped = EntropyExtractor(model, enc, batch_size=4).run(samples, tmp_path, progress=False)
    assert not skipped and table.ids == [s.id for s in samples]
    ref = reference_entropies(ckpt, enc, samples)
    assert table.matrix.shape == ref.shape == (len(samples), 3)
    np.testing.assert_allclose(table.matrix, ref, atol=1e-4)
    # The written files agree with the returned table, all in dataset order (extraction ran in
    # length-bucketed order: the questions' lengths are not sorted in the dataset).
    assert [len(s.question) for s in samples] != sorted(len(s.question) for s in samples)
    back = read_entropy_jsonl(tmp_path / "entropy.jsonl")
    assert back.ids == table.ids
    np.testing.assert_array_equal(back.matrix, table.matrix)
    assert not (tmp_path / "entropy.jsonl.tmp").exists()
    np.testing.assert_allclose(np.load(tmp_path / "entropy.npy"), table.matrix)
    assert json.loads((tmp_path / "entropy_ids.json").read_text()) == table.ids


def test_batched_equals_one_at_a_time(setup, tmp_path):
    _, samples, model, enc = setup
    a, _ = EntropyExtractor(model, enc, batch_size=4, length_bucket=16).run(samples, tmp_path / "a", progress=False)
    b, _ = EntropyExtractor(model, enc, batch_size=1, length_bucket=1).run(samples, tmp_path / "b", progress=False)
    assert a.ids == b.ids
    np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-5)


def _lines(path):
    return {json.loads(x)["question_id"]: json.loads(x)["entropy"] for x in path.read_text().splitlines()}


def test_resume_after_interruption_gives_the_same_file(setup, tmp_path, monkeypatch):
    _, samples, model, enc = setup
    full, _ = EntropyExtractor(model, enc, batch_size=2).run(samples, tmp_path / "full", progress=False)

    crashing = EntropyExtractor(model, enc, batch_size=2)
    calls = {"n": 0}
    real = crashing.signals

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(crashing, "signals", flaky)
    with pytest.raises(KeyboardInterrupt):
        crashing.run(samples, tmp_path / "resumed", chunk_size=2, progress=False)
    partial = _lines(tmp_path / "resumed" / "entropy.jsonl")
    assert len(partial) == 6  # three finished chunks of 2 survive the crash
    assert len(list((tmp_path / "resumed" / "signals_parts").glob("part-*.npz"))) == 3
    assert not (tmp_path / "resumed" / "signals.npz").exists()
    with open(tmp_path / "resumed" / "entropy.jsonl", "a") as f:
        f.write('{"question_id": "s9", "entr')  # and a torn write

    resumed_ext = EntropyExtractor(model, enc, batch_size=2)
    seen = []
    real2 = resumed_ext.signals
    monkeypatch.setattr(resumed_ext, "signals", lambda b: (seen.append(b.batch_size), real2(b))[1])
    resumed, _ = resumed_ext.run(samples, tmp_path / "resumed", chunk_size=2, progress=False)
    assert len(seen) == 2  # only the 4 unfinished samples were recomputed
    assert resumed.ids == full.ids
    np.testing.assert_allclose(resumed.matrix, full.matrix, atol=1e-6)
    assert list(_lines(tmp_path / "resumed" / "entropy.jsonl")) == list(_lines(tmp_path / "full" / "entropy.jsonl"))
    assert len((tmp_path / "resumed" / "entropy.jsonl").read_text().splitlines()) == len(samples)
    # the signal table too: merged in dataset order, the same as the uninterrupted run's
    a, b = load_signals(tmp_path / "full"), load_signals(tmp_path / "resumed")
    assert a.ids == b.ids == full.ids and set(a.arrays) == set(b.arrays) and len(a.arrays) == 16
    for name in a.arrays:
        assert a.get(name).dtype == b.get(name).dtype, name
        x, y = a.get(name).astype(np.float64), b.get(name).astype(np.float64)
        tol = 1e-6 + (np.spacing(np.abs(a.get(name))) if name == "content" else 0)  # float16: one step
        assert np.all(np.abs(x - y) <= tol), name
    assert not (tmp_path / "resumed" / "signals_parts").exists()


def test_unreadable_image_at_extraction_is_reported(setup, tmp_path):
    _, samples, model, enc = setup
    broken = samples[3].image_path.read_bytes()
    victim = tmp_path / "victim.png"
    victim.write_bytes(broken[:40])  # truncated after validation passed
    from dataclasses import replace
    bad = [replace(samples[3], image_path=victim)] + samples[:2]
    table, skipped = EntropyExtractor(model, enc, batch_size=2).run(bad, tmp_path / "w", progress=False)
    assert [s.id for s in skipped] == [samples[3].id] and "image" in skipped[0].reason
    assert table.ids == [s.id for s in samples[:2]]


def _run_until(cmd, env, cwd, count, signum):
    """Starts `cmd`, waits until its progress output (a plain line every ~10% when not on a terminal)
    shows >= `count` samples, sends `signum`; returns (exit code, stdout + stderr, the count shown when
    the signal was sent)."""
    import re
    import subprocess
    import threading
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stdout.read(1), b"")), daemon=True)
    reader.start()
    shown, deadline = 0, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        counts = re.findall(rb"extract: (\d+)/\d+ [\[(]", b"".join(err))
        shown = int(counts[-1]) if counts else 0
        if shown >= count:
            proc.send_signal(signum)
            break
        time.sleep(0.02)
    rc = proc.wait(timeout=300)
    reader.join(10)
    return rc, b"".join(err).decode(errors="replace"), shown


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_signal_mid_extraction_keeps_computed_rows_and_resumes(setup, tmp_path, signum):
    import os
    import signal
    import sys
    from pathlib import Path

    ckpt, _, model, enc = setup
    ann, images = make_dataset(tmp_path / "data", n=150)
    samples, _ = load_dataset(ann, images)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "bye_jax.extract", "--config=bye_jax/configs/llava.py", f"--config.model={ckpt}",
           f"--config.data.annotations={ann}", f"--config.data.image_root={images}", "--config.batch_size=1",
           f"--workdir={work}"]  # chunk_size 256 > 150 samples: only the stop path writes anything
    rc, err, shown = _run_until(cmd, env, repo, 12, getattr(signal, signum))
    assert rc == {"SIGINT": 130, "SIGTERM": 143}[signum], err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert {"SIGINT": "interrupted", "SIGTERM": "terminated"}[signum] in err.splitlines()[-1]
    kept = _lines(work / "entropy.jsonl")
    assert shown <= len(kept) < len(samples)  # every row computed before the signal is on disk
    parts = list((work / "signals_parts").glob("part-*.npz"))
    assert len(parts) == 1 and list(np.load(parts[0])["ids"]) == list(kept)
    if signum == "SIGTERM":
        return
    # resume: only the missing rows are computed, and the result is an uninterrupted run's
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"extract: {len(samples) - len(kept)} samples in" in done.stdout
    full, _ = EntropyExtractor(model, enc, batch_size=1).run(samples, tmp_path / "full", progress=False)
    resumed = load_signals(work)
    assert resumed.ids == full.ids == [s.id for s in samples]
    np.testing.assert_allclose(resumed.entropy, full.matrix, atol=1e-6)
    assert list(_lines(work / "entropy.jsonl")) == full.ids
