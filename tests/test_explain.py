"""Tests of conceptrank.stages.explain: exact decision decomposition, faithful heatmaps, files, image names, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conceptrank.cli import app
from conceptrank.errors import ConceptrankError
from conceptrank.io.activations import load_activations
from conceptrank.io.svm import load_svm
from conceptrank.io.tally_csv import format_tally, read_tally
from conceptrank.nn.models import IMAGENET_MEAN, IMAGENET_STD, save_model_card
from conceptrank.nn.nets import ConceptNet
from conceptrank.stages.explain import (
    contribution_maps,
    explain_vector,
    resolve_image,
    run_explain,
)
from conceptrank.stages.extract import ExtractConfig, run_extract
from conceptrank.stages.rank import RankConfig, run_rank

CONCEPTS = ["red-c", "blue-c", "circle", "ring", "wavy", "sky-s"]


@pytest.fixture(scope="module")
def run_dir(tiny_world_nomodel, tmp_path_factory) -> Path:
    """A run folder: random-weight ConceptNet (32 units at layer4), extract, hand tally, rank."""
    run = tmp_path_factory.mktemp("explain_run")
    torch.manual_seed(0)
    net = ConceptNet(num_classes=3, width=8).eval()
    card = save_model_card(run / "model", net, "conceptnet", 3, (32, 32), IMAGENET_MEAN, IMAGENET_STD, {"width": 8})
    run_extract(str(card), None, "layer4", tiny_world_nomodel.target_dir, run / "extract",
                ExtractConfig(workers=0, device="cpu", batch_size=50))
    U = 32
    names = [""] + CONCEPTS
    labels = [CONCEPTS[u % len(CONCEPTS)] if u % 4 != 3 else "" for u in range(U)]  # every 4th unit unlabelled
    best = np.array([[names.index(x)] for x in labels])
    iou = np.array([[0.1 if x else 0.0] for x in labels])
    z = np.zeros_like(best)
    (run / "dissect").mkdir()
    (run / "dissect" / "tally.csv").write_text(format_tally(["object"], best, z, z, z, iou, names))
    run_rank(run / "extract", run / "dissect" / "tally.csv", run / "rank",
             RankConfig(top_local=5, top_global=5, c_grid=(1.0,), folds=3))
    (run / "run.json").write_text(json.dumps({"config": {
        "model": str(card), "weights": None, "layer": "layer4", "target": str(tiny_world_nomodel.target_dir)}}))
    return run


def test_explain_vector_sums_exactly(run_dir):
    act = load_activations(run_dir / "extract")
    svm = load_svm(run_dir / "rank")
    uc = read_tally(run_dir / "dissect" / "tally.csv").concepts(0.04)
    X = act.mean.astype(np.float64)
    with np.load(run_dir / "rank" / "svm.npz") as z:
        decision = ((X - z["scaler_mean"]) / z["scaler_scale"]) @ z["coef"].T + z["intercept"]
    for i in range(0, len(X), 7):
        e = explain_vector(X[i], svm, uc, top=3)
        p = int(decision[i].argmax())
        assert e.predicted == svm.classes[p]
        assert abs(sum(c.contribution for c in e.contributions) + e.remainder + e.bias - decision[i, p]) < 1e-9
        assert abs(e.score - decision[i, p]) < 1e-9
        assert e.runner_up == svm.classes[int(np.argsort(-decision[i])[1])]
        # every unit's contribution belongs to exactly one concept, and they add up to it
        for c in e.contributions:
            assert abs(sum(v for _, v in c.units) - c.contribution) < 1e-12
        assert len(e.for_) <= 3 and len(e.against) <= 3
        # explaining another class's score also adds up
        other = svm.classes[(p + 1) % len(svm.classes)]
        e2 = explain_vector(X[i], svm, uc, klass=other)
        assert abs(e2.total - decision[i, (p + 1) % len(svm.classes)]) < 1e-9


def test_contribution_maps_average_to_contributions():
    rng = np.random.default_rng(0)
    from conceptrank.core.faithfulness import SVMParams

    U = 6
    svm = SVMParams(rng.normal(size=(2, U)), rng.normal(size=2), rng.normal(size=U), rng.random(U) + 0.5, ("a", "b"))
    maps = rng.random((U, 4, 5))
    x = maps.mean(axis=(1, 2))
    uc = [("p", "object", 0.1), ("q", "color", 0.1), ("p", "object", 0.1), None, ("q", "color", 0.1), ("r", "part", 0.1)]
    e = explain_vector(x, svm, uc, klass="b")
    groups = {c.concept: [u for u, _ in c.units] for c in e.contributions}
    cm = contribution_maps(maps, svm, 1, [groups[k] for k in ("p", "q", "r")])
    contrib = {c.concept: c.contribution for c in e.contributions}
    assert cm.shape == (3, 4, 5)
    assert np.allclose(cm.mean(axis=(1, 2)), [contrib["p"], contrib["q"], contrib["r"]], atol=1e-12)


def test_resolve_image():
    images = ["JPEGImages/a_001.jpg", "JPEGImages/b_001.jpg", "cats/x.jpg", "dogs/x.jpg"]
    assert resolve_image("JPEGImages/b_001.jpg", images) == 1
    assert resolve_image("a_001.jpg", images) == 0
    assert resolve_image("dogs/x.jpg", images) == 3
    with pytest.raises(ConceptrankError, match="matches 2 images"):
        resolve_image("x.jpg", images)
    with pytest.raises(ConceptrankError, match="not among the 4 extracted images.*a_001.jpg"):
        resolve_image("a_01.jpg", images)


def test_run_explain_writes_json_and_png(run_dir):
    res = run_explain(run_dir, ["juggling_001.jpg", "JPEGImages/fishing_002.jpg"], top=4)
    assert [ie.image for ie in res.images] == ["JPEGImages/juggling_001.jpg", "JPEGImages/fishing_002.jpg"]
    for ie in res.images:
        assert ie.json_path.exists() and ie.png_path is not None and ie.png_path.exists()
        assert ie.json_path.parent == run_dir / "explain"
        assert ie.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        d = json.loads(ie.json_path.read_text())
        assert d["sum_check"]["abs_error"] < 1e-9
        assert d["predicted"] == ie.explanation.predicted and d["margin"] >= 0
        assert d["activation_check_max_abs_diff"] < 1e-4  # the rerun reproduces activations.npz
        # each heatmap's spatial mean is its concept's contribution
        contrib = d["contributions"]
        for concept, m in zip(d["heatmaps"]["concepts"], d["heatmaps"]["map_means"]):
            assert m == pytest.approx(contrib[concept], abs=1e-4)
        assert all(u["unit"] >= 1 for c in d["for"] for u in c["units"])
    text = res.text()
    assert "predicted" in text and "margin" in text and "for" in text and "bias" in text
    assert str(run_dir / "explain") in text


def test_cli_explain(run_dir):
    runner = CliRunner()
    r = runner.invoke(app, ["explain", "--run", str(run_dir), "cooking_003.jpg"])
    assert r.exit_code == 0, r.output
    assert "JPEGImages/cooking_003.jpg" in r.output and "margin" in r.output
    r = runner.invoke(app, ["explain", "--run", str(run_dir), "nope.jpg"])
    assert r.exit_code == 2 and "not among" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["explain", "--run", str(run_dir / "missing"), "cooking_003.jpg"])
    assert r.exit_code == 2 and "svm.npz" in r.output
