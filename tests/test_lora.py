"""LoRA adapters (add / merge), HF checkpoint export and PEFT adapter export, against transformers."""

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_checkpoints import make_tiny_image, make_tiny_llava
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.models.family import load_model
from bye_jax.models.hf_export import save_hf_checkpoint, save_peft_adapter
from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.llava.keys import module_name
from bye_jax.models.lora import DEFAULT_TARGET, add_lora, iter_dense, lora_paths, merge_lora
from bye_jax.models.safetensors_io import read_header

QUESTIONS = ["what color is the big square", "how many dogs are there"]


def _randomize_b(model, seed=0, std=0.2):
    """Trained-looking adapters: B != 0 (a fresh adapter is an exact no-op)."""
    rng = np.random.default_rng(seed)
    for _, dense in iter_dense(model):
        if dense.lora_b is not None:
            dense.lora_b[...] = jnp.asarray(std * rng.standard_normal(dense.lora_b.shape), jnp.float32)


def _batch(ckpt):
    enc = PromptEncoder(ckpt)
    images = [make_tiny_image(i, (40 + 5 * i, 32)) for i in range(len(QUESTIONS))]
    return enc.encode(images, QUESTIONS, padding_side="right")


def _logits(model, batch):
    return np.asarray(model(jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values),
                            jnp.asarray(batch.attention_mask)))


def _torch_logits(ref, batch):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                   attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
                   pixel_values=torch.tensor(batch.pixel_values)).logits.numpy()


def _rel(a, b, mask):
    a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return np.abs(a - b).max() / np.abs(b).max()


def _flat_params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_add_lora_targets_the_matching_dense_layers(tiny_llava_dir):
    model, cfg = load_model(tiny_llava_dir)
    all_dense = [p for p, _ in iter_dense(model)]
    expected = [p for p in all_dense if re.fullmatch(DEFAULT_TARGET, p)]
    assert len(expected) == 7 * cfg.text.num_layers
    paths = add_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(0))
    assert paths == expected == lora_paths(model)
    assert not any(p.startswith(("vision_tower", "multi_modal_projector", "lm_head")) for p in paths)
    for path, dense in iter_dense(model):
        if path not in paths:
            assert dense.lora_a is None and dense.lora_b is None
            continue
        fan_in, fan_out = dense.kernel.shape
        a, b = np.asarray(dense.lora_a[...]), np.asarray(dense.lora_b[...])
        assert a.shape == (fan_in, 4) and b.shape == (4, fan_out)
        assert a.dtype == np.float32 and b.dtype == np.float32
        assert np.all(b == 0) and dense.lora_scale == 2.0
        bound = 1 / np.sqrt(fan_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert len(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))) == 2 * len(paths)

    narrow = load_model(tiny_llava_dir)[0]
    few = add_lora(narrow, rank=2, alpha=2, target=r"language_model/layers/\d+/self_attn/[qv]_proj", rngs=nnx.Rngs(1))
    assert len(few) == 2 * cfg.text.num_layers < len(paths)
    with pytest.raises(ValueError, match="already has"):
        add_lora(narrow, rank=2, alpha=2, target=r"language_model/layers/0/self_attn/q_proj", rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="matches no Dense"):
        add_lora(narrow, rank=2, alpha=2, target=r"nothing/here", rngs=nnx.Rngs(1))


def test_fresh_adapter_is_a_no_op_and_merge_matches_lora_forward(tiny_llava_dir):
    model, _ = load_model(tiny_llava_dir)
    batch = _batch(tiny_llava_dir)
    base = _logits(model, batch)
    add_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_logits(model, batch), base)
    _randomize_b(model)
    with_lora = _logits(model, batch)
    assert _rel(with_lora, base, batch.attention_mask) > 1e-2  # the adapters do something
    merged = merge_lora(model)
    assert len(merged) == 14 and lora_paths(model) == []
    assert len(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))) == 0
    np.testing.assert_allclose(_logits(model, batch), with_lora, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["saved", "hub_tied"])
def test_merged_export_loads_in_transformers_and_bye_jax(tmp_path, variant):
    kw = dict(key_layout="saved") if variant == "saved" else dict(legacy_keys=True, tie_word_embeddings=True, seed=4)
    src = make_tiny_llava(tmp_path / "src", **kw)
    model, cfg = load_model(src)
    add_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(0))
    _randomize_b(model)
    batch = _batch(src)
    ours = _logits(model, batch)
    before = {p: np.array(v) for p, v in _flat_params(model).items()}

    out = save_hf_checkpoint(model, cfg, src, tmp_path / "merged")
    assert lora_paths(model), "export must not merge the model in place"
    np.testing.assert_array_equal(before[("language_model", "layers", 0, "self_attn", "q_proj", "kernel")],
                                  _flat_params(model)[("language_model", "layers", 0, "self_attn", "q_proj", "kernel")])
    src_keys, _ = read_header(src / "model.safetensors")
    out_keys, _ = read_header(out / "model.safetensors")
    assert set(out_keys) == set(src_keys), "the export mirrors the source checkpoint's key layout"
    assert all(out_keys[k]["shape"] == src_keys[k]["shape"] for k in src_keys)
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        if (src / name).exists():
            assert (out / name).exists(), name

    ref = TorchLlava.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert _rel(_torch_logits(ref, batch), ours, batch.attention_mask) < 1e-4

    merge_lora(model)
    back, _ = load_model(out)
    mine, theirs = _flat_params(model), _flat_params(back)
    assert mine.keys() == theirs.keys()
    for p in mine:
        np.testing.assert_array_equal(theirs[p], mine[p], err_msg="/".join(map(str, p)))


def test_export_bf16_and_fresh_checkpoint_dir(tmp_path, tiny_llava_dir):
    model, cfg = load_model(tiny_llava_dir)
    out = save_hf_checkpoint(model, cfg, tiny_llava_dir, tmp_path / "bf16", dtype="bfloat16")
    header, _ = read_header(out / "model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text()).get("dtype") in (None, "bfloat16")
    back, _ = load_model(out, dtype="bfloat16")
    ref = _flat_params(model)
    for p, v in _flat_params(back).items():
        np.testing.assert_array_equal(v, ref[p].astype(jnp.bfloat16))
    # A checkpoint being built: config and processor files already there, no weights yet.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for f in tiny_llava_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, fresh / f.name)
    save_hf_checkpoint(model, cfg, fresh, fresh)
    assert set(read_header(fresh / "model.safetensors")[0]) == set(read_header(tiny_llava_dir / "model.safetensors")[0])
    with pytest.raises(ValueError, match="source checkpoint"):
        save_hf_checkpoint(model, cfg, tiny_llava_dir, tiny_llava_dir)


def test_peft_adapter_layout(tmp_path, tiny_llava_dir):
    model, _ = load_model(tiny_llava_dir)
    paths = add_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(0))
    _randomize_b(model)
    out = save_peft_adapter(model, tmp_path / "adapter", tiny_llava_dir, 4, 8)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["lora_dropout"] == 0.0
    assert conf["base_model_name_or_path"] == str(tiny_llava_dir)
    header, _ = read_header(out / "adapter_model.safetensors")
    assert len(header) == 2 * len(paths)
    dense = dict(iter_dense(model))
    for p in paths:
        fan_in, fan_out = dense[p].kernel.shape
        prefix = "base_model.model." + module_name(p)
        assert header[prefix + ".lora_A.weight"]["shape"] == [4, fan_in]
        assert header[prefix + ".lora_B.weight"]["shape"] == [fan_out, 4]
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in header
    # target_modules selects exactly the adapted modules of transformers' own model (PEFT fullmatches it).
    ref = TorchLlava.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    linear = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = {n for n in linear if re.fullmatch(conf["target_modules"], n)}
    assert chosen == {module_name(p) for p in paths}
    with pytest.raises(ValueError, match="do not match"):
        save_peft_adapter(model, tmp_path / "bad", tiny_llava_dir, 8, 8)


def test_peft_loads_the_adapter_with_the_same_logits(tmp_path, tiny_llava_dir):
    peft = pytest.importorskip("peft")
    model, _ = load_model(tiny_llava_dir)
    add_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(0))
    _randomize_b(model)
    out = save_peft_adapter(model, tmp_path / "adapter", tiny_llava_dir, 4, 8)
    batch = _batch(tiny_llava_dir)
    base = TorchLlava.from_pretrained(tiny_llava_dir, attn_implementation="eager", dtype=torch.float32).eval()
    wrapped = peft.PeftModel.from_pretrained(base, out).eval()
    assert _rel(_torch_logits(wrapped, batch), _logits(model, batch), batch.attention_mask) < 1e-4
