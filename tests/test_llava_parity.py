"""Parity of the Flax LLaVA port with transformers' PyTorch implementation (eager attention).

Tiny random checkpoints (with tokenizer, processor and chat template) are built inside the tests
with save_pretrained; the reference runs one sample at a time without padding, the port runs the
samples as a padded batch.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_checkpoints import make_tiny_image, make_tiny_llava
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.models.family import load_model
from bye_jax.models.generate import greedy_generate
from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.llava import last_token_index

QUESTIONS = ["what color is the big square", "how many", "is there a cat on the left side of the picture"]

CONFIGS = {
    "gqa_layer-2": dict(kv_heads=2, vision_feature_layer=-2),
    "mha_layer-1_full_tied_odd": dict(image_size=30, patch_size=6, vision_hidden=24, vision_heads=3,
                                      text_hidden=40, text_heads=5, kv_heads=5, intermediate=72,
                                      vision_feature_layer=-1, select_strategy="full",
                                      tie_word_embeddings=True, rope_theta=500.0, seed=1),
    "legacy_bias_gqa4": dict(text_heads=8, kv_heads=2, head_dim=12, attention_bias=True,
                             vision_layers=3, vision_feature_layer=1, legacy_keys=True, seed=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_llava(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    ref = TorchLlava.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model, cfg = load_model(path, dtype="float32", attn_impl="xla")
    return path, ref, model, cfg, PromptEncoder(path)


def _images(n):
    return [make_tiny_image(seed=i, size=(40 + 7 * i, 32 + 3 * i)) for i in range(n)]


def _reference(ref, enc, image, question):
    one = enc.encode([image], [question])
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(one.input_ids, dtype=torch.long),
                  attention_mask=torch.tensor(one.attention_mask, dtype=torch.long),
                  pixel_values=torch.tensor(one.pixel_values), output_attentions=True)
    rows = [a[0, :, -1, :].numpy() for a in out.attentions]  # last position, every head
    return out.logits[0].numpy(), rows


def _capture_forward(model, batch, **kw):
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    am = jnp.asarray(batch.attention_mask)
    logits, inter = fwd(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values), am,
                        probe_index=last_token_index(am), **kw)
    layers = inter["language_model"]["layers"]
    rows = [np.asarray(layers[i]["self_attn"]["attn_row"][0]) for i in range(len(layers))]
    return np.asarray(logits), rows


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_and_attention_rows_match_transformers(checkpoint, padding_side):
    _, ref, model, _, enc = checkpoint
    images = _images(len(QUESTIONS))
    batch = enc.encode(images, QUESTIONS, padding_side=padding_side)
    logits, rows = _capture_forward(model, batch)
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        ref_logits, ref_rows = _reference(ref, enc, image, question)
        real = batch.attention_mask[b].astype(bool)
        got = logits[b][real]
        assert got.shape == ref_logits.shape
        rel = np.abs(got - ref_logits).max() / np.abs(ref_logits).max()
        assert rel < 1e-4, f"sample {b}: logits relative error {rel}"
        for layer, ref_row in enumerate(ref_rows):
            row = rows[layer][b][:, real]
            np.testing.assert_allclose(row, ref_row, atol=1e-5, err_msg=f"sample {b} layer {layer}")
            assert np.all(rows[layer][b][:, ~real] == 0), "padding keys must get zero attention"


def test_padded_batch_equals_one_at_a_time(checkpoint):
    _, _, model, _, enc = checkpoint
    images = _images(len(QUESTIONS))
    batch = enc.encode(images, QUESTIONS, pad_to=64)
    logits, rows = _capture_forward(model, batch, logits="last")
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one_logits, one_rows = _capture_forward(model, enc.encode([image], [question]), logits="last")
        np.testing.assert_allclose(logits[b], one_logits[0], rtol=1e-5, atol=1e-5)
        real = batch.attention_mask[b].astype(bool)
        for layer in range(len(rows)):
            np.testing.assert_allclose(rows[layer][b][:, real], one_rows[layer][0], atol=1e-6)


def test_greedy_generation_matches_transformers(checkpoint):
    _, ref, model, _, enc = checkpoint
    images = _images(len(QUESTIONS))
    batch = enc.encode(images, QUESTIONS)
    new = 6
    ours = np.asarray(greedy_generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                      max_new_tokens=new, eos_id=enc.eos_token_id, pad_id=enc.pad_token_id))
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one = enc.encode([image], [question])
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor(one.input_ids, dtype=torch.long),
                               attention_mask=torch.tensor(one.attention_mask, dtype=torch.long),
                               pixel_values=torch.tensor(one.pixel_values), max_new_tokens=new,
                               do_sample=False, eos_token_id=enc.eos_token_id, pad_token_id=enc.pad_token_id)
        theirs = out[0, one.input_ids.shape[1]:].numpy()
        np.testing.assert_array_equal(ours[b, : len(theirs)], theirs, err_msg=f"sample {b}")
        assert np.all(ours[b, len(theirs):] == enc.pad_token_id)


def test_greedy_generation_stops_at_eos_like_transformers(checkpoint):
    _, ref, model, _, enc = checkpoint
    images = _images(2)
    questions = QUESTIONS[:2]
    batch = enc.encode(images, questions)
    free = np.asarray(greedy_generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                      max_new_tokens=6, eos_id=-1, pad_id=enc.pad_token_id))
    eos = int(free[0, 2])  # pretend the 3rd token sample 0 emits is EOS
    ours = np.asarray(greedy_generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                      max_new_tokens=6, eos_id=eos, pad_id=enc.pad_token_id))
    for b in range(2):
        one = enc.encode([images[b]], [questions[b]])
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor(one.input_ids, dtype=torch.long),
                               attention_mask=torch.tensor(one.attention_mask, dtype=torch.long),
                               pixel_values=torch.tensor(one.pixel_values), max_new_tokens=6,
                               do_sample=False, eos_token_id=eos, pad_token_id=enc.pad_token_id)
        theirs = out[0, one.input_ids.shape[1]:].numpy()
        np.testing.assert_array_equal(ours[b, : len(theirs)], theirs)
        assert np.all(ours[b, len(theirs):] == enc.pad_token_id)
    first_eos = list(ours[0]).index(eos)
    assert first_eos <= 2 and np.all(ours[0, first_eos + 1:] == enc.pad_token_id)
