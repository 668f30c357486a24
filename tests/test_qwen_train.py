"""LoRA training on Qwen2.5-VL / Qwen2-VL (dynamic resolution): training examples expand each image into
its own token count, batches carry per-sample patch-row blocks, the loss equals transformers', gradient
accumulation equals the full batch, and `python -m bye_jax.train` runs end to end with a merged export
that transformers loads with the same logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_train import ANSWERS, QUESTIONS
from tiny_checkpoints import make_tiny_image
from tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.models import family
from bye_jax.train.data import IGNORE, BatchLoader, build_examples
from bye_jax.train.loop import token_loss

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


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def checkpoint(request, tmp_path_factory):
    path = make_tiny_qwen2_5_vl(tmp_path_factory.mktemp(request.param), qwen2_vl=request.param == "qwen2_vl")
    ref_class = (transformers.Qwen2VLForConditionalGeneration if request.param == "qwen2_vl"
                 else transformers.Qwen2_5_VLForConditionalGeneration)
    return path, family.load_encoder(path), ref_class


def _micro(batch, a=0):
    return {k: v[a] for k, v in batch.as_dict().items()}


def _loss(model, micro):
    logits = model(jnp.asarray(micro["input_ids"]), jnp.asarray(micro["pixel_values"]),
                   jnp.asarray(micro["attention_mask"]), image_grid_thw=jnp.asarray(micro["image_grid_thw"]))
    return token_loss(logits, jnp.asarray(micro["labels"]))


def _torch_loss(ref, micro, image_token_id):
    """transformers' loss on the same rows, its own layout: every image's patch rows concatenated."""
    grid = micro["image_grid_thw"]
    patches = np.concatenate([micro["pixel_values"][i, : int(np.prod(g))] for i, g in enumerate(grid)])
    ids = torch.tensor(micro["input_ids"], dtype=torch.long)
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=torch.tensor(micro["attention_mask"], dtype=torch.long),
                   pixel_values=torch.tensor(patches), image_grid_thw=torch.tensor(grid, dtype=torch.long),
                   mm_token_type_ids=(ids == image_token_id).int(),
                   labels=torch.tensor(micro["labels"], dtype=torch.long)).loss.item()


def test_training_batch_loss_matches_transformers(checkpoint, data):
    """Images of different sizes: the token ids are the processor's, each row's patch block and grid are
    its image's, the batch loss equals transformers', and a row's loss does not depend on its batch-mates
    or on the patch padding."""
    path, enc, ref_class = checkpoint
    _, _, samples = data
    examples, skipped = build_examples(samples[:4], enc)
    assert not skipped
    counts = [int((e.input_ids == enc.image_token_id).sum()) for e in examples]
    assert len(set(counts)) == 4, counts
    for e in examples:
        prompt = enc.encode([load_image(e.sample.image_path)], [e.sample.question]).input_ids[0]
        np.testing.assert_array_equal(e.input_ids[: len(prompt)], prompt)
        assert (e.labels[: len(prompt)] == IGNORE).all() and (e.labels[len(prompt):] != IGNORE).all()
    batch = BatchLoader(examples, enc, batch_size=4, grad_accum=1, seed=0).make_batch(np.arange(4))
    micro = _micro(batch)
    grid = micro["image_grid_thw"]
    assert micro["pixel_values"].shape[:2] == (4, enc.patch_bucket) and grid.shape == (4, 3)
    unit = enc.merge_size**2
    np.testing.assert_array_equal(np.prod(grid, axis=1) // unit, counts)
    for i, g in enumerate(grid):  # zero rows past each image's patches
        assert not micro["pixel_values"][i, int(np.prod(g)):].any() and micro["pixel_values"][i, 0].any()

    model, _ = family.load_model(path, attn_impl="xla")
    total, count = _loss(model, micro)
    ref = ref_class.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    theirs = _torch_loss(ref, micro, enc.image_token_id)
    assert abs(float(total / count) - theirs) < 1e-5 * abs(theirs), (float(total / count), theirs)

    # one row alone, its patches padded to 512 rows instead of the batch's 256
    one = BatchLoader(examples[1:2], enc, batch_size=1, grad_accum=1, seed=0).make_batch([0])
    alone = _micro(one)
    alone["pixel_values"] = np.pad(alone["pixel_values"], ((0, 0), (0, 256), (0, 0)))
    row_total, _ = _loss(model, alone)
    row_in_batch, _ = _loss(model, {k: v[1:2] for k, v in micro.items()})
    np.testing.assert_allclose(float(row_total), float(row_in_batch), rtol=1e-5)
