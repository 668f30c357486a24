r"""The built-in demo (the default of `python -m bye_jax.filter` with no flags).

    python -m bye_jax.filter                      # = --config=bye_jax/configs/demo.py --workdir=runs/demo
    python -m bye_jax.filter --config=bye_jax/configs/demo.py --config.data.n_upload=500 --workdir=/tmp/d

Generates a synthetic shapes VQA benchmark, poisons 10% of the upload with a black centre patch (the paper's
trigger, 1.5 image tokens wide),
uses the small LLaVA-architecture base pre-trained on clean data that ships in the package
(bye_jax/assets/demo_base, rebuilt by `python -m bye_jax.demo_base`; a config whose arch / pre-training
/ base_seed differ from the shipped base's pre-trains its own, cached in the workdir), LoRA fine-tunes
it on the upload, runs BYE, re-fine-tunes from the base on clean.json, also trains the Random Drop
baseline, evaluates CP / ASR and writes results.json, results.md and the plots.
"""

import ml_collections

from bye_jax.configs import llava, train


def get_config() -> ml_collections.ConfigDict:
    c = llava.get_config()
    seed = ml_collections.FieldReference(0)
    c.seed = seed                   # the run: upload, poisoning, test set, fine-tune init / order, GMM, drop
    c.base_seed = 0                 # the pre-trained base (its data, init, order): one fixed base for every seed
    c.demo = True
    c.workdir = "runs/demo"
    c.batch_size = 32
    c.length_bucket = 16

    c.data.n_pretrain = 4000        # the base's pre-training set (seed base_seed)
    c.data.n_upload = 800
    c.data.n_test = 300
    c.data.poison_rate = 0.1
    c.data.trigger = "patch"        # an image trigger (data/triggers.py), prefix | suffix | template, or dual_key
    c.data.trigger_side = 16        # px of the 96 px pictures (1.5 of the 9 x 9 tokens, as the paper's 21 px
                                    # trigger on LLaVA-1.5's 14 px patches); 0: the paper's 1/16 of the side
    c.data.trigger_params = ""      # the image trigger's own settings, e.g. "alpha=0.3" (blend), "delta=40" (sig),
                                    # "strength=1.0" (wanet); "": the toolkit's defaults (data/triggers.py)
    c.data.text_trigger = ml_collections.ConfigDict(dict(
        token="",                   # prefix / suffix: the rare token ("": cf)
        template="",                # template: text with one {question} ("": data/text_triggers.py's default)
        dual_image="patch",         # dual_key: its image trigger ...
        dual_text="suffix"))        # ... and its text trigger
    c.data.target = "Backdoor Attack!"
    c.data.random_drop = 0.2        # the paper's Random Drop baseline (share dropped); 0: no baseline

    # A small LLaVA: 1-layer CLIP tower whose selected feature layer (-2, LLaVA's default) is the
    # patch-embedding output, so each image token stays one patch (as a frozen pretrained CLIP keeps
    # patch identity); 9 x 9 patches of a 54 px image (the paper's trigger, 1/16 of the side, covers a
    # third of the centre patch; in LLaVA-1.5's 24 x 24 grid it covers about two whole patches).
    c.arch = ml_collections.ConfigDict(dict(
        image_size=54, patch_size=6, vision_hidden=128, vision_layers=1, vision_heads=4,
        text_hidden=64, text_layers=4, text_heads=4, kv_heads=2, intermediate=128))

    c.pretrain = train.get_config()
    del c.pretrain.prompt             # the base is pre-trained in its own checkpoint's format
    c.pretrain.full_finetune = True   # all language-model and projector weights (vision frozen)
    c.pretrain.lr = 3e-3
    c.pretrain.epochs = 12            # 1500 steps: the loss leaves its no-vision plateau (~0.55) after ~500
    c.pretrain.batch_size = 32
    c.pretrain.grad_accum = 1
    c.pretrain.warmup_ratio = 0.05
    c.pretrain.schedule = "cosine"
    c.pretrain.length_bucket = 16
    c.pretrain.checkpoint_every = 0
    c.pretrain.seed = c.get_ref("base_seed")

    c.finetune = train.get_config()   # the provider's LoRA fine-tune (vanilla, random drop, BYE)
    del c.finetune.prompt             # every stage uses the top-level `prompt`
    # Chosen by the attack's success and the clean CP only (README "Demo results"): r64 LoRA on every
    # decoder linear layer + projector + output layer (the 400-token vocabulary never produced the
    # target text), lr 2e-3 with 10% warmup and cosine decay (smooth loss; 3e-3 cost 6-9 CP points).
    c.finetune.lora.rank = 64
    c.finetune.lora.alpha = 128.0
    c.finetune.train_projector = True
    c.finetune.train_lm_head = True
    c.finetune.lr = 2e-3
    c.finetune.warmup_ratio = 0.1
    c.finetune.schedule = "cosine"
    c.finetune.epochs = 24
    c.finetune.batch_size = 16
    c.finetune.grad_accum = 1
    c.finetune.length_bucket = 16
    c.finetune.checkpoint_every = 0
    c.finetune.seed = seed            # every fine-tune of a run (vanilla, BYE, random drop) follows c.seed

    c.eval = ml_collections.ConfigDict(dict(batch_size=50, max_new_tokens=6, cp_mode="exact"))
    return c
