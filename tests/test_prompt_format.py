"""The LLaVA-repository prompt format (the BYE paper's extraction), an option next to the checkpoint's.

References are transcribed from haotian-liu/LLaVA (llava/conversation.py conv_vicuna_v1 and
Conversation.get_prompt, llava/mm_utils.py tokenizer_image_token and expand2square) and run here on
the same tokenizer / image processor; the entropies are checked against transformers' eager attention
on inputs built by those references.
"""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from test_extract import make_dataset
from tiny_checkpoints import IMAGE_TOKEN, make_tiny_image, make_tiny_llava
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoProcessor, LlavaProcessor, PreTrainedTokenizerFast
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.configs.llava import get_config
from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.errors import UserError
from bye_jax.extract import read_entropy_jsonl
from bye_jax.models.config import ConfigError
from bye_jax.models.family import load_encoder
from bye_jax.runner import run_extract

# ---------------------------------------------------------------- LLaVA's code, transcribed

LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def llava_vicuna_v1_prompt(question: str) -> str:
    """conv_vicuna_v1.copy(); append_message(USER, "<image>\\n" + qs); append_message(ASSISTANT, None); get_prompt()."""
    messages = [("USER", "<image>\n" + question), ("ASSISTANT", None)]
    seps = [" ", "</s>"]
    ret = LLAVA_SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def llava_tokenizer_image_token(prompt, tokenizer, image_token_index):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X), strict=False) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def llava_expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = PIL.Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = PIL.Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("fidelity") / "ckpt", text_layers=2, seed=4)


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A sentencepiece-like tokenizer ("▁" word starts, prefix only at the start of a text), where the
    chunk-by-chunk tokenization of LLaVA differs from tokenizing the whole prompt."""
    chars = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars, IMAGE_TOKEN, "<pad>"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


# --------------------------------------------------------------------------------- tests

def test_vicuna_v1_prompt_is_the_llava_conversation(ckpt):
    enc = load_encoder(ckpt, template="vicuna_v1")
    for q in ["what color is the big square", "<image>\n how many  "]:
        assert enc.prompt_text(q) == llava_vicuna_v1_prompt(q.replace("<image>", "").strip())
    default = load_encoder(ckpt)
    assert default.prompt_text("how many") != enc.prompt_text("how many")


def test_vicuna_v1_token_ids_are_tokenizer_image_token(ckpt, tmp_path):
    # Swap in a sentencepiece-like tokenizer: tokenizing the chunks apart is then visibly different.
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    old = AutoProcessor.from_pretrained(ckpt)
    tokenizer = _metaspace_tokenizer()
    LlavaProcessor(image_processor=old.image_processor, tokenizer=tokenizer, patch_size=old.patch_size,
                   vision_feature_select_strategy=old.vision_feature_select_strategy,
                   num_additional_image_tokens=old.num_additional_image_tokens,
                   chat_template=old.chat_template).save_pretrained(path)
    enc = load_encoder(path, template="vicuna_v1")
    image = make_tiny_image(0, (40, 32))
    n = enc.image_token_count(image)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for q in ["what is it", "two words"]:
        ref = llava_tokenizer_image_token(llava_vicuna_v1_prompt(q), tokenizer, image_id)
        at = ref.index(image_id)
        ref = ref[:at] + [image_id] * n + ref[at + 1:]  # the model sees N image tokens where LLaVA inserts N features
        batch = enc.encode([image], [q])
        assert batch.input_ids[0].tolist() == ref
        assert int(batch.image_mask[0].sum()) == n
        whole = tokenizer(enc.prompt_text(q).replace(IMAGE_TOKEN, IMAGE_TOKEN * n))["input_ids"]
        assert whole != ref  # the chunking matters for this tokenizer
        # the training examples tokenize the same way, the answer and EOS after the prompt
        from bye_jax.train.data import ExampleEncoder

        ex = ExampleEncoder(enc)
        ex.calibrate(image, q, "red")
        ids, labels = ex.encode(q, "red")
        full = llava_tokenizer_image_token(llava_vicuna_v1_prompt(q) + " red</s>", tokenizer, image_id)
        at = full.index(image_id)
        assert ids.tolist() == full[:at] + [image_id] * n + full[at + 1:]
        assert ids.tolist()[: len(ref)] == ref and (labels[: len(ref) - 1] == -100).all()


def test_pad_to_square_is_expand2square_with_the_mean_colour(ckpt):
    enc = load_encoder(ckpt, image_aspect="pad")
    plain = load_encoder(ckpt)
    proc = enc.processor.image_processor
    mean = tuple(int(x * 255) for x in proc.image_mean)
    for size in [(40, 24), (20, 44)]:
        image = make_tiny_image(1, size)
        ref = np.asarray(proc(images=[llava_expand2square(image, mean)], return_tensors="np")["pixel_values"])
        got = enc.encode([image], ["how many"]).pixel_values
        np.testing.assert_array_equal(got, ref)
        assert not np.allclose(got, plain.encode([image], ["how many"]).pixel_values)
    square = make_tiny_image(2, (30, 30))
    np.testing.assert_array_equal(enc.encode([square], ["q"]).pixel_values, plain.encode([square], ["q"]).pixel_values)


def test_extraction_in_the_llava_format_matches_transformers(ckpt, tmp_path):
    """`--config.prompt.*` reach the extraction; its entropies equal BYE's formula on transformers' eager
    attention over inputs built by LLaVA's own prompt, tokenization and padding."""
    ann, images = make_dataset(tmp_path / "data", n=5)
    config = get_config()
    config.model, config.data.annotations, config.data.image_root = str(ckpt), str(ann), str(images)
    config.batch_size = 2
    config.prompt.template, config.prompt.image_aspect = "vicuna_v1", "pad"
    run_extract(config, tmp_path / "run", progress=False)
    table = read_entropy_jsonl(tmp_path / "run" / "entropy.jsonl")

    samples, _ = load_dataset(ann, images)
    ref_model = TorchLlava.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(ckpt)
    tok, image_id = proc.tokenizer, ref_model.config.image_token_id
    mean = tuple(int(x * 255) for x in proc.image_processor.image_mean)
    default = load_encoder(ckpt)
    n = default.image_tokens_per_image
    ref, plain = [], []
    for s in samples:
        ids = llava_tokenizer_image_token(llava_vicuna_v1_prompt(s.question), tok, image_id)
        at = ids.index(image_id)
        ids = ids[:at] + [image_id] * n + ids[at + 1:]
        pixels = proc.image_processor(images=[llava_expand2square(load_image(s.image_path), mean)],
                                      return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = ref_model(input_ids=torch.tensor([ids]), pixel_values=pixels, output_attentions=True)
        row = []
        for att in out.attentions:
            p = att[0, :, -1, at:at + n].numpy().astype(np.float64).mean(axis=0)
            p = p / p.sum()
            row.append(-(p * np.log(p + 1e-8)).sum())
        ref.append(row)
    np.testing.assert_allclose(table.matrix, np.asarray(ref), atol=1e-4)
    # and they are not the checkpoint-format entropies
    config.prompt.template, config.prompt.image_aspect = "checkpoint", "processor"
    run_extract(config, tmp_path / "plain", progress=False)
    plain = read_entropy_jsonl(tmp_path / "plain" / "entropy.jsonl").matrix
    assert np.abs(plain - table.matrix).max() > 1e-3


def test_bad_prompt_settings_are_refused_in_one_line(ckpt, tmp_path):
    config = get_config()
    config.model = str(ckpt)
    ann, images = make_dataset(tmp_path / "d", n=2)
    config.data.annotations, config.data.image_root = str(ann), str(images)
    config.prompt.template = "alpaca"
    with pytest.raises(UserError, match=r"^config\.prompt\.template must be one of checkpoint, vicuna_v1, "
                                        r"got .alpaca.$"):
        run_extract(config, tmp_path / "run", progress=False)


def test_a_family_without_the_llava_format_refuses_it(tmp_path):
    from tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

    path = make_tiny_qwen2_5_vl(tmp_path / "qwen")
    assert load_encoder(path) is not None
    with pytest.raises(ConfigError, match="only its checkpoint's own prompt format"):
        load_encoder(path, template="vicuna_v1")
    with pytest.raises(ConfigError, match="not prompt.tiles='off'"):
        load_encoder(path, tiles="off")
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2_5_vl"
