"""Config pieces every command has: the multi-process launch and the compilation cache (a helper of
the config files, not a config itself; read by bye_jax/multihost.py)."""

import ml_collections


def add_runtime(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds `distributed` (multi-process launch) and `compile_cache_dir` to a command's config."""
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0; "": auto (TPU pod, SLURM, Open MPI) or 1 process
    c.distributed.num_processes = -1        # -1: auto-detect (1 when nothing describes a multi-process job)
    c.distributed.process_id = -1           # -1: auto-detect
    c.compile_cache_dir = "~/.cache/bye_jax/jax"  # JAX persistent compilation cache; "": off
    return c
