"""BYE filter: find poisoned samples in a fine-tuning upload (python -m bye_jax.filter).

    python -m bye_jax.filter --config=bye_jax/configs/llava.py --config.model=CKPT \
        --config.data.annotations=train.json --config.data.image_root=images --workdir=OUT

Writes OUT/entropy.jsonl, report.json, clean.json, flagged.json and PNG plots, then prints a
summary. `--config.entropy_file=FILE` clusters an existing entropy.jsonl instead of extracting.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.py"
DEMO_OUTPUTS = ("data", "base", "base.tmp", "base_pretrain")  # what the demo writes besides the pipeline's


def _run(config, workdir) -> int:
    from bye_jax.errors import UserError

    if not workdir:
        workdir = getattr(config, "workdir", "") or None
    if not workdir:
        raise UserError("--workdir is required")
    if getattr(config, "demo", False):
        from bye_jax.demo import run_demo
        from bye_jax.pipeline import OUTPUTS, claim_pipeline

        with claim_pipeline(workdir, DEMO_OUTPUTS + OUTPUTS) as wd, wd.writing(*DEMO_OUTPUTS):  # process 0 writes
            return run_demo(config, Path(workdir))
    from bye_jax.runner import run_filter, summary

    report = run_filter(config, Path(workdir))
    if report is None:  # a process other than 0 of a multi-process run: process 0 reports
        return 0
    print(summary(report, Path(workdir)))
    for s in report["skipped"][:20]:
        print(f"  skipped {s['id']}: {s['reason']}")
    if len(report["skipped"]) > 20:
        print(f"  ... {len(report['skipped']) - 20} more in report.json")
    return 0


def main() -> None:
    from bye_jax import cli

    cli.define_flags(str(DEMO_CONFIG) if DEMO_CONFIG.exists() else None)
    cli.run(_run, "bye_jax.filter")


if __name__ == "__main__":
    main()
