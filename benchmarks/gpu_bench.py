r"""GPU throughput and memory of bye_jax vs transformers (+ PEFT) at the LLaVA-1.5-7B shape.

Random weights (nothing downloaded), the exact llava-1.5-7b-hf architecture, bfloat16:

* extract: the jitted probe prefill + entropy step the extractor runs (`extract._entropy_step`),
  616-token prompts (576 image tokens), batch 48, attention through XLA and through cuDNN; peak GPU
  memory beyond the weights; the two attention paths' entropies compared.
* memory: the compiled extraction steps' buffer sizes (XLA `memory_analysis()`), lowered from
  abstract shapes (no weights allocated, so it also runs on a CPU as a proxy), with the probe-mode
  MLP chunking on and off (`LlamaModel.probe_mlp_chunk_bytes`).
* train: the jitted LoRA step (`train.loop.train_step`): rank 128, alpha 256, every linear layer of
  the language model, AdamW, batch 8 x 640 tokens; with and without gradient checkpointing.
* torch: the reference loop (transformers, eager attention, output_attentions, batch 1), a plain
  SDPA forward at batch 32, and PEFT LoRA training with the same settings (with and without
  gradient checkpointing), on the same GPU in the same run.

Each phase runs in its own process (clean peak-memory readings; a crash loses one phase) and
appends one JSON record to OUT/gpu_bench.jsonl.

    python benchmarks/gpu_bench.py --out OUT [--phases extract,train,torch] [--budget 480]
    python benchmarks/gpu_bench.py --tiny --out /tmp/gb   # CPU smoke test of the script itself
    python benchmarks/gpu_bench.py --out /tmp/gb --phases memory  # 7B-shape buffer sizes (CPU: a proxy)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def hf_config(tiny: bool):
    import transformers

    if tiny:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=56, patch_size=14)
        text = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
        image_token = 300
    else:  # llava-hf/llava-1.5-7b-hf
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14)
        text = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32)
        image_token = 32000
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                                    projection_dim=768, **vision),
        text_config=transformers.LlamaConfig(rms_norm_eps=1e-5, max_position_embeddings=4096,
                                             hidden_act="silu", bos_token_id=1, eos_token_id=2,
                                             tie_word_embeddings=False, **text),
        image_token_index=image_token, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(vision["image_size"] // 14) ** 2,
        tie_word_embeddings=False)


def shapes(args, hf):
    n_img = (hf.vision_config.image_size // hf.vision_config.patch_size) ** 2
    return dict(n_img=n_img, prompt=n_img + (8 if args.tiny else 40), train_len=n_img + (16 if args.tiny else 64),
                extract_batch=4 if args.tiny else 48, train_batch=2 if args.tiny else 8,
                ref_batch=4 if args.tiny else 32, rank=8 if args.tiny else 128)


def token_batch(rng, batch, length, n_img, image_token, vocab):
    """[bos, 4 text tokens, n_img image tokens, text ...] ids (no padding) and an all-ones mask."""
    import numpy as np

    ids = rng.integers(3, min(image_token, vocab), size=(batch, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 5:5 + n_img] = image_token
    return ids, np.ones((batch, length), np.int32)


def record(args, phase: str, **values) -> None:
    values = {"phase": phase, **values}
    print(json.dumps(values), flush=True)
    with open(Path(args.out) / "gpu_bench.jsonl", "a") as f:
        f.write(json.dumps(values) + "\n")


def timed(fn, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------ JAX phases

def jax_model(args, hf):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bye_jax.models.llava import LlavaForConditionalGeneration, from_hf_config

    cfg = from_hf_config(hf)
    t = time.perf_counter()
    model = LlavaForConditionalGeneration(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), attn_impl="xla")
    if args.tiny:  # tiny activations never reach the real chunking threshold: chunk at 1 KiB to exercise it
        model.language_model.probe_mlp_chunk_bytes = 1024
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    return model, cfg, weights, time.perf_counter() - t


def peak_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def set_attn_impl(model, impl: str) -> None:
    from flax import nnx

    for _, m in nnx.iter_modules(model):
        if hasattr(m, "attn_impl"):
            m.attn_impl = impl


def phase_extract(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bye_jax.extract import _entropy_step, _signal_step
    from bye_jax.signals import content_projection

    hf = hf_config(args.tiny)
    sh = shapes(args, hf)
    model, cfg, weights, t_init = jax_model(args, hf)
    rng = np.random.default_rng(0)
    ids, mask = token_batch(rng, sh["extract_batch"], sh["prompt"], sh["n_img"], cfg.image_token_id,
                            cfg.text.vocab_size)
    size = cfg.vision.image_size
    pixels = rng.standard_normal((sh["extract_batch"], 3, size, size)).astype(np.float32)
    ids, mask, pixels = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)
    side = cfg.vision.image_size // cfg.vision.patch_size
    grid, proj = (side, side), jnp.asarray(content_projection(cfg.text.hidden_size))
    prefix = jnp.full((sh["extract_batch"],), 2, jnp.int32)  # answer-prefix tokens ("ASSISTANT:")
    entropies = {}
    impls = ["xla"] if jax.default_backend() == "cpu" else args.impls.split(",")
    for impl in impls:
        set_attn_impl(model, impl)
        graphdef, state = nnx.split(model)

        def step(graphdef=graphdef, state=state):
            return _entropy_step(graphdef, state, ids, pixels, mask, ids == cfg.image_token_id, {})

        def signal_step(graphdef=graphdef, state=state, proj=proj, grid=grid):  # the signal table (extract now)
            return _signal_step(graphdef, state, ids, pixels, mask, ids == cfg.image_token_id, {}, proj, grid, prefix)

        try:
            t = time.perf_counter()
            out = jax.block_until_ready(step())
            compile_s = time.perf_counter() - t
            iters = 3 if args.tiny else 8
            seconds = timed(lambda: jax.block_until_ready(step()), iters)
        except Exception as e:  # noqa: BLE001 - report and go on with the other path
            record(args, "extract", attn=impl, error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        entropies[impl] = np.asarray(out)
        peak = peak_bytes()
        try:
            chunked = jax.block_until_ready(signal_step())["entropy"]
            sig_seconds = timed(lambda: jax.block_until_ready(signal_step()), iters)
            seconds = timed(lambda: jax.block_until_ready(step()), iters)  # again, right after: same conditions
            record(args, "extract_signals", attn=impl, batch=sh["extract_batch"],
                   samples_per_s=sh["extract_batch"] * iters / sig_seconds,
                   entropy_only_samples_per_s=sh["extract_batch"] * iters / seconds,
                   signals_cost_pct=round(100 * (sig_seconds / seconds - 1), 2),
                   peak_minus_weights_gib_after_both=None if (both := peak_bytes()) is None else (both - weights) / GIB)
            # The same signal step with the probe-mode MLP chunking off: its cost and its entropies.
            chunk_bytes = model.language_model.probe_mlp_chunk_bytes
            model.language_model.probe_mlp_chunk_bytes = 0
            off = nnx.split(model)
            model.language_model.probe_mlp_chunk_bytes = chunk_bytes
            plain = jax.block_until_ready(signal_step(*off))["entropy"]
            plain_seconds = timed(lambda off=off: jax.block_until_ready(signal_step(*off)), iters)
            sig_seconds = timed(lambda: jax.block_until_ready(signal_step()), iters)
            record(args, "extract_mlp_chunking", attn=impl, chunk_bytes=chunk_bytes,
                   chunked_samples_per_s=sh["extract_batch"] * iters / sig_seconds,
                   unchunked_samples_per_s=sh["extract_batch"] * iters / plain_seconds,
                   max_abs_entropy_diff=float(np.abs(np.asarray(chunked) - np.asarray(plain)).max()))
        except Exception as e:  # noqa: BLE001 - report and go on
            record(args, "extract_signals", attn=impl, error=f"{type(e).__name__}: {str(e)[:300]}")
        record(args, "extract", attn=impl, batch=sh["extract_batch"], prompt_tokens=sh["prompt"],
               image_tokens=sh["n_img"], samples_per_s=sh["extract_batch"] * iters / seconds,
               compile_s=round(compile_s, 1), init_s=round(t_init, 1), weights_gib=weights / GIB,
               peak_gib=None if peak is None else peak / GIB,
               peak_minus_weights_gib=None if peak is None else (peak - weights) / GIB,
               entropy_mean=float(entropies[impl].mean()), device=str(jax.devices()[0].device_kind))
    if len(entropies) == 2:
        diff = np.abs(entropies["xla"] - entropies["cudnn"])
        record(args, "extract_compare", max_abs_entropy_diff_xla_vs_cudnn=float(diff.max()),
               mean_abs=float(diff.mean()))


def phase_memory(args) -> None:
    """Compiled buffer sizes of `_entropy_step` and `_signal_step` at the benchmark shape, MLP chunking
    on / off, from abstract shapes (jit(...).lower(ShapeDtypeStructs).compile().memory_analysis())."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bye_jax.extract import _entropy_step, _signal_step
    from bye_jax.models.llama import PROBE_MLP_CHUNK_BYTES
    from bye_jax.models.llava import LlavaForConditionalGeneration, from_hf_config
    from bye_jax.signals import CONTENT_DIM

    hf = hf_config(args.tiny)
    sh = shapes(args, hf)
    cfg = from_hf_config(hf)
    impls = ["xla"] if jax.default_backend() == "cpu" else args.memory_impls.split(",")
    b, s, size = sh["extract_batch"], sh["prompt"], cfg.vision.image_size
    side = size // cfg.vision.patch_size
    spec = jax.ShapeDtypeStruct
    ids, mask = spec((b, s), jnp.int32), spec((b, s), jnp.int32)
    pixels, image = spec((b, 3, size, size), jnp.float32), spec((b, s), jnp.bool_)
    proj, prefix = spec((cfg.text.hidden_size, CONTENT_DIM), jnp.float32), spec((b,), jnp.int32)
    chunking = [("off", 0)] if args.tiny else [("off", 0), ("on", PROBE_MLP_CHUNK_BYTES)]
    if args.tiny:  # tiny activations never reach the real threshold: chunk at 1 KiB to exercise the path
        chunking.append(("on", 1024))
    for impl in impls:
        model = nnx.eval_shape(lambda impl=impl: LlavaForConditionalGeneration(
            cfg, dtype=jnp.dtype(args.memory_dtype), rngs=nnx.Rngs(0), attn_impl=impl))
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
        for name, chunk_bytes in chunking:
            model.language_model.probe_mlp_chunk_bytes = chunk_bytes
            graphdef, state = nnx.split(model)
            steps = {"entropy": (_entropy_step, (graphdef, state, ids, pixels, mask, image, {})),
                     "signals": (_signal_step, (graphdef, state, ids, pixels, mask, image, {}, proj, (side, side),
                                                prefix))}
            for step, (fn, step_args) in steps.items():
                t = time.perf_counter()
                try:
                    mem = fn.lower(*step_args).compile().memory_analysis()
                except Exception as e:  # noqa: BLE001 - report and go on
                    record(args, "memory", attn=impl, step=step, mlp_chunking=name, error=f"{type(e).__name__}: "
                           f"{str(e)[:300]}")
                    continue
                temp, out = mem.temp_size_in_bytes, mem.output_size_in_bytes
                inputs = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(step_args[2:]) if hasattr(x, "dtype"))
                record(args, "memory", attn=impl, step=step, dtype=args.memory_dtype, mlp_chunking=name,
                       chunk_bytes=chunk_bytes,
                       batch=b, prompt_tokens=s, weights_gib=weights / GIB, temp_gib=temp / GIB,
                       beyond_weights_gib=(temp + out + inputs) / GIB, compile_s=round(time.perf_counter() - t, 1),
                       backend=jax.default_backend())


def phase_train(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bye_jax.models.lora import DEFAULT_TARGET, add_lora
    from bye_jax.train.data import IGNORE
    from bye_jax.train.loop import OptConfig, make_optimizer, train_step, trainable_filter

    remat = bool(args.remat)
    hf = hf_config(args.tiny)
    sh = shapes(args, hf)
    model, cfg, weights, t_init = jax_model(args, hf)
    set_attn_impl(model, args.attn)
    paths = add_lora(model, rank=sh["rank"], alpha=2.0 * sh["rank"], target=DEFAULT_TARGET, rngs=nnx.Rngs(0))
    model.language_model.remat = remat
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(False), ...)
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
    opt = OptConfig()
    opt_state = make_optimizer(opt, 0.0).init(trainable)
    n_lora = sum(x.size for x in jax.tree.leaves(trainable))

    rng = np.random.default_rng(0)
    b, s = sh["train_batch"], sh["train_len"]
    ids, mask = token_batch(rng, b, s, sh["n_img"], cfg.image_token_id, cfg.text.vocab_size)
    labels = np.full_like(ids, IGNORE)
    labels[:, -32:] = ids[:, -32:]  # the answer: the last 32 tokens
    size = cfg.vision.image_size
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": labels[None],
             "pixel_values": rng.standard_normal((1, b, 3, size, size)).astype(np.float32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    lr = jnp.float32(1e-5)
    t = time.perf_counter()
    trainable, opt_state, m = train_step(graphdef, opt, trainable, frozen, opt_state, batch, lr)
    first_loss = float(m["loss"])
    compile_s = time.perf_counter() - t
    iters = 2 if args.tiny else 6
    t = time.perf_counter()
    for _ in range(iters):
        trainable, opt_state, m = train_step(graphdef, opt, trainable, frozen, opt_state, batch, lr)
    last_loss = float(m["loss"])
    seconds = time.perf_counter() - t
    peak = peak_bytes()
    record(args, "train", remat=remat, attn=args.attn, batch=b, seq_len=s, lora_rank=sh["rank"],
           lora_layers=len(paths), lora_params=int(n_lora), tokens_per_s=b * s * iters / seconds,
           step_s=seconds / iters, compile_s=round(compile_s, 1), init_s=round(t_init, 1),
           weights_gib=weights / GIB, peak_gib=None if peak is None else peak / GIB,
           loss_first=first_loss, loss_last=last_loss, device=str(jax.devices()[0].device_kind))


# ---------------------------------------------------------------------------------- torch phase

def phase_torch(args) -> None:
    import numpy as np
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    hf = hf_config(args.tiny)
    sh = shapes(args, hf)
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.LlavaForConditionalGeneration._from_config(
            hf, attn_implementation="eager", dtype=torch.bfloat16).eval()
    t_init = time.perf_counter() - t
    rng = np.random.default_rng(0)
    size = hf.vision_config.image_size
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def inputs(batch, length):
        ids, mask = token_batch(rng, batch, length, sh["n_img"], hf.image_token_index, hf.text_config.vocab_size)
        pix = torch.tensor(rng.standard_normal((batch, 3, size, size)), dtype=torch.bfloat16, device=dev)
        return torch.tensor(ids, device=dev).long(), torch.tensor(mask, device=dev).long(), pix

    # The reference loop: eager, output_attentions, batch 1, entropy of the last position's
    # head-mean attention over the image tokens, per layer.
    ids, mask, pix = inputs(1, sh["prompt"])
    image = (ids[0] == hf.image_token_index)

    def reference_one():
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, output_attentions=True)
        ents = []
        for att in out.attentions:
            row = att[0, :, -1, :].float().mean(0)[image]
            p = row / row.sum()
            ents.append(float(-(p * torch.log(p + 1e-30)).sum()))
        return ents

    reference_one()
    sync()
    iters = 3 if args.tiny else 12
    seconds = timed(reference_one, iters)
    record(args, "torch_reference", attn="eager+output_attentions", batch=1, prompt_tokens=sh["prompt"],
           samples_per_s=iters / seconds, init_s=round(t_init, 1))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.set_attn_implementation("sdpa")
    big = inputs(sh["ref_batch"], sh["prompt"])

    def sdpa_forward():
        with torch.no_grad():
            model(input_ids=big[0], attention_mask=big[1], pixel_values=big[2], logits_to_keep=1)
        sync()

    sdpa_forward()
    iters = 2 if args.tiny else 5
    seconds = timed(sdpa_forward, iters)
    record(args, "torch_sdpa_forward", batch=sh["ref_batch"], samples_per_s=sh["ref_batch"] * iters / seconds,
           peak_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None)
    big = None  # free the batch-32 inputs before training
    phase_torch_train(args, model, hf, sh, inputs, sync, dev, cuda)


def phase_torch_train(args, model, hf, sh, inputs, sync, dev, cuda) -> None:
    import peft
    import torch

    model.train()
    lora = peft.LoraConfig(r=sh["rank"], lora_alpha=2 * sh["rank"], lora_dropout=0.0,
                           target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    pmodel = peft.get_peft_model(model, lora)
    n_lora = sum(1 for _, m in pmodel.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    opt = torch.optim.AdamW([p for p in pmodel.parameters() if p.requires_grad], lr=1e-5)
    b, s = sh["train_batch"], sh["train_len"]
    ids, mask, pix = inputs(b, s)
    labels = torch.full_like(ids, -100)
    labels[:, -32:] = ids[:, -32:]
    for checkpointing in (True, False):
        if checkpointing:
            pmodel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            pmodel.enable_input_require_grads()
        else:
            pmodel.gradient_checkpointing_disable()

        def step():
            loss = pmodel(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        try:
            step()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            iters = 2 if args.tiny else 4
            seconds = timed(step, iters)
        except torch.OutOfMemoryError as e:
            record(args, "torch_peft_train", checkpointing=checkpointing, error=str(e)[:200])
            torch.cuda.empty_cache()
            continue
        record(args, "torch_peft_train", checkpointing=checkpointing, batch=b, seq_len=s, lora_rank=sh["rank"],
               lora_layers=n_lora,
               tokens_per_s=b * s * iters / seconds, step_s=seconds / iters,
               peak_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None)


# ---------------------------------------------------------------------------------------- driver

def run_phases(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    plan = []
    for phase in args.phases.split(","):
        if phase == "train":
            plan += [["--phase", "train", "--remat", "1"], ["--phase", "train", "--remat", "0"]]
        else:
            plan.append(["--phase", phase])
    for argv in plan:
        left = args.budget - (time.time() - start)
        if left < 30:
            record(args, "skipped", argv=argv, reason="out of time budget")
            continue
        tiny = ["--tiny"] if args.tiny else []
        cmd = [sys.executable, __file__, "--out", args.out, "--attn", args.attn, "--impls", args.impls,
               "--memory-dtype", args.memory_dtype,
               "--memory-impls", args.memory_impls, *argv, *tiny]
        t = time.time()
        try:
            rc = subprocess.run(cmd, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"# {' '.join(argv)}: rc={rc} in {time.time() - t:.0f}s", flush=True)
        if rc != 0:
            record(args, "failed", argv=argv, rc=rc, seconds=round(time.time() - t))
            if argv[1] == "train" and args.attn == "cudnn" and rc != "timeout":
                plan.append([*argv, "--attn", "xla"])  # the later --attn wins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", default="extract,train,torch")
    ap.add_argument("--phase", default="")
    ap.add_argument("--remat", type=int, default=0)
    ap.add_argument("--attn", default="cudnn", help="attention implementation of the train phase")
    ap.add_argument("--impls", default="xla,cudnn", help="attention implementations of the extract phase")
    ap.add_argument("--memory-impls", default="cudnn", help="attention implementations of the memory phase")
    ap.add_argument("--memory-dtype", default="bfloat16",
                    help="the memory phase's model dtype (float32 on a CPU: XLA CPU upcasts bfloat16 matmuls)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all phases")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of this script)")
    args = ap.parse_args()
    if args.tiny and args.attn == "cudnn":
        args.attn = "xla"
    if not args.phase:
        return run_phases(args)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    phases = {"extract": phase_extract, "memory": phase_memory, "train": phase_train, "torch": phase_torch}
    phases[args.phase](args)


if __name__ == "__main__":
    main()
