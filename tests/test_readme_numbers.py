"""The README's results paragraph is rebuilt from a demo run's files and must match word for word."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_readme", ROOT / "bench" / "check_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root: Path, detectors: int = 101) -> Path:
    def put(rel: str, data: dict) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))

    put("world/model/model.json", {"source_task": {"heldout_accuracy": {
        "shape": 0.812, "color": 0.9, "material": 0.7, "scene": 0.99}}})
    put("dissect/dissect.json", {"counts": {"units": 128, "detectors": detectors, "concepts": 41, "unique_concepts": {
        "color": 10, "object": 9, "part": 5, "material": 5, "scene": 11, "texture": 1}}})
    put("rank/classifier.json", {"test_accuracy": 0.8375})
    put("rank/rank.json", {"ranker": "net2vec"})
    put("rank/summary.json", {
        "n_classes": 10,
        "agreement": {"5L-1G": {"mean": 0.61, "std": 0.2}, "10L-10G": {"mean": 1.0, "std": 0.0}},
        "baselines": {"n_permutations": 1000,
                      "5L-1G": {"permutation_lift": 2.04, "permutation_p": 1 / 1001},
                      "10L-10G": {"permutation_mean": 0.999}},
        "deletion": {"G=1": {"ratio": 7.26}},
        "ground_truth": {"global": {"G=1": {"precision": 0.8, "random_precision": 0.104}}},
    })
    return root


def test_paragraph_numbers_come_from_the_run(tmp_path):
    ck = _checker()
    text = ck.results_paragraph(_fake_run(tmp_path / "run"))
    for expected in ("0.81 on shapes", "labels 101 of its 128", "41 distinct concepts", "part 5", "0.84 test accuracy",
                     "the `net2vec` ranker", "0.61 ± 0.20 at 5L-1G", "2.0× chance", "p ≤ 0.001", "chance gives 1.00", "7.3× more",
                     "for 8 of 10 classes", "random concepts: 1.0 of 10"):
        assert expected in text, expected


def test_a_stale_number_fails_and_write_fixes_it(tmp_path):
    ck = _checker()
    run = _fake_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n" + ck._wrap(ck.results_paragraph(run)) + "\n\n## next\n")
    assert ck.check(run, readme) == []
    _fake_run(run, detectors=99)  # the demo moved a number; the README did not
    diff = ck.check(run, readme)
    assert "-101" in diff and "+99" in diff
    assert ck.main([str(run), "--readme", str(readme)]) == 1
    assert ck.main([str(run), "--readme", str(readme), "--write"]) == 0
    assert ck.check(run, readme) == [] and readme.read_text().endswith("\n\n## next\n")


def test_missing_run_files_say_what_to_do(tmp_path):
    ck = _checker()
    with pytest.raises(SystemExit, match="make demo"):
        ck.results_paragraph(tmp_path)


def test_relation_numbers_join_the_paragraph_when_the_run_has_them(tmp_path):
    ck = _checker()
    run = _fake_run(tmp_path / "run")
    assert "relations" not in ck.results_paragraph(run)
    (run / "relate").mkdir()
    (run / "relate" / "relations.json").write_text(json.dumps({"summary": {
        "precision": 0.857, "recall": 0.6, "chance_precision": 0.2, "chance_recall": 0.031}}))
    text = ck.results_paragraph(run)
    assert "precision 0.86 and recall 0.60" in text and "random relations: 0.20 and 0.03" in text
    assert text.endswith("0.03).")
