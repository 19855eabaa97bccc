"""The CLI end to end on a tiny synthetic world: dissect → extract → rank → evaluate → report, and
`run CONFIG.toml`; every stage's outputs exist with their columns, and precision.csv is exactly what
the two ranking CSVs give by hand."""

import csv
import json
from collections import defaultdict

import pytest
from typer.testing import CliRunner

from conceptrank.cli import app

runner = CliRunner()


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_dir(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    model, probe, target = tiny_world.model_dir, tiny_world.probe_dir, tiny_world.target_dir
    _ok(["dissect", "--model", model, "--layer", "layer4", "--probe", probe, "--out", out / "dissect",
         "--workers", "0", "--quantile", "0.02"])
    _ok(["extract", "--model", model, "--layer", "layer4", "--dataset", target, "--out", out / "extract",
         "--workers", "0"])
    # a low IoU bar so that the barely trained model still gives concepts to rank
    _ok(["rank", "--activations", out / "extract", "--tally", out / "dissect" / "tally.csv", "--out",
         out / "rank", "--min-iou", "0.0001"])
    text = _ok(["evaluate", "--ranking", out / "rank", "--truth", tiny_world.truth_path, "--permutations", "200",
                "--no-faithfulness"])
    assert "5L-1G" in text and "10L-10G" in text
    return out


def test_stage_outputs(run_dir):
    tally = _rows(run_dir / "dissect" / "tally.csv")
    assert list(tally[0])[:4] == ["unit", "category", "label", "score"] and len(tally) == 128
    for f in ["dissect/thresholds.npy", "dissect/dissect.json", "extract/activations.npz", "extract/skipped.csv",
              "rank/classifier.json", "rank/rankings.json", "rank/summary.json", "rank/svm.npz"]:
        assert (run_dir / f).exists(), f
    assert list(_rows(run_dir / "rank" / "local_concepts.csv")[0]) == [
        "image", "class", "split", "rank", "concept", "category", "unit", "score"]
    assert list(_rows(run_dir / "rank" / "global_concepts.csv")[0]) == [
        "class", "rank", "concept", "category", "unit", "weight", "sign"]
    clf = json.loads((run_dir / "rank" / "classifier.json").read_text())
    assert len(clf["confusion_matrix"]) == 10 and clf["evaluated_split"] == "test"


def test_precision_csv_recomputed_by_hand(run_dir):
    """Formula 2 from local_concepts.csv and global_concepts.csv equals precision.csv exactly."""
    local = defaultdict(list)
    image_class = {}
    for r in _rows(run_dir / "rank" / "images.csv"):
        if r["split"] == "test":
            image_class[r["image"]] = r["class"]
    for r in _rows(run_dir / "rank" / "local_concepts.csv"):
        local[r["image"]].append((int(r["rank"]), r["concept"]))
    glob = defaultdict(list)
    for r in _rows(run_dir / "rank" / "global_concepts.csv"):
        if r["sign"] == "+":
            glob[r["class"]].append((int(r["rank"]), r["concept"]))
    prec = {r["class"]: r for r in _rows(run_dir / "rank" / "precision.csv")}
    for k, g in [(5, 1), (5, 5), (5, 10), (10, 10)]:
        for cls, row in prec.items():
            imgs = [i for i, c in image_class.items() if c == cls]
            top_g = {c for _, c in sorted(glob[cls])[:g]}
            hits = sum(bool({c for _, c in sorted(local[i])[:k]} & top_g) for i in imgs)
            assert float(row[f"{k}L-{g}G"]) == pytest.approx(hits / len(imgs), abs=1e-12)


def test_report_and_run_config(run_dir, tiny_world, tmp_path):
    out = _ok(["report", "--run", run_dir])
    assert (run_dir / "report.html").exists() and "report" in out
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'out = "{tmp_path / "r"}"\n[model]\nname = "{tiny_world.model_dir}"\nlayer = "layer4"\n'
        f'[probe]\npath = "{tiny_world.probe_dir}"\nquantile = 0.02\n[target]\npath = "{tiny_world.target_dir}"\n'
        '[rank]\nprotocol = "paper"\nmin_iou = 0.0001\n[evaluate]\nconfigs = "5:1,10:10"\n'
        '[run]\nworkers = 0\nreport = false\n'
    )
    text = _ok(["run", cfg])
    assert "protocol paper" in text
    assert [c for c in _rows(tmp_path / "r" / "rank" / "precision.csv")[0]] == ["class", "5L-1G", "10L-10G"]


def test_a_relate_failure_beside_the_rules_still_leaves_the_evaluation(tmp_path, monkeypatch):
    """demo runs relate in a thread beside the rules: its error is raised after the evaluation (with
    the rules' numbers) is written, as when relate ran after evaluate."""
    import conceptrank.stages.relate as relate
    from conceptrank.errors import ConceptrankError
    from conceptrank.pipeline import run_demo

    def broken(*a, **k):
        raise ConceptrankError("the knowledge graph is broken")

    monkeypatch.setattr(relate, "run_relate", broken)
    lines: list[str] = []
    with pytest.raises(ConceptrankError, match="knowledge graph is broken"):
        run_demo(tmp_path / "demo", quick=True, echo=lines.append)
    summary = json.loads((tmp_path / "demo" / "rank" / "summary.json").read_text())
    assert summary["rules"]["learner"] == "ripper" and (tmp_path / "demo" / "rules" / "rules.json").is_file()
    assert any(line.startswith("agreement (Formula 2)") for line in lines)
    assert not (tmp_path / "demo" / "relate" / "relations.json").exists()
