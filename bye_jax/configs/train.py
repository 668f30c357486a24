r"""LoRA fine-tuning of a Hugging Face LLaVA checkpoint (python -m bye_jax.train).

    python -m bye_jax.train --config=bye_jax/configs/train.py \
        --config.model=/path/to/llava-1.5-7b-hf \
        --config.data.annotations=/path/to/train.json --config.data.image_root=/path/to/images \
        --config.dtype=bfloat16 --workdir=runs/ft

Writes WORKDIR/checkpoints (orbax; a rerun with the same workdir resumes), WORKDIR/merged (the
base model with the LoRA folded in, a HF checkpoint directory) and WORKDIR/adapter (PEFT layout).
Defaults follow the paper (3 epochs, global batch 16, AdamW, linear decay, lr 2e-4) and LLaVA-1.5's
LoRA recipe (rank 128, alpha 256, every linear layer of the language model, warmup 3%).
"""

import ml_collections

from bye_jax.configs.runtime import add_prompt, add_runtime
from bye_jax.configs.sources import add_source

LORA_TARGET = r"language_model/layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""                    # HF checkpoint directory of the base model
    c.dtype = "float32"             # compute dtype, float32 | bfloat16 (LoRA params stay float32)
    c.attn_impl = "auto"            # auto | xla | cudnn (jax.nn.dot_product_attention)

    c.data = ml_collections.ConfigDict()
    c.data.annotations = ""         # LLaVA-format JSON
    c.data.image_root = ""          # default: the annotation file's folder
    c.data.max_image_pixels = 89_478_485
    add_source(c.data)              # or --config.data.source=tfds --config.data.tfds.name=... (README)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 128
    c.lora.alpha = 256.0            # scale = alpha / rank (PEFT)
    c.lora.target = LORA_TARGET     # re.fullmatch over '/'-joined Dense paths
    c.train_projector = False       # also train the multi-modal projector (in full)
    c.train_lm_head = False         # also train the output layer (in full; PEFT modules_to_save)
    c.full_finetune = False         # train every weight outside the vision tower instead of LoRA
    c.train_vision = False          # with full_finetune: the vision tower's weights too

    c.lr = 2e-4
    c.epochs = 3
    c.batch_size = 8                # per micro-batch
    c.grad_accum = 2                # micro-batches per optimizer step (global batch 16)
    c.warmup_ratio = 0.03
    c.schedule = "linear"           # linear | cosine decay to 0 after warmup
    c.weight_decay = 0.0            # AdamW (not applied to biases)
    c.max_grad_norm = 1.0           # clip_by_global_norm; <= 0 disables
    c.seed = 0                      # data order and LoRA init
    c.remat = False                 # gradient checkpointing: recompute each decoder layer in the backward pass
    c.max_length = 2048             # longer examples are truncated (the answer's tail)
    c.length_bucket = 32            # batches are padded to a multiple of this (few compiled shapes)

    c.checkpoint_every = 500        # steps between orbax checkpoints (also one at the end); 0: end only
    c.keep_checkpoints = 2

    c.mesh = ml_collections.ConfigDict()  # data parallel over this host's devices (params: fsdp)
    c.mesh.data = -1                # -1: all remaining devices; batch_size must divide evenly
    c.mesh.fsdp = 1
    c.mesh.tensor = 1               # splits heads / MLP columns / vocabulary (bye_jax/parallel.py)

    add_prompt(c)                   # prompt.template / image_aspect: the checkpoint's or LLaVA's (README)
    add_runtime(c)                  # distributed.* (multi-process launch), compile_cache_dir

    c.merged_dir = ""               # default WORKDIR/merged
    c.adapter_dir = ""              # default WORKDIR/adapter
    c.export_dtype = ""             # dtype of the merged checkpoint; "": the base checkpoint's (else dtype)
    return c
