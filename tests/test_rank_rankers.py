"""``rank --ranker``: the paper's outputs unchanged, the other rankers through the same files."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from typer.testing import CliRunner

from conceptrank.cli import app
from conceptrank.core.rankers import DEFAULT_RANKER
from conceptrank.stages.rank import RankConfig, run_rank

RANK_FILES = ("local_concepts.csv", "global_concepts.csv", "images.csv", "rankings.json", "classifier.json", "svm.npz")


@pytest.fixture(scope="module")
def stages(tiny_world, tmp_path_factory):
    """Dissection (with probe activations beside the tally) and extraction of the tiny world."""
    from conceptrank.nn.models import load_model
    from conceptrank.stages.dissect import DissectConfig, run_dissect
    from conceptrank.stages.extract import ExtractConfig, run_extract
    from conceptrank.stages.probe import run_probe_activations

    root = tmp_path_factory.mktemp("rank_rankers")
    model = load_model(str(tiny_world.model_dir))
    run_dissect(model, None, "layer4", tiny_world.probe_dir, root / "dissect", DissectConfig(workers=0, progress=False))
    run_extract(model, None, "layer4", tiny_world.target_dir, root / "extract", ExtractConfig(workers=0))
    bare = root / "bare"  # the same tally without thresholds or probe activations beside it
    bare.mkdir()
    shutil.copy(root / "dissect" / "tally.csv", bare / "tally.csv")
    shutil.copy(root / "dissect" / "dissect.json", bare / "dissect.json")
    run_probe_activations(model, "layer4", tiny_world.probe_dir, root / "dissect")
    return root


def _files(folder):
    return {n: (folder / n).read_bytes() for n in RANK_FILES}


def test_paper_ranker_outputs_are_byte_identical(stages, tmp_path):
    cfg = RankConfig(min_iou=0.0)
    old = run_rank(stages / "extract", stages / "bare" / "tally.csv", tmp_path / "default", cfg)  # today's path
    assert old.ranker == "paper" and DEFAULT_RANKER in old.ranker_note
    new = run_rank(stages / "extract", stages / "dissect" / "tally.csv", tmp_path / "paper",
                   RankConfig(min_iou=0.0, ranker="paper"))
    assert new.ranker == "paper" and new.ranker_note is None
    assert _files(tmp_path / "paper") == _files(tmp_path / "default")
    for protocol_dir, cfg in (("p1", RankConfig(protocol="paper")), ("p2", RankConfig(protocol="paper", ranker="paper"))):
        run_rank(stages / "extract", stages / "dissect" / "tally.csv", tmp_path / protocol_dir, cfg)
    assert _files(tmp_path / "p1") == _files(tmp_path / "p2")


def test_default_ranker_when_its_inputs_are_there(stages, tmp_path):
    res = run_rank(stages / "extract", stages / "dissect" / "tally.csv", tmp_path / "r", RankConfig(min_iou=0.0))
    assert res.ranker == DEFAULT_RANKER and res.ranker_note is None
    meta = json.loads((tmp_path / "r" / "rank.json").read_text())
    assert meta["ranker"] == DEFAULT_RANKER
    with open(tmp_path / "r" / "local_concepts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "class", "split", "rank", "concept", "category", "unit", "score"]
    assert len({r["image"] for r in rows}) == len(res.images)
    again = run_rank(stages / "extract", stages / "dissect" / "tally.csv", tmp_path / "r", RankConfig(min_iou=0.0))
    assert again.reused and again.ranker == DEFAULT_RANKER


@pytest.mark.parametrize("ranker", ["aggregate", "presence", "contribution", "ibd", "tcav"])
def test_every_ranker_through_the_cli(stages, tmp_path, ranker):
    out = tmp_path / ranker
    res = CliRunner().invoke(app, ["rank", "--activations", str(stages / "extract"), "--tally",
                                   str(stages / "dissect" / "tally.csv"), "--out", str(out), "--min-iou", "0",
                                   "--ranker", ranker])
    assert res.exit_code == 0, res.output
    assert f"ranker {ranker}" in res.output
    with open(out / "global_concepts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class", "rank", "concept", "category", "unit", "weight", "sign"]
    assert all((float(r["weight"]) > 0) == (r["sign"] == "+") for r in rows)


def test_a_ranker_without_its_inputs_is_a_clear_error(stages, tmp_path):
    res = CliRunner().invoke(app, ["rank", "--activations", str(stages / "extract"), "--tally",
                                   str(stages / "bare" / "tally.csv"), "--out", str(tmp_path), "--ranker", "net2vec"])
    assert res.exit_code == 2 and "probe_activations.npz" in res.output
    res = CliRunner().invoke(app, ["rank", "--activations", str(stages / "extract"), "--tally",
                                   str(stages / "bare" / "tally.csv"), "--out", str(tmp_path), "--ranker", "best"])
    assert res.exit_code == 2 and "unknown ranker" in res.output


@pytest.mark.parametrize("ranker", ["net2vec", "contribution"])
def test_stability_refits_the_runs_own_ranker(stages, tmp_path, ranker):
    """evaluate's fold stability is the Jaccard of the run's ranker refit on each fold's training part,
    recomputed here by hand; a ranker that does not use the SVM gets no seed stability (it would be 1)."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    from conceptrank.core.faithfulness import mean_pairwise_jaccard
    from conceptrank.core.rankers import UnitBank, make_ranker
    from conceptrank.core.ranking import GlobalRanker
    from conceptrank.io.activations import load_activations
    from conceptrank.io.tally_csv import read_tally
    from conceptrank.stages.evaluate import EvaluateConfig, run_evaluate
    from conceptrank.stages.probe import load_probe_activations

    rk = run_rank(stages / "extract", stages / "dissect" / "tally.csv", tmp_path / "r",
                  RankConfig(min_iou=0.0, ranker=ranker))
    res = run_evaluate(tmp_path / "r", tmp_path / "r", EvaluateConfig(configs="3:3", n_perm=10, n_draw=10, n_boot=10,
                                                                        n_random=2, stability_seeds=(0, 1)))
    act = load_activations(stages / "extract")
    train = np.asarray(rk.splits) == "train"
    X, X_max, y = act.mean[train].astype(np.float64), act.max[train].astype(np.float64), act.classes[train]
    bank = UnitBank(read_tally(stages / "dissect" / "tally.csv").concepts(0.0),
                    np.load(stages / "dissect" / "thresholds.npy").astype(np.float64))
    probe = load_probe_activations(stages / "dissect" / "probe_activations.npz")
    runs = []
    for tr, _ in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
        svm = GlobalRanker("standard", C=rk.best_C, folds=2, seed=0).fit(X[tr], y[tr]) if ranker == "contribution" else None
        r = make_ranker(ranker).fit(X[tr], y[tr], bank, X_max=X_max[tr], probe=probe, svm=svm)
        runs.append([frozenset(c.concept for c in lst) for lst in r.global_(3)])
    want = float(np.nanmean(mean_pairwise_jaccard(runs)))
    assert res.stability["folds"]["G=3"] == pytest.approx(want, abs=1e-12)
    assert ranker in res.stability["note"]
    assert ("seeds" in res.stability) == (ranker == "contribution")
    assert ("seeds_skipped" in res.stability) == (ranker == "net2vec")
