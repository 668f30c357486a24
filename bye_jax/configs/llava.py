r"""Generic config for any Hugging Face LLaVA checkpoint directory.

    python -m bye_jax.filter --config=bye_jax/configs/llava.py \
        --config.model=/path/to/llava-1.5-7b-hf \
        --config.data.annotations=/path/to/train.json --config.data.image_root=/path/to/images \
        --config.dtype=bfloat16 --config.batch_size=32 --workdir=runs/scan

`python -m bye_jax.extract` takes the same keys and stops after entropy.jsonl.
"""

import ml_collections

from bye_jax.configs.runtime import add_prompt, add_runtime
from bye_jax.configs.sources import add_source
from bye_jax.detect import DETECTORS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""                    # HF checkpoint directory (the fine-tuned model)
    c.dtype = "float32"             # float32 | bfloat16
    c.attn_impl = "auto"            # auto | xla | cudnn (jax.nn.dot_product_attention)
    c.batch_size = 8
    c.length_bucket = 32            # prompts are padded up to a multiple of this (few compiled shapes)
    c.chunk_size = 256              # samples per entropy.jsonl chunk (a crash loses at most one)
    c.entropy_file = ""             # cluster an existing entropy.jsonl and skip extraction
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.annotations = ""         # LLaVA-format JSON
    c.data.image_root = ""          # default: the annotation file's folder
    c.data.max_image_pixels = 89_478_485
    add_source(c.data)              # or --config.data.source=tfds --config.data.tfds.name=... (README)

    c.detect = ml_collections.ConfigDict()
    c.detect.rule = "combined"      # a registered detector: combined (robust + text + inserted + targeted) | robust |
                                    # official | paper | shares | text | inserted | targeted (README)
    c.detect.tau = 2.0              # official: |mu1-mu2| > tau (sd1+sd2); paper: BSI >= tau
    for name, detector in DETECTORS.items():  # each detector's parameters: --config.detect.robust.min_share=...
        c.detect[name] = ml_collections.ConfigDict(detector.defaults)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1               # splits heads / MLP columns / vocabulary (bye_jax/parallel.py)

    add_prompt(c)                   # prompt.template / image_aspect: the checkpoint's or LLaVA's (README)
    add_runtime(c)                  # distributed.* (multi-process launch), compile_cache_dir

    c.plots = ml_collections.ConfigDict()
    c.plots.enabled = True
    c.plots.heatmaps_suspicious = 4  # attention heat-maps of the most suspicious samples
    c.plots.heatmaps_typical = 2     # ... and of a few typical ones
    return c
