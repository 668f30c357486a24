"""The one user-facing failure type. Imports nothing of ours, so every module can raise it."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, inputs or workdir: reported as one line, exit status 2."""


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())
