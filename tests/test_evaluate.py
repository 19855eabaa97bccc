"""Tests of conceptrank.stages.evaluate: Formula 2 on hand-computed examples, outputs, errors, and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conceptrank.cli import app
from conceptrank.core.evaluation import agreement, parse_configs
from conceptrank.errors import ConceptrankError
from conceptrank.io.tally_csv import format_tally
from conceptrank.stages.evaluate import EvaluateConfig, run_evaluate
from conceptrank.stages.rank import RankConfig, run_rank


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


# --------------------------------------------------------------------------------------------
# the metric (pure)
# --------------------------------------------------------------------------------------------


def test_agreement_hand_computed():
    local = {
        "a1": ["sky", "dog", "cat"],
        "a2": ["tree", "car", "road"],   # never overlaps
        "a3": ["grass", "sky"],
        # "a4" has no local concepts at all
        "b1": ["road", "water", "dog"],  # the only image of class B
    }
    image_class = {"a1": "A", "a2": "A", "a3": "A", "a4": "A", "b1": "B"}
    glob = {"A": ["dog", "sky"], "B": ["water", "car"], "C": ["sky"]}
    assert agreement(local, image_class, glob, 1, 1) == {"A": 0.0, "B": 0.0}
    assert agreement(local, image_class, glob, 3, 1) == {"A": 0.25, "B": 1.0}
    assert agreement(local, image_class, glob, 3, 2) == {"A": 0.5, "B": 1.0}
    assert agreement(local, image_class, glob, 2, 2) == {"A": 0.5, "B": 1.0}
    assert agreement(local, image_class, glob, 1, 2) == {"A": 0.25, "B": 0.0}  # a1's 'sky' is A's 2nd
    # class C has no images → omitted; a class without global concepts scores 0
    assert agreement({"d1": ["sky"]}, {"d1": "D"}, glob, 5, 5) == {"D": 0.0}
    with pytest.raises(ValueError):
        agreement(local, image_class, glob, 0, 1)


def test_parse_configs():
    assert parse_configs("5:1, 5:5,10:10") == ((5, 1), (5, 5), (10, 10))
    assert parse_configs([(3, 2), (1, 1)]) == ((3, 2), (1, 1))
    for bad, item in (("5:1,5-5", "'5-5'"), ("5:x", "'5:x'"), ("5:1,", "''"), ("0:1", "'0:1'"), ("1:2:3", "'1:2:3'")):
        with pytest.raises(ConceptrankError, match=item):
            parse_configs(bad)
    with pytest.raises(ConceptrankError, match="twice"):
        parse_configs("5:1,5:1")


# --------------------------------------------------------------------------------------------
# run_evaluate on a hand-written ranking folder
# --------------------------------------------------------------------------------------------


def hand_ranking(folder: Path, protocol="standard") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rank.json").write_text(json.dumps(
        {"protocol": protocol, "top_local": 3, "top_global": 2, "classes": ["A", "B", "C"]}))
    rows = [
        # a1's rows out of rank order on purpose: the reader sorts by rank
        ["a1", "A", "test", 3, "cat", "object", 7, 0.1],
        ["a1", "A", "test", 1, "sky", "scene", 1, 0.9],
        ["a1", "A", "test", 2, "dog", "object", 2, 0.5],
        ["a2", "A", "test", 1, "tree", "object", 3, 0.9],
        ["a2", "A", "test", 2, "car", "object", 4, 0.8],
        ["a2", "A", "test", 3, "road", "object", 5, 0.7],
        ["a3", "A", "test", 1, "grass", "object", 6, 0.9],
        ["a3", "A", "test", 2, "sky", "scene", 1, 0.8],
        ["b1", "B", "test", 1, "road", "object", 5, 0.9],
        ["b1", "B", "test", 2, "water", "object", 8, 0.8],
        ["b1", "B", "test", 3, "dog", "object", 2, 0.7],
        ["a5", "A", "train", 1, "sky", "scene", 1, 0.9],
        ["c1", "C", "train", 1, "sky", "scene", 1, 0.9],
    ]
    write_csv(folder / "local_concepts.csv", ["image", "class", "split", "rank", "concept", "category", "unit", "score"], rows)
    imgs = [["a1", "A", "test", 3], ["a2", "A", "test", 3], ["a3", "A", "test", 2], ["a4", "A", "test", 0],
            ["b1", "B", "test", 3], ["a5", "A", "train", 1], ["c1", "C", "train", 1]]
    write_csv(folder / "images.csv", ["image", "class", "split", "n_concepts"], imgs)
    glob = [
        ["A", 1, "dog", "object", 2, 0.5, "+"], ["A", 2, "sky", "scene", 1, 0.4, "+"],
        ["A", 1, "tree", "object", 3, -0.5, "-"],  # 'against' concepts never count
        ["B", 1, "water", "object", 8, 0.5, "+"], ["B", 2, "car", "object", 4, 0.1, "+"],
        ["C", 1, "sky", "scene", 1, 0.3, "+"],
    ]
    write_csv(folder / "global_concepts.csv", ["class", "rank", "concept", "category", "unit", "weight", "sign"], glob)
    return folder


def test_run_evaluate_hand_ranking(tmp_path):
    rk = hand_ranking(tmp_path / "rk")
    res = run_evaluate(rk, None, EvaluateConfig(configs="1:1,3:1,3:2,2:2"))
    assert res.split == "test"
    assert res.per_class == {
        "A": {"1L-1G": 0.0, "3L-1G": 0.25, "3L-2G": 0.5, "2L-2G": 0.5},
        "B": {"1L-1G": 0.0, "3L-1G": 1.0, "3L-2G": 1.0, "2L-2G": 1.0},
    }
    text = (rk / "precision.csv").read_text()
    assert text.splitlines() == [
        "class,1L-1G,3L-1G,3L-2G,2L-2G",
        "A,0.0,0.25,0.5,0.5",
        "B,0.0,1.0,1.0,1.0",
    ]
    s = json.loads((rk / "summary.json").read_text())
    assert s["split"] == "test" and s["protocol"] == "standard"
    assert s["n_images"] == 5 and s["n_classes"] == 2 and s["omitted_classes"] == ["C"]
    assert s["agreement"]["3L-1G"] == {"k": 3, "g": 1, "mean": 0.625, "std": 0.375, "min": 0.25, "max": 1.0}
    assert s["agreement"]["3L-2G"]["std"] == 0.25  # population std (ddof=0)
    table = res.table()
    assert "3L-1G" in table and "0.625 ± 0.375" in table and "omitted" in table and "C" in table

    # all images: A gains a5 (overlap) → 3/5; C appears with its one image → 1.0
    res = run_evaluate(rk, tmp_path / "o2", EvaluateConfig(configs="3:2", split="all"))
    assert res.per_class == {"A": {"3L-2G": 0.6}, "B": {"3L-2G": 1.0}, "C": {"3L-2G": 1.0}}
    assert (tmp_path / "o2" / "precision.csv").exists()


def test_default_split_paper_is_all(tmp_path):
    rk = hand_ranking(tmp_path / "rk", protocol="paper")
    res = run_evaluate(rk, None, EvaluateConfig(configs="3:2"))
    assert res.split == "all" and res.summary["n_images"] == 7 and res.summary["omitted_classes"] == []


def test_evaluate_errors(tmp_path):
    rk = hand_ranking(tmp_path / "rk")
    with pytest.raises(ConceptrankError, match=r"K=4 .*--top-local 3"):
        run_evaluate(rk, None, EvaluateConfig(configs="3:1,4:1"))
    with pytest.raises(ConceptrankError, match=r"G=3 .*--top-global 2"):
        run_evaluate(rk, None, EvaluateConfig(configs="1:3"))
    with pytest.raises(ConceptrankError, match="unknown split"):
        run_evaluate(rk, None, EvaluateConfig(configs="1:1", split="val"))
    with pytest.raises(ConceptrankError, match="rank.json not found"):
        run_evaluate(tmp_path / "nothing", None, EvaluateConfig())


# --------------------------------------------------------------------------------------------
# rank → evaluate on tiny hand-made stage outputs
# --------------------------------------------------------------------------------------------

LABELS = ["sky", "grass", "dog", "sky", "tree", "car", "", "road", "water", "person", "cat", "bird"]


def tiny_world(tmp: Path, seed=0, noise=1.2):
    """3 classes × (8 train + 4 test), 12 units; class ci lifts unit ci a little above the noise."""
    rng = np.random.default_rng(seed)
    cls, spl = [], []
    for c in "abc":
        cls += [c] * 12
        spl += ["train"] * 8 + ["test"] * 4
    mean = (rng.random((36, 12)) * noise).astype(np.float32)
    for i, c in enumerate(cls):
        mean[i, "abc".index(c)] += 1.0
    ex = tmp / "extract"
    ex.mkdir(parents=True)
    np.savez(ex / "activations.npz", mean=mean, max=mean, images=np.array([f"img{i:02d}.jpg" for i in range(36)]),
             classes=np.array(cls), splits=np.array(spl))
    names = [""] + sorted({x for x in LABELS if x})
    best = np.array([[names.index(x)] for x in LABELS])
    iou = np.array([[0.05 + 0.01 * u if x else 0.0] for u, x in enumerate(LABELS)])
    z = np.zeros_like(best)
    (tmp / "dissect").mkdir()
    (tmp / "dissect" / "tally.csv").write_text(format_tally(["object"], best, z, z, z, iou, names))
    return ex, tmp / "dissect" / "tally.csv"


def test_precision_recomputed_from_csvs(tmp_path):
    ex, tally = tiny_world(tmp_path)
    out = tmp_path / "rank"
    run_rank(ex, tally, out, RankConfig(top_local=5, top_global=5, c_grid=(0.01, 1.0), folds=4))
    res = run_evaluate(out, None, EvaluateConfig(configs="1:1,2:1,5:5"))
    local: dict[str, list[tuple[int, str]]] = {}
    img_class = {}
    for r in read_csv(out / "local_concepts.csv"):
        if r["split"] == "test":
            local.setdefault(r["image"], []).append((int(r["rank"]), r["concept"]))
            img_class[r["image"]] = r["class"]
    glob: dict[str, list[tuple[int, str]]] = {}
    for r in read_csv(out / "global_concepts.csv"):
        if r["sign"] == "+":
            glob.setdefault(r["class"], []).append((int(r["rank"]), r["concept"]))
    expect = {}
    for c in "abc":
        imgs = [i for i, cc in img_class.items() if cc == c]
        for k, g in ((1, 1), (2, 1), (5, 5)):
            gs = {x for rank, x in glob.get(c, []) if rank <= g}
            hit = sum(bool({x for rank, x in local[i] if rank <= k} & gs) for i in imgs)
            expect.setdefault(c, {})[f"{k}L-{g}G"] = hit / len(imgs)
    got = {r["class"]: {k: float(v) for k, v in r.items() if k != "class"} for r in read_csv(out / "precision.csv")}
    assert got == expect == res.per_class
    assert [r["class"] for r in read_csv(out / "precision.csv")] == ["a", "b", "c"]
    # the noise makes this non-trivial: not every configuration is a perfect 1.0
    assert min(v for d in expect.values() for v in d.values()) < 1.0


def test_cli_rank_then_evaluate(tmp_path):
    ex, tally = tiny_world(tmp_path, noise=0.5)
    runner = CliRunner()
    out = tmp_path / "rank"
    r = runner.invoke(app, ["rank", "--activations", str(ex), "--tally", str(tally), "--out", str(out), "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "11/12 units labelled" in r.output
    r = runner.invoke(app, ["evaluate", "--ranking", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("5L-1G", "5L-5G", "5L-10G", "10L-10G"):
        assert name in r.output
    assert read_csv(out / "precision.csv")[0].keys() == {"class", "5L-1G", "5L-5G", "5L-10G", "10L-10G"}
    s = json.loads((out / "summary.json").read_text())
    assert s["split"] == "test" and s["n_images"] == 12 and s["n_classes"] == 3
    # bad input: one clear line, exit code 2
    r = runner.invoke(app, ["evaluate", "--ranking", str(out), "--configs", "5:1,5x"])
    assert r.exit_code == 2 and "bad --configs item '5x'" in r.output and "Traceback" not in r.output
    out5 = tmp_path / "rank5"
    r = runner.invoke(app, ["rank", "--activations", str(ex), "--tally", str(tally), "--out", str(out5),
                            "--top-local", "5", "--protocol", "paper"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", "--ranking", str(out5)])  # default 10:10 needs --top-local 10
    assert r.exit_code == 2 and "--top-local 5" in r.output
    r = runner.invoke(app, ["evaluate", "--ranking", str(out5), "--configs", "5:3"])
    assert r.exit_code == 0 and "split all" in r.output
    r = runner.invoke(app, ["rank", "--activations", str(ex), "--tally", str(tally), "--out", str(out5),
                            "--protocol", "bogus"])
    assert r.exit_code == 2 and "unknown protocol 'bogus'" in r.output


def test_evaluate_ranking_in_memory(tmp_path):
    from conceptrank.io.rankings import read_ranking
    from conceptrank.stages.evaluate import (
        AgreementSummary,
        evaluate_ranking,
        load_evaluation_inputs,
    )

    ex, tally = tiny_world(tmp_path)
    run_rank(ex, tally, tmp_path / "rank", RankConfig(top_local=5, top_global=5, c_grid=(0.01, 1.0), folds=4))
    cfg = EvaluateConfig(configs="1:1,5:5", n_perm=50, n_draw=50, n_boot=50, stability_seeds=())
    rk = read_ranking(tmp_path / "rank")
    bare = evaluate_ranking(rk, cfg)  # no activations, tally or SVM given: those scores say why they are missing
    assert bare.out is None and bare.deletion == {"skipped": "the tally was not found"}
    full = evaluate_ranking(rk, cfg, load_evaluation_inputs(rk))
    written = run_evaluate(tmp_path / "rank", None, cfg)
    assert bare.per_class == full.per_class == written.per_class
    assert isinstance(full.agreement["1L-1G"], AgreementSummary) and full.agreement == written.agreement
    assert full.deletion == written.deletion and "G=1" in full.deletion
    assert written.summary == json.loads((tmp_path / "rank" / "summary.json").read_text())
