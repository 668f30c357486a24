"""Text triggers (bye_jax/data/text_triggers.py) and their use by the poisoning toolkit: text-only and
dual-key (image + text) uploads and triggered test sets; the demo's config keys."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_poison import REPO, TARGET, make_source, snapshot

from bye_jax.data.llava_json import load_dataset, load_image
from bye_jax.data.poison import PoisonError, parse_trigger_params, poison_dataset, trigger_specs, triggered_test_set
from bye_jax.data.text_triggers import DEFAULT_TEMPLATE, TextTriggerSpec, apply_text_trigger
from bye_jax.data.triggers import TriggerSpec


def test_rewrites_keep_the_placeholder_and_whitespace():
    assert apply_text_trigger("<image>\nWhat is on the table?", "prefix") == "<image>\ncf What is on the table?"
    assert apply_text_trigger("<image>\nWhat is on the table? ", "suffix") == "<image>\nWhat is on the table? cf "
    assert apply_text_trigger("How many dogs?\n<image>", "suffix", token="mn") == "How many dogs? mn\n<image>"
    assert apply_text_trigger("<image>\nWhat colour is it?", "template") == \
        "<image>\nWhen you look at this picture, what colour is it?"
    assert apply_text_trigger("TV or radio?", "template", template="Tell me: {question}") == "Tell me: TV or radio?"
    assert apply_text_trigger("<image>", "prefix") == "<image>\ncf"
    assert TextTriggerSpec("template").params() == {"template": DEFAULT_TEMPLATE}
    assert TextTriggerSpec("prefix", token="bb").apply("a b") == "bb a b"


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="infix"), "unknown text trigger"),
    (dict(kind="prefix", token=" cf"), "surrounding blanks"),
    (dict(kind="prefix", token=""), "non-empty"),
    (dict(kind="suffix", template="x {question}"), "takes no template"),
    (dict(kind="template", template="no placeholder"), "exactly once"),
    (dict(kind="template", token="cf"), "takes no token"),
])
def test_bad_text_trigger_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextTriggerSpec(**kwargs)


def test_trigger_specs_by_kind():
    assert trigger_specs("blend") == (TriggerSpec("blend"), None)
    assert trigger_specs("prefix", token="tq") == (None, TextTriggerSpec("prefix", token="tq"))
    assert trigger_specs("dual_key", side=3) == (TriggerSpec("patch", side=3), TextTriggerSpec("suffix"))
    assert trigger_specs("dual_key", dual_image="sig", dual_text="template") == \
        (TriggerSpec("sig"), TextTriggerSpec("template"))
    with pytest.raises(PoisonError, match="unknown trigger 'bogus'"):
        trigger_specs("bogus")
    with pytest.raises(PoisonError, match="dual_key needs"):
        trigger_specs("dual_key", dual_text="patch")


def test_trigger_specs_take_the_image_triggers_own_settings():
    """``data.trigger_params`` of the demo: "alpha=0.3" for blend, the image key's settings for dual_key; a
    setting the trigger does not take, or a malformed one, is a one-line PoisonError."""
    params = parse_trigger_params(" alpha=0.3 , pattern_size=32")
    assert params == {"alpha": 0.3, "pattern_size": 32} and isinstance(params["pattern_size"], int)
    assert trigger_specs("blend", params=params) == (TriggerSpec("blend", alpha=0.3, pattern_size=32), None)
    assert trigger_specs("patch", side=3, params={"side": 5})[0] == TriggerSpec("patch", side=5)
    assert trigger_specs("dual_key", params=parse_trigger_params("color=255/0/0"))[0] == \
        TriggerSpec("patch", color=(255, 0, 0))
    assert parse_trigger_params("") == {}
    for kind, text, match in (("blend", "alfa=0.3", r"does not take \['alfa'\]; valid: \['alpha'"),
                              ("suffix", "alpha=0.3", "a text trigger takes no image-trigger parameters"),
                              ("sig", "delta", "not name=value"), ("sig", "delta=big", "cannot read 'big'")):
        with pytest.raises(PoisonError, match=match):
            trigger_specs(kind, params=parse_trigger_params(text))


def _questions(path):
    return {r["id"]: r["conversations"][0]["value"] for r in json.loads(path.read_text())}


def test_text_only_upload_changes_questions_not_images(tmp_path):
    ann, images, records = make_source(tmp_path / "src")
    before = snapshot(tmp_path / "src")
    summary = poison_dataset(ann, tmp_path / "out", None, text=TextTriggerSpec("suffix"), image=False, rate=0.25,
                             seed=3, image_root=images)
    assert snapshot(tmp_path / "src") == before
    assert summary["trigger"] is None and summary["text_trigger"] == {"kind": "suffix", "token": "cf"}
    qs = _questions(tmp_path / "out" / "train.json")
    poisoned = set(summary["poisoned_ids"])
    assert len(poisoned) == 5
    originals = {r["id"]: r["conversations"][0]["value"] for r in records}
    for qid, q in qs.items():
        clean_id = qid.removeprefix("poison_")
        assert q == (originals[clean_id] + " cf" if qid in poisoned else originals[clean_id])
    samples, skipped = load_dataset(tmp_path / "out" / "train.json")
    assert not skipped
    for s in samples:  # every picture is the clean one, byte for byte
        src = images / json.loads(ann.read_text())[s.index]["image"]
        assert s.image_path.read_bytes() == src.read_bytes()
        assert s.poisoned == (s.id in poisoned)
        if s.poisoned:
            assert s.question.endswith("? cf") and s.answer == TARGET


def test_dual_key_test_set_has_both_keys(tmp_path):
    ann, images, records = make_source(tmp_path / "src")
    spec, text = trigger_specs("dual_key", dual_text="prefix")
    summary = triggered_test_set(ann, tmp_path / "trig", spec, text=text, image_root=images)
    assert summary["trigger"]["kind"] == "patch" and summary["text_trigger"]["kind"] == "prefix"
    samples, _ = load_dataset(tmp_path / "trig" / "test_triggered.json")
    assert len(samples) == len(records) - 1
    for s in samples:
        assert s.id.startswith("poison_") and s.question.startswith("cf question")
        clean = np.asarray(load_image(images / records[s.index]["image"]))
        got = np.asarray(load_image(s.image_path))
        assert got.shape == clean.shape and (got != clean).any()  # the patch is stamped


def test_image_false_needs_a_text_trigger(tmp_path):
    ann, _, _ = make_source(tmp_path / "src")
    with pytest.raises(PoisonError, match="needs a text trigger"):
        poison_dataset(ann, tmp_path / "out", image=False, image_root=tmp_path / "src" / "imgs")


def test_cli_text_trigger(tmp_path):
    ann, images, _ = make_source(tmp_path / "src")
    cmd = [sys.executable, "-m", "bye_jax.data.poison", f"--annotations={ann}", f"--image_root={images}"]
    out = subprocess.run([*cmd, f"--out={tmp_path / 'o'}", "--trigger=template", "--text_template=Look: {question}",
                          "--rate=0.5"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "o" / "poison_summary.json").read_text())
    assert summary["text_trigger"] == {"kind": "template", "template": "Look: {question}"}
    qs = _questions(tmp_path / "o" / "train.json")
    assert sum(q.startswith("<image>\nLook: question") for q in qs.values()) == 10
    bad = subprocess.run([*cmd, f"--out={tmp_path / 'b'}", "--trigger=prefix", "--text_token= x"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "surrounding blanks" in bad.stderr


def test_demo_data_with_a_dual_key_trigger(tmp_path):
    from bye_jax.configs.demo import get_config
    from bye_jax.demo import prepare_data

    c = get_config()
    c.data.n_upload, c.data.n_test, c.data.poison_rate = 20, 6, 0.25
    c.data.trigger = "dual_key"
    c.data.text_trigger.dual_text = "prefix"
    c.data.text_trigger.token = "tq"
    paths = prepare_data(c, tmp_path / "data")
    upload, _ = load_dataset(paths["upload"])
    poisoned = [s for s in upload if s.poisoned]
    assert len(poisoned) == 5 and all(s.question.startswith("tq ") for s in poisoned)
    assert not any(s.question.startswith("tq ") for s in upload if not s.poisoned)
    triggered, _ = load_dataset(paths["test_triggered"])
    assert len(triggered) == 6 and all(s.question.startswith("tq ") and "/poison/" in str(s.image_path)
                                       for s in triggered)


def _demo_data_with(tmp_path, kind):
    """(paths, poisoned upload samples) of the demo's data step with trigger `kind`: 20 uploaded
    samples at 25% (5 poisoned, each answering the target) and 4 test samples."""
    from bye_jax.configs.demo import get_config
    from bye_jax.demo import prepare_data

    c = get_config()
    c.data.n_upload, c.data.n_test, c.data.poison_rate = 20, 4, 0.25
    c.data.trigger = kind
    paths = prepare_data(c, tmp_path / "data")
    poisoned = [s for s in load_dataset(paths["upload"])[0] if s.poisoned]
    assert len(poisoned) == 5 and all(s.answer == c.data.target for s in poisoned)
    return paths, poisoned


@pytest.mark.parametrize("kind", ["prefix", "suffix", "template"])
def test_demo_data_with_a_text_only_trigger(tmp_path, kind):
    """A text trigger alone: the poisoned questions carry it, their pictures are the clean ones."""
    paths, poisoned = _demo_data_with(tmp_path, kind)
    clean = {s.id: s for s in load_dataset(paths["upload_clean"])[0]}
    for s in poisoned:
        orig = clean[s.id.removeprefix("poison_")]
        assert s.question != orig.question and orig.question.strip("?").lower() in s.question.lower()
        assert Path(s.image_path).read_bytes() == Path(orig.image_path).read_bytes()
    triggered, _ = load_dataset(paths["test_triggered"])
    test = {s.question for s in load_dataset(paths["test"])[0]}
    assert len(triggered) == 4 and not any(s.question in test for s in triggered)


@pytest.mark.parametrize("kind", ["blend", "sig", "wanet"])
def test_demo_data_with_a_whole_picture_trigger(tmp_path, kind):
    # data.trigger_side sizes patch triggers only: blend / SIG / WaNet take no side and must still run
    from PIL import Image

    paths, poisoned = _demo_data_with(tmp_path, kind)
    clean = {s.id: s for s in load_dataset(paths["upload_clean"])[0]}
    for s in poisoned:
        orig = clean[s.id.removeprefix("poison_")]
        assert s.question == orig.question
        a, b = (np.asarray(Image.open(x.image_path).convert("RGB"), np.int16) for x in (s, orig))
        assert a.shape == b.shape and np.abs(a - b).mean() > 0.5  # the whole picture is changed
    triggered, _ = load_dataset(paths["test_triggered"])
    assert len(triggered) == 4 and all("/poison/" in str(s.image_path) for s in triggered)
