"""The signal table: what extraction measures per sample and per layer, and what detectors read.

A `SignalTable` holds the row ids and named arrays whose first axis is the sample (N) and whose
second axis, for per-layer signals, is the decoder layer (L). ``entropy`` (the BYE entropy, the
reference's value) is always there; the other signals are present when extraction computed them
and absent when the table was read from an entropy file in the reference format. Detectors ask
``table.get(name)`` and fall back to entropy alone when a signal is missing.

On disk: ``signals.npz`` with one array per signal plus ``ids`` (see `save_npz` / `load_npz`).
Extraction writes it (bye_jax/extract/, computed by bye_jax/signals_compute.py); ``SIGNALS_VERSION``
names this definition (stored with a workdir's partial results: a change means recompute).

Signal names (per sample n, layer l; "image attention" = the last prompt position's attention
restricted to the image tokens, mean over heads, renormalised to sum to 1, as for the entropy):

| name | shape | meaning |
|---|---|---|
| entropy | [N, L] float32 | BYE entropy in nats (NaN = missing) |
| entropy_norm | [N, L] float32 | entropy / ln(num image tokens), in [0, 1] |
| peak | [N, L] int32 | index (among the image tokens, in order) of the most attended image token |
| peak_mass | [N, L] float32 | image attention on that token |
| topk_mass | [N, L] float32 | image attention on the `TOPK` most attended image tokens |
| centroid | [N, L, 2] float32 | attention-weighted (row, col) of the image tokens on their grid, in [0, 1] |
| content | [N, L, D] float16 | fixed random projection of the attention-weighted image-token hidden state |
| peak_embed | [N, L, D] float16 | the same projection of the peak image token's input embedding (LM input) |
| image_mass | [N, L] float32 | share of the full (causal) attention row that falls on the image tokens |
| shares | [N, L, H, 4] float16 | per head, share of the full (causal) row on each segment (`SHARE_SEGMENTS`) |
| visual_text_ratio | [N, L] float32 | head-mean image share / head-mean user-text share |
| text_peak | [N, L] int32 | token id of the most attended user-text token (head-mean row; -1 = none) |
| text_peak_mass | [N, L] float32 | that token's share of the head-mean user-text attention, in [0, 1] |
| num_image_tokens | [N] int32 | image tokens of the sample |
| user_tokens | [N, 128] int32 | user-text token ids in prompt order, -1 after the last (longer: first and last 64) |
| answer_tokens | [N, 32] int32 | the upload's answer (first gpt turn) as token ids, its first 32, -1 after the last |

Prompt segments (`SHARE_SEGMENTS`, per sample, from the token ids and the template): ``system`` = the
tokens before the first image token (BOS, any system prompt, the user's role header); ``image`` = the
image tokens; ``answer`` = the prompt's last tokens after the question (the template's generation
prompt, e.g. ``ASSISTANT:``, the answer's prefix, the probe position included; `PromptEncoder.
answer_prefix_length`); ``user`` = the other tokens (the question and the template text around it).
Per head the four shares sum to 1 (float16 storage: within 1e-3). ``visual_text_ratio`` is NaN when
the user text gets no attention. ``text_peak`` is the text counterpart of ``peak`` (a token id, not a
position: the same word sits at different positions in different questions); ties go to the first
position; with no user-text token or no attention on it, ``text_peak`` is -1 and ``text_peak_mass`` NaN.
``user_tokens`` are the ``user`` segment's token ids (the question and the template text around it), not an
attention signal: the ``inserted`` detector reads which text the samples of an attention minority share.
``answer_tokens`` are the sample's answer in the upload (its first gpt turn, whitespace stripped, tokenized without
special tokens; all -1 when it has none): not a model input either; the ``targeted`` detector reads which answer
the samples of an attention minority share.
100k samples x 32 layers x 32 heads: 0.8 GB of shares.

Details. The grid: image token j (in prompt order) sits at row j // W, column j % W of an H x W grid
(LLaVA-1.5: H = W = image_size // patch_size, 24 x 24); a sample whose image-token count is not
H * W uses a 1 x N grid. Coordinates are patch centres, ((row + 0.5) / H, (col + 0.5) / W).
``content`` = (sum_t p_t x_t) @ P, where p is the image attention, x_t the hidden state entering the
layer (the residual stream, as transformers' ``hidden_states[l]``) at image token t, and
P = ``content_projection(hidden_size)``: standard normal / sqrt(hidden_size), drawn with numpy's
``default_rng(CONTENT_SEED)``; stored as float16 (clipped to its range). ``peak_embed`` = e_v @ P, where
e_v is the language model's input embedding at the layer's ``peak`` image token v (for LLaVA: the
projector's output for that patch, as transformers' ``hidden_states[0]``): WHAT the layer peaks on, not
where (a trigger pasted at varying places keeps its look; ``content`` mixes the layer's residual stream
over the attended tokens instead); float16, NaN where ``peak`` is -1. ``peak`` ties go to the
first token. A sample with no image attention mass at a layer has NaN float signals, ``peak`` -1
and ``image_mass`` 0; ``entropy_norm`` is NaN when there are fewer than 2 image tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SignalTable", "SIGNALS_FILE", "SIGNALS_VERSION", "TOPK", "USER_TOKENS", "ANSWER_TOKENS", "CONTENT_DIM",
           "CONTENT_SEED", "PER_LAYER", "SHARE_SEGMENTS",
           "content_projection", "save_npz", "load_npz"]

SIGNALS_FILE = "signals.npz"
SIGNALS_VERSION = 6  # 2: + shares, visual_text_ratio; 3: + peak_embed or text_peak, text_peak_mass (two branches);
                     # 4: + peak_embed, text_peak, text_peak_mass; 5: + user_tokens; 6: + answer_tokens (an older
                     # workdir is refused at resume; an older finished table loads, without the newer signals)
TOPK = 4
USER_TOKENS = 128  # user-text token ids kept per sample (a longer question: its first and last 64)
ANSWER_TOKENS = 32  # answer token ids kept per sample (its first)
CONTENT_DIM = 16
CONTENT_SEED = 20240601
SHARE_SEGMENTS = ("system", "image", "user", "answer")
PER_LAYER = ("entropy", "entropy_norm", "peak", "peak_mass", "topk_mass", "centroid", "content", "image_mass",
             "shares", "visual_text_ratio", "peak_embed", "text_peak", "text_peak_mass")


def content_projection(hidden_size: int) -> np.ndarray:
    """The fixed [hidden_size, CONTENT_DIM] float32 projection behind the ``content`` signal."""
    rng = np.random.default_rng(CONTENT_SEED)
    return (rng.standard_normal((hidden_size, CONTENT_DIM)) / np.sqrt(hidden_size)).astype(np.float32)


@dataclass
class SignalTable:
    ids: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if "entropy" not in self.arrays:
            raise ValueError("a signal table needs an 'entropy' array")
        n = len(self.ids)
        for name, a in self.arrays.items():
            if a.shape[0] != n:
                raise ValueError(f"signal {name!r} has {a.shape[0]} rows for {n} ids")

    @classmethod
    def from_entropy(cls, ids, matrix) -> SignalTable:
        """A table with the entropy alone (e.g. read from a reference-format entropy.jsonl)."""
        return cls(list(ids), {"entropy": np.asarray(matrix, np.float32)})

    @property
    def entropy(self) -> np.ndarray:
        return self.arrays["entropy"]

    @property
    def num_samples(self) -> int:
        return len(self.ids)

    @property
    def num_layers(self) -> int:
        e = self.entropy
        return int(e.shape[1]) if e.ndim == 2 else 0

    def get(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)

    def has(self, name: str) -> bool:
        return name in self.arrays

    def take(self, rows) -> SignalTable:
        """The table restricted to `rows` (indices, in that order)."""
        rows = np.asarray(rows, np.int64)
        return SignalTable([self.ids[i] for i in rows], {k: v[rows] for k, v in self.arrays.items()})


def save_npz(table: SignalTable, path: str | Path) -> None:
    """Writes the table as a compressed .npz via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, ids=np.asarray(table.ids, dtype=str), **table.arrays)
    os.replace(tmp, path)


def load_npz(path: str | Path) -> SignalTable:
    with np.load(path, allow_pickle=False) as z:
        ids = [str(i) for i in z["ids"]]
        arrays = {k: z[k] for k in z.files if k != "ids"}
    return SignalTable(ids, arrays)
