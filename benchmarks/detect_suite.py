r"""Regenerates the detection-quality suite (issue 9) from real model runs of this project.

    python benchmarks/detect_suite.py --seeds=0,1,2 --rates=0,0.01,0.03,0.1,0.2 \
        --triggers=patch,random_patch,texture,multi --checkpoints=0.1,0.5,1 \
        --set data.trigger_side=16 --set finetune.train_lm_head=True ... [--out=benchmarks/data/detect_suite]

`--triggers`: any trigger of the poisoning toolkit: image triggers (patch, random_patch, texture, multi,
blend, sig, wanet, ...), text triggers (prefix, suffix, template: the upload's poisoned questions and the
triggered test set carry it, so the vanilla ASR is measured with the text trigger) and dual_key (both);
the text trigger's token / template / dual-key parts: `--set data.text_trigger.token='tq'` etc.

One run per (seed, poison rate, trigger) of the demo setup (bye_jax/configs/demo.py with the `--set`
overrides, as benchmarks/explore_demo.py): the demo's data for that seed (upload poisoned at the rate
with the trigger, clean and triggered test sets), the demo base (shipped or cached, shared by every
run: `demo.build_base`), one LoRA fine-tune on the upload. A rate-0 run does not depend on the
trigger, so it is done once per seed (its ASR is measured with the first trigger). `--checkpoints`
are fractions of the fine-tune, taken at the nearest end of an epoch (its learning-rate schedule always
spans the whole fine-tune; 0 = the base itself, small fractions = undertrained models; default 0.1, 0.5,
1 = epochs 2, 12, 24 of a 24-epoch fine-tune): the fine-tune stops at each of those steps
(the loop's orbax checkpoint there, then resumed by the loop) and the merged model is exported; the
fine-tune ends at the largest fraction. For each checkpoint: the signal table of the upload
(`runner.run_extract`, the filter's extraction; no detection) and the vanilla CP / ASR
(`explore_demo.evaluate`), stored as one compressed npz in `--out`:

* the signals (bye_jax/signals.py) with ``entropy`` and ``entropy_norm`` kept float32 (exact: the
  reference rules read the entropy, and a collapsed sample's values are below float16's normal range)
  and ``content`` float16 (as extracted); peak_mass, topk_mass, centroid and image_mass rounded to
  float16 (relative error <= 2^-11 from 6.1e-5 up, absolute <= 2^-25 below: far below what
  separates samples) and ``peak`` / ``num_image_tokens`` as int16 (exact below 32768 image tokens);
* ``ids``, ``poisoned`` [N] bool (the labels), ``meta`` (a JSON string: seed, rate, trigger,
  checkpoint step / fraction / epoch, ASR, CP, the overrides, the recipe digest, ...).

`load_table` reads one back (float32 / int32 again).

`--tag=NAME`: a name part for runs whose `--set` changes more than the trigger (e.g. a full fine-tune:
``--tag=fullft --set finetune.full_finetune=True``), so their tables do not take the default runs' names.

`--reextract`: only the signal tables again, from the merged checkpoints already in `--workdir` (after a
change of the signal set, e.g. SIGNALS_VERSION 4's peak_embed and text peak): no fine-tune (a run whose checkpoints are
missing is an error), and the vanilla CP / ASR come from the table already in `--out` when its recipe is
the same but for the signal version (same data, fine-tune and model), else they are measured again.

A table whose file holds the same recipe digest
is skipped (resumable: run the same command again); fine-tunes, exports and extractions live in
`--workdir` (default runs/detect_suite) and are reused too. Progress: one line per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from functools import reduce
from pathlib import Path

import numpy as np

SUITE_VERSION = 1
OUT = Path("benchmarks/data/detect_suite")
WORKDIR = Path("runs/detect_suite")
DEFAULTS = {"seeds": "0,1,2", "rates": "0,0.01,0.03,0.1,0.2", "triggers": "patch,random_patch,texture,multi",
            "checkpoints": "0.1,0.5,1"}
FLOAT16 = ("peak_mass", "topk_mass", "centroid", "image_mass", "text_peak_mass")  # rounded on storage
INT16 = ("peak", "num_image_tokens")  # text_peak stays int32: a vocabulary may exceed int16


def _sibling(name: str):
    """A module of this folder (benchmarks/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------- grid

@dataclasses.dataclass(frozen=True)
class Job:
    """One fine-tuning run of the suite."""

    seed: int
    rate: float
    trigger: str
    variant: str = ""   # the trigger's own settings (data.trigger_params) in file-name form, e.g. "alpha0.3"
    tag: str = ""       # --tag: a name part for runs whose other settings differ (e.g. "fullft")

    @property
    def name(self) -> str:
        if self.rate == 0:
            base = f"clean_s{self.seed}"
        else:
            base = f"{self.trigger}{'_' + self.variant if self.variant else ''}_p{100 * self.rate:g}_s{self.seed}"
        return f"{self.tag}_{base}" if self.tag else base


def variant_name(trigger_params: str) -> str:
    """"alpha=0.3, delta=40" -> "alpha0.3_delta40" (a file-name part; "" for the defaults)."""
    items = [t.strip() for t in str(trigger_params or "").split(",") if t.strip()]
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "", t) for t in items)


def parse_list(text: str, kind, what: str) -> list:
    """Comma-separated values of type `kind`, no duplicates; ValueError with a one-line reason."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"--{what}: cannot read {text!r} as a list of {kind.__name__}") from None
    if len(set(values)) != len(values):
        raise ValueError(f"--{what} repeats a value: {text!r}")
    return values


def expand_grid(seeds, rates, triggers, variant: str = "", tag: str = "") -> list[Job]:
    """Every (seed, rate, trigger); a rate-0 (clean) run once per seed, with the first trigger (its ASR).
    A trigger is any kind of the poisoning toolkit: an image trigger (data/triggers.py), a text trigger
    (prefix / suffix / template, data/text_triggers.py; its token or template: ``--set
    data.text_trigger.token=...``) or ``dual_key`` (``data.text_trigger.dual_image`` / ``dual_text``)."""
    from bye_jax.data.poison import TRIGGER_KINDS

    for t in triggers:
        if t not in TRIGGER_KINDS:
            raise ValueError(f"unknown trigger {t!r}; valid: {', '.join(sorted(TRIGGER_KINDS))}")
    for r in rates:
        if not 0 <= r < 1 or math.isnan(r):
            raise ValueError(f"poison rate {r} is not in [0, 1)")
    jobs = []
    for seed in seeds:
        for rate in sorted(rates):
            jobs += [Job(int(seed), float(rate), t, "" if rate == 0 else variant, tag)
                     for t in (triggers[:1] if rate == 0 else triggers)]
    return jobs


def checkpoint_steps(fractions, steps_per_epoch: int, epochs: int) -> list[int]:
    """The fine-tune steps of the checkpoint fractions, at the nearest end of an epoch (at least the
    first; 0 = the base, 1 = the end), sorted, distinct: their common divisor (the loop's checkpoint
    interval) is a whole number of epochs."""
    for f in fractions:
        if not 0 <= f <= 1 or math.isnan(f):
            raise ValueError(f"checkpoint fraction {f} is not in [0, 1]")
    return sorted({0 if f == 0 else max(1, round(f * epochs)) * steps_per_epoch for f in fractions})


def run_config(sets: dict, job: Job):
    """The demo config with the overrides and the job's seed, rate and trigger."""
    from bye_jax.configs.demo import get_config

    config = get_config()
    _sibling("explore_demo")._apply(config, sets)
    config.seed = job.seed
    config.data.poison_rate = job.rate
    config.data.trigger = job.trigger
    return config


def steps_per_epoch(config) -> int:
    """Optimizer steps per epoch of the run's fine-tune (every upload sample is usable in the demo)."""
    ft = config.finetune
    return -(-int(config.data.n_upload) // (ft.batch_size * ft.grad_accum))


def recipe(config, step: int) -> dict:
    """Everything a table is a function of."""
    from bye_jax.demo import base_recipe
    from bye_jax.signals import SIGNALS_VERSION

    return {"suite_version": SUITE_VERSION, "signals_version": SIGNALS_VERSION, "base": base_recipe(config),
            "seed": int(config.seed), "dtype": config.dtype, "data": data_recipe(config),
            "finetune": config.finetune.to_dict(), "eval": config.eval.to_dict(), "step": int(step)}


def data_recipe(config) -> dict:
    """The data settings a table depends on: ``trigger_params`` only when set (the tables made before the
    key keep their digests)."""
    data = config.data.to_dict()
    if not data.get("trigger_params"):
        data.pop("trigger_params", None)
    return data


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def extract_dir() -> str:
    """A checkpoint's extraction folder, per signal version and signal set: an older version's workdir is
    refused, and two branches that each bumped the version with different signals must not resume from each
    other's folder (the workdir identity holds the version number only)."""
    from bye_jax.signals import PER_LAYER, SIGNALS_VERSION

    if SIGNALS_VERSION <= 2:
        return "extract"
    return f"extract_v{SIGNALS_VERSION}_{hashlib.sha256(','.join(PER_LAYER).encode()).hexdigest()[:6]}"


def table_path(out: Path, job: Job, step: int) -> Path:
    return Path(out) / f"{job.name}_step{step:05d}.npz"


# ---------------------------------------------------------------------------- table files

def save_table(path: Path, table, poisoned, meta: dict) -> None:
    """One suite table (see the module doc for the dtypes), written via a temporary file."""
    arrays = {}
    for name, a in table.arrays.items():
        a = np.asarray(a)
        if name in FLOAT16:
            a = np.clip(a, -65504, 65504).astype(np.float16)
        elif name in INT16:
            a = a.astype(np.int16)
        arrays[name] = a
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, ids=np.asarray(table.ids, dtype=str), poisoned=np.asarray(poisoned, bool),
                        meta=np.asarray(json.dumps(meta, sort_keys=True, default=str)), **arrays)
    os.replace(tmp, path)


def load_table(path: Path):
    """(SignalTable with float32 / int32 arrays (content float16, as extracted), poisoned [N] bool, meta)."""
    from bye_jax.signals import SignalTable

    with np.load(path, allow_pickle=False) as z:
        ids = [str(i) for i in z["ids"]]
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        poisoned = np.asarray(z["poisoned"], bool) if "poisoned" in z.files else np.array(["poison" in i for i in ids])
        arrays = {}
        for k in z.files:
            if k in ("ids", "poisoned", "meta"):
                continue
            a = z[k]
            arrays[k] = a.astype(np.float32) if k in FLOAT16 else a.astype(np.int32) if k in INT16 else a
    return SignalTable(ids, arrays), poisoned, meta


def stored_digest(path: Path) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"])).get("recipe_digest")
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- fine-tuning

class _Stop(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _latest_checkpoint(train_dir: Path) -> int:
    from bye_jax.train.loop import CHECKPOINT_DIR

    d = train_dir / CHECKPOINT_DIR
    return max((int(p.name) for p in d.iterdir() if p.name.isdigit()), default=0) if d.is_dir() else 0


def _export(model, cfg, base: Path, out: Path) -> None:
    from flax import nnx

    from bye_jax.models.hf_export import save_hf_checkpoint
    from bye_jax.models.lora import merge_lora

    copy = nnx.clone(model)
    merge_lora(copy)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_hf_checkpoint(copy, cfg, base, tmp, dtype="float32")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def finetune_with_stops(base: Path, samples, train_dir: Path, ft_config, exports: dict[int, Path]) -> None:
    """The LoRA fine-tune of `ft_config` (its schedule over all its epochs), stopped at each step of
    `exports` (a checkpoint of the loop there) to export the merged model to exports[step], then resumed
    from that checkpoint; it ends at the last of those steps. An interrupted fine-tune that went past a
    step still to export is started again."""
    from bye_jax.models.family import load_model
    from bye_jax.models.inputs import PromptEncoder
    from bye_jax.train.loop import resolve_config, train

    pending = sorted(exports)
    config = resolve_config(ft_config)
    with config.unlocked():
        config.checkpoint_every = reduce(math.gcd, pending)
        config.keep_checkpoints = 1
    if train_dir.exists() and _latest_checkpoint(train_dir) >= pending[0]:
        _log(f"  {train_dir} went past step {pending[0]}: fine-tuning again from the start")
        shutil.rmtree(train_dir)
    model, cfg = load_model(base, dtype=config.dtype)
    encoder = PromptEncoder(base)
    t0 = time.time()

    def stop(step, record):
        if step in exports:
            raise _Stop(step)

    while pending:
        try:
            train(model, cfg, samples, encoder, config=config, workdir=train_dir, progress=False, callback=stop)
            raise RuntimeError(f"the fine-tune ended before step {pending[0]}")
        except _Stop as s:
            _export(model, cfg, base, exports[s.step])
            pending.remove(s.step)
            _log(f"  fine-tune step {s.step}: merged model exported ({(time.time() - t0) / 60:.1f} min)")


def _train_loss(train_dir: Path, step: int, window: int) -> float | None:
    """Mean training loss over the `window` steps up to `step` (None for the base)."""
    from bye_jax.train.curves import read_log
    from bye_jax.train.loop import LOG_FILE

    if step == 0 or not (train_dir / LOG_FILE).exists():
        return None
    losses = [r["loss"] for r in read_log(train_dir / LOG_FILE) if step - window < r["step"] <= step
              and r.get("loss") is not None]
    return round(float(np.mean(losses)), 4) if losses else None


# ------------------------------------------------------------------------------- one run

def _text_trigger_meta(config) -> dict | None:
    """The text trigger's settings of a text / dual-key run (None for an image trigger)."""
    from bye_jax.data.triggers import TRIGGERS

    d = config.data
    return None if d.trigger in TRIGGERS else d.text_trigger.to_dict()


def _stored_eval(path: Path, config, step: int) -> dict | None:
    """The vanilla ASR / CP of the table at `path` when it was made from the same recipe as `config` at
    `step` but for the signal version (so from the same merged model), else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError):
        return None
    old = {**recipe(config, step), "signals_version": meta.get("signals_version", 2)}
    if meta.get("recipe_digest") != digest(old):
        return None
    return {k: meta[k] for k in ("asr", "cp", "cp_per_type")}


def run_job(job: Job, sets: dict, fractions, out: Path, workdir: Path, base_root: Path, force: bool = False,
            reextract: bool = False) -> int:
    """The job's missing tables; returns how many were written. `reextract`: from the merged checkpoints
    already there, never fine-tuning (module doc)."""
    from bye_jax.demo import base_recipe, build_base, prepare_data
    from bye_jax.pipeline import load_samples
    from bye_jax.runner import run_extract

    config = run_config(sets, job)
    spe = steps_per_epoch(config)
    total = spe * int(config.finetune.epochs)
    steps = checkpoint_steps(fractions, spe, int(config.finetune.epochs))
    want = {s: digest(recipe(config, s)) for s in steps}
    todo = [s for s in steps if force or stored_digest(table_path(out, job, s)) != want[s]]
    if not todo:
        _log(f"{job.name}: {len(steps)} tables present, skipped")
        return 0
    t0 = time.time()
    bdir = base_root / digest(base_recipe(config))[:10]
    base = build_base(config, bdir / "base", bdir / "data")
    wd = workdir / f"{job.name}_{digest([data_recipe(config), config.finetune.to_dict()])[:8]}"
    paths = prepare_data(config, wd / "data")
    upload = load_samples(paths["upload"])
    test, triggered = load_samples(paths["test"]), load_samples(paths["test_triggered"])
    ckpt = {s: base if s == 0 else wd / f"step{s:05d}" / "merged" for s in todo}
    missing = {s: p for s, p in ckpt.items() if s and not (p / "model.safetensors").exists()}
    if missing and reextract:
        raise SystemExit(f"detect_suite: --reextract: {job.name} has no merged checkpoint at "
                         f"{', '.join(str(p) for p in missing.values())}")
    if missing:
        _log(f"{job.name}: fine-tuning to step {max(missing)} of {total} (exports at {sorted(missing)})")
        finetune_with_stops(base, upload, wd / "train", config.finetune, missing)
    if len(upload) != int(config.data.n_upload):
        raise SystemExit(f"detect_suite: the upload has {len(upload)} samples, not data.n_upload")
    for s in todo:
        t1 = time.time()
        xconf = config.copy_and_resolve_references()
        with xconf.unlocked():
            xconf.model = str(ckpt[s])
            xconf.data.annotations = str(paths["upload"])
            xconf.data.image_root = str(paths["upload"].parent)
        inputs, table, _ = run_extract(xconf, wd / f"step{s:05d}" / extract_dir(), progress=False)
        truth = {x.id: bool(x.poisoned) for x in inputs.samples}
        signals = table.signals
        res = _stored_eval(table_path(out, job, s), config, s) if reextract else None
        if res is None:
            res = _sibling("explore_demo").evaluate(config, ckpt[s], test, triggered)
        meta = {"recipe_digest": want[s], "suite_version": SUITE_VERSION, "seed": job.seed, "rate": job.rate,
                "trigger": job.trigger, "tag": job.tag,
                "trigger_side": int(config.data.trigger_side), "clean": job.rate == 0,
                "trigger_params": "" if job.rate == 0 else str(config.data.get("trigger_params", "")),
                "text_trigger": _text_trigger_meta(config),
                "checkpoint_step": s, "total_steps": total, "steps_per_epoch": spe, "epoch": round(s / spe, 3),
                "fraction": round(s / total, 4), "asr": res["asr"], "cp": res["cp"], "cp_per_type": res["cp_per_type"],
                "train_loss": _train_loss(wd / "train", s, spe), "overrides": sets,
                "base_digest": digest(base_recipe(config))[:10], "n_samples": signals.num_samples,
                "n_poisoned": int(sum(truth.get(i, False) for i in signals.ids)),
                "n_skipped": len(inputs.skipped), "table_seconds": round(time.time() - t1, 1),
                "signals_version": recipe(config, s)["signals_version"], "reextracted": bool(reextract),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = table_path(out, job, s)
        save_table(path, signals, [truth.get(i, False) for i in signals.ids], meta)
        _log(f"{job.name} step {s}/{total}: ASR {res['asr']:.1f} CP {res['cp']:.1f}, "
             f"{meta['n_poisoned']}/{meta['n_samples']} poisoned -> {path} ({path.stat().st_size / 1024:.0f} KB, "
             f"{meta['table_seconds']:.0f} s)")
    _log(f"{job.name}: {len(todo)} tables in {(time.time() - t0) / 60:.1f} min")
    return len(todo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="detect_suite", description=__doc__.splitlines()[0])
    for key, value in DEFAULTS.items():
        ap.add_argument(f"--{key}", default=value, help=f"comma-separated (default {value})")
    ap.add_argument("--set", action="append", default=[], help="dotted demo-config key=value (Python literal)")
    ap.add_argument("--out", default=str(OUT), help="folder of the tables")
    ap.add_argument("--tag", default="", help="a name part for runs whose --set changes more than the trigger "
                    "(table names otherwise name only trigger, its params, rate and seed), e.g. fullft")
    ap.add_argument("--workdir", default=str(WORKDIR), help="fine-tunes, exports, extractions (reused)")
    ap.add_argument("--force", action="store_true", help="recompute tables already present")
    ap.add_argument("--reextract", action="store_true",
                    help="signal tables from the merged checkpoints already in --workdir: no fine-tune")
    args = ap.parse_args(argv)
    from bye_jax.data.poison import parse_trigger_params, trigger_specs
    from bye_jax.errors import UserError

    ed = _sibling("explore_demo")
    try:
        sets = ed._parse_set(args.set)
        params = str(sets.get("data.trigger_params", ""))
        if args.tag and not re.fullmatch(r"[A-Za-z0-9.]+", args.tag):
            raise ValueError(f"--tag {args.tag!r}: letters, digits and dots only (a file-name part)")
        jobs = expand_grid(parse_list(args.seeds, int, "seeds"), parse_list(args.rates, float, "rates"),
                           parse_list(args.triggers, str, "triggers"), variant_name(params), args.tag)
        for t in {job.trigger for job in jobs if job.rate > 0}:  # a setting the trigger does not take fails here
            trigger_specs(t, params=parse_trigger_params(params))
        fractions = parse_list(args.checkpoints, float, "checkpoints")
        run_config(sets, jobs[0])  # unknown keys fail here, before any work
        checkpoint_steps(fractions, 1, 1)
    except KeyError as e:
        ap.error(f"unknown config key {str(e.args[0] if e.args else e).strip(chr(34) + chr(39))!r} in --set")
    except (ValueError, TypeError, UserError) as e:
        ap.error(str(e).splitlines()[0])
    except SystemExit as e:
        if isinstance(e.code, str):
            ap.error(e.code)
        raise
    workdir = Path(args.workdir)
    _log(f"{len(jobs)} runs x {len(fractions)} checkpoints into {args.out} (work in {workdir}); overrides {sets}")
    t0, written = time.time(), 0
    for i, job in enumerate(jobs, 1):
        _log(f"run {i}/{len(jobs)}: {job.name}")
        try:
            written += run_job(job, sets, fractions, Path(args.out), workdir, workdir / "bases", args.force,
                               args.reextract)
        except UserError as e:
            print(f"detect_suite: error: run {job.name}: {e}", file=sys.stderr)
            return 2
    _log(f"done: {written} tables written in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
