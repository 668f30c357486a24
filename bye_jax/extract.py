"""Dataset -> per-sample, per-layer image-attention entropy matrix (python -m bye_jax.extract).

Batched, jitted prefill in probe mode: every decoder layer sows the attention row of the last
prompt position; the image-span entropies are computed on the device and only the [B, L] matrix
leaves it. Prompts are bucketed by length (padded up to a multiple of `length_bucket`, so only a
handful of shapes compile) and images are decoded and preprocessed on a background thread.
Results are appended to workdir/entropy.jsonl in chunks (fsynced); a rerun with the same workdir
skips finished ids, so a crash loses at most one chunk. A finished run rewrites the file (atomically)
in dataset order, the order the clustering uses, so the reference clustering script run on it sees
the same rows in the same order (its k-means++ draws depend on the order).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bye_jax.data.llava_json import ImageError, Sample, Skipped, load_image
from bye_jax.data.prefetch import prefetch
from bye_jax.entropy import batch_layer_entropies
from bye_jax.models.inputs import PromptBatch, PromptEncoder
from bye_jax.models.llava import LlavaForConditionalGeneration, last_token_index

ENTROPY_FILE = "entropy.jsonl"


def sown_rows(intermediates, num_layers: int) -> tuple[jax.Array, ...]:
    """The per-layer probe rows [B, heads, S] from nnx.capture's Intermediate state."""
    layers = intermediates["language_model"]["layers"]
    rows = []
    for i in range(num_layers):
        value = layers[i]["self_attn"]["attn_row"]
        value = value.get_value() if hasattr(value, "get_value") else value
        rows.append(value[0] if isinstance(value, tuple) else value)
    return tuple(rows)


def probe_rows(model: LlavaForConditionalGeneration, input_ids, pixel_values, attention_mask):
    """Runs the prefill in probe mode; returns one attention row [B, heads, S] per layer."""
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    _, inter = fwd(model, input_ids, pixel_values, attention_mask,
                   probe_index=last_token_index(attention_mask), logits=None)
    return sown_rows(inter, model.cfg.text.num_layers)


@partial(jax.jit, static_argnames=("graphdef",))
def _entropy_step(graphdef, state, input_ids, pixel_values, attention_mask, image_token_id):
    model = nnx.merge(graphdef, state)
    rows = probe_rows(model, input_ids, pixel_values, attention_mask)
    image_mask = (input_ids == image_token_id) & attention_mask.astype(bool)
    return batch_layer_entropies(rows, image_mask)


@partial(jax.jit, static_argnames=("graphdef",))
def _image_attention_step(graphdef, state, input_ids, pixel_values, attention_mask, image_token_id):
    """[B, L, S]: head-mean attention of the last position, renormalised over image positions."""
    model = nnx.merge(graphdef, state)
    rows = probe_rows(model, input_ids, pixel_values, attention_mask)
    image_mask = (input_ids == image_token_id) & attention_mask.astype(bool)
    mean = jnp.stack([r.mean(axis=1) for r in rows], axis=1)
    mean = jnp.where(image_mask[:, None, :], mean, 0.0)
    return mean / jnp.maximum(mean.sum(-1, keepdims=True), 1e-30)


# An entropy in nats lies in [0, ln(image tokens)]; without the token count, ln(2^24) bounds any model.
MAX_ENTROPY = math.log(2**24)
MIN_ENTROPY = -1e-6  # -sum p log(p + 1e-8) of a one-hot row is -1e-8, not below


@dataclasses.dataclass
class EntropyTable:
    ids: list[str]
    matrix: np.ndarray  # [N, L] float32
    skipped: list[Skipped] = dataclasses.field(default_factory=list)  # rows read but not used, with reasons

    @property
    def num_layers(self) -> int:
        return int(self.matrix.shape[1]) if self.matrix.ndim == 2 else 0


def _bad_value(row: list[float]) -> str | None:
    for layer, h in enumerate(row):
        if math.isnan(h):
            continue  # NaN = missing (filled with the layer mean by the detectors, as the reference does)
        if math.isinf(h):
            return f"layer {layer} entropy is {h} (not finite)"
        if not MIN_ENTROPY <= h <= MAX_ENTROPY:
            return f"layer {layer} entropy {h:g} is outside [0, ln(2^24)]"
    return None


def read_entropy_jsonl(path: str | Path) -> EntropyTable:
    """Reads the reference format; a truncated last line (interrupted write) is ignored.

    Rows with an infinite or out-of-range entropy, and every row of an id that appears more than once
    with different values, are left out and listed in ``skipped`` with a reason (line numbers as
    ``index``); repeats with identical values count once. NaN stays: it marks a missing value.
    """
    path = Path(path)
    ids, rows, lines_of = [], [], []
    skipped: list[Skipped] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ent = rec["entropy"]
            row = [float(ent[str(i)]) for i in range(len(ent))]
            qid = str(rec["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
            if lineno == len(lines) or (lineno == len(lines) - 1 and not lines[-1]):
                break  # partial final line of an interrupted run
            raise ValueError(f"{path}:{lineno}: not an entropy record ({type(e).__name__}: {e})") from e
        if rows and len(row) != len(rows[0]):
            raise ValueError(f"{path}:{lineno}: {len(row)} layers, earlier lines have {len(rows[0])}")
        bad = _bad_value(row)
        if bad is not None:
            skipped.append(Skipped(qid, lineno, f"line {lineno}: {bad}"))
            continue
        ids.append(qid)
        rows.append(row)
        lines_of.append(lineno)
    ids, rows = _drop_conflicting_duplicates(ids, rows, lines_of, skipped)
    matrix = np.asarray(rows, np.float32).reshape(len(rows), len(rows[0]) if rows else 0)
    return EntropyTable(ids, matrix, skipped)


def _drop_conflicting_duplicates(ids, rows, lines_of, skipped):
    first: dict[str, int] = {}
    dup: dict[str, list[int]] = {}
    for k, qid in enumerate(ids):
        if qid in first:
            dup.setdefault(qid, [first[qid]]).append(k)
        else:
            first[qid] = k
    drop = set()
    for qid, ks in dup.items():
        same = all(np.array_equal(np.asarray(rows[k]), np.asarray(rows[ks[0]]), equal_nan=True) for k in ks)
        drop.update(ks[1:] if same else ks)
        if not same:
            where = ", ".join(str(lines_of[k]) for k in ks)
            skipped.extend(Skipped(qid, lines_of[k], f"duplicate id with different entropies (lines {where})")
                           for k in ks[:1])
    keep = [k for k in range(len(ids)) if k not in drop]
    return [ids[k] for k in keep], [rows[k] for k in keep]


class EntropyExtractor:
    """Computes the [N, L] entropy matrix for LLaVA-JSON samples with a loaded model."""

    def __init__(self, model: LlavaForConditionalGeneration, encoder: PromptEncoder, *, batch_size: int,
                 length_bucket: int = 32, max_image_pixels: int | None = None, batch_sharding=None):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.encoder = encoder
        self.batch_size = int(batch_size)
        self.length_bucket = max(1, int(length_bucket))
        self.max_image_pixels = max_image_pixels
        self.batch_sharding = batch_sharding
        if encoder.image_token_id != self.cfg.image_token_id:
            raise ValueError(f"processor image token {encoder.image_token_id} != model image_token_id "
                             f"{self.cfg.image_token_id}")

    # -- input pipeline --------------------------------------------------------------------------
    def _batches(self, samples: Sequence[Sample], skipped: list[Skipped]
                 ) -> Iterator[tuple[list[Sample], PromptBatch]]:
        """Decodes images and builds padded batches; unreadable images are reported, not dropped."""
        for start in range(0, len(samples), self.batch_size):
            chunk, images = [], []
            for s in samples[start:start + self.batch_size]:
                try:
                    kw = {} if self.max_image_pixels is None else {"max_image_pixels": self.max_image_pixels}
                    images.append(load_image(s.image_path, **kw))
                    chunk.append(s)
                except (ImageError, OSError) as e:
                    skipped.append(Skipped(s.id, s.index, f"image unreadable at extraction: {e}"))
            if not chunk:
                continue
            n = len(chunk)
            pad = self.batch_size - n  # fixed batch shape: fill with copies, results discarded
            batch = self.encoder.encode(images + images[:1] * pad, [s.question for s in chunk]
                                        + [chunk[0].question] * pad)
            bucket = math.ceil(batch.seq_len / self.length_bucket) * self.length_bucket
            yield chunk, batch.left_padded_to(bucket, self.encoder.pad_token_id)

    def _put(self, x):
        return jax.device_put(x, self.batch_sharding) if self.batch_sharding is not None else jnp.asarray(x)

    # -- public API ------------------------------------------------------------------------------
    def entropies(self, batch: PromptBatch) -> np.ndarray:
        out = _entropy_step(self.graphdef, self.state, self._put(batch.input_ids),
                            self._put(batch.pixel_values), self._put(batch.attention_mask),
                            self.cfg.image_token_id)
        return np.asarray(jax.device_get(out))

    def image_attention(self, image, question: str) -> np.ndarray:
        """[L, num_image_tokens] head-mean last-position attention over the image tokens."""
        batch = self.encoder.encode([image], [question])
        att = _image_attention_step(self.graphdef, self.state, jnp.asarray(batch.input_ids),
                                    jnp.asarray(batch.pixel_values), jnp.asarray(batch.attention_mask),
                                    self.cfg.image_token_id)
        keep = (batch.input_ids[0] == self.cfg.image_token_id) & (batch.attention_mask[0] == 1)
        return np.asarray(att)[0][:, keep]

    def run(self, samples: Sequence[Sample], workdir: str | Path, *, chunk_size: int = 256,
            progress: bool = True) -> tuple[EntropyTable, list[Skipped]]:
        """Extracts entropies for `samples` into workdir/entropy.jsonl, resuming finished ids."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        out_path = workdir / ENTROPY_FILE
        done: dict[str, np.ndarray] = {}
        if out_path.exists():
            prev = read_entropy_jsonl(out_path)
            if prev.ids and prev.num_layers != self.cfg.text.num_layers:
                raise ValueError(f"{out_path} has {prev.num_layers} layers but the model has "
                                 f"{self.cfg.text.num_layers}: use another workdir")
            done = dict(zip(prev.ids, prev.matrix, strict=True))
            _truncate_partial_line(out_path)
        pending = [s for s in samples if s.id not in done]
        # Similar lengths together -> fewer padded tokens and few compiled shapes.
        pending.sort(key=lambda s: len(s.question))
        skipped: list[Skipped] = []
        bar = tqdm(total=len(pending), unit="sample", disable=not progress, desc="extract",
                   dynamic_ncols=True, smoothing=0.1)
        buffer: list[str] = []
        t0 = time.time()
        with open(out_path, "a", encoding="utf-8") as out:
            for chunk, batch in prefetch(self._batches(pending, skipped)):
                ent = self.entropies(batch)[: len(chunk)]
                for s, row in zip(chunk, ent, strict=True):
                    done[s.id] = row
                    buffer.append(_entropy_line(s.id, row))
                if len(buffer) >= chunk_size:
                    _flush(out, buffer)
                bar.update(len(chunk))
            _flush(out, buffer)
        bar.close()
        if progress and pending:
            dt = time.time() - t0
            rate = len(pending) / max(dt, 1e-9)
            print(f"extract: {len(pending)} samples in {dt:.1f}s ({rate:.2f} samples/s)")
        ids = [s.id for s in samples if s.id in done]
        matrix = np.stack([done[i] for i in ids]).astype(np.float32) if ids else np.zeros(
            (0, self.cfg.text.num_layers), np.float32)
        table = EntropyTable(ids, matrix)
        in_dataset = set(ids)  # rows of ids no longer in the dataset stay, after the dataset's rows
        order = ids + [i for i in done if i not in in_dataset]
        write_entropy_jsonl(out_path, order, [done[i] for i in order])
        np.save(workdir / "entropy.npy", table.matrix)
        (workdir / "entropy_ids.json").write_text(json.dumps(table.ids))
        return table, skipped


def _entropy_line(qid: str, row: np.ndarray) -> str:
    return json.dumps({"question_id": qid, "entropy": {str(i): float(h) for i, h in enumerate(row)}})


def write_entropy_jsonl(path: Path, ids: Sequence[str], rows: Sequence[np.ndarray]) -> None:
    """Writes the reference format, one line per id in this order, via a temporary file and a rename
    (an interrupted write leaves the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        _flush(out, [_entropy_line(i, row) for i, row in zip(ids, rows, strict=True)])
    os.replace(tmp, path)


def _flush(out, buffer: list[str]) -> None:
    if buffer:
        out.write("\n".join(buffer) + "\n")
        out.flush()
        os.fsync(out.fileno())
        buffer.clear()


def _truncate_partial_line(path: Path) -> None:
    """Drops an incomplete last line left by an interrupted write, so appends stay well-formed."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)


def main() -> None:
    """python -m bye_jax.extract --config=bye_jax/configs/llava.py --config.model=DIR ... --workdir=OUT"""
    from bye_jax import cli
    from bye_jax.runner import UserError, run_extract

    cli.define_flags(None)

    def _run(config, workdir):
        if not workdir:
            raise UserError("--workdir is required")
        inputs, table, _ = run_extract(config, Path(workdir))
        print(f"extract: {len(table.ids)} samples x {table.num_layers} layers -> {Path(workdir) / ENTROPY_FILE}"
              f" ({len(inputs.skipped)} skipped)")
        for s in inputs.skipped[:20]:
            print(f"  skipped {s.id}: {s.reason}")
        return 0

    cli.run(_run, "bye_jax.extract")


if __name__ == "__main__":
    main()
