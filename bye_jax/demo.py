"""The built-in demo: the whole BYE loop on a synthetic benchmark, nothing downloaded.

synthetic shapes VQA -> poison 10% of the upload (centre patch) -> small LLaVA built from scratch and
pre-trained on clean data (shipped in the package, see `build_base`) -> LoRA fine-tune on the upload
(vanilla) -> BYE filter -> re-fine-tune from the base on clean.json (BYE) and on a random 80% (Random
Drop) -> CP / ASR of all three -> results.json / results.md. The model is a small stand-in for
LLaVA-1.5, not the paper's.

Over several processes (bye_jax/multihost.py) process 0 writes the data and the base (a pre-training,
when the shipped base does not match, runs on every process together) and the pipeline runs as
bye_jax/pipeline.py describes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bye_jax import multihost
from bye_jax.pipeline import load_samples
from bye_jax.stages import Stage, config_items


def _log(msg: str) -> None:
    if multihost.is_primary():
        print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


SPLIT_STREAMS = {"pretrain": 1, "upload_clean": 2, "test": 3}  # each split: default_rng([seed, stream])
BASE_ASSET = Path(__file__).parent / "assets" / "demo_base"
RECIPE_FILE = "demo_base.json"
# The pre-training settings the base's weights depend on (with full_finetune; LoRA keys are added
# otherwise). A new train-config key that changes pre-training must be added here.
PRETRAIN_KEYS = ("dtype", "lr", "epochs", "batch_size", "grad_accum", "warmup_ratio", "schedule", "weight_decay",
                 "max_grad_norm", "seed", "full_finetune", "train_vision", "max_length", "length_bucket")


def prepare_data(config, data_dir: Path) -> dict[str, Path]:
    """The run's synthetic splits (seed `config.seed`) + the poisoned upload + the triggered test set
    (each cached). The pre-training split belongs to the base (`build_base`)."""
    from bye_jax.data.poison import DUAL_KEY, parse_trigger_params, poison_dataset, trigger_specs, triggered_test_set
    from bye_jax.data.synthetic import write_benchmark
    from bye_jax.data.triggers import TRIGGERS, trigger_param_names

    d, seed = config.data, int(config.seed)
    splits = ("upload_clean", "test", "upload", "test_triggered")
    paths = {"upload_clean": data_dir / "upload_clean" / "annotations.json",
             "test": data_dir / "test" / "annotations.json", "upload": data_dir / "upload" / "train.json",
             "test_triggered": data_dir / "test_triggered" / "test_triggered.json"}
    # the text-trigger settings count only for a text / dual-key trigger (image-trigger runs keep their data)
    unused = ("data.text_trigger",) if d.trigger in TRIGGERS else ()
    if not d.get("trigger_params"):           # the defaults: the data (and its cache) of runs made before the key
        unused += ("data.trigger_params",)
    stage = Stage(data_dir, "demo data", config_items(config, "data", "seed", exclude=unused), {})
    if stage.prepare([data_dir / name for name in splits], log=_log, resume=False):
        return paths
    for name, n in (("upload_clean", d.n_upload), ("test", d.n_test)):
        write_benchmark(data_dir / name, n, seed=[seed, SPLIT_STREAMS[name]], prefix=f"{name[:2]}")
    t = d.get("text_trigger") or {}
    image_kind = t.get("dual_image", "patch") if d.trigger == DUAL_KEY else d.trigger
    # trigger_side sizes the patch-like triggers; blend / sig / wanet cover the whole picture (no side)
    # (a text-only trigger has no image part)
    takes_side = image_kind in TRIGGERS and "side" in trigger_param_names(image_kind)
    side = (int(d.trigger_side) or None) if takes_side else None
    spec, text = trigger_specs(d.trigger, side=side, token=t.get("token") or None,
                               template=t.get("template") or None, dual_image=t.get("dual_image", "patch"),
                               dual_text=t.get("dual_text", "suffix"),
                               params=parse_trigger_params(d.get("trigger_params", "")))
    kw = dict(text=text, image=spec is not None, overwrite=True)
    summary = poison_dataset(paths["upload_clean"], data_dir / "upload", spec, rate=d.poison_rate, seed=seed,
                             target=d.target, **kw)
    _log(f"upload: {summary['n_samples']} samples, {summary['n_poisoned']} poisoned with '{d.trigger}'")
    triggered_test_set(paths["test"], data_dir / "test_triggered", spec, **kw)  # both keys for dual_key
    stage.done()
    return paths


def base_recipe(config) -> dict:
    """Everything the pre-trained base is a function of (never the run's seed): the architecture, the
    pre-training settings, its data (size, base_seed and a fingerprint of the generator's output) and
    the target text (in the tokenizer's corpus). A shipped or cached base is used only if it matches."""
    from bye_jax.data.synthetic import fingerprint

    pretrain = {key: config.pretrain[key] for key in PRETRAIN_KEYS}
    if not config.pretrain.full_finetune:
        pretrain.update(lora=config.pretrain.lora.to_dict(), train_projector=config.pretrain.train_projector)
    seed = [int(config.base_seed), SPLIT_STREAMS["pretrain"]]
    recipe = {"arch": config.arch.to_dict(), "pretrain": pretrain, "n_pretrain": int(config.data.n_pretrain),
              "base_seed": int(config.base_seed), "target": config.data.target, "benchmark": fingerprint(seed)}
    return json.loads(json.dumps(recipe, sort_keys=True))


def _recipe_of(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_base(config, out: Path, data_dir: Path | None = None) -> Path:
    """The pre-trained base (a LLaVA-architecture HF checkpoint) in `out`: cached there, else the one
    shipped in the package when its recipe matches `config`, else pre-trained here on clean data
    (`data_dir`, default out/../data, holds the pre-training split)."""
    recipe = base_recipe(config)
    staging = out.with_name(out.name + ".tmp")

    def plan() -> bool:  # process 0: True when the base must be pre-trained here
        if (out / "model.safetensors").exists():
            if _recipe_of(out) == recipe:
                _log(f"base model: cached in {out}")
                return False
            _log(f"base model in {out} was built with other settings: rebuilding it")
        if staging.exists():
            shutil.rmtree(staging)
        if _recipe_of(BASE_ASSET) == recipe and (BASE_ASSET / "model.safetensors").exists():
            _log(f"base model: the pre-trained base shipped in the package ({BASE_ASSET})")
            shutil.copytree(BASE_ASSET, staging)
            install()
            return False
        return True

    def install() -> None:  # process 0
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)

    if multihost.from_primary(plan):
        pretrain_base(config, staging, Path(data_dir or out.parent / "data") / "pretrain",
                      out.with_name(out.name + "_pretrain"))
        multihost.from_primary(install)
    return out


def pretrain_base(config, staging: Path, data_dir: Path, train_dir: Path) -> None:
    """A new checkpoint in `staging`, pre-trained on `n_pretrain` clean samples (seed `base_seed`,
    written to `data_dir` if not there), with its recipe (demo_base.json); `train_dir`: the loop's
    log and checkpoints."""
    from flax import nnx

    from bye_jax.data.synthetic import vocabulary_corpus, write_benchmark
    from bye_jax.models import family
    from bye_jax.models.hf_export import save_hf_checkpoint
    from bye_jax.runner import UserError
    from bye_jax.train.loop import train

    ann = data_dir / "annotations.json"
    fam = family.family_named("llava")  # the demo's base model is a small LLaVA-1.5

    def prepare() -> None:  # process 0: the data and the new checkpoint's files, read by every process
        if not ann.exists():
            write_benchmark(data_dir, config.data.n_pretrain, seed=[int(config.base_seed), SPLIT_STREAMS["pretrain"]],
                            prefix="pr")
        if train_dir.exists():  # an interrupted pre-training of other settings must not be resumed
            shutil.rmtree(train_dir)
        fam.new_checkpoint(staging, corpus=vocabulary_corpus((config.data.target,)), **config.arch)

    multihost.from_primary(prepare)
    cfg = family.load_config(staging)
    model = fam.new_model(cfg, rngs=nnx.Rngs(int(config.base_seed)))
    samples = load_samples(ann)
    _log(f"pre-training the base model on {len(samples)} clean samples")
    try:
        metrics = train(model, cfg, samples, fam.encoder(staging), config=config.pretrain, workdir=train_dir)
    except ValueError as e:
        raise UserError(f"pre-training: {str(e).splitlines()[0]}") from e
    _log(f"pre-training loss {metrics['losses'][0]:.3f} -> {metrics['losses'][-1]:.3f}")

    def save() -> None:  # process 0 (the trained parameters are whole on every process)
        save_hf_checkpoint(model, cfg, staging, staging, dtype="float32")
        (staging / RECIPE_FILE).write_text(json.dumps(base_recipe(config), indent=1, sort_keys=True) + "\n")

    multihost.from_primary(save)


def run_demo(config, workdir: Path) -> int:
    from bye_jax.pipeline import run_pipeline

    workdir = Path(workdir)
    paths = {k: Path(v) for k, v in multihost.from_primary(
        lambda: {k: str(v) for k, v in prepare_data(config, workdir / "data").items()}).items()}
    base = build_base(config, workdir / "base", workdir / "data")
    test, triggered = load_samples(paths["test"]), load_samples(paths["test_triggered"])
    run_pipeline(config, workdir, base, paths["upload"], test, triggered,
                 dataset=f"synthetic shapes VQA (built-in demo), {100 * config.data.poison_rate:g}% poisoned, "
                         f"trigger {config.data.trigger}")
    return 0
