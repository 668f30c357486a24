"""Model families: one contract per multimodal architecture, and the registry commands load through.

A family is a package ``bye_jax/models/<family>/`` whose ``__init__`` defines ``FAMILY = Family(...)``.
Every subpackage of bye_jax.models is imported on the first registry lookup and its ``FAMILY``
registered, so adding a family touches no file outside its package (`register_family` also takes
one from elsewhere, e.g. a test). Commands never name a family: they call `load_model` /
`load_encoder` (dispatch on config.json's ``model_type``) and `family_of(model)`.

What a family provides (the fields of `Family`):

* ``name``, ``model_types``: its name and the HF ``model_type`` values it loads (``"llava"``).
* ``config_from_hf(hf_config) -> cfg``: transformers' AutoConfig object -> the family's frozen
  config dataclass; raises `ConfigError` (one line) for what it does not support. ``cfg`` must have
  ``text`` (``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size``,
  ``vocab_size``, ``max_position_embeddings``; bye_jax.models.config.TextConfig fits),
  ``image_token_id`` and ``tie_word_embeddings``.
* ``model_class(cfg, *, dtype, param_dtype=None, rngs, attn_impl=None)``: the Flax NNX model, with
  attributes ``cfg`` and ``dtype``, and ``language_model`` (the decoder: ``embed_tokens``, ``layers``,
  ``remat``; each layer's ``self_attn.attn_impl``). Its call::

      model(input_ids [B, S], pixel_values, attention_mask [B, S], *, positions=None,
            probe_index=None, probe_mask=None, logits="all" | "last" | None, **extra) -> logits

  ``extra`` are the other vision inputs of the family's processor (`PromptBatch.extra`, e.g.
  ``image_sizes``). With ``probe_index`` [B] every decoder layer sows (nnx.Intermediate) at
  ``<probe_layers>[i]["self_attn"]["attn_row"]`` the float32 softmax attention row [B, heads, S] of
  that query over all keys (post-RoPE, as bye_jax.models.llama does), and with ``probe_mask`` [B, S]
  also ``image_hidden`` [B, hidden] (bye_jax.signals_compute.weighted_image_hidden). ``logits``:
  [B, S, V], [B, V] at the last real token, or None (probe only); float32.
* ``keys``: its `KeyTable` (bye_jax/models/keys.py): the rules that map every checkpoint tensor
  to one parameter path (load) and back (merged export, PEFT adapter names).
* ``encoder(checkpoint_dir)``: its processor adapter, a bye_jax.models.inputs.PromptEncoder
  (sub)class: prompt text, ``encode(images, questions) -> PromptBatch`` whose ``image_mask`` [B, S]
  marks the image positions the entropy and signals use (``input_ids == image_token_id`` minus
  separator / newline slots; never a contiguous-run assumption), and ``extra`` the model's extra inputs.
* ``lora_target``: regex (re.fullmatch on '/'-joined Dense paths) of the layers LoRA adapts by default.
* ``image_grid(cfg) -> (H, W)``: the token grid of one image for the signals' location features (a
  sample whose image-token count is not H * W is treated as a 1 x N row); with variable token counts,
  the first H * W image positions must be the whole image's grid (the attention heatmaps show them).
* ``variable_image_tokens``: True when the number of image tokens N differs between samples
  (tiling, dynamic resolution): detectors then use the entropy normalised by ln N (both are stored).
* ``generate``: batched greedy decoding ``(model, input_ids, attention_mask, pixel_values, *,
  max_new_tokens, eos_id, pad_id, **extra) -> [B, max_new_tokens]`` (None: the shared Llama-cache
  one, bye_jax.models.generate.greedy_generate).
* ``probe_layers``: the path of the decoder layers inside the captured intermediates.
* ``vision_module``: the model's top-level attribute holding the vision encoder (full fine-tuning keeps
  it frozen unless ``train_vision``); ``projector_module``: the top-level module ``train_projector``
  trains in full (and the PEFT adapter saves whole), None where the family has no separate one.
* ``new_checkpoint``: optional; writes config / tokenizer / processor files of a new random
  checkpoint (the demo builds its base model with it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bye_jax.models.config import ConfigError
from bye_jax.models.keys import KeyTable


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[Any], Any]
    model_class: type
    keys: KeyTable
    encoder: Callable[..., Any]
    lora_target: str
    image_grid: Callable[[Any], tuple[int, int]]
    variable_image_tokens: bool = False
    generate: Callable[..., Any] | None = None
    probe_layers: tuple[str, ...] = ("language_model", "layers")
    new_checkpoint: Callable[..., Any] | None = None
    vision_module: str = "vision_tower"
    projector_module: str | None = "multi_modal_projector"

    def new_model(self, cfg, *, dtype=None, rngs, attn_impl: str | None = None):
        """A randomly initialised model of `cfg`."""
        import jax.numpy as jnp

        return self.model_class(cfg, dtype=jnp.float32 if dtype is None else dtype, rngs=rngs, attn_impl=attn_impl)

    def greedy_generate(self, model, input_ids, attention_mask, pixel_values, **kw):
        if self.generate is not None:
            return self.generate(model, input_ids, attention_mask, pixel_values, **kw)
        from bye_jax.models.generate import greedy_generate

        return greedy_generate(model, input_ids, attention_mask, pixel_values, **kw)


_REGISTRY: dict[str, Family] = {}
_DISCOVERED = False


def register_family(family: Family) -> Family:
    """Registers `family` for its model types (a type claimed by another family is an error)."""
    for t in family.model_types:
        other = _REGISTRY.get(t)
        if other is not None and other.name != family.name:
            raise ValueError(f"model_type {t!r} is claimed by families {other.name!r} and {family.name!r}")
    for t in family.model_types:
        _REGISTRY[t] = family
    return family


def _discover() -> None:
    """Imports every family package under bye_jax/models once and registers its FAMILY."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import bye_jax.models as models

    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name):
        if info.ispkg:
            fam = getattr(importlib.import_module(f"{models.__name__}.{info.name}"), "FAMILY", None)
            if isinstance(fam, Family):
                register_family(fam)
    _DISCOVERED = True


def families() -> list[Family]:
    """Every registered family, by name."""
    _discover()
    return sorted({f.name: f for f in _REGISTRY.values()}.values(), key=lambda f: f.name)


def known_model_types() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def family_for(model_type: str | None) -> Family:
    """The family that loads `model_type`; ConfigError (one line, the known types listed) otherwise."""
    _discover()
    fam = _REGISTRY.get(model_type or "")
    if fam is None:
        raise ConfigError(f"unsupported model_type {model_type!r} (supported: {', '.join(known_model_types())})")
    return fam


def family_named(name: str) -> Family:
    for fam in families():
        if fam.name == name:
            return fam
    raise ValueError(f"no model family {name!r} (known: {', '.join(f.name for f in families())})")


def family_of(model) -> Family:
    """The family of a model instance (abstract or not): its exact class, else a base class."""
    fams = families()
    for fam in fams:
        if type(model) is fam.model_class:
            return fam
    for fam in fams:
        if isinstance(model, fam.model_class):
            return fam
    raise TypeError(f"{type(model).__name__} belongs to no registered model family")


def model_type_of(checkpoint_dir: str | Path) -> str | None:
    """config.json's ``model_type`` (ConfigError when the directory has no readable config.json)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{Path(checkpoint_dir)}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return conf.get("model_type") if isinstance(conf, dict) else None


def family_of_checkpoint(checkpoint_dir: str | Path) -> Family:
    return family_for(model_type_of(checkpoint_dir))


def load_config(checkpoint_dir: str | Path):
    """The family config dataclass of a HF checkpoint directory (no network)."""
    from transformers import AutoConfig

    fam = family_of_checkpoint(checkpoint_dir)
    try:
        hf = AutoConfig.from_pretrained(str(checkpoint_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for malformed configs
        raise ConfigError(f"{Path(checkpoint_dir)}/config.json: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return fam.config_from_hf(hf)


def load_model(checkpoint_dir: str | Path, *, dtype: str = "float32", attn_impl: str | None = None,
               sharding_for=None):
    """(model, cfg) of a HF checkpoint directory, whatever its family (see hf_loader.load_weights)."""
    from bye_jax.models.hf_loader import load_weights

    fam = family_of_checkpoint(checkpoint_dir)
    return load_weights(fam, load_config(checkpoint_dir), checkpoint_dir, dtype=dtype, attn_impl=attn_impl,
                        sharding_for=sharding_for)


def load_encoder(checkpoint_dir: str | Path, *, template: str = "checkpoint", image_aspect: str = "processor",
                 tiles: str = "processor"):
    """The family's processor adapter (a PromptEncoder) of a checkpoint directory. Other than the
    checkpoint's own format (bye_jax.models.inputs): `template` / `image_aspect` (LLaVA's vicuna_v1
    prompt, pad-to-square) for encoders that take them; ``tiles="off"`` (one view instead of the
    processor's tiles, ``crop_to_patches=False``) for encoders that take ``crop_to_patches``; else ConfigError."""
    fam = family_of_checkpoint(checkpoint_dir)
    kwargs: dict = {}
    if (template, image_aspect) != ("checkpoint", "processor"):
        kwargs.update(template=template, image_aspect=image_aspect)
    if tiles != "processor":
        kwargs["crop_to_patches"] = False
    missing = set(kwargs) - set(inspect.signature(fam.encoder).parameters)
    if missing:
        what = ("prompt.tiles='off'" if "crop_to_patches" in missing else
                f"prompt.template={template!r} / prompt.image_aspect={image_aspect!r}")
        raise ConfigError(f"family {fam.name} has only its checkpoint's own prompt format here, not {what}")
    return fam.encoder(checkpoint_dir, **kwargs)
