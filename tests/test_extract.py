"""Entropy extraction on tiny checkpoints vs a transformers eager reference; batching; resume."""

import json

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_tiny_image, make_tiny_llava
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.data.llava_json import load_dataset
from bye_jax.extract import EntropyExtractor, read_entropy_jsonl
from bye_jax.models.hf_loader import load_llava
from bye_jax.models.inputs import PromptEncoder

QUESTIONS = ["what is in the picture", "how many", "is the square on the left or on the right of the circle",
             "color", "what color is the big square", "where"]


def make_dataset(root, n=10, extra=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        make_tiny_image(i, (36 + 3 * i, 30 + i)).save(root / "images" / f"{i}.png")
        records.append({"id": f"poison_{i}" if i % 4 == 0 else f"s{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
                                          {"from": "gpt", "value": "red"}]})
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
    model, _ = load_llava(ckpt)
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
