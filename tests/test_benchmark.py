"""The ranker benchmark (stages/benchmark.py): its table on a planted world, and the command end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_rankers import BANK, CONCEPTS, _activations, _class_presence

from conceptrank.core.groundtruth import Truth
from conceptrank.core.rankers import RANKERS, ProbeActivations
from conceptrank.stages.benchmark import (
    BenchmarkConfig,
    WorldData,
    benchmark_world,
    format_table,
    summarize_rows,
    winner,
)

CATS = {"red": "color", "circle": "object", "sky": "color", "loud": "color"}


@pytest.fixture(scope="module")
def planted_world():
    rng = np.random.default_rng(5)
    present, y = _class_presence(20, rng)
    mean, mx = _activations(present, rng)
    splits = np.array(["train", "test"] * (len(y) // 2))
    images = np.array([f"JPEGImages/{c}_{i:03d}.jpg" for i, c in enumerate(y)])
    probe_present = rng.random((200, 4)) < 0.5
    pm, px = _activations(probe_present, rng)
    truth = Truth({"A": ("red",), "B": ("circle",), "C": ("sky",)},
                  {f"{c}_{i:03d}.jpg": frozenset(np.array(CONCEPTS)[present[i]]) for i, c in enumerate(y)}, CATS)
    return WorldData("planted", mean, mx, y, splits, images, BANK, ProbeActivations(pm, px, probe_present, CONCEPTS), truth)


def test_table_on_a_planted_world(planted_world):
    cfg = BenchmarkConfig(k=2, depth=1, folds=2, n_draw=4000, n_perm=200, n_random=5)
    rows = benchmark_world(planted_world, cfg)
    assert [r["ranker"] for r in rows] == list(RANKERS) + ["random", "best reachable"]
    mean = summarize_rows(rows)
    by = {r["ranker"]: r for r in mean}
    # best reachable: every planted concept is labelled; local: min(2, |visible|) / 2 per test image
    test = planted_world.splits == "test"
    visible = [len(planted_world.truth.images[i.split("/")[-1]]) for i in planted_world.images[test]]
    assert by["best reachable"]["p_at_1"] == 1.0 and by["best reachable"]["r_precision"] == 1.0
    assert by["best reachable"]["local_p_at_k"] == pytest.approx(np.mean([min(2, v) / 2 for v in visible]))
    # random top concept ∝ labelled units (red 2, circle 2, sky 1, loud 1): (2 + 2 + 1) / 6 / 3
    assert by["random"]["p_at_1"] == pytest.approx(5 / 18, abs=0.02)
    for name in ("presence", "net2vec", "ibd", "tcav"):
        assert by[name]["p_at_1"] == 1.0 and by[name]["r_precision_of_best"] == 1.0
    assert by["net2vec"]["local_p_at_k"] > by["paper"]["local_p_at_k"]  # the loud unit fools raw means
    assert by["paper"]["stability"] <= 1.0 and by["net2vec"]["agreement"] > 0.5
    table = format_table(mean, 2)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["ranker", "P@1", "R-prec"] and "P@2" in lines[0]
    assert [ln.split()[0] for ln in lines[1:] if not ln.startswith("-")] == list(RANKERS) + ["random", "best"]
    assert winner(mean) in ("presence", "net2vec")


def test_benchmark_command_on_a_tiny_world(tiny_world, tmp_path):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    out = tmp_path / "bench"
    args = ["benchmark-rankers", "--out", str(out), "--seeds", "4,5", "--model", str(tiny_world.model_dir),
            "--size", "32", "--probe-images", "60", "--images-per-class", "10", "--k", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "winner:" in res.output and "best reachable" in res.output
    with open(out / "benchmark.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (len(RANKERS) + 2)  # two worlds and their mean
    assert {r["world"] for r in rows} == {"seed 4", "seed 5", "mean"}
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["winner"] in RANKERS and summary["config"]["seeds"] == [4, 5]
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(app, args)  # worlds, dissections, extractions reused: same numbers
    assert again.exit_code == 0
    with open(out / "benchmark.csv", newline="") as f:
        rerun = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    assert rerun == [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_bad_options_are_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    res = CliRunner().invoke(app, ["benchmark-rankers", "--out", str(tmp_path), "--rankers", "paper,magic"])
    assert res.exit_code == 2 and "unknown ranker" in res.output
    res = CliRunner().invoke(app, ["benchmark-rankers", "--out", str(tmp_path), "--seeds", "1,x"])
    assert res.exit_code == 2 and "--seeds" in res.output
