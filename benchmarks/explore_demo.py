r"""Search for a demo setting by the attack's success and the clean task only (never detection).

    python benchmarks/explore_demo.py --variant=lr1e3 --seeds=0,1,2 \
        --set finetune.lr=1e-3 --set finetune.warmup_ratio=0.1 [--entropies] [--note="..."]

Reuses the demo's own functions: the base of the variant's recipe is pre-trained once and cached in
ROOT/demo_bases/<recipe digest>; per seed, the demo's data (upload, poisoning, test sets), the vanilla
LoRA fine-tune and the CP / ASR of the base and of the vanilla model (CP also per question type).
`--entropies` also runs the BYE filter on the vanilla model (entropy matrices for detector work; its
detection numbers are not printed here). Each seed's workdir is ROOT/demo_<variant>_s<seed>; one row
per seed is appended to ROOT/demo_explore.md and a line per variant to ROOT/INDEX.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import time
from pathlib import Path

ROOT = Path("runs/explore_demo")  # --root changes it


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _apply(config, sets: dict) -> None:
    for key, value in sets.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise SystemExit(f"unknown config key {key}")
        node[leaf] = value


def epoch_losses(train_dir: Path, steps_per_epoch: int) -> list[float]:
    from bye_jax.train.curves import epoch_losses as means
    from bye_jax.train.curves import read_log

    return [round(x, 4) for x in means(read_log(train_dir / "train_log.jsonl"), steps_per_epoch)]


def _steps_per_epoch(n: int, train_config) -> int:
    return -(-n // (train_config.batch_size * train_config.grad_accum))


def evaluate(config, checkpoint: Path, test, triggered) -> dict:
    from bye_jax.data.synthetic import QUESTIONS
    from bye_jax.eval.main import evaluate as run_eval
    from bye_jax.models.family import load_model
    from bye_jax.models.inputs import PromptEncoder

    model, _ = load_model(checkpoint)
    r = run_eval(model, PromptEncoder(checkpoint), test, triggered, target=config.data.target,
                 cp_mode=config.eval.cp_mode, batch_size=config.eval.batch_size,
                 max_new_tokens=config.eval.max_new_tokens)
    kind = {q: k for k, q in QUESTIONS.items()}
    per_type: dict[str, list[bool]] = {}
    for row in r["predictions"]:
        if row["split"] == "test":
            per_type.setdefault(kind.get(row["question"], "?"), []).append(row["correct"])
    trig = [row["prediction"] for row in r["predictions"] if row["split"] == "triggered"]
    return {"cp": r["cp"], "asr": r["asr"],
            "cp_per_type": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(per_type.items())},
            "triggered_answers": sorted({a: trig.count(a) for a in set(trig)}.items(), key=lambda x: -x[1])[:4]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], help="dotted demo-config key=value (Python literal)")
    ap.add_argument("--entropies", action="store_true", help="also run the BYE filter on the vanilla model")
    ap.add_argument("--base-only", action="store_true", help="pre-train (cached) and evaluate the base only")
    ap.add_argument("--note", default="")
    ap.add_argument("--root", default=str(ROOT))
    args = ap.parse_args()

    from bye_jax.configs.demo import get_config
    from bye_jax.demo import base_recipe, build_base, prepare_data
    from bye_jax.pipeline import load_samples
    from bye_jax.train.main import finetune

    root = Path(args.root)
    sets = _parse_set(args.set)
    config = get_config()
    _apply(config, sets)
    recipe = base_recipe(config)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    t0 = time.time()
    base = build_base(config, root / "demo_bases" / digest / "base", root / "demo_bases" / digest / "data")
    base_minutes = (time.time() - t0) / 60
    pre_dir = base.with_name("base_pretrain")
    pre_losses = (epoch_losses(pre_dir, _steps_per_epoch(config.data.n_pretrain, config.pretrain))
                  if (pre_dir / "train_log.jsonl").exists() else [])
    if args.base_only:
        config.seed = int(args.seeds.split(",")[0])
        paths = prepare_data(config, root / "demo_bases" / digest / f"run_data_s{config.seed}")
        res = evaluate(config, base, load_samples(paths["test"]), load_samples(paths["test_triggered"]))
        print(f"| base {args.variant} | {digest} | CP {res['cp']:.1f} | {res['cp_per_type']} | pre-train losses "
              f"{pre_losses} | {base_minutes:.1f} min |", flush=True)
        with open(root / "demo_explore.md", "a") as f:
            f.write(f"| base {args.variant} ({sets}) | {digest} | CP {res['cp']:.1f} | {res['cp_per_type']} | "
                    f"{pre_losses} | {base_minutes:.1f} min |\n")
        return
    with open(root / "INDEX.md", "a") as f:
        f.write(f"- demo_{args.variant}_s{{{args.seeds}}}: {args.note or sets} (base {digest}; "
                f"benchmarks/explore_demo.py; vanilla fine-tune only"
                f"{' + BYE filter entropies in filter/' if args.entropies else ''})\n")
    for seed in (int(s) for s in args.seeds.split(",")):
        config.seed = seed
        wd = root / f"demo_{args.variant}_s{seed}"
        t1 = time.time()
        paths = prepare_data(config, wd / "data")
        upload = load_samples(paths["upload"])
        test, triggered = load_samples(paths["test"]), load_samples(paths["test_triggered"])
        vanilla = wd / "vanilla" / "merged"
        if not (vanilla / "model.safetensors").exists():
            finetune(base, upload, wd / "vanilla", config.finetune, progress=False)
        ft_minutes = (time.time() - t1) / 60
        res_base = evaluate(config, base, test, triggered)
        res_van = evaluate(config, vanilla, test, triggered)
        spe = _steps_per_epoch(len(upload), config.finetune)
        row = {"variant": args.variant, "seed": seed, "sets": sets, "note": args.note, "base_digest": digest,
               "base": res_base, "vanilla": res_van, "finetune_epoch_losses": epoch_losses(wd / "vanilla", spe),
               "pretrain_epoch_losses": pre_losses, "base_minutes": round(base_minutes, 2),
               "data_and_finetune_minutes": round(ft_minutes, 2), "minutes": round((time.time() - t1) / 60, 2)}
        if args.entropies and not (wd / "filter" / "report.json").exists():
            from bye_jax.runner import run_filter

            with config.unlocked():
                config.model = str(vanilla)
                config.data.annotations = str(paths["upload"])
                config.data.image_root = str(paths["upload"].parent)
            run_filter(config, wd / "filter")
        (wd / "explore.json").write_text(json.dumps(row, indent=1))
        line = (f"| {args.variant} | {seed} | {res_base['cp']:.1f} | {res_van['cp']:.1f} | {res_van['asr']:.1f} | "
                f"{row['minutes']:.1f} | {res_van['cp_per_type']} | {row['finetune_epoch_losses'][-1]} |")
        print(line, flush=True)
        print(f"  ft losses {row['finetune_epoch_losses']}\n  triggered answers {res_van['triggered_answers']}",
              flush=True)
        with open(root / "demo_explore.md", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
