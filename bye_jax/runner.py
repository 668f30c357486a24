"""Library side of the `extract` and `filter` commands: config in, files in the workdir out.

Every user-facing failure is a `UserError` carrying a one-line reason; `cli.run` prints it and
exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bye_jax.data import sources
from bye_jax.data.llava_json import DatasetError, Sample, Skipped, load_image, write_subset
from bye_jax.detect import DETECTORS, Detection, detect, json_safe, precision_recall_f1
from bye_jax.extract import EntropyExtractor, EntropyTable, read_entropy_jsonl, write_entropy_jsonl
from bye_jax.signals import SIGNALS_FILE, SignalTable, load_npz


class UserError(Exception):
    """A problem with the user's config or inputs (reported in one line, exit status 2)."""


@dataclass
class Inputs:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    annotations: Path | None = None  # the LLaVA JSON file (None for other sources)
    label: str = ""  # names the dataset in messages
    protect: list[Path] = field(default_factory=list)  # inputs that no output may replace


def _check_config(config, need_model: bool) -> None:
    if config.dtype not in ("float32", "bfloat16"):
        raise UserError(f"config.dtype must be float32 or bfloat16, got {config.dtype!r}")
    if config.batch_size < 1:
        raise UserError(f"config.batch_size must be >= 1, got {config.batch_size}")
    if config.attn_impl not in ("auto", "xla", "cudnn"):
        raise UserError(f"config.attn_impl must be auto, xla or cudnn, got {config.attn_impl!r}")
    if config.detect.rule not in DETECTORS:
        raise UserError(f"config.detect.rule must be one of {', '.join(sorted(DETECTORS))}, got {config.detect.rule!r}")
    tau = config.detect.tau
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise UserError(f"config.detect.tau must be a finite number >= 0, got {tau!r}")
    if need_model and not config.model:
        raise UserError("config.model is empty: give a Hugging Face LLaVA checkpoint directory "
                        "(--config.model=DIR)")
    if need_model:
        require_data(config.data)


def require_data(section, where: str = "config.data") -> None:
    """UserError unless the data section names a dataset (LLaVA JSON or TFDS)."""
    try:
        if not sources.is_configured(section):
            raise UserError(sources.missing_message(section, where))
    except DatasetError as e:
        raise UserError(f"{where}.{e}") from e


def load_section(section, *, max_image_pixels, where: str = "") -> Inputs:
    """The one loader behind every command: a data section (LLaVA JSON or TFDS, see
    bye_jax/data/sources.py) -> validated Inputs; empty Inputs when the section names no dataset.
    Every host reads the whole dataset (per-host shards: `sources.load_source(shard=...)`).
    Failures and a dataset without any usable sample are UserErrors prefixed with `where`."""
    prefix = f"{where}: " if where else ""
    try:
        sources.source_of(section)
    except DatasetError as e:
        raise UserError(f"{where or 'config.data'}.{e}") from e
    try:
        if not sources.is_configured(section):
            return Inputs()
        loaded = sources.load_source(section, max_image_pixels=max_image_pixels)
    except DatasetError as e:
        raise UserError(prefix + str(e)) from e
    if not loaded.samples:
        raise UserError(f"{prefix}{loaded.label}: no usable sample ({len(loaded.skipped)} skipped"
                        + (f", first: {loaded.skipped[0].reason}" if loaded.skipped else "") + ")")
    return Inputs(loaded.samples, loaded.skipped, loaded.annotations, loaded.label, loaded.protect)


def load_inputs(config) -> Inputs:
    return load_section(config.data, max_image_pixels=config.data.max_image_pixels)


def load_extractor(config) -> EntropyExtractor:
    from bye_jax.models.config import ConfigError
    from bye_jax.models.hf_loader import CheckpointError, load_llava
    from bye_jax.models.inputs import PromptEncoder
    from bye_jax.models.safetensors_io import SafetensorsError
    from bye_jax.parallel import maybe_initialize_distributed, placement

    maybe_initialize_distributed()
    try:
        place = placement(config.mesh.data, config.mesh.fsdp, config.batch_size)
    except ValueError as e:
        raise UserError(f"config.{e}") from e
    impl = None if config.attn_impl == "auto" else config.attn_impl
    try:
        model, _ = load_llava(config.model, dtype=config.dtype, attn_impl=impl,
                              sharding_for=place.params)
        encoder = PromptEncoder(config.model)
    except (CheckpointError, ConfigError, SafetensorsError, OSError) as e:
        raise UserError(f"checkpoint {config.model} does not load: {e}") from e
    except ValueError as e:
        raise UserError(f"checkpoint {config.model}: {e}") from e
    try:
        return EntropyExtractor(model, encoder, batch_size=config.batch_size, length_bucket=config.length_bucket,
                                max_image_pixels=config.data.max_image_pixels,
                                batch_sharding=place.batch)
    except ValueError as e:
        raise UserError(f"checkpoint {config.model}: {e}") from e


def run_extract(config, workdir: Path, *, progress: bool = True):
    """Validates the data, loads the model and writes workdir/entropy.jsonl (resuming)."""
    _check_config(config, need_model=True)
    inputs = load_inputs(config)
    extractor = load_extractor(config)
    try:
        table, extract_skipped = extractor.run(inputs.samples, workdir, chunk_size=config.chunk_size,
                                               progress=progress)
    except ValueError as e:
        raise UserError(str(e)) from e
    inputs.skipped.extend(extract_skipped)
    return inputs, table, extractor


def _align(table: EntropyTable, inputs: Inputs, source: str) -> EntropyTable:
    """Keeps the rows of dataset samples (dataset order); samples without a row are skipped (with the
    entropy file's reason where it skipped the row: infinite / out-of-range value, duplicate id)."""
    bad = {sk.id: sk.reason for sk in getattr(table, "skipped", [])}
    if not inputs.samples:
        inputs.skipped.extend(Skipped(sk.id, sk.index, f"{source}: {sk.reason}")
                              for sk in getattr(table, "skipped", []))
        return table
    row = {i: k for k, i in enumerate(table.ids)}
    kept, missing = [], []
    for s in inputs.samples:
        (kept if s.id in row else missing).append(s)
    for s in missing:
        reason = f"{source}: {bad[s.id]}" if s.id in bad else f"no entropy for this id in {source}"
        inputs.skipped.append(Skipped(s.id, s.index, reason))
    inputs.samples = kept
    if not kept:
        raise UserError(f"{source}: none of its ids is in {inputs.label}")
    return EntropyTable([s.id for s in kept], table.matrix[[row[s.id] for s in kept]])


def _ground_truth(table: EntropyTable, inputs: Inputs) -> np.ndarray | None:
    if inputs.samples:
        truth = np.array([bool(s.poisoned) for s in inputs.samples])
        has_field = any(isinstance(s.raw, dict) and "poisoned" in s.raw for s in inputs.samples)
        return truth if (has_field or truth.any()) else None
    truth = np.array(["poison" in i for i in table.ids])
    return truth if truth.any() else None


def run_filter(config, workdir: Path, *, progress: bool = True) -> dict:
    """The whole BYE filter; returns the report dict (also written to workdir/report.json)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    extractor = None
    if config.entropy_file:
        _check_config(config, need_model=False)
        inputs = load_inputs(config)
        try:
            table = read_entropy_jsonl(config.entropy_file)
        except (OSError, ValueError) as e:
            raise UserError(f"entropy_file: {e}") from e
        if not table.ids:
            raise UserError(f"{config.entropy_file}: no entropy records")
        table = _align(table, inputs, config.entropy_file)
        if Path(config.entropy_file).resolve() != (workdir / "entropy.jsonl").resolve():
            write_entropy_jsonl(workdir / "entropy.jsonl", table.ids, table.matrix)
    else:
        inputs, table, extractor = run_extract(config, workdir, progress=progress)
        table = _align(table, inputs, "extraction")

    try:
        det = detect(_detection_table(table, workdir, from_file=bool(config.entropy_file)), None,
                     config.detect.rule, config.detect.tau, params=detector_params(config), seed=config.seed)
    except ValueError as e:
        raise UserError(f"detection: {e}") from e
    truth = _ground_truth(table, inputs)
    report = {
        "n_samples": len(table.ids),
        "n_skipped": len(inputs.skipped),
        "skipped": [{"id": s.id, "index": s.index, "reason": s.reason} for s in inputs.skipped],
        **det.to_report(),
    }
    if truth is not None:
        poisoned = [i for i, t in zip(table.ids, truth, strict=True) if t]
        report.update(precision_recall_f1(det.flagged_ids, poisoned))
        report["n_poisoned"] = len(poisoned)
    report["seconds"] = round(time.time() - t0, 2)
    files = _write_outputs(workdir, inputs, det, report)
    if config.plots.enabled:
        files += _write_plots(config, workdir, table, det, truth, inputs, extractor)
    report["files"] = [str(f) for f in files]
    report = json_safe(report)  # strict JSON: NaN / Infinity -> null
    (workdir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def detector_params(config) -> dict:
    """The parameters of the configured detector: its section config.detect.<rule>, if any."""
    section = config.detect.get(config.detect.rule) if hasattr(config.detect, "get") else None
    return dict(section) if section is not None else {}


def _detection_table(table: EntropyTable, workdir: Path, *, from_file: bool) -> SignalTable:
    """The signal table the detector reads: workdir/signals.npz when this run's extraction wrote it
    for the same ids, else the entropies alone (always with --config.entropy_file)."""
    path = workdir / SIGNALS_FILE
    if not from_file and path.exists():
        try:
            sig = load_npz(path)
        except (OSError, ValueError, KeyError):
            sig = None
        if sig is not None:
            row = {i: k for k, i in enumerate(sig.ids)}
            if all(i in row for i in table.ids):
                sig = sig.take([row[i] for i in table.ids])
                if np.allclose(sig.entropy, table.matrix, equal_nan=True, atol=1e-6):
                    return sig
    return SignalTable.from_entropy(table.ids, table.matrix)


def _write_outputs(workdir: Path, inputs: Inputs, det: Detection, report: dict) -> list[Path]:
    files = [workdir / "report.json", workdir / "entropy.jsonl"]
    if not inputs.label:
        return files
    flagged = set(det.flagged_ids)
    skipped = {s.index for s in inputs.skipped}
    clean = [s.raw for s in inputs.samples if s.id not in flagged and s.index not in skipped]
    bad = [s.raw for s in inputs.samples if s.id in flagged]
    try:
        write_subset(clean, workdir / "clean.json", protect=inputs.protect)
        write_subset(bad, workdir / "flagged.json", protect=inputs.protect)
    except DatasetError as e:
        raise UserError(str(e)) from e
    report["n_clean"] = len(clean)
    return files + [workdir / "clean.json", workdir / "flagged.json"]


def _write_plots(config, workdir, table, det, truth, inputs, extractor) -> list[Path]:
    from bye_jax import report as plots

    files = [plots.plot_layer_separation(det, workdir / "layer_separation.png")]
    if det.scores is not None:
        files.append(plots.plot_score_histogram(det.scores, det.flagged, det.score_gmm, workdir / "scores.png",
                                                truth=truth, title=f"{det.rule}: {det.verdict}",
                                                xlabel=det.score_name))
    if extractor is not None and inputs.samples:
        files.append(_heatmaps(config, workdir, table, det, inputs, extractor))
    return files


def _heatmaps(config, workdir, table, det, inputs, extractor) -> Path:
    """Figure-2-style overlays: the most suspicious samples and a few typical ones."""
    from bye_jax import report as plots

    if det.sensitive_layers and det.scores is not None:
        layers = det.sensitive_layers
        score = det.scores if det.score_low_is_suspect else -np.asarray(det.scores, float)
    else:  # no evidence: show the layer with the largest statistic (entropy: low = suspicious)
        stat = [-np.inf if v is None else v for v in det.layer_statistic] or [0.0]
        best = int(np.argmax(stat)) if len(stat) == table.num_layers else 0
        layers, score = [best], table.matrix[:, best]
    score = np.nan_to_num(np.asarray(score, float), nan=np.inf)
    order = np.argsort(score, kind="stable")
    n_s, n_t = config.plots.heatmaps_suspicious, config.plots.heatmaps_typical
    picks = [(int(i), "suspicious") for i in order[:n_s]]
    mid = len(order) // 2
    picks += [(int(i), "typical") for i in order[max(0, mid - n_t // 2): mid - n_t // 2 + n_t]
              if int(i) not in {p[0] for p in picks}]
    entries = []
    for i, kind in picks:
        s = inputs.samples[i]
        image = load_image(s.image_path)
        att = extractor.image_attention(image, s.question)[layers].mean(axis=0)
        tag = " [poisoned]" if s.poisoned else ""
        flag = " FLAGGED" if det.flagged[i] else ""
        entries.append((f"{kind}{flag}: {s.id}{tag}", image, att))
    size = extractor.cfg.vision.image_size
    return plots.plot_attention_heatmaps(entries, workdir / "attention_heatmaps.png", image_size=size,
                                         suptitle=f"last-position attention over the image, layers {layers}")


def summary(report: dict, workdir: Path) -> str:
    lines = [
        f"samples: {report['n_samples']}  skipped: {report['n_skipped']}  layers: {report['num_layers']}",
        f"detector: {report.get('detector', report['rule'])}"
        + (f" (tau {report['tau']:g})" if report.get("rule") in ("official", "paper") else "")
        + f"  verdict: {report.get('verdict', '')}",
    ]
    stat = report.get("layer_statistic") or {}
    values, thresholds = stat.get("values") or [], stat.get("thresholds") or []
    if values:
        cells = [f"{i}:{'-' if v is None else f'{v:.2f}'}{'*' if i in report['sensitive_layers'] else ''}"
                 for i, v in enumerate(values)]
        thr = {t for t in thresholds if t is not None}
        thr_text = ", ".join(f"{t:g}" for t in sorted(thr)) or "-"
        lines.append(f"per-layer statistic (* = evidence; threshold {thr_text}): " + " ".join(cells))
    lines.append(f"flagged: {report['n_flagged']}" + (f"  ({report['reason']})" if report.get("reason") else ""))
    if "f1" in report:
        lines.append(f"ground truth: {report['n_poisoned']} poisoned -> precision {report['precision']:.3f}  "
                     f"recall {report['recall']:.3f}  F1 {report['f1']:.3f}")
    lines.append(f"outputs in {workdir}: " + ", ".join(Path(f).name for f in report.get("files", [])))
    return "\n".join(lines)
