"""benchmarks/detect_suite.py (grid, checkpoints, recipe digest / resume, table files) and the --suite
mode of benchmarks/detect_quality.py on small synthetic suite tables."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bye_jax.signals import CONTENT_DIM, SIGNALS_VERSION, SignalTable


def _load(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


suite = _load("detect_suite")
quality = _load("detect_quality")


def test_grid_one_clean_run_per_seed_and_names():
    jobs = suite.expand_grid([0, 1], [0.03, 0.0], ["patch", "texture"])
    assert [j.name for j in jobs] == ["clean_s0", "patch_p3_s0", "texture_p3_s0",
                                      "clean_s1", "patch_p3_s1", "texture_p3_s1"]
    assert jobs[0].trigger == "patch" and jobs[0].rate == 0.0
    with pytest.raises(ValueError, match="unknown trigger 'stripes'"):
        suite.expand_grid([0], [0.1], ["stripes"])
    with pytest.raises(ValueError, match="not in"):
        suite.expand_grid([0], [1.0], ["patch"])


def test_grid_and_config_take_non_patch_text_and_dual_key_triggers():
    jobs = suite.expand_grid([0], [0.1], ["blend", "sig", "wanet", "suffix", "prefix", "template", "dual_key"])
    assert [j.name for j in jobs] == ["blend_p10_s0", "sig_p10_s0", "wanet_p10_s0", "suffix_p10_s0",
                                      "prefix_p10_s0", "template_p10_s0", "dual_key_p10_s0"]
    cfg = suite.run_config({"data.text_trigger.token": "tq"}, suite.Job(0, 0.1, "suffix"))
    assert cfg.data.trigger == "suffix" and cfg.data.text_trigger.token == "tq"
    assert suite._text_trigger_meta(cfg)["token"] == "tq"
    assert suite._text_trigger_meta(suite.run_config({}, suite.Job(0, 0.1, "blend"))) is None
    # the text trigger's token is part of the table's recipe
    a, b = (suite.recipe(suite.run_config(sets, suite.Job(0, 0.1, "suffix")), 100)
            for sets in ({}, {"data.text_trigger.token": "tq"}))
    assert suite.digest(a) != suite.digest(b)


def test_trigger_settings_name_the_run_and_enter_its_recipe():
    """``--set data.trigger_params=alpha=0.3``: its own run name (beside the default blend's tables) and recipe;
    without it the recipe holds no such key, so the tables made before the key keep their digests."""
    assert suite.variant_name(" alpha=0.3, delta=40 ") == "alpha0.3_delta40" and suite.variant_name("") == ""
    jobs = suite.expand_grid([0], [0, 0.1], ["blend"], "alpha0.3")
    assert [j.name for j in jobs] == ["clean_s0", "blend_alpha0.3_p10_s0"]
    plain = suite.recipe(suite.run_config({}, suite.Job(0, 0.1, "blend")), 100)
    strong = suite.recipe(suite.run_config({"data.trigger_params": "alpha=0.3"}, jobs[1]), 100)
    assert "trigger_params" not in plain["data"] and strong["data"]["trigger_params"] == "alpha=0.3"
    assert suite.digest(plain) != suite.digest(strong)


def test_a_tag_names_runs_whose_fine_tune_differs():
    """``--tag=fullft``: the runs' tables sit beside the default fine-tune's tables under their own names."""
    jobs = suite.expand_grid([1], [0, 0.1], ["sig"], "delta60", "fullft")
    assert [j.name for j in jobs] == ["fullft_clean_s1", "fullft_sig_delta60_p10_s1"]
    assert suite.Job(1, 0.1, "sig", "delta60").name == "sig_delta60_p10_s1"


def test_parse_list():
    assert suite.parse_list("0, 0.01,0.2", float, "rates") == [0.0, 0.01, 0.2]
    with pytest.raises(ValueError, match="--seeds: cannot read"):
        suite.parse_list("0,a", int, "seeds")
    with pytest.raises(ValueError, match="repeats"):
        suite.parse_list("1,1", int, "seeds")
    with pytest.raises(ValueError, match="empty"):
        suite.parse_list(" , ", int, "seeds")


def test_checkpoint_steps_at_epoch_ends():
    # 24 epochs of 50 steps: 0.1 -> epoch 2, 0.33 -> 8, 0.67 -> 16, 1 -> 24; 0 = the base
    assert suite.checkpoint_steps([0.1, 0.33, 0.67, 1, 0], 50, 24) == [0, 100, 400, 800, 1200]
    # 2 epochs of 4 steps: 0.1 -> at least the first epoch, 0.5 -> epoch 1 (the same step), 1 -> 8
    assert suite.checkpoint_steps([0.1, 0.5, 1], 4, 2) == [4, 8]
    with pytest.raises(ValueError, match="not in"):
        suite.checkpoint_steps([1.5], 4, 2)


def test_recipe_digest_follows_what_a_table_depends_on():
    job = suite.Job(0, 0.1, "patch")
    d = suite.digest(suite.recipe(suite.run_config({}, job), 100))
    assert d == suite.digest(suite.recipe(suite.run_config({}, job), 100))
    variants = [({}, job, 200), ({}, suite.Job(1, 0.1, "patch"), 100), ({}, suite.Job(0, 0.03, "patch"), 100),
                ({}, suite.Job(0, 0.1, "texture"), 100), ({"finetune.lr": 1e-3}, job, 100),
                ({"arch.text_layers": 2}, job, 100)]
    others = [suite.recipe(suite.run_config(sets, j), step) for sets, j, step in variants]
    assert len({d, *map(suite.digest, others)}) == 1 + len(others)
    cfg = suite.run_config({"finetune.epochs": 3, "data.trigger_side": 16}, job)
    assert (cfg.finetune.epochs, cfg.data.trigger_side, cfg.finetune.seed, cfg.data.poison_rate) == (3, 16, 0, 0.1)


def _signals(n, layers=4, seed=0, low=()):
    rng = np.random.default_rng(seed)
    entropy = rng.uniform(2.5, 4.0, (n, layers)).astype(np.float32)
    entropy[list(low)] = rng.uniform(0.01, 0.3, (len(low), layers))
    return SignalTable([f"poison_{i}" if i in set(low) else f"s{i}" for i in range(n)], {
        "entropy": entropy, "entropy_norm": (entropy / np.log(81)).astype(np.float32),
        "peak": rng.integers(0, 81, (n, layers)).astype(np.int32),
        "peak_mass": rng.uniform(0, 1, (n, layers)).astype(np.float32),
        "topk_mass": rng.uniform(0, 1, (n, layers)).astype(np.float32),
        "centroid": rng.uniform(0, 1, (n, layers, 2)).astype(np.float32),
        "content": rng.standard_normal((n, layers, CONTENT_DIM)).astype(np.float16),
        "image_mass": rng.uniform(0, 1, (n, layers)).astype(np.float32),
        "text_peak": rng.integers(0, 401, (n, layers)).astype(np.int32),
        "text_peak_mass": rng.uniform(0, 1, (n, layers)).astype(np.float32),
        "num_image_tokens": np.full(n, 81, np.int32)})


def test_table_round_trip_labels_meta_dtypes_and_size(tmp_path):
    table = _signals(800, seed=3, low=range(80))
    truth = np.zeros(800, bool)
    truth[:80] = True
    truth[5] = False  # the labels are stored, not re-derived from the ids
    meta = {"seed": 2, "rate": 0.1, "trigger": "patch", "checkpoint_step": 400, "asr": 97.5, "cp": 81.0,
            "overrides": {"finetune.lr": 0.003}, "recipe_digest": "abc"}
    path = tmp_path / "t.npz"
    suite.save_table(path, table, truth, meta)
    back, labels, meta_back = suite.load_table(path)
    assert back.ids == table.ids and meta_back == meta
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_array_equal(back.entropy, table.entropy)
    np.testing.assert_array_equal(back.get("entropy_norm"), table.get("entropy_norm"))
    assert back.entropy.dtype == np.float32 and back.get("peak").dtype == np.int32
    np.testing.assert_array_equal(back.get("content"), table.get("content"))
    np.testing.assert_array_equal(back.get("peak"), table.get("peak"))
    assert back.get("text_peak").dtype == np.int32  # token ids: kept int32 (a vocabulary may pass int16)
    np.testing.assert_array_equal(back.get("text_peak"), table.get("text_peak"))
    for name in suite.FLOAT16:
        assert back.get(name).dtype == np.float32
        np.testing.assert_allclose(back.get(name), table.get(name), rtol=2.0 ** -11, atol=2.0 ** -25)
    assert suite.stored_digest(path) == "abc"
    # the demo's size with random (incompressible) content: under the 200 KB budget
    assert path.stat().st_size < 200 * 1024


def test_run_job_skips_tables_with_the_same_recipe_and_redoes_stale_ones(tmp_path, monkeypatch):
    import bye_jax.demo

    class Called(Exception):
        pass

    def build_base(*a, **k):
        raise Called

    monkeypatch.setattr(bye_jax.demo, "build_base", build_base)
    job, sets, fractions = suite.Job(1, 0.03, "multi"), {"finetune.epochs": 3}, [0, 1]
    config = suite.run_config(sets, job)
    steps = suite.checkpoint_steps(fractions, suite.steps_per_epoch(config), 3)
    assert steps == [0, 150]  # 800 samples / batch 16 = 50 steps per epoch
    out, work = tmp_path / "out", tmp_path / "work"
    for s in steps:
        suite.save_table(suite.table_path(out, job, s), _signals(8), np.zeros(8, bool),
                         {"recipe_digest": suite.digest(suite.recipe(config, s))})
    assert suite.run_job(job, sets, fractions, out, work, work / "bases") == 0
    assert not work.exists()
    with pytest.raises(Called):  # another setting: the tables are computed again
        suite.run_job(job, {"finetune.epochs": 3, "finetune.lr": 1e-3}, fractions, out, work, work / "bases")
    with pytest.raises(Called):
        suite.run_job(job, sets, fractions, out, work, work / "bases", force=True)


def test_cli_errors_are_one_line(capsys):
    for argv, msg in ((["--triggers=stripes"], "unknown trigger"), (["--set", "finetune.nope=1"], "unknown config key"),
                      (["--checkpoints=2"], "not in [0, 1]"), (["--seeds=x"], "--seeds: cannot read"),
                      (["--set", "nope.x=1"], "unknown config key 'nope'"),
                      (["--set", "finetune.epochs='abc'"], "Could not override field 'epochs'"),
                      (["--triggers=blend", "--set", "data.trigger_params=alfa=0.3"], "does not take ['alfa']"),
                      (["--tag=full ft"], "--tag 'full ft': letters, digits and dots only")):
        with pytest.raises(SystemExit) as e:
            suite.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("detect_suite: error:") and msg in err


# ----------------------------------------------------------------------- detect_quality --suite

def _row(table, detector="robust", poisoned=24, rate=0.03, trigger="patch", asr=95.0, f1=0.95, flag_rate=0.03,
         clean_flag_rate=0.0, oracle_f1=1.0):
    return {"table": table, "detector": detector, "n": 800, "poisoned": poisoned, "seed": 0, "rate": rate,
            "trigger": trigger, "step": 100, "epoch": 2, "asr": asr, "cp": 80.0, "precision": f1, "recall": f1,
            "f1": f1, "flag_rate": flag_rate, "clean_flag_rate": clean_flag_rate, "verdict": "",
            "oracle_f1": oracle_f1, "oracle": "layer 0 low"}


def test_suite_criteria_known_answers():
    rows = [_row("clean_ok", poisoned=0, rate=0.0, flag_rate=0.0, oracle_f1=0.0, asr=0.0, f1=0.0),
            _row("clean_bad", poisoned=0, rate=0.0, flag_rate=0.02, oracle_f1=0.0, asr=0.0, f1=0.0),
            _row("untrained_bad", asr=40.0, clean_flag_rate=0.3, f1=0.1, oracle_f1=0.5),
            _row("untrained_ok", asr=79.9, clean_flag_rate=0.01, f1=0.1, oracle_f1=0.5),
            _row("p3_ok", f1=0.92, oracle_f1=1.0),
            _row("p3_low", f1=0.85, oracle_f1=0.9),     # 0.85 >= 0.81 (vs oracle) but < 0.9 at 3%
            _row("p1_ok", rate=0.01, f1=0.8, oracle_f1=0.85),
            _row("rp1_bad", rate=0.01, trigger="random_patch", f1=0.7, oracle_f1=0.95),
            _row("tex3", rate=0.03, trigger="texture", f1=0.5, oracle_f1=0.8),  # no criterion applies
            _row("clean_ok", detector="official", poisoned=0, rate=0.0, flag_rate=0.5, oracle_f1=0.0, asr=0.0)]
    c = quality.suite_criteria(rows, large_share=0.05)
    got = {x["criterion"].split(":")[0]: (x["n"], x["failed"]) for x in c["robust"]}
    assert got == {"clean uploads": (2, ["clean_bad"]),
                   "backdoor not learnt (ASR < 80)": (2, ["untrained_bad"]),
                   "oracle F1 >= 0.9": (3, ["rp1_bad"]),
                   "patch / random_patch, 3%, ASR >= 80": (2, ["p3_low"]),
                   "patch / random_patch, 1%, ASR >= 80": (2, ["rp1_bad"]),
                   "blend / sig / wanet / text / dual_key, 10%, ASR >= 80": (0, []),
                   "blend / sig / wanet / text / dual_key, 3%, ASR >= 80": (0, [])}
    assert c["official"][0] == {"criterion": "clean uploads: flags <= 1%", "n": 1, "failed": ["clean_ok"]}
    assert [x["n"] for x in c["official"][1:]] == [0, 0, 0, 0, 0, 0]
    rows = [_row("blend10_ok", rate=0.1, trigger="blend", f1=0.9), _row("suffix10_bad", rate=0.1, trigger="suffix",
                                                                        f1=0.89),
            _row("sig10_untaken", rate=0.1, trigger="sig", asr=50.0, f1=0.0),
            _row("dual3_ok", rate=0.03, trigger="dual_key", f1=0.8), _row("wanet3_bad", rate=0.03, trigger="wanet",
                                                                          f1=0.5),
            _row("patch10", rate=0.1, trigger="patch", f1=0.0)]  # a patch trigger: issue 9's criteria
    got = {x["criterion"]: (x["n"], x["failed"]) for x in quality.suite_criteria(rows)["robust"]}
    assert got["blend / sig / wanet / text / dual_key, 10%, ASR >= 80: F1 >= 0.9"] == (2, ["suffix10_bad"])
    assert got["blend / sig / wanet / text / dual_key, 3%, ASR >= 80: F1 >= 0.8"] == (2, ["wanet3_bad"])


def test_share_oracle_finds_the_separating_head():
    rng = np.random.default_rng(0)
    n, truth = 200, np.zeros(200, bool)
    truth[:20] = True
    shares = rng.dirichlet(np.ones(4), (n, 3, 4)).astype(np.float16)
    shares[truth, 2, 1, 2] = 0.99  # poisoned: layer 2, head 1 puts (nearly) all on the user text
    shares[~truth, 2, 1, 2] = np.minimum(shares[~truth, 2, 1, 2], 0.9)
    table = _signals(n)
    table.arrays["shares"] = shares
    assert quality.share_oracle_f1(table, truth) == (1.0, "layer 2 head 1 user high")
    assert quality.share_oracle_f1(table, np.zeros(n, bool)) == (0.0, "-")
    assert quality.share_oracle_f1(_signals(n), truth) == (0.0, "-")


def test_suite_mode_reads_tables_groups_and_summarises(tmp_path, capsys):
    folder = tmp_path / "suite"
    low = range(0, 400, 25)  # 16 poisoned of 400 (4%), far below every clean entropy in every layer
    specs = [("clean_s0_step00100", _signals(400, seed=1), np.zeros(400, bool),
              {"seed": 0, "rate": 0.0, "trigger": "patch", "checkpoint_step": 100, "epoch": 2, "asr": 0.0, "cp": 85.0}),
             ("patch_p4_s0_step00400", _signals(400, seed=2, low=low), np.isin(np.arange(400), list(low)),
              {"seed": 0, "rate": 0.04, "trigger": "patch", "checkpoint_step": 400, "epoch": 8, "asr": 96.0,
               "cp": 80.0})]
    for name, table, truth, meta in specs:
        suite.save_table(folder / f"{name}.npz", table, truth, meta)
    rows = quality.suite_rows(sorted(folder.glob("*.npz")), ["official", "paper"])
    assert len(rows) == 4
    poisoned = [r for r in rows if r["table"] == "patch_p4_s0_step00400"]
    assert {r["poisoned"] for r in poisoned} == {16} and {r["asr"] for r in poisoned} == {96.0}
    assert {r["oracle_f1"] for r in poisoned} == {1.0} and {r["trigger"] for r in poisoned} == {"patch"}
    clean = [r for r in rows if r["table"] == "clean_s0_step00100"]
    assert {r["poisoned"] for r in clean} == {0} and {r["oracle_f1"] for r in clean} == {0.0}
    md = tmp_path / "report.md"
    assert quality.main(["--suite", str(folder), "--detectors=official,paper", "--md", str(md)]) == 0
    text = md.read_text()
    assert text == capsys.readouterr().out
    assert "### clean upload" in text and "### patch 4%" in text and "### Issue 9 and 12 criteria" in text
    assert "| patch_p4_s0_step00400 | 0 | 400 (8) | 96.0 | 80.0 | 400 | 16 | 1.00 (layer 0 low) |" in text
    assert "| clean uploads: flags <= 1% |" in text
    assert quality.main(["--suite", str(folder), "--detectors=official", "--match=patch_*",
                         "--json", str(tmp_path / "rows.json")]) == 0
    text = capsys.readouterr().out
    assert "### patch 4%" in text and "### clean upload" not in text
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["table"], r["detector"]) for r in rows] == [("patch_p4_s0_step00400", "official")]


def test_suite_mode_errors(tmp_path, capsys):
    assert quality.main(["--suite", str(tmp_path)]) == 2
    assert "no suite tables" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        quality.main(["--suite", str(tmp_path), "--detectors=nope"])
    assert e.value.code == 2 and "unknown detector 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        quality.main([])
    assert e.value.code == 2
    suite.save_table(tmp_path / "t.npz", _signals(8), np.zeros(8, bool), {"recipe_digest": "x"})
    with pytest.raises(SystemExit) as e:
        quality.main([str(tmp_path)])
    assert e.value.code == 2 and "is a detect_suite table: read its folder with --suite" in capsys.readouterr().err


def test_reextract_reuses_the_vanilla_scores_of_the_same_model_only(tmp_path):
    """--reextract: the ASR / CP of a table made from the same recipe under an older signal version are
    reused (same data, fine-tune, merged model); another recipe, or no table, means measuring again."""
    job, sets = suite.Job(0, 0.1, "suffix"), {}
    config = suite.run_config(sets, job)
    old = {**suite.recipe(config, 600), "signals_version": 2}
    scores = {"asr": 97.3, "cp": 84.0, "cp_per_type": {"color": 90.0}}
    path = tmp_path / "t.npz"
    suite.save_table(path, _signals(8), np.zeros(8, bool), {"recipe_digest": suite.digest(old), **scores})
    assert suite._stored_eval(path, config, 600) == scores
    assert suite._stored_eval(path, config, 1200) is None            # another checkpoint
    assert suite._stored_eval(path, suite.run_config({"finetune.lr": 1e-3}, job), 600) is None
    assert suite._stored_eval(tmp_path / "missing.npz", config, 600) is None
    assert suite.extract_dir().startswith(f"extract_v{SIGNALS_VERSION}_")  # older versions: left alone


def test_token_signals_added_to_a_version_4_table_are_the_committed_ones(tmp_path):
    """benchmarks/suite_add_tokens.py on a committed table taken back to signal version 4 (user_tokens and
    answer_tokens removed, the version-4 recipe digest) and to version 5 (answer_tokens removed): the run's
    upload is made again from the table's meta, its questions encoded and its answers tokenized; the arrays
    equal the committed ones (user_tokens itself equal to a re-extraction, BENCHMARKS.md) and every other array
    is unchanged. A table whose meta does not rebuild its digest is left alone."""
    add = _load("suite_add_tokens")
    committed = Path(__file__).parents[1] / "benchmarks" / "data" / "detect_suite" / "suffix_p3_s0_step01200.npz"
    table, poisoned, meta = suite.load_table(committed)
    assert meta["signals_version"] == SIGNALS_VERSION and table.has("user_tokens") and table.has("answer_tokens")
    tokens, answers = table.arrays.pop("user_tokens"), table.arrays.pop("answer_tokens")
    config = suite.run_config(meta["overrides"], suite.Job(0, 0.03, "suffix"))
    path = tmp_path / committed.name
    for version, what in ((4, "user_tokens and answer_tokens added"), (5, "answer_tokens added")):
        if version == 5:
            table.arrays["user_tokens"] = tokens
        old = {**meta, "signals_version": version,
               "recipe_digest": suite.digest({**suite.recipe(config, 1200), "signals_version": version})}
        for key in ("user_tokens_added", "answer_tokens_added"):
            old.pop(key, None)
        suite.save_table(path, table, poisoned, old)
        assert add.add_tokens(path, tmp_path / "work") == f"{what} (800 samples)"
        got, labels, new = suite.load_table(path)
        np.testing.assert_array_equal(got.get("user_tokens"), tokens)
        np.testing.assert_array_equal(got.get("answer_tokens"), answers)
        want = suite.load_table(committed)[0]
        assert set(got.arrays) == set(want.arrays)
        for name in want.arrays:
            np.testing.assert_array_equal(got.get(name), want.get(name), err_msg=name)
        # the current digest (computed here: the tests' environment moves the compile cache, which enters it)
        assert new["recipe_digest"] == suite.digest(suite.recipe(config, 1200)) and new["answer_tokens_added"]
        assert new.get("user_tokens_added", False) == (version == 4)
    # at the current version: skipped; a digest its meta does not rebuild: left alone
    assert "skipped" in add.add_tokens(path, tmp_path / "work")
    suite.save_table(path, table, poisoned, {**old, "recipe_digest": "0" * 16})
    assert "left alone" in add.add_tokens(path, tmp_path / "work")
    # the poisoned samples answer the target, which no clean one does
    target = {tuple(r[r >= 0]) for r in answers[labels]}
    assert len(target) == 1 and not any(tuple(r[r >= 0]) in target for r in answers[~labels])
    # poisoned questions carry the suffix: their last two user tokens are the same pair, which clean ones lack
    last = {tuple(r[r >= 0][-2:]) for r in tokens[labels]}
    assert len(last) == 1 and not any(tuple(r[r >= 0][-2:]) in last for r in tokens[~labels])
