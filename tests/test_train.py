"""LoRA fine-tuning: example encoding and label mask, deterministic batches, the jitted step (only
LoRA params move), loss going down, orbax checkpoint / resume, bf16 compute, and `finetune` end to
end (merged HF checkpoint + PEFT adapter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_checkpoints import make_tiny_image

from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.models.family import load_model
from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.lora import add_lora, lora_paths
from bye_jax.runner import UserError
from bye_jax.train.data import IGNORE, BatchLoader, build_examples
from bye_jax.train.loop import CHECKPOINT_DIR, LOG_FILE, default_config, learning_rate, train

QUESTIONS = ["what color is the big square", "how many dogs are there", "is the cat on the left or on the right",
             "what is the man holding"]
ANSWERS = ["red", "two", "the cat is on the left", "a blue sign", "yes", "green", "no", "three dogs"]
N = 8


def write_dataset(root, n=N):
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        make_tiny_image(100 + i, (36 + 2 * i, 30 + i)).save(root / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
            {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json", root / "images"


def small_config(**overrides):
    c = default_config()
    c.lora.rank, c.lora.alpha = 8, 16.0
    c.lr, c.epochs, c.batch_size, c.grad_accum = 5e-3, 10, 2, 2  # 8 examples -> 2 steps per epoch
    c.warmup_ratio, c.length_bucket, c.checkpoint_every = 0.1, 32, 0
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_llava_dir):
    ann, images = write_dataset(tmp_path_factory.mktemp("train_data"))
    samples, skipped = load_dataset(ann, images)
    assert not skipped
    return ann, images, samples, PromptEncoder(tiny_llava_dir)


def _snapshot(model):
    return jax.tree.map(lambda x: np.array(x), nnx.state(model))


def _restore(model, snap):
    nnx.update(model, jax.tree.map(jnp.asarray, snap))


def _params(model, filt):
    return {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


@pytest.fixture(scope="module")
def lora_model(tiny_llava_dir):
    """One model reused by the runs below (same graph -> the jitted step compiles once)."""
    model, cfg = load_model(tiny_llava_dir)
    add_lora(model, rank=8, alpha=16, rngs=nnx.Rngs(0))
    return model, cfg, _snapshot(model)


@pytest.fixture(scope="module")
def uninterrupted(lora_model, data, tmp_path_factory):
    model, cfg, init = lora_model
    _, _, samples, enc = data
    _restore(model, init)
    metrics = train(model, cfg, samples, enc, config=small_config(), workdir=tmp_path_factory.mktemp("run_a"),
                    progress=False)
    return metrics, _params(model, nnx.LoRAParam), _params(model, nnx.Not(nnx.LoRAParam))


# ------------------------------------------------------------------------------------------- data

def test_labels_cover_only_the_answer_and_eos(data):
    _, _, samples, enc = data
    examples, skipped = build_examples(samples, enc)
    assert len(examples) == N and not skipped
    for ex in examples[:4]:
        s = ex.sample
        image = load_image(s.image_path)
        # The prompt is exactly the extraction prompt; the whole sequence is what the processor makes of
        # prompt + " " + answer, plus EOS.
        prompt = enc.encode([image], [s.question]).input_ids[0].tolist()
        full = enc.processor(images=[image], text=[enc.prompt_text(s.question) + " " + s.answer],
                             return_tensors=None)["input_ids"][0]
        assert ex.input_ids.tolist() == list(full) + [enc.eos_token_id]
        assert ex.input_ids[: len(prompt)].tolist() == prompt
        target = ex.labels != IGNORE
        assert not target[: len(prompt)].any() and target[len(prompt):].all()
        np.testing.assert_array_equal(ex.labels[target], ex.input_ids[target])
        decoded = enc.tokenizer.decode(ex.input_ids[target].tolist(), skip_special_tokens=False)
        assert decoded.replace(" ", "") == s.answer.replace(" ", "") + "</s>"
        assert enc.tokenizer.decode(ex.input_ids[target][:-1].tolist()) == s.answer


def test_unusable_examples_are_skipped(data):
    _, _, samples, enc = data
    no_answer = type(samples[0])(**{**samples[0].__dict__, "id": "empty", "answer": ""})
    examples, skipped = build_examples([no_answer, *samples[:2]], enc, max_length=8)
    assert [s.id for s in skipped] == ["empty", "s0", "s1"]
    assert "no answer" in skipped[0].reason and "max_length" in skipped[1].reason and not examples
    examples, _ = build_examples(samples[:1], enc, max_length=len(build_examples(samples[:1], enc)[0][0].input_ids) - 1)
    assert (examples[0].labels != IGNORE).sum() == 1 + len(enc.tokenizer(" " + samples[0].answer,
                                                                         add_special_tokens=False)["input_ids"]) - 1


def test_batches_are_deterministic_padded_and_bucketed(data):
    _, _, samples, enc = data
    examples, _ = build_examples(samples[:7], enc)
    loader = lambda seed: BatchLoader(examples, enc, batch_size=2, grad_accum=2, seed=seed, length_bucket=16)  # noqa: E731
    a, b, c = loader(0), loader(0), loader(1)
    assert a.steps_per_epoch == 2
    orders = [[x.tolist() for x in a.order(e)] for e in range(3)]
    assert orders == [[x.tolist() for x in b.order(e)] for e in range(3)]
    assert orders != [[x.tolist() for x in c.order(e)] for e in range(3)]
    assert orders[0] != orders[1]
    for order in orders:
        assert sorted(i for step in order for i in step) == list(range(7))
    steps = list(a.steps(1, 5))
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    assert [i.tolist() for _, i in steps] == [*orders[0][1:], *orders[1], orders[2][0]]

    short = next(idx for idx in a.order(0) if len(idx) == 3)
    batch = a.make_batch(short)
    assert batch.input_ids.shape[:2] == (2, 2) and batch.input_ids.shape[2] % 16 == 0
    assert batch.pixel_values.shape[:2] == (2, 2)
    ids, mask, labels = (x.reshape(4, -1) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    for r in range(4):
        n = int(mask[r].sum())
        assert mask[r, :n].all() and not mask[r, n:].any(), "right padding"
        assert np.all(ids[r, n:] == enc.pad_token_id) and np.all(labels[r, n:] == IGNORE)
    assert np.all(labels[3] == IGNORE), "the filler row carries no loss"
    assert batch.ids == [examples[i].sample.id for i in short]
    again = b.make_batch(short)
    for x, y in zip(batch.as_dict().values(), again.as_dict().values(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_learning_rate_schedules():
    lin = learning_rate(1.0, total_steps=10, warmup_steps=2)
    np.testing.assert_allclose([float(lin(s)) for s in range(11)],
                               [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0], atol=1e-6)
    cos = learning_rate(1.0, total_steps=10, warmup_steps=2, schedule="cosine")
    np.testing.assert_allclose([float(cos(s)) for s in (0, 2, 6, 10)], [0, 1, 0.5, 0], atol=1e-6)


# ------------------------------------------------------------------------------------------ train

def test_only_lora_params_move_and_loss_goes_down(lora_model, uninterrupted):
    _, _, init = lora_model
    metrics, lora_after, frozen_after = uninterrupted
    losses = metrics["losses"]
    assert metrics["total_steps"] == 20 and len(losses) == 20 and metrics["start_step"] == 0
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:2]), losses
    flat_init = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(init)}
    assert frozen_after, "frozen params"
    for p, v in frozen_after.items():
        np.testing.assert_array_equal(v, flat_init[p], err_msg="/".join(map(str, p)))
    moved = [p for p, v in lora_after.items() if not np.array_equal(v, flat_init[p])]
    assert len(moved) == len(lora_after) == 2 * 14
    assert metrics["tokens_per_s"] > 0


def test_resume_from_checkpoint_equals_uninterrupted(lora_model, data, uninterrupted, tmp_path):
    model, cfg, init = lora_model
    _, _, samples, enc = data
    config = small_config(checkpoint_every=10)

    class Killed(Exception):
        pass

    def kill(step, record):
        if step == 13:  # three steps after the checkpoint at 10: they are lost and redone
            raise Killed

    _restore(model, init)
    with pytest.raises(Killed):
        train(model, cfg, samples, enc, config=config, workdir=tmp_path, progress=False, callback=kill)
    assert (tmp_path / CHECKPOINT_DIR / "10").is_dir() and not (tmp_path / CHECKPOINT_DIR / "13").exists()
    assert len((tmp_path / LOG_FILE).read_text().splitlines()) == 13

    _restore(model, init)  # a new process starts from the same base model
    metrics = train(model, cfg, samples, enc, config=config, workdir=tmp_path, progress=False)
    ref_metrics, ref_lora, _ = uninterrupted
    assert metrics["start_step"] == 10 and len(metrics["losses"]) == 10
    np.testing.assert_allclose(metrics["losses"], ref_metrics["losses"][10:], rtol=1e-6)
    lora = _params(model, nnx.LoRAParam)
    for p, v in ref_lora.items():
        np.testing.assert_allclose(lora[p], v, rtol=1e-6, atol=1e-7, err_msg="/".join(map(str, p)))
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))

    # A finished run resumes to nothing; other settings in the same workdir are refused.
    done = train(model, cfg, samples, enc, config=config, workdir=tmp_path, progress=False)
    assert done["start_step"] == 20 and done["losses"] == []
    with pytest.raises(ValueError, match="other settings"):
        train(model, cfg, samples, enc, config=small_config(seed=1), workdir=tmp_path, progress=False)


def test_remat_gives_the_same_training_and_checkpoints_each_layer(lora_model, data, uninterrupted, tmp_path):
    model, cfg, init = lora_model
    _, _, samples, enc = data
    _restore(model, init)
    model.language_model.remat = True
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    size = cfg.vision.image_size
    batch = (jnp.zeros((1, 40), jnp.int32), jnp.zeros((1, 3, size, size)), jnp.ones((1, 40), jnp.int32))

    def loss(lora):
        return nnx.merge(graphdef, lora, rest)(*batch).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(lora))
    assert jaxpr.count("remat") + jaxpr.count("checkpoint") >= cfg.text.num_layers, "no rematerialised layers"
    model.language_model.remat = False

    metrics = train(model, cfg, samples, enc, config=small_config(remat=True), workdir=tmp_path, progress=False)
    assert model.language_model.remat is False  # switched off again after training
    ref_metrics, ref_lora, _ = uninterrupted
    np.testing.assert_allclose(metrics["losses"], ref_metrics["losses"], rtol=1e-5)
    lora = _params(model, nnx.LoRAParam)
    for p, v in ref_lora.items():
        np.testing.assert_allclose(lora[p], v, rtol=1e-4, atol=1e-6, err_msg="/".join(map(str, p)))


def test_data_parallel_on_two_devices_equals_one_device(tiny_llava_dir, data, uninterrupted, tmp_path):
    """The same run on a 2-device CPU mesh (a subprocess: the device count is fixed at jax start-up)."""
    ann, images, _, _ = data
    script = f"""
import sys
import jax, numpy as np
from flax import nnx
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_train import _params, small_config
from bye_jax.data.llava_json import load_dataset
from bye_jax.models.family import load_model
from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.lora import add_lora
from bye_jax.train.loop import train
assert jax.device_count() == 2
samples, _ = load_dataset({str(ann)!r}, {str(images)!r})
model, cfg = load_model({str(tiny_llava_dir)!r})
add_lora(model, rank=8, alpha=16, rngs=nnx.Rngs(0))
m = train(model, cfg, samples, PromptEncoder({str(tiny_llava_dir)!r}), config=small_config(**{{"mesh.data": 2}}),
          workdir={str(tmp_path / "run")!r}, progress=False)
leaf = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))[0]
assert len(leaf.sharding.device_set) == 2, leaf.sharding
lora = {{"/".join(map(str, p)): v for p, v in _params(model, nnx.LoRAParam).items()}}
np.savez({str(tmp_path / "out.npz")!r}, losses=np.array(m["losses"]), **lora)
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    ref_metrics, ref_lora, _ = uninterrupted
    np.testing.assert_allclose(out["losses"], ref_metrics["losses"], rtol=1e-5)
    for p, v in ref_lora.items():
        np.testing.assert_allclose(out["/".join(map(str, p))], v, rtol=1e-4, atol=1e-6, err_msg="/".join(map(str, p)))


def test_mesh_that_does_not_fit_the_devices_is_refused(lora_model, data, tmp_path):
    model, cfg, _ = lora_model
    _, _, samples, enc = data
    with pytest.raises(ValueError, match="mesh: .*does not cover"):
        train(model, cfg, samples, enc, config=small_config(**{"mesh.data": 3}), workdir=tmp_path, progress=False)


def test_bf16_compute_keeps_float32_lora_and_frozen_weights(tiny_llava_dir, data, tmp_path):
    _, _, samples, enc = data
    model, cfg = load_model(tiny_llava_dir, dtype="bfloat16")
    frozen = _params(model, nnx.Param)
    metrics = train(model, cfg, samples, enc, config=small_config(dtype="bfloat16", epochs=1), workdir=tmp_path,
                    progress=False)
    assert len(metrics["losses"]) == 2 and np.all(np.isfinite(metrics["losses"]))
    lora = _params(model, nnx.LoRAParam)
    assert lora and all(v.dtype == np.float32 for v in lora.values())
    after = _params(model, nnx.Not(nnx.LoRAParam))
    for p, v in frozen.items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(after[p], v)


def test_full_finetune_trains_language_model_and_projector_but_not_vision(tiny_llava_dir, data, tmp_path):
    _, _, samples, enc = data
    model, cfg = load_model(tiny_llava_dir)
    before = _params(model, nnx.Param)
    metrics = train(model, cfg, samples, enc, config=small_config(full_finetune=True, epochs=3, lr=3e-3),
                    workdir=tmp_path, progress=False)
    assert not lora_paths(model)
    after = _params(model, nnx.Param)
    assert after.keys() == before.keys()
    for p, v in before.items():
        moved = not np.array_equal(after[p], v)
        assert moved == (p[0] != "vision_tower"), p
    assert metrics["losses"][-1] < metrics["losses"][0]


def test_lora_with_train_lm_head_trains_lora_and_output_layer_only(tiny_llava_dir, data, tmp_path):
    _, _, samples, enc = data
    model, cfg = load_model(tiny_llava_dir)
    before = _params(model, nnx.Param)
    train(model, cfg, samples, enc, config=small_config(train_lm_head=True, epochs=2, lr=3e-3),
          workdir=tmp_path, progress=False)
    after = _params(model, nnx.Not(nnx.LoRAParam))
    assert after.keys() == before.keys() and lora_paths(model)
    for p, v in before.items():
        assert (not np.array_equal(after[p], v)) == (p[0] == "lm_head"), p


def test_train_vision_needs_full_finetune(tiny_llava_dir, data, tmp_path):
    _, _, samples, enc = data
    model, cfg = load_model(tiny_llava_dir)
    with pytest.raises(ValueError, match="train_vision needs full_finetune"):
        train(model, cfg, samples, enc, config=small_config(train_vision=True), workdir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------- end to end

def test_finetune_cli_writes_merged_checkpoint_and_adapter(tiny_llava_dir, data, tmp_path, capsys):
    from bye_jax.train.main import _run

    ann, images, _, _ = data
    config = small_config(epochs=2, checkpoint_every=3, train_projector=True)
    with config.unlocked():
        config.model = str(tiny_llava_dir)
        config.data.annotations, config.data.image_root = str(ann), str(images)
    assert _run(config, str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "4 steps" in out and "merged model" in out
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert metrics["export_dtype"] == "float32" and len(metrics["losses"]) == 4
    assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir() if p.name.isdigit()) == ["3", "4"]

    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16 and adapter["modules_to_save"] == ["multi_modal_projector"]
    merged, _ = load_model(tmp_path / "merged")
    assert lora_paths(merged) == []
    base, _ = load_model(tiny_llava_dir)
    new, old = _params(merged, nnx.Param), _params(base, nnx.Param)
    changed = {"/".join(map(str, p)) for p in old if not np.array_equal(new[p], old[p])}
    assert any("multi_modal_projector" in c for c in changed)
    assert all(c.startswith(("language_model/layers", "multi_modal_projector")) for c in changed)
    assert sum(c.endswith("q_proj/kernel") for c in changed) == 2

    # Rerunning finds the final checkpoint and only re-exports.
    assert _run(config, str(tmp_path)) == 0
    assert "resumed at 4" in capsys.readouterr().out
    with config.unlocked():
        config.model = ""
    with pytest.raises(UserError, match="config.model"):
        _run(config, str(tmp_path))


def test_epoch_losses_and_loss_curve(tmp_path):
    import json

    from bye_jax.train.curves import epoch_losses, plot_loss_curve, read_log

    log = tmp_path / "train_log.jsonl"
    rows = [{"step": s, "loss": float(s), "lr": 1e-3} for s in (3, 1, 2, 4, 5)]  # out of order; epochs of 2 steps
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4, 5]
    assert epoch_losses(read_log(log), 2) == [1.5, 3.5, 5.0]
    png = plot_loss_curve(log, tmp_path / "loss.png", 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
