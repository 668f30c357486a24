"""Parity of the Flax InternVL port (the -hf format) with transformers' PyTorch implementation (eager attention).

Tiny random checkpoints (tokenizer with InternVL's image tokens, chat template, GotOcr2 image processor) are
built inside the tests with save_pretrained. The reference runs one sample at a time without padding through
the same (image-only) InternVLProcessor; the port runs the samples, whose images have different sizes and
aspect ratios (with tiles: different tile counts, so different image-token counts), as one padded batch.
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
from tiny_internvl import make_tiny_internvl
from transformers import InternVLForConditionalGeneration as TorchInternVL

from bye_jax.entropy import batch_layer_entropies
from bye_jax.models import family
from bye_jax.models.config import ConfigError
from bye_jax.models.internvl.inputs import InternVLPromptEncoder
from bye_jax.models.lora import add_lora
from bye_jax.models.masks import last_token_index

QUESTIONS = ["what color is the big square", "how many", "is there a cat on the left side of the picture"]
SIZES = [(40, 32), (64, 60), (30, 70)]  # (width, height): with tiles 1, 4 + thumbnail, 2 + thumbnail views

CONFIGS = {
    # Qwen2 decoder, LayerNorm tower with q/k/v biases, processor tiles (N varies), untied lm_head
    "qwen2_tiles": dict(build=dict(), crop_to_patches=None),
    # Llama decoder, RMSNorm tower with qk-norm and the final LayerNorm, tied embeddings, one view
    "llama_rms_one_view": dict(build=dict(text_model="llama", norm_type="rms_norm", use_qk_norm=True,
                                          attention_bias=False, use_mean_pooling=False, tie_word_embeddings=True,
                                          kv_heads=4, rope_theta=500.0, projector_hidden_act="gelu_pytorch_tanh",
                                          seed=1), crop_to_patches=False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    conf = CONFIGS[request.param]
    path = make_tiny_internvl(tmp_path_factory.mktemp(request.param), **conf["build"])
    ref = TorchInternVL.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model, cfg = family.load_model(path, dtype="float32", attn_impl="xla")
    return path, ref, model, cfg, InternVLPromptEncoder(path, crop_to_patches=conf["crop_to_patches"])


def _images():
    return [make_tiny_image(seed=i, size=s) for i, s in enumerate(SIZES)]


def _reference(ref, enc, image, question):
    one = enc.processor(images=[image], text=[enc.prompt_text(question)], return_tensors="pt")
    with torch.no_grad():
        out = ref(**one, output_attentions=True)
    assert len(out.attentions) == ref.config.text_config.num_hidden_layers
    rows = [a[0, :, -1, :].numpy() for a in out.attentions]  # last position, every head
    return out.logits[0].numpy(), rows, one["input_ids"][0].numpy()


@jax.jit(static_argnums=(0, 5))
def _probe(graphdef, state, input_ids, pixel_values, attention_mask, logits):
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    return fwd(nnx.merge(graphdef, state), input_ids, pixel_values, attention_mask,
               probe_index=last_token_index(attention_mask), logits=logits)


def _forward(model, batch, logits="all"):
    """(logits, per-layer probe rows [B, heads, S]) of one batch, jitted (eager dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    out, inter = _probe(graphdef, state, jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values),
                        jnp.asarray(batch.attention_mask), logits)
    layers = inter["language_model"]["layers"]
    rows = [np.asarray(layers[i]["self_attn"]["attn_row"][0]) for i in range(len(layers))]
    return np.asarray(out), rows


def test_logits_probe_rows_and_entropies_match_transformers(checkpoint):
    _, ref, model, cfg, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS, padding_side="left")
    counts = enc.num_image_tokens(batch)
    if enc.image_kwargs.get("crop_to_patches", True):
        assert len(set(counts.tolist())) == len(images), "the tiled images must give different image-token counts"
    else:
        assert counts.tolist() == [cfg.image_seq_length] * len(images)
    assert [enc.image_token_count(im) for im in images] == counts.tolist()
    logits, rows = _forward(model, batch)
    ours = np.asarray(batch_layer_entropies(rows, jnp.asarray(batch.image_mask)))
    assert_batch_matches_reference(batch, logits, rows, ours, counts, zip(images, QUESTIONS, strict=True),
                                   lambda image, question: _reference(ref, enc, image, question), cfg.image_token_id)


@pytest.mark.parametrize("checkpoint", ["qwen2_tiles"], indirect=True)
def test_padded_batch_equals_one_at_a_time(checkpoint):
    _, _, model, _, enc = checkpoint
    images = _images()
    longest = enc.encode(images, QUESTIONS).seq_len
    batch = enc.encode(images, QUESTIONS, pad_to=longest + 7, padding_side="right")
    logits, rows = _forward(model, batch, logits="last")
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one = enc.encode([image], [question], pad_to=longest)  # left padding; one shape per tile count
        assert one.pixel_values.shape[1] <= batch.pixel_values.shape[1]
        one_logits, one_rows = _forward(model, one, logits="last")
        np.testing.assert_allclose(logits[b], one_logits[0], rtol=1e-5, atol=1e-5)
        real, one_real = batch.attention_mask[b].astype(bool), one.attention_mask[0].astype(bool)
        for layer in range(len(rows)):
            np.testing.assert_allclose(rows[layer][b][:, real], one_rows[layer][0][:, one_real], atol=1e-6)


def test_greedy_generation_matches_transformers(checkpoint):
    _, ref, model, _, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS)
    new = 6
    fam = family.family_of(model)
    ours = np.asarray(fam.greedy_generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                          max_new_tokens=new, eos_id=enc.eos_token_id, pad_id=enc.pad_token_id,
                                          **batch.extra))
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one = enc.processor(images=[image], text=[enc.prompt_text(question)], return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**one, max_new_tokens=new, do_sample=False, eos_token_id=enc.eos_token_id,
                               pad_token_id=enc.pad_token_id)
        theirs = out[0, one["input_ids"].shape[1]:].numpy()
        np.testing.assert_array_equal(ours[b, : len(theirs)], theirs, err_msg=f"sample {b}")
        assert np.all(ours[b, len(theirs):] == enc.pad_token_id)


@pytest.mark.parametrize("checkpoint", ["qwen2_tiles"], indirect=True)
def test_registry_loads_it_and_merged_lora_export_loads_in_transformers(checkpoint, tmp_path):
    from safetensors import safe_open

    from bye_jax.models.hf_export import save_hf_checkpoint, save_peft_adapter

    path, ref, model, cfg, enc = checkpoint
    fam = family.family_of_checkpoint(path)
    assert fam.name == "internvl" and fam.variable_image_tokens and family.family_of(model) is fam
    assert isinstance(family.load_encoder(path), InternVLPromptEncoder)
    model, _ = family.load_model(path, dtype="float32", attn_impl="xla")  # a fresh copy to adapt
    adapted = add_lora(model, rank=4, alpha=8.0, target=fam.lora_target, rngs=nnx.Rngs(3))
    assert len(adapted) == 7 * cfg.text.num_layers and all(p.startswith("language_model/layers/") for p in adapted)
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
    merged_ref = TorchInternVL.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    peft = pytest.importorskip("peft")
    adapter = save_peft_adapter(model, tmp_path / "adapter", path, rank=4, alpha=8.0)
    with_peft = peft.PeftModel.from_pretrained(
        TorchInternVL.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval(), adapter).eval()
    for name, reference in (("merged export", merged_ref), ("PEFT adapter", with_peft)):
        for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
            ref_logits, _, _ = _reference(reference, enc, image, question)
            got = with_adapters[b][batch.attention_mask[b].astype(bool)]
            rel = np.abs(got - ref_logits).max() / np.abs(ref_logits).max()
            assert rel < 1e-4, f"sample {b}: {name} logits relative error {rel}"
    reloaded, _ = family.load_model(out, dtype="float32", attn_impl="xla")
    again, _ = _forward(reloaded, batch)
    np.testing.assert_allclose(again, with_adapters, rtol=1e-5, atol=1e-5)


def _internvl3_8b_config():
    """An InternVL3-8B-hf-like config: InternViT-300M-448px tower, Qwen2.5-7B decoder (built by hand)."""
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False,
                  attention_bias=True, use_mean_pooling=True, hidden_act="gelu", layer_norm_eps=1e-6,
                  layer_scale_init_value=0.1)
    text = dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                tie_word_embeddings=False)
    return transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667,
                                       image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                                       tie_word_embeddings=False)


def test_full_size_config_eval_shape():
    from bye_jax.models.internvl.keys import KEYS
    from bye_jax.models.keys import target_path

    hf = _internvl3_8b_config()
    fam = family.family_for("internvl")
    with torch.device("meta"):
        theirs = {n: tuple(p.shape) for n, p in TorchInternVL(hf).named_parameters()}
    cfg = fam.config_from_hf(hf)
    model = nnx.eval_shape(lambda: fam.model_class(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    ours = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(int(np.prod(s)) for s in theirs.values())
    assert sum(int(np.prod(s)) for s in theirs.values()) > 7_900_000_000
    seen = set()
    for name, shape in theirs.items():  # every transformers parameter maps to one of ours, and back
        rule, m = KEYS.match(KEYS.normalize(name))
        path = target_path(rule, m)
        assert rule.shape_of(shape) == ours[path] and KEYS.module_name(path) == name, name
        seen.add(path)
    assert seen == set(ours)
    graphdef, state = nnx.split(model)
    tiles, s = 7, 7 * 256 + 40  # 6 tiles + thumbnail

    def run(state, ids, pixels, mask):
        fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
        return fwd(nnx.merge(graphdef, state), ids, pixels, mask, probe_index=last_token_index(mask),
                   probe_mask=mask.astype(bool), logits="last")

    out, inter = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, s), jnp.int32),
                                jax.ShapeDtypeStruct((2, tiles, 3, 448, 448), jnp.float32),
                                jax.ShapeDtypeStruct((2, s), jnp.int32))
    assert out.shape == (2, 151674) and out.dtype == jnp.float32
    layers = inter["language_model"]["layers"]
    assert len(layers) == 28 and layers[27]["self_attn"]["attn_row"][0].shape == (2, 28, s)
    assert layers[0]["self_attn"]["image_hidden"][0].shape == (2, 3584)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy 'full'"),
    (lambda c: c["vision_config"].update(image_size=[28, 56]), "not square"),
    (lambda c: c.update(image_seq_length=5), "image_seq_length 5"),
    (lambda c: c["text_config"].update(model_type="mistral"), "unsupported language model 'mistral'"),
])
def test_unsupported_configs_are_refused_with_one_line(tmp_path_factory, edit, message):
    path = _plain_checkpoint(tmp_path_factory)
    bad = tmp_path_factory.mktemp("bad")
    conf = json.loads((path / "config.json").read_text())
    edit(conf)
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError) as e:
        family.load_config(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


_PLAIN: dict = {}


def _plain_checkpoint(tmp_path_factory):
    if "path" not in _PLAIN:
        _PLAIN["path"] = make_tiny_internvl(tmp_path_factory.mktemp("plain"))
    return _PLAIN["path"]


def test_feature_layer_below_the_top_matches_transformers(tmp_path):
    """vision_feature_layer -2 of 3 layers: hidden state 2 (the final LayerNorm is not applied to it)."""
    path = make_tiny_internvl(tmp_path / "ckpt", vision_layers=3, vision_feature_layer=-2, use_mean_pooling=False,
                              seed=2)
    model, cfg = family.load_model(path, dtype="float32", attn_impl="xla")
    assert cfg.feature_index == 2
    ref = TorchInternVL.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    enc = InternVLPromptEncoder(path)
    image, question = _images()[1], QUESTIONS[0]
    logits, _ = _forward(model, enc.encode([image], [question]))
    ref_logits, _, _ = _reference(ref, enc, image, question)
    rel = np.abs(logits[0] - ref_logits).max() / np.abs(ref_logits).max()
    assert rel < 1e-4, rel


def test_filter_end_to_end(tmp_path):
    """The filter command on an InternVL checkpoint with tiles (N varies, so the detector reads entropy / ln N);
    the heat-maps (thumbnail last: no whole-image grid first) are skipped in one line, the other outputs written."""
    from test_extract import make_dataset

    from bye_jax.configs.llava import get_config
    from bye_jax.runner import run_filter

    ann, images = make_dataset(tmp_path / "data", n=6)
    for i in range(6):
        make_tiny_image(seed=i, size=SIZES[i % len(SIZES)]).save(images / f"{i}.png")
    cfg = get_config()
    path = make_tiny_internvl(tmp_path / "ckpt")
    cfg.model, cfg.data.annotations, cfg.data.image_root, cfg.batch_size = str(path), str(ann), str(images), 3
    cfg.detect.rule = "official"
    report = run_filter(cfg, tmp_path / "out", progress=False)
    assert report["n_samples"] == 6 and report["entropy"] == "normalised by ln(image tokens)"
    assert "attention_heatmaps.png" not in report["files"] and "layer_separation.png" in report["files"]
    for name in report["files"]:
        assert (tmp_path / "out" / name).stat().st_size > 0, name


def test_training_examples_reproduce_the_processor_ids(tmp_path):
    """bye_jax.train's examples: per image, <img> + its tile count x image_seq_length context tokens + </img>,
    the same ids as the processor gives for the prompt and the answer."""
    from test_extract import make_dataset

    from bye_jax.data.llava_json import load_dataset, load_image
    from bye_jax.train.data import ExampleEncoder, build_examples

    ann, images = make_dataset(tmp_path / "data", n=4)
    for i in range(4):
        make_tiny_image(seed=i, size=[*SIZES, (90, 30)][i]).save(images / f"{i}.png")
    samples, skipped = load_dataset(ann, images)
    assert not skipped
    enc = InternVLPromptEncoder(make_tiny_internvl(tmp_path / "ckpt"))
    examples, skipped = build_examples(samples, enc)
    assert not skipped and len(examples) == 4
    counts = set()
    for ex in examples:
        image = load_image(ex.sample.image_path)
        full = enc.prompt_text(ex.sample.question) + ExampleEncoder.target_text(ex.sample.answer)
        ids = enc.processor(images=[image.convert("RGB")], text=[full], return_tensors=None)["input_ids"][0]
        assert ex.input_ids.tolist() in (list(ids), [*ids, enc.eos_token_id])
        counts.add(int((ex.input_ids == enc.image_token_id).sum()))
    assert len(counts) > 1, "the tiled images must give different image-token counts"


def test_prompt_tiles_off_gives_one_view_through_the_config(tmp_path):
    """--config.prompt.tiles=off reaches the encoder: one 448-px-style view (image_seq_length tokens) for every
    image, where the processor's default tiles a wide image; families without tiling refuse it in one line."""
    from bye_jax.configs.runtime import prompt_options
    from bye_jax.models.family import load_encoder

    path = make_tiny_internvl(tmp_path / "ckpt")
    wide = make_tiny_image(seed=0, size=(90, 30))
    tiled, one = load_encoder(path), load_encoder(path, tiles="off")
    assert one.image_token_count(wide) == one.image_seq_length < tiled.image_token_count(wide)
    batch = one.encode([wide], ["what"])
    assert int(batch.image_mask.sum()) == one.image_seq_length and batch.pixel_values.shape[1] == 1
    assert prompt_options({"prompt": {"tiles": "off"}})["tiles"] == "off"
    with pytest.raises(ValueError, match="prompt.tiles must be one of processor, off"):
        prompt_options({"prompt": {"tiles": "none"}})
