"""Tiny, offline-built Hugging Face LLaVA checkpoints for the tests (not a test module).

``make_tiny_llava(out_dir, ...)`` writes a complete checkpoint directory (config.json,
model.safetensors, tokenizer, processor, chat template) for a random
``transformers.LlavaForConditionalGeneration`` (CLIP vision tower with quick_gelu, Llama text
model), float32. Every parameter gets non-trivial random values (norm weights != 1, biases != 0,
weights scaled ~1/sqrt(fan_in) so activations and attention patterns are O(1) and not uniform),
so parity tests against transformers are meaningful.

On-disk key layouts (``key_layout`` / ``legacy_keys``):
  * ``"saved"`` (default): exactly what ``save_pretrained`` writes. transformers 5 reverses its
    load-time renaming on save, so this is ``language_model.model.X``, ``language_model.lm_head.X``,
    ``vision_tower.X`` (no ``vision_model.``!), ``multi_modal_projector.X``.
  * ``"hub"`` (``legacy_keys=True``): the layout of the real llava-hf/llava-1.5-7b-hf files:
    as above but ``vision_tower.vision_model.X``.
  * ``"modern"``: the in-memory ``state_dict()`` names: ``model.language_model.X``, ``lm_head.X``,
    ``model.vision_tower.X``, ``model.multi_modal_projector.X``.
transformers loads all three to the same model.
"""

from __future__ import annotations

import json
import pathlib
import string

import numpy as np
import PIL.Image
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE_TOKEN = "<image>"

# Whole words the tiny tokenizer knows; everything else falls back to characters ("##" pieces).
_WORDS = (
    "USER ASSISTANT user assistant system what is are the a an of in on at to and or this that these "
    "those there here picture image photo color colour colors how many much which who whom whose "
    "where when why does do did can could would should will be been it its his her their they he she "
    "we you i me my your describe detail details shown show shows left right top bottom front back "
    "red green blue yellow black white orange purple brown gray grey pink man woman person people "
    "dog cat car bus train sign table chair sky water tree building animal food holding wearing "
    "sitting standing playing kind type number name doing looks look like with for from by about "
    "yes no not one two three four five six seven eight nine ten"
).split()
_CHARS = list(string.ascii_letters + string.digits + string.punctuation)


def _build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """WordPiece over known words + per-character fallback, Llama-style ids (<unk>=0, <s>=1, </s>=2),
    ``<image>`` and ``<pad>`` at the end (like llava-hf: 32000 and 32001)."""
    vocab: dict[str, int] = {}
    for tok in ["<unk>", "<s>", "</s>", *_WORDS, *_CHARS, *("##" + c for c in _CHARS), IMAGE_TOKEN, "<pad>"]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos_id = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert fast.convert_tokens_to_ids(IMAGE_TOKEN) == vocab[IMAGE_TOKEN]
    assert len(fast) == len(vocab)
    return fast


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with non-trivial random values (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # linear / conv / embedding tables
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
            elif name.endswith("class_embedding"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("weight"):  # the only 1-D weights are LayerNorm / RMSNorm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # biases (linear, conv, LayerNorm)
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _rename_saved_key(key: str, layout: str) -> str:
    """Map a key as written by ``save_pretrained`` (transformers 5) to ``layout``."""
    if layout == "saved":
        return key
    if layout == "hub":
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower.") :]
        return key
    if layout == "modern":
        for old, new in (
            ("language_model.lm_head.", "lm_head."),
            ("language_model.model.", "model.language_model."),
            ("vision_tower.vision_model.", "model.vision_tower."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if key.startswith(old):
                return new + key[len(old) :]
        raise ValueError(f"unexpected key {key!r}")
    raise ValueError(f"unknown key layout {layout!r}")


def rewrite_key_layout(ckpt_dir, layout: str) -> None:
    """Rewrite ``ckpt_dir/model.safetensors`` in place into ``layout`` ("saved" | "hub" | "modern")."""
    path = pathlib.Path(ckpt_dir) / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {_rename_saved_key(k, layout): v for k, v in tensors.items()}
    assert len(renamed) == len(tensors)
    save_file(renamed, str(path), metadata={"format": "pt"})


def tiny_llava_config(
    *,
    vocab_size,
    image_token_index,
    pad_token_id,
    image_size=28,
    patch_size=14,
    vision_layers=2,
    vision_hidden=32,
    vision_heads=4,
    vision_intermediate=None,
    text_layers=2,
    text_hidden=64,
    text_heads=4,
    kv_heads=2,
    head_dim=None,
    intermediate=96,
    vision_feature_layer=-2,
    select_strategy="default",
    tie_word_embeddings=False,
    rope_theta=10000.0,
    attention_bias=False,
) -> transformers.LlavaConfig:
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=vision_hidden,
    )
    text_config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or text_hidden // text_heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        attention_bias=attention_bias,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
    )
    n_patches = (image_size // patch_size) ** 2
    return transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=select_strategy,
        image_seq_length=n_patches + (1 if select_strategy == "full" else 0),
        tie_word_embeddings=tie_word_embeddings,
    )


def make_tiny_llava(
    out_dir,
    *,
    image_size=28,
    patch_size=14,
    vision_layers=2,
    vision_hidden=32,
    vision_heads=4,
    text_layers=2,
    text_hidden=64,
    text_heads=4,
    kv_heads=2,
    head_dim=None,
    intermediate=96,
    vision_feature_layer=-2,
    select_strategy="default",
    tie_word_embeddings=False,
    chat_template=True,
    rope_theta=10000.0,
    attention_bias=False,
    seed=0,
    legacy_keys=False,
    key_layout=None,
    vision_intermediate=None,
) -> pathlib.Path:
    """Build and save a tiny random LLaVA checkpoint directory; returns its path.

    ``legacy_keys=True`` writes the llava-hf hub layout (``key_layout="hub"``); ``key_layout`` may
    also be ``"saved"`` (save_pretrained's own output, the default) or ``"modern"``.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = key_layout or ("hub" if legacy_keys else "saved")

    tokenizer = _build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        image_token_index=image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_size=image_size,
        patch_size=patch_size,
        vision_layers=vision_layers,
        vision_hidden=vision_hidden,
        vision_heads=vision_heads,
        vision_intermediate=vision_intermediate,
        text_layers=text_layers,
        text_hidden=text_hidden,
        text_heads=text_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vision_feature_layer=vision_feature_layer,
        select_strategy=select_strategy,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        attention_bias=attention_bias,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.float32).eval()
    _randomize_(model, seed)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    if layout != "saved":
        rewrite_key_layout(out, layout)

    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        resample=PIL.Image.Resampling.BICUBIC,
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA15_TEMPLATE if chat_template else None,
    )
    processor.save_pretrained(out)
    # Sanity: the processor expands <image> into exactly image_seq_length tokens.
    n = processor._get_num_multimodal_tokens(image_sizes=[(image_size, image_size)]).num_image_tokens[0]
    assert n == config.image_seq_length, (n, config.image_seq_length)
    return out


def read_config(ckpt_dir) -> dict:
    return json.loads((pathlib.Path(ckpt_dir) / "config.json").read_text())


def make_real_llava15_7b_config() -> transformers.LlavaConfig:
    """The exact config of llava-hf/llava-1.5-7b-hf (7,063,427,072 parameters)."""
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        num_channels=3,
    )
    text_config = transformers.LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32001,
        tie_word_embeddings=False,
    )
    return transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def make_tiny_image(seed, size=(40, 32)) -> PIL.Image.Image:
    """Random RGB picture of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


TINY_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def tiny_llava_next_config(*, vocab_size, image_token_index, pad_token_id, text_model="llama", image_size=28,
                           patch_size=7, pinpoints=None, vision_feature_layer=-2, tie_word_embeddings=False,
                           sliding_window=None, **text) -> transformers.LlavaNextConfig:
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
    common = dict(vocab_size=vocab_size, hidden_size=text.get("text_hidden", 64),
                  intermediate_size=text.get("intermediate", 96), num_hidden_layers=text.get("text_layers", 2),
                  num_attention_heads=text.get("text_heads", 4), num_key_value_heads=text.get("kv_heads", 2),
                  rms_norm_eps=1e-5, max_position_embeddings=2048,
                  rope_parameters={"rope_type": "default", "rope_theta": float(text.get("rope_theta", 10000.0))},
                  tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id)
    if text_model == "mistral":
        text_config = transformers.MistralConfig(sliding_window=sliding_window, head_dim=16, **common)
    else:
        text_config = transformers.LlamaConfig(**common)
    return transformers.LlavaNextConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
        projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints or TINY_PINPOINTS,
        image_seq_length=(image_size // patch_size) ** 2, tie_word_embeddings=tie_word_embeddings)


def make_tiny_llava_next(out_dir, *, seed=0, chat_template=True, **kw) -> pathlib.Path:
    """A tiny random LlavaNextForConditionalGeneration checkpoint (28 px tiles of 4 x 4 patches; anyres
    pinpoints up to 3 tiles), with a LlavaNextProcessor; ``text_model="mistral"`` for a Mistral decoder."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = tiny_llava_next_config(vocab_size=len(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN), pad_token_id=tokenizer.pad_token_id, **kw)
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    _randomize_(model, seed)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, k, getattr(tokenizer, k))
    model.save_pretrained(out, safe_serialization=True)
    size = config.vision_config.image_size
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True)
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA15_TEMPLATE if chat_template else None)
    processor.save_pretrained(out)
    return out
