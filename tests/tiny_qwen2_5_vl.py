"""Tiny, offline-built Hugging Face Qwen2.5-VL checkpoints for the tests (not a test module).

``make_tiny_qwen2_5_vl(out_dir, ...)`` writes config.json, model.safetensors (save_pretrained of a
random ``transformers.Qwen2_5_VLForConditionalGeneration``, float32, every parameter non-trivial),
a WordPiece tokenizer with Qwen's special tokens, Qwen2-VL's chat template and the Qwen2-VL image
processor (the PIL one: no torchvision) with a small pixel budget, so images of different sizes give
different grids.
"""

from __future__ import annotations

import pathlib

import torch
import transformers
from tiny_checkpoints import _build_tokenizer, _randomize_

# Qwen2-VL / Qwen2.5-VL-Instruct's chat template (images and text; videos as in the original).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>", "<|endoftext|>"]


def _qwen_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = _build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL}, replace_extra_special_tokens=False)
    tok.padding_side = "left"
    return tok


def tiny_qwen2_5_vl_config(*, vocab_size, image_token_id, video_token_id, vision_start_token_id,
                           vision_end_token_id, pad_token_id, eos_token_id, vision_depth=4, vision_hidden=32,
                           vision_heads=2, vision_intermediate=48, patch_size=4, window_size=16,
                           fullatt_block_indexes=(1, 3), text_layers=2, text_hidden=64, text_heads=4, kv_heads=2,
                           intermediate=96, mrope_section=(2, 3, 3), rope_theta=10000.0,
                           tie_word_embeddings=False) -> transformers.Qwen2_5_VLConfig:
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
                  intermediate_size=vision_intermediate, out_hidden_size=text_hidden, patch_size=patch_size,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=window_size,
                  fullatt_block_indexes=list(fullatt_block_indexes), hidden_act="silu", in_channels=3)
    text = dict(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=intermediate,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta),
                                 "mrope_section": list(mrope_section)},
                pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
                tie_word_embeddings=tie_word_embeddings)
    return transformers.Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
        tie_word_embeddings=tie_word_embeddings)


def tiny_qwen2_vl_config(*, vocab_size, image_token_id, video_token_id, vision_start_token_id, vision_end_token_id,
                         pad_token_id, eos_token_id, vision_depth=3, vision_embed=32, vision_heads=2, mlp_ratio=2,
                         patch_size=4, text_layers=2, text_hidden=64, text_heads=4, kv_heads=2, intermediate=96,
                         mrope_section=(2, 3, 3), rope_theta=10000.0, tie_word_embeddings=False):
    """A tiny Qwen2-VL config (LayerNorm / fc1-fc2 vision blocks, no windows, quick_gelu)."""
    vision = dict(depth=vision_depth, embed_dim=vision_embed, hidden_size=text_hidden, num_heads=vision_heads,
                  mlp_ratio=mlp_ratio, patch_size=patch_size, temporal_patch_size=2, spatial_merge_size=2,
                  hidden_act="quick_gelu", in_channels=3)
    text = dict(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=intermediate,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta),
                                 "mrope_section": list(mrope_section)},
                pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
                tie_word_embeddings=tie_word_embeddings)
    return transformers.Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
        tie_word_embeddings=tie_word_embeddings)


def make_tiny_qwen2_5_vl(out_dir, *, seed=0, patch_size=4, min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 64,
                         qwen2_vl=False, **config_kw) -> pathlib.Path:
    """Builds and saves a tiny random Qwen2.5-VL (``qwen2_vl=True``: Qwen2-VL) checkpoint directory."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    make_config = tiny_qwen2_vl_config if qwen2_vl else tiny_qwen2_5_vl_config
    config = make_config(
        vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=ids["<|im_end|>"], patch_size=patch_size, **config_kw)
    torch.manual_seed(seed)
    model_class = transformers.Qwen2VLForConditionalGeneration if qwen2_vl else \
        transformers.Qwen2_5_VLForConditionalGeneration
    model = model_class(config).to(torch.float32).eval()
    _randomize_(model, seed)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    # Without torchvision no Qwen2_5_VLProcessor (it insists on a video processor) can be saved: the
    # image processor, the tokenizer and the chat template are written the way it would write them.
    image_processor.save_pretrained(out)
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(out)
    return out
