"""LoRA fine-tuning loop: optax AdamW on the LoRA params only, jitted, resumable with orbax.

The model is split with nnx filters into (graphdef, trainable, frozen): trainable = every
`nnx.LoRAParam` (plus the projector's `nnx.Param`s with ``train_projector``), kept as a float32
master copy; frozen = everything else, in the model's dtype (bfloat16 compute keeps the frozen
weights in bfloat16). Only `trainable` reaches `jax.grad` and optax; frozen weights are never
touched, so they stay bit-identical.

One jitted step = ``grad_accum`` micro-batches scanned with `lax.scan` (one micro-batch of
activations alive at a time), summed token losses and gradients, divided by the number of answer
tokens of the whole step (the mean cross-entropy over the step's answer tokens, float32 logits),
then clip_by_global_norm + AdamW with warmup and linear or cosine decay to 0 (the schedules of
transformers' get_linear/cosine_schedule_with_warmup, evaluated on the host: the step takes the
learning rate as an argument). The jitted step's static arguments are the graphdef and a hashable
AdamW config, so runs with the same shapes share compiled code whatever their length.

Orbax checkpoints in workdir/checkpoints every ``checkpoint_every`` steps and at the end hold the
trainable params, the optimizer state, the step and the data-order seed; a rerun with the same
workdir resumes from the latest one (the data order is a pure function of seed and epoch, so the
result equals an uninterrupted run's).

Over several processes (bye_jax/multihost.py) the mesh spans every process's devices: each process
builds the same global batch (same seed) and contributes its rows of it
(`jax.make_array_from_process_local_data`), orbax writes the checkpoints collectively (every process
calls save / restore; resuming works with another process count), process 0 alone writes the log,
and the trained parameters come back whole to every process (`multihost.host_local`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bye_jax import multihost
from bye_jax.data.llava_json import Sample
from bye_jax.jsonio import dump_json
from bye_jax.models.family import family_of
from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.lora import add_lora, iter_dense, lora_paths
from bye_jax.parallel import placement
from bye_jax.progress import progress as progress_bar
from bye_jax.train.curves import epoch_losses, read_log
from bye_jax.train.data import IGNORE, BatchLoader, build_examples

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"


# ------------------------------------------------------------------------------------ config

def default_config():
    from bye_jax.configs.train import get_config

    return get_config()


def resolve_config(config=None):
    """The train config defaults (bye_jax/configs/train.py) overridden by whatever `config` has."""
    out = default_config()

    def merge(dst, src):
        for key in list(dst.keys()):
            try:
                has = key in src
            except TypeError:
                has = False
            if not has:
                continue
            if hasattr(dst[key], "keys") and hasattr(src[key], "keys"):
                merge(dst[key], src[key])
            else:
                dst[key] = src[key]

    if config is not None:
        with out.unlocked():
            merge(out, config)
    return out


def check_config(config) -> None:
    """Raises ValueError with a one-line reason for an unusable train config."""
    checks = [
        (config.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {config.dtype!r}"),
        (config.lora.rank >= 1, f"lora.rank must be >= 1, got {config.lora.rank}"),
        (config.lora.alpha > 0, f"lora.alpha must be > 0, got {config.lora.alpha}"),
        (config.lr > 0, f"lr must be > 0, got {config.lr}"),
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}"),
        (config.grad_accum >= 1, f"grad_accum must be >= 1, got {config.grad_accum}"),
        (0 <= config.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}"),
        (config.schedule in ("linear", "cosine"), f"schedule must be linear or cosine, got {config.schedule!r}"),
        (not config.train_vision or config.full_finetune, "train_vision needs full_finetune"),
        (config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}"),
        (config.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {config.checkpoint_every}"),
        (config.attn_impl in ("auto", "xla", "cudnn"), f"attn_impl must be auto, xla or cudnn, got "
                                                       f"{config.attn_impl!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """Hashable AdamW / clipping settings (a static argument of the jitted step). The learning
    rate is not in here: the schedule is evaluated on the host and passed to each step."""

    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    @classmethod
    def from_config(cls, config) -> OptConfig:
        return cls(weight_decay=float(config.weight_decay), max_grad_norm=float(config.max_grad_norm))


def learning_rate(lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "linear") -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then linear or cosine decay to 0 at total_steps
    (transformers' get_linear / get_cosine_schedule_with_warmup)."""
    warm = max(0, min(int(warmup_steps), int(total_steps)))
    decay = max(1, int(total_steps) - warm)
    if schedule == "cosine":
        tail = optax.cosine_decay_schedule(lr, decay, alpha=0.0)
    else:
        tail = optax.linear_schedule(lr, 0.0, decay)
    if warm == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), tail], [warm])


def schedule_from_config(config, total_steps: int) -> optax.Schedule:
    warmup = int(math.ceil(config.warmup_ratio * total_steps))
    return learning_rate(float(config.lr), total_steps, warmup, config.schedule)


def make_optimizer(opt: OptConfig, lr) -> optax.GradientTransformation:
    """clip_by_global_norm + AdamW at learning rate `lr` (a float or a traced scalar); no weight decay
    on 1-D params (biases), as transformers' Trainer."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), adamw)
    return adamw


def trainable_filter(train_projector: bool, full_finetune: bool = False, train_vision: bool = False,
                     train_lm_head: bool = False, *, vision_module: str = "vision_tower",
                     projector_module: str | None = "multi_modal_projector"):
    """nnx filter of the differentiated params: LoRA (+ the projector's and / or the output layer's
    weights, trained in full); with `full_finetune`, every weight outside the vision tower (and the
    vision tower's too with `train_vision`) and no LoRA. Module names: the family's (bye_jax/models/family.py)."""
    if full_finetune:
        if train_vision:
            return nnx.Param
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(vision_module)))
    if train_projector and projector_module is None:
        raise ValueError("train_projector: this model family has no separate projector module to train")
    full = [name for name, on in ((projector_module, train_projector), ("lm_head", train_lm_head)) if on]
    if full:
        return nnx.Any(nnx.LoRAParam, *(nnx.All(nnx.Param, nnx.PathContains(name)) for name in full))
    return nnx.LoRAParam


# -------------------------------------------------------------------------------------- step

def token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy, number of target tokens); labels unshifted with IGNORE, float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def _micro_loss(graphdef, trainable, frozen, micro):
    model = nnx.merge(graphdef, trainable, frozen)
    extra = {k: v for k, v in micro.items() if k not in ("input_ids", "pixel_values", "attention_mask", "labels")}
    logits = model(micro["input_ids"], micro["pixel_values"], micro["attention_mask"], **extra)
    return token_loss(logits, micro["labels"])


@partial(jax.jit, static_argnames=("graphdef", "opt"), donate_argnames=("trainable", "opt_state"))
def train_step(graphdef, opt: OptConfig, trainable, frozen, opt_state, batch, lr):
    """One optimizer step over batch arrays [grad_accum, batch_size, ...] at learning rate `lr`."""
    grad_fn = jax.value_and_grad(partial(_micro_loss, graphdef), has_aux=True)

    def body(carry, micro):
        grads, loss, count = carry
        (micro_loss, n), g = grad_fn(trainable, frozen, micro)
        return (jax.tree.map(jnp.add, grads, g), loss + micro_loss, count + n), None

    init = (jax.tree.map(jnp.zeros_like, trainable), jnp.float32(0), jnp.float32(0))
    (grads, loss, count), _ = jax.lax.scan(body, init, batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = make_optimizer(opt, lr).update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = {"loss": loss / denom, "target_tokens": count, "grad_norm": grad_norm}
    return trainable, opt_state, metrics


# ------------------------------------------------------------------------------- checkpoints

def _fingerprint(examples) -> str:
    """Hash of the examples' ids, tokens and labels (a resumed run must see the same data)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.sample.id.encode() + b"\0")
        h.update(e.input_ids.tobytes())
        h.update(e.labels.tobytes())
    return h.hexdigest()[:16]


def _run_meta(config, loader: BatchLoader, total: int) -> dict:
    return {"seed": int(config.seed), "total_steps": int(total), "steps_per_epoch": loader.steps_per_epoch,
            "n_examples": len(loader.examples), "examples": _fingerprint(loader.examples),
            "batch_size": int(config.batch_size), "grad_accum": int(config.grad_accum),
            "lora_rank": int(config.lora.rank), "lora_alpha": float(config.lora.alpha),
            "lora_target": str(config.lora.target), "train_projector": bool(config.train_projector),
            "full_finetune": bool(config.full_finetune),
            "lr": float(config.lr), "schedule": str(config.schedule)} | (
                {"train_vision": True} if config.train_vision else {}) | (
                {"train_lm_head": True} if config.train_lm_head else {})


def _manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True)
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).resolve(), options=options)


def _save(mngr: ocp.CheckpointManager, step: int, trainable, opt_state, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": trainable, "opt_state": opt_state}),
        meta=ocp.args.JsonSave({**meta, "step": int(step)})), force=True)


def _restore(mngr: ocp.CheckpointManager, step: int, trainable, opt_state, meta: dict):
    saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    diff = [k for k in meta if saved.get(k) != meta[k]]
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {meta[k]!r}" for k in diff[:4])
        raise ValueError(f"{mngr.directory} holds a run with other settings or data ({details}); "
                         "use a new workdir")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            {"params": trainable, "opt_state": opt_state})
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return state["params"], state["opt_state"]


def _truncate_log(path: Path, step: int) -> None:
    """Drops log records after `step` (written by an interrupted run after its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


# -------------------------------------------------------------------------------------- loop

def train(model, cfg, samples: Sequence[Sample], encoder: PromptEncoder, *, config, workdir,
          progress: bool = True, callback: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tunes `model` in place (adds LoRA adapters if it has none); returns metrics.

    metrics: losses (one per step run in this call), epoch_losses (mean per epoch over the whole run,
    resumed steps included, from workdir/train_log.jsonl), start_step, total_steps, steps_per_epoch,
    n_examples, skipped [(id, reason)], seconds, tokens_per_s / target_tokens_per_s (steps after
    the first of this call, which includes compilation). `callback(step, step_metrics)` runs after
    every step (after its checkpoint, if any). The model's trainable params are written back at
    the end (also when interrupted).
    """
    config = resolve_config(config)
    check_config(config)
    fam = family_of(model)
    trained = trainable_filter(config.train_projector, config.full_finetune, config.train_vision,
                               config.train_lm_head, vision_module=fam.vision_module,
                               projector_module=fam.projector_module)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if encoder.image_token_id != cfg.image_token_id:
        raise ValueError(f"processor image token {encoder.image_token_id} != model image_token_id "
                         f"{cfg.image_token_id}")
    if not config.full_finetune and not lora_paths(model):
        add_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, target=config.lora.target,
                 rngs=nnx.Rngs(params=int(config.seed)))
    scale = float(config.lora.alpha) / float(config.lora.rank)
    for path, dense in iter_dense(model):
        if dense.lora_a is not None and (dense.lora_a.shape[1] != config.lora.rank
                                         or not math.isclose(dense.lora_scale, scale, rel_tol=1e-6)):
            raise ValueError(f"{path}: the model's adapter (rank {dense.lora_a.shape[1]}, scale {dense.lora_scale}) "
                             f"does not match config.lora (rank {config.lora.rank}, alpha {config.lora.alpha})")
    pixels = config.data.max_image_pixels or None
    examples, skipped = build_examples(samples, encoder, max_length=config.max_length or None,
                                       max_image_pixels=pixels)
    if not examples:
        raise ValueError(f"no usable training example ({len(skipped)} skipped"
                         + (f", first: {skipped[0].reason}" if skipped else "") + ")")
    loader = BatchLoader(examples, encoder, batch_size=config.batch_size, grad_accum=config.grad_accum,
                         seed=config.seed, length_bucket=config.length_bucket, max_image_pixels=pixels)
    total = loader.steps_per_epoch * int(config.epochs)
    opt = OptConfig.from_config(config)
    schedule = schedule_from_config(config, total)

    model.language_model.remat = bool(config.remat)
    graphdef, trainable, frozen = nnx.split(model, trained, ...)
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)  # float32 master copy
    # Several devices: every micro-batch ([grad_accum, batch, ...]) is split over the mesh (data
    # parallel; jit's sharding propagation inserts the gradient all-reduce), params replicated or
    # split over 'fsdp'. One device: nothing moves.
    place = placement(config.mesh.data, config.mesh.fsdp, config.batch_size, batch_axis=1,
                      tensor=config.mesh.get("tensor", 1))
    if place.params is not None:
        put = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, x: jax.device_put(x, place.params(path, x.shape)), tree)
        trainable, frozen = put(trainable), put(frozen)
    opt_state = make_optimizer(opt, 0.0).init(trainable)
    if place.batch is not None:  # the optimizer's step counters replicated on the mesh, as the step returns
        replicated = NamedSharding(place.batch.mesh, PartitionSpec())  # them (else step 2 compiles again)
        opt_state = jax.tree.map(
            lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), opt_state)
    meta = _run_meta(config, loader, total)
    mngr = _manager(workdir, config.keep_checkpoints)
    start = mngr.latest_step() or 0
    if start:
        trainable, opt_state = _restore(mngr, start, trainable, opt_state, meta)
    primary = multihost.is_primary()  # writes the log; the checkpoints are written by every process together

    losses: list[float] = []
    tokens = target_tokens = 0
    t_first = t_last = None
    t0 = time.time()
    if primary:
        _truncate_log(workdir / LOG_FILE, start)
    bar = progress_bar(total, "train", unit="step", initial=start, enabled=progress and primary)
    batches = loader.batches(start, total)
    try:
        with open(workdir / LOG_FILE, "a", encoding="utf-8") if primary else contextlib.nullcontext() as log:
            for step, batch in batches:
                arrays = {k: place.put_batch(v) for k, v in batch.as_dict().items()}
                lr = float(schedule(step))
                trainable, opt_state, m = train_step(graphdef, opt, trainable, frozen, opt_state, arrays,
                                                     np.float32(lr))
                loss = float(m["loss"])
                now = t_last = time.time()
                if t_first is None:
                    t_first = now
                else:
                    tokens += batch.num_tokens
                    target_tokens += batch.num_target_tokens
                losses.append(loss)
                record = {"step": step + 1, "loss": loss, "lr": lr,
                          "grad_norm": float(m["grad_norm"]), "tokens": batch.num_tokens,
                          "target_tokens": batch.num_target_tokens, "seconds": round(now - t0, 3)}
                if primary:
                    log.write(dump_json(record) + "\n")  # strict: a NaN loss is null
                    log.flush()
                every = int(config.checkpoint_every)
                if step + 1 == total or (every and (step + 1) % every == 0):
                    _save(mngr, step + 1, trainable, opt_state, meta)
                rate = tokens / (now - t_first) if tokens else float("nan")
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
                bar.update(1)
                if callback is not None:
                    callback(step + 1, record)
    finally:
        batches.close()
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        nnx.update(model, multihost.host_local(trainable))  # whole on every process (exported by process 0)
        model.language_model.remat = False
    span = (t_last - t_first) if tokens else float("nan")
    skipped += loader.skipped
    return {
        "losses": losses, "epoch_losses": epoch_losses(read_log(workdir / LOG_FILE), loader.steps_per_epoch)
        if primary else [],
        "start_step": start, "total_steps": total, "steps_per_epoch": loader.steps_per_epoch,
        "n_examples": len(examples), "skipped": [(s.id, s.reason) for s in skipped],
        "seconds": time.time() - t0, "tokens_per_s": tokens / span if tokens else float("nan"),
        "target_tokens_per_s": target_tokens / span if tokens else float("nan"),
        "checkpoint_dir": str(workdir / CHECKPOINT_DIR),
    }
