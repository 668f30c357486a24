"""Synthetic benchmark and from-scratch checkpoints (the demo's building blocks)."""

import json

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from PIL import Image
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.data.llava_json import load_dataset
from bye_jax.data.synthetic import COLORS, vocabulary_corpus, write_benchmark
from bye_jax.models.family import load_config, load_model
from bye_jax.models.hf_export import save_hf_checkpoint
from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.llava import LlavaForConditionalGeneration
from bye_jax.models.llava.build import build_tokenizer, write_llava_checkpoint_files


def test_benchmark_is_deterministic_valid_and_answers_come_from_the_picture(tmp_path):
    a = write_benchmark(tmp_path / "a", 60, seed=5)
    b = write_benchmark(tmp_path / "b", 60, seed=5)
    assert a.read_text() == b.read_text()
    for name in ("q00000.png", "q00059.png"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
    samples, skipped = load_dataset(a)
    assert len(samples) == 60 and not skipped
    n_color = 0
    for s in samples:
        pixels = np.asarray(Image.open(s.image_path).convert("RGB")).reshape(-1, 3)
        assert pixels.sum(axis=1).min() > 60, "no black (the trigger's colour) in clean pictures"
        if "color" in s.question:
            n_color += 1
            assert (pixels == np.array(COLORS[s.answer])).all(axis=1).sum() > 50
    assert n_color > 0
    assert len({s.question for s in samples}) == 5


def test_tokenizer_keeps_each_answer_one_token():
    tok = build_tokenizer(vocabulary_corpus(("Backdoor Attack!",)))
    for word in list(COLORS) + ["circle", "three", "left", "bottom"]:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tok("USER: hi", add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(tok(" Backdoor Attack!", add_special_tokens=False)["input_ids"]) == " Backdoor Attack!"


def test_new_checkpoint_loads_in_transformers_and_bye_jax_with_equal_logits(tmp_path):
    ckpt = write_llava_checkpoint_files(
        tmp_path / "ck", corpus=vocabulary_corpus(), image_size=24, patch_size=8, vision_hidden=16,
        vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=4, kv_heads=2, intermediate=48)
    cfg = load_config(ckpt)
    assert cfg.image_seq_length == 9 and cfg.feature_layer_index == 0  # -2 of a 1-layer tower: embeddings
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(3))
    save_hf_checkpoint(model, cfg, ckpt, ckpt)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "llava"
    enc = PromptEncoder(ckpt)
    batch = enc.encode([Image.new("RGB", (50, 40), (200, 30, 30))], ["What color is the shape?"])
    ours = np.asarray(load_model(ckpt)[0](jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values),
                                          jnp.asarray(batch.attention_mask)))
    ref = TorchLlava.from_pretrained(ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                     attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
                     pixel_values=torch.tensor(batch.pixel_values)).logits.numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
