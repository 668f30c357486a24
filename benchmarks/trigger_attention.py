r"""Where the answer position's attention goes relative to an image trigger, and what the trigger's tokens
look like at the model's input (a diagnosis for the detection suite's runs; labels used to measure only).

    python benchmarks/trigger_attention.py RUN_DIR [RUN_DIR ...] [--step=1200] [--cover=0.5] [--out=FILE.json]

RUN_DIR: a detect_suite run folder (``data/upload`` with the poisoned upload, ``data/upload_clean`` with
the same images before poisoning, ``stepXXXXX/merged`` the fine-tuned checkpoint). Per sample, from
transformers' eager attention on the merged checkpoint (float32, one prompt at a time): the image
attention p [L, T] (the BYE recipe: the last prompt position's row, image span, head mean, renormalised).
The trigger's footprint per image token = the share of the token's pixel cell (after the processor's
resize) where the poisoned image differs from its clean original; a token is "covered" when that share
is >= ``--cover``. Printed per layer, poisoned vs clean: the share of samples whose peak is on a covered
token (clean samples: the covered set of a random poisoned sample, i.e. chance), the attention mass on the
covered tokens against the same token set in clean images and against the same-shaped set shifted
elsewhere in the same image; and for the content question, the spread (median distance to the median,
over that of random tokens) of three per-token embeddings at the covered tokens: the projector output
(what enters the language model), the vision tower's patch embedding before the position embedding, and
the same after it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.models.inputs import PromptEncoder


def footprint(poisoned: Image.Image, clean: Image.Image, grid: int) -> np.ndarray:
    """[grid * grid] share of each token's cell where the images differ (cells on the resized square)."""
    a = np.asarray(poisoned.convert("RGB"), np.int16)
    b = np.asarray(clean.convert("RGB"), np.int16)
    diff = (np.abs(a - b).sum(-1) > 0).astype(np.float64)
    h, w = diff.shape
    ys = (np.arange(h) + 0.5) * grid / h
    xs = (np.arange(w) + 0.5) * grid / w
    cell = np.floor(ys).astype(int)[:, None] * grid + np.floor(xs).astype(int)[None, :]
    return np.bincount(cell.ravel(), weights=diff.ravel(), minlength=grid * grid) / np.bincount(
        cell.ravel(), minlength=grid * grid)


def run_one(run: Path, step: int, cover: float, seed: int = 0) -> dict:
    ckpt = run / f"step{step:05d}" / "merged"
    ann = run / "data" / "upload" / "train.json"
    samples, skipped = load_dataset(ann, ann.parent)
    assert not skipped
    records = {r["id"]: r for r in json.loads(ann.read_text())}
    enc = PromptEncoder(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    probs, proj_out, pre_pos, post_pos, foot, labels = [], [], [], [], [], []
    for s in samples:
        img = load_image(s.image_path)
        b = enc.encode([img], [s.question])
        with torch.no_grad():
            pv = torch.tensor(b.pixel_values, dtype=torch.float32)
            o = model(input_ids=torch.tensor(b.input_ids), attention_mask=torch.tensor(b.attention_mask),
                      pixel_values=pv, output_attentions=True, output_hidden_states=True)
            patches = vt.embeddings.patch_embedding(pv).flatten(2).transpose(1, 2)[0]  # [T, D] before position
            pos = vt.embeddings.position_embedding.weight[1:]
        im = b.input_ids[0] == enc.image_token_id
        rows = []
        for att in o.attentions:
            m = att[0, :, -1, :].numpy().astype(np.float64).mean(0)[im]
            rows.append(m / m.sum())
        probs.append(rows)
        proj_out.append(o.hidden_states[0][0].numpy()[im])
        pre_pos.append(patches.detach().numpy())
        post_pos.append((patches + pos).detach().numpy())
        poisoned = bool(records[s.id].get("poisoned"))
        labels.append(poisoned)
        if poisoned:
            clean_name = Path(records[s.id]["image"]).name.split(".")[0] + ".png"
            foot.append(footprint(img, Image.open(run / "data" / "upload_clean" / "images" / clean_name), grid))
        else:
            foot.append(np.zeros(grid * grid))
    p = np.asarray(probs)                      # [N, L, T]
    y = np.asarray(labels)
    foot = np.asarray(foot)                    # [N, T]
    covered = foot >= cover
    n, layers, t = p.shape
    rng = np.random.default_rng(seed)
    pois, clean = np.flatnonzero(y), np.flatnonzero(~y)
    out = {"run": run.name, "step": step, "n": n, "n_poisoned": int(y.sum()), "grid": grid, "cover": cover,
           "covered_tokens_mean": float(covered[pois].sum(1).mean()), "layers": []}
    peak = p.argmax(-1)                        # [N, L]
    # clean baseline: each clean sample gets the covered set of a random poisoned sample
    partner = rng.choice(pois, size=clean.size)
    for layer in range(layers):
        on_p = covered[pois, peak[pois, layer]]
        on_c = covered[partner, peak[clean, layer]]
        mass_p = (p[pois, layer] * covered[pois]).sum(1)
        mass_c = (p[clean, layer] * covered[partner]).sum(1)
        # the same-shaped token set shifted elsewhere in the same image (no overlap with the trigger)
        shifted = []
        for i in pois:
            r, c = np.divmod(np.flatnonzero(covered[i]), grid)
            vals = []
            for dr in range(-grid, grid):
                for dc in range(-grid, grid):
                    rr, cc = r + dr, c + dc
                    if (dr or dc) and rr.min() >= 0 and cc.min() >= 0 and rr.max() < grid and cc.max() < grid:
                        idx = rr * grid + cc
                        if not covered[i, idx].any():
                            vals.append(p[i, layer, idx].sum())
            shifted.append(np.mean(vals) if vals else np.nan)
        out["layers"].append({
            "layer": layer,
            "peak_on_trigger_poisoned": float(on_p.mean()),
            "peak_on_trigger_clean_chance": float(on_c.mean()),
            "mass_on_trigger_poisoned": float(np.median(mass_p)),
            "mass_same_tokens_clean": float(np.median(mass_c)),
            "mass_shifted_same_image": float(np.nanmedian(shifted)),
            "uniform": float(covered[pois].sum(1).mean() / t),
            "entropy_norm_poisoned": float(np.median(-(p[pois, layer] * np.log(p[pois, layer] + 1e-8)).sum(1))
                                           / np.log(t)),
            "entropy_norm_clean": float(np.median(-(p[clean, layer] * np.log(p[clean, layer] + 1e-8)).sum(1))
                                        / np.log(t)),
        })
    # content: per-token embeddings at the fully covered tokens, across poisoned images
    full = foot >= 0.999
    out["content"] = {}
    out["peak_content"] = {}
    layers_n = p.shape[1]
    for name, emb in (("projector_output", proj_out), ("patch_pre_position", pre_pos)):
        e = np.asarray(emb, np.float64)
        at = e[np.arange(n)[:, None], peak]     # [N, L, D]: the embedding at each layer's peak token
        rows = []
        for layer in range(layers_n):
            x = at[:, layer]
            med = np.median(x[pois], 0)
            d = np.linalg.norm(x - med, axis=1)
            spread_all = float(np.median(np.linalg.norm(x - np.median(x, 0), axis=1)))
            # AUROC of "close to the poisoned samples' median" (labels used only to measure)
            ranks = np.argsort(np.argsort(-d))
            auc = float((ranks[pois].sum() - len(pois) * (len(pois) - 1) / 2) / (len(pois) * len(clean)))
            dd = np.linalg.norm(x[:, None] - x[None], axis=-1)
            np.fill_diagonal(dd, np.inf)
            knn = np.argsort(dd, axis=1)[:, :5]
            purity = float(y[knn[pois]].mean())
            rows.append({"layer": layer, "spread_ratio": float(np.median(d[pois])) / spread_all, "auroc": auc,
                         "knn5_purity_poisoned": purity,
                         "clean_within_poisoned_q90": float((d[clean] <= np.quantile(d[pois], 0.9)).mean())})
        out["peak_content"][name] = rows
    for name, emb in (("projector_output", proj_out), ("patch_pre_position", pre_pos),
                      ("patch_post_position", post_pos)):
        e = np.asarray(emb, np.float64)        # [N, T, D]
        trig = e[full]                          # every fully covered token of every poisoned image
        rand = e.reshape(-1, e.shape[-1])[rng.choice(n * t, size=max(len(trig), 200), replace=False)]

        def spread(x):
            return float(np.median(np.linalg.norm(x - np.median(x, 0), axis=1)))

        # nearest-neighbour purity: share of trigger tokens whose nearest other token (among trigger tokens
        # and an equal number of random clean tokens) is a trigger token
        cl = e[clean].reshape(-1, e.shape[-1])[rng.choice(clean.size * t, size=len(trig), replace=False)]
        allx = np.concatenate([trig, cl])
        d = np.linalg.norm(allx[:, None] - allx[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        nn_trig = d[: len(trig)].argmin(1) < len(trig)
        out["content"][name] = {"full_tokens": int(len(trig)), "spread_ratio": spread(trig) / spread(rand),
                                "nn_purity": float(nn_trig.mean())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--step", type=int, default=1200)
    ap.add_argument("--cover", type=float, default=0.5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for run in args.runs:
        r = run_one(Path(run), args.step, args.cover)
        results.append(r)
        print(f"{r['run']} step {r['step']}: {r['n_poisoned']}/{r['n']} poisoned, "
              f"{r['covered_tokens_mean']:.2f} covered tokens per trigger (cover >= {r['cover']})")
        for e in r["layers"]:
            print(f"  layer {e['layer']}: peak on trigger {100 * e['peak_on_trigger_poisoned']:.1f}% poisoned vs "
                  f"{100 * e['peak_on_trigger_clean_chance']:.1f}% clean (same token sets); mass on trigger "
                  f"{e['mass_on_trigger_poisoned']:.3f} vs clean {e['mass_same_tokens_clean']:.3f}, shifted "
                  f"{e['mass_shifted_same_image']:.3f}, uniform {e['uniform']:.3f}; entropy_norm "
                  f"{e['entropy_norm_poisoned']:.2f} / {e['entropy_norm_clean']:.2f}")
        for name, c in r["content"].items():
            print(f"  content {name}: {c['full_tokens']} fully covered tokens, spread {c['spread_ratio']:.2f} x "
                  f"random tokens', nearest-neighbour purity {c['nn_purity']:.2f}")
        for name, rows in r["peak_content"].items():
            for e in rows:
                print(f"  at the peak, {name} layer {e['layer']}: "
                      f"poisoned spread {e['spread_ratio']:.2f} x all samples', "
                      f"AUROC {e['auroc']:.2f}, 5-NN purity {e['knn5_purity_poisoned']:.2f}, clean within the poisoned "
                      f"90% radius {100 * e['clean_within_poisoned_q90']:.1f}%")
        sys.stdout.flush()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
