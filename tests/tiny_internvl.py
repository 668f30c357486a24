"""Tiny, offline-built Hugging Face InternVL (-hf format) checkpoints for the tests (not a test module).

``make_tiny_internvl(out_dir, ...)`` writes config.json, model.safetensors (save_pretrained of a random
``transformers.InternVLForConditionalGeneration``, float32, every parameter non-trivial), a WordPiece
tokenizer with InternVL's image tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``) and Qwen's chat tokens,
InternVL-hf's chat template, the GotOcr2 image processor (the PIL one: no torchvision) at the tower's
tile size, and processor_config.json (``image_seq_length``).
"""

from __future__ import annotations

import json
import pathlib

import torch
import transformers
from tiny_checkpoints import _build_tokenizer, _randomize_

# InternVL3-*-hf's chat template without its default system prompt.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIAL = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}


def _internvl_tokenizer(out: pathlib.Path):
    tok = _build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL}, replace_extra_special_tokens=False)
    tok.save_pretrained(out)  # reloaded with the named image tokens InternVLProcessor reads
    tok = transformers.AutoTokenizer.from_pretrained(out, extra_special_tokens=dict(NAMED_TOKENS))
    tok.padding_side = "left"
    return tok


def tiny_internvl_config(*, vocab_size, image_token_id, pad_token_id, eos_token_id, image_size=28, patch_size=7,
                         vision_layers=2, vision_hidden=32, vision_heads=2, vision_intermediate=48,
                         norm_type="layer_norm", use_qk_norm=False, attention_bias=True, use_mean_pooling=True,
                         text_model="qwen2", text_layers=2, text_hidden=64, text_heads=4, kv_heads=2,
                         intermediate=96, rope_theta=10000.0, tie_word_embeddings=False, vision_feature_layer=-1,
                         projector_hidden_act="gelu") -> transformers.InternVLConfig:
    vision = dict(hidden_size=vision_hidden, num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                  intermediate_size=vision_intermediate, image_size=[image_size, image_size],
                  patch_size=[patch_size, patch_size], norm_type=norm_type, use_qk_norm=use_qk_norm,
                  attention_bias=attention_bias, use_mean_pooling=use_mean_pooling, hidden_act="gelu",
                  layer_norm_eps=1e-6)
    text = dict(model_type=text_model, vocab_size=vocab_size, hidden_size=text_hidden,
                intermediate_size=intermediate, num_hidden_layers=text_layers, num_attention_heads=text_heads,
                num_key_value_heads=kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
                pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
                tie_word_embeddings=tie_word_embeddings)
    side = image_size // patch_size // 2
    return transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=side * side,
        downsample_ratio=0.5, projector_hidden_act=projector_hidden_act, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default", tie_word_embeddings=tie_word_embeddings)


def make_tiny_internvl(out_dir, *, seed=0, crop_to_patches=True, max_patches=4, **config_kw) -> pathlib.Path:
    """Builds and saves a tiny random InternVL checkpoint directory (tiles of ``image_size`` px)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _internvl_tokenizer(out)
    config = tiny_internvl_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.context_image_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **config_kw)
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).to(torch.float32).eval()
    _randomize_(model, seed)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    side = config.vision_config.image_size[0]
    GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=crop_to_patches, min_patches=1,
                             max_patches=max_patches).save_pretrained(out)
    # Without torchvision no InternVLProcessor (it insists on a video processor) can be saved: the image
    # processor, the tokenizer, the chat template and processor_config.json are written the way it would.
    tokenizer.chat_template = INTERNVL_TEMPLATE
    tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": config.image_seq_length, "processor_class": "InternVLProcessor"}, indent=2))
    return out
