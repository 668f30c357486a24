"""Tests for bye_jax.models.inputs and the tiny checkpoints built in tiny_checkpoints.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_checkpoints import make_real_llava15_7b_config, make_tiny_image, make_tiny_llava

from bye_jax.models.inputs import DEFAULT_TEMPLATE, PromptBatch, PromptEncoder, clean_question

QUESTIONS = ["What is in the picture?", "<image>\n  How many dogs are there?  ", "Describe it."]


@pytest.fixture(scope="module")
def encoder(tiny_llava_dir):
    return PromptEncoder(tiny_llava_dir)


@pytest.fixture(scope="module")
def images():
    return [make_tiny_image(i) for i in range(len(QUESTIONS))]


def _config(ckpt_dir) -> dict:
    return json.loads((ckpt_dir / "config.json").read_text())


def _safetensors_keys(ckpt_dir) -> list[str]:
    with safe_open(str(ckpt_dir / "model.safetensors"), "np") as f:
        return sorted(f.keys())


def _hf_logits(ckpt_dir, batch: PromptBatch) -> np.ndarray:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(batch.input_ids).long(),
            attention_mask=torch.from_numpy(batch.attention_mask).long(),
            pixel_values=torch.from_numpy(batch.pixel_values),
        )
    return out.logits.numpy()


def test_clean_question():
    assert clean_question("<image>\n What is it? ") == "What is it?"
    assert clean_question("What <image> is it?") == "What  is it?"
    assert clean_question("  plain ") == "plain"


def test_template_renders_llava15_prompt(encoder):
    assert encoder.chat_template
    assert encoder.prompt_text("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    # the question is cleaned before it goes into the prompt
    assert encoder.prompt_text("<image>\nWhat is this?  ") == "USER: <image>\nWhat is this? ASSISTANT:"


def test_no_template_falls_back_to_default(tmp_path):
    ckpt = make_tiny_llava(tmp_path / "no_template", chat_template=False)
    enc = PromptEncoder(ckpt)
    assert not enc.chat_template
    assert enc.prompt_text(" <image> What is this? ") == DEFAULT_TEMPLATE.format(question="What is this?")
    assert enc.prompt_text("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"


def test_special_ids(encoder, tiny_llava_dir):
    cfg = _config(tiny_llava_dir)
    tok = encoder.tokenizer
    assert encoder.image_token_id == cfg["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    assert encoder.pad_token_id == tok.convert_tokens_to_ids("<pad>")
    assert encoder.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert cfg["text_config"]["vocab_size"] == len(tok)
    assert max(tok.get_vocab().values()) < cfg["text_config"]["vocab_size"]
    # bos is added automatically, like Llama tokenizers; unknown text does not crash
    ids = tok("Qu'est-ce que c'est? ünïcode 42")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) > 3


def test_image_token_count(encoder, images, tiny_llava_dir):
    cfg = _config(tiny_llava_dir)
    assert cfg["image_seq_length"] == (28 // 14) ** 2
    batch = encoder.encode(images, QUESTIONS)
    np.testing.assert_array_equal(encoder.num_image_tokens(batch), cfg["image_seq_length"])
    assert batch.input_ids.dtype == np.int32 and batch.attention_mask.dtype == np.int32
    assert batch.pixel_values.dtype == np.float32
    assert batch.pixel_values.shape == (len(QUESTIONS), 3, 28, 28)


def test_image_token_count_full_strategy(tmp_path):
    ckpt = make_tiny_llava(tmp_path / "full", select_strategy="full")
    enc = PromptEncoder(ckpt)
    batch = enc.encode([make_tiny_image(0)], ["What?"])
    assert _config(ckpt)["image_seq_length"] == 5
    np.testing.assert_array_equal(enc.num_image_tokens(batch), 5)


def test_left_padding_matches_single_and_transformers(encoder, images):
    batch = encoder.encode(images, QUESTIONS)
    lengths = batch.attention_mask.sum(axis=1)
    assert lengths.min() < lengths.max()  # the questions differ in length
    for i, (img, q) in enumerate(zip(images, QUESTIONS, strict=True)):
        single = encoder.encode([img], [q])
        assert single.attention_mask.all()
        n = single.seq_len
        assert lengths[i] == n
        pad = batch.seq_len - n
        np.testing.assert_array_equal(batch.attention_mask[i, :pad], 0)
        np.testing.assert_array_equal(batch.input_ids[i, :pad], encoder.pad_token_id)
        np.testing.assert_array_equal(batch.attention_mask[i, pad:], 1)
        np.testing.assert_array_equal(batch.input_ids[i, pad:], single.input_ids[0])
        np.testing.assert_array_equal(batch.pixel_values[i], single.pixel_values[0])
    # same as transformers' own processor with left padding
    texts = [encoder.prompt_text(q) for q in QUESTIONS]
    ref = encoder.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="np")
    np.testing.assert_array_equal(batch.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, ref["attention_mask"])
    np.testing.assert_allclose(batch.pixel_values, ref["pixel_values"], rtol=0, atol=0)
    # first real token is bos; the prompt decodes back to the question
    for i in range(len(QUESTIONS)):
        first = int(np.argmax(batch.attention_mask[i]))
        assert batch.input_ids[i, first] == encoder.tokenizer.bos_token_id
    assert "dogs" in encoder.decode(batch.input_ids[1])


def test_right_padding(encoder, images):
    batch = encoder.encode(images, QUESTIONS, padding_side="right")
    left = encoder.encode(images, QUESTIONS)
    for i in range(len(QUESTIONS)):
        n = int(batch.attention_mask[i].sum())
        np.testing.assert_array_equal(batch.attention_mask[i, :n], 1)
        np.testing.assert_array_equal(batch.attention_mask[i, n:], 0)
        np.testing.assert_array_equal(batch.input_ids[i, :n], left.input_ids[i, left.seq_len - n :])
    with pytest.raises(ValueError):
        encoder.encode(images, QUESTIONS, padding_side="middle")


def test_pad_to(encoder, images):
    natural = encoder.encode(images, QUESTIONS)
    padded = encoder.encode(images, QUESTIONS, pad_to=natural.seq_len + 7)
    assert padded.input_ids.shape == (len(QUESTIONS), natural.seq_len + 7)
    np.testing.assert_array_equal(padded.input_ids[:, 7:], natural.input_ids)
    np.testing.assert_array_equal(padded.attention_mask[:, :7], 0)
    np.testing.assert_array_equal(padded.input_ids[:, :7], encoder.pad_token_id)
    exact = encoder.encode(images, QUESTIONS, pad_to=natural.seq_len)
    np.testing.assert_array_equal(exact.input_ids, natural.input_ids)
    with pytest.raises(ValueError, match="pad_to"):
        encoder.encode(images, QUESTIONS, pad_to=natural.seq_len - 1)


def test_bad_batches(encoder, images):
    with pytest.raises(ValueError):
        encoder.encode(images[:2], QUESTIONS)
    with pytest.raises(ValueError):
        encoder.encode([], [])


def test_non_rgb_images(encoder):
    gray = make_tiny_image(3).convert("L")
    rgba = make_tiny_image(4).convert("RGBA")
    batch = encoder.encode([gray, rgba], ["What?", "What?"])
    ref = encoder.encode([gray.convert("RGB"), rgba.convert("RGB")], ["What?", "What?"])
    np.testing.assert_array_equal(batch.pixel_values, ref.pixel_values)
    assert batch.pixel_values.shape[1] == 3


def test_missing_pad_token_falls_back_to_eos(tiny_llava_dir, tmp_path, images):
    ckpt = tmp_path / "no_pad"
    shutil.copytree(tiny_llava_dir, ckpt)
    tok_cfg_path = ckpt / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.pop("pad_token", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg))
    enc = PromptEncoder(ckpt)
    assert enc.tokenizer.pad_token_id is None
    assert enc.pad_token_id == enc.eos_token_id
    batch = enc.encode(images, QUESTIONS)
    first = batch.attention_mask.argmax(axis=1)
    assert (first > 0).any()
    assert (batch.input_ids[batch.attention_mask == 0] == enc.eos_token_id).all()


def test_decode(encoder):
    ids = encoder.tokenizer("what is the color")["input_ids"]
    assert encoder.decode(ids) == "what is the color"
    assert encoder.decode(np.asarray(ids, dtype=np.int32)) == "what is the color"


def test_tiny_checkpoint_parameters_are_randomised(tiny_llava_dir):
    with safe_open(str(tiny_llava_dir / "model.safetensors"), "np") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith("norm.weight") or "layer_norm" in key or "layrnorm" in key or "layernorm" in key:
                assert not np.allclose(t, 1.0) and not np.allclose(t, 0.0), key
            if key.endswith("bias"):
                assert not np.allclose(t, 0.0), key
            assert np.isfinite(t).all() and t.std() > 0, key


def test_tiny_checkpoint_runs_in_transformers(tiny_llava_dir, encoder, images):
    processor = transformers.AutoProcessor.from_pretrained(tiny_llava_dir)
    assert isinstance(processor, transformers.LlavaProcessor)
    texts = [encoder.prompt_text(q) for q in QUESTIONS]
    inputs = processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    assert model.config.image_token_id == encoder.image_token_id
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    assert logits[:, -1].std() > 0.1  # non-trivial outputs
    # our batch is what transformers feeds its own model
    batch = encoder.encode(images, QUESTIONS)
    np.testing.assert_array_equal(batch.input_ids, inputs["input_ids"].numpy())
    np.testing.assert_allclose(_hf_logits(tiny_llava_dir, batch), logits.numpy(), rtol=1e-6, atol=1e-6)


def test_saved_key_names(tiny_llava_dir):
    """transformers 5 writes the legacy prefixes itself (but vision_tower.X, not vision_model)."""
    keys = _safetensors_keys(tiny_llava_dir)
    assert "language_model.lm_head.weight" in keys
    assert "language_model.model.embed_tokens.weight" in keys
    assert "vision_tower.post_layernorm.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys


@pytest.mark.parametrize("layout", ["hub", "modern"])
def test_key_layouts_load_with_identical_logits(tiny_llava_dir, tmp_path, encoder, images, layout):
    if layout == "hub":
        ckpt = make_tiny_llava(tmp_path / layout, legacy_keys=True)
        prefixes = {
            "language_model.model.",
            "language_model.lm_head.",
            "vision_tower.vision_model.",
            "multi_modal_projector.",
        }
    else:
        ckpt = make_tiny_llava(tmp_path / layout, key_layout="modern")
        prefixes = {
            "model.language_model.",
            "lm_head.",
            "model.vision_tower.",
            "model.multi_modal_projector.",
        }
    keys = _safetensors_keys(ckpt)
    assert {p for p in prefixes if any(k.startswith(p) for k in keys)} == prefixes
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    assert keys != _safetensors_keys(tiny_llava_dir)
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = encoder.encode(images, QUESTIONS)
    np.testing.assert_array_equal(_hf_logits(ckpt, batch), _hf_logits(tiny_llava_dir, batch))


def test_variants_load(tmp_path):
    ckpt = make_tiny_llava(
        tmp_path / "variant",
        tie_word_embeddings=True,
        attention_bias=True,
        head_dim=8,
        rope_theta=500.0,
        vision_feature_layer=-1,
        seed=3,
    )
    cfg = _config(ckpt)
    assert cfg["text_config"]["head_dim"] == 8 and cfg["text_config"]["attention_bias"] is True
    assert not any("lm_head" in k for k in _safetensors_keys(ckpt))
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    enc = PromptEncoder(ckpt)
    batch = enc.encode([make_tiny_image(0)], ["What?"])
    assert np.isfinite(_hf_logits(ckpt, batch)).all()


def test_real_llava15_7b_param_count():
    config = make_real_llava15_7b_config()
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    assert config.image_token_index == 32000 and config.image_seq_length == 576
    assert config.text_config.vocab_size == 32064
    assert config.vision_config.hidden_act == "quick_gelu"
