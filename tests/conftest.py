"""Shared pytest fixtures. Tiny checkpoints are built offline (see tiny_checkpoints.py)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The commands the tests run (subprocesses and in-process) keep their JAX compilation cache (config.compile_cache_dir,
# whose default follows XDG_CACHE_HOME) in a folder of this session, not in the user's ~/.cache: every session
# starts cold, as CI does.
_cache = tempfile.mkdtemp(prefix="bye_jax_tests_cache_")
atexit.register(shutil.rmtree, _cache, True)
os.environ["XDG_CACHE_HOME"] = _cache

import pytest  # noqa: E402
from tiny_checkpoints import make_tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA checkpoint (default make_tiny_llava args), built once per session."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
