"""The signal table (bye_jax/signals.py) against a direct computation from transformers' eager
attention and hidden states; its pure-JAX pieces on hand-made rows; the run identity of a workdir."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_extract import make_dataset
from tiny_checkpoints import make_tiny_llava
from transformers import AutoTokenizer
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.extract import EntropyExtractor, load_signals, read_entropy_jsonl
from bye_jax.extract_store import WorkdirMismatch
from bye_jax.models.family import load_model
from bye_jax.models.inputs import PromptEncoder
from bye_jax.signals_compute import batch_signals

GRID = 5  # image_size 30 / patch_size 6: 25 image tokens on a 5 x 5 grid


def make_peaked_llava(path, seed=5, qk_scale=2.0):
    """A tiny LLaVA with 25 image tokens whose last-position attention is peaked (q, k scaled up:
    normalised entropies down to ~0.45, peak masses up to ~0.57; unscaled: 0.93-0.98 and ~0.1)."""
    make_tiny_llava(path, image_size=30, patch_size=6, text_layers=3, kv_heads=2, seed=seed)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    for k in tensors:
        if "language_model" in k and k.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[k] = tensors[k] * qk_scale
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    ckpt = make_peaked_llava(root / "ckpt")
    ann, images = make_dataset(root / "data", n=8, answers=("red", " two shapes ", "Backdoor Attack!"))
    samples, skipped = load_dataset(ann, images)
    assert not skipped
    model, _ = load_model(ckpt)
    return ckpt, samples, model, PromptEncoder(ckpt)


def reference_signals(ckpt, enc, samples, dtype=torch.float32):
    """Every signal, per sample, from transformers' eager attentions / hidden states (numpy float64
    after the model, which runs in `dtype`, one unpadded sample at a time), following the
    definitions in bye_jax/signals.py."""
    ref = TorchLlava.from_pretrained(ckpt, attn_implementation="eager", dtype=dtype).eval()
    hidden = ref.config.text_config.hidden_size
    proj = np.random.default_rng(20240601).standard_normal((hidden, 16)) / np.sqrt(hidden)
    j = np.arange(GRID * GRID)
    coords = np.stack([(j // GRID + 0.5) / GRID, (j % GRID + 0.5) / GRID], axis=-1)
    out = {k: [] for k in ("entropy", "entropy_norm", "peak", "peak_mass", "topk_mass", "centroid", "content",
                           "peak_embed", "image_mass", "shares", "visual_text_ratio", "text_peak", "text_peak_mass",
                           "num_image_tokens", "user_tokens", "answer_tokens")}
    tokenizer = AutoTokenizer.from_pretrained(ckpt)  # the answer's ids: the checkpoint's tokenizer on its own
    # the template's generation prompt, tokenized on its own: the answer-prefix segment ends every prompt
    tail = enc.tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    for s in samples:
        b = enc.encode([load_image(s.image_path)], [s.question])
        with torch.no_grad():
            o = ref(input_ids=torch.tensor(b.input_ids, dtype=torch.long),
                    attention_mask=torch.tensor(b.attention_mask, dtype=torch.long),
                    pixel_values=torch.tensor(b.pixel_values, dtype=dtype), output_attentions=True,
                    output_hidden_states=True)
        img = b.input_ids[0] == enc.image_token_id
        n = int(img.sum())
        assert list(b.input_ids[0, -len(tail):]) == tail and b.attention_mask.all()
        first, last = np.flatnonzero(img)[[0, -1]]
        pos = np.arange(len(img))
        seg = {"system": pos < first, "image": img, "answer": pos >= len(img) - len(tail)}
        seg["user"] = (pos > last) & ~seg["answer"]
        assert sum(v.sum() for v in seg.values()) == len(img) and seg["user"].sum() > 0
        per = {k: [] for k in out if k not in ("num_image_tokens", "user_tokens", "answer_tokens")}
        for layer, att in enumerate(o.attentions):
            m = att[0, :, -1, :].numpy().astype(np.float64).mean(axis=0)  # head mean of the full row
            mass = m[img].sum()
            p = m[img] / mass
            h = -(p * np.log(p + 1e-8)).sum()
            x = o.hidden_states[layer][0].numpy().astype(np.float64)[img]  # the layer's input
            per["entropy"].append(h)
            per["entropy_norm"].append(h / np.log(n))
            per["peak"].append(int(np.argmax(p)))
            per["peak_mass"].append(p.max())
            per["topk_mass"].append(np.sort(p)[-4:].sum())
            per["centroid"].append(p @ coords)
            per["content"].append((p @ x) @ proj)
            # the input embedding (transformers' hidden_states[0]: the projector's output here) at the peak
            per["peak_embed"].append(o.hidden_states[0][0].numpy().astype(np.float64)[img][np.argmax(p)] @ proj)
            per["image_mass"].append(mass)
            full = att[0, :, -1, :].numpy().astype(np.float64)  # [heads, S]
            shares = np.stack([full[:, seg[k]].sum(axis=1) for k in ("system", "image", "user", "answer")], -1)
            per["shares"].append(shares)
            per["visual_text_ratio"].append(shares[:, 1].mean() / shares[:, 2].mean())
            user = m[seg["user"]]  # the head-mean row on the user text, in prompt order
            per["text_peak"].append(int(b.input_ids[0][seg["user"]][np.argmax(user)]))
            per["text_peak_mass"].append(user.max() / user.sum())
        for k, v in per.items():
            out[k].append(np.asarray(v))
        out["num_image_tokens"].append(n)
        # the question's token ids: the question tokenized on its own sits between the image and the answer
        user = [int(t) for t in b.input_ids[0][seg["user"]]]
        question = enc.tokenizer(s.question, add_special_tokens=False)["input_ids"]
        assert any(user[i:i + len(question)] == question for i in range(len(user)))
        out["user_tokens"].append(np.pad(user, (0, 128 - len(user)), constant_values=-1))
        answer = tokenizer(s.answer.strip(), add_special_tokens=False)["input_ids"][:32]
        out["answer_tokens"].append(np.pad(answer, (0, 32 - len(answer)), constant_values=-1))
    return {k: np.asarray(v) for k, v in out.items()}


def test_signals_match_transformers_eager(peaked, tmp_path):
    ckpt, samples, model, enc = peaked
    table, skipped = EntropyExtractor(model, enc, batch_size=4).run(samples, tmp_path, progress=False)
    assert not skipped
    # batches of 4 left-padded prompts of mixed lengths (the questions differ in length)
    assert len({len(s.question) for s in samples[:4]}) > 1 and len({len(s.question) for s in samples[4:]}) > 1
    got = load_signals(tmp_path)
    assert got.ids == [s.id for s in samples] == table.ids == table.signals.ids
    # The oracle runs in float64: transformers in float32 is itself off by up to 1.8e-6 in the entropy
    # here (peaked attention amplifies float32 rounding); ours measured 2.0e-6, the others <= 1e-6.
    ref = reference_signals(ckpt, enc, samples, dtype=torch.float64)
    assert ref["entropy_norm"].min() < 0.5 and ref["peak_mass"].max() > 0.5  # peaked, not nearly uniform
    assert set(got.arrays) == set(ref)
    n, layers = len(samples), 3
    for name in ("entropy", "entropy_norm", "peak_mass", "topk_mass", "image_mass"):
        assert got.get(name).shape == (n, layers) and got.get(name).dtype == np.float32, name
        atol = 4e-6 if name == "entropy" else 2e-6
        np.testing.assert_allclose(got.get(name), ref[name], rtol=0, atol=atol, err_msg=name)
    assert got.get("centroid").shape == (n, layers, 2)
    np.testing.assert_allclose(got.get("centroid"), ref["centroid"], rtol=0, atol=2e-6)
    assert got.get("peak").dtype == np.int32
    np.testing.assert_array_equal(got.get("peak"), ref["peak"])
    np.testing.assert_array_equal(got.get("num_image_tokens"), ref["num_image_tokens"])
    content = got.get("content")
    assert content.shape == (n, layers, 16) and content.dtype == np.float16
    # float16 storage: within one float16 step of the float64 value
    step = np.spacing(np.abs(ref["content"]).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(content.astype(np.float64) - ref["content"]) <= step + 1e-6)
    peak_embed = got.get("peak_embed")
    assert peak_embed.shape == (n, layers, 16) and peak_embed.dtype == np.float16
    step = np.spacing(np.abs(ref["peak_embed"]).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(peak_embed.astype(np.float64) - ref["peak_embed"]) <= step + 1e-6)
    assert len({tuple(v) for v in peak_embed.reshape(-1, 16).tolist()}) > 3  # not one token's embedding everywhere
    # per-head prompt-segment shares: float16 storage, within one float16 step of the float64 value
    shares = got.get("shares")
    assert shares.shape == (n, layers, 4, 4) and shares.dtype == np.float16  # 4 heads, 4 segments
    step = np.spacing(ref["shares"].astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(shares.astype(np.float64) - ref["shares"]) <= step + 1e-6)
    assert ref["shares"].reshape(-1, 4).max(axis=0).min() > 0.05  # every segment gets attention somewhere
    np.testing.assert_allclose(ref["shares"].sum(-1), 1.0, atol=1e-6)  # the segments cover the row
    ratio = got.get("visual_text_ratio")
    assert ratio.dtype == np.float32
    np.testing.assert_allclose(ratio, ref["visual_text_ratio"], rtol=2e-5, atol=0)
    # the text peak: the most attended user-text token's id and its share of the user text's attention
    assert got.get("text_peak").shape == (n, layers) and got.get("text_peak").dtype == np.int32
    np.testing.assert_array_equal(got.get("text_peak"), ref["text_peak"])
    assert got.get("text_peak_mass").dtype == np.float32
    # a ratio of two float32 sums of the peaked row (as the entropy: measured 2.9e-6 off the float64 value)
    np.testing.assert_allclose(got.get("text_peak_mass"), ref["text_peak_mass"], rtol=0, atol=4e-6)
    assert len(np.unique(ref["text_peak"])) > 1  # not one token everywhere: the ids are read, not a constant
    assert got.get("user_tokens").shape == (n, 128) and got.get("user_tokens").dtype == np.int32
    np.testing.assert_array_equal(got.get("user_tokens"), ref["user_tokens"])  # left-padded batches of mixed lengths
    assert got.get("answer_tokens").shape == (n, 32) and got.get("answer_tokens").dtype == np.int32
    np.testing.assert_array_equal(got.get("answer_tokens"), ref["answer_tokens"])
    assert len({tuple(r) for r in ref["answer_tokens"].tolist()}) > 1 and (ref["answer_tokens"][:, 0] >= 0).all()
    # the entropy is the reference value, and the same as entropy.jsonl and the entropy-only path
    np.testing.assert_array_equal(read_entropy_jsonl(tmp_path / "entropy.jsonl").matrix, got.entropy)
    np.testing.assert_array_equal(table.matrix, got.entropy)
    only, _ = EntropyExtractor(model, enc, batch_size=4, signals=False).run(samples, tmp_path / "e", progress=False)
    np.testing.assert_allclose(only.matrix, got.entropy, rtol=0, atol=1e-6)


def _np_signals(row, mask, grid):
    """Direct numpy version of the definitions (one sample, one layer)."""
    m = row.astype(np.float64).mean(axis=0)
    idx = np.flatnonzero(mask)
    n = len(idx)
    p = m[idx] / m[idx].sum()
    j = np.arange(n)
    if n == grid[0] * grid[1]:
        c = np.stack([(j // grid[1] + 0.5) / grid[0], (j % grid[1] + 0.5) / grid[1]], -1)
    else:
        c = np.stack([np.full(n, 0.5), (j + 0.5) / n], -1)
    return {"peak": int(np.argmax(p)), "peak_mass": p.max(), "topk_mass": np.sort(p)[-4:].sum(),
            "centroid": p @ c, "image_mass": m[idx].sum()}


def test_grid_fallback_few_tokens_and_no_image_mass():
    rng = np.random.default_rng(0)
    b, heads, s = 4, 3, 30
    logits = rng.normal(scale=3.0, size=(b, heads, s))
    row = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    mask = np.zeros((b, s), bool)
    mask[0, 3:19] = True  # 16 tokens on the 4 x 4 grid
    mask[1, [2, 5, 6, 9, 11, 20, 21]] = True  # 7 tokens, not contiguous: 1 x 7
    mask[2, [7, 8]] = True  # 2 tokens: fewer than TOPK
    mask[3, 10:26] = True
    row[3][:, mask[3]] = 0.0  # no attention mass on the image
    out = {k: np.asarray(v) for k, v in batch_signals([row.astype(np.float32)], mask, (4, 4)).items()}
    for i in range(3):
        ref = _np_signals(row[i], mask[i], (4, 4))
        assert out["peak"][i, 0] == ref["peak"]
        for k in ("peak_mass", "topk_mass", "image_mass"):
            assert out[k][i, 0] == pytest.approx(ref[k], abs=1e-6), (i, k)
        np.testing.assert_allclose(out["centroid"][i, 0], ref["centroid"], atol=1e-6)
    assert out["topk_mass"][2, 0] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(out["num_image_tokens"], [16, 7, 2, 16])
    assert out["peak"][3, 0] == -1 and out["image_mass"][3, 0] == 0
    for k in ("entropy", "entropy_norm", "peak_mass", "topk_mass"):
        assert np.isnan(out[k][3, 0]), k
    assert np.isnan(out["centroid"][3, 0]).all()


def _calls(ext, monkeypatch):
    seen = []
    real = ext.signals
    monkeypatch.setattr(ext, "signals", lambda b: (seen.append(b.batch_size), real(b))[1])
    return seen


def test_rerun_with_another_checkpoint_or_settings_is_refused(peaked, tmp_path):
    ckpt, samples, model, enc = peaked
    EntropyExtractor(model, enc, batch_size=4).run(samples[:4], tmp_path / "w", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir() if p.is_file()}
    other = make_peaked_llava(tmp_path / "other", seed=6)  # same architecture and layer count
    other_model, _ = load_model(other)
    for ext in (EntropyExtractor(other_model, PromptEncoder(other), batch_size=4),
                EntropyExtractor(model, enc, batch_size=4, signals=False)):
        with pytest.raises(WorkdirMismatch, match="holds results of another model/settings"):
            ext.run(samples, tmp_path / "w", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir() if p.is_file()} == before
    # the same checkpoint under another path is the same model
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)  # copy2: keeps mtimes
    table, _ = EntropyExtractor(model, PromptEncoder(copy), batch_size=4).run(samples[:4], tmp_path / "w",
                                                                             progress=False)
    assert table.ids == [s.id for s in samples[:4]]


def test_results_without_identity_are_refused(peaked, tmp_path):
    _, samples, model, enc = peaked
    (tmp_path / "entropy.jsonl").write_text(json.dumps({"question_id": samples[0].id, "entropy": {"0": 1.0}}) + "\n")
    with pytest.raises(WorkdirMismatch, match="without a run identity"):
        EntropyExtractor(model, enc, batch_size=4).run(samples, tmp_path, progress=False)


def _extracted_copy(peaked, tmp_path):
    """(data folder, samples, signal table) of a copy of the fixture's dataset, extracted into tmp_path / "w"."""
    _, samples, model, enc = peaked
    data = tmp_path / "data"
    shutil.copytree(samples[0].image_path.parent.parent, data)
    mine, _ = load_dataset(data / "train.json", data / "images")
    EntropyExtractor(model, enc, batch_size=2).run(mine, tmp_path / "w", progress=False)
    return data, mine, load_signals(tmp_path / "w")


def test_changed_image_under_the_same_id_is_recomputed(peaked, tmp_path, monkeypatch):
    ckpt, samples, model, enc = peaked
    data, mine, first = _extracted_copy(peaked, tmp_path)
    # replace one image (same id, same name) with another picture
    victim = mine[5]
    shutil.copyfile(mine[2].image_path, victim.image_path)
    os.utime(victim.image_path, ns=(1, 1))
    ext = EntropyExtractor(model, enc, batch_size=2)
    seen = _calls(ext, monkeypatch)
    ext.run(mine, tmp_path / "w", progress=False)
    assert seen == [2]  # one batch: the changed sample (padded to the batch size) and nothing else
    again = load_signals(tmp_path / "w")
    fresh, _ = EntropyExtractor(model, enc, batch_size=2).run(mine, tmp_path / "fresh", progress=False)
    np.testing.assert_allclose(again.entropy, fresh.matrix, atol=1e-6)
    assert np.abs(again.entropy[5] - first.entropy[5]).max() > 1e-3
    np.testing.assert_array_equal(np.delete(again.entropy, 5, 0), np.delete(first.entropy, 5, 0))


def test_changed_answer_under_the_same_id_is_recomputed(peaked, tmp_path, monkeypatch):
    """The answer is part of a row's inputs (answer_tokens): another answer, same id and image, is re-extracted."""
    ckpt, samples, model, enc = peaked
    data, mine, first = _extracted_copy(peaked, tmp_path)
    records = json.loads((data / "train.json").read_text())
    records[5]["conversations"][1]["value"] = "a different answer"
    (data / "train.json").write_text(json.dumps(records))
    mine, _ = load_dataset(data / "train.json", data / "images")
    ext = EntropyExtractor(model, enc, batch_size=2)
    seen = _calls(ext, monkeypatch)
    ext.run(mine, tmp_path / "w", progress=False)
    assert seen == [2]  # one batch: the changed sample (padded to the batch size) and nothing else
    again = load_signals(tmp_path / "w")
    want = AutoTokenizer.from_pretrained(ckpt)("a different answer", add_special_tokens=False)["input_ids"]
    assert list(again.get("answer_tokens")[5][:len(want)]) == want and again.get("answer_tokens")[5][len(want)] == -1
    others = np.delete(again.get("answer_tokens"), 5, 0)
    np.testing.assert_array_equal(others, np.delete(first.get("answer_tokens"), 5, 0))
    np.testing.assert_allclose(again.entropy, first.entropy, rtol=0, atol=1e-6)  # same prompt, same attention


def test_refusal_reaches_the_user_as_one_line(peaked, tmp_path):
    from bye_jax.configs.llava import get_config
    from bye_jax.runner import UserError, run_extract

    ckpt, samples, model, enc = peaked
    cfg = get_config()
    cfg.model = str(ckpt)
    cfg.data.annotations = str(samples[0].image_path.parent.parent / "train.json")
    cfg.data.image_root = str(samples[0].image_path.parent)
    run_extract(cfg, tmp_path / "w", progress=False)  # through the command's library call: the workdir's files are ours
    cfg.model = str(make_peaked_llava(tmp_path / "other", seed=7))
    with pytest.raises(UserError) as e:
        run_extract(cfg, tmp_path / "w", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg == (f"workdir {tmp_path / 'w'} holds results of another model/settings "
                                       "(checkpoint differs); use another --workdir or delete it")


def test_prompt_segments_and_shares_with_left_and_right_padding():
    from bye_jax.signals_compute import prompt_segments, segment_shares

    img = 9
    ids = np.array([[0, 0, 1, 5, img, img, img, 7, 8, 3, 4],    # left-padded: bos, role, 3 image, question, 2 answer
                    [1, img, img, 7, 7, 7, 3, 0, 0, 0, 0]], np.int32)  # right-padded, 1 answer-prefix token
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
    seg = np.asarray(prompt_segments(ids, mask, img, np.array([2, 1], np.int32)))
    np.testing.assert_array_equal(seg, [[-1, -1, 0, 0, 1, 1, 1, 2, 2, 3, 3], [0, 1, 1, 2, 2, 2, 3, -1, -1, -1, -1]])
    rng = np.random.default_rng(1)
    row = rng.random((2, 3, 11)).astype(np.float32) * mask[:, None, :]
    row /= row.sum(-1, keepdims=True)
    got = np.asarray(segment_shares(row, seg))
    want = np.stack([row[:, :, seg[0] == k].sum(-1)[0] for k in range(4)], -1), \
        np.stack([row[:, :, seg[1] == k].sum(-1)[1] for k in range(4)], -1)
    np.testing.assert_allclose(got, np.stack(want), atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


def test_text_peak_with_padding_ties_and_no_user_text():
    from bye_jax.signals_compute import prompt_segments, text_peak

    img = 9
    ids = np.array([[0, 0, 1, 5, img, 7, 8, 6, 3, 4],     # left-padded; user text 7 8 6, answer 3 4
                    [1, img, 7, 7, 8, 3, 0, 0, 0, 0],     # right-padded; user 7 7 8 (a tie on the two 7s)
                    [1, img, 3, 4, 0, 0, 0, 0, 0, 0]], np.int32)  # no user text
    mask = (np.arange(10)[None, :] >= np.array([[2], [0], [0]])) & (np.arange(10)[None, :] < np.array([[10], [6], [4]]))
    seg = prompt_segments(ids, mask.astype(np.int32), img, np.array([2, 1, 2], np.int32))
    row = np.zeros((3, 2, 10), np.float32)
    row[0, 0, 2:] = [.1, .1, .2, .1, .3, .1, .05, .05]   # positions 5, 6, 7 hold tokens 7, 8, 6
    row[0, 1, 2:] = [.1, .1, .2, .1, .1, .1, .15, .15]   # head mean there: .1, .2, .1
    row[1, 0, :6] = [.2, .2, .1, .1, .3, .1]
    row[1, 1, :6] = [.2, .2, .2, .2, .1, .1]   # head mean on the user text: .15 .15 .2 -> token 8
    row[2, :, :4] = .25
    token, share = (np.asarray(a) for a in text_peak(row, seg, ids))
    # sample 0: head means on the user text (7, 8, 6) = .1, .2, .1 -> token 8 with half of it
    assert token[0] == 8 and abs(share[0] - 0.5) < 1e-6
    assert token[1] == 8 and abs(share[1] - 0.4) < 1e-6
    assert token[2] == -1 and np.isnan(share[2])
    row[1, :, 4] = .15                           # a tie between positions 2 and 4: the first (token 7) wins
    row[1, :, 2] = .15
    row[1, :, 3] = .1
    token, share = (np.asarray(a) for a in text_peak(row, seg, ids))
    assert token[1] == 7 and abs(share[1] - 0.15 / 0.4) < 1e-6


def test_user_tokens_keep_order_padding_and_both_ends_of_a_long_question():
    from bye_jax.signals_compute import prompt_segments, user_tokens

    img = 9
    ids = np.array([[0, 0, 1, img, 11, 12, 13, 3],       # left-padded; user text 11 12 13, answer 3
                    [1, img, 3, 0, 0, 0, 0, 0],           # no user text
                    [1, img, 21, 22, 23, 24, 25, 3]], np.int32)  # 5 user tokens, more than the width 4
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0], [1] * 8], np.int32)
    seg = prompt_segments(ids, mask, img, np.array([1, 1, 1], np.int32))
    got = np.asarray(user_tokens(ids, seg, width=4))
    np.testing.assert_array_equal(got, [[11, 12, 13, -1], [-1] * 4, [21, 22, 24, 25]])  # first 2 and last 2
    assert got.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(user_tokens(ids, seg, width=6))[2], [21, 22, 23, 24, 25, -1])


def test_workdir_of_the_previous_signal_version_is_refused(peaked, tmp_path):
    _, samples, model, enc = peaked
    EntropyExtractor(model, enc, batch_size=4).run(samples[:4], tmp_path, progress=False)
    manifest = json.loads((tmp_path / "extract_manifest.json").read_text())
    manifest["identity"]["signals"] = 1  # written before the share signals
    (tmp_path / "extract_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WorkdirMismatch, match=r"another model/settings \(signals differs\)"):
        EntropyExtractor(model, enc, batch_size=4).run(samples, tmp_path, progress=False)
    # a finished table of that version (no share signals) still loads; detectors read what is there
    table = load_signals(tmp_path)
    old = {k: v for k, v in table.arrays.items() if k not in ("shares", "visual_text_ratio")}
    np.savez_compressed(tmp_path / "old.npz", ids=np.asarray(table.ids), **old)
    from bye_jax.signals import load_npz
    assert not load_npz(tmp_path / "old.npz").has("shares")
