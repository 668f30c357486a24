"""LLaVA-NeXT / LLaVA-1.6 (transformers' LlavaNextForConditionalGeneration, model_type 'llava_next'):
LLaVA-1.5's CLIP tower, projector and Llama / Vicuna / Mistral decoder on anyres tiles (base view +
tiles at the best of image_grid_pinpoints), packed with unpadding and an image_newline token per row.
The number of image tokens depends on the image size: the entropy is normalised by ln N for detection."""

from bye_jax.models.family import Family
from bye_jax.models.llava_next.config import LlavaNextConfig, from_hf_config
from bye_jax.models.llava_next.inputs import LlavaNextPromptEncoder
from bye_jax.models.llava_next.keys import KEYS
from bye_jax.models.llava_next.model import LlavaNextForConditionalGeneration
from bye_jax.models.lora import DEFAULT_TARGET


def _image_grid(cfg: LlavaNextConfig) -> tuple[int, int]:
    """The base view's token grid (a sample's N is never this: its tokens are treated as a 1 x N row)."""
    return cfg.patch_grid, cfg.patch_grid


FAMILY = Family(
    name="llava_next",
    model_types=("llava_next",),
    config_from_hf=from_hf_config,
    model_class=LlavaNextForConditionalGeneration,
    keys=KEYS,
    encoder=LlavaNextPromptEncoder,
    lora_target=DEFAULT_TARGET,
    image_grid=_image_grid,
    variable_image_tokens=True,
)

__all__ = ["FAMILY", "LlavaNextConfig", "LlavaNextForConditionalGeneration", "from_hf_config"]
