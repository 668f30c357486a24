"""Dataset -> per-sample, per-layer signal table (python -m bye_jax.extract).

Batched, jitted prefill in probe mode: every decoder layer sows the attention row of the last
prompt position and the attention-weighted image-token hidden state; the signals of
bye_jax/signals.py (the BYE entropy, location / content features, per-head prompt-segment shares)
are reduced on the device and
only [B, L, ...] arrays leave it. Prompts are bucketed by length (padded up to a multiple of
`length_bucket`, so only a handful of shapes compile) and images are decoded and preprocessed on a
background thread.

Results are written in chunks: a part file under workdir/signals_parts/ and the entropies appended
to workdir/entropy.jsonl (both fsynced). A rerun with the same workdir resumes under the same run
identity only (checkpoint, dtype, attention implementation, signal set; see bye_jax/extract_store.py)
and keeps only rows whose inputs are unchanged, so a crash loses at most one chunk; SIGINT / SIGTERM
stop after the batch in flight and keep every computed row (`ExtractionInterrupted`, exit 130 / 143).
Over several processes each extracts a part of the samples and process 0 writes every row
(bye_jax/extract/rounds.py). A finished run merges the parts into workdir/signals.npz and rewrites
entropy.jsonl (atomically), both in dataset order, the order the clustering uses, so the reference
clustering script run on it sees the same rows in the same order (its k-means++ draws depend on it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bye_jax import multihost
from bye_jax.data.llava_json import ImageError, Sample, Skipped, load_image
from bye_jax.data.prefetch import prefetch
from bye_jax.entropy import batch_layer_entropies
from bye_jax.extract import rounds
from bye_jax.extract_store import SignalStore, input_digest
from bye_jax.models.family import family_of
from bye_jax.models.inputs import PromptBatch, PromptEncoder
from bye_jax.models.masks import last_token_index
from bye_jax.progress import progress as progress_bar
from bye_jax.signals import ANSWER_TOKENS, SIGNALS_FILE, SIGNALS_VERSION, SignalTable, content_projection, load_npz
from bye_jax.signals_compute import batch_signals, prompt_segments

ENTROPY_FILE = "entropy.jsonl"


class ExtractionInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM during `EntropyExtractor.run`, raised after the computed rows were written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def sown_rows(intermediates, num_layers: int, name: str = "attn_row",
              layers_path: tuple[str, ...] = ("language_model", "layers")) -> tuple[jax.Array, ...]:
    """The per-layer probe outputs (`name`: attn_row [B, heads, S], image_hidden [B, hidden]) from
    nnx.capture's Intermediate state; `layers_path`: the family's `probe_layers`."""
    layers = intermediates
    for key in layers_path:
        layers = layers[key]
    rows = []
    for i in range(num_layers):
        value = layers[i]["self_attn"][name]
        value = value.get_value() if hasattr(value, "get_value") else value
        rows.append(value[0] if isinstance(value, tuple) else value)
    return tuple(rows)


def sown_input_embed(intermediates, layers_path: tuple[str, ...] = ("language_model", "layers")):
    """The decoder's projected input embeddings [B, S, CONTENT_DIM] (sown as ``input_embed`` next to its
    layers), or None when the decoder did not sow them."""
    node = intermediates
    for key in layers_path[:-1]:
        node = node[key]
    if "input_embed" not in node:
        return None
    value = node["input_embed"]
    value = value.get_value() if hasattr(value, "get_value") else value
    return value[0] if isinstance(value, tuple) else value


def probe_rows(model, input_ids, pixel_values, attention_mask, extra=None):
    """Runs the prefill in probe mode; returns one attention row [B, heads, S] per layer."""
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    _, inter = fwd(model, input_ids, pixel_values, attention_mask,
                   probe_index=last_token_index(attention_mask), logits=None, **(extra or {}))
    return sown_rows(inter, model.cfg.text.num_layers, layers_path=family_of(model).probe_layers)


@partial(jax.jit, static_argnames=("graphdef",))
def _entropy_step(graphdef, state, input_ids, pixel_values, attention_mask, image_mask, extra):
    """[B, L] entropies alone (the extraction before the signal table; kept for benchmarks)."""
    model = nnx.merge(graphdef, state)
    rows = probe_rows(model, input_ids, pixel_values, attention_mask, extra)
    return batch_layer_entropies(rows, image_mask & attention_mask.astype(bool))


@partial(jax.jit, static_argnames=("graphdef", "grid"))
def _signal_step(graphdef, state, input_ids, pixel_values, attention_mask, image_mask, extra, projection, grid,
                 answer_prefix):
    """{name: [B, L, ...]} signal arrays of one batch (bye_jax/signals.py), one forward pass;
    answer_prefix [B]: the prompts' generation-prompt tokens (PromptBatch.answer_prefix)."""
    model = nnx.merge(graphdef, state)
    image_mask = image_mask & attention_mask.astype(bool)
    fwd = nnx.capture(lambda m, *a, **k: m(*a, **k), nnx.Intermediate)
    _, inter = fwd(model, input_ids, pixel_values, attention_mask, probe_index=last_token_index(attention_mask),
                   probe_mask=image_mask, logits=None, **extra)
    n, path = model.cfg.text.num_layers, family_of(model).probe_layers
    segments = prompt_segments(input_ids, attention_mask, model.cfg.image_token_id, answer_prefix)
    return batch_signals(sown_rows(inter, n, layers_path=path), image_mask, grid,
                         sown_rows(inter, n, "image_hidden", path), projection, segments, input_ids,
                         input_embed=sown_input_embed(inter, path))


@partial(jax.jit, static_argnames=("graphdef",))
def _image_attention_step(graphdef, state, input_ids, pixel_values, attention_mask, image_mask, extra):
    """[B, L, S]: head-mean attention of the last position, renormalised over image positions."""
    model = nnx.merge(graphdef, state)
    rows = probe_rows(model, input_ids, pixel_values, attention_mask, extra)
    image_mask = image_mask & attention_mask.astype(bool)
    mean = jnp.stack([r.mean(axis=1) for r in rows], axis=1)
    mean = jnp.where(image_mask[:, None, :], mean, 0.0)
    return mean / jnp.maximum(mean.sum(-1, keepdims=True), 1e-30)


def _image_mask(batch: PromptBatch, image_token_id: int) -> np.ndarray:
    """[B, S] bool: the batch's image positions (the family encoder's, else the image tokens)."""
    return batch.image_mask if batch.image_mask is not None else batch.input_ids == image_token_id


# An entropy in nats lies in [0, ln(image tokens)]; without the token count, ln(2^24) bounds any model.
MAX_ENTROPY = math.log(2**24)
MIN_ENTROPY = -1e-6  # -sum p log(p + 1e-8) of a one-hot row is -1e-8, not below


@dataclasses.dataclass
class EntropyTable:
    ids: list[str]
    matrix: np.ndarray  # [N, L] float32
    signals: SignalTable | None = None  # the same rows' signal table (extraction only)
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
    return EntropyTable(ids, matrix, skipped=skipped)


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
    """Computes the signal table (with the [N, L] entropy matrix) of samples with a loaded model."""

    def __init__(self, model, encoder: PromptEncoder, *, batch_size: int,
                 length_bucket: int = 32, max_image_pixels: int | None = None, batch_sharding=None,
                 signals: bool = True):
        """signals=False: entropies only (the extraction before the signal table; for benchmarks)."""
        self.graphdef, self.state = nnx.split(model)
        self.with_signals = bool(signals)
        self.attn_impl = model.language_model.layers[0].self_attn.attn_impl
        self.dtype = str(np.dtype(model.dtype))
        self.cfg = model.cfg
        self.encoder = encoder
        self.batch_size = int(batch_size)
        self.length_bucket = max(1, int(length_bucket))
        self.max_image_pixels = max_image_pixels
        self.batch_sharding = batch_sharding
        self.timing: dict = {}  # of the last run(): seconds, compile_seconds, steady_samples_per_s, ...
        if encoder.image_token_id != self.cfg.image_token_id:
            raise ValueError(f"processor image token {encoder.image_token_id} != model image_token_id "
                             f"{self.cfg.image_token_id}")
        self.family = family_of(model)
        self.grid = tuple(self.family.image_grid(self.cfg))  # a sample whose image-token count is not H * W: 1 x N
        self.projection = jnp.asarray(content_projection(self.cfg.text.hidden_size))

    def identity(self) -> dict:
        """What makes this extraction's values: stored with a workdir's results (bye_jax/extract_store.py)."""
        from bye_jax.extract_store import checkpoint_digest

        return {"checkpoint": checkpoint_digest(self.encoder.checkpoint_dir), "dtype": self.dtype,
                "attn_impl": self.attn_impl or "auto",
                "signals": SIGNALS_VERSION if self.with_signals else "entropy-only"}

    # -- input pipeline --------------------------------------------------------------------------
    def _batches(self, samples: Sequence[Sample], skipped: list[Skipped]
                 ) -> Iterator[tuple[list[Sample], list[str], PromptBatch]]:
        """Decodes images and builds padded batches with the samples' input digests; unreadable
        images are reported, not dropped."""
        for start in range(0, len(samples), self.batch_size):
            chunk, digests, images = [], [], []
            for s in samples[start:start + self.batch_size]:
                too_long = self.encoder.context_reason(s.question)  # prompt > the model's context
                if too_long:
                    skipped.append(Skipped(s.id, s.index, too_long))
                    continue
                try:
                    # before reading: a change is seen next time
                    digest = input_digest(s.question, s.image_path, s.answer)
                    kw = {} if self.max_image_pixels is None else {"max_image_pixels": self.max_image_pixels}
                    images.append(load_image(s.image_path, reduce_to=self.encoder.image_side, **kw))
                    if digest is None:
                        raise OSError("cannot stat the image")
                    chunk.append(s)
                    digests.append(digest)
                except (ImageError, OSError) as e:
                    if len(images) > len(chunk):
                        images.pop()
                    skipped.append(Skipped(s.id, s.index, f"image unreadable at extraction: {e}"))
            if not chunk:
                continue
            n = len(chunk)
            pad = self.batch_size - n  # fixed batch shape: fill with copies, results discarded
            batch = self.encoder.encode(images + images[:1] * pad, [s.question for s in chunk]
                                        + [chunk[0].question] * pad)
            bucket = math.ceil(batch.seq_len / self.length_bucket) * self.length_bucket
            yield chunk, digests, batch.left_padded_to(bucket, self.encoder.pad_token_id)

    def _put(self, x):
        return jax.device_put(x, self.batch_sharding) if self.batch_sharding is not None else jnp.asarray(x)

    # -- public API ------------------------------------------------------------------------------
    def signals(self, batch: PromptBatch) -> dict[str, np.ndarray]:
        """{name: [B, L, ...]} host arrays of one batch (entropy alone when signals=False)."""
        args = (self.graphdef, self.state, self._put(batch.input_ids), self._put(batch.pixel_values),
                self._put(batch.attention_mask), self._put(_image_mask(batch, self.cfg.image_token_id)),
                {k: jnp.asarray(v) for k, v in batch.extra.items()})
        if not self.with_signals:
            return {"entropy": np.asarray(jax.device_get(_entropy_step(*args)))}
        prefix = batch.answer_prefix if batch.answer_prefix is not None else np.zeros(batch.batch_size, np.int32)
        out = jax.device_get(_signal_step(*args, self.projection, self.grid, self._put(np.asarray(prefix, np.int32))))
        out = {k: np.asarray(v) for k, v in out.items()}
        out["content"] = np.clip(out["content"], -65504, 65504).astype(np.float16)
        if "peak_embed" in out:
            out["peak_embed"] = np.clip(out["peak_embed"], -65504, 65504).astype(np.float16)
        out["shares"] = out["shares"].astype(np.float16)  # in [0, 1]
        return out

    def entropies(self, batch: PromptBatch) -> np.ndarray:
        return self.signals(batch)["entropy"]

    def image_attention(self, image, question: str) -> np.ndarray:
        """[L, num_image_tokens] head-mean last-position attention over the image tokens (for a family whose
        token count varies, over the first H x W of them: the full image's grid, `Family.image_grid`)."""
        batch = self.encoder.encode([image], [question])
        image_mask = _image_mask(batch, self.cfg.image_token_id)
        att = _image_attention_step(self.graphdef, self.state, jnp.asarray(batch.input_ids),
                                    jnp.asarray(batch.pixel_values), jnp.asarray(batch.attention_mask),
                                    jnp.asarray(image_mask), {k: jnp.asarray(v) for k, v in batch.extra.items()})
        keep = image_mask[0] & (batch.attention_mask[0] == 1)
        att = np.asarray(att)[0][:, keep]
        if self.family.variable_image_tokens:  # the first H * W image positions: the full image's grid
            att = att[:, : self.grid[0] * self.grid[1]]
        return att

    def run(self, samples: Sequence[Sample], workdir: str | Path, *, chunk_size: int = 256,
            progress: bool = True) -> tuple[EntropyTable, list[Skipped]]:
        """Extracts the signal table of `samples` into the workdir, resuming finished rows.

        Returns the entropy table of the extracted samples in dataset order, its `signals` the same
        rows' SignalTable (all rows, also of ids no longer in the dataset: `load_signals(workdir)`).
        Raises `WorkdirMismatch` (a ValueError) when the workdir holds another run's results, and
        `ExtractionInterrupted` after SIGINT / SIGTERM (computed rows written).
        Over several processes every process calls this with the same samples: each extracts its part
        (bye_jax/extract/rounds.py), process 0 alone reads and writes the workdir and returns the
        table; the others return an empty table (and every process the skipped samples).
        `self.timing` then holds the run's seconds, compile_seconds and steady_samples_per_s.
        """
        workdir = Path(workdir)
        out_path = workdir / ENTROPY_FILE
        store = SignalStore(workdir, self.identity())
        primary = multihost.is_primary()
        rounds.check_same_samples(samples)

        def open_store() -> list[int]:  # process 0 only: the workdir's rows -> the pending samples
            workdir.mkdir(parents=True, exist_ok=True)
            store.open()
            stale = [s.id for s in samples
                     if s.id in store and input_digest(s.question, s.image_path, s.answer) != store.digests[s.id]]
            store.drop(stale)  # inputs changed under the same id: recompute
            if out_path.exists() or store.ids:  # entropy.jsonl = the stored rows (drops stale or torn lines)
                write_entropy_jsonl(out_path, store.ids, [store.entropy_row(i) for i in store.ids])
            return [k for k, s in enumerate(samples) if s.id not in store]

        pending = [samples[k] for k in multihost.from_primary(open_store)]
        mine = rounds.my_part(pending)
        # Similar lengths together -> fewer padded tokens and few compiled shapes.
        mine.sort(key=lambda s: len(s.question))
        local_skipped: list[Skipped] = []  # appended by the image thread
        skipped: list[Skipped] = []  # every process's
        bar = progress_bar(len(pending), "extract", unit="sample", enabled=progress and primary, smoothing=0.1)
        rows: list[rounds.Row] = []  # computed, not yet written: (id, input digest, arrays)
        timer = _Timer()
        stop_signal = 0
        with _StopOnSignal() as stop, (open(out_path, "a", encoding="utf-8") if primary
                                       else contextlib.nullcontext()) as out:
            batches = prefetch(self._batches(mine, local_skipped))
            sent = 0
            try:
                while True:
                    mine_round = rounds.Round()
                    try:
                        item = next(batches, None)
                        mine_round.done = item is None
                        if item is not None:
                            chunk, digests, batch = item
                            with timer.step(batch.input_ids.shape, len(chunk)):
                                sig = self.signals(batch)
                            if self.with_signals:  # the upload's answers: not a model input (signals.py)
                                sig["answer_tokens"] = self.encoder.answer_tokens([s.answer for s in chunk],
                                                                                  ANSWER_TOKENS)
                            mine_round.rows = [(s.id, digest, {name: a[k] for name, a in sig.items()})
                                               for k, (s, digest) in enumerate(zip(chunk, digests, strict=True))]
                    except Exception as e:  # noqa: BLE001 - over processes: told to every process, raised on each
                        if multihost.process_count() == 1:
                            raise
                        mine_round.error = multihost.describe(e)
                    n = len(local_skipped)
                    mine_round.skipped, sent = local_skipped[sent:n], n
                    mine_round.stop = stop.signum
                    everyone = rounds.exchange(mine_round)
                    for r in everyone:
                        rows.extend(r.rows)
                        skipped.extend(r.skipped)
                        bar.update(len(r.rows))
                    if primary and len(rows) >= chunk_size:
                        _write_rows(store, out, rows)
                    rows = rows if primary else []
                    failed = [(p, r.error) for p, r in enumerate(everyone) if r.error]
                    if failed:
                        raise multihost.StepFailed(f"extraction failed on process {failed[0][0]} of {len(everyone)}: "
                                                   f"{failed[0][1]}; every process stopped (finished rows are kept)")
                    stop_signal = next((r.stop for r in everyone if r.stop), 0)
                    if stop_signal or all(r.done for r in everyone):
                        break
            finally:
                batches.close()  # stops the image thread before anything else happens
                bar.close()
                if primary:
                    _write_rows(store, out, rows)  # every computed row is kept, whatever stopped the loop
        skipped.sort(key=lambda s: s.index)
        self.timing = timer.summary(time.time() - timer.t0)
        if stop_signal:
            raise ExtractionInterrupted(stop.signum or stop_signal)
        if progress and pending and primary:
            t = self.timing
            steady = f"{t['steady_samples_per_s']:.2f} samples/s" if t["steady_samples_per_s"] else "-"
            where = f" on process 0 of {multihost.process_count()}" if multihost.process_count() > 1 else ""
            print(f"extract: {len(pending)} samples in {t['seconds']:.1f}s "
                  f"({len(pending) / max(t['seconds'], 1e-9):.2f} samples/s; first batch of each shape, with its "
                  f"compilation: {t['compile_seconds']:.1f}s; after it: {steady}{where})")
        if not primary:  # process 0 holds the table
            return EntropyTable([], np.zeros((0, self.cfg.text.num_layers), np.float32)), skipped
        ids = [s.id for s in samples if s.id in store]
        merged = store.finish(ids)  # signals.npz: the dataset's rows in order, then ids no longer in it
        write_entropy_jsonl(out_path, merged.ids, merged.entropy)
        signals = merged.take(np.arange(len(ids)))
        matrix = signals.entropy.astype(np.float32) if ids else np.zeros((0, self.cfg.text.num_layers), np.float32)
        table = EntropyTable(ids, matrix, signals=signals)
        np.save(workdir / "entropy.npy", table.matrix)
        (workdir / "entropy_ids.json").write_text(json.dumps(table.ids))
        return table, skipped


def load_signals(workdir: str | Path) -> SignalTable:
    """The signal table a finished extraction left in workdir/signals.npz (all its rows)."""
    return load_npz(Path(workdir) / SIGNALS_FILE)


def _write_rows(store: SignalStore, out, rows: list[tuple[str, str, dict]]) -> None:
    """Writes computed rows: the part file first (the rows' record), then their entropy.jsonl lines."""
    if not rows:
        return
    ids = [r[0] for r in rows]
    arrays = {name: np.stack([r[2][name] for r in rows]) for name in rows[0][2]}
    store.append(ids, [r[1] for r in rows], arrays)
    _flush(out, [_entropy_line(i, row) for i, row in zip(ids, arrays["entropy"], strict=True)])
    rows.clear()


class _Timer:
    """Splits an extraction's time: the first batch of each input shape (compilation, or a cache load)
    and the steady state after it."""

    def __init__(self):
        self.t0 = time.time()
        self.shapes: set = set()
        self.compile_seconds = self.steady_seconds = 0.0
        self.steady_samples = 0

    @contextlib.contextmanager
    def step(self, shape, n: int):
        t = time.time()
        yield
        dt = time.time() - t
        if shape in self.shapes:
            self.steady_seconds += dt
            self.steady_samples += n
        else:
            self.shapes.add(shape)
            self.compile_seconds += dt

    def summary(self, seconds: float) -> dict:
        rate = self.steady_samples / self.steady_seconds if self.steady_seconds > 0 else float("nan")
        return {"seconds": round(seconds, 3), "compile_seconds": round(self.compile_seconds, 3),
                "compiled_shapes": len(self.shapes), "steady_samples": self.steady_samples,
                "steady_samples_per_s": round(rate, 3) if math.isfinite(rate) else None}


class _StopOnSignal:
    """Within the block, SIGINT / SIGTERM only set `signum` (the loop stops after the batch in
    flight, with no XLA work pending and the image thread stopped); a second signal acts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():  # a second signal: the usual behaviour
            signal.signal(sig, handler)
        print(f"\nextract: {signal.Signals(signum).name}: stopping after the batch in flight "
              "(computed rows are kept)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        return False


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
