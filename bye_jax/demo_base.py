r"""Builds the built-in demo's pre-trained base once and writes it into the package.

    python -m bye_jax.demo_base                          # regenerates bye_jax/assets/demo_base (CPU minutes)
    python -m bye_jax.demo_base --workdir=/tmp/base      # elsewhere (config overrides as for the demo)

The base is a function of the demo config's arch, pre-training settings, `base_seed` and benchmark
generator only (its recipe, demo_base.json), never of the run's seed. The demo (`bye_jax.demo`) uses
the shipped base whenever its config's recipe matches, so every run starts from the same weights
whatever the CPU, and pre-trains its own otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def build(config, out: Path) -> Path:
    """Pre-trains the base of `config` (from scratch) and writes it to `out`, replacing what is there."""
    from bye_jax.demo import pretrain_base

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="demo_base_") as tmp:
        tmp = Path(tmp)
        pretrain_base(config, tmp / "base", tmp / "data", tmp / "train")
        staging = out.with_name(out.name + ".tmp")
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(tmp / "base", staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _run(config, workdir) -> int:
    from bye_jax.demo import BASE_ASSET

    out = build(config, Path(workdir) if workdir else BASE_ASSET)
    files = sorted(f for f in out.iterdir() if f.is_file())
    print(f"base written to {out} ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB)")
    for f in files:
        print(f"  {f.name}  {f.stat().st_size:,} bytes")
    return 0


def main() -> None:
    from bye_jax import cli

    cli.define_flags(os.fspath(cli.CONFIGS / "demo.py"))
    cli.run(_run, "bye_jax.demo_base")


if __name__ == "__main__":
    main()
