"""The BYE reference extraction loop as a stand-alone process (transformers only; no bye_jax import).

What the BYE reference implementation does per sample: the checkpoint's processor and chat template
(image first, then the question, with the generation prompt), `generate` with eager attention and
`output_attentions=True` at batch 1, then, at every decoder layer, the prefill step's attention row of
the last prompt position over the image tokens, averaged over heads, renormalised to 1, and its
Shannon entropy in nats (1e-8 inside the log). One token is generated (`max_new_tokens=1`): the
entropies come from the prefill step, so longer generation would only add time to this side.
Writes entropy.jsonl in the reference format. Used by benchmarks/extract_cpu.py --whole-process.

    python benchmarks/reference_loop.py --model CKPT --annotations train.json --image-root IMAGES --out ref.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

T0 = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--annotations", required=True)
    ap.add_argument("--image-root", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    image_token = model.config.image_token_index
    records = json.loads(Path(args.annotations).read_text())
    t_loop = time.perf_counter()
    with open(args.out, "w", encoding="utf-8") as out:
        for rec in records:
            question = rec["conversations"][0]["value"].replace("<image>", "").strip()
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            image = Image.open(Path(args.image_root) / rec["image"]).convert("RGB")
            inputs = processor(images=image, text=text, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_attentions=True,
                                     return_dict_in_generate=True)
            img = (inputs["input_ids"][0] == image_token).numpy()
            entropy = {}
            for layer, att in enumerate(gen.attentions[0]):  # the prefill step: [1, heads, S, S] per layer
                a = att[0, :, -1, :].numpy().astype(np.float64)[:, img]
                p = a.mean(axis=0)
                p = p / p.sum()
                entropy[str(layer)] = float(-(p * np.log(p + 1e-8)).sum())
            out.write(json.dumps({"question_id": str(rec["id"]), "entropy": entropy}) + "\n")
    now = time.perf_counter()
    print(json.dumps({"samples": len(records), "loop_seconds": round(now - t_loop, 3),
                      "startup_seconds": round(t_loop - T0, 3)}))


if __name__ == "__main__":
    main()
