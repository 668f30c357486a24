"""InternVL 2.5 / 3 in the Hugging Face format (transformers' InternVLForConditionalGeneration, model_type
'internvl', the ``-hf`` checkpoints): InternViT tiles -> pixel shuffle -> LayerNorm-MLP projector -> Qwen2 or
Llama decoder with 1-D rotary positions. Tiles + thumbnail (transformers' processor default) make the number
of image tokens vary per image: the detector then reads the entropy normalised by ln N."""

from bye_jax.models.family import Family
from bye_jax.models.internvl.config import InternVLConfig, from_hf_config
from bye_jax.models.internvl.inputs import InternVLPromptEncoder
from bye_jax.models.internvl.keys import KEYS
from bye_jax.models.internvl.model import InternVLForConditionalGeneration
from bye_jax.models.lora import DEFAULT_TARGET


def _image_grid(cfg: InternVLConfig) -> tuple[int, int]:
    """One tile's token grid: the whole image for a one-view sample; a tiled sample (tiles, then the
    thumbnail last) has another N and is treated as a 1 x N row."""
    return cfg.token_grid, cfg.token_grid


FAMILY = Family(
    name="internvl",
    model_types=("internvl",),
    config_from_hf=from_hf_config,
    model_class=InternVLForConditionalGeneration,
    keys=KEYS,
    encoder=InternVLPromptEncoder,
    lora_target=DEFAULT_TARGET,
    image_grid=_image_grid,
    variable_image_tokens=True,
)

__all__ = ["FAMILY", "InternVLConfig", "InternVLForConditionalGeneration", "InternVLPromptEncoder", "from_hf_config"]
