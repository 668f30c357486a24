"""Shared absl/ml_collections entry-point plumbing: flags, workdir, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

CONFIGS = Path(__file__).parent / "configs"


def define_flags(default_config: str | None) -> None:
    config_flags.DEFINE_config_file(
        "config", default_config, "Python config file with get_config() (see bye_jax/configs/).",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Output folder (created if missing).")


def run(main_fn, prog: str) -> None:
    """Runs main_fn(config, workdir) under absl; UserError -> one line on stderr, exit 2."""
    from bye_jax.runner import UserError

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.ERROR)
        config = flags.FLAGS.config
        if config is None:
            print(f"{prog}: error: no --config given (e.g. --config=bye_jax/configs/llava.py)", file=sys.stderr)
            return 2
        try:
            return main_fn(config, flags.FLAGS.workdir)
        except UserError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # extract.ExtractionInterrupted carries SIGTERM's 143
            print(f"{prog}: interrupted (computed rows are kept; rerun with the same --workdir to resume)",
                  file=sys.stderr)
            return getattr(e, "exit_code", 130)

    app.run(_main)
