"""Relations between ranked concepts from a knowledge graph, grounded in the model's own activation maps.

Per class, the KG relations among its top-G global concepts; per image, among its top-K local ones;
the AICS'24 *coverage* of a class's local relations by its global ones (the share of the distinct
relations found among its images' local concepts that are also among its global ones).

**Grounding.** For every image of the grounding split, each concept's region is the union of its
units' upsampled maps above their dissection thresholds (``dissect/thresholds.npy``, the maps
recomputed with the run's model); an image-level concept of the probe set (Broden's scenes, labelled
per image, not per pixel) covers the whole image once one of its units fires there. A relation fits an image when both concepts are present and their
regions sit as the relation says (:mod:`conceptrank.core.relations`: PartOf / HasA — the part inside
the whole; HasProperty / MadeOf — overlap; AtLocation / LocatedNear — co-presence or adjacency) with
a score ≥ ``min_fit``. A class's **support** for a relation is the share of its images in which it
fits; a relation is *recovered* for a class when it joins two of the class's top-G concepts and its
support is ≥ ``min_support``.

**Chance.** The same procedure on random relations: each candidate's ends replaced by concepts of
the same KG degree (:func:`conceptrank.core.relations.degree_matched_chance`).

:func:`relate_concepts` is the pure part; :func:`run_relate` reads a run folder, computes, and
writes ``RUN/relate/relations.csv`` and ``RUN/relate/relations.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, Mapping, Sequence

import numpy as np

from conceptrank.core.ranking import protocol_min_iou
from conceptrank.core.relations import (
    PairGeometry,
    Relation,
    coverage,
    degree_matched_chance,
    degree_pools,
    grounding_kind,
    is_negative,
    oriented,
    precision_recall,
    support_table,
)
from conceptrank.errors import ConceptrankError
from conceptrank.io.rankings import (
    check_ranking_inputs,
    check_ranking_outputs,
    ranking_input_paths,
)
from conceptrank.stages.maps import run_config

__all__ = ["RelateConfig", "RelateResult", "kg_of_run", "image_relations", "ConceptEdge", "ClassRelations", "Relations", "relate_concepts", "run_relate",
           "concept_edges", "RELATE_OUTPUTS"]

RELATE_OUTPUTS = ("relations.csv", "relations.json")
CSV_HEADER = ("scope", "where", "head", "relation", "tail", "kg_weight", "source", "support", "grounding_score",
              "images_present", "recovered", "planted")


@dataclass(frozen=True)
class RelateConfig:
    """Parameters of :func:`run_relate`.

    kg / kg_format : the knowledge graph (None: the synthetic world's ``knowledge.csv.gz`` next to the
        run's truth file) and its format.
    overrides : CSV ``concept,term`` replacing the name normalisation for the concepts it lists.
    top_global / top_local : G and K (None: as ranked).
    split : images used for grounding and per-image relations (``test``, ``train`` or ``all``).
    min_fit : grounding score at which a relation fits an image.
    min_support : share of a class's images a relation must fit in to be recovered.
    min_enrichment : ... and at least this many times the share of the other classes' images it fits in.
    radius : adjacency dilation as a fraction of the image side.
    draws, seed : chance baseline.
    """

    kg: Path | None = None
    kg_format: Literal["auto", "conceptnet", "kgtk", "wordnet"] = "auto"
    overrides: Path | None = None
    top_global: int | None = None
    top_local: int | None = None
    split: Literal["test", "train", "all"] = "test"
    min_fit: float = 0.5
    min_support: float = 0.3
    min_enrichment: float = 1.5
    radius: float = 0.0625
    draws: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kg_format not in ("auto", "conceptnet", "kgtk", "wordnet"):
            raise ConceptrankError(f"--kg-format {self.kg_format!r}: choose auto, conceptnet, kgtk or wordnet")
        if self.split not in ("test", "train", "all"):
            raise ConceptrankError(f"--split {self.split!r}: choose test, train or all")
        for name in ("min_fit", "min_support"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConceptrankError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")


@dataclass(frozen=True)
class ConceptEdge:
    """A KG edge between two concepts (symmetric relations with sorted ends)."""

    relation: Relation
    weight: float
    source: str


@dataclass(frozen=True)
class ClassRelations:
    """One class's relations.

    Attributes
    ----------
    top : its top-G global concepts.
    candidates : KG edges among them, with ``support`` (share of its images they fit in, NaN when
        the relation is not grounded) and ``score`` (mean grounding score where both are present).
    recovered : the grounded candidates with support ≥ min_support.
    coverage : AICS'24 coverage of its local relations by the global ones.
    precision, recall, chance_precision, chance_recall, kg_precision, kg_recall : against the
        planted relations (NaN without truth); ``kg_*`` before grounding.
    """

    klass: str
    top: tuple[str, ...]
    candidates: tuple[tuple[ConceptEdge, float, float, int], ...]
    recovered: tuple[Relation, ...]
    local: tuple[Relation, ...]
    coverage: float
    planted: tuple[Relation, ...] = ()
    precision: float = math.nan
    recall: float = math.nan
    chance_precision: float = math.nan
    chance_recall: float = math.nan
    kg_precision: float = math.nan
    kg_recall: float = math.nan


@dataclass(frozen=True)
class Relations:
    """What :func:`relate_concepts` found: per class and per image, plus the pooled evaluation."""

    classes: tuple[ClassRelations, ...]
    images: tuple[tuple[str, str, tuple[tuple[ConceptEdge, float], ...]], ...]
    summary: Mapping[str, float] = field(default_factory=dict)


def concept_edges(kg_edges, concepts_of: Mapping[str, Sequence[str]]) -> tuple[ConceptEdge, ...]:
    """KG edges between terms → edges between the concepts mapped to those terms (merged, sorted)."""
    best: dict[Relation, ConceptEdge] = {}
    for e in kg_edges:
        for h in concepts_of.get(e.head, ()):
            for t in concepts_of.get(e.tail, ()):
                if h == t:
                    continue
                rel = oriented(h, e.relation, t)
                old = best.get(rel)
                if old is None or e.weight > old.weight:
                    best[rel] = ConceptEdge(rel, float(e.weight), e.source)
    return tuple(best[r] for r in sorted(best))


def _lookup(tables: Mapping[str, np.ndarray], index: Mapping[str, int], rel: Relation) -> float:
    """Support of one relation from a class's (C, C) tables; NaN when it is not grounded."""
    kind = grounding_kind(rel.relation)
    if kind is None or rel.head not in index or rel.tail not in index:
        return math.nan
    h, t = index[rel.head], index[rel.tail]
    if rel.relation == "HasA":
        h, t = t, h  # the part (tail) inside the whole (head)
    return float(tables[kind][h, t])


def _image_scores(geom: PairGeometry, row: int, index: Mapping[str, int], rel: Relation) -> float:
    kind = grounding_kind(rel.relation)
    if kind is None or rel.head not in index or rel.tail not in index:
        return math.nan
    h, t = index[rel.head], index[rel.tail]
    if rel.relation == "HasA":
        h, t = t, h
    a, b = geom.area[row, h], geom.area[row, t]
    if a <= 0 or b <= 0:
        return math.nan
    inter = geom.inter[row, h, t]
    return float({"contained": inter / a, "overlap": inter / min(a, b), "near": float(geom.near[row, h, t])}[kind])


def _among(edges: Sequence[ConceptEdge], concepts: Sequence[str]) -> list[ConceptEdge]:
    s = set(concepts)
    return [e for e in edges if e.relation.head in s and e.relation.tail in s]


def _one_class(klass, top, edges, geom, rows, index, local_sets, truth, pools, cfg, rng) -> ClassRelations:
    tables = support_table(geom, rows, cfg.min_fit)
    rest = np.setdiff1d(np.arange(len(geom.area)), rows)
    rest_tables = support_table(geom, rest, cfg.min_fit) if len(rest) else None

    def accept(rel: Relation) -> bool:
        s = _lookup(tables, index, rel)
        if math.isnan(s) or s < cfg.min_support:
            return False
        return rest_tables is None or s >= cfg.min_enrichment * _lookup(rest_tables, index, rel)

    cands = []
    for e in _among(edges, top):
        sup = _lookup(tables, index, e.relation)
        fits = [s for s in (_image_scores(geom, r, index, e.relation) for r in rows) if not math.isnan(s)]
        cands.append((e, sup, float(np.mean(fits)) if fits else math.nan, len(fits)))
    recovered = tuple(sorted(e.relation for e, _, _, _ in cands if accept(e.relation)))
    local = set().union(*local_sets) if local_sets else set()
    glob = {e.relation for e, _, _, _ in cands}
    res = dict(klass=klass, top=tuple(top), candidates=tuple(cands), recovered=recovered,
               local=tuple(sorted(local)), coverage=coverage(local, glob))
    if truth is not None:
        planted = set(truth.get(klass, ()))
        p, r = precision_recall(set(recovered), planted)
        grounded = [e.relation for e, sup, _, _ in cands if not math.isnan(sup)]
        kp, kr = precision_recall({x for x in grounded if not is_negative(x.relation)}, planted)
        cp, cr = degree_matched_chance(grounded, pools, accept, planted, cfg.draws, rng) if grounded else (0.0, 0.0)
        res.update(planted=tuple(sorted(planted)), precision=p, recall=r, chance_precision=cp, chance_recall=cr,
                   kg_precision=kp, kg_recall=kr)
    return ClassRelations(**res)


def _pooled(classes: Sequence[ClassRelations]) -> dict[str, float]:
    scored = [c for c in classes if c.planted]
    if not scored:
        return {}
    hits = sum(len(set(c.recovered) & set(c.planted)) for c in scored)
    found = sum(len(c.recovered) for c in scored)
    planted = sum(len(c.planted) for c in scored)

    def mean(xs):
        xs = [x for x in xs if not math.isnan(x)]
        return float(np.mean(xs)) if xs else math.nan

    out = {
        "classes_with_truth": len(scored),
        "precision": hits / found if found else math.nan, "recall": hits / planted,
        "macro_precision": mean(c.precision for c in scored), "macro_recall": mean(c.recall for c in scored),
        "chance_precision": mean(c.chance_precision for c in scored),
        "chance_recall": mean(c.chance_recall for c in scored),
        "kg_only_precision": mean(c.kg_precision for c in scored), "kg_only_recall": mean(c.kg_recall for c in scored),
        "coverage": mean(c.coverage for c in classes),
    }
    p, cp = out["precision"], out["chance_precision"]
    if math.isnan(p) or math.isnan(cp) or (cp == 0 and p == 0):
        out["lift"] = math.nan  # nothing found, or neither finds a planted relation: no ratio to state
    else:
        out["lift"] = p / cp if cp > 0 else math.inf
    return out


def relate_concepts(
    edges: Sequence[ConceptEdge],
    concepts: Sequence[str],
    geometry: PairGeometry,
    image_names: Sequence[str],
    image_classes: Sequence[str],
    global_top: Mapping[str, Sequence[str]],
    local_top: Mapping[str, Sequence[str]],
    truth: Mapping[str, Sequence[Relation]] | None,
    cfg: RelateConfig = RelateConfig(),
) -> Relations:
    """Relations per class and image, grounded in ``geometry``.

    Parameters
    ----------
    edges : KG edges between concepts.
    concepts : the C concepts indexing ``geometry``'s concept axes.
    geometry : region statistics of the N grounding images (``area`` (N, C), ``inter``/``near`` (N, C, C)).
    image_names, image_classes : length N.
    global_top : class → its top-G global concepts.
    local_top : image name → its top-K local concepts (images outside ``image_names`` are listed
        without grounding scores).
    truth : class → planted relations, or None.
    """
    index = {c: i for i, c in enumerate(concepts)}
    rows_of: dict[str, list[int]] = {}
    for i, c in enumerate(image_classes):
        rows_of.setdefault(c, []).append(i)
    degree: dict[str, int] = {c: 0 for c in concepts}
    for e in edges:
        for end in (e.relation.head, e.relation.tail):
            if end in degree:
                degree[end] += 1
    pools = degree_pools(degree)
    rng = np.random.default_rng(cfg.seed)
    row_of = {n: i for i, n in enumerate(image_names)}
    per_image = []
    local_sets: dict[str, list[set]] = {}
    for name in sorted(local_top):
        found = _among(edges, local_top[name])
        r = row_of.get(name)
        per_image.append((name, image_classes[r] if r is not None else "",
                          tuple((e, _image_scores(geometry, r, index, e.relation) if r is not None else math.nan)
                                for e in found)))
        if r is not None:
            local_sets.setdefault(image_classes[r], []).append({e.relation for e in found})
    classes = tuple(
        _one_class(k, global_top[k], edges, geometry, np.asarray(rows_of.get(k, []), np.int64), index,
                   local_sets.get(k, []), truth, pools, cfg, rng)
        for k in sorted(global_top)
    )
    return Relations(classes, tuple(per_image), _pooled(classes))


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConceptrankError(f"{path} not found (run `conceptrank rank` first)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tops(rank_dir: Path, top_global: int | None, top_local: int | None):
    """(class → top-G positive global concepts, image → (class, split, top-K local concepts))."""
    glob: dict[str, list[str]] = {}
    for r in _read_csv(rank_dir / "global_concepts.csv"):
        if r.get("sign", "+") != "+":
            continue
        lst = glob.setdefault(r["class"], [])
        if r["concept"] not in lst and (top_global is None or int(r["rank"]) <= top_global):
            lst.append(r["concept"])
    loc: dict[str, tuple[str, str, list[str]]] = {}
    for r in _read_csv(rank_dir / "local_concepts.csv"):
        entry = loc.setdefault(r["image"], (r["class"], r["split"], []))
        if r["concept"] not in entry[2] and (top_local is None or int(r["rank"]) <= top_local):
            entry[2].append(r["concept"])
    return glob, loc


def image_agreement(images, image_truth: Mapping[str, set], min_fit: float) -> dict[str, float]:
    """Per-image check against the world: of the KG relations among an image's local concepts, those that fit
    its maps (score ≥ ``min_fit``) vs those that hold in it (``image_truth``, keyed by file name)."""
    hit = fit = held = 0
    for name, _, found in images:
        truth = image_truth.get(PurePosixPath(name).name)
        if truth is None:
            continue
        for e, score in found:
            ok = not math.isnan(score) and score >= min_fit
            fit += ok
            held += e.relation in truth
            hit += ok and e.relation in truth
    return {"image_precision": hit / fit if fit else math.nan, "image_recall": hit / held if held else math.nan,
            "image_relations_fitting": fit}


def _image_truth(path: Path | None) -> dict[str, set]:
    from conceptrank.io.cache import read_json

    rel = (read_json(path) or {}).get("relations") or {} if path is not None and Path(path).is_file() else {}
    return {n: {oriented(*r) for r in rs} for n, rs in (rel.get("images") or {}).items()}


def _truth(path: Path | None) -> tuple[dict | None, Path | None]:
    """(class → planted relations, the world's KG path) from a synthetic world's truth.json."""
    if path is None or not Path(path).is_file():
        return None, None
    from conceptrank.io.cache import read_json

    rel = (read_json(path) or {}).get("relations")
    if not rel:
        return None, None
    planted = {c: [oriented(*r) for r in rs] for c, rs in rel.get("planted", {}).items()}
    kg = Path(path).parent / rel["kg"] if rel.get("kg") else None
    return planted, kg


def _concept_masks(maps: np.ndarray, thresholds: np.ndarray, unit_concept: np.ndarray, whole: np.ndarray,
                   size: tuple[int, int]) -> np.ndarray:
    """(n, C, H, W) bool regions: per image, the union of each concept's units' upsampled maps above threshold.

    ``maps`` is (n, U, h, w); ``unit_concept`` (U,) the concept index of each unit (-1 unlabelled);
    ``whole`` (C,) marks image-level concepts (scenes), whose region is the whole image when present.
    """
    n_concepts = len(whole)
    import torch

    from conceptrank.core.upsample import upsample_above_chunks
    from conceptrank.stages.dissect import (
        float32_floor,  # dissect's own comparison: float32 value > floor(thr)
    )

    n, U, h, w = maps.shape
    labelled = np.flatnonzero(unit_concept >= 0)
    k = len(labelled)
    sel = torch.from_numpy(np.ascontiguousarray(np.asarray(maps, np.float32)[:, labelled]))
    thr = torch.from_numpy(float32_floor(thresholds[labelled])).repeat(n)
    # pair p = (image p // k, labelled unit p % k) → row image * C + concept of the union
    target = torch.from_numpy(np.arange(n)[:, None] * n_concepts + unit_concept[labelled][None, :]).flatten()
    acc = torch.zeros(n * n_concepts, size[0] * size[1], dtype=torch.int32)
    for chunk, mask in upsample_above_chunks(sel.reshape(n * k, h, w), thr, size):
        acc.index_add_(0, target[chunk], mask.flatten(1).to(torch.int32))
    masks = (acc > 0).reshape(n, n_concepts, *size).numpy()
    masks[:, whole] = masks[:, whole].any(axis=(2, 3), keepdims=True)
    return masks


def _geometry(run: Path, rels: list[str], unit_concept: np.ndarray, whole: np.ndarray, thresholds: np.ndarray,
              radius: float) -> PairGeometry:
    from conceptrank.core.relations import pair_geometry
    from conceptrank.io.cache import read_json
    from conceptrank.progress import Progress
    from conceptrank.stages.maps import iter_layer_maps

    run_cfg = run_config(run)
    ej = run / "extract" / "extract.json"
    extract_meta = read_json(ej) if ej.is_file() else {}
    parts = []
    with Progress(len(rels), "relate: maps", "images") as bar:
        for _, maps, size in iter_layer_maps(run_cfg, extract_meta, rels, batch_size=100):
            masks = _concept_masks(maps, thresholds, unit_concept, whole, size)
            parts.append(pair_geometry(masks, max(1, round(radius * max(size)))))
            bar.update(len(maps))
    return PairGeometry(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("area", "inter", "near")))


def _cached_geometry(run: Path, out: Path, rels: list[str], unit_concept: np.ndarray, whole: np.ndarray,
                     thresholds: np.ndarray, radius: float) -> tuple[PairGeometry, bool]:
    """:func:`_geometry`, or the copy in ``out/geometry.npz`` computed for the same model, images, units,
    image-level concepts, thresholds and radius (the expensive part of ``relate``: the maps)."""
    from conceptrank.io import cache

    ej = run / "extract" / "extract.json"
    fingerprints = {
        "extract": cache.file_sha256(ej) if ej.is_file() else None,
        "run": cache.file_sha256(run / "run.json") if (run / "run.json").is_file() else None,
        "images": cache.hash_json(rels), "units": cache.array_sha256(unit_concept),
        "thresholds": cache.array_sha256(thresholds),
    }
    key = cache.stage_key("relate-geometry", fingerprints, {"radius": radius, "concepts": len(whole),
                                                            "image_level": np.flatnonzero(whole).tolist()})
    path, meta = out / "geometry.npz", out / "geometry.json"
    try:
        if meta.is_file() and cache.read_json(meta).get("key") == key and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return PairGeometry(z["area"], z["inter"], z["near"]), True
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    geom = _geometry(run, rels, unit_concept, whole, thresholds, radius)
    cache.save_npz(path, area=geom.area, inter=geom.inter, near=geom.near)
    cache.atomic_write_json(meta, {"stage": "relate-geometry", "key": key, "fingerprints": fingerprints})
    return geom, False


@dataclass(frozen=True)
class RelateResult:
    """What :func:`run_relate` wrote, with the relations, the KG account and the concept mapping."""

    out: Path
    relations: Relations
    kg: object
    unmatched: tuple[str, ...]
    concepts: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [self.kg.summary()]
        n_map = len(self.concepts) - len(self.unmatched)
        lines.append(f"[relate] {n_map}/{len(self.concepts)} concepts found in the KG"
                     + (f"; not found: {', '.join(self.unmatched)}" if self.unmatched else ""))
        n_cand = sum(len(c.candidates) for c in self.relations.classes)
        n_rec = sum(len(c.recovered) for c in self.relations.classes)
        lines.append(f"[relate] {n_cand} KG relations among the classes' global concepts, {n_rec} grounded in the "
                     f"model's maps; {sum(len(r) for _, _, r in self.relations.images)} among images' local concepts")
        s = self.relations.summary
        if s:
            lines.append(f"[relate] against the planted relations ({s['classes_with_truth']} classes): "
                         f"precision {s['precision']:.2f}, recall {s['recall']:.2f} (KG alone: precision "
                         f"{s['kg_only_precision']:.2f}, recall {s['kg_only_recall']:.2f}; degree-matched random: "
                         f"precision {s['chance_precision']:.2f}, recall {s['chance_recall']:.2f}; lift "
                         + ("undefined)" if math.isnan(s["lift"]) else f"{s['lift']:.1f}×)"))
            if s.get("all_concepts_recall") is not None:
                lines.append(f"[relate] among all {len(self.concepts)} labelled concepts instead of the top global ones: "
                             f"precision {_f(s['all_concepts_precision'])}, recall {_f(s['all_concepts_recall'])} "
                             f"(KG alone {_f(s['all_concepts_kg_only_precision'])} / {_f(s['all_concepts_kg_only_recall'])};"
                             f" random {_f(s['all_concepts_chance_precision'])} / {_f(s['all_concepts_chance_recall'])})")
            if "image_precision" in s:
                lines.append(f"[relate] per image: {s['image_relations_fitting']} relations fit the maps; precision "
                             f"{_f(s['image_precision'])}, recall {_f(s['image_recall'])} against the relations that "
                             "hold in each image")
            for c in self.relations.classes:
                if c.planted:
                    lines.append(f"  {c.klass:<16} P {_f(c.precision)}  R {_f(c.recall)}  (random P {_f(c.chance_precision)}"
                                 f" R {_f(c.chance_recall)})  " + ", ".join(_name(r) for r in c.recovered))
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"→ {self.out / 'relations.csv'}, {self.out / 'relations.json'}")
        return "\n".join(lines)


def _f(x: float) -> str:
    return " –  " if x is None or math.isnan(x) else f"{x:.2f}"


def _name(r: Relation) -> str:
    return f"{r.head} {r.relation} {r.tail}"


def _num(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))


def _csv_rows(rel: Relations) -> list[list]:
    rows = []
    for c in rel.classes:
        rec, planted = set(c.recovered), set(c.planted)
        for e, sup, score, n in c.candidates:
            r = e.relation
            rows.append(["class", c.klass, r.head, r.relation, r.tail, _num(e.weight), e.source, _num(sup), _num(score),
                         n, int(r in rec), int(r in planted) if c.planted or planted else ""])
    support = {(c.klass, e.relation): sup for c in rel.classes for e, sup, _, _ in c.candidates}
    for name, klass, found in rel.images:
        for e, score in found:
            r = e.relation
            rows.append(["image", name, r.head, r.relation, r.tail, _num(e.weight), e.source,
                         _num(support.get((klass, r), math.nan)), _num(score), "", "", ""])
    return rows


def _json_doc(res: RelateResult, cfg: RelateConfig) -> dict:
    def rel(r: Relation) -> list[str]:
        return [r.head, r.relation, r.tail]

    def clean(x):
        return None if isinstance(x, float) and (math.isnan(x) or math.isinf(x)) else x

    classes = {}
    for c in res.relations.classes:
        classes[c.klass] = {
            "top_global": list(c.top),
            "candidates": [{"relation": rel(e.relation), "kg_weight": e.weight, "source": e.source,
                            "support": clean(s), "mean_score": clean(m), "images_present": n}
                           for e, s, m, n in c.candidates],
            "recovered": [rel(r) for r in c.recovered], "planted": [rel(r) for r in c.planted],
            "local_relations": len(c.local), "coverage": clean(c.coverage),
            "precision": clean(c.precision), "recall": clean(c.recall),
            "chance_precision": clean(c.chance_precision), "chance_recall": clean(c.chance_recall),
            "kg_only_precision": clean(c.kg_precision), "kg_only_recall": clean(c.kg_recall),
        }
    cfg_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()}
    return {"stage": "relate", "config": cfg_d, "kg": res.kg.to_dict(),
            "concepts": list(res.concepts), "unmatched_concepts": list(res.unmatched),
            "summary": {k: clean(v) for k, v in res.relations.summary.items()}, "classes": classes,
            "notes": list(res.notes),
            "definitions": {
                "support": f"share of the class's {cfg.split} images in which the relation fits (score >= {cfg.min_fit})",
                "recovered": f"a KG relation between two of the class's top global concepts with support >= {cfg.min_support}",
                "coverage": "share of the distinct relations among the class's images' top local concepts that are also "
                            "among its top global concepts (AICS'24)",
                "chance": "the same test on relations whose ends are replaced by concepts of the same KG degree",
            }}


def _default_kg(run_cfg: dict, run: Path) -> tuple[Path | None, Path | None]:
    truth = run_cfg.get("truth")
    for p in ([Path(truth)] if truth else []) + [run / "world" / "truth.json"]:
        if p.is_file():
            return p, None
    return None, None


def _unit_table(run: Path, rank_meta: dict, concepts_only: bool = False):
    from conceptrank.io.tally_csv import read_tally

    tally = Path((rank_meta.get("inputs") or {}).get("tally") or run / "dissect" / "tally.csv")
    if not tally.is_file():
        raise ConceptrankError(f"cannot find the tally of {run} ({tally})")
    min_iou = protocol_min_iou(rank_meta.get("protocol") or "standard", rank_meta.get("min_iou"))
    cats = rank_meta.get("categories")
    uc = read_tally(tally).concepts(min_iou, tuple(cats) if cats else None)
    concepts = tuple(sorted({x[0] for x in uc if x is not None}))
    idx = {c: i for i, c in enumerate(concepts)}
    unit_concept = np.array([idx[x[0]] if x is not None else -1 for x in uc], np.int64)
    thr = tally.parent / "thresholds.npy"
    if not thr.is_file():
        raise ConceptrankError(f"{thr} not found: grounding needs the dissection's per-unit thresholds")
    thresholds = np.load(thr, allow_pickle=False)
    if len(thresholds) != len(uc):
        raise ConceptrankError(f"{thr} has {len(thresholds)} thresholds but {tally} {len(uc)} units")
    return concepts, unit_concept, thresholds


def image_relations(run: str | Path, image: str) -> list[dict]:
    """The KG relations among an image's top local concepts, from ``RUN/relate/relations.csv`` (``[]`` when
    ``relate`` has not run), each with its grounding score in the image and whether it fits there."""
    from conceptrank.io.cache import read_json

    path = Path(run) / "relate" / "relations.csv"
    if not path.is_file():
        return []
    min_fit = float(((read_json(path.with_name("relations.json")) or {}).get("config") or {}).get("min_fit", 0.5))
    out = []
    for r in _read_csv(path):
        if r["scope"] == "image" and r["where"] == image:
            score = float(r["grounding_score"]) if r["grounding_score"] else None
            out.append({"head": r["head"], "relation": r["relation"], "tail": r["tail"], "grounding_score": score,
                        "fits": score is not None and score >= min_fit})
    return out


def kg_of_run(run: str | Path) -> Path | None:
    """The synthetic world's knowledge graph named by the run's truth file, None when there is none."""

    run = Path(run)
    run_cfg = run_config(run)
    truth_path, _ = _default_kg(run_cfg, run)
    kg = _truth(truth_path)[1]
    return kg if kg is not None and kg.is_file() else None


def run_relate(run: str | Path, cfg: RelateConfig = RelateConfig()) -> RelateResult:
    """Read a run folder (``run.json``, ``rank/``, ``dissect/``), relate its concepts, write ``RUN/relate/``."""
    from conceptrank.io.cache import atomic_write_json, atomic_write_text, read_json
    from conceptrank.io.kg import load_kg, map_concepts, read_overrides

    run = Path(run)
    rank_dir = run / "rank"
    if not (rank_dir / "rank.json").is_file():
        raise ConceptrankError(f"{rank_dir / 'rank.json'} not found (is {run} a run folder made by `demo` or `run`?)")
    rank_meta = read_json(rank_dir / "rank.json")
    check_ranking_inputs(rank_dir, rank_meta, *ranking_input_paths(rank_dir, rank_meta))  # refuse a re-run upstream
    check_ranking_outputs(rank_dir)
    run_cfg = run_config(run)
    truth_path, _ = _default_kg(run_cfg, run)
    planted, world_kg = _truth(truth_path)
    kg_path = cfg.kg or world_kg
    if kg_path is None:
        raise ConceptrankError("no knowledge graph: pass --kg FILE|DIR (e.g. `conceptrank fetch conceptnet --to data` "
                               "then --kg data/conceptnet-assertions-5.7.0.csv.gz, or --kg /usr/share/wordnet)")
    concepts, unit_concept, thresholds = _unit_table(run, rank_meta)
    mapping = map_concepts(concepts, read_overrides(cfg.overrides) if cfg.overrides else None)
    out = run / "relate"
    kg = load_kg(kg_path, mapping.term_set(), cfg.kg_format, cache_dir=out / "kg-cache")
    edges = concept_edges(kg.edges, mapping.concepts_of())
    glob, loc = _tops(rank_dir, cfg.top_global, cfg.top_local)
    chosen = sorted(n for n, (_, split, _) in loc.items() if cfg.split == "all" or split == cfg.split)
    if not chosen:
        raise ConceptrankError(f"no {cfg.split} images in {rank_dir / 'local_concepts.csv'}; choose --split all")
    image_level, probe_note = _image_level_concepts(run_cfg)
    whole = np.array([c in image_level for c in concepts], bool)
    geom, reused = _cached_geometry(run, out, chosen, unit_concept, whole, thresholds, cfg.radius)
    truth = _match_truth(planted, glob) if planted is not None else None
    rel = relate_concepts(edges, concepts, geom, chosen, [loc[n][0] for n in chosen], glob,
                          {n: loc[n][2] for n in chosen}, truth, cfg)
    if truth is not None:  # the same over every labelled concept: grounding alone, whatever the ranking kept
        every = relate_concepts(edges, concepts, geom, chosen, [loc[n][0] for n in chosen],
                                {c: concepts for c in glob}, {}, truth, cfg).summary
        rel = dataclasses.replace(rel, summary={**rel.summary, **{f"all_concepts_{k}": every.get(k) for k in (
            "precision", "recall", "chance_precision", "chance_recall", "kg_only_precision", "kg_only_recall")}})
    image_truth = _image_truth(truth_path)
    if image_truth:
        rel = dataclasses.replace(rel, summary={**rel.summary, **image_agreement(rel.images, image_truth, cfg.min_fit)})
    notes = ["region geometry reused from relate/geometry.npz (same model, images, units, thresholds)"] if reused else []
    if probe_note:
        notes.append(probe_note)
    if truth is None:
        notes.append("no planted relations (truth.json without a 'relations' section): precision and recall not computed")
    res = RelateResult(out, rel, kg, mapping.unmatched(kg.matched_terms), concepts, tuple(notes))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    w.writerows(_csv_rows(rel))
    atomic_write_text(out / "relations.csv", buf.getvalue())
    atomic_write_json(out / "relations.json", _json_doc(res, cfg))
    return res


def _image_level_concepts(run_cfg: Mapping) -> tuple[frozenset[str], str | None]:
    """The probe set's image-level labels (scenes), and a note when the run's probe set cannot say."""
    from conceptrank.errors import BrodenError
    from conceptrank.io.broden import BrodenDataset

    probe = run_cfg.get("probe")
    if not probe or not Path(probe).is_dir():
        return frozenset(), f"probe set {probe or '(none in run.json)'} not found: every concept grounded by its units' regions"
    try:
        return BrodenDataset(probe, run_cfg.get("categories")).image_level_labels(), None
    except (BrodenError, OSError) as e:
        return frozenset(), f"probe set unreadable ({e}): every concept grounded by its units' regions"


def _match_truth(planted: dict, glob: Mapping[str, Sequence[str]]) -> dict:
    """Planted relations per class, for the classes that were ranked."""
    return {c: planted.get(c, []) for c in glob}
