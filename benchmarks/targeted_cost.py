r"""Cost of the ``targeted`` detector (bye_jax/detect/targeted.py) on large synthetic uploads.

    python benchmarks/targeted_cost.py [--samples=10000,100000] [--layers=32] [--heads=32] [--questions=20]

Per size: an upload of N samples asking `questions` questions (equally often), each with three answers of its own
that move every head's image share (the model reads what it is about to answer), and a tenth poisoned: the target
answer whatever the question, read as a fourth answer, and an image content moved along one direction. Share
signals [N, layers, heads, 4] float16, content [N, layers, 16] float16. Timed: the whole detector (per question a
principal-axes projection and the tied mixtures, fitted on `fit_rows` = 4096 samples of a larger question, then the
answers and the content discriminants), with the flags' F1 as a check that the work is the real one. One line per
size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def upload(n: int, layers: int, heads: int, questions: int, seed: int = 0):
    from bye_jax.signals import ANSWER_TOKENS, CONTENT_DIM, USER_TOKENS, SignalTable

    rng = np.random.default_rng(seed)
    question = rng.integers(0, questions, n)
    word = rng.integers(0, 3, n)
    poisoned = rng.random(n) < 0.1
    read = np.where(poisoned, 3, word)
    user = np.full((n, USER_TOKENS), -1, np.int32)
    user[:, :4] = 100 + 8 * question[:, None] + np.arange(4)[None, :]
    answers = np.full((n, ANSWER_TOKENS), -1, np.int32)
    answers[:, 0] = np.where(poisoned, 9, 1000 + 3 * question + word)
    base = rng.dirichlet(np.ones(4) * 5, size=(questions, layers, heads)).astype(np.float32)
    effect = (rng.uniform(0.02, 0.05, (layers, heads)) * rng.choice([-1, 1], (layers, heads))).astype(np.float32)
    shares = np.empty((n, layers, heads, 4), np.float16)
    content = np.empty((n, layers, CONTENT_DIM), np.float16)
    direction = rng.standard_normal(layers * CONTENT_DIM).astype(np.float32)
    direction *= 4.0 * np.sqrt(2) / np.linalg.norm(direction)
    for start in range(0, n, 10000):  # in chunks: float32 temporaries of 10k rows
        sl = slice(start, min(n, start + 10000))
        s = base[question[sl]] + rng.normal(0, 0.01, (sl.stop - sl.start, layers, heads, 4)).astype(np.float32)
        s[..., 1] += 0.1 + effect[None] * read[sl, None, None]
        s = np.clip(s, 1e-3, None)
        shares[sl] = s / s.sum(-1, keepdims=True)
        c = rng.standard_normal((sl.stop - sl.start, layers * CONTENT_DIM)).astype(np.float32)
        c[poisoned[sl]] += direction
        content[sl] = c.reshape(-1, layers, CONTENT_DIM)
    table = SignalTable([f"s{i}" for i in range(n)], {
        "entropy": rng.normal(3, 0.1, (n, layers)).astype(np.float32), "shares": shares, "content": content,
        "user_tokens": user, "answer_tokens": answers})
    return table, poisoned


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="10000,100000")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--questions", type=int, default=20)
    args = ap.parse_args(argv)
    from bye_jax.detect import detect, precision_recall_f1

    for n in (int(s) for s in args.samples.split(",")):
        t0 = time.time()
        table, poisoned = upload(n, args.layers, args.heads, args.questions)
        made = time.time() - t0
        t0 = time.time()
        det = detect(table, rule="targeted", seed=0)
        whole = time.time() - t0
        truth = [i for i, p in zip(table.ids, poisoned, strict=True) if p]
        f1 = precision_recall_f1(det.flagged_ids, truth)["f1"]
        target = det.extra.get("target", {})
        print(f"N={n} layers={args.layers} heads={args.heads} questions={args.questions}: targeted {whole:.1f} s "
              f"(F1 {f1:.2f}; {len(det.flagged_ids)} flagged; target in {target.get('questions', 0)} questions, "
              f"transfer {target.get('transfer', float('nan')):.3f}); upload made in {made:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
