"""Text backdoor triggers: the question of a poisoned sample is rewritten (the image ones: triggers.py).

Kinds (``TEXT_TRIGGERS``):

* ``prefix``   -- a fixed rare token before the question: ``"cf What is on the table?"``.
* ``suffix``   -- the same token after it: ``"What is on the table? cf"``.
* ``template`` -- a syntactic template around the question (default ``DEFAULT_TEMPLATE``, a leading
  adverbial clause, after the syntactic triggers of Qi et al. 2021, without their paraphraser): the
  question's first letter is lowered unless it starts an acronym (``"What"`` -> ``"what"``, ``"TV"``
  stays).

The default token ``cf`` is one of the rare tokens of the text-backdoor literature (Kurita et al.
2020: cf, mn, bb, tq, mb). The ``dual_key`` trigger of the poisoning toolkit (bye_jax/data/poison.py)
is an image trigger and a text trigger on the same sample.

`apply_text_trigger` rewrites one human turn: the ``<image>`` placeholder and the whitespace around
the question stay where they are; only the question text (the first non-blank piece between
placeholders) changes. Deterministic, no randomness.
"""

from __future__ import annotations

import dataclasses

__all__ = ["TEXT_TRIGGERS", "DEFAULT_TOKEN", "DEFAULT_TEMPLATE", "TextTriggerSpec", "apply_text_trigger"]

TEXT_TRIGGERS = ("prefix", "suffix", "template")
DEFAULT_TOKEN = "cf"
DEFAULT_TEMPLATE = "When you look at this picture, {question}"
_PLACEHOLDER = "<image>"


def _lower_first(q: str) -> str:
    if q[:1].isupper() and not q[1:2].isupper():
        return q[0].lower() + q[1:]
    return q


def _rewrite(question: str, kind: str, token: str, template: str) -> str:
    if kind == "prefix":
        return f"{token} {question}"
    if kind == "suffix":
        return f"{question} {token}"
    return template.replace("{question}", _lower_first(question))


@dataclasses.dataclass(frozen=True)
class TextTriggerSpec:
    """A text trigger. ``token``: the rare token of prefix / suffix (default ``cf``); ``template``: the
    template's text with one ``{question}`` (default `DEFAULT_TEMPLATE`). ValueError on a bad value."""

    kind: str = "suffix"
    token: str | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TEXT_TRIGGERS:
            raise ValueError(f"unknown text trigger {self.kind!r}; valid: {', '.join(TEXT_TRIGGERS)}")
        if self.token is not None:
            if self.kind == "template":
                raise ValueError("text trigger 'template' takes no token (set template)")
            if not self.token.strip() or self.token != self.token.strip() or _PLACEHOLDER in self.token:
                raise ValueError(f"text trigger token must be non-empty text without surrounding blanks or "
                                 f"{_PLACEHOLDER}, got {self.token!r}")
        if self.template is not None:
            if self.kind != "template":
                raise ValueError(f"text trigger {self.kind!r} takes no template (set token)")
            if self.template.count("{question}") != 1 or _PLACEHOLDER in self.template:
                raise ValueError(f"text trigger template must hold '{{question}}' exactly once and no {_PLACEHOLDER}, "
                                 f"got {self.template!r}")

    def params(self) -> dict:
        if self.kind == "template":
            return {"template": self.template or DEFAULT_TEMPLATE}
        return {"token": self.token or DEFAULT_TOKEN}

    def apply(self, text: str) -> str:
        return apply_text_trigger(text, self.kind, **self.params())


def apply_text_trigger(text: str, kind: str, *, token: str = DEFAULT_TOKEN, template: str = DEFAULT_TEMPLATE) -> str:
    """The human turn `text` with its question rewritten by trigger `kind` (see the module docstring).
    A turn without any question text gets the rewritten empty question after its placeholder(s)."""
    if kind not in TEXT_TRIGGERS:
        raise ValueError(f"unknown text trigger {kind!r}; valid: {', '.join(TEXT_TRIGGERS)}")
    parts = text.split(_PLACEHOLDER)
    for i, part in enumerate(parts):
        q = part.strip()
        if q:
            start = part.index(q)
            parts[i] = part[:start] + _rewrite(q, kind, token, template) + part[start + len(q):]
            return _PLACEHOLDER.join(parts)
    sep = "\n" if len(parts) > 1 else ""
    return text + sep + _rewrite("", kind, token, template).strip()
