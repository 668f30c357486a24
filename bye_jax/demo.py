"""The built-in demo: the whole BYE loop on a synthetic benchmark, nothing downloaded.

synthetic shapes VQA -> poison 10% of the upload (centre patch) -> small LLaVA built from scratch and
pre-trained on clean data (cached) -> LoRA fine-tune on the upload (vanilla) -> BYE filter ->
re-fine-tune from the base on clean.json (BYE) and on a random 80% (Random Drop) -> CP / ASR of all
three -> results.json / results.md. The model is a small stand-in for LLaVA-1.5, not the paper's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bye_jax.pipeline import load_samples
from bye_jax.stages import Stage, config_items, digest_samples


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_data(config, data_dir: Path) -> dict[str, Path]:
    """Synthetic splits + the poisoned upload + the triggered test set (each cached)."""
    from bye_jax.data.poison import poison_dataset, triggered_test_set
    from bye_jax.data.synthetic import write_benchmark
    from bye_jax.data.triggers import TriggerSpec

    d, seed = config.data, config.seed
    splits = ("pretrain", "upload_clean", "test", "upload", "test_triggered")
    paths = {"pretrain": data_dir / "pretrain" / "annotations.json",
             "upload_clean": data_dir / "upload_clean" / "annotations.json",
             "test": data_dir / "test" / "annotations.json", "upload": data_dir / "upload" / "train.json",
             "test_triggered": data_dir / "test_triggered" / "test_triggered.json"}
    stage = Stage(data_dir, "demo data", config_items(config, "data", "seed"), {})
    if stage.prepare([data_dir / name for name in splits], log=_log, resume=False):
        return paths
    for name, n, s in (("pretrain", d.n_pretrain, seed + 1), ("upload_clean", d.n_upload, seed + 2),
                       ("test", d.n_test, seed + 3)):
        write_benchmark(data_dir / name, n, seed=s, prefix=f"{name[:2]}")
    spec = TriggerSpec(kind=d.trigger)
    summary = poison_dataset(paths["upload_clean"], data_dir / "upload", spec, rate=d.poison_rate, seed=seed,
                             target=d.target, overwrite=True)
    _log(f"upload: {summary['n_samples']} samples, {summary['n_poisoned']} poisoned with '{d.trigger}'")
    triggered_test_set(paths["test"], data_dir / "test_triggered", spec, overwrite=True)
    stage.done()
    return paths


def build_base(config, paths: dict[str, Path], out: Path) -> Path:
    """A new LLaVA-architecture HF checkpoint, pre-trained on clean data; cached in `out`."""
    samples = load_samples(paths["pretrain"])
    stage = Stage(out.parent, "base model", config_items(config, "arch", "pretrain", "seed", "data.target"),
                  {"samples": digest_samples(samples)}, record=f"{out.name}.stage.json")
    if stage.prepare([out, out.with_name(out.name + ".tmp"), out.with_name(out.name + "_pretrain")], log=_log):
        return out
    from flax import nnx

    from bye_jax.data.synthetic import vocabulary_corpus
    from bye_jax.models.build import write_llava_checkpoint_files
    from bye_jax.models.config import load_config
    from bye_jax.models.hf_export import save_hf_checkpoint
    from bye_jax.models.inputs import PromptEncoder
    from bye_jax.models.llava import LlavaForConditionalGeneration
    from bye_jax.runner import UserError
    from bye_jax.train.loop import train

    staging = out.with_name(out.name + ".tmp")
    write_llava_checkpoint_files(staging, corpus=vocabulary_corpus((config.data.target,)), **config.arch)
    cfg = load_config(staging)
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(config.seed))
    _log(f"pre-training the base model on {len(samples)} clean samples")
    try:
        metrics = train(model, cfg, samples, PromptEncoder(staging), config=config.pretrain,
                        workdir=out.with_name(out.name + "_pretrain"))
    except ValueError as e:
        raise UserError(f"pre-training: {str(e).splitlines()[0]}") from e
    _log(f"pre-training loss {metrics['losses'][0]:.3f} -> {metrics['losses'][-1]:.3f}")
    save_hf_checkpoint(model, cfg, staging, staging, dtype="float32")
    if out.exists():  # left by a run killed between the rename and its stage record
        shutil.rmtree(out)
    staging.rename(out)
    stage.done()
    return out


def run_demo(config, workdir: Path) -> int:
    from bye_jax.pipeline import run_pipeline

    workdir = Path(workdir)
    paths = prepare_data(config, workdir / "data")
    base = build_base(config, paths, workdir / "base")
    test, triggered = load_samples(paths["test"]), load_samples(paths["test_triggered"])
    run_pipeline(config, workdir, base, paths["upload"], test, triggered,
                 dataset="synthetic shapes VQA (built-in demo), 10% poisoned, centre patch")
    return 0
