"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration, model_type 'llava'): CLIP vision tower,
2-layer projector, Llama / Vicuna decoder; one fixed-size image of H x W patch tokens per prompt."""

from bye_jax.models.family import Family
from bye_jax.models.inputs import PromptEncoder
from bye_jax.models.llava.build import write_llava_checkpoint_files
from bye_jax.models.llava.config import LlavaConfig, from_hf_config
from bye_jax.models.llava.keys import KEYS
from bye_jax.models.llava.model import LlavaForConditionalGeneration
from bye_jax.models.lora import DEFAULT_TARGET
from bye_jax.models.masks import causal_padding_mask, last_token_index, positions_from_mask


def _image_grid(cfg: LlavaConfig) -> tuple[int, int]:
    side = cfg.vision.image_size // cfg.vision.patch_size
    return side, side


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    config_from_hf=from_hf_config,
    model_class=LlavaForConditionalGeneration,
    keys=KEYS,
    encoder=PromptEncoder,
    lora_target=DEFAULT_TARGET,
    image_grid=_image_grid,
    new_checkpoint=write_llava_checkpoint_files,
)

__all__ = ["FAMILY", "LlavaConfig", "LlavaForConditionalGeneration", "causal_padding_mask", "from_hf_config",
           "last_token_index", "positions_from_mask"]
