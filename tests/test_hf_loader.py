"""Loader: rule table coverage, legacy/current key layouts, clear errors, the real 7B shape."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_checkpoints import make_real_llava15_7b_config, make_tiny_llava

from bye_jax.models.family import load_model
from bye_jax.models.hf_loader import CheckpointError
from bye_jax.models.llava import LlavaForConditionalGeneration, from_hf_config
from bye_jax.models.llava.keys import KEYS, RULES

match_rule, normalize_key = KEYS.match, KEYS.normalize


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("loader"))


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_every_checkpoint_tensor_matches_exactly_one_rule(tiny_dir):
    keys = load_file(str(tiny_dir / "model.safetensors")).keys()
    for key in keys:
        hits = [r for r in RULES if r.pattern.match(normalize_key(key))]
        assert len(hits) == 1, (key, hits)


@pytest.mark.parametrize("key", [
    "language_model.model.layers.3.self_attn.q_proj.weight",
    "model.language_model.layers.3.self_attn.q_proj.weight",
    "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias",
    "model.vision_tower.encoder.layers.0.mlp.fc1.bias",
    "multi_modal_projector.linear_2.weight",
    "language_model.lm_head.weight",
    "lm_head.weight",
])
def test_legacy_and_current_names_reach_the_same_parameter(key):
    rule, m = match_rule(normalize_key(key))
    assert rule.target is not None and m is not None


def test_sharded_checkpoint_loads_like_single_file(tiny_dir, tmp_path):
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_dir, sharded)
    (sharded / "model.safetensors").unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, _ = load_model(tiny_dir)
    b, _ = load_model(sharded)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b)),
                                  strict=True):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def test_bfloat16_load_casts_every_parameter(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16")
    dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {np.dtype(jax.numpy.bfloat16)}


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = _rewrite(tiny_dir, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing parameters: .*language_model/layers/1/mlp/up_proj/kernel"):
        load_model(bad)


def test_extra_tensor_is_named(tiny_dir, tmp_path):
    bad = _rewrite(tiny_dir, tmp_path / "extra",
                   lambda t: t.update({"language_model.model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: language_model\.model\.layers\.0\.mystery"):
        load_model(bad)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    key = "multi_modal_projector.linear_1.bias"
    bad = _rewrite(tiny_dir, tmp_path / "shape", lambda t: t.update({key: np.zeros(5, np.float32)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: multi_modal_projector\.linear_1\.bias"):
        load_model(bad)


def test_not_a_checkpoint_dir_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_real_llava15_7b_builds_abstractly_with_transformers_param_count():
    cfg = from_hf_config(make_real_llava15_7b_config())
    abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=jax.numpy.bfloat16,
                                                                    rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 7_063_427_072
    assert cfg.image_seq_length == cfg.num_image_tokens == 576


def test_float32_load_asks_for_full_float32_matmuls(tiny_llava_dir, monkeypatch):
    """jax's default matmul precision is TF32 on GPUs: float32 parity held on an H100 only with 'highest'."""
    load_model(tiny_llava_dir, dtype="float32")
    assert jax.config.jax_default_matmul_precision is None  # on the CPU float32 is float32 anyway
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    try:
        load_model(tiny_llava_dir, dtype="bfloat16")
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"  # left alone for 16-bit compute
        load_model(tiny_llava_dir, dtype="float32")
        assert jax.config.jax_default_matmul_precision == "highest"
    finally:
        jax.config.update("jax_default_matmul_precision", before)


# ------------------------------------------------------------------ values: every rule of the table (issue 14)

_same = lambda w: w  # noqa: E731
_t = lambda w: w.T  # noqa: E731  torch Linear [out, in] -> flax kernel [in, out]
_conv = lambda w: w.reshape(w.shape[0], -1).T  # noqa: E731  Conv2d [d, c, p, p] -> matmul kernel [c*p*p, d]

# (key as save_pretrained writes it, flax parameter path, how the torch value is laid out there): one row per
# rule of RULES, the ignored buffers last.
VALUE_CASES = [
    ("vision_tower.embeddings.class_embedding", ("vision_tower", "embeddings", "class_embedding"), _same),
    ("vision_tower.embeddings.patch_embedding.weight", ("vision_tower", "embeddings", "patch_embedding"), _conv),
    ("vision_tower.embeddings.position_embedding.weight", ("vision_tower", "embeddings", "position_embedding"),
     _same),
    ("vision_tower.pre_layrnorm.bias", ("vision_tower", "pre_layrnorm", "bias"), _same),
    ("vision_tower.encoder.layers.1.self_attn.k_proj.weight",
     ("vision_tower", "layers", 1, "self_attn", "k_proj", "kernel"), _t),
    ("vision_tower.encoder.layers.0.mlp.fc2.bias", ("vision_tower", "layers", 0, "mlp", "fc2", "bias"), _same),
    ("vision_tower.encoder.layers.1.layer_norm2.weight", ("vision_tower", "layers", 1, "layer_norm2", "weight"),
     _same),
    ("multi_modal_projector.linear_2.weight", ("multi_modal_projector", "linear_2", "kernel"), _t),
    ("multi_modal_projector.linear_1.bias", ("multi_modal_projector", "linear_1", "bias"), _same),
    ("language_model.model.embed_tokens.weight", ("language_model", "embed_tokens", "weight"), _same),
    ("language_model.model.layers.1.mlp.down_proj.weight",
     ("language_model", "layers", 1, "mlp", "down_proj", "kernel"), _t),
    ("language_model.model.layers.0.self_attn.v_proj.bias",
     ("language_model", "layers", 0, "self_attn", "v_proj", "bias"), _same),
    ("language_model.model.layers.1.post_attention_layernorm.weight",
     ("language_model", "layers", 1, "post_attention_layernorm", "weight"), _same),
    ("language_model.model.norm.weight", ("language_model", "norm", "weight"), _same),
    ("language_model.lm_head.weight", ("lm_head", "kernel"), _t),
    ("vision_tower.embeddings.position_ids", None, None),
    ("language_model.model.layers.0.self_attn.rotary_emb.inv_freq", None, None),
]


@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory):
    """Tiny checkpoint with attention biases (for the q/k/v/o bias rule) and the two ignored buffers added."""
    root = tmp_path_factory.mktemp("loader_values")
    src = make_tiny_llava(root / "src", attention_bias=True, seed=7)
    return _rewrite(src, root / "ckpt", lambda t: t.update({
        "vision_tower.embeddings.position_ids": np.arange(5, dtype=np.int64)[None],
        "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))


def test_value_cases_cover_every_rule():
    hit = {id(match_rule(normalize_key(key))[0]) for key, _, _ in VALUE_CASES}
    assert hit == {id(r) for r in RULES}


@pytest.fixture(scope="module")
def biased_loaded(biased_dir):
    model, _ = load_model(biased_dir)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    return load_file(str(biased_dir / "model.safetensors")), flat


@pytest.mark.parametrize("key,path,layout", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_each_rule_puts_the_tensor_at_the_right_place(biased_loaded, key, path, layout):
    tensors, flat = biased_loaded
    if path is None:  # non-persistent buffers: read nowhere, and nothing else changes
        assert key in tensors and not any("position_ids" in map(str, p) or "inv_freq" in map(str, p) for p in flat)
        return
    expected = layout(tensors[key])
    assert flat[path].shape == expected.shape
    np.testing.assert_array_equal(flat[path], expected)
    assert np.std(expected) > 0  # a random tensor: a wrong source could not match by chance


# ------------------------------------------------------------------ non-finite weights are refused (issue 14)


@pytest.mark.parametrize("value,dtype,what", [(np.nan, "float32", "1 NaN and 0 infinite"),
                                              (np.inf, "bfloat16", "0 NaN and 1 infinite"),
                                              (-np.inf, "float32", "0 NaN and 1 infinite"),
                                              (1e6, "float16", "0 NaN and 1 infinite")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_dir, tmp_path, value, dtype, what):
    key = "language_model.model.layers.1.self_attn.k_proj.weight"

    def poison(t):
        t[key] = t[key].copy()
        t[key][3, 2] = value

    bad = _rewrite(tiny_dir, tmp_path / "bad", poison)
    with pytest.raises(CheckpointError) as e:
        load_model(bad, dtype=dtype)
    msg = str(e.value)
    assert msg.startswith(f"non-finite weights: tensor {key} in model.safetensors has {what} values (as {dtype}; "
                          "first at index (3, 2))")  # in the checkpoint's layout
    assert "\n" not in msg


def test_finite_extremes_still_load(tiny_dir, tmp_path):
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    big = _rewrite(tiny_dir, tmp_path / "big", lambda t: t.update({key: np.full_like(t[key], 3e38)}))
    model, _ = load_model(big)  # float32 max is ~3.4e38: finite
    assert np.isfinite(np.asarray(model.language_model.layers[0].mlp.up_proj.kernel.get_value())).all()
