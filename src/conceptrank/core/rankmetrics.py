"""Ranking-agreement measures between a class's aggregated local ranking and its global ranking.

Formula 2 only asks whether one concept is shared. These measures compare the two rankings as
rankings, at depth d (:mod:`conceptrank.stages.evaluate` uses d = G of each K:G configuration):

``jaccard_at(a, b, d)``
    ``|a[:d] ∩ b[:d]| / |a[:d] ∪ b[:d]|`` (nan when both are empty).
``ndcg_at(ranking, reference, d)``
    normalised discounted cumulative gain of ``ranking[:d]`` with *graded* relevance taken from the
    reference: the concept at reference position r (1-based, r ≤ d) has relevance ``d − r + 1``,
    others 0; ``DCG = Σ_i rel(ranking[i]) / log2(i + 1)`` over positions i = 1..d, divided by the
    DCG of the reference itself, so identical top-d lists score 1 and order matters.
``rbo(a, b, p=0.9, depth=d)``
    rank-biased overlap (Webber, Moffat & Zobel 2010), the *extrapolated* RBO_ext of their
    equation 32 for two lists truncated at the same depth ``s = min(len(a), len(b), d)``:
    ``RBO_ext = X_s/s · p^s + (1 − p)/p · Σ_{k=1..s} X_k/k · p^k`` with ``X_k = |a[:k] ∩ b[:k]|``.
    Identical lists give 1 and disjoint ones 0; it assumes the agreement seen at depth s continues.

The class's **aggregated local ranking** (:func:`aggregate_local`) orders concepts by how many of
the class's images have them among their top-K local concepts (descending), ties broken by the
mean (1-based) position at which they appear where present, then by name. That is the same
"is it in the image's top K" notion Formula 2 uses, ranked.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = ["jaccard_at", "ndcg_at", "rbo", "aggregate_local"]


def _top(xs: Sequence[str], d: int) -> list[str]:
    """First d entries, duplicates removed (first occurrence kept)."""
    out: list[str] = []
    for x in xs:
        if len(out) >= d:
            break
        if x not in out:
            out.append(x)
    return out


def jaccard_at(a: Sequence[str], b: Sequence[str], d: int) -> float:
    """Jaccard index of the top-``d`` sets of two rankings; nan when both are empty."""
    if d < 1:
        raise ValueError("d must be ≥ 1")
    A, B = set(_top(a, d)), set(_top(b, d))
    if not A and not B:
        return float("nan")
    return len(A & B) / len(A | B)


def ndcg_at(ranking: Sequence[str], reference: Sequence[str], d: int) -> float:
    """nDCG@d of ``ranking`` against ``reference`` with graded relevance ``d − r + 1``.

    Returns nan when the reference is empty (no ideal gain).
    """
    if d < 1:
        raise ValueError("d must be ≥ 1")
    ref = _top(reference, d)
    if not ref:
        return float("nan")
    rel = {x: d - r for r, x in enumerate(ref)}  # position r (0-based) → d − (r+1) + 1
    dcg = sum(rel.get(x, 0) / math.log2(i + 2) for i, x in enumerate(_top(ranking, d)))
    idcg = sum(rel[x] / math.log2(i + 2) for i, x in enumerate(ref))
    return dcg / idcg


def rbo(a: Sequence[str], b: Sequence[str], p: float = 0.9, depth: int | None = None) -> float:
    """Extrapolated rank-biased overlap of two rankings truncated at a common depth.

    Parameters
    ----------
    a, b : rankings (duplicates removed, first occurrence kept).
    p : persistence in (0, 1).
    depth : truncation depth; the lists are cut at ``s = min(len(a), len(b), depth)``.

    Returns
    -------
    float in [0, 1]; nan when both lists are empty, 0 when only one is.
    """
    if not (0 < p < 1):
        raise ValueError("p must lie in (0, 1)")
    big = depth if depth is not None else max(len(a), len(b))
    A, B = _top(a, big), _top(b, big)
    if not A and not B:
        return float("nan")
    s = min(len(A), len(B))
    if s == 0:
        return 0.0
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    x = 0
    total = 0.0
    for k in range(1, s + 1):
        ai, bi = A[k - 1], B[k - 1]
        if ai == bi:
            x += 1
        else:
            x += (ai in seen_b) + (bi in seen_a)
        seen_a.add(ai)
        seen_b.add(bi)
        total += x / k * p**k
    return x / s * p**s + (1 - p) / p * total


def aggregate_local(lists: Iterable[Sequence[str]], k: int) -> list[str]:
    """A class's aggregated local ranking from its images' local rankings.

    Parameters
    ----------
    lists : per image, local concepts in rank order (only the first ``k`` count).
    k : K.

    Returns
    -------
    Concepts ordered by frequency among the images' top-k lists (descending), then by mean
    1-based position where present (ascending), then by name.
    """
    count: dict[str, int] = {}
    pos: dict[str, int] = {}
    for lst in lists:
        for r, x in enumerate(_top(lst, k), start=1):
            count[x] = count.get(x, 0) + 1
            pos[x] = pos.get(x, 0) + r
    return sorted(count, key=lambda x: (-count[x], pos[x] / count[x], x))
