"""LLaVA-NeXT's tensor names: LLaVA's, plus ``image_newline`` (``model.image_newline`` in memory)."""

from __future__ import annotations

import re

from bye_jax.models.keys import KeyTable, Rule
from bye_jax.models.llava.keys import LEGACY_PREFIXES, RULES, SAVED_PREFIXES, module_name

KEYS = KeyTable(
    rules=RULES + (Rule(re.compile(r"model\.image_newline$"), "image_newline"),),
    legacy_prefixes=LEGACY_PREFIXES + ((re.compile(r"^image_newline$"), "model.image_newline"),),
    saved_prefixes=SAVED_PREFIXES + (("model.image_newline", "image_newline"),),
    module_name=module_name,
)
