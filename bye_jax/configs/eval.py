r"""Config of `python -m bye_jax.eval`: clean performance (CP) and attack success rate (ASR).

    python -m bye_jax.eval --config=bye_jax/configs/eval.py --config.model=/path/to/finetuned-hf \
        --config.test.annotations=test.json --config.test.image_root=images \
        --config.triggered.annotations=test_triggered/test_triggered.json \
        --config.report=runs/scan/report.json --workdir=runs/eval

The triggered set comes from `python -m bye_jax.data.poison --triggered_test`. Either set may be
left empty (its metric is then null). Writes workdir/eval.json and workdir/predictions.jsonl.
"""

import ml_collections

from bye_jax.configs.runtime import add_prompt, add_runtime
from bye_jax.configs.sources import add_source


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""                    # HF checkpoint directory (the fine-tuned model to evaluate)
    c.dtype = "float32"             # float32 | bfloat16
    c.attn_impl = "auto"            # auto | xla | cudnn
    c.batch_size = 8
    c.max_new_tokens = 32
    c.length_bucket = 32            # prompts are padded up to a multiple of this (few compiled shapes)
    c.max_image_pixels = 89_478_485
    c.target = "Backdoor Attack!"   # ASR: share of triggered outputs containing this (case-insensitive)
    c.cp_mode = "exact"             # exact | normalized | contains (see bye_jax/eval/metrics.py)
    c.report = ""                   # optional report.json of bye_jax.filter -> detection P / R / F1

    add_prompt(c)                   # prompt.template / image_aspect: the checkpoint's or LLaVA's (README)
    add_runtime(c)                  # distributed.* (multi-process launch), compile_cache_dir

    c.test = ml_collections.ConfigDict()
    c.test.annotations = ""         # clean test set (LLaVA JSON); CP against its first gpt answers
    c.test.image_root = ""          # default: the annotation file's folder
    add_source(c.test, split="test")  # or .source=tfds with .tfds.name / .tfds.builder_dir (README)

    c.triggered = ml_collections.ConfigDict()
    c.triggered.annotations = ""    # triggered test set (every image triggered) for ASR
    c.triggered.image_root = ""
    add_source(c.triggered, split="test")
    return c
