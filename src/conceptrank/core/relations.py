"""Relations between concepts: ConceptNet's relation semantics and the region geometry that grounds them.

Semantics (ConceptNet 5.7's own definitions):

- :data:`SYMMETRIC` relations hold in both directions (``A RelatedTo B`` ⇔ ``B RelatedTo A``);
- :data:`NEGATIVE` relations deny something (``Not*``, ``Antonym``, ``DistinctFrom``);
- :data:`ENTAILS` is the entailment hierarchy, child → parent (``PartOf`` → ``AtLocation`` →
  ``LocatedNear`` → ``RelatedTo``, ``MadeOf`` → ``HasA`` → ``LocatedNear``, ...): a relation
  implies every relation in its :func:`entailed` closure.

Grounding: a relation between two concepts fits an image when the concepts' above-threshold
regions (the union of the upsampled, thresholded maps of each concept's units) sit as the relation
says (:data:`GROUNDING`):

- ``contained``: PartOf / HasA — the part's region lies mostly inside the whole's
  (``|part ∩ whole| / |part|``);
- ``overlap``: HasProperty / MadeOf / IsA / ... — the regions overlap
  (``|A ∩ B| / min(|A|, |B|)``);
- ``near``: AtLocation / LocatedNear / RelatedTo — co-presence or adjacency (1 when B meets A
  dilated by a few pixels, else 0).

All geometry is computed for every concept pair of every image at once (:func:`pair_geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

__all__ = [
    "CONCEPTNET_RELATIONS",
    "SYMMETRIC",
    "NEGATIVE",
    "ENTAILS",
    "GROUNDING",
    "Relation",
    "canonical_relation",
    "is_known",
    "is_symmetric",
    "is_negative",
    "entailed",
    "grounding_kind",
    "oriented",
    "PairGeometry",
    "pair_geometry",
    "fit_scores",
    "support_table",
    "precision_recall",
    "coverage",
    "degree_pools",
    "degree_matched_chance",
]

#: The relations of ConceptNet 5.7 (``/r/<name>``; ``dbpedia/...`` ones are namespaced and kept as such).
CONCEPTNET_RELATIONS = frozenset({
    "RelatedTo", "FormOf", "IsA", "PartOf", "HasA", "UsedFor", "CapableOf", "AtLocation", "Causes",
    "HasSubevent", "HasFirstSubevent", "HasLastSubevent", "HasPrerequisite", "HasProperty",
    "MotivatedByGoal", "ObstructedBy", "Desires", "CreatedBy", "Synonym", "Antonym", "DistinctFrom",
    "DerivedFrom", "SymbolOf", "DefinedAs", "MannerOf", "LocatedNear", "HasContext", "SimilarTo",
    "EtymologicallyRelatedTo", "EtymologicallyDerivedFrom", "CausesDesire", "MadeOf", "ReceivesAction",
    "ExternalURL", "InstanceOf", "Entails", "NotDesires", "NotUsedFor", "NotCapableOf", "NotHasProperty",
    "NotIsA", "NotHasA", "NotMadeOf", "NotPartOf", "NotAtLocation",
    # relations CSKG adds (mw: MayHaveProperty; the paper authors keep it)
    "MayHaveProperty",
})

SYMMETRIC = frozenset({"RelatedTo", "SimilarTo", "Synonym", "Antonym", "DistinctFrom",
                       "EtymologicallyRelatedTo", "LocatedNear"})

#: Relations that deny something; besides these, every ``Not*`` name is negative.
NEGATIVE = frozenset({"Antonym", "DistinctFrom", "NotDesires", "NotUsedFor", "NotCapableOf", "NotHasProperty",
                      "NotIsA", "NotHasA", "NotMadeOf", "NotPartOf", "NotAtLocation"})

#: child → parent of the entailment hierarchy.
ENTAILS: Mapping[str, str] = {
    "PartOf": "AtLocation", "AtLocation": "LocatedNear", "LocatedNear": "RelatedTo",
    "MadeOf": "HasA", "HasA": "LocatedNear",
    "IsA": "RelatedTo", "InstanceOf": "IsA", "MannerOf": "IsA",
    "HasProperty": "RelatedTo", "MayHaveProperty": "RelatedTo",
    "Synonym": "SimilarTo", "SimilarTo": "RelatedTo",
    "UsedFor": "HasTheme", "FormOf": "RelatedTo", "DerivedFrom": "RelatedTo",
    "EtymologicallyDerivedFrom": "EtymologicallyRelatedTo", "EtymologicallyRelatedTo": "RelatedTo",
    "CapableOf": "RelatedTo", "DefinedAs": "RelatedTo", "SymbolOf": "RelatedTo", "HasContext": "RelatedTo",
}

GroundingKind = Literal["contained", "overlap", "near"]

#: relation → how its two concepts' regions should sit; a relation absent here is not grounded.
GROUNDING: Mapping[str, GroundingKind] = {
    "PartOf": "contained", "HasA": "contained",
    "HasProperty": "overlap", "MayHaveProperty": "overlap", "MadeOf": "overlap", "IsA": "overlap",
    "InstanceOf": "overlap", "Synonym": "overlap", "SimilarTo": "overlap", "FormOf": "overlap",
    "AtLocation": "near", "LocatedNear": "near", "RelatedTo": "near",
}
_KIND_CODE = {"contained": 0, "overlap": 1, "near": 2}


@dataclass(frozen=True, order=True)
class Relation:
    """One directed edge between two concepts (symmetric relations are stored head ≤ tail)."""

    head: str
    relation: str
    tail: str

    def key(self) -> tuple[str, str, str]:
        return (self.head, self.relation, self.tail)


def canonical_relation(name: str) -> str:
    """``/r/PartOf`` → ``PartOf``; ``mw:MayHaveProperty`` → ``MayHaveProperty``; others unchanged."""
    n = name.strip()
    if n.startswith("/r/"):
        n = n[3:]
    n = n.rstrip("/")
    if ":" in n and n.split(":", 1)[1] in CONCEPTNET_RELATIONS:
        n = n.split(":", 1)[1]
    return n


def is_known(relation: str) -> bool:
    """Whether ``relation`` (canonical) is one of ConceptNet's (or CSKG's) relations."""
    return relation in CONCEPTNET_RELATIONS or relation.startswith("dbpedia/")


def is_symmetric(relation: str) -> bool:
    return relation in SYMMETRIC


def is_negative(relation: str) -> bool:
    return relation in NEGATIVE or relation.startswith("Not")


def entailed(relation: str) -> tuple[str, ...]:
    """The relation and every relation it entails, nearest first (negative ones entail nothing else)."""
    out = [relation]
    while not is_negative(out[-1]) and out[-1] in ENTAILS and ENTAILS[out[-1]] not in out:
        out.append(ENTAILS[out[-1]])
    return tuple(out)


def grounding_kind(relation: str) -> GroundingKind | None:
    """How the relation is checked on regions, None when it is not grounded (e.g. negative ones)."""
    return None if is_negative(relation) else GROUNDING.get(relation)


def oriented(head: str, relation: str, tail: str) -> Relation:
    """The relation with a symmetric one's ends in sorted order (so both directions compare equal)."""
    if is_symmetric(relation) and tail < head:
        head, tail = tail, head
    return Relation(head, relation, tail)


# -- region geometry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairGeometry:
    """Region statistics of every concept pair in every image.

    Attributes
    ----------
    area : (N, C) float64 — pixels of each concept's region.
    inter : (N, C, C) float64 — ``|A_a ∩ A_b|``.
    near : (N, C, C) bool — region b meets region a dilated by ``radius`` pixels.
    """

    area: np.ndarray
    inter: np.ndarray
    near: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """(N, C) bool — the concept has a non-empty region."""
        return self.area > 0


def pair_geometry(masks, radius: int = 4) -> PairGeometry:
    """Areas, pairwise intersections and adjacency of concept regions.

    Parameters
    ----------
    masks : (N, C, H, W) bool tensor or array — each concept's region in each image.
    radius : dilation radius in pixels for adjacency.
    """
    import torch
    import torch.nn.functional as F

    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).to(torch.float32)
    N, C, H, W = m.shape
    flat = m.reshape(N, C, H * W)
    inter = torch.bmm(flat, flat.transpose(1, 2))
    k = 2 * int(radius) + 1
    r = int(radius)  # a square max filter is a row max filter after a column one
    dil = F.max_pool2d(m.reshape(N * C, 1, H, W), (k, 1), stride=1, padding=(r, 0))
    dil = F.max_pool2d(dil, (1, k), stride=1, padding=(0, r)).reshape(N, C, H * W)
    near = torch.bmm(dil, flat.transpose(1, 2)) > 0
    return PairGeometry(flat.sum(-1).double().numpy(), inter.double().numpy(), near.numpy())


def fit_scores(geom: PairGeometry, head: np.ndarray, tail: np.ndarray, kinds: Sequence[GroundingKind]) -> np.ndarray:
    """Grounding score of R relations in N images: (N, R) float64, NaN where a concept is absent.

    ``contained`` scores ``|head ∩ tail| / |head|`` (for HasA pass the part as ``head``).
    """
    head = np.asarray(head, np.int64)
    tail = np.asarray(tail, np.int64)
    code = np.array([_KIND_CODE[k] for k in kinds], np.int64)
    a_h = geom.area[:, head]
    a_t = geom.area[:, tail]
    inter = geom.inter[:, head, tail]
    with np.errstate(divide="ignore", invalid="ignore"):
        contained = inter / a_h
        overlap = inter / np.minimum(a_h, a_t)
    near = geom.near[:, head, tail].astype(np.float64)
    score = np.where(code == 0, contained, np.where(code == 1, overlap, near))
    both = (a_h > 0) & (a_t > 0)
    return np.where(both, score, np.nan)


def support_table(geom: PairGeometry, rows: np.ndarray, min_fit: float) -> dict[str, np.ndarray]:
    """Per grounding kind, the (C, C) share of the images ``rows`` in which pair (a, b) fits.

    ``contained`` entry [a, b] is for a's region inside b's.
    """
    g = PairGeometry(geom.area[rows], geom.inter[rows], geom.near[rows])
    n = max(len(rows), 1)
    a = g.area[:, :, None]
    b = g.area[:, None, :]
    both = (a > 0) & (b > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        contained = np.where(both, g.inter / a, 0.0)
        overlap = np.where(both, g.inter / np.minimum(a, b), 0.0)
    near = (both & g.near).astype(np.float64)
    return {k: (v >= min_fit).sum(axis=0) / n for k, v in
            (("contained", contained), ("overlap", overlap), ("near", near))}


# -- evaluation ------------------------------------------------------------------------------------
def precision_recall(found: set, truth: set) -> tuple[float, float]:
    """Precision and recall of a set of relations; NaN where undefined (nothing found / no truth)."""
    hit = len(found & truth)
    p = hit / len(found) if found else float("nan")
    r = hit / len(truth) if truth else float("nan")
    return p, r


def coverage(local: set, global_: set) -> float:
    """AICS'24 coverage: the share of local relations that are also global ones (NaN without local ones)."""
    return len(local & global_) / len(local) if local else float("nan")


def degree_pools(degree: Mapping[str, int], min_pool: int = 3) -> dict[str, tuple[str, ...]]:
    """For each concept, the concepts with the same KG degree (the ``min_pool`` nearest in degree when
    fewer share it), itself included."""
    names = sorted(degree)
    deg = np.array([degree[n] for n in names], np.float64)
    pools = {}
    for i, n in enumerate(names):
        same = [names[j] for j in np.flatnonzero(deg == deg[i])]
        if len(same) < min_pool:
            order = np.argsort(np.abs(deg - deg[i]), kind="stable")[:min_pool]
            same = sorted({names[j] for j in order} | set(same))
        pools[n] = tuple(same)
    return pools


def degree_matched_chance(
    candidates: Sequence[Relation],
    pools: Mapping[str, Sequence[str]],
    accept,
    truth: set,
    draws: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Precision and recall of random relations with the candidates' relation names and degree-matched ends.

    Each draw replaces every candidate ``(h, r, t)`` by ``(h', r, t')`` with ``h'`` drawn from
    ``pools[h]`` and ``t' ≠ h'`` from ``pools[t]``, keeps those that ``accept(relation)`` (the
    same grounding test as the real ones), and scores them against ``truth``. Returns the mean
    precision (over draws that found something) and mean recall.
    """
    ps, rs = [], []
    for _ in range(draws):
        found = set()
        for c in candidates:
            h = pools[c.head][rng.integers(len(pools[c.head]))]
            tails = [t for t in pools[c.tail] if t != h] or [c.tail]
            t = tails[rng.integers(len(tails))]
            rel = oriented(h, c.relation, t)
            if accept(rel):
                found.add(rel)
        p, r = precision_recall(found, truth)
        if not np.isnan(p):
            ps.append(p)
        rs.append(0.0 if np.isnan(r) else r)
    return (float(np.mean(ps)) if ps else 0.0), (float(np.mean(rs)) if rs and truth else float("nan"))
