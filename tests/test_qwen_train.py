"""LoRA training on Qwen2.5-VL / Qwen2-VL (dynamic resolution): training examples expand each image into
its own token count, batches carry per-sample patch-row blocks, the loss equals transformers', gradient
accumulation equals the full batch, and `python -m bye_jax.train` runs end to end with a merged export
that transformers loads with the same logits."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_train import ANSWERS, QUESTIONS, _params, small_config
from tiny_checkpoints import make_tiny_image
from tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.models import family
from bye_jax.models.hf_export import save_peft_adapter
from bye_jax.models.lora import add_lora, lora_paths
from bye_jax.train.data import IGNORE, BatchLoader, build_examples
from bye_jax.train.loop import CHECKPOINT_DIR, LOG_FILE, OptConfig, make_optimizer, token_loss, train_step

# (width, height) -> image tokens (rows x columns): 20 (4 x 5), 64 (8 x 8), 36 (9 x 4), 18 (2 x 9), 36 (6 x 6),
# 9 (3 x 3), 24 (6 x 4), 40 (5 x 8): at most 256 patches an image
SIZES = [(40, 32), (64, 60), (30, 70), (70, 20), (50, 50), (24, 24), (36, 44), (60, 40)]


def write_dataset(root, n=8):
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        make_tiny_image(200 + i, SIZES[i]).save(root / "images" / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
            {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json", root / "images"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ann, images = write_dataset(tmp_path_factory.mktemp("qwen_data"))
    samples, skipped = load_dataset(ann, images)
    assert not skipped
    return ann, images, samples


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def checkpoint(request, tmp_path_factory):
    path = (request.getfixturevalue("qwen_dir") if request.param == "qwen2_5_vl" else
            make_tiny_qwen2_5_vl(tmp_path_factory.mktemp(request.param), qwen2_vl=True))
    ref_class = (transformers.Qwen2VLForConditionalGeneration if request.param == "qwen2_vl"
                 else transformers.Qwen2_5_VLForConditionalGeneration)
    return path, family.load_encoder(path), ref_class


def cli_config(qwen_dir, annotations="", image_root=""):
    """4 epochs of 2 steps (2 micro-batches of 2 rows), every row padded to 128 tokens (one compiled step)."""
    config = small_config(epochs=4, batch_size=2, grad_accum=2, lr=1e-2, warmup_ratio=0.0, length_bucket=128)
    with config.unlocked():
        config.model = str(qwen_dir)
        config.data.annotations, config.data.image_root = str(annotations), str(image_root)
    return config


def _micro(batch, a=0):
    return {k: v[a] for k, v in batch.as_dict().items()}


@nnx.jit
def _jit_loss(model, ids, pixel_values, mask, grid, labels):
    return token_loss(model(ids, pixel_values, mask, image_grid_thw=grid), labels)


def _loss(model, micro):
    """(summed token loss, target tokens) of a micro-batch, jitted (eager dispatch compiles op by op)."""
    return _jit_loss(model, *(jnp.asarray(micro[k]) for k in ("input_ids", "pixel_values", "attention_mask",
                                                               "image_grid_thw", "labels")))


def _torch_loss(ref, micro, image_token_id, grad=False):
    """transformers' loss on the same rows, its own layout: every image's patch rows concatenated."""
    grid = micro["image_grid_thw"]
    patches = np.concatenate([micro["pixel_values"][i, : int(np.prod(g))] for i, g in enumerate(grid)])
    ids = torch.tensor(micro["input_ids"], dtype=torch.long)
    with torch.set_grad_enabled(grad):
        loss = ref(input_ids=ids, attention_mask=torch.tensor(micro["attention_mask"], dtype=torch.long),
                   pixel_values=torch.tensor(patches), image_grid_thw=torch.tensor(grid, dtype=torch.long),
                   mm_token_type_ids=(ids == image_token_id).int(),
                   labels=torch.tensor(micro["labels"], dtype=torch.long)).loss
    return loss if grad else loss.item()


def test_training_batch_loss_matches_transformers(checkpoint, data):
    """Images of different sizes: the token ids are the processor's, each row's patch block and grid are
    its image's, the batch loss equals transformers', and a row's loss does not depend on its batch-mates
    (the model tests check the patch padding: test_qwen2_5_vl.py::test_padded_batch_equals_one_at_a_time)."""
    path, enc, ref_class = checkpoint
    _, _, samples = data
    examples, skipped = build_examples(samples[:6], enc)
    assert not skipped
    counts = [int((e.input_ids == enc.image_token_id).sum()) for e in examples]
    assert len(set(counts[:4])) == 4, counts
    loader = BatchLoader(examples, enc, batch_size=4, grad_accum=1, seed=0, length_bucket=128)
    micro = _micro(loader.make_batch(np.arange(4)))
    grid = micro["image_grid_thw"]
    assert micro["pixel_values"].shape[:2] == (4, enc.patch_bucket) and grid.shape == (4, 3)
    np.testing.assert_array_equal(np.prod(grid, axis=1) // enc.merge_size**2, counts[:4])
    for i, e in enumerate(examples[:4]):  # row i: the processor's tokens, grid and patches of its sample
        one = enc.encode([load_image(e.sample.image_path)], [e.sample.question])
        prompt = one.input_ids[0]
        np.testing.assert_array_equal(e.input_ids[: len(prompt)], prompt)
        assert (e.labels[: len(prompt)] == IGNORE).all() and (e.labels[len(prompt):] != IGNORE).all()
        np.testing.assert_array_equal(grid[i], one.image_grid_thw[0])
        np.testing.assert_array_equal(micro["pixel_values"][i], one.pixel_values[0])
        assert not micro["pixel_values"][i, int(np.prod(grid[i])):].any()

    model, _ = family.load_model(path)
    total, count = _loss(model, micro)
    ref = ref_class.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    theirs = _torch_loss(ref, micro, enc.image_token_id)
    assert abs(float(total / count) - theirs) < 1e-5 * abs(theirs), (float(total / count), theirs)

    # row 1 (64 image tokens) first among other batch-mates: the same loss
    other = _micro(loader.make_batch([1, 4, 0, 5]))
    assert other["pixel_values"].shape == micro["pixel_values"].shape
    only = lambda m, row: {**m, "labels": np.where(np.arange(4)[:, None] == row, m["labels"], IGNORE)}  # noqa: E731
    np.testing.assert_allclose(float(_loss(model, only(other, 0))[0]), float(_loss(model, only(micro, 1))[0]),
                               rtol=1e-5)


def test_gradient_accumulation_equals_the_full_batch(qwen_dir, data, tmp_path):
    """Two micro-batches of 2 rows (each row its own patch block) make the same step as one batch of 4: loss,
    gradient norm and updated LoRA weights; both equal PEFT's on transformers' model (measured: 8e-8 and 6e-8
    relative). The CLI test's model, config and shapes: the (2, 2) step compiles once for both."""
    _, _, samples = data
    config = cli_config(qwen_dir)
    enc = family.load_encoder(qwen_dir)
    examples, _ = build_examples(samples[:4], enc)
    model, _ = family.load_model(qwen_dir)
    add_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, target=config.lora.target,
             rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, dense in nnx.iter_modules(model):  # lora_b != 0: lora_a gets gradients too
        if getattr(dense, "lora_b", None) is not None:
            dense.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, dense.lora_b.shape).astype(np.float32))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    opt = OptConfig.from_config(config)
    out = {}
    for a, b in ((2, 2), (1, 4)):
        batch = BatchLoader(examples, enc, batch_size=b, grad_accum=a, seed=0,
                            length_bucket=config.length_bucket).make_batch(np.arange(4))
        assert batch.pixel_values.shape[:2] == (a, b) and batch.extra["image_grid_thw"].shape == (a, b, 3)
        params = jax.tree.map(jnp.copy, trainable)
        state = make_optimizer(opt, 0.0).init(params)
        arrays = {k: jnp.asarray(v) for k, v in batch.as_dict().items()}
        new, _, metrics = train_step(graphdef, opt, params, frozen, state, arrays, np.float32(1e-3))
        out[a] = new, {k: float(v) for k, v in metrics.items()}
    (acc, m_acc), (full, m_full) = out[2], out[1]
    assert m_acc["target_tokens"] == m_full["target_tokens"] > 0
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(acc), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)

    # the same adapters in PEFT on transformers' model: the same loss and LoRA gradient norm
    peft = pytest.importorskip("peft")
    adapter = save_peft_adapter(model, tmp_path / "adapter", qwen_dir, config.lora.rank, config.lora.alpha)
    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        qwen_dir, attn_implementation="eager", dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True).train()
    micro = _micro(BatchLoader(examples, enc, batch_size=4, grad_accum=1, seed=0).make_batch(np.arange(4)))
    loss = _torch_loss(ref, micro, enc.image_token_id, grad=True)
    loss.backward()
    lora = [p.grad for n, p in ref.named_parameters() if "lora_" in n]
    assert len(lora) == len(jax.tree.leaves(trainable)) and all(g is not None for g in lora)
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in lora)))
    assert abs(loss.item() - m_full["loss"]) < 1e-5 * loss.item()
    assert abs(norm - m_full["grad_norm"]) < 1e-5 * norm


@pytest.fixture(scope="module")
def cli_run(qwen_dir, data, tmp_path_factory):
    """(workdir, stdout) of `python -m bye_jax.train` (its `_run`) with `cli_config`."""
    from bye_jax.train.main import _run

    ann, images, _ = data
    workdir = tmp_path_factory.mktemp("qwen_train")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _run(cli_config(qwen_dir, ann, images), str(workdir)) == 0
    return workdir, out.getvalue()


def test_train_cli_on_qwen_exports_a_checkpoint_transformers_loads_with_the_same_logits(qwen_dir, data, cli_run):
    """`python -m bye_jax.train` (its `_run`) on Qwen2.5-VL with gradient accumulation: the loss goes down,
    only the decoder's LoRA targets change, and the merged export gives the same logits in Flax, in
    transformers, and as the PEFT adapter on the base checkpoint in transformers."""
    _, _, samples = data
    tmp_path, out = cli_run
    assert "8 steps" in out and "merged model" in out
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert not metrics["skipped"] and (tmp_path / CHECKPOINT_DIR / "8").is_dir()
    epochs = metrics["epoch_losses"]
    assert len(epochs) == 4 and epochs[-1] < 0.8 * epochs[0], epochs

    merged_dir = tmp_path / "merged"
    merged, _ = family.load_model(merged_dir, attn_impl="xla")
    assert lora_paths(merged) == []
    base, _ = family.load_model(qwen_dir, attn_impl="xla")
    new, old = _params(merged, nnx.Param), _params(base, nnx.Param)
    changed = {"/".join(map(str, p)) for p in old if not np.array_equal(new[p], old[p])}
    assert changed == {f"language_model/layers/{i}/{m}/kernel" for i in range(2) for m in (
        "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
        "mlp/up_proj", "mlp/down_proj")}

    enc = family.load_encoder(qwen_dir)
    pil = [load_image(s.image_path) for s in samples[:3]]
    questions = [s.question for s in samples[:3]]
    batch = enc.encode(pil, questions)
    forward = nnx.jit(lambda m, ids, pv, am, grid: m(ids, pv, am, image_grid_thw=grid))
    ours = np.asarray(forward(merged, jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values),
                              jnp.asarray(batch.attention_mask), jnp.asarray(batch.image_grid_thw)))
    peft = pytest.importorskip("peft")
    cls = transformers.Qwen2_5_VLForConditionalGeneration
    exported = cls.from_pretrained(merged_dir, attn_implementation="eager", dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(
        cls.from_pretrained(qwen_dir, attn_implementation="eager", dtype=torch.float32), tmp_path / "adapter").eval()
    for i, (image, question) in enumerate(zip(pil, questions, strict=True)):
        one = enc.processor(images=[image], text=[enc.prompt_text(question)], return_tensors="pt")
        got = ours[i][batch.attention_mask[i].astype(bool)]
        for name, ref in (("merged export", exported), ("PEFT adapter", adapted)):
            with torch.no_grad():
                theirs = ref(**one).logits[0].numpy()
            rel = np.abs(got - theirs).max() / np.abs(theirs).max()
            assert rel < 1e-5, f"sample {i}: {name} logits relative error {rel}"


def test_data_parallel_on_two_devices_equals_one_device(qwen_dir, data, cli_run, tmp_path):
    """The CLI test's run on a 2-device CPU mesh (a subprocess: the device count is fixed at jax start-up):
    each device gets whole rows, each with its own patch block and grid; same losses and gradient norms."""
    ann, images, _ = data
    script = f"""
import sys
import jax, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_qwen_train import cli_config
from bye_jax.data.llava_json import load_dataset
from bye_jax.models import family
from bye_jax.models.hf_export import save_peft_adapter
from bye_jax.parallel import placement
from bye_jax.train.loop import train
assert jax.device_count() == 2
pv = placement(2, 1, 2, batch_axis=1).put_batch(np.zeros((2, 2, 256, 96), np.float32))
assert {{s.data.shape for s in pv.addressable_shards}} == {{(2, 1, 256, 96)}}
samples, _ = load_dataset({str(ann)!r}, {str(images)!r})
model, cfg = family.load_model({str(qwen_dir)!r})
config = cli_config({str(qwen_dir)!r})
config.mesh.data = 2
train(model, cfg, samples, family.load_encoder({str(qwen_dir)!r}), config=config, workdir={str(tmp_path)!r},
      progress=False)
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = lambda d: [json.loads(line) for line in (d / LOG_FILE).read_text().splitlines()]  # noqa: E731
    two, one = log(tmp_path), log(cli_run[0])
    assert len(two) == len(one) == 8
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4)


def test_full_finetune_keeps_the_vision_tower_frozen_and_train_projector_is_refused(qwen_dir, data, tmp_path):
    """The family's module names: full fine-tuning trains the decoder and lm_head, not `visual` (unless
    train_vision); Qwen has no separate projector, so train_projector is a one-line error."""
    from bye_jax.train.loop import train, trainable_filter

    model, cfg = family.load_model(qwen_dir)
    fam = family.family_of(model)
    names = dict(vision_module=fam.vision_module, projector_module=fam.projector_module)
    tops = lambda filt: {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, filt))}  # noqa: E731
    assert tops(trainable_filter(False, full_finetune=True, **names)) == {"language_model", "lm_head"}
    assert tops(trainable_filter(False, full_finetune=True, train_vision=True, **names)) == {
        "language_model", "lm_head", "visual"}
    with pytest.raises(ValueError, match="^train_projector: this model family has no separate projector"):
        train(model, cfg, data[2], family.load_encoder(qwen_dir), config=small_config(train_projector=True),
              workdir=tmp_path, progress=False)


def test_a_row_whose_image_no_longer_matches_its_tokens_is_a_one_line_error(qwen_dir, data, tmp_path):
    """An image replaced by one of another size after the examples were built: the batch is refused, not
    trained on misplaced image features."""
    _, images, samples = data
    enc = family.load_encoder(qwen_dir)
    examples, _ = build_examples(samples[:2], enc)
    moved = tmp_path / "0.png"
    make_tiny_image(0, SIZES[1]).save(moved)
    examples[0] = dataclasses.replace(examples[0], sample=dataclasses.replace(examples[0].sample, image_path=moved))
    loader = BatchLoader(examples, enc, batch_size=2, grad_accum=1, seed=0)
    with pytest.raises(ValueError, match=r"^sample q0: the prompt has 20 image tokens, its image's grid 64 "):
        loader.make_batch([0, 1])
    assert loader.make_batch([1]).ids == ["q1"]
