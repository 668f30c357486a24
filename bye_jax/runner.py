"""Library side of the `extract` and `filter` commands: config in, files in the workdir out.

Every user-facing failure is a `UserError` carrying a one-line reason; `cli.run` prints it and
exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bye_jax import multihost
from bye_jax import workdir as workdirs
from bye_jax.configs.runtime import prompt_options
from bye_jax.data import sources
from bye_jax.data.llava_json import DatasetError, Sample, Skipped, load_image, write_subset
from bye_jax.detect import DETECTORS, Detection, detect, precision_recall_f1
from bye_jax.detect.inserted import name_tokens
from bye_jax.detect.targeted import name_answers
from bye_jax.errors import UserError
from bye_jax.extract import EntropyExtractor, EntropyTable, read_entropy_jsonl, write_entropy_jsonl
from bye_jax.signals import SignalTable

__all__ = ["UserError", "run_extract", "run_filter", "load_inputs", "load_section", "require_data", "summary"]

# Every file `extract` / `filter` may write in the workdir, claimed before anything is loaded.
EXTRACT_OUTPUTS = ("entropy.jsonl", "entropy.jsonl.tmp", "entropy.npy", "entropy_ids.json", "signals.npz",
                   "signals.npz.tmp.npz", "signals_parts", "extract_manifest.json", "extract_manifest.json.tmp")
FILTER_OUTPUTS = EXTRACT_OUTPUTS + ("report.json", "clean.json", "flagged.json", "layer_separation.png",
                                    "scores.png", "attention_heatmaps.png")


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
    if config.detect.rule not in DETECTORS:
        raise UserError(f"config.detect.rule must be one of {', '.join(sorted(DETECTORS))}, got {config.detect.rule!r}")
    tau = config.detect.tau
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise UserError(f"config.detect.tau must be a finite number >= 0, got {tau!r}")
    try:
        prompt_options(config)
    except ValueError as e:
        raise UserError(f"config.{e}") from e
    if need_model and not config.model:
        raise UserError("config.model is empty: give a Hugging Face LLaVA checkpoint directory "
                        "(--config.model=DIR)")
    if need_model:
        require_data(config.data)
        check_devices(config)


def check_devices(config) -> None:
    """UserError unless config.mesh and config.attn_impl can work here (before loading anything)."""
    from bye_jax.parallel import check_attn_impl, check_mesh

    try:
        check_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.get("tensor", 1))
        check_attn_impl(config.attn_impl, config.dtype)
    except ValueError as e:
        raise UserError(f"config.{e}") from e


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
    from bye_jax.models import family
    from bye_jax.models.config import ConfigError
    from bye_jax.models.hf_loader import CheckpointError
    from bye_jax.models.safetensors_io import SafetensorsError
    from bye_jax.parallel import maybe_initialize_distributed, placement

    maybe_initialize_distributed()
    try:
        place = placement(config.mesh.data, config.mesh.fsdp, config.batch_size, tensor=config.mesh.get("tensor", 1),
                          local=True)
    except ValueError as e:
        raise UserError(f"config.{e}") from e
    impl = None if config.attn_impl == "auto" else config.attn_impl
    try:
        model, _ = family.load_model(config.model, dtype=config.dtype, attn_impl=impl,
                                     sharding_for=place.params)
        encoder = family.load_encoder(config.model, **prompt_options(config))
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


def claim_workdir(config, workdir, outputs=FILTER_OUTPUTS) -> workdirs.Workdir:
    """Locks the workdir and checks that no output replaces a foreign file or an input (one line
    otherwise); the entropy file given as input is not an output. Reentrant within a process."""
    inputs = [v for v in (config.data.get("annotations"), config.data.get("keep_ids"), config.get("entropy_file"))
              if v]
    if config.get("entropy_file") and workdirs.same_file(config.entropy_file, Path(workdir) / "entropy.jsonl"):
        outputs = [n for n in outputs if not n.startswith("entropy.jsonl")]  # read, never rewritten
    return workdirs.claim(workdir, outputs, inputs=inputs)


def claim_everywhere(config, workdir, outputs=FILTER_OUTPUTS):
    """Process 0's claim of the workdir (`claim_workdir`; its failure is raised on every process), a
    stand-in that writes nothing on the other processes."""
    return multihost.claim_on_primary(lambda: claim_workdir(config, workdir, outputs), workdir)


def run_extract(config, workdir: Path, *, progress: bool = True):
    """Validates the data, loads the model and writes workdir/entropy.jsonl (resuming).

    Over several processes (bye_jax/multihost.py) each extracts its part of the samples and process 0
    alone claims and writes the workdir; the returned table is empty on the other processes."""
    _check_config(config, need_model=True)
    with claim_everywhere(config, workdir, EXTRACT_OUTPUTS) as wd:
        inputs = load_inputs(config)
        wd.protect(s.image_path for s in inputs.samples)
        extractor = load_extractor(config)
        try:
            with wd.writing(*[n for n in EXTRACT_OUTPUTS if not n.endswith(".tmp")]):
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
    rows = [row[s.id] for s in kept]
    signals = table.signals.take(rows) if table.signals is not None else None
    return EntropyTable([s.id for s in kept], table.matrix[rows], signals=signals)


def _ground_truth(table: EntropyTable, inputs: Inputs) -> np.ndarray | None:
    if inputs.samples:
        truth = np.array([bool(s.poisoned) for s in inputs.samples])
        has_field = any(isinstance(s.raw, dict) and "poisoned" in s.raw for s in inputs.samples)
        return truth if (has_field or truth.any()) else None
    truth = np.array(["poison" in i for i in table.ids])
    return truth if truth.any() else None


def run_filter(config, workdir: Path, *, progress: bool = True) -> dict:
    """The whole BYE filter; returns the report dict (also written to workdir/report.json); None on
    processes other than 0.

    Over several processes the extraction runs on all of them (each its part, process 0 writes); then
    process 0 alone reads the table, detects and writes the outputs while the others wait for it, so
    every process returns when the outputs exist and a failure there is raised on every process."""
    workdir, t0 = Path(workdir), time.time()
    _check_config(config, need_model=not config.entropy_file)
    with claim_everywhere(config, workdir) as wd:
        extracted = None if config.entropy_file else run_extract(config, workdir, progress=progress)
        return multihost.from_primary(lambda: _filter(config, wd, extracted, t0), share=False)


def _filter(config, wd: workdirs.Workdir, extracted, t0: float) -> dict:
    workdir, extractor = wd.root, None
    if config.entropy_file:
        inputs = load_inputs(config)
        wd.protect(s.image_path for s in inputs.samples)
        try:
            table = read_entropy_jsonl(config.entropy_file)
        except (OSError, ValueError) as e:
            raise UserError(f"entropy_file: {e}") from e
        if not table.ids:
            raise UserError(f"{config.entropy_file}: no entropy records")
        table = _align(table, inputs, Path(config.entropy_file).name)
        if "entropy.jsonl" in wd.outputs:
            write_entropy_jsonl(wd.path("entropy.jsonl"), table.ids, table.matrix)
            wd.record("entropy.jsonl")
    else:
        inputs, table, extractor = extracted
        table = _align(table, inputs, "extraction")
    detection_table = _detection_table(table)
    try:
        det = detect(detection_table, None,
                     config.detect.rule, config.detect.tau, params=detector_params(config), seed=config.seed)
    except ValueError as e:
        raise UserError(f"detection: {e}") from e
    truth = _ground_truth(table, inputs)
    report = {
        "n_samples": len(table.ids),
        "n_skipped": len(inputs.skipped),
        "skipped": [{"id": s.id, "index": s.index, "reason": _relative(s.reason, _roots(config, workdir))}
                    for s in inputs.skipped],
        **det.to_report(),
        "entropy": "normalised by ln(image tokens)" if detection_table.has("entropy_raw") else "raw",
    }
    if extractor is not None and "details" in report:  # inserted / targeted text evidence: its token ids as text too
        name_tokens(report["details"], extractor.encoder.decode)
        name_answers(report["details"], extractor.encoder.decode)
    if truth is not None:
        poisoned = [i for i, t in zip(table.ids, truth, strict=True) if t]
        report.update(precision_recall_f1(det.flagged_ids, poisoned))
        report["n_poisoned"] = len(poisoned)
    report["seconds"] = round(time.time() - t0, 2)
    if extractor is not None and extractor.timing:  # compilation (first batch of each shape) apart from throughput
        report["extract_timing"] = extractor.timing
    files = _write_outputs(wd, inputs, det, report)
    if config.plots.enabled:
        files += _write_plots(config, wd, table, det, truth, inputs, extractor)
    report["files"] = files  # names in the workdir
    wd.write_json("report.json", report, indent=2)
    return report


def _roots(config, workdir: Path) -> list[Path]:
    """Folders whose absolute paths are cut from report texts (samples are named relative to them)."""
    roots = [Path(workdir)]
    if config.data.get("image_root"):
        roots.append(Path(config.data.image_root))
    elif config.data.get("annotations"):
        roots.append(Path(config.data.annotations).parent)
    return roots


def _relative(text: str, roots: list[Path]) -> str:
    """`text` with absolute paths under `roots` made relative to them (no server paths in reports)."""
    for root in roots:
        for form in {str(root.absolute()), str(root.resolve())}:
            text = text.replace(form.rstrip(os.sep) + os.sep, "")
    return text


def detector_params(config) -> dict:
    """The parameters of the configured detector: its section config.detect.<rule>, if any; for ``combined``
    also every other detector's section, as ``member_params`` (a member reads its own section)."""
    def section(name):
        sec = config.detect.get(name) if hasattr(config.detect, "get") else None
        return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec) if sec is not None else None

    out = section(config.detect.rule) or {}
    if config.detect.rule == "combined":
        out["member_params"] = {name: sec for name in DETECTORS if name != "combined" and (sec := section(name))}
    return out


def _detection_table(table: EntropyTable) -> SignalTable:
    """The signal table the detector reads: the extraction's (same rows; see `normalised_when_n_varies`),
    else the entropies alone (always with --config.entropy_file)."""
    if table.signals is not None:
        return normalised_when_n_varies(table.signals)
    return SignalTable.from_entropy(table.ids, table.matrix)


def normalised_when_n_varies(signals: SignalTable) -> SignalTable:
    """When the number of image tokens N differs between samples (tiling, dynamic resolution), the raw
    entropy (at most ln N) would cluster samples by N: the detector then reads ``entropy_norm`` (entropy /
    ln N) as its ``entropy``, the raw one kept as ``entropy_raw``. Otherwise the table as it is."""
    n, norm = signals.get("num_image_tokens"), signals.get("entropy_norm")
    if n is None or norm is None or len(np.unique(n)) < 2:
        return signals
    return SignalTable(signals.ids, {**signals.arrays, "entropy": norm, "entropy_raw": signals.entropy})


def _write_outputs(wd: workdirs.Workdir, inputs: Inputs, det: Detection, report: dict) -> list[str]:
    files = ["report.json"] + (["entropy.jsonl"] if (wd.root / "entropy.jsonl").exists() else [])
    if not inputs.label:
        return files
    flagged = set(det.flagged_ids)
    skipped = {s.index for s in inputs.skipped}
    clean = [s.raw for s in inputs.samples if s.id not in flagged and s.index not in skipped]
    bad = [s.raw for s in inputs.samples if s.id in flagged]
    for name, records in (("clean.json", clean), ("flagged.json", bad)):
        try:
            write_subset(records, wd.path(name), protect=inputs.protect)
        except DatasetError as e:
            raise UserError(str(e)) from e
        finally:
            wd.record(name)
    report["n_clean"] = len(clean)
    return files + ["clean.json", "flagged.json"]


def _write_plots(config, wd: workdirs.Workdir, table, det, truth, inputs, extractor) -> list[str]:
    from bye_jax import report as plots

    files = ["layer_separation.png"]
    plots.plot_layer_separation(det, wd.path("layer_separation.png"))
    wd.record("layer_separation.png")
    if det.scores is not None:
        plots.plot_score_histogram(det.scores, det.flagged, det.score_gmm, wd.path("scores.png"),
                                   truth=truth, title=f"{det.rule}: {det.verdict}", xlabel=det.score_name)
        wd.record("scores.png")
        files.append("scores.png")
    square_grid = getattr(getattr(getattr(extractor, "cfg", None), "vision", None), "image_size", None)
    if extractor is not None and inputs.samples and square_grid is None:
        print("attention heat-maps: not drawn (this model family has no fixed square image grid)")
    elif extractor is not None and inputs.samples:
        _heatmaps(config, wd.path("attention_heatmaps.png"), table, det, inputs, extractor)
        wd.record("attention_heatmaps.png")
        files.append("attention_heatmaps.png")
    return files


def _heatmaps(config, out: Path, table, det, inputs, extractor) -> Path:
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
    return plots.plot_attention_heatmaps(entries, out, image_size=size,
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
