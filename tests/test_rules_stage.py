"""The rules stage on a run folder of the tiny synthetic world: outputs, numbers recomputed by hand,
clingo on rules.lp with each test image's facts, reuse, and bad input."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from conceptrank.cli import app
from conceptrank.core.rules import asp_names, solve_program
from conceptrank.errors import ConceptrankError, RulesError
from conceptrank.stages.rules import RulesConfig, run_rules

runner = CliRunner()
FAST = RulesConfig(min_iou=0.0001, learner="tree", learners=("tree",), folds=2)  # the other learners: test_rules.py


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def run_dir(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("rules_run")
    model, probe, target = tiny_world.model_dir, tiny_world.probe_dir, tiny_world.target_dir
    _ok(["dissect", "--model", model, "--layer", "layer4", "--probe", probe, "--out", out / "dissect",
         "--workers", "0", "--quantile", "0.02"])
    _ok(["extract", "--model", model, "--layer", "layer4", "--dataset", target, "--out", out / "extract",
         "--workers", "0"])
    _ok(["rank", "--activations", out / "extract", "--tally", out / "dissect" / "tally.csv", "--out",
         out / "rank", "--min-iou", "0.0001"])
    (out / "run.json").write_text(json.dumps({"config": {"truth": str(tiny_world.truth_path)}}))
    return out


@pytest.fixture(scope="module")
def result(run_dir):
    return run_rules(run_dir, FAST)


def test_outputs_and_numbers_by_hand(run_dir, result):
    folder = run_dir / "rules"
    for name in ("rules.txt", "rules.lp", "facts.lp", "rules.json", "comparison.csv", "map_stats.npz"):
        assert (folder / name).is_file(), name
    doc = json.loads((folder / "rules.json").read_text())
    facts = result.facts["share"]
    images = np.load(run_dir / "extract" / "activations.npz")["images"].astype(str)
    splits = np.load(run_dir / "extract" / "activations.npz")["splits"].astype(str)
    asp = {p["asp"]: i for i, p in enumerate(doc["facts"]["predicates"])}
    assert doc["rules"], "the tiny world should still give some rules"
    for rule in doc["rules"]:
        holds = np.ones(len(images), bool)
        for lit in rule["literals"]:
            col = facts.present[:, asp[lit["predicate"]]]
            holds &= col if lit["positive"] else ~col
        assert rule["fires_on"]["test"] == images[holds & (splits == "test")].tolist()
        train = holds & (splits == "train")
        assert rule["fires_train"] == int(train.sum()) == len(rule["fires_on"]["train"])
        assert rule["confidence"] == pytest.approx(rule["support"] / max(rule["fires_train"], 1))
        assert len(rule["literals"]) <= 3
    assert result.solver == {"images": len(images), "agree": len(images)}
    empty = facts.empty_images  # images in which no concept is present are counted, not dropped
    assert doc["counts"]["images_without_facts_test"] == int((empty & (splits == "test")).sum())
    assert doc["counts"]["images_without_facts_train"] == int((empty & (splits == "train")).sum())
    assert len(result.reports) == 3 * 1 * 2  # binarisations (share, nesyfold, truth) x learners x label sets
    assert set(result.ceiling) == {"share", "nesyfold", "truth"}
    assert set(result.cv) == {0.0, 0.01, 0.02, 0.05}
    assert "fidel" in result.table() and "clingo" in result.table()


def test_clingo_on_each_test_image_matches_python(run_dir, result):
    from conceptrank.core.rules import facts_program, predict

    rs, facts = result.primary.ruleset, result.facts[result.primary.facts]
    lp = (run_dir / "rules" / "rules.lp").read_text()
    z = np.load(run_dir / "extract" / "activations.npz")
    images, splits = z["images"].astype(str), z["splits"].astype(str)
    labels, _ = predict(rs, facts.present)
    heads = dict(zip(asp_names(rs.classes), rs.classes))
    checked = 0
    for i in np.nonzero(splits == "test")[0]:
        solved = solve_program(lp, facts_program([images[i]], facts.names, facts.present[i:i + 1]))
        assert heads.get(solved[images[i]][0], "") == labels[i], images[i]
        checked += 1
    assert checked == int((splits == "test").sum()) > 0


def test_rerun_reuses_maps_and_gives_the_same_bytes(run_dir, result):
    before = (run_dir / "rules" / "rules.json").read_bytes()
    again = run_rules(run_dir, FAST)
    assert again.maps_reused and not result.maps_reused
    assert (run_dir / "rules" / "rules.json").read_bytes() == before


def test_fits_in_two_processes_give_the_same_bytes(run_dir, result):
    """CV folds and comparison rows fitted by two worker processes: the same rules.json, byte for byte."""
    before = (run_dir / "rules" / "rules.json").read_bytes()
    cfg = RulesConfig(min_iou=0.0001, learner="ripper", learners=("ripper", "tree"), folds=2)
    one = (run_rules(run_dir, cfg), (run_dir / "rules" / "rules.json").read_bytes())
    two = (run_rules(run_dir, replace(cfg, jobs=2)), (run_dir / "rules" / "rules.json").read_bytes())
    assert one[1] == two[1] and len(one[0].reports) == len(two[0].reports) > 1
    run_rules(run_dir, FAST)
    assert (run_dir / "rules" / "rules.json").read_bytes() == before


def test_missing_thresholds_is_a_clear_error_and_keeps_outputs(run_dir, result, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "dissect" / "thresholds.npy").unlink()
    before = (run / "rules" / "rules.json").read_bytes()
    with pytest.raises(ConceptrankError, match="thresholds.npy is missing"):  # dissect.json lists it
        run_rules(run, FAST)
    (run / "dissect" / "dissect.json").unlink()  # now like a folder holding a NetDissect-Lite tally.csv only
    with pytest.raises(RulesError, match="thresholds.npy not found"):
        run_rules(run, FAST)
    assert (run / "rules" / "rules.json").read_bytes() == before
    r = runner.invoke(app, ["rules", "--run", str(run), "--min-iou", "0.0001"])
    assert r.exit_code == 2 and "thresholds.npy" in r.output and "Traceback" not in r.output
    res = run_rules(run, RulesConfig(min_iou=0.0001, facts="nesyfold", compare=False, learner="tree"))
    assert res.primary.facts == "nesyfold" and "share" not in res.facts


def test_not_a_run_folder_and_bad_options(tmp_path):
    with pytest.raises(ConceptrankError, match="not a complete run folder"):
        run_rules(tmp_path, FAST)
    r = runner.invoke(app, ["rules", "--run", str(tmp_path), "--learner", "c45"])
    assert r.exit_code == 2 and "--learner" in r.output


def test_cli_prints_the_table(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")  # leaves the module's rules.json as `result` wrote it
    text = _ok(["rules", "--run", tmp_path / "run", "--min-iou", "0.0001", "--no-compare", "--learner", "tree"])
    assert "tree" in text and "solver check" in text


def test_explain_names_the_deciding_rule_and_its_facts(run_dir, result):
    import html

    from conceptrank.core.rules import predict
    from conceptrank.report.html import _environment
    from conceptrank.report.rules import class_rules
    from conceptrank.stages.rules import explain_rules, rules_summary

    rs, facts = result.primary.ruleset, result.facts[result.primary.facts]
    images = np.load(run_dir / "extract" / "activations.npz")["images"].astype(str)
    labels, winner = predict(rs, facts.present)
    lines = explain_rules(run_dir, images.tolist())
    for img, lab, w in zip(images, labels, winner):
        first = lines[img][0]
        assert (f"r{w + 1} decided {lab}:" in first) if w >= 0 else ("no rule fired" in first)
    assert any(w >= 0 for w in winner)
    summary = rules_summary(run_dir)
    assert summary["test"] == result.primary.test and len(summary["comparison"]) == len(result.reports)
    cr = class_rules(run_dir)
    assert cr["available"] and sum(len(v["rules"]) for v in cr["classes"].values()) == len(rs.rules)
    cls = rs.rules[0].head
    page = _environment().get_template("_class_rules.html").render(s={"name": cls}, class_rules=cr)
    assert html.escape(cr["classes"][cls]["rules"][0]["clause"]) in page
    missing = class_rules(run_dir / "nowhere")
    assert not missing["available"] and "conceptrank rules" in missing["about"]


def test_batched_maps_equal_the_per_image_ones(run_dir):
    from conceptrank.io.cache import read_json
    from conceptrank.stages.maps import iter_layer_maps, layer_maps

    cfg, meta = read_json(run_dir / "run.json")["config"], read_json(run_dir / "extract" / "extract.json")
    images = np.load(run_dir / "extract" / "activations.npz")["images"].astype(str)[:7].tolist()
    single, _, _ = layer_maps(cfg, meta, images)
    batches = list(iter_layer_maps(cfg, meta, images, batch_size=3))
    assert [b[0] for b in batches] == [0, 3, 6]
    batched = np.concatenate([b[1] for b in batches])
    np.testing.assert_allclose(batched, np.stack(single), rtol=1e-5, atol=1e-5)
