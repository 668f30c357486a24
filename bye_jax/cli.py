"""Shared absl/ml_collections entry-point plumbing: flags, workdir, one-line errors.

Every failure a user can cause reaches the terminal as one line `prog: error: ...` and a non-zero
exit: bad flags and config overrides (exit 2), a UserError (2), an operating-system error such as
a full disk (1). Ctrl-C prints one line and exits 130, SIGTERM 143; both leave through the
`finally` blocks (workdir locks are released) and then exit without interpreter teardown.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from bye_jax.errors import UserError, one_line

CONFIGS = Path(__file__).parent / "configs"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (flushes, releases locks)."""


def define_flags(default_config: str | None) -> None:
    config_flags.DEFINE_config_file(
        "config", default_config, "Python config file with get_config() (see bye_jax/configs/).",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Output folder (created if missing).")


def _exit(prog: str, message: str, code: int) -> None:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_key(argv: list[str], key: str) -> str:
    """The --config.a.b override naming `key` (absl reports only the last part)."""
    for a in argv:
        name = a.split("=", 1)[0]
        if name.startswith("--config.") and name.rsplit(".", 1)[-1] == key:
            return name[2:]
    return f"config.{key}"


def parse_flags(argv: list[str], prog: str) -> list[str]:
    """absl's flag parsing and the config file / overrides, each failure as one line (exit 2)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _exit(prog, f"error: {one_line(e)}", 2)
    except (AttributeError, KeyError) as e:  # an override naming a key the config does not have
        key = one_line(e.args[0] if e.args else e).strip("'\"")
        if "." not in key and " " not in key:
            _exit(prog, f"error: unknown config key {_unknown_key(argv, key)} (not in the --config file)", 2)
        _config_failed(argv, prog, e)
    except Exception as e:  # noqa: BLE001 - whatever executing a config file raised
        _config_failed(argv, prog, e)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
        try:
            flags.FLAGS.config.get("workdir")  # a config file that failed to load raises on first use
        except Exception as e:  # noqa: BLE001
            _config_failed(argv, prog, e)
    return rest


def _config_failed(argv: list[str], prog: str, e: BaseException) -> None:
    path = _config_arg(argv)
    if path and not Path(path.split(":", 1)[0]).is_file():
        _exit(prog, f"error: --config file not found: {path}", 2)
    detail = one_line(e).split(" Attempted [")[0]
    _exit(prog, f"error: --config {path}: cannot load it ({type(e).__name__}: {detail})", 2)


def run(main_fn, prog: str) -> None:
    """Runs main_fn(config, workdir) under absl; failures as one line (module docstring)."""

    def _main(argv):
        if len(argv) > 1:
            _exit(prog, f"error: unexpected arguments: {' '.join(argv[1:])}", 2)
        logging.set_verbosity(logging.ERROR)
        config = flags.FLAGS.config
        if config is None:
            _exit(prog, "error: no --config given (e.g. --config=bye_jax/configs/llava.py)", 2)
        try:
            from bye_jax import multihost

            multihost.setup(config)  # before any JAX computation: compilation cache, multi-process runtime
            return main_fn(config, flags.FLAGS.workdir)
        except UserError as e:
            _exit(prog, f"error: {one_line(e)}", 2)
        except OSError as e:  # the machine, not the inputs: disk full, permissions, ...
            _exit(prog, f"error: {type(e).__name__}: {one_line(e)}", 1)
        return None

    def _on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, _on_term)
    try:
        app.run(_main, flags_parser=lambda argv: parse_flags(argv, prog))
    except KeyboardInterrupt as e:  # extract.ExtractionInterrupted carries its signal's exit code
        code = getattr(e, "exit_code", 143 if isinstance(e, Terminated) else 130)
        print(f"{prog}: {'terminated' if code == 143 else 'interrupted'} (finished work is kept; rerun with the "
              "same --workdir to resume)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: it can crash with device threads running
