"""CPU throughput of `bye_jax` entropy extraction vs the reference loop, on the same checkpoint.

Reference = what the BYE reference implementation does: transformers, eager attention,
output_attentions=True, batch 1, entropies from the last position's attention rows (numpy).
Both run on one random LLaVA-architecture checkpoint built here (no downloads) and must give the
same entropies (checked at 1e-4). Prints samples/s for both and the ratio.

bye_jax runs twice per round, alternating, in the same process: the extraction as it is (the whole
signal table, bye_jax/signals.py) and with `signals=False` (the entropies alone: the extraction before
the signal table), so the cost of the signals is measured under the same conditions; the best round of
each counts.

    python benchmarks/extract_cpu.py [--samples 48] [--batch 8] [--size small|medium] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SIZES = {
    # vision: CLIP-like tower; text: Llama-like decoder. 'medium' ~ 100M parameters.
    "small": dict(image_size=112, patch_size=14, vision_layers=4, vision_hidden=256, vision_heads=4,
                  text_layers=8, text_hidden=512, text_heads=8, kv_heads=8, intermediate=1376),
    "medium": dict(image_size=224, patch_size=14, vision_layers=6, vision_hidden=384, vision_heads=6,
                   text_layers=12, text_hidden=768, text_heads=12, kv_heads=12, intermediate=2048),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch
    from test_extract import make_dataset, reference_entropies
    from tiny_checkpoints import make_tiny_llava

    from bye_jax.data.llava_json import load_dataset
    from bye_jax.extract import EntropyExtractor
    from bye_jax.models.family import load_model
    from bye_jax.models.inputs import PromptEncoder

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_llava(tmp / "ckpt", **SIZES[args.size])
        ann, images = make_dataset(tmp / "data", n=args.samples)
        samples, _ = load_dataset(ann, images)
        enc = PromptEncoder(ckpt)

        from transformers import LlavaForConditionalGeneration

        torch_model = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
        reference_entropies(ckpt, enc, samples[:2], torch_model)  # warm-up
        t = time.perf_counter()
        ref = reference_entropies(ckpt, enc, samples, torch_model)
        t_ref = time.perf_counter() - t

        model, _ = load_model(ckpt)
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
        t_ours = best["signals"]

    n = len(samples)
    result = {
        "size": args.size, "samples": n, "batch": args.batch, "rounds": args.rounds,
        "reference_samples_per_s": n / t_ref, "bye_jax_samples_per_s": n / t_ours,
        "bye_jax_entropy_only_samples_per_s": n / best["entropy_only"],
        "signals_cost": f"{100 * (t_ours / best['entropy_only'] - 1):+.1f}% time",
        "ratio": t_ref / t_ours, "max_abs_entropy_diff": err,
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    print(json.dumps(result, indent=2))
    if err > 1e-4:
        raise SystemExit(f"entropies differ by {err}")


if __name__ == "__main__":
    main()
