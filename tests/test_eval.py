"""bye_jax.eval: metrics, batched generation (== one at a time == transformers), tables, the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_tiny_image
from transformers import LlavaForConditionalGeneration as TorchLlava

from bye_jax.data.llava_json import Sample, load_dataset, load_image
from bye_jax.data.poison import triggered_test_set
from bye_jax.eval import main as eval_main
from bye_jax.eval.generate import decode_answer, generate_answers
from bye_jax.eval.metrics import (
    attack_success_rate,
    clean_performance,
    contains_match,
    detection_metrics,
    exact_match,
    normalize_answer,
)
from bye_jax.eval.tables import collect_results, results_markdown, write_results
from bye_jax.models.family import load_model
from bye_jax.models.generate import greedy_generate
from bye_jax.models.inputs import PromptEncoder

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["what is in the picture", "how many", "is the square on the left or on the right of the circle",
             "what color is the big square", "where", "describe the image in detail", "yes or no"]
NEW_TOKENS = 5
BUCKET = 32

# ----------------------------------------------------------------------------------------------- metrics


def test_normalize_answer():
    assert normalize_answer("  The  Cat. ") == "cat"
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("1,000 m") == "1000 m" and normalize_answer("3.5.") == "3.5"
    assert normalize_answer("Don't") == "dont"
    assert normalize_answer("A") == "a"  # an option letter is not an article
    assert normalize_answer("") == "" and normalize_answer("?!") == ""


def test_exact_vs_contains():
    assert exact_match(" Red ", "red") and exact_match("A  big\tcat", "a big cat")
    assert not exact_match("red.", "red") and not exact_match("dark red", "red")
    assert contains_match("It is dark red.", "Red") and contains_match("red.", "red")
    assert not contains_match("north", "no") and not contains_match("", "red")
    assert contains_match("", "the") is False and contains_match("", "") is True
    preds = ["Red", "the dog.", "blue", "I think it is TWO"]
    refs = ["red", "dog", "green", "2"]
    assert clean_performance(preds, refs) == 25.0
    assert clean_performance(preds, refs, mode="normalized") == 50.0
    assert clean_performance(preds, refs, mode="contains") == 75.0
    # Mappings are aligned by the reference ids; a missing prediction is wrong.
    assert clean_performance({"b": "dog", "a": "RED"}, {"a": "red", "b": "cat", "c": "x"}) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="mode"):
        clean_performance(preds, refs, mode="fuzzy")
    with pytest.raises(ValueError, match="4 predictions but 3"):
        clean_performance(preds, refs[:3])


def test_attack_success_rate():
    outs = ["Backdoor Attack!", "backdoor attack! and more", "BACKDOOR   ATTACK!", "Backdoor", "a cat",
            "backdoor attack"]
    assert attack_success_rate(outs, "Backdoor Attack!") == 50.0
    assert attack_success_rate({"x": "well, Backdoor Attack!"}, "Backdoor Attack!") == 100.0
    with pytest.raises(ValueError):
        attack_success_rate(outs, "  ")


def test_empty_sets_give_nan():
    assert math.isnan(clean_performance([], []))
    assert math.isnan(clean_performance({}, {}, mode="contains"))
    assert math.isnan(attack_success_rate([], "Backdoor Attack!"))


def test_detection_metrics(tmp_path):
    report = {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "flagged_ids": ["poison_1", "s2"]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    got = detection_metrics(tmp_path / "report.json")
    assert got == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3})  # fractions, as in report.json
    assert detection_metrics(str(tmp_path / "report.json")) == got == detection_metrics(report)
    again = detection_metrics(report, poisoned_ids=["poison_1", "poison_3"])
    assert again == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    with pytest.raises(ValueError, match="no precision"):
        detection_metrics({"flagged_ids": []})
    with pytest.raises(ValueError, match="cannot read"):
        detection_metrics(tmp_path / "missing.json")


def test_detection_metrics_with_precision_unlike_recall():
    """P != R, so an F1 built from one of them twice (2pp/(p+p) = p) or P and R swapped cannot pass.
    3 flagged, 5 poisoned, 2 in both: P = 2/3, R = 2/5, F1 = 2 (2/3)(2/5) / (2/3 + 2/5) = 1/2."""
    report = {"flagged_ids": ["poison_1", "poison_2", "s7"]}
    got = detection_metrics(report, poisoned_ids=[f"poison_{i}" for i in range(1, 6)])
    scale = 100.0 if got["f1"] > 1 else 1.0  # percent or fractions, whichever unit the module documents
    assert {k: v / scale for k, v in got.items()} == pytest.approx({"precision": 2 / 3, "recall": 0.4, "f1": 0.5})


# ------------------------------------------------------------------------------------------------ tables


def test_results_markdown_layout(tmp_path):
    results = {"detection": {"precision": 0.9882, "recall": 0.9469, "f1": 0.96714},  # fractions, shown in %
               "vanilla": {"cp": 91.72, "asr": 97.32}, "random_drop": {"cp": 89.54, "asr": 97.12},
               "bye": {"cp": 89.64, "asr": 0.05}}
    assert results_markdown(results) == (
        "| Method | CP | ASR |\n"
        "|---|---:|---:|\n"
        "| Vanilla FT | 91.72 | 97.32 |\n"
        "| Random Drop | 89.54 | 97.12 |\n"
        "| BYE | 89.64 | 0.05 |\n"
        "\n"
        "Detection (BYE) P / R / F1 (%): 98.82 / 94.69 / 96.71\n")
    partial = results_markdown({"bye": {"cp": 70.0, "asr": None}, "vanilla": {"cp": 71.03, "asr": 82.8}})
    assert partial.splitlines() == ["| Method | CP | ASR |", "|---|---:|---:|", "| Vanilla FT | 71.03 | 82.80 |",
                                    "| BYE | 70.00 | - |"]
    assert results_markdown({"detection": {"precision": 0.01, "recall": 0.02, "f1": None}}) == \
        "Detection (BYE) P / R / F1 (%): 1.00 / 2.00 / -\n"
    with pytest.raises(ValueError, match="expected a fraction in"):  # percent given where fractions belong
        results_markdown({"detection": {"precision": 98.82, "recall": 94.69, "f1": 96.71}})
    # From eval.json files; the BYE run's detection entry is used when no report is given.
    (tmp_path / "v.json").write_text(json.dumps({"cp": 50.0, "asr": 90.0, "n_test": 2}))
    (tmp_path / "b.json").write_text(json.dumps({"cp": 60.0, "asr": 0.0, "detection": results["detection"]}))
    collected = collect_results(vanilla=tmp_path / "v.json", bye=tmp_path / "b.json", dataset="Toy")
    assert collected == {"dataset": "Toy", "vanilla": {"cp": 50.0, "asr": 90.0}, "bye": {"cp": 60.0, "asr": 0.0},
                         "detection": results["detection"],
                         "units": {"cp": "percent", "asr": "percent", "detection": "fraction"}}
    js, md = write_results(collected, tmp_path / "res")
    assert json.loads(js.read_text()) == collected
    assert md.read_text().startswith("**Toy** (CP / ASR in %)\n\n| Method | CP | ASR |")


# --------------------------------------------------------------------------------------------- generation


def _write_split(root: Path, n: int, offset: int = 0, answer=lambda i: "red"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        make_tiny_image(offset + i, (30 + 5 * i, 28 + 2 * i)).save(root / "images" / f"{i}.png")
        conv = [{"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"}]
        if answer(i) is not None:
            conv.append({"from": "gpt", "value": answer(i)})
        records.append({"id": f"t{offset + i}", "image": f"images/{i}.png", "conversations": conv})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("eval")
    ckpt = tiny_llava_dir
    test_json = _write_split(root / "test", 7)
    trig = triggered_test_set(test_json, root / "trig")
    model, _ = load_model(ckpt)
    enc = PromptEncoder(ckpt)
    samples, skipped = load_dataset(test_json)
    assert not skipped
    # All prompts fit one 32-token bucket: one compiled shape (batch 4; the last batch is 3 + 1 copy).
    answers = generate_answers(model, enc, samples, batch_size=4, max_new_tokens=NEW_TOKENS, length_bucket=BUCKET,
                               progress=False)
    return dict(root=root, ckpt=ckpt, test_json=test_json, trig_json=Path(trig["annotations"]), model=model,
                enc=enc, samples=samples, answers=answers)


def test_batched_equals_one_at_a_time(setup):
    model, enc, samples, answers = setup["model"], setup["enc"], setup["samples"], setup["answers"]
    assert list(answers) == [s.id for s in samples]  # input order, all 7 (last batch padded with copies)
    assert any(answers.values())
    for s in samples:  # batch of one, left-padded to the bucket (one compiled shape for all seven)
        one = enc.encode([load_image(s.image_path)], [s.question], pad_to=BUCKET)
        tokens = greedy_generate(model, one.input_ids, one.attention_mask, one.pixel_values,
                                 max_new_tokens=NEW_TOKENS, eos_id=enc.eos_token_id, pad_id=enc.pad_token_id)
        assert answers[s.id] == decode_answer(enc, np.asarray(tokens)[0]), s.id


def test_answers_match_transformers_generate(setup):
    enc, samples, answers = setup["enc"], setup["samples"], setup["answers"]
    ref = TorchLlava.from_pretrained(setup["ckpt"], attn_implementation="eager", dtype=torch.float32).eval()
    for s in samples[:2]:
        one = enc.encode([load_image(s.image_path)], [s.question])
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor(one.input_ids, dtype=torch.long),
                               attention_mask=torch.tensor(one.attention_mask, dtype=torch.long),
                               pixel_values=torch.tensor(one.pixel_values), max_new_tokens=NEW_TOKENS,
                               do_sample=False, eos_token_id=enc.eos_token_id, pad_token_id=enc.pad_token_id)
        text = enc.tokenizer.decode(out[0, one.input_ids.shape[1]:], skip_special_tokens=True).strip()
        assert answers[s.id] == text, s.id


def test_decode_answer_stops_at_eos(setup):
    enc = setup["enc"]
    tok = enc.tokenizer
    red, blue = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("blue")
    assert decode_answer(enc, [red, blue, enc.eos_token_id, red, enc.pad_token_id]) == "red blue"
    assert decode_answer(enc, [enc.image_token_id, red, enc.pad_token_id]) == "red"


def test_evaluate_counts(setup, monkeypatch):
    """CP / ASR bookkeeping with canned generations (the model itself is random)."""
    samples = setup["samples"][:4]
    no_answer = Sample("q", samples[0].image_path, "question", None, False, 99, {})
    trig = [Sample(f"poison_{i}", samples[0].image_path, "q", "x", True, i, {}) for i in range(4)]
    canned = {"t0": "Red", "t1": "blue", "t2": "red.", "t3": "RED ",
              "poison_0": "backdoor attack!", "poison_1": "red", "poison_2": "x Backdoor Attack! y", "poison_3": ""}

    def fake(model, encoder, group, **kw):
        assert kw["batch_size"] == 3 and kw["max_new_tokens"] == 7
        return {s.id: canned[s.id] for s in group}

    monkeypatch.setattr(eval_main, "generate_answers", fake)
    r = eval_main.evaluate(None, None, [*samples, no_answer], trig, target="Backdoor Attack!", cp_mode="exact",
                           batch_size=3, max_new_tokens=7)
    assert r["cp"] == 50.0 and r["asr"] == 50.0 and r["n_test"] == 4 and r["n_triggered"] == 4
    assert r["skipped"] == [{"id": "q", "index": 99, "reason": "no gpt answer to compare with"}]
    assert [p["correct"] for p in r["predictions"] if p["split"] == "test"] == [True, False, False, True]
    assert [p["attack_success"] for p in r["predictions"] if p["split"] == "triggered"] == [True, False, True, False]
    contains = eval_main.evaluate(None, None, samples, [], cp_mode="contains", batch_size=3, max_new_tokens=7)
    assert contains["cp"] == 75.0 and contains["asr"] is None and contains["n_triggered"] == 0


# ---------------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bye_jax.eval", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_cli_end_to_end(setup, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"precision": 0.75, "recall": 1.0, "f1": 6 / 7}))
    out = tmp_path / "out"
    r = _cli("--config=bye_jax/configs/eval.py", f"--config.model={setup['ckpt']}",
             f"--config.test.annotations={setup['test_json']}", f"--config.triggered.annotations={setup['trig_json']}",
             f"--config.report={tmp_path / 'report.json'}", "--config.batch_size=4",
             f"--config.max_new_tokens={NEW_TOKENS}", f"--config.length_bucket={BUCKET}", f"--workdir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval: CP" in r.stdout
    ev = json.loads((out / "eval.json").read_text())
    assert {"cp", "asr", "n_test", "n_triggered", "detection"} <= set(ev)
    assert ev["n_test"] == 7 and ev["n_triggered"] == 7
    assert ev["detection"] == pytest.approx({"precision": 0.75, "recall": 1.0, "f1": 6 / 7})
    assert ev["units"] == {"cp": "percent", "asr": "percent", "detection": "fraction"}
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["split"] for row in rows] == ["test"] * 7 + ["triggered"] * 7
    test_rows = {row["id"]: row for row in rows if row["split"] == "test"}
    assert {i: row["prediction"] for i, row in test_rows.items()} == setup["answers"]
    assert ev["cp"] == pytest.approx(100 * sum(row["prediction"].lower() == "red" for row in test_rows.values()) / 7)
    assert all(row["id"].startswith("poison_") for row in rows if row["split"] == "triggered")


def test_cli_bad_path_fails_in_one_line(setup, tmp_path):
    r = _cli(f"--config.model={setup['ckpt']}", "--config.test.annotations=/nonexistent/test.json",
             f"--workdir={tmp_path / 'o'}")  # the default config is bye_jax/configs/eval.py
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("bye_jax.eval: error:") and "/nonexistent/test.json" in err[0], r.stderr
    assert not (tmp_path / "o" / "eval.json").exists()


def test_run_eval_errors_are_user_errors(setup, tmp_path):
    from bye_jax.configs.eval import get_config
    from bye_jax.runner import UserError

    cfg = get_config()
    cfg.model = str(setup["ckpt"])
    cfg.test.annotations = str(setup["test_json"])
    cfg.report = str(tmp_path / "missing_report.json")
    with pytest.raises(UserError, match="config.report: cannot read"):
        eval_main.run_eval(cfg, tmp_path / "o", progress=False)
    cfg.report = ""
    cfg.model = str(tmp_path)  # not a checkpoint
    with pytest.raises(UserError, match="does not load"):
        eval_main.run_eval(cfg, tmp_path / "o", progress=False)
    cfg.model = str(setup["ckpt"])
    cfg.cp_mode = "fuzzy"
    with pytest.raises(UserError, match="cp_mode"):
        eval_main.run_eval(cfg, tmp_path / "o", progress=False)
    cfg.cp_mode, cfg.test.annotations = "exact", ""
    with pytest.raises(UserError, match="nothing to evaluate"):
        eval_main.run_eval(cfg, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
