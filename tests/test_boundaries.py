"""Stage boundaries that cannot mix runs (issue 10 item 4): each test reproduces one way a run folder
could combine outputs of different runs, and checks that the stage refuses, cleans up or says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import KFold

from conceptrank.errors import ConceptrankError, StaleInputError
from conceptrank.io.rankings import EVALUATE_OUTPUTS, run_folder_mismatches
from conceptrank.io.svm import load_svm
from conceptrank.io.tally_csv import format_tally
from conceptrank.stages.evaluate import EvaluateConfig, run_evaluate
from conceptrank.stages.explain import run_explain
from conceptrank.stages.rank import RankConfig, run_rank

LABELS = ["red", "blue", "circle", "square", "rim", "", "sky", "red", "", "blue", "circle", "square"]
FAST = EvaluateConfig(configs="1:1,3:3", n_perm=30, n_draw=30, n_boot=30, stability_seeds=())


def _tally_text(ious: list[float]) -> str:
    names = [""] + sorted({x for x in LABELS if x})
    best = np.array([[names.index(x)] for x in LABELS])
    iou = np.array([[v if x else 0.0] for x, v in zip(LABELS, ious)])
    z = np.zeros_like(best)
    return format_tally(["object"], best, z, z, z, iou, names)


def run_folder(tmp: Path, splits=("train",) * 10 + ("test",) * 6, seed=0) -> Path:
    """A run folder: extract/activations.npz (3 classes × 16 images, class c lifts unit c), dissect/tally.csv."""
    rng = np.random.default_rng(seed)
    cls = [c for c in "ABC" for _ in range(len(splits))]
    spl = list(splits) * 3
    mean = (rng.random((len(cls), 12)) * 0.6 + 0.2).astype(np.float32)
    for i, c in enumerate(cls):
        mean[i, "ABC".index(c)] += 1.0
    (tmp / "extract").mkdir(parents=True)
    np.savez(tmp / "extract" / "activations.npz", mean=mean, max=mean, classes=np.array(cls), splits=np.array(spl),
             images=np.array([f"JPEGImages/{c}_{i:03d}.jpg" for i, c in enumerate(cls)]))
    (tmp / "dissect").mkdir()
    (tmp / "dissect" / "tally.csv").write_text(_tally_text([0.05 + 0.01 * u for u in range(12)]))
    return tmp


def rank(run: Path, **kw) -> None:
    cfg = RankConfig(**{"top_local": 3, "top_global": 3, "c_grid": (1.0,), "folds": 3, **kw})
    run_rank(run / "extract", run / "dissect" / "tally.csv", run / "rank", cfg)


def redissect(run: Path) -> None:
    """What a re-run `dissect` does to the folder: a tally with other IoUs (same labels, same width)."""
    (run / "dissect" / "tally.csv").write_text(_tally_text([0.30 - 0.01 * u for u in range(12)]))


def test_rerank_removes_the_previous_evaluation(tmp_path):
    run = run_folder(tmp_path)
    rank(run)
    run_evaluate(run / "rank", None, FAST)
    (run / "rank" / "evaluate.json").write_text("{}")  # the pipeline's cache manifest lives here too
    assert all((run / "rank" / n).is_file() for n in EVALUATE_OUTPUTS)
    rank(run)  # same inputs and config: the ranking is reused and its evaluation stays valid
    assert all((run / "rank" / n).is_file() for n in EVALUATE_OUTPUTS)
    rank(run, top_local=2)  # a new ranking: the old scores must not sit beside it
    assert not any((run / "rank" / n).exists() for n in EVALUATE_OUTPUTS)
    assert run_folder_mismatches(run) == []


def test_rank_that_fails_keeps_the_previous_outputs(tmp_path):
    run = run_folder(tmp_path)
    rank(run)
    run_evaluate(run / "rank", None, FAST)
    with pytest.raises(ConceptrankError):
        rank(run, folds=50)  # fewer images per class than folds
    assert all((run / "rank" / n).is_file() for n in ("rank.json", "summary.json", "precision.csv"))


def test_report_check_names_an_evaluation_of_another_ranking(tmp_path):
    run = run_folder(tmp_path)
    rank(run)
    run_evaluate(run / "rank", None, FAST)
    old = (run / "rank" / "summary.json").read_bytes()
    rank(run, top_local=2)
    (run / "rank" / "summary.json").write_bytes(old)  # e.g. copied back by hand
    problems = run_folder_mismatches(run)
    assert len(problems) == 1 and "summary.json scored another ranking" in problems[0]


def test_evaluate_after_redissect_refuses_naming_both_files(tmp_path):
    run = run_folder(tmp_path)
    rank(run)
    redissect(run)
    with pytest.raises(StaleInputError) as e:
        run_evaluate(run / "rank", None, FAST)
    msg = str(e.value)
    assert str(run / "dissect" / "tally.csv") in msg and str(run / "rank" / "rank.json") in msg
    assert not (run / "rank" / "summary.json").exists()
    assert any("tally.csv changed after the ranking" in p for p in run_folder_mismatches(run))
    from conceptrank.report.data import load_run

    assert any(w.startswith("PARTS OF DIFFERENT RUNS") and "tally.csv" in w for w in load_run(run).warnings)


def test_evaluate_explain_and_relate_after_reextract_refuse(tmp_path):
    from conceptrank.stages.relate import run_relate

    run = run_folder(tmp_path)
    rank(run)
    other = run_folder(tmp_path / "other", seed=1)
    (run / "extract" / "activations.npz").write_bytes((other / "extract" / "activations.npz").read_bytes())
    for call in (lambda: run_evaluate(run / "rank", None, FAST),
                 lambda: run_explain(run, ["A_000.jpg"], heatmaps=0),
                 lambda: run_relate(run)):
        with pytest.raises(StaleInputError) as e:
            call()
        assert str(run / "extract" / "activations.npz") in str(e.value) and "rank.json" in str(e.value)


def test_evaluate_refuses_a_changed_rank_output(tmp_path):
    run = run_folder(tmp_path)
    rank(run)
    with np.load(run / "rank" / "svm.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coef"] = -arrays["coef"]
    np.savez(run / "rank" / "svm.npz", **arrays)
    with pytest.raises(StaleInputError, match=r"svm\.npz is not the file .*rank\.json"):
        run_evaluate(run / "rank", None, FAST)


def test_paper_protocol_deletion_sets_units_to_the_training_mean(tmp_path):
    run = run_folder(tmp_path)
    rank(run, protocol="paper", folds=4, top_global=2)
    run_evaluate(run / "rank", None, EvaluateConfig(configs="1:1,2:2", n_perm=20, n_draw=20, n_boot=20,
                                                    n_random=3, stability_seeds=()))
    with np.load(run / "extract" / "activations.npz") as z:
        X, y = z["mean"].astype(np.float64), z["classes"]
    svm = load_svm(run / "rank")
    clf = json.loads((run / "rank" / "classifier.json").read_text())
    # by hand: the kept fold model was fit on the training part of fold `best_fold` of KFold(4) over
    # the seeded permutation; its training mean is what a removed unit is set to
    perm = np.random.default_rng(0).permutation(len(y))
    tr, _ = list(KFold(n_splits=4).split(perm))[clf["best_fold"]]
    train_mean = X[perm[tr]].mean(axis=0)
    assert not svm.standardized and np.all(svm.scale == 1) and np.all(svm.mean == 0)
    np.testing.assert_allclose(svm.train_mean, train_mean, rtol=0, atol=1e-12)
    details = json.loads((run / "rank" / "evaluation.json").read_text())["deletion"]
    for g in (1, 2):
        for ci, c in enumerate(svm.classes):
            rec = details[f"G={g}"][c]
            units = np.array(rec["units"]) - 1
            rows = y == c
            by_hand = float(((X[rows][:, units] - train_mean[units]) @ svm.coef[ci, units]).mean())
            assert rec["score_drop_top"] == pytest.approx(by_hand, abs=1e-9)
            at_zero = float((X[rows][:, units] @ svm.coef[ci, units]).mean())  # the old bug: units set to 0
            assert abs(at_zero - by_hand) > 1e-3


def test_rank_refuses_all_beside_train_and_test(tmp_path):
    run = run_folder(tmp_path, splits=("train",) * 8 + ("test",) * 5 + ("all",) * 3)
    with pytest.raises(ConceptrankError, match=r"9 image\(s\) have split 'all' beside train/test"):
        rank(run)


def _manifest(tmp: Path, splits: list[str]) -> Path:
    from PIL import Image

    rows = ["path,label,split"]
    for i, s in enumerate(splits):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp / f"im{i}.png")
        rows.append(f"im{i}.png,{'ab'[i % 2]},{s}")
    (tmp / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp / "m.csv"


def test_target_split_names_are_validated_when_read(tmp_path):
    from conceptrank.errors import TargetError
    from conceptrank.io.targets import load_targets

    m = _manifest(tmp_path, ["train", "train", "test", "test", "val", "val", "val"])
    with pytest.raises(TargetError, match=r"m\.csv: split 'val' \(3 image\(s\), first 'im4\.png'\).*val=train"):
        load_targets(m)
    ts = load_targets(m, split_map="val=drop")
    assert len(ts) == 4 and ts.dropped == {"val": 3}
    ts = load_targets(m, split_map={"val": "train"})
    assert [it.split for it in ts.items].count("train") == 5 and ts.dropped == {}
    with pytest.raises(TargetError, match="bad split map item val=validation"):
        load_targets(m, split_map="val=validation")
    # 'all' (an empty cell) beside train/test rows: which part would it be? refused unless mapped
    m = _manifest(tmp_path, ["train", "test", "", "train"])
    with pytest.raises(TargetError, match=r"1 image\(s\) have no train/test split \(first 'im2\.png'\)"):
        load_targets(m)
    assert load_targets(m, split_map="all=test").items[2].split in ("test", "train")
    assert {it.split for it in load_targets(_manifest(tmp_path, ["", "", ""])).items} == {"all"}


def test_rank_refuses_activations_that_extract_json_does_not_describe(tmp_path):
    run = run_folder(tmp_path)
    npz = run / "extract" / "activations.npz"
    manifest = {"layer": "layer4", "cache": {"outputs": {"activations.npz": {"sha256": "0" * 64, "bytes": 1}}}}
    (run / "extract" / "extract.json").write_text(json.dumps(manifest))  # written for other bytes
    with pytest.raises(StaleInputError, match=r"activations\.npz .* is not the file .*extract\.json wrote"):
        rank(run)
    from conceptrank.io.cache import file_sha256

    manifest["cache"]["outputs"]["activations.npz"]["sha256"] = file_sha256(npz)
    (run / "extract" / "extract.json").write_text(json.dumps(manifest))
    rank(run)  # the manifest describes these bytes: accepted
