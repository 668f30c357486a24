"""Config pieces every command has: the multi-process launch and the compilation cache (a helper of
the config files, not a config itself; read by bye_jax/multihost.py)."""

import os

import ml_collections


def default_cache_dir() -> str:
    """The per-user JAX compilation cache: $XDG_CACHE_HOME/bye_jax/jax (when XDG_CACHE_HOME is an absolute
    path), else ~/.cache/bye_jax/jax."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(base if os.path.isabs(base) else "~/.cache", "bye_jax", "jax")


def add_runtime(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds `distributed` (multi-process launch) and `compile_cache_dir` to a command's config."""
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0; "": auto (TPU pod, SLURM, Open MPI) or 1 process
    c.distributed.num_processes = -1        # -1: auto-detect (1 when nothing describes a multi-process job)
    c.distributed.process_id = -1           # -1: auto-detect
    c.compile_cache_dir = default_cache_dir()  # JAX persistent compilation cache ($XDG_CACHE_HOME); "": off
    return c

PROMPT_DEFAULTS = {"template": "checkpoint", "image_aspect": "processor", "tiles": "processor"}


def add_prompt(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds `prompt` (how prompts and images are formed; bye_jax/models/inputs.py) to a command's config."""
    c.prompt = ml_collections.ConfigDict()
    c.prompt.template = "checkpoint"      # checkpoint: its chat template | vicuna_v1: the LLaVA repo's (BYE paper's)
    c.prompt.image_aspect = "processor"   # processor: as the processor resizes | pad: square, mean colour (LLaVA's)
    c.prompt.tiles = "processor"          # processor: its tiling | off: one view (InternVL crop_to_patches=False)
    return c


def prompt_options(config) -> dict:
    """{template, image_aspect, tiles} of a command's config (`prompt`; the defaults where it has none);
    ValueError ("prompt.template must be ...") for a value bye_jax.models.inputs does not know."""
    from bye_jax.models.inputs import IMAGE_ASPECTS, TEMPLATES, TILES

    prompt = config.get("prompt")
    prompt = {} if prompt is None else prompt
    options = {key: prompt.get(key, default) for key, default in PROMPT_DEFAULTS.items()}
    for (key, value), valid in zip(options.items(), (TEMPLATES, IMAGE_ASPECTS, TILES), strict=True):
        if value not in valid:
            raise ValueError(f"prompt.{key} must be one of {', '.join(valid)}, got {value!r}")
    return options


def prompt_items(config) -> dict:
    """The prompt settings for a stage digest: {} with the defaults (earlier digests stay valid)."""
    options = prompt_options(config)
    return {f"prompt.{k}": v for k, v in options.items() if v != PROMPT_DEFAULTS[k]}
