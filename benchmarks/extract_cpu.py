"""CPU throughput of `bye_jax` entropy extraction vs the reference loop, on the same checkpoint.

Reference = what the BYE reference implementation does: transformers, eager attention,
output_attentions=True, batch 1, entropies from the last position's attention rows (numpy).
Both run on one random LLaVA-architecture checkpoint built here (no downloads) and must give the
same entropies (checked at 1e-4). Prints samples/s for both and the ratio.

    python benchmarks/extract_cpu.py [--samples 48] [--batch 8] [--size small|medium]
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
    args = ap.parse_args()

    import torch
    from test_extract import make_dataset, reference_entropies
    from tiny_checkpoints import make_tiny_llava

    from bye_jax.data.llava_json import load_dataset
    from bye_jax.extract import EntropyExtractor
    from bye_jax.models.hf_loader import load_llava
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

        model, _ = load_llava(ckpt)
        ext = EntropyExtractor(model, enc, batch_size=args.batch)
        ext.run(samples[: args.batch], tmp / "warm", progress=False)  # compile
        t = time.perf_counter()
        table, _ = ext.run(samples, tmp / "run", progress=False)
        t_ours = time.perf_counter() - t

    err = float(np.abs(table.matrix - ref).max())
    n = len(samples)
    result = {
        "size": args.size, "samples": n, "batch": args.batch,
        "reference_samples_per_s": n / t_ref, "bye_jax_samples_per_s": n / t_ours,
        "ratio": t_ref / t_ours, "max_abs_entropy_diff": err,
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    print(json.dumps(result, indent=2))
    if err > 1e-4:
        raise SystemExit(f"entropies differ by {err}")


if __name__ == "__main__":
    main()
