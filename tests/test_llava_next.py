"""LLaVA-NeXT (anyres tiles, unpadding, image_newline) against transformers' PyTorch implementation.

Tiny random checkpoints (Llama and Mistral decoders) with a LlavaNextProcessor are built inside the
tests; transformers runs one sample at a time with eager attention, the port runs padded batches of
images of different sizes and aspect ratios (so different tile grids and token counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tiny_checkpoints import make_tiny_image, make_tiny_llava_next
from transformers import LlavaNextForConditionalGeneration as TorchLlavaNext

from bye_jax.extract import EntropyExtractor
from bye_jax.models import family
from bye_jax.models.config import ConfigError
from bye_jax.models.hf_export import save_hf_checkpoint
from bye_jax.models.lora import add_lora, merge_lora
from bye_jax.models.masks import last_token_index

QUESTIONS = ["what color is the big square", "how many", "is there a cat on the left side of the picture",
             "describe the picture"]
SIZES = [(40, 32), (20, 70), (90, 30), (64, 64)]  # (width, height): landscape, tall, wide, square

CONFIGS = {
    "llama_gqa": dict(kv_heads=2),
    "mistral_window_tied": dict(text_model="mistral", sliding_window=1024, kv_heads=1, tie_word_embeddings=True,
                                rope_theta=1e6, vision_feature_layer=-1, seed=1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_llava_next(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    ref = TorchLlavaNext.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model, cfg = family.load_model(path, dtype="float32", attn_impl="xla")
    return path, ref, model, cfg, family.load_encoder(path)


def _images():
    return [make_tiny_image(seed=i, size=s) for i, s in enumerate(SIZES)]


def _torch_inputs(one):
    return dict(input_ids=torch.tensor(one.input_ids, dtype=torch.long),
                attention_mask=torch.tensor(one.attention_mask, dtype=torch.long),
                pixel_values=torch.tensor(one.pixel_values), image_sizes=torch.tensor(one.extra["image_sizes"]))


def _reference(ref, enc, image, question):
    """(logits, last-position attention rows, image positions without the newline slots) from transformers."""
    one = enc.encode([image], [question])
    inputs = _torch_inputs(one)
    with torch.no_grad():
        out = ref(**inputs, output_attentions=True)
        feats = ref.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    newline = (feats == ref.model.image_newline[None]).all(-1).numpy()  # the packed newline vectors
    is_image = one.input_ids[0] == enc.image_token_id
    assert is_image.sum() == len(feats)
    content = np.zeros_like(is_image)
    content[np.flatnonzero(is_image)[~newline]] = True
    rows = [a[0, :, -1, :].numpy() for a in out.attentions]
    return out.logits[0].numpy(), rows, content


def _entropy(rows, content):
    out = []
    for r in rows:
        p = r.astype(np.float64)[:, content].mean(axis=0)
        p = p / p.sum()
        out.append(-(p * np.log(p + 1e-8)).sum())
    return np.asarray(out)


def _capture_forward(model, batch, **kw):
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    am = jnp.asarray(batch.attention_mask)
    extra = {k: jnp.asarray(v) for k, v in batch.extra.items()}
    logits, inter = fwd(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values), am,
                        probe_index=last_token_index(am), **extra, **kw)
    layers = inter["language_model"]["layers"]
    rows = [np.asarray(layers[i]["self_attn"]["attn_row"][0]) for i in range(len(layers))]
    return np.asarray(logits), rows


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_rows_and_entropies_match_transformers(checkpoint, padding_side):
    _, ref, model, _, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS, padding_side=padding_side)
    counts = (batch.input_ids == enc.image_token_id).sum(axis=1)
    assert len(set(counts.tolist())) > 1  # the sizes give different token counts
    logits, rows = _capture_forward(model, batch)
    signals = EntropyExtractor(model, enc, batch_size=len(images)).signals(batch)
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        ref_logits, ref_rows, content = _reference(ref, enc, image, question)
        real = batch.attention_mask[b].astype(bool)
        np.testing.assert_array_equal(batch.image_mask[b][real], content)  # newline slots excluded
        got = logits[b][real]
        rel = np.abs(got - ref_logits).max() / np.abs(ref_logits).max()
        assert rel < 1e-4, f"sample {b}: logits relative error {rel}"
        for layer, ref_row in enumerate(ref_rows):
            np.testing.assert_allclose(rows[layer][b][:, real], ref_row, atol=1e-5, err_msg=f"{b} layer {layer}")
        ref_entropy = _entropy(ref_rows, content)
        np.testing.assert_allclose(signals["entropy"][b], ref_entropy, atol=1e-4)
        np.testing.assert_allclose(signals["entropy_norm"][b], ref_entropy / np.log(content.sum()), atol=1e-4)


def test_batched_equals_one_by_one(checkpoint):
    _, _, model, _, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS, pad_to=160)
    logits, rows = _capture_forward(model, batch, logits="last")
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one = enc.encode([image], [question])
        assert one.pixel_values.shape[1] <= batch.pixel_values.shape[1]
        one_logits, one_rows = _capture_forward(model, one, logits="last")
        np.testing.assert_allclose(logits[b], one_logits[0], rtol=1e-5, atol=1e-5)
        real = batch.attention_mask[b].astype(bool)
        for layer in range(len(rows)):
            np.testing.assert_allclose(rows[layer][b][:, real], one_rows[layer][0], atol=1e-6)


def test_greedy_generation_matches_transformers(checkpoint):
    _, ref, model, _, enc = checkpoint
    images = _images()
    batch = enc.encode(images, QUESTIONS)
    new = 6
    ours = np.asarray(family.family_of(model).greedy_generate(
        model, batch.input_ids, batch.attention_mask, batch.pixel_values, max_new_tokens=new,
        eos_id=enc.eos_token_id, pad_id=enc.pad_token_id, **batch.extra))
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        one = enc.encode([image], [question])
        with torch.no_grad():
            out = ref.generate(**_torch_inputs(one), max_new_tokens=new, do_sample=False,
                               eos_token_id=enc.eos_token_id, pad_token_id=enc.pad_token_id)
        theirs = out[0, one.input_ids.shape[1]:].numpy()
        np.testing.assert_array_equal(ours[b, : len(theirs)], theirs, err_msg=f"sample {b}")
        assert np.all(ours[b, len(theirs):] == enc.pad_token_id)


def test_merged_lora_export_loads_in_transformers_with_the_same_logits(checkpoint, tmp_path):
    path, _, _, _, enc = checkpoint
    model, cfg = family.load_model(path)
    add_lora(model, rank=4, alpha=8, target=family.family_of(model).lora_target, rngs=nnx.Rngs(3))
    for _, m in nnx.iter_modules(model):  # a non-zero update everywhere
        if getattr(m, "lora_b", None) is not None:
            m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(7), m.lora_b.shape)
    batch = enc.encode(_images()[:2], QUESTIONS[:2])
    ours = np.asarray(model(jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values),
                            jnp.asarray(batch.attention_mask), **{k: jnp.asarray(v) for k, v in batch.extra.items()}))
    merge_lora(model)
    out = save_hf_checkpoint(model, cfg, path, tmp_path / "merged")
    assert family.model_type_of(out) == "llava_next"
    ref = TorchLlavaNext.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    for b in range(2):
        one = enc.encode([_images()[b]], [QUESTIONS[b]])
        with torch.no_grad():
            theirs = ref(**_torch_inputs(one)).logits[0].numpy()
        got = ours[b][batch.attention_mask[b].astype(bool)]
        assert np.abs(got - theirs).max() / np.abs(theirs).max() < 1e-4
    again, _ = family.load_model(out)  # and it loads back here
    assert type(again) is type(model)


def _llava_v16_mistral_7b_config():
    """The config of llava-hf/llava-v1.6-mistral-7b-hf."""
    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14,
                                           hidden_act="quick_gelu", projection_dim=768)
    text = transformers.MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return transformers.LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def test_full_size_llava_v16_mistral_7b_builds_abstractly_with_transformers_param_count():
    hf = _llava_v16_mistral_7b_config()
    fam = family.family_for(hf.model_type)
    cfg = fam.config_from_hf(hf)
    abstract = nnx.eval_shape(lambda: fam.new_model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchLlavaNext(hf).parameters())
    assert sum(int(np.prod(x.shape)) for x in leaves) == theirs
    assert cfg.text.num_kv_heads == 8 and cfg.text.head_dim == 128 and cfg.text.max_position_embeddings == 32768


def test_sliding_window_shorter_than_the_context_bounds_it(tmp_path):
    hf = _llava_v16_mistral_7b_config()
    hf.text_config.sliding_window = 4096
    assert family.family_for("llava_next").config_from_hf(hf).text.max_position_embeddings == 4096


def test_unknown_model_type_is_one_line_listing_the_known_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip_2"}')
    with pytest.raises(ConfigError) as e:
        family.load_model(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "'blip_2'" in msg and "llava" in msg and "llava_next" in msg


def test_filter_on_llava_next_detects_on_the_normalised_entropy(checkpoint, tmp_path):
    """The filter command end to end on a LLaVA-NeXT checkpoint: images of several sizes give different
    token counts, so the detector reads entropy / ln N; entropy.jsonl keeps the raw entropy, both are stored."""
    from test_extract import make_dataset

    from bye_jax.configs.llava import get_config
    from bye_jax.extract import read_entropy_jsonl
    from bye_jax.runner import run_filter
    from bye_jax.signals import load_npz

    path, ref, _, _, enc = checkpoint
    ann, images = make_dataset(tmp_path / "data", n=6)
    for i in range(6):  # several aspect ratios
        make_tiny_image(i, SIZES[i % len(SIZES)]).save(images / f"{i}.png")
    cfg = get_config()
    cfg.model, cfg.data.annotations, cfg.data.image_root, cfg.batch_size = str(path), str(ann), str(images), 4
    cfg.detect.rule = "official"
    report = run_filter(cfg, tmp_path / "out", progress=False)
    assert report["n_samples"] == 6 and report["entropy"] == "normalised by ln(image tokens)"
    assert (tmp_path / "out" / "attention_heatmaps.png").stat().st_size > 1000
    table = load_npz(tmp_path / "out" / "signals.npz")
    assert len(set(table.get("num_image_tokens").tolist())) > 1
    np.testing.assert_allclose(table.get("entropy_norm"),
                               table.entropy / np.log(table.get("num_image_tokens"))[:, None], rtol=1e-5)
    raw = read_entropy_jsonl(tmp_path / "out" / "entropy.jsonl")
    from bye_jax.data.llava_json import load_dataset, load_image

    samples = {s.id: s for s in load_dataset(ann, images)[0]}
    for qid, row in list(zip(raw.ids, raw.matrix, strict=True))[:2]:
        s = samples[qid]
        _, ref_rows, content = _reference(ref, enc, load_image(s.image_path), s.question)
        assert table.get("num_image_tokens")[table.ids.index(qid)] == content.sum()
        np.testing.assert_allclose(row, _entropy(ref_rows, content), atol=1e-4)


def test_training_batches_match_the_processor_and_the_loss_matches_transformers(checkpoint, tmp_path):
    """Training examples expand <image> per image (token ids = the processor's), the batch carries the layout,
    the loss equals transformers' on the same batch, and the LoRA loop runs on it."""
    from test_train import small_config, write_dataset

    from bye_jax.data.llava_json import load_dataset, load_image
    from bye_jax.train.data import BatchLoader, build_examples
    from bye_jax.train.loop import token_loss, train

    path, ref, model, cfg, enc = checkpoint
    ann, images = write_dataset(tmp_path / "data", n=4)
    for i in range(4):
        make_tiny_image(i, SIZES[i]).save(images / f"{i}.png")
    samples, _ = load_dataset(ann, images)
    examples, skipped = build_examples(samples, enc)
    assert not skipped and len({int((e.input_ids == enc.image_token_id).sum()) for e in examples}) > 1
    for e in examples:
        prompt = enc.encode([load_image(e.sample.image_path)], [e.sample.question]).input_ids[0]
        np.testing.assert_array_equal(e.input_ids[: len(prompt)], prompt)
    loader = BatchLoader(examples, enc, batch_size=4, grad_accum=1, seed=0)
    batch = loader.make_batch(np.arange(4))
    micro = {k: v[0] for k, v in batch.as_dict().items()}
    extra = {k: jnp.asarray(v) for k, v in micro.items()
             if k not in ("input_ids", "pixel_values", "attention_mask", "labels")}
    logits = model(jnp.asarray(micro["input_ids"]), jnp.asarray(micro["pixel_values"]),
                   jnp.asarray(micro["attention_mask"]), **extra)
    total, count = token_loss(logits, jnp.asarray(micro["labels"]))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(micro["input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(micro["attention_mask"], dtype=torch.long),
                     pixel_values=torch.tensor(micro["pixel_values"]),
                     image_sizes=torch.tensor(micro["image_sizes"]),
                     labels=torch.tensor(micro["labels"], dtype=torch.long)).loss.item()
    assert abs(float(total / count) - theirs) < 1e-4 * abs(theirs)

    trained, _ = family.load_model(path)
    metrics = train(trained, cfg, samples, enc, config=small_config(epochs=1, batch_size=2, grad_accum=1),
                    workdir=tmp_path / "run", progress=False)
    assert len(metrics["losses"]) == 2 and all(np.isfinite(metrics["losses"]))
