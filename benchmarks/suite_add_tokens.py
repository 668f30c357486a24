r"""Adds the token signals (``user_tokens``: SIGNALS_VERSION 5, ``answer_tokens``: 6) to detection-suite tables
made before them.

    python benchmarks/suite_add_tokens.py [--out=benchmarks/data/detect_suite] [--workdir=runs/detect_suite]

Neither is an attention signal: ``user_tokens`` are the user text's token ids, ``answer_tokens`` the upload's
answer's (bye_jax/signals.py), functions of the upload and the processor alone, so a table made before them
needs no new fine-tune or extraction to get them. Per table (benchmarks/detect_suite.py's files):

* the run's config is rebuilt from the table's meta (seed, rate, trigger, overrides) and must give the
  recipe digest stored in the table at its signal version (the same data, fine-tune and model), else the
  table is left alone and reported;
* the upload is made again (`demo.prepare_data`, in the suite's workdir folder of the run, cached there);
  its samples must be the table's ids with the same poisoned labels;
* a missing ``user_tokens``: the questions are encoded by the demo base's processor with their images, and
  `prompt_segments` + `user_tokens` (bye_jax/signals_compute.py) read the ids as extraction does; a missing
  ``answer_tokens``: the answers through `PromptEncoder.answer_tokens`, as extraction does;
* the table is rewritten with the arrays added, the current ``signals_version`` and its recipe digest, and
  ``<name>_added: true`` in its meta for each; every other array is unchanged.

A table already at the current version is skipped. `--reextract` of detect_suite.py from the merged checkpoints,
where they still exist, gave byte-identical tables (every array, the same digest) on the suffix 3% run's three
checkpoints (BENCHMARKS.md "Text triggers: the inserted detector").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from detect_suite import _sibling  # noqa: E402  (benchmarks/ is not a package)


def question_tokens(encoder, samples, batch_size: int = 64) -> np.ndarray:
    """[N, USER_TOKENS] int32 user-text token ids of `samples`, as extraction computes them."""
    import jax.numpy as jnp

    from bye_jax.data.llava_json import load_image
    from bye_jax.signals_compute import prompt_segments, user_tokens

    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = [load_image(s.image_path, reduce_to=encoder.image_side) for s in chunk]
        b = encoder.encode(images, [s.question for s in chunk])
        prefix = b.answer_prefix if b.answer_prefix is not None else np.zeros(len(chunk), np.int32)
        seg = prompt_segments(jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask), encoder.image_token_id,
                              jnp.asarray(np.asarray(prefix, np.int32)))
        out.append(np.asarray(user_tokens(jnp.asarray(b.input_ids), seg)))
    return np.concatenate(out)


def add_tokens(path: Path, workdir: Path) -> str:
    """Adds the token signals one table lacks; returns what was done (one line)."""
    from bye_jax.demo import base_recipe, build_base, prepare_data
    from bye_jax.models import family
    from bye_jax.pipeline import load_samples
    from bye_jax.signals import ANSWER_TOKENS, SIGNALS_VERSION

    ds = _sibling("detect_suite")
    table, poisoned, meta = ds.load_table(path)
    if meta.get("signals_version") == SIGNALS_VERSION:
        return "already at the current signal version, skipped"
    sets = dict(meta.get("overrides") or {})
    job = ds.Job(int(meta["seed"]), float(meta["rate"]), str(meta["trigger"]),
                 ds.variant_name(str(sets.get("data.trigger_params", ""))), str(meta.get("tag", "")))
    config = ds.run_config(sets, job)
    step = int(meta["checkpoint_step"])
    old = {**ds.recipe(config, step), "signals_version": meta.get("signals_version")}
    if ds.digest(old) != meta.get("recipe_digest"):
        return "its recipe does not rebuild from its meta (digest differs): left alone"
    wd = workdir / f"{job.name}_{ds.digest([ds.data_recipe(config), config.finetune.to_dict()])[:8]}"
    upload = load_samples(prepare_data(config, wd / "data")["upload"])
    by_id = {s.id: s for s in upload}
    if set(table.ids) - set(by_id):
        return "the re-made upload lacks some of its ids: left alone"
    samples = [by_id[i] for i in table.ids]
    if not np.array_equal([bool(s.poisoned) for s in samples], poisoned):
        return "the re-made upload's labels differ: left alone"
    bdir = workdir / "bases" / ds.digest(base_recipe(config))[:10]
    encoder = family.load_encoder(build_base(config, bdir / "base", bdir / "data"))
    added = []
    if not table.has("user_tokens"):
        table.arrays["user_tokens"] = question_tokens(encoder, samples)
        added.append("user_tokens")
    if not table.has("answer_tokens"):
        table.arrays["answer_tokens"] = encoder.answer_tokens([s.answer for s in samples], ANSWER_TOKENS)
        added.append("answer_tokens")
    meta.update(signals_version=SIGNALS_VERSION, recipe_digest=ds.digest(ds.recipe(config, step)),
                **{f"{name}_added": True for name in added})
    # load_table widened the stored float16 / int16 arrays; save_table narrows them back to the same values
    ds.save_table(path, table, poisoned, meta)
    return f"{' and '.join(added) or 'nothing'} added ({len(samples)} samples)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="suite_add_tokens", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/data/detect_suite", help="folder of the suite's tables")
    ap.add_argument("--workdir", default="runs/detect_suite", help="the suite's workdir (data and bases, reused)")
    args = ap.parse_args(argv)
    paths = sorted(Path(args.out).glob("*.npz"))
    if not paths:
        ap.error(f"no tables in {args.out}")
    t0 = time.time()
    for i, path in enumerate(paths, 1):
        what = add_tokens(path, Path(args.workdir))
        print(f"[{i}/{len(paths)} {time.time() - t0:.0f}s] {path.name}: {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
