"""The synthetic world's knowledge graph: ConceptNet format, true/false relations from the world's tables,
per-image truth checked against the rendered scenes."""

from __future__ import annotations

import gzip
import json

from conceptrank.core.relations import is_negative
from conceptrank.io.kg import load_kg, map_concepts
from conceptrank.synthetic import world as W
from conceptrank.synthetic.knowledge import false_relations, planted_relations, world_relations


def test_tables_give_true_planted_and_false_relations():
    planted = planted_relations()
    assert ("circle", "HasProperty", "red-c") in planted["juggling"]
    assert ("ring", "AtLocation", "ocean-s") in planted["fishing"]
    truth = {r for rs in planted.values() for r in rs} | set(world_relations())
    false = false_relations(planted)
    assert false and not (set(false) & truth)
    for p, r, s in world_relations():
        assert p in W.OBJECT_PARTS[s]
    for p, r, s in false:
        if r == "PartOf":
            assert p not in W.OBJECT_PARTS[s]  # a part the shape cannot carry
    for cls, concepts in W.TARGET_CLASSES:
        for h, _, t in planted[cls]:
            assert h in concepts and t in concepts


def test_built_world_writes_the_kg_and_image_truth(tiny_world):
    root = tiny_world.out
    lines = gzip.decompress((root / "knowledge.csv.gz").read_bytes()).decode().splitlines()
    assert all(len(x.split("\t")) == 5 and json.loads(x.split("\t")[4])["weight"] == 1.0 for x in lines)
    truth = json.loads((root / "truth.json").read_text())
    rel = truth["relations"]
    concepts = [n for _, n, _ in W.concept_vocabulary().labels]
    m = map_concepts(concepts)
    kg = load_kg(root / "knowledge.csv.gz", m.term_set())
    assert kg.malformed == 0 and not kg.unknown_relations
    edges = {(e.head, e.relation, e.tail) for e in kg.edges}
    to_term = m.terms
    for h, r, t in rel["world"] + rel["false"] + [x for xs in rel["planted"].values() for x in xs]:
        assert (to_term[h], r, to_term[t]) in edges
    assert any(is_negative(r) for _, r, _ in edges)
    assert set(rel["images"]) == set(truth["images"])
    for ci, (cls, _) in enumerate(W.TARGET_CLASSES[:3]):
        for i in range(3):
            sc = W.target_scene(tiny_world.seed, ci, i, tiny_world.size)
            visible = [o.spec for o in sc.objects if o.visible > 0]
            for h, r, t in rel["images"][f"{cls}_{i + 1:03d}.jpg"]:
                assert h in sc.concepts and t in sc.concepts
                if r == "HasProperty":
                    assert any(o.shape == h and o.color == t for o in visible)
                elif r == "PartOf":
                    assert any(o.shape == t and h in o.parts for o in visible)
                elif r == "AtLocation":
                    assert sc.spec.scene == t and any(o.shape == h for o in visible)
    for cls, shares in rel["class_share"].items():
        assert all(0.0 <= v <= 1.0 for v in shares.values())
