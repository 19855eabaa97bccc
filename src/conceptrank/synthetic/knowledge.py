"""The synthetic world's own knowledge graph, derived from the world's declarative tables.

:func:`write_knowledge` writes ``world/knowledge.csv.gz`` in the ConceptNet 5.7 assertions format
(see ``shared/spec/knowledge-graph-formats.md``) and adds a ``relations`` section to ``truth.json``.
The graph holds

- relations **true in the world**: every part an object of a shape can carry (``rim PartOf circle``,
  from the parts table), and per target class the relations between its planted concepts — its
  first planted object's colour (``circle HasProperty red``), material (``circle MadeOf dotted``)
  and planted part (``stem PartOf diamond``), and its planted objects at its scene
  (``ring AtLocation ocean``);
- **plausible relations that are false in it**: parts on shapes that cannot carry them
  (``core PartOf ring``), and each planted relation with its tail or head swapped for another
  class's planted concept of the same kind (``circle HasProperty blue``);
- a few negative ones (``black Antonym white``, colours ``DistinctFrom`` each other).

Every edge has weight 1.0, true or false, so the weights say nothing about the truth. Terms are
the concepts' KG terms (:func:`conceptrank.io.kg.mapping.normalise_concept`: ``red-c`` → ``red``).

``truth.json["relations"]`` records ``planted`` (class → relations), ``world`` (true everywhere),
``false`` (in the KG, false in the world), ``images`` (image → the relations that hold in it: of
each visible object its colour, material, parts and scene) and ``class_share`` (class → share of
its images in which each planted relation holds). Relations are ``[head, relation, tail]`` in
concept names.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Mapping, Sequence

from conceptrank.io.cache import atomic_write
from conceptrank.io.kg.mapping import normalise_concept
from conceptrank.synthetic import world as W

__all__ = ["planted_relations", "world_relations", "false_relations", "negative_relations",
           "image_relations", "knowledge_lines", "write_knowledge", "KNOWLEDGE_FILE"]

KNOWLEDGE_FILE = "knowledge.csv.gz"
Triple = tuple[str, str, str]


def _object_parts() -> Mapping[str, tuple[str, ...]]:
    """Shape → the parts its objects can carry (the world's ``OBJECT_PARTS`` table)."""
    return dict(W.OBJECT_PARTS)


def _by_category(concepts: Sequence[str]) -> dict[str, list[str]]:
    cat = W.concept_vocabulary().category
    out: dict[str, list[str]] = {}
    for c in concepts:
        out.setdefault(cat[c], []).append(c)
    return out


def planted_relations(classes=None) -> dict[str, list[Triple]]:
    """Class → the relations among its planted concepts (on its first planted object; all at its scene)."""
    out = {}
    for cls, concepts in (classes or W.TARGET_CLASSES):
        g = _by_category(concepts)
        shapes = g.get("object", [])
        rels: list[Triple] = []
        if shapes:
            first = shapes[0]
            rels += [(first, "HasProperty", c) for c in g.get("color", [])[:1]]
            rels += [(first, "MadeOf", m) for m in g.get("material", [])[:1]]
            rels += [(p, "PartOf", first) for p in g.get("part", [])[:1]]
            rels += [(s, "AtLocation", sc) for s in shapes for sc in g.get("scene", [])[:1]]
        out[cls] = rels
    return out


def world_relations() -> list[Triple]:
    """Relations true of every object: each part a shape can carry is PartOf it."""
    return [(p, "PartOf", s) for s, parts in _object_parts().items() for p in parts]


def false_relations(planted: Mapping[str, list[Triple]] | None = None) -> list[Triple]:
    """Plausible relations that are false in the world (see the module docstring)."""
    planted = planted or planted_relations()
    parts = _object_parts()
    out = [(p, "PartOf", s) for s in W.SHAPES for p in W.PARTS if p not in parts[s]]
    truth = {r for rs in planted.values() for r in rs}
    kinds: dict[str, list[str]] = {}
    for h, r, t in sorted(truth):
        kinds.setdefault(r, [])
        if t not in kinds[r]:
            kinds[r].append(t)
    heads = sorted({h for h, r, _ in truth if r != "PartOf"})
    for h, r, t in sorted(truth):
        if r == "PartOf":
            continue
        tails = kinds[r]
        i = tails.index(t)
        for k in (1, 2):
            alt = tails[(i + k) % len(tails)]
            if (h, r, alt) not in truth:
                out.append((h, r, alt))
        alt_h = heads[(heads.index(h) + 1) % len(heads)]
        if (alt_h, r, t) not in truth:
            out.append((alt_h, r, t))
    seen, uniq = set(), []
    for x in out:
        if x not in seen and x not in truth:
            seen.add(x)
            uniq.append(x)
    return uniq


def negative_relations() -> list[Triple]:
    colors = [c for c, _ in W.COLORS]
    out = [("black-c", "Antonym", "white-c")] if {"black-c", "white-c"} <= set(colors) else []
    out += [(a, "DistinctFrom", b) for a, b in zip(colors, colors[1:])]
    return out


def image_relations(scene) -> list[Triple]:
    """The relations that hold in a rendered scene: per visible object its colour, material, parts, scene."""
    seen = scene.concepts
    scene_name = scene.spec.scene
    out = set()
    for o in scene.objects:
        if o.visible <= 0:
            continue
        s = o.spec
        cand = [(s.shape, "HasProperty", s.color)]
        if s.material is not None:
            cand.append((s.shape, "MadeOf", s.material))
        cand += [(p, "PartOf", s.shape) for p in s.parts]
        if scene_name is not None:
            cand.append((s.shape, "AtLocation", scene_name))
        out.update(r for r in cand if r[0] in seen and r[2] in seen)
    return sorted(out)


def _node(concept: str) -> str:
    pos = "a" if W.concept_vocabulary().category.get(concept) == "color" else "n"
    return f"/c/en/{normalise_concept(concept)}/{pos}"


def knowledge_lines(triples: Sequence[Triple]) -> list[str]:
    """ConceptNet 5.7 assertion lines (edge URI, relation, start, end, JSON info) for the triples."""
    lines = []
    for h, r, t in triples:
        start, end = _node(h), _node(t)
        edge = f"/a/[/r/{r}/,{start.rsplit('/', 1)[0]}/,{end.rsplit('/', 1)[0]}/]"
        info = {"dataset": "/d/conceptrank/synthetic", "license": "cc:by/4.0",
                "sources": [{"contributor": "/s/resource/conceptrank/synthetic-world"}],
                "surfaceText": f"[[{normalise_concept(h)}]] {r} [[{normalise_concept(t)}]]", "weight": 1.0}
        lines.append("\t".join([edge, f"/r/{r}", start, end, json.dumps(info, sort_keys=True)]))
    return lines


def _class_image_truth(seed: int, size: int, ci: int, images_per_class: int) -> dict[str, list[Triple]]:
    cls = W.TARGET_CLASSES[ci][0]
    return {f"{cls}_{i + 1:03d}.jpg": image_relations(W.target_scene(seed, ci, i, size)) for i in range(images_per_class)}


def _image_truth(seed: int, size: int, images_per_class: int) -> dict[str, list[Triple]]:
    out: dict[str, list[Triple]] = {}
    chunks = [(seed, size, ci, images_per_class) for ci in range(len(W.TARGET_CLASSES))]
    for part in W._in_processes(_class_image_truth, chunks):  # each class redrawn in a worker
        out.update(part)
    return out


def write_knowledge(out: str | Path, *, seed: int, size: int, images_per_class: int) -> Path:
    """Write ``out/knowledge.csv.gz`` and the ``relations`` section of ``out/truth.json``; return the KG path."""
    out = Path(out)
    planted = planted_relations()
    true_world = world_relations()
    false = false_relations(planted)
    planted_all = sorted({r for rs in planted.values() for r in rs})
    triples = sorted(set(true_world) | set(planted_all) | set(false) | set(negative_relations()))
    data = ("\n".join(knowledge_lines(triples)) + "\n").encode("utf-8")
    path = out / KNOWLEDGE_FILE
    with atomic_write(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    images = _image_truth(seed, size, images_per_class)
    share = {}
    for cls, rels in planted.items():
        names = [n for n in images if n.startswith(cls + "_") and n[len(cls) + 1:-4].isdigit()]
        share[cls] = {"|".join(r): sum(r in set(images[n]) for n in names) / max(len(names), 1) for r in rels}
    truth_path = out / "truth.json"
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    truth["relations"] = {
        "kg": KNOWLEDGE_FILE,
        "planted": {c: [list(r) for r in rs] for c, rs in planted.items()},
        "world": [list(r) for r in true_world],
        "false": [list(r) for r in false],
        "images": {n: [list(r) for r in rs] for n, rs in images.items()},
        "class_share": share,
    }
    with atomic_write(truth_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(truth, indent=1) + "\n")
    return path
