"""Extraction over several processes: who extracts what, and the per-batch exchange of results.

Process 0 owns the workdir (it alone reads and writes it) and decides which samples are pending;
each process extracts a contiguous, balanced part of the pending samples (in dataset order) on its
own devices. After every batch the processes exchange one `Round` (the rows they computed, the
samples they skipped, whether their part is done, whether a signal asked them to stop and whether
their batch failed) through
`bye_jax.multihost.allgather_bytes`, so process 0 writes every row as soon as it exists (resume
works with any process count) and every process stops at the same batch: after a signal, or with
the same one-line error when any process's batch failed.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bye_jax import multihost
from bye_jax.data.llava_json import Sample, Skipped
from bye_jax.data.tfds import shard_bounds

Row = tuple[str, str, dict]  # (id, input digest, {signal name: per-row array})


@dataclass
class Round:
    rows: list[Row] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    done: bool = False
    stop: int = 0  # the signal number that asked to stop, 0 if none
    error: str = ""  # why this process could not compute its batch (one line), "" if it could


def my_part(pending: Sequence[Sample]) -> list[Sample]:
    """This process's contiguous, balanced part of the pending samples (all of them on one process)."""
    start, end = shard_bounds(len(pending), multihost.process_index(), multihost.process_count())
    return list(pending[start:end])


def check_same_samples(samples: Sequence[Sample]) -> None:
    """ValueError (on every process) unless every process read the same sample ids and questions."""
    if multihost.process_count() == 1:
        return
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.id}\0{s.question}\0".encode("utf-8", "surrogatepass"))
    digests = multihost.allgather_json(h.hexdigest())
    if len(set(digests)) > 1:
        differ = [p for p, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"processes {differ} read another dataset than process 0 (different sample ids or "
                         "questions); every process must see the same data files")


def _pack(r: Round) -> bytes:
    meta = {"ids": [row[0] for row in r.rows], "digests": [row[1] for row in r.rows], "done": r.done,
            "stop": r.stop, "error": r.error, "skipped": [[s.id, s.index, s.reason] for s in r.skipped]}
    arrays = {f"a_{name}": np.stack([row[2][name] for row in r.rows]) for name in (r.rows[0][2] if r.rows else ())}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8), **arrays)
    return buf.getvalue()


def _unpack(data: bytes) -> Round:
    with np.load(io.BytesIO(data)) as z:
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        arrays = {k[2:]: z[k] for k in z.files if k.startswith("a_")}
    rows = [(qid, digest, {name: a[k] for name, a in arrays.items()})
            for k, (qid, digest) in enumerate(zip(meta["ids"], meta["digests"], strict=True))]
    return Round(rows, [Skipped(i, int(k), reason) for i, k, reason in meta["skipped"]], meta["done"], meta["stop"],
                 meta.get("error", ""))


def exchange(mine: Round) -> list[Round]:
    """Every process's round, in process order (just `mine` on one process)."""
    if multihost.process_count() == 1:
        return [mine]
    return [_unpack(b) for b in multihost.allgather_bytes(_pack(mine))]
