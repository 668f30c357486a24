"""Parity of the Flax Qwen2.5-VL (and Qwen2-VL) port with transformers' PyTorch implementation (eager attention).

Tiny random checkpoints (tokenizer, chat template, Qwen2-VL image processor) are built inside the
tests with save_pretrained. The reference runs one sample at a time without padding, through
transformers' processor logic with ``mm_token_type_ids`` (without them transformers falls back to 1-D
positions); the port runs the samples, whose images have different sizes (so different grids and
image-token counts), as one padded batch.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from family_parity import assert_batch_matches_reference
from flax import nnx
from tiny_checkpoints import make_tiny_image
from tiny_qwen2_5_vl import make_tiny_qwen2_5_vl
from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwen

from bye_jax.entropy import batch_layer_entropies
from bye_jax.models.lora import add_lora
from bye_jax.models.masks import last_token_index
from bye_jax.models.qwen2_5_vl.generate import greedy_generate
from bye_jax.models.qwen2_5_vl.inputs import QwenPromptEncoder
from bye_jax.models.qwen2_5_vl.loader import load_qwen2_5_vl
from bye_jax.models.qwen2_5_vl.model import LORA_TARGET

QUESTIONS = ["what color is the big square", "how many", "is there a cat on the left side of the picture"]
SIZES = [(40, 32), (64, 60), (30, 70)]  # (width, height): grids 8x10, 16x16, 18x8 patches

CONFIGS = {
    "gqa_window2": dict(),
    "tied_mha_window3": dict(tie_word_embeddings=True, kv_heads=4, mrope_section=(4, 2, 2), window_size=24,
                             fullatt_block_indexes=(0,), vision_depth=3, rope_theta=500.0, seed=1),
    "qwen2_vl": dict(qwen2_vl=True, seed=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_qwen2_5_vl(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    ref_class = transformers.Qwen2VLForConditionalGeneration if request.param == "qwen2_vl" else TorchQwen
    ref = ref_class.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model, cfg = load_qwen2_5_vl(path, dtype="float32", attn_impl="xla")
    return path, ref, model, cfg, QwenPromptEncoder(path)


def _images():
    return [make_tiny_image(seed=i, size=s) for i, s in enumerate(SIZES)]


def _reference(ref, enc, image, question):
    one = enc.processor(images=[image], text=[enc.prompt_text(question)], return_tensors="pt")
    assert "mm_token_type_ids" in one
    with torch.no_grad():
        out = ref(**one, output_attentions=True)
    rows = [a[0, :, -1, :].numpy() for a in out.attentions]  # last position, every head
    return out.logits[0].numpy(), rows, one["input_ids"][0].numpy()


def _forward(model, batch, **kw):
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    am = jnp.asarray(batch.attention_mask)
    logits, inter = fwd(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values), am,
                        probe_index=last_token_index(am), **{k: jnp.asarray(v) for k, v in batch.extra.items()}, **kw)
    layers = inter["language_model"]["layers"]
    rows = [np.asarray(layers[i]["self_attn"]["attn_row"][0]) for i in range(len(layers))]
    return np.asarray(logits), rows


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_probe_rows_and_entropies_match_transformers(checkpoint, padding_side):
    _, ref, model, cfg, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS, padding_side=padding_side)
    counts = enc.num_image_tokens(batch)
    assert len(set(counts.tolist())) == len(images), "the images must give different image-token counts"
    logits, rows = _forward(model, batch)
    ours = np.asarray(batch_layer_entropies(rows, jnp.asarray(batch.image_mask)))
    assert_batch_matches_reference(batch, logits, rows, ours, counts, zip(images, QUESTIONS, strict=True),
                                   lambda image, question: _reference(ref, enc, image, question), cfg.image_token_id)


def test_positions_match_get_rope_index(checkpoint):
    _, ref, model, _, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS, padding_side="left")
    ours = np.asarray(model.positions(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                                      jnp.asarray(batch.image_grid_thw)))
    texts = [enc.prompt_text(q) for q in QUESTIONS]
    out = enc.processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    np.testing.assert_array_equal(out["input_ids"].numpy(), batch.input_ids)
    theirs, _ = ref.model.get_rope_index(out["input_ids"], mm_token_type_ids=out["mm_token_type_ids"],
                                         image_grid_thw=out["image_grid_thw"],
                                         attention_mask=out["attention_mask"])
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert not np.array_equal(ours[1], ours[2]), "image tokens must get 2-D (height, width) positions"


def test_padded_batch_equals_one_at_a_time(checkpoint):
    _, _, model, _, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS, pad_to=96, pad_patches_to=300)
    logits, rows = _forward(model, batch, logits="last")
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one_logits, one_rows = _forward(model, enc.encode([image], [question]), logits="last")
        np.testing.assert_allclose(logits[b], one_logits[0], rtol=1e-5, atol=1e-5)
        real = batch.attention_mask[b].astype(bool)
        for layer in range(len(rows)):
            np.testing.assert_allclose(rows[layer][b][:, real], one_rows[layer][0], atol=1e-6)


def test_greedy_generation_matches_transformers(checkpoint):
    _, ref, model, _, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS)
    new = 6
    ours = np.asarray(greedy_generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                      image_grid_thw=batch.image_grid_thw, max_new_tokens=new,
                                      eos_id=enc.eos_token_id, pad_id=enc.pad_token_id))
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one = enc.processor(images=[image], text=[enc.prompt_text(question)], return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**one, max_new_tokens=new, do_sample=False, eos_token_id=enc.eos_token_id,
                               pad_token_id=enc.pad_token_id)
        theirs = out[0, one["input_ids"].shape[1]:].numpy()
        np.testing.assert_array_equal(ours[b, : len(theirs)], theirs, err_msg=f"sample {b}")
        assert np.all(ours[b, len(theirs):] == enc.pad_token_id)


def test_image_token_grid_and_lora_target(checkpoint):
    path, _, _, cfg, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS)
    pixel_values, extra = enc.pixels(images)
    np.testing.assert_array_equal(pixel_values, batch.pixel_values)
    np.testing.assert_array_equal(extra["image_grid_thw"], batch.image_grid_thw)
    for b, image in enumerate(images):
        rows, cols = enc.image_token_grid(image)
        assert rows * cols == int(batch.image_mask[b].sum())
        assert (rows, cols) == tuple(batch.image_grid_thw[b, 1:] // 2)
    model, _ = load_qwen2_5_vl(path, dtype="float32", attn_impl="xla")
    before, _ = _forward(model, batch, logits="last")
    adapted = add_lora(model, rank=2, alpha=4.0, target=LORA_TARGET, rngs=nnx.Rngs(0))
    layers = cfg.text.num_layers
    assert len(adapted) == 7 * layers and all(p.startswith("language_model/layers/") for p in adapted)
    after, _ = _forward(model, batch, logits="last")
    np.testing.assert_array_equal(after, before)  # a fresh adapter (B = 0) changes nothing


def test_bad_checkpoints_are_refused_with_one_line(tmp_path):
    from safetensors.numpy import load_file, save_file

    from bye_jax.models.config import ConfigError
    from bye_jax.models.hf_loader import CheckpointError

    path = make_tiny_qwen2_5_vl(tmp_path / "ckpt", vision_depth=2, fullatt_block_indexes=(1,))
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["visual.merger.mlp.0.bias"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:, :8]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_qwen2_5_vl(path)
    msg = str(e.value)
    assert "\n" not in msg and "visual/merger/fc1/bias" in msg and "model.layers.0.self_attn.q_proj.weight" in msg
    conf = json.loads((path / "config.json").read_text())
    conf["text_config"]["use_sliding_window"] = True
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="use_sliding_window"):
        load_qwen2_5_vl(path)


def _qwen2_5_vl_7b_config():
    """The config of Qwen/Qwen2.5-VL-7B-Instruct (config.json of the hub repository)."""
    import transformers

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3, tokens_per_second=2)
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=False)
    return transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655,
                                         video_token_id=151656, vision_start_token_id=151652,
                                         vision_end_token_id=151653, tie_word_embeddings=False)


def _qwen2_vl_7b_config():
    """The config of Qwen/Qwen2-VL-7B-Instruct (config.json of the hub repository)."""
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu", in_channels=3)
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=False)
    return transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=151655,
                                      video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                                      tie_word_embeddings=False)


def _assert_key_table_covers(model, torch_shapes: dict[str, tuple]):
    """Every transformers parameter maps (keys.py) to one of ours with the transformed shape, and back."""
    from bye_jax.models.qwen2_5_vl import keys

    ours = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    seen = set()
    for name, shape in torch_shapes.items():
        hit = keys.match(keys.normalize_key(name))
        assert hit is not None and hit[3] in ours, name
        assert keys.load_shape(hit[2], shape) == ours[hit[3]], name
        assert keys.module_name(hit[3]) == name
        seen.add(hit[3])
    assert seen == set(ours)


def test_qwen2_vl_7b_config_parameters_match_transformers():
    from bye_jax.models.qwen2_5_vl.config import from_hf_config
    from bye_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    hf = _qwen2_vl_7b_config()
    with torch.device("meta"):
        theirs = {n: tuple(p.shape) for n, p in transformers.Qwen2VLForConditionalGeneration(hf).named_parameters()}
    model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(from_hf_config(hf), dtype=jnp.bfloat16,
                                                                      rngs=nnx.Rngs(0)))
    _assert_key_table_covers(model, theirs)


def test_full_size_7b_config_eval_shape():
    from bye_jax.models.qwen2_5_vl.config import from_hf_config
    from bye_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    hf = _qwen2_5_vl_7b_config()
    with torch.device("meta"):
        theirs = {n: tuple(p.shape) for n, p in TorchQwen(hf).named_parameters()}
    cfg = from_hf_config(hf)
    model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert ours == sum(int(np.prod(s)) for s in theirs.values()) == 8_292_166_656
    _assert_key_table_covers(model, theirs)
    graphdef, state = nnx.split(model)
    grid = jnp.asarray([[1, 36, 52]], jnp.int32)  # a 504 x 728 image: 468 image tokens
    s = 468 + 20

    def run(state, ids, pixels, mask):
        fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
        return fwd(nnx.merge(graphdef, state), ids, pixels, mask, image_grid_thw=grid,
                   probe_index=last_token_index(mask), logits="last")

    out, inter = jax.eval_shape(run, state, jax.ShapeDtypeStruct((1, s), jnp.int32),
                         jax.ShapeDtypeStruct((1, 36 * 52, 3 * 2 * 14 * 14), jnp.float32),
                         jax.ShapeDtypeStruct((1, s), jnp.int32))
    assert out.shape == (1, 152064) and out.dtype == jnp.float32
    rows = inter["language_model"]["layers"]
    assert len(rows) == 28 and rows[27]["self_attn"]["attn_row"][0].shape == (1, 28, s)


def test_registry_loads_it_and_merged_lora_export_loads_in_transformers(checkpoint, tmp_path):
    """Needs the family registry (bye_jax/models/family.py); skipped on a tree without it."""
    family = pytest.importorskip("bye_jax.models.family")
    from safetensors import safe_open

    from bye_jax.models.hf_export import save_hf_checkpoint, save_peft_adapter

    path, _, _, cfg, _ = checkpoint
    fam = family.family_of_checkpoint(path)
    assert fam.name == "qwen2_5_vl" and fam.variable_image_tokens
    enc = family.load_encoder(path)
    assert isinstance(enc, QwenPromptEncoder)
    model, _ = family.load_model(path, dtype="float32", attn_impl="xla")
    assert family.family_of(model) is fam
    adapted = add_lora(model, rank=4, alpha=8.0, target=fam.lora_target, rngs=nnx.Rngs(3))
    assert len(adapted) == 7 * cfg.text.num_layers
    rng = np.random.default_rng(0)
    for _, dense in nnx.iter_modules(model):
        if getattr(dense, "lora_b", None) is not None:
            dense.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, dense.lora_b.shape).astype(np.float32))
    images = _images()
    batch = enc.encode(images, QUESTIONS)
    with_adapters, _ = _forward(model, batch)
    out = save_hf_checkpoint(model, model.cfg, path, tmp_path / "merged")
    with safe_open(str(path / "model.safetensors"), "np") as a, safe_open(str(out / "model.safetensors"), "np") as b:
        assert set(a.keys()) == set(b.keys()), "the export keeps the source checkpoint's tensor names"
    merged_ref = type(checkpoint[1]).from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        ref_logits, _, _ = _reference(merged_ref, enc, image, question)
        got = with_adapters[b][batch.attention_mask[b].astype(bool)]
        rel = np.abs(got - ref_logits).max() / np.abs(ref_logits).max()
        assert rel < 1e-4, f"sample {b}: merged export logits relative error {rel}"
    reloaded, _ = family.load_model(out, dtype="float32", attn_impl="xla")
    again, _ = _forward(reloaded, batch)
    np.testing.assert_allclose(again, with_adapters, rtol=1e-5, atol=1e-5)
    # the same adapters as a PEFT adapter on the unmerged base
    peft = pytest.importorskip("peft")
    adapter = save_peft_adapter(model, tmp_path / "adapter", path, rank=4, alpha=8.0)
    base = type(checkpoint[1]).from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with_peft = peft.PeftModel.from_pretrained(base, adapter).eval()
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        ref_logits, _, _ = _reference(with_peft, enc, image, question)
        got = with_adapters[b][batch.attention_mask[b].astype(bool)]
        rel = np.abs(got - ref_logits).max() / np.abs(ref_logits).max()
        assert rel < 1e-4, f"sample {b}: PEFT adapter logits relative error {rel}"


def test_filter_end_to_end_with_plots_on(tmp_path):
    """The filter command on a Qwen2.5-VL checkpoint (images of several sizes: N varies, so the detector
    reads entropy / ln N) with plots on: the heat-maps, which need a square grid, are skipped in one line,
    the other outputs are written."""
    from test_extract import make_dataset

    from bye_jax.configs.llava import get_config
    from bye_jax.runner import run_filter

    path = make_tiny_qwen2_5_vl(tmp_path / "ckpt")
    ann, images = make_dataset(tmp_path / "data", n=6)
    for i in range(6):
        make_tiny_image(seed=i, size=SIZES[i % len(SIZES)]).save(images / f"{i}.png")
    cfg = get_config()
    cfg.model, cfg.data.annotations, cfg.data.image_root, cfg.batch_size = str(path), str(ann), str(images), 3
    cfg.detect.rule = "official"
    report = run_filter(cfg, tmp_path / "out", progress=False)
    assert report["n_samples"] == 6 and report["entropy"] == "normalised by ln(image tokens)"
    assert not (tmp_path / "out" / "attention_heatmaps.png").exists()
    assert "attention_heatmaps.png" not in report["files"] and "layer_separation.png" in report["files"]
    for name in report["files"]:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
