"""Model limits every consumer honours (issue 14): prompts longer than the model's context are skipped
with a reason at extraction, training and generation, never scored; huge images are shrunk before the
processor resizes them."""

import json
import shutil

import numpy as np
import pytest
from tiny_checkpoints import make_tiny_image

from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.eval.generate import generate_answers
from bye_jax.extract import EntropyExtractor
from bye_jax.models.family import load_model
from bye_jax.models.inputs import PromptEncoder
from bye_jax.train.data import build_examples

CONTEXT = 40
LONG_QUESTION = " ".join(["what color is the big square"] * 8)  # ~50 tokens: over the context
SHORT = ["what is in the picture", "how many", "color"]


@pytest.fixture(scope="module")
def short_context(tmp_path_factory, tiny_llava_dir):
    """The tiny checkpoint with max_position_embeddings = 40, and a dataset with one over-long prompt."""
    root = tmp_path_factory.mktemp("context")
    ckpt = root / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    (ckpt / "config.json").write_text(json.dumps(config))
    records = []
    for i, q in enumerate([*SHORT[:2], LONG_QUESTION, SHORT[2]]):
        make_tiny_image(i, (30 + i, 28)).save(root / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "red " * (40 if i == 3 else 1)}]})
    (root / "data.json").write_text(json.dumps(records))
    samples, skipped = load_dataset(root / "data.json")
    assert not skipped
    model, _ = load_model(ckpt)
    return ckpt, model, PromptEncoder(ckpt), samples


def _row_length(enc, sample) -> int:
    """The oracle: the prompt's length as the processor itself encodes it (image expanded)."""
    return int(enc.encode([load_image(sample.image_path)], [sample.question]).attention_mask.sum())


def test_prompt_length_is_the_encoded_length(short_context):
    ckpt, _, enc, samples = short_context
    assert enc.context_length == CONTEXT  # from config.json's text_config
    for s in samples:
        assert enc.prompt_length(s.question) == _row_length(enc, s), s.id
    long_len = _row_length(enc, samples[2])
    assert long_len > CONTEXT
    assert enc.context_reason(samples[2].question) == (
        f"prompt of {long_len} tokens exceeds the model's context of {CONTEXT}")
    assert [enc.context_reason(s.question) for s in samples if s.id != "s2"] == [None] * 3


def test_extraction_skips_prompts_over_the_context(short_context, tmp_path):
    _, model, enc, samples = short_context
    table, skipped = EntropyExtractor(model, enc, batch_size=2).run(samples, tmp_path, progress=False)
    assert table.ids == ["s0", "s1", "s3"]
    assert np.isfinite(table.matrix).all()
    assert [(s.id, s.reason) for s in skipped] == [
        ("s2", f"prompt of {_row_length(enc, samples[2])} tokens exceeds the model's context of {CONTEXT}")]
    written = [json.loads(line)["question_id"] for line in (tmp_path / "entropy.jsonl").read_text().splitlines()]
    assert written == ["s0", "s1", "s3"]


def test_generation_skips_prompts_over_the_context(short_context):
    _, model, enc, samples = short_context
    skipped = []
    answers = generate_answers(model, enc, samples, batch_size=2, max_new_tokens=2, progress=False, skipped=skipped)
    assert list(answers) == ["s0", "s1", "s3"]
    assert [s.id for s in skipped] == ["s2"] and "exceeds the model's context of 40" in skipped[0].reason


def test_training_skips_prompts_over_the_context_and_truncates_to_it(short_context):
    _, _, enc, samples = short_context
    examples, skipped = build_examples(samples, enc)
    assert [e.sample.id for e in examples] == ["s0", "s1", "s3"]
    assert [s.id for s in skipped] == ["s2"] and "exceeds the model's context of 40" in skipped[0].reason
    s3 = examples[2]  # prompt fits, the 40-word answer does not: cut at the context
    assert enc.prompt_length(samples[3].question) < CONTEXT
    assert s3.length == CONTEXT
    assert all(e.length <= CONTEXT for e in examples)
    examples, _ = build_examples(samples, enc, max_length=20)  # a smaller max_length still wins
    assert max(e.length for e in examples) <= 20


def test_image_side_and_reduction_are_the_processors(short_context, tmp_path):
    _, _, enc, _ = short_context
    assert enc.image_side == 28  # CLIPImageProcessor(size={"shortest_edge": 28}) of the tiny checkpoint
    side = 4200
    arr = np.zeros((side, side, 3), np.uint8)
    arr[: side // 2] = 255
    from PIL import Image

    Image.fromarray(arr).save(tmp_path / "big.png")
    reduced = load_image(tmp_path / "big.png", reduce_to=enc.image_side)
    assert reduced.size == (side // 50, side // 50)  # 4200 // (3 * 28) = 50
    full = enc.processor.image_processor(images=[load_image(tmp_path / "big.png")], return_tensors="np")
    small = enc.processor.image_processor(images=[reduced], return_tensors="np")
    assert np.abs(np.asarray(full["pixel_values"]) - np.asarray(small["pixel_values"])).max() < 0.05


# ------------------------------------------------------------------ every command reads through the same checks


def _hostile_dataset(root):
    from PIL import Image

    (root / "img").mkdir(parents=True)
    make_tiny_image(1, (30, 28)).save(root / "img" / "ok.png")
    Image.new("RGB", (650, 2)).save(root / "img" / "wide.png")
    conv = lambda q, a="red": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [
        {"id": "ok", "image": "img/ok.png", "conversations": conv("<image>\nwhat")},
        {"id": "long", "image": "img/" + "x" * 300 + ".png", "conversations": conv("<image>\nwhat")},
        {"id": "q", "image": "img/ok.png", "conversations": conv("<image>\nwhat \ud800")},
        {"id": "a", "image": "img/ok.png", "conversations": conv("<image>\nwhat", "red \udfff")},
        {"id": "wide", "image": "img/wide.png", "conversations": conv("<image>\nwhat")},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def test_filter_extract_train_and_eval_sections_skip_the_same_records(tmp_path):
    from bye_jax.configs import eval as eval_config
    from bye_jax.configs import llava as llava_config
    from bye_jax.configs import train as train_config
    from bye_jax.runner import UserError, load_section

    ann = _hostile_dataset(tmp_path)
    sections = [llava_config.get_config().data, train_config.get_config().data, eval_config.get_config().test]
    for section in sections:
        section.annotations = str(ann)
        inputs = load_section(section, max_image_pixels=10**6)
        assert [s.id for s in inputs.samples] == ["ok"]
        reasons = {s.id: s.reason for s in inputs.skipped}
        assert sorted(reasons) == ["a", "long", "q", "wide"]
        assert reasons["wide"] == "extreme aspect ratio: 650x2 = 325:1 > limit 64:1"
        assert "File name too long" in reasons["long"] and "lone surrogate U+DFFF" in reasons["a"]
        section.max_aspect_ratio = 0  # no limit
        assert "wide" in [s.id for s in load_section(section, max_image_pixels=10**6).samples]
        section.max_aspect_ratio = 0.5
        with pytest.raises(UserError, match=r"max_aspect_ratio must be a number >= 1 \(0: no limit\), got 0.5"):
            load_section(section, max_image_pixels=10**6)


def test_extract_refuses_a_checkpoint_with_nan_weights_in_one_line(tmp_path, tiny_llava_dir):
    from safetensors.numpy import load_file, save_file

    from bye_jax.configs.llava import get_config
    from bye_jax.runner import UserError, run_extract

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    config = get_config()
    config.model = str(ckpt)
    config.data.annotations = str(_hostile_dataset(tmp_path / "data"))
    with pytest.raises(UserError) as e:
        run_extract(config, tmp_path / "out", progress=False)
    assert str(e.value) == (f"checkpoint {ckpt} does not load: non-finite weights: tensor {key} in model.safetensors "
                            "has 1 NaN and 0 infinite values (as float32; first at index (0, 0)); refusing to load it")
    assert not (tmp_path / "out" / "entropy.jsonl").exists()
