"""python -m bye_jax.extract: the extraction command (library code in bye_jax/extract/__init__.py).

    python -m bye_jax.extract --config=bye_jax/configs/llava.py --config.model=DIR ... --workdir=OUT
"""

from __future__ import annotations

from pathlib import Path

from bye_jax.extract import ENTROPY_FILE
from bye_jax.signals import SIGNALS_FILE


def main() -> None:
    """python -m bye_jax.extract --config=bye_jax/configs/llava.py --config.model=DIR ... --workdir=OUT"""
    from bye_jax import cli, multihost
    from bye_jax.runner import UserError, run_extract

    cli.define_flags(None)

    def _run(config, workdir):
        if not workdir:
            raise UserError("--workdir is required")
        inputs, table, _ = run_extract(config, Path(workdir))
        if not multihost.is_primary():  # process 0 wrote the files and reports them
            return 0
        print(f"extract: {len(table.ids)} samples x {table.num_layers} layers -> {Path(workdir) / ENTROPY_FILE}, "
              f"{SIGNALS_FILE} ({len(inputs.skipped)} skipped)")
        for s in inputs.skipped[:20]:
            print(f"  skipped {s.id}: {s.reason}")
        return 0

    cli.run(_run, "bye_jax.extract")


if __name__ == "__main__":
    main()
