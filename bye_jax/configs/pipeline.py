r"""The provider loop on your own data (python -m bye_jax.pipeline).

    python -m bye_jax.pipeline --config=bye_jax/configs/pipeline.py --config.model=/models/llava-1.5-7b-hf \
        --config.data.annotations=upload/train.json --config.data.image_root=upload \
        --config.test.annotations=test/test.json --config.triggered.annotations=test_triggered/test_triggered.json \
        --config.dtype=bfloat16 --workdir=runs/pipeline

Keys of the filter (configs/llava.py) plus the fine-tune settings (`finetune.*`, configs/train.py:
the paper's LoRA recipe), the test sets and evaluation settings. Every data section (`data`, `test`,
`triggered`) may be TFDS instead of LLaVA JSON: `.source=tfds` and `.tfds.name` / `.tfds.builder_dir`
(configs/sources.py). Evaluation runs in `dtype` / `attn_impl`, like the filter.
"""

import ml_collections

from bye_jax.configs import llava, train
from bye_jax.configs.sources import add_source


def get_config() -> ml_collections.ConfigDict:
    c = llava.get_config()               # model = the BASE checkpoint here
    c.data.random_drop = 0.2             # the paper's Random Drop baseline (share dropped); 0: no baseline
    c.data.target = "Backdoor Attack!"
    c.test = add_source(ml_collections.ConfigDict(dict(annotations="", image_root="")), split="test")
    c.triggered = add_source(ml_collections.ConfigDict(dict(annotations="", image_root="")), split="test")
    c.finetune = train.get_config()
    del c.finetune.prompt                # every stage uses the top-level `prompt`
    c.eval = ml_collections.ConfigDict(dict(batch_size=16, max_new_tokens=16, cp_mode="exact"))
    return c
