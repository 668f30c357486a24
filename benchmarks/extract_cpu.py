"""CPU throughput of `bye_jax` entropy extraction vs the reference loop, on the same checkpoint.

Reference = what the BYE reference implementation does: transformers, eager attention,
output_attentions=True, batch 1, entropies from the last position's attention rows (numpy).
Both run on one random LLaVA-architecture checkpoint built here (no downloads) and must give the
same entropies. Two modes:

In-process (default): prints samples/s for both and the ratio (entropies checked at 1e-4). bye_jax
runs twice per round, alternating: the extraction as it is (the whole signal table,
bye_jax/signals.py) and with `signals=False` (the entropies alone), so the cost of the signals is
measured under the same conditions; the best round of each counts. The same run measures the
machine's float32 matmul rate (a square n x n matmul, jax and torch, best of several) and reports the
extraction's FLOPs per sample two ways: `model` = analytic matmul FLOPs of the full prefill forward
from the config (vision tower up to the feature layer, projector, every decoder layer, attention as
the full S x S score and value products that eager computes; no logits), at each sample's own
prompt length; `executed` = XLA's `cost_analysis()` of the compiled signal step, per padded batch
(what bye_jax actually runs, elementwise work included). Achieved GFLOP/s = FLOPs x steady-state
samples/s, and its fraction of the jax matmul rate.

Whole process (--whole-process): times `python -m bye_jax.extract --config=bye_jax/configs/llava.py`
as a subprocess (first with an empty compilation cache, then again warm with the same cache) against
benchmarks/reference_loop.py as a subprocess (transformers `generate`, eager, output_attentions,
batch 1), same samples; entropies compared by id at 5e-6. Both wall times include interpreter start,
imports, model loading and (for bye_jax) compilation or the cache load.

Sizes: `small` / `medium` as before; `llava576` = LLaVA-1.5's image geometry (336 px images, 14 px
patches -> 576 image tokens, 582-604-token prompts) with a narrow model so that a sample costs ~25 GFLOP
(model FLOPs): CLIP 3 x 256 (4 heads, MLP 1024; 2 layers run to the feature layer -2) and the
projector, ~3.1 GFLOP, and a Llama decoder 5 x 512 (8 heads, MLP 1376), ~22 GFLOP.

    python benchmarks/extract_cpu.py [--samples 48] [--batch 8] [--size small|medium|llava576] [--rounds 2]
    python benchmarks/extract_cpu.py --size llava576 --whole-process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {
    # vision: CLIP-like tower; text: Llama-like decoder. 'medium' ~ 100M parameters.
    "small": dict(image_size=112, patch_size=14, vision_layers=4, vision_hidden=256, vision_heads=4,
                  text_layers=8, text_hidden=512, text_heads=8, kv_heads=8, intermediate=1376),
    "medium": dict(image_size=224, patch_size=14, vision_layers=6, vision_hidden=384, vision_heads=6,
                   text_layers=12, text_hidden=768, text_heads=12, kv_heads=12, intermediate=2048),
    # 576 image tokens (LLaVA-1.5's 336 / 14 geometry), ~25 GFLOP a sample: see the docstring.
    "llava576": dict(image_size=336, patch_size=14, vision_layers=3, vision_hidden=256, vision_heads=4,
                     vision_intermediate=1024, text_layers=5, text_hidden=512, text_heads=8, kv_heads=8,
                     intermediate=1376),
}


def model_flops(cfg, seq_len: int) -> float:
    """Analytic matmul FLOPs (2 per multiply-add) of one sample's full prefill forward, no logits:
    patch embedding, the CLIP layers up to the feature layer, the projector, every decoder layer
    (q/k/v/o, gated MLP, attention scores and values over the full S x S as eager computes them)."""
    v, t = cfg.vision, cfg.text
    tokens = v.num_patches + 1
    flops = 2 * v.num_patches * v.num_channels * v.patch_size ** 2 * v.hidden_size
    per_layer = 2 * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    per_layer += 2 * 2 * tokens ** 2 * v.hidden_size
    flops += cfg.feature_layer_index * per_layer
    flops += 2 * v.num_patches * (v.hidden_size * t.hidden_size + t.hidden_size ** 2)
    d, q, kv = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_layer = 2 * seq_len * (d * q + 2 * d * kv + q * d + 3 * d * t.intermediate_size)
    per_layer += 2 * 2 * seq_len ** 2 * q
    return float(flops + t.num_layers * per_layer)


def matmul_rates(n: int, reps: int = 5) -> dict:
    """float32 n x n matmul GFLOP/s on this machine (best of `reps`), jax (jit) and torch."""
    import jax
    import jax.numpy as jnp
    import torch

    flops = 2.0 * n ** 3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best_jax = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best_jax = min(best_jax, time.perf_counter() - t)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    torch.mm(ta, tb)
    best_torch = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(ta, tb)
        best_torch = min(best_torch, time.perf_counter() - t)
    return {"n": n, "jax_gflops": flops / best_jax / 1e9, "torch_gflops": flops / best_torch / 1e9}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def in_process(args) -> dict:
    import jax.numpy as jnp
    import torch
    from test_extract import make_dataset, reference_entropies
    from tiny_checkpoints import make_tiny_llava

    from bye_jax.data.llava_json import load_dataset
    from bye_jax.extract import EntropyExtractor, _image_mask, _signal_step
    from bye_jax.models.family import load_model
    from bye_jax.models.inputs import PromptEncoder

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_llava(tmp / "ckpt", **SIZES[args.size])
        ann, images = make_dataset(tmp / "data", n=args.samples)
        samples, _ = load_dataset(ann, images)
        enc = PromptEncoder(ckpt)
        model, _ = load_model(ckpt)
        rates = matmul_rates(args.matmul_n)

        from transformers import LlavaForConditionalGeneration

        torch_model = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
        reference_entropies(ckpt, enc, samples[:2], torch_model)  # warm-up
        t = time.perf_counter()
        ref = reference_entropies(ckpt, enc, samples, torch_model)
        t_ref = time.perf_counter() - t

        exts = {"signals": EntropyExtractor(model, enc, batch_size=args.batch),
                "entropy_only": EntropyExtractor(model, enc, batch_size=args.batch, signals=False)}
        best = {}
        for name, ext in exts.items():
            ext.run(samples[: args.batch], tmp / f"warm_{name}", progress=False)  # compile
        for r in range(args.rounds):
            for name, ext in exts.items():
                t = time.perf_counter()
                table, _ = ext.run(samples, tmp / f"run_{name}_{r}", progress=False)
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t)
                if name == "signals":
                    err = float(np.abs(table.matrix - ref).max())

        # FLOPs: analytic per sample at its own prompt length; XLA's count per padded batch.
        ext = exts["signals"]
        lengths = [enc.prompt_length(s.question) for s in samples]
        flops_model = float(np.mean([model_flops(model.cfg, n) for n in lengths]))
        skipped: list = []
        executed = 0.0
        for _, _, batch in ext._batches(sorted(samples, key=lambda s: len(s.question)), skipped):
            prefix = np.zeros(batch.batch_size, np.int32) if batch.answer_prefix is None else batch.answer_prefix
            cost = _signal_step.lower(
                ext.graphdef, ext.state, jnp.asarray(batch.input_ids), jnp.asarray(batch.pixel_values),
                jnp.asarray(batch.attention_mask), jnp.asarray(_image_mask(batch, model.cfg.image_token_id)),
                {}, ext.projection, ext.grid, jnp.asarray(prefix, jnp.int32)).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            executed += float(cost["flops"])
        flops_executed = executed / len(samples)

    n = len(samples)
    rate = n / best["signals"]
    return {
        "size": args.size, "samples": n, "batch": args.batch, "rounds": args.rounds,
        "mean_prompt_tokens": float(np.mean(lengths)),
        "reference_samples_per_s": n / t_ref, "bye_jax_samples_per_s": rate,
        "bye_jax_entropy_only_samples_per_s": n / best["entropy_only"],
        "signals_cost": f"{100 * (best['signals'] / best['entropy_only'] - 1):+.1f}% time",
        "ratio": t_ref / best["signals"], "max_abs_entropy_diff": err,
        "gflop_per_sample_model": flops_model / 1e9, "gflop_per_sample_executed_xla": flops_executed / 1e9,
        "matmul": rates,
        "bye_jax_gflops_model": flops_model * rate / 1e9,
        "bye_jax_gflops_executed": flops_executed * rate / 1e9,
        "fraction_of_jax_matmul_model": flops_model * rate / 1e9 / rates["jax_gflops"],
        "fraction_of_jax_matmul_executed": flops_executed * rate / 1e9 / rates["jax_gflops"],
        "reference_gflops_model": flops_model * n / t_ref / 1e9,
        "reference_fraction_of_torch_matmul": flops_model * n / t_ref / 1e9 / rates["torch_gflops"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": load(), "tolerance": 1e-4,
    }


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dt, done.stdout + done.stderr


def _entropies(path: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["question_id"]: np.array([r["entropy"][str(i)] for i in range(len(r["entropy"]))]) for r in rows}


def whole_process(args) -> dict:
    from test_extract import make_dataset
    from tiny_checkpoints import make_tiny_llava

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_llava(tmp / "ckpt", **SIZES[args.size])
        ann, images = make_dataset(tmp / "data", n=args.samples)
        ours = [sys.executable, "-m", "bye_jax.extract", "--config=bye_jax/configs/llava.py",
                f"--config.model={ckpt}", f"--config.data.annotations={ann}", f"--config.data.image_root={images}",
                f"--config.batch_size={args.batch}", f"--config.compile_cache_dir={tmp / 'cache'}"]
        ref_cmd = [sys.executable, str(ROOT / "benchmarks" / "reference_loop.py"), "--model", str(ckpt),
                   "--annotations", str(ann), "--image-root", str(images), "--out", str(tmp / "ref.jsonl")]
        times: dict[str, list[float]] = {"reference": [], "bye_jax_cold_cache": [], "bye_jax_warm_cache": []}
        logs = {}
        for r in range(args.rounds):
            t, _ = _timed(ref_cmd, env)
            times["reference"].append(t)
            cache = tmp / "cache"
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
            for name in ("bye_jax_cold_cache", "bye_jax_warm_cache"):
                t, log = _timed(ours + [f"--workdir={tmp / f'{name}_{r}'}"], env)
                times[name].append(t)
                logs[name] = [line for line in log.splitlines() if "first batch of each shape" in line][:1]
        ref = _entropies(tmp / "ref.jsonl")
        got = _entropies(tmp / f"bye_jax_warm_cache_{args.rounds - 1}" / "entropy.jsonl")
        if set(ref) != set(got):
            raise SystemExit(f"different ids: {sorted(set(ref) ^ set(got))[:5]}")
        err = max(float(np.abs(ref[i] - got[i]).max()) for i in ref)

    best = {k: min(v) for k, v in times.items()}
    return {"size": args.size, "samples": args.samples, "batch": args.batch, "rounds": args.rounds,
            "seconds_all_rounds": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "best_seconds": {k: round(v, 2) for k, v in best.items()},
            "speed_vs_reference_cold": best["reference"] / best["bye_jax_cold_cache"],
            "speed_vs_reference_warm": best["reference"] / best["bye_jax_warm_cache"],
            "bye_jax_progress_line": logs, "max_abs_entropy_diff": err, "tolerance": 5e-6,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average": load()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--matmul-n", type=int, default=2048, help="side of the square float32 matmul timed")
    ap.add_argument("--whole-process", action="store_true",
                    help="time `python -m bye_jax.extract` and benchmarks/reference_loop.py as processes")
    args = ap.parse_args()
    result = whole_process(args) if args.whole_process else in_process(args)
    print(json.dumps(result, indent=2))
    if result["max_abs_entropy_diff"] > result["tolerance"]:
        raise SystemExit(f"entropies differ by {result['max_abs_entropy_diff']}")


if __name__ == "__main__":
    main()
