"""Builds a new LLaVA-architecture Hugging Face checkpoint from scratch (no downloads, no torch).

Used by the built-in demo: a byte-level BPE tokenizer trained on a given corpus, LLaVA-1.5's chat
template, a CLIP image processor and LlavaProcessor, the LlavaConfig, and randomly initialised
weights written as safetensors by `hf_export` — a directory transformers and bye_jax both load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 400):
    """Byte-level BPE (any text encodes; decoding is exact) with Llama-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def write_llava_checkpoint_files(out_dir: str | Path, *, corpus: Iterable[str], image_size: int, patch_size: int,
                                 vision_hidden: int, vision_layers: int, vision_heads: int, text_hidden: int,
                                 text_layers: int, text_heads: int, kv_heads: int, intermediate: int,
                                 vision_feature_layer: int = -2, max_positions: int = 512) -> Path:
    """config.json, tokenizer and processor files (no weights yet) for a new LLaVA checkpoint."""
    import PIL.Image
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus) + ["USER: ", "ASSISTANT:", LLAVA15_TEMPLATE]
    tokenizer = build_tokenizer(corpus)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        resample=PIL.Image.Resampling.BICUBIC)
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            patch_size=patch_size, vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1, chat_template=LLAVA15_TEMPLATE)
    processor.save_pretrained(out)
    vision = transformers.CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu",
        projection_dim=vision_hidden)
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=intermediate,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.save_pretrained(out)
    return out
