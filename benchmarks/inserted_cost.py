r"""Cost of the ``inserted`` detector (bye_jax/detect/inserted.py) on large synthetic uploads.

    python benchmarks/inserted_cost.py [--samples=10000,100000] [--layers=32] [--heads=32] [--kinds=2000]

Per size: an upload of N samples whose questions are `kinds` kinds of 12-30 random tokens (vocabulary 32000)
and a tenth poisoned with a two-token prefix, share signals [N, layers, heads, 4] with one head moved by the
trigger; timed: the whole detector (its attention seeds are the ``shares`` detector's column selection, the
bulk of the time at these shapes; it fits its mixtures on `fit_rows` = 4096 rows of a larger upload), timed
inside the detector's own run, and the rest (the text side: token pairs, markers, twin search), with the flags'
F1 as a check that the work is the real one. Prints one line per size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def upload(n: int, layers: int, heads: int, kinds: int, seed: int = 0):
    from bye_jax.signals import USER_TOKENS, SignalTable

    rng = np.random.default_rng(seed)
    forms = [rng.integers(100, 32000, rng.integers(12, 31)) for _ in range(kinds)]
    kind = rng.integers(0, kinds, n)
    poisoned = rng.random(n) < 0.1
    tokens = np.full((n, USER_TOKENS), -1, np.int32)
    for i in range(n):
        q = forms[kind[i]]
        q = np.concatenate([[7, 8], q]) if poisoned[i] else q
        tokens[i, :len(q)] = q
    shares = rng.dirichlet(np.ones(4), size=(n, layers, heads)).astype(np.float32)
    shares[:, 1, 0] = [0.05, 0.9, 0.03, 0.02]
    shares[poisoned, 1, 0] = [0.05, 0.0, 0.93, 0.02]
    table = SignalTable([f"s{i}" for i in range(n)], {"entropy": rng.normal(3, 0.1, (n, layers)).astype(np.float32),
                                                      "shares": shares.astype(np.float16), "user_tokens": tokens})
    return table, poisoned


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="10000,100000")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kinds", type=int, default=2000)
    args = ap.parse_args(argv)
    import bye_jax.detect.inserted as inserted
    from bye_jax.detect import detect, precision_recall_f1

    seeds_time = []
    select = inserted.select_columns

    def timed_select(*a, **k):  # the share column selection inserted reuses, timed inside the detector's run
        t = time.time()
        out = select(*a, **k)
        seeds_time.append(time.time() - t)
        return out

    inserted.select_columns = timed_select
    for n in (int(s) for s in args.samples.split(",")):
        t0 = time.time()
        table, poisoned = upload(n, args.layers, args.heads, args.kinds)
        made = time.time() - t0
        t0 = time.time()
        det = detect(table, rule="inserted", seed=0)
        whole = time.time() - t0
        truth = [i for i, p in zip(table.ids, poisoned, strict=True) if p]
        f1 = precision_recall_f1(det.flagged_ids, truth)["f1"]
        info = det.extra["inserted"]
        print(f"N={n} layers={args.layers} heads={args.heads}: inserted {whole:.1f} s (F1 {f1:.2f}; "
              f"{len(det.flagged_ids)} flagged); share seeds {seeds_time[-1]:.1f} s ({info['seeds']}), text side "
              f"{whole - seeds_time[-1]:.1f} s ({len(info['tried'])} markers); upload made in {made:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
