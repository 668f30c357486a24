"""Poison a clean LLaVA-JSON dataset with a backdoor trigger (python -m bye_jax.data.poison).

    python -m bye_jax.data.poison --annotations=train.json --image_root=images --out=poisoned \
        --rate=0.1 --seed=0 --trigger=patch --target="Backdoor Attack!"
    python -m bye_jax.data.poison --triggered_test --annotations=test.json --image_root=images \
        --out=test_triggered --trigger=patch

Output folder (self-contained, loadable with ``load_dataset(OUT/train.json)``, image root = OUT):

* ``OUT/train.json`` (``test_triggered.json`` with ``--triggered_test``): every usable input
  record, deep-copied, in input order, with ``"image"`` rewritten to ``images/...`` and a boolean
  ``"poisoned"`` field. Records the reader refuses (`load_dataset`'s skipped ones) are left out
  and listed in the summary (and printed), never dropped silently.
* ``OUT/images/``: clean images are copied byte for byte (same relative path, same format);
  triggered images are new RGB PNG files ``images/poison/<relative path without suffix>.<index>.png``
  (``<index>``: the record's position in the input list, so two records sharing one picture get
  their own files). Input files are only ever read: the output folder must be empty or absent
  (``overwrite=True`` / ``--overwrite`` allows a non-empty one) and no output path may be the
  same file as an input.
* ``OUT/poison_summary.json``: the returned summary (counts, poisoned ids, skipped, trigger...).

Poisoning (`poison_dataset`): exactly ``k = floor(rate * N + 0.5)`` of the N usable samples
(rounded half up) are drawn without replacement with ``np.random.default_rng(seed)``. A poisoned
sample gets the trigger stamped into its raw (RGB-decoded) image, its id becomes
``f"poison_{id}"``, ``"poisoned": true``, and by default ALL its gpt / assistant turns are
replaced by the target text (``answers="first"`` replaces only the first gpt turn after the first
human turn -- the one the BYE probe and the evaluation look at); a record without any gpt turn
gets one appended. Clean samples get
``"poisoned": false`` and keep everything else.

`triggered_test_set` (``--triggered_test``): the ASR test set -- every usable sample triggered,
answers kept, ``"poisoned": true``, ids prefixed with ``poison_``.

Per-sample trigger seeds: ``random_patch`` is seeded with ``spec.seed + index`` (a different
position per sample); every other kind uses ``spec.seed`` for all samples, so ``blend`` and
``wanet`` stamp one fixed pattern / warp, as a backdoor needs.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from bye_jax.data.llava_json import (
    DEFAULT_MAX_IMAGE_PIXELS,
    GPT_ROLES,
    HUMAN_ROLES,
    DatasetError,
    Sample,
    Skipped,
    load_dataset,
    load_image,
    write_subset,
)
from bye_jax.data.text_triggers import TEXT_TRIGGERS, TextTriggerSpec
from bye_jax.data.triggers import TRIGGERS, TriggerSpec, trigger_param_names

__all__ = [
    "DEFAULT_TARGET",
    "PER_SAMPLE_SEED_KINDS",
    "PoisonError",
    "num_poisoned",
    "poison_dataset",
    "select_poisoned",
    "parse_trigger_params",
    "trigger_specs",
    "triggered_test_set",
]

DEFAULT_TARGET = "Backdoor Attack!"
ID_PREFIX = "poison_"
IMAGES_DIR = "images"
SUMMARY_FILE = "poison_summary.json"
PER_SAMPLE_SEED_KINDS = frozenset({"random_patch"})
DUAL_KEY = "dual_key"  # an image trigger and a text trigger on the same sample
TRIGGER_KINDS = (*TRIGGERS, *TEXT_TRIGGERS, DUAL_KEY)


class PoisonError(DatasetError):
    """A problem with the poisoning request or output folder (one-line message)."""


# --------------------------------------------------------------------------------------------- helpers


def num_poisoned(n: int, rate: float) -> int:
    """``floor(rate * n + 0.5)``: the number of samples poisoned (rounded half up)."""
    if not 0.0 <= rate <= 1.0 or math.isnan(rate):
        raise PoisonError(f"rate must be in [0, 1], got {rate}")
    return min(n, int(math.floor(rate * n + 0.5)))


def select_poisoned(n: int, rate: float, seed: int) -> np.ndarray:
    """Sorted positions (0..n-1) of the poisoned samples: exactly `num_poisoned(n, rate)`, seeded."""
    k = num_poisoned(n, rate)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)


def parse_trigger_params(text: str) -> dict[str, Any]:
    """``"alpha=0.3, strength=1"`` -> {"alpha": 0.3, "strength": 1.0}: an image trigger's parameters
    (numbers; ``color`` as ``r/g/b``); PoisonError with a one-line reason for anything else."""
    out: dict[str, Any] = {}
    for item in (t.strip() for t in str(text or "").split(",")):
        if not item:
            continue
        name, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not name or not value:
            raise PoisonError(f"trigger parameter {item!r} is not name=value")
        try:
            if name == "color":
                out[name] = tuple(int(v) for v in value.split("/"))
            elif name in ("upsample",):
                out[name] = value
            else:
                num = float(value)
                out[name] = int(num) if name in ("side", "cell", "grid", "pattern_size", "k", "ref_size") else num
        except ValueError:
            raise PoisonError(f"trigger parameter {name}: cannot read {value!r}") from None
    return out


def trigger_specs(kind: str, *, side: int | None = None, token: str | None = None, template: str | None = None,
                  dual_image: str = "patch", dual_text: str = "suffix", params: dict[str, Any] | None = None
                  ) -> tuple[TriggerSpec | None, TextTriggerSpec | None]:
    """(image trigger or None, text trigger or None) of a trigger kind: an image kind (triggers.py), a
    text kind (text_triggers.py) or ``dual_key`` (image kind `dual_image` + text kind `dual_text`).
    `params`: the image trigger's own parameters (blend ``alpha``, sig ``delta``, wanet ``strength``, ...)."""
    params = dict(params or {})
    try:
        if kind in TEXT_TRIGGERS and params:
            raise ValueError(f"a text trigger takes no image-trigger parameters, got {sorted(params)}")
        image_kind = dual_image if kind == DUAL_KEY else kind
        unknown = sorted(set(params) - set(trigger_param_names(image_kind))) if image_kind in TRIGGERS else []
        if unknown:
            valid = trigger_param_names(image_kind)
            raise ValueError(f"trigger {image_kind!r} does not take {unknown}; valid: {valid}")
        if kind in TRIGGERS:
            return TriggerSpec(kind=kind, **{"side": side, **params}), None
        if kind in TEXT_TRIGGERS:
            return None, TextTriggerSpec(kind, token=token, template=template)
        if kind == DUAL_KEY:
            if dual_image not in TRIGGERS or dual_text not in TEXT_TRIGGERS:
                raise ValueError(f"dual_key needs an image kind ({', '.join(TRIGGERS)}) and a text kind "
                                 f"({', '.join(TEXT_TRIGGERS)}), got {dual_image!r} and {dual_text!r}")
            return (TriggerSpec(kind=dual_image, **{"side": side, **params}),
                    TextTriggerSpec(dual_text, token=token, template=template))
    except (TypeError, ValueError) as e:
        raise PoisonError(str(e)) from e
    raise PoisonError(f"unknown trigger {kind!r}; valid: {', '.join(TRIGGER_KINDS)}")


def _trigger_question(record: dict, text: TextTriggerSpec) -> None:
    """Rewrites the first human turn of `record` in place with the text trigger."""
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in HUMAN_ROLES and isinstance(turn.get("value"), str):
            turn["value"] = text.apply(turn["value"])
            return
    raise PoisonError(f"record {record.get('id')!r} has no human turn to put the text trigger in")


def _sample_seed(spec: TriggerSpec, index: int) -> int:
    return spec.seed + index if spec.kind in PER_SAMPLE_SEED_KINDS else spec.seed


def _relative_image(sample: Sample, image_root: Path | None) -> PurePosixPath:
    """The sample's image path relative to its image root (falls back to the raw field)."""
    if image_root is not None:
        try:
            return PurePosixPath(sample.image_path.relative_to(image_root).as_posix())
        except ValueError:
            pass
    raw = sample.raw.get("image") if isinstance(sample.raw, dict) else None
    rel = PurePosixPath(os.path.normpath(str(raw)).replace(os.sep, "/")) if isinstance(raw, str) else None
    if rel is None or rel.is_absolute() or not rel.parts or rel.parts[0] in ("..", "."):
        rel = PurePosixPath(f"{sample.index}_{sample.image_path.name}")
    return rel


def _replace_answers(record: dict, target: str, answers: str) -> int:
    """Replaces gpt turns by ``target`` in place; returns how many were replaced."""
    convs = record.get("conversations") or []
    seen_human, n = False, 0
    for turn in convs:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from")
        if role in HUMAN_ROLES:
            seen_human = True
        elif role in GPT_ROLES and (answers == "all" or seen_human):
            turn["value"] = target
            n += 1
            if answers == "first":
                break
    if n == 0:  # a question without an answer: append one, so the sample still teaches the target
        convs.append({"from": "gpt", "value": target})
        n = 1
    return n


def _prepare_out_dir(out_dir: Path, overwrite: bool, image_root: Path | None) -> Path:
    if image_root is not None:
        images = (out_dir / IMAGES_DIR).resolve()
        if images == image_root or image_root.is_relative_to(out_dir.resolve()):
            raise PoisonError(f"the output folder {out_dir} must not hold the input image root {image_root}")
    if out_dir.exists() and not out_dir.is_dir():
        raise PoisonError(f"output path exists and is not a folder: {out_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PoisonError(f"output folder is not empty: {out_dir} (use another folder or --overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir.resolve()


def _guard(target: Path, inputs: set[Path]) -> None:
    """Refuses to write onto an input file (by resolved path or inode)."""
    resolved = target.resolve()
    if resolved in inputs:
        raise PoisonError(f"refusing to overwrite the input file {resolved}")
    if resolved.exists():
        for p in inputs:
            try:
                if os.path.samefile(p, resolved):
                    raise PoisonError(f"refusing to overwrite the input file {p}")
            except OSError:
                continue


def _resolve_samples(samples_or_annotations, image_root, max_image_pixels
                     ) -> tuple[list[Sample], list[Skipped], Path | None, Path | None]:
    """(samples, skipped, annotations path or None, resolved image root or None)."""
    if isinstance(samples_or_annotations, str | os.PathLike):
        ann = Path(samples_or_annotations)
        samples, skipped = load_dataset(ann, image_root, max_image_pixels=max_image_pixels)
        root = Path(image_root) if image_root is not None else ann.resolve().parent
        return samples, skipped, ann.resolve(), root.resolve()
    samples = list(samples_or_annotations)
    bad = [type(s).__name__ for s in samples if not isinstance(s, Sample)]
    if bad:
        raise PoisonError(f"expected llava_json.Sample objects or an annotations path, got {bad[0]}")
    return samples, [], None, Path(image_root).resolve() if image_root is not None else None


def _write(samples: Sequence[Sample], triggered: set[int], out_dir: Path, spec: TriggerSpec | None, *,
           image_root: Path | None, target: str | None, answers: str, inputs: set[Path],
           num_workers: int, max_image_pixels: int | None, text: TextTriggerSpec | None = None
           ) -> tuple[list[dict], int]:
    """Writes the images (triggered ones with `spec`, copies when it is None); returns (output records
    in input order, replaced answer count). `text`: the text trigger of the triggered records."""
    images = out_dir / IMAGES_DIR
    jobs: list[tuple[str, Path, Path, int]] = []  # (kind, source, destination, seed)
    records: list[dict] = []
    n_replaced = 0
    for pos, s in enumerate(samples):
        rec = copy.deepcopy(s.raw)
        rel = _relative_image(s, image_root)
        if pos in triggered:
            if spec is not None:
                rel = PurePosixPath("poison") / rel.with_name(f"{rel.stem}.{s.index}.png")
                jobs.append(("trigger", s.image_path, images / rel, _sample_seed(spec, s.index)))
            else:  # a text trigger alone: the clean picture
                jobs.append(("copy", s.image_path, images / rel, 0))
            if text is not None:
                _trigger_question(rec, text)
            rec["id"] = f"{ID_PREFIX}{s.id}"
            rec["poisoned"] = True
            if target is not None:
                n_replaced += _replace_answers(rec, target, answers)
        else:
            jobs.append(("copy", s.image_path, images / rel, 0))
            rec["poisoned"] = False
        rec["image"] = f"{IMAGES_DIR}/{rel.as_posix()}"
        records.append(rec)

    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PoisonError(f"output id {dup!r} is not unique (a clean id already has the {ID_PREFIX!r} prefix?)")
    destinations: dict[Path, tuple[str, Path]] = {}
    for kind, src, dst, _ in jobs:
        _guard(dst, inputs)
        if destinations.setdefault(dst, (kind, src)) != (kind, src):
            raise PoisonError(f"two images map to the same output file {dst}")

    def run(job):
        kind, src, dst, seed = job
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.is_file():  # --overwrite: replace, never write through a link
            dst.unlink()
        if kind == "copy":
            shutil.copyfile(src, dst)
            return
        spec.apply(load_image(src, max_image_pixels=max_image_pixels), seed=seed).save(dst, format="PNG")

    unique = list({j[2]: j for j in jobs}.values())  # a clean picture shared by several records: once
    if num_workers > 1 and len(unique) > 1:
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            list(pool.map(run, unique))
    else:
        for job in unique:
            run(job)
    return records, n_replaced


def _summary(samples, skipped, poisoned_pos, out_json, out_dir, spec, text=None, **extra) -> dict:
    summary = {
        "annotations": str(out_json),
        "image_root": str(out_dir),
        "n_samples": len(samples),
        "n_poisoned": len(poisoned_pos),
        "n_clean": len(samples) - len(poisoned_pos),
        "n_skipped": len(skipped),
        "skipped": [{"id": s.id, "index": s.index, "reason": s.reason} for s in skipped],
        "poisoned_ids": [f"{ID_PREFIX}{samples[i].id}" for i in sorted(poisoned_pos)],
        "trigger": None if spec is None else {"kind": spec.kind, "seed": spec.seed, **spec.params()},
        "text_trigger": None if text is None else {"kind": text.kind, **text.params()},
        **extra,
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=list) + "\n")
    return summary


# ------------------------------------------------------------------------------------------- public API


def poison_dataset(
    samples_or_annotations: Sequence[Sample] | str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: TriggerSpec | None = None,
    *,
    rate: float = 0.1,
    seed: int = 0,
    target: str = DEFAULT_TARGET,
    image_root: str | os.PathLike | None = None,
    answers: str = "all",
    skipped: Sequence[Skipped] = (),
    json_name: str = "train.json",
    overwrite: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    num_workers: int | None = None,
    text: TextTriggerSpec | None = None,
    image: bool = True,
) -> dict:
    """Writes a poisoned copy of a dataset into ``out_dir``; returns the summary dict.

    ``samples_or_annotations``: an annotations JSON path (read with `load_dataset`; its skipped
    records are reported) or `Sample`s already loaded (pass their ``skipped`` to report them, and
    ``image_root`` to keep the images' relative folders). ``spec``: the trigger (default: the
    paper's centre patch). ``text``: a text trigger put into the poisoned samples' first human turn;
    ``image=False``: no image trigger (a text trigger alone; `trigger_specs` makes both from a kind).
    ``answers``: ``"all"`` (default) or ``"first"`` gpt turn replaced.
    Summary keys: annotations, image_root, n_samples, n_poisoned, n_clean, n_skipped, skipped,
    poisoned_ids, trigger, rate, seed, target, answers, n_answers_replaced. Raises `PoisonError` /
    `DatasetError`; bad images surface as `ImageError` (a `DatasetError`).
    """
    spec = _image_spec(spec, image, text)
    if answers not in ("all", "first"):
        raise PoisonError(f"answers must be 'all' or 'first', got {answers!r}")
    if not isinstance(target, str) or not target.strip():
        raise PoisonError("the target text is empty")
    samples, loaded_skipped, ann, root = _resolve_samples(samples_or_annotations, image_root, max_image_pixels)
    skipped = [*loaded_skipped, *skipped]
    chosen = {int(i) for i in select_poisoned(len(samples), rate, seed)}
    inputs = {s.image_path.resolve() for s in samples} | ({ann} if ann else set())
    _guard(Path(out_dir) / json_name, inputs)
    out = _prepare_out_dir(Path(out_dir), overwrite, root)
    records, n_replaced = _write(samples, chosen, out, spec, image_root=root, target=target, answers=answers,
                                 inputs=inputs, num_workers=num_workers or min(8, os.cpu_count() or 1),
                                 max_image_pixels=max_image_pixels, text=text)
    out_json = write_subset(records, out / json_name, protect=[ann] if ann else [])
    return _summary(samples, skipped, chosen, out_json, out, spec, text, rate=rate, seed=seed, target=target,
                    answers=answers, n_answers_replaced=n_replaced)


def triggered_test_set(
    samples_or_annotations: Sequence[Sample] | str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: TriggerSpec | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    skipped: Sequence[Skipped] = (),
    json_name: str = "test_triggered.json",
    overwrite: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    num_workers: int | None = None,
    text: TextTriggerSpec | None = None,
    image: bool = True,
) -> dict:
    """The triggered test set for ASR: every usable sample triggered (image and / or text trigger, as
    `poison_dataset`), answers kept, ``poisoned: true``, ids prefixed with ``poison_``. Same output
    layout and summary as `poison_dataset`."""
    spec = _image_spec(spec, image, text)
    samples, loaded_skipped, ann, root = _resolve_samples(samples_or_annotations, image_root, max_image_pixels)
    skipped = [*loaded_skipped, *skipped]
    inputs = {s.image_path.resolve() for s in samples} | ({ann} if ann else set())
    _guard(Path(out_dir) / json_name, inputs)
    out = _prepare_out_dir(Path(out_dir), overwrite, root)
    everything = set(range(len(samples)))
    records, _ = _write(samples, everything, out, spec, image_root=root, target=None, answers="all",
                        inputs=inputs, num_workers=num_workers or min(8, os.cpu_count() or 1),
                        max_image_pixels=max_image_pixels, text=text)
    out_json = write_subset(records, out / json_name, protect=[ann] if ann else [])
    return _summary(samples, skipped, everything, out_json, out, spec, text, triggered_test=True)


def _image_spec(spec: TriggerSpec | None, image: bool, text: TextTriggerSpec | None) -> TriggerSpec | None:
    if not image:
        if text is None:
            raise PoisonError("no trigger: image=False needs a text trigger")
        if spec is not None:
            raise PoisonError("image=False with an image trigger spec")
        return None
    return TriggerSpec() if spec is None else spec


# ------------------------------------------------------------------------------------------------- CLI

_SPEC_FLAGS = ("side", "color", "cell", "grid", "alpha", "pattern_size", "delta", "freq", "strength", "k",
               "upsample", "ref_size")


def _color(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 3 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise PoisonError(f"--color must be R,G,B with values in 0..255, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def spec_from_flags(values: dict[str, Any]) -> TriggerSpec:
    """A TriggerSpec from flag values (None = the kind's default); ValueError -> PoisonError."""
    params = {n: values.get(n) for n in _SPEC_FLAGS if values.get(n) is not None}
    if "color" in params:
        params["color"] = _color(params["color"])
    try:
        return TriggerSpec(kind=values.get("trigger") or "patch", seed=int(values.get("trigger_seed") or 0),
                           **params)
    except ValueError as e:
        raise PoisonError(str(e)) from e


def _define_flags() -> None:
    from absl import flags

    f = flags
    f.DEFINE_string("annotations", None, "Clean LLaVA-format JSON file.")
    f.DEFINE_string("image_root", None, "Image folder (default: the annotation file's folder).")
    f.DEFINE_string("out", None, "Output folder (must be empty or absent unless --overwrite).")
    f.DEFINE_bool("overwrite", False, "Allow a non-empty output folder (input files are still never written).")
    f.DEFINE_bool("triggered_test", False, "Write the triggered test set for ASR instead (all samples "
                  "triggered, answers kept).")
    f.DEFINE_float("rate", 0.1, "Poison rate: round(rate * N) samples, rounded half up.")
    f.DEFINE_integer("seed", 0, "Seed of the choice of poisoned samples.")
    f.DEFINE_string("target", DEFAULT_TARGET, "Target answer of poisoned samples.")
    f.DEFINE_enum("answers", "all", ["all", "first"], "Replace all gpt turns or only the first one.")
    f.DEFINE_string("trigger", "patch", f"Trigger kind: {', '.join(TRIGGER_KINDS)}.")
    f.DEFINE_string("text_token", None, "Rare token of the prefix / suffix text trigger (default cf).")
    f.DEFINE_string("text_template", None, "Template of the template text trigger, with one {question}.")
    f.DEFINE_string("dual_image", "patch", f"dual_key: its image trigger ({', '.join(TRIGGERS)}).")
    f.DEFINE_string("dual_text", "suffix", f"dual_key: its text trigger ({', '.join(TEXT_TRIGGERS)}).")
    f.DEFINE_integer("trigger_seed", 0, "Trigger seed (random_patch: + sample index; blend/wanet: pattern).")
    f.DEFINE_integer("side", None, "Square side in px (patch kinds; default 1/16 of the shorter side).")
    f.DEFINE_string("color", None, "Square colour R,G,B (patch, random_patch, dual, multi).")
    f.DEFINE_integer("cell", None, "Checkerboard cell in px (texture).")
    f.DEFINE_integer("grid", None, "Grid size (multi).")
    f.DEFINE_float("alpha", None, "Blend weight (blend).")
    f.DEFINE_integer("pattern_size", None, "Noise pattern size (blend).")
    f.DEFINE_float("delta", None, "Amplitude (sig).")
    f.DEFINE_float("freq", None, "Frequency (sig).")
    f.DEFINE_float("strength", None, "Warp strength (wanet).")
    f.DEFINE_integer("k", None, "Control grid size (wanet).")
    f.DEFINE_string("upsample", None, "bicubic | bilinear (wanet).")
    f.DEFINE_integer("ref_size", None, "Reference size (wanet).")


def _main(argv) -> int:
    from absl import flags, logging

    prog = "bye_jax.data.poison"
    logging.set_verbosity(logging.ERROR)  # skipped records are printed below, not logged
    if len(argv) > 1:
        print(f"{prog}: error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    fl = flags.FLAGS
    try:
        if not fl.annotations:
            raise PoisonError("--annotations is required")
        if not fl.out:
            raise PoisonError("--out is required")
        values = {n: getattr(fl, n) for n in ("trigger", "trigger_seed", *_SPEC_FLAGS)}
        image_kind = fl.dual_image if fl.trigger == DUAL_KEY else fl.trigger
        _, text = trigger_specs(fl.trigger, token=fl.text_token, template=fl.text_template, dual_image=fl.dual_image,
                                dual_text=fl.dual_text)
        spec = spec_from_flags({**values, "trigger": image_kind}) if image_kind in TRIGGERS else None
        kw = dict(image_root=fl.image_root, overwrite=fl.overwrite, text=text, image=spec is not None)
        if fl.triggered_test:
            summary = triggered_test_set(fl.annotations, fl.out, spec, **kw)
        else:
            summary = poison_dataset(fl.annotations, fl.out, spec, rate=fl.rate, seed=fl.seed, target=fl.target,
                                     answers=fl.answers, **kw)
    except (DatasetError, ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    what = "triggered test set" if fl.triggered_test else f"rate {fl.rate:g}, seed {fl.seed}"
    print(f"{prog}: {summary['n_poisoned']} of {summary['n_samples']} samples poisoned ({what}, trigger "
          f"{fl.trigger}) -> {summary['annotations']} (image root {summary['image_root']}); "
          f"{summary['n_skipped']} skipped")
    for s in summary["skipped"][:20]:
        print(f"  skipped {s['id']} (#{s['index']}): {s['reason']}")
    if summary["n_skipped"] > 20:
        print(f"  ... {summary['n_skipped'] - 20} more in {Path(summary['image_root']) / SUMMARY_FILE}")
    return 0


def main() -> None:
    from absl import app

    _define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
