"""Sharding by parameter role (bye_jax/parallel.py): specs per parameter kind, every parameter of the
LLaVA model named by a rule, and a (data, fsdp, tensor) mesh giving the one-device entropies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bye_jax.parallel import check_mesh, logical_axes, spec_for

FSDP4 = {"data": 1, "fsdp": 4, "tensor": 1}
FSDP2_TP2 = {"data": 1, "fsdp": 2, "tensor": 2}
L0 = ("language_model", "layers", 0)


@pytest.mark.parametrize("path,shape,mesh,want", [
    # attention / MLP kernels: hidden over fsdp; heads / MLP columns over tensor
    (L0 + ("self_attn", "q_proj", "kernel"), (64, 64), FSDP4, P("fsdp", None)),
    (L0 + ("self_attn", "k_proj", "kernel"), (64, 32), FSDP4, P("fsdp", None)),
    (L0 + ("self_attn", "o_proj", "kernel"), (64, 64), FSDP4, P(None, "fsdp")),
    (L0 + ("mlp", "gate_proj", "kernel"), (64, 96), FSDP4, P("fsdp", None)),
    (L0 + ("mlp", "down_proj", "kernel"), (96, 64), FSDP4, P(None, "fsdp")),
    (L0 + ("self_attn", "q_proj", "kernel"), (64, 64), FSDP2_TP2, P("fsdp", "tensor")),
    (L0 + ("self_attn", "o_proj", "kernel"), (64, 64), FSDP2_TP2, P("tensor", "fsdp")),
    (L0 + ("mlp", "up_proj", "kernel"), (64, 96), FSDP2_TP2, P("fsdp", "tensor")),
    (L0 + ("mlp", "down_proj", "kernel"), (96, 64), FSDP2_TP2, P("tensor", "fsdp")),
    (("vision_tower", "layers", 1, "mlp", "fc1", "kernel"), (32, 64), FSDP2_TP2, P("fsdp", "tensor")),
    (("vision_tower", "layers", 1, "self_attn", "out_proj", "kernel"), (32, 32), FSDP2_TP2, P("tensor", "fsdp")),
    # embeddings and the output layer: the vocabulary, over every model axis that divides it
    (("language_model", "embed_tokens", "weight"), (328, 64), FSDP4, P("fsdp", None)),
    (("lm_head", "kernel"), (64, 328), FSDP4, P(None, "fsdp")),
    (("language_model", "embed_tokens", "weight"), (328, 64), FSDP2_TP2, P(("tensor", "fsdp"), None)),
    (("lm_head", "kernel"), (64, 328), FSDP2_TP2, P(None, ("tensor", "fsdp"))),
    (("language_model", "embed_tokens", "weight"), (330, 64), FSDP2_TP2, P("tensor", "fsdp")),  # 330 % 4 != 0
    (("vision_tower", "embeddings", "patch_embedding"), (588, 32), FSDP4, P(None, "fsdp")),
    # norms, biases: replicated
    (L0 + ("input_layernorm", "weight"), (64,), FSDP4, P()),
    (("vision_tower", "pre_layrnorm", "bias"), (32,), FSDP4, P()),
    (("multi_modal_projector", "linear_1", "bias"), (64,), FSDP4, P()),
    # LoRA factors follow their layer's roles
    (L0 + ("self_attn", "q_proj", "lora_a"), (64, 8), FSDP2_TP2, P("fsdp", None)),
    (L0 + ("self_attn", "q_proj", "lora_b"), (8, 64), FSDP2_TP2, P(None, "tensor")),
    (L0 + ("mlp", "down_proj", "lora_a"), (96, 8), FSDP2_TP2, P("tensor", None)),
    (L0 + ("mlp", "down_proj", "lora_b"), (8, 64), FSDP2_TP2, P(None, "fsdp")),
    # a dimension no mesh axis divides stays whole; one device: all replicated
    (L0 + ("self_attn", "q_proj", "kernel"), (66, 64), FSDP4, P(None, None)),
    (L0 + ("self_attn", "q_proj", "kernel"), (64, 64), {"data": 1, "fsdp": 1, "tensor": 1}, P(None, None)),
    # no rule: the largest dimension divisible by fsdp
    (("some_new_family", "mixer", "kernel"), (10, 12), FSDP4, P(None, "fsdp")),
])
def test_spec_per_parameter_kind(path, shape, mesh, want):
    assert spec_for(path, shape, mesh) == want


def test_every_llava_parameter_has_a_rule(tiny_llava_dir):
    from bye_jax.models.family import load_model
    from bye_jax.models.lora import add_lora

    model, _ = load_model(tiny_llava_dir)
    add_lora(model, rank=4, alpha=8.0, target=r".*", rngs=nnx.Rngs(params=0))
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(model))]
    assert any(p[-1] == "lora_a" for p in paths)
    unnamed = ["/".join(map(str, p)) for p in paths if logical_axes(p) is None]
    assert unnamed == []


def test_check_mesh_tensor():
    check_mesh(-1, 1, 2)
    with pytest.raises(ValueError, match="mesh.tensor must be an integer >= 1"):
        check_mesh(-1, 1, 0)


SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from bye_jax.data.llava_json import load_dataset
    from bye_jax.extract import EntropyExtractor
    from bye_jax.models.family import load_model
    from bye_jax.models.inputs import PromptEncoder
    from bye_jax.parallel import placement
    ckpt, ann, images, out = sys.argv[1:]
    samples, _ = load_dataset(ann, images)
    enc = PromptEncoder(ckpt)
    place = placement(1, 2, 2, tensor=2)
    model, _ = load_model(ckpt, sharding_for=place.params)
    q = model.language_model.layers[0].self_attn.q_proj.kernel.get_value()
    assert tuple(q.sharding.spec) == ("fsdp", "tensor"), q.sharding.spec
    sharded, _ = EntropyExtractor(model, enc, batch_size=2, batch_sharding=place.batch).run(
        samples, out + "/sharded", progress=False)
    single, _ = EntropyExtractor(load_model(ckpt)[0], enc, batch_size=2).run(samples, out + "/single", progress=False)
    np.testing.assert_allclose(sharded.matrix, single.matrix, rtol=0, atol=1e-5)
    print("OK", sharded.matrix.shape)
""")


def test_fsdp_and_tensor_mesh_give_the_single_device_entropies(tiny_llava_dir, tmp_path):
    from test_extract import make_dataset

    ann, images = make_dataset(tmp_path / "data", n=4)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llava_dir), str(ann), str(images), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert done.returncode == 0 and "OK (4, " in done.stdout, done.stderr[-3000:]
