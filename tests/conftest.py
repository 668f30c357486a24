"""Shared pytest fixtures. Tiny checkpoints are built offline (see tiny_checkpoints.py)."""

from __future__ import annotations

import pytest
from tiny_checkpoints import make_tiny_llava


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA checkpoint (default make_tiny_llava args), built once per session."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
