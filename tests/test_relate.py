"""The relate stage: planted region geometry gives a known answer; a run folder gives relations.csv/json."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conceptrank.core.relations import Relation, pair_geometry
from conceptrank.stages.relate import ConceptEdge, RelateConfig, relate_concepts

CONCEPTS = ["bicycle", "red", "road", "wheel"]
B, RED, ROAD, WHEEL = range(4)


def _image(kind: str) -> np.ndarray:
    """(C, 16, 16) regions. 'a': wheel inside bicycle, bicycle beside road, red elsewhere;
    'b': wheel and bicycle far apart, no road, red on the bicycle."""
    m = np.zeros((4, 16, 16), bool)
    m[B, 2:8, 2:8] = True
    if kind == "a":
        m[WHEEL, 3:6, 3:6] = True
        m[ROAD, 2:8, 9:14] = True
        m[RED, 12:15, 0:3] = True
    else:
        m[WHEEL, 12:15, 12:15] = True
        m[RED, 2:8, 2:8] = True
    return m


def _edges():
    rels = [("wheel", "PartOf", "bicycle"), ("bicycle", "AtLocation", "road"), ("bicycle", "HasProperty", "red"),
            ("red", "Antonym", "road")]
    return tuple(ConceptEdge(Relation(*r), 1.0, "test") for r in rels)


def test_planted_geometry_recovers_the_right_relations():
    kinds = ["a"] * 6 + ["b"] * 6
    geom = pair_geometry(np.stack([_image(k) for k in kinds]), radius=2)
    names = [f"{k}{i}.jpg" for i, k in enumerate(kinds)]
    classes = ["A" if k == "a" else "B" for k in kinds]
    top = {"A": CONCEPTS, "B": CONCEPTS}
    truth = {"A": [Relation("wheel", "PartOf", "bicycle"), Relation("bicycle", "AtLocation", "road")],
             "B": [Relation("bicycle", "HasProperty", "red")]}
    res = relate_concepts(_edges(), CONCEPTS, geom, names, classes, top, {n: CONCEPTS for n in names}, truth,
                          RelateConfig(min_support=0.5, draws=20))
    by = {c.klass: c for c in res.classes}
    assert set(by["A"].recovered) == set(truth["A"])
    assert set(by["B"].recovered) == set(truth["B"])
    assert by["A"].precision == 1.0 and by["A"].recall == 1.0 and by["B"].precision == 1.0
    sup = {e.relation.relation: s for e, s, _, _ in by["A"].candidates}
    assert sup["PartOf"] == 1.0 and sup["HasProperty"] == 0.0 and np.isnan(sup["Antonym"])  # negatives not grounded
    assert res.summary["precision"] == 1.0 and res.summary["recall"] == 1.0
    per_image = {n: dict((e.relation.relation, s) for e, s in found) for n, _, found in res.images}
    assert per_image["a0.jpg"]["PartOf"] == 1.0 and per_image["b6.jpg"]["PartOf"] == 0.0
    assert np.isnan(per_image["b6.jpg"]["AtLocation"])  # no road in b images: not present, no score
    assert res.summary["chance_precision"] < 1.0


def test_enrichment_rejects_a_relation_that_fits_everywhere():
    kinds = ["a"] * 4 + ["b"] * 4
    ims = []
    for k in kinds:
        m = _image(k)
        m[RED, 2:8, 2:8] = True  # red on the bicycle in every image of both classes
        ims.append(m)
    geom = pair_geometry(np.stack(ims), radius=2)
    names = [f"{k}{i}" for i, k in enumerate(kinds)]
    classes = ["A" if k == "a" else "B" for k in kinds]
    res = relate_concepts(_edges(), CONCEPTS, geom, names, classes, {"A": CONCEPTS, "B": CONCEPTS}, {}, None,
                          RelateConfig(min_support=0.5, min_enrichment=1.5))
    rec = {c.klass: {r.relation for r in c.recovered} for c in res.classes}
    assert "HasProperty" not in rec["A"] and "HasProperty" not in rec["B"]
    assert "PartOf" in rec["A"]


# -- a run folder --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tiny_world_nomodel, tmp_path_factory) -> Path:
    from conceptrank.io.tally_csv import format_tally
    from conceptrank.nn.models import IMAGENET_MEAN, IMAGENET_STD, save_model_card
    from conceptrank.nn.nets import ConceptNet
    from conceptrank.stages.extract import ExtractConfig, run_extract
    from conceptrank.stages.rank import RankConfig, run_rank
    from conceptrank.synthetic.knowledge import write_knowledge

    run = tmp_path_factory.mktemp("relate_run")
    world = run / "world"
    world.mkdir()
    shutil.copy(tiny_world_nomodel.truth_path, world / "truth.json")
    write_knowledge(world, seed=3, size=32, images_per_class=10)
    torch.manual_seed(0)
    net = ConceptNet(num_classes=3, width=8).eval()
    card = save_model_card(run / "model", net, "conceptnet", 3, (32, 32), IMAGENET_MEAN, IMAGENET_STD, {"width": 8})
    run_extract(str(card), None, "layer4", tiny_world_nomodel.target_dir, run / "extract",
                ExtractConfig(workers=0, device="cpu", batch_size=50))
    concepts = ["red-c", "blue-c", "circle", "ring", "wavy", "sky-s", "rim", "triangle"]
    names = [""] + concepts
    labels = [concepts[u % len(concepts)] for u in range(32)]
    best = np.array([[names.index(x)] for x in labels])
    iou = np.full((32, 1), 0.1)
    z = np.zeros_like(best)
    (run / "dissect").mkdir()
    (run / "dissect" / "tally.csv").write_text(format_tally(["object"], best, z, z, z, iou, names))
    np.save(run / "dissect" / "thresholds.npy", np.zeros(32))
    run_rank(run / "extract", run / "dissect" / "tally.csv", run / "rank",
             RankConfig(top_local=5, top_global=6, c_grid=(1.0,), folds=3))
    (run / "run.json").write_text(json.dumps({"config": {
        "model": str(card), "weights": None, "layer": "layer4", "target": str(tiny_world_nomodel.target_dir),
        "truth": str(world / "truth.json")}}))
    return run


def test_run_relate_writes_consistent_outputs(run_dir):
    from conceptrank.stages.relate import CSV_HEADER, run_relate

    res = run_relate(run_dir, RelateConfig(draws=10))
    with open(run_dir / "relate" / "relations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_HEADER
    with open(run_dir / "rank" / "global_concepts.csv", newline="") as f:
        top = {}
        for r in csv.DictReader(f):
            if r["sign"] == "+":
                top.setdefault(r["class"], set()).add(r["concept"])
    kg = {tuple(r) for r in json.loads((run_dir / "world" / "truth.json").read_text())["relations"]["world"]}
    class_rows = [r for r in rows if r["scope"] == "class"]
    assert class_rows and any(r["scope"] == "image" for r in rows)
    for r in class_rows:
        assert {r["head"], r["tail"]} <= top[r["where"]]
        if r["support"]:
            assert 0.0 <= float(r["support"]) <= 1.0
    assert any((r["head"], r["relation"], r["tail"]) in kg for r in class_rows)
    doc = json.loads((run_dir / "relate" / "relations.json").read_text())
    assert doc["kg"]["format"] == "conceptnet" and doc["summary"]["classes_with_truth"] >= 1
    assert set(doc["unmatched_concepts"]) == set(res.unmatched)
    assert "precision" in res.summary()


def test_cli_relate_and_bad_kg(run_dir, tmp_path):
    from conceptrank.cli import app

    r = CliRunner().invoke(app, ["relate", "--run", str(run_dir)])
    assert r.exit_code == 0, r.output
    assert "[relate]" in r.output and "relations.csv" in r.output
    bad = tmp_path / "kg.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00broken")
    r = CliRunner().invoke(app, ["relate", "--run", str(run_dir), "--kg", str(bad)])
    assert r.exit_code == 2 and "kg.csv.gz" in r.output
    r = CliRunner().invoke(app, ["relate", "--run", str(run_dir), "--split", "val"])
    assert r.exit_code == 2 and "--split" in r.output


def test_explain_lists_the_relations_that_hold_in_the_image(run_dir):
    from conceptrank.stages.explain import run_explain
    from conceptrank.stages.relate import image_relations, run_relate

    run_relate(run_dir, RelateConfig(draws=5))
    with open(run_dir / "relate" / "relations.csv", newline="") as f:
        image = next(r["where"] for r in csv.DictReader(f) if r["scope"] == "image" and r["grounding_score"])
    res = run_explain(run_dir, [image])
    record = json.loads(res.images[0].json_path.read_text())
    expected = [x for x in image_relations(run_dir, image) if x["fits"]]
    assert record["relations"] == expected
    if expected:
        assert any(n.startswith("relations that hold in it:") for n in res.images[0].notes)


def test_rerun_reuses_the_geometry_and_writes_the_same_bytes(run_dir):
    from conceptrank.stages.relate import run_relate

    run_relate(run_dir, RelateConfig(draws=5))
    first = (run_dir / "relate" / "relations.csv").read_bytes()
    again = run_relate(run_dir, RelateConfig(draws=5))
    assert any("reused" in n for n in again.notes)
    assert (run_dir / "relate" / "relations.csv").read_bytes() == first
    (run_dir / "relate" / "geometry.json").write_text("{}")  # a stale manifest recomputes
    assert not any("reused" in n for n in run_relate(run_dir, RelateConfig(draws=5)).notes)
    assert (run_dir / "relate" / "relations.csv").read_bytes() == first


def test_the_worlds_own_regions_recover_the_planted_relations():
    """Grounding with perfect detectors: the concepts' regions are the rendered label maps. Every KG
    edge among all the world's concepts is a candidate; the planted ones must come out."""
    from conceptrank.core.relations import oriented
    from conceptrank.synthetic import world as W
    from conceptrank.synthetic.knowledge import false_relations, negative_relations, planted_relations, world_relations

    vocab = W.concept_vocabulary()
    concepts = list(vocab.names[1:])
    idx = {c: i for i, c in enumerate(concepts)}
    masks, names, classes = [], [], []
    for ci, (cls, _) in enumerate(W.TARGET_CLASSES):
        for i in range(16):
            sc = W.target_scene(0, ci, i, 48)
            m = np.zeros((len(concepts), 48, 48), bool)
            for planes in sc.planes.values():
                for p in planes:
                    for v in np.unique(p[p > 0]):
                        m[idx[vocab.names[v]]] |= p == v
            for labs in sc.image_labels.values():
                for v in labs:
                    m[idx[vocab.names[v]]] = True
            masks.append(m)
            names.append(f"{cls}_{i}")
            classes.append(cls)
    planted = planted_relations()
    triples = set(world_relations()) | {r for rs in planted.values() for r in rs} | set(false_relations(planted))
    edges = tuple(ConceptEdge(oriented(*t), 1.0, "w") for t in sorted(triples | set(negative_relations())))
    truth = {c: [oriented(*r) for r in rs] for c, rs in planted.items()}
    res = relate_concepts(edges, concepts, pair_geometry(np.stack(masks), 3), names, classes,
                          {c: concepts for c in planted}, {}, truth, RelateConfig(min_support=0.5, draws=20))
    assert res.summary["precision"] >= 0.8 and res.summary["recall"] >= 0.8
    assert res.summary["kg_only_precision"] < 0.1  # the KG alone, among all concepts, is mostly wrong


def test_an_image_level_concept_covers_its_whole_image_once_a_unit_fires():
    """Regions by hand: unit 0 (object) fires on one cell, unit 1 (a scene) on one cell of image 0 only;
    the scene's region is all of image 0 and nothing of image 1, the object's stays its upsampled cell."""
    from conceptrank.core.upsample import upsample_bilinear
    from conceptrank.stages.relate import _concept_masks

    maps = np.zeros((2, 3, 4, 4), np.float32)
    maps[:, 0, 1, 1] = 5.0
    maps[0, 1, 3, 3] = 5.0
    thresholds = np.array([1.0, 1.0, 1.0])
    unit_concept = np.array([0, 1, -1])
    masks = _concept_masks(maps, thresholds, unit_concept, np.array([False, True]), (16, 16))
    obj = upsample_bilinear(torch.from_numpy(maps[:, 0]), (16, 16)).numpy() > 1.0
    assert masks.shape == (2, 2, 16, 16)
    np.testing.assert_array_equal(masks[:, 0], obj)
    assert masks[0, 1].all() and not masks[1, 1].any() and 0 < obj[0].sum() < 256


def test_image_level_labels_are_the_probe_sets_scalar_labels_scenes_and_textures(tiny_world_nomodel):
    from conceptrank.io.broden import BrodenDataset
    from conceptrank.synthetic.world import SCENES, TEXTURES

    found = BrodenDataset(tiny_world_nomodel.probe_dir).image_level_labels()
    assert found <= frozenset(SCENES + TEXTURES) and found & set(SCENES) and found & set(TEXTURES)
