"""Chance baselines and bootstrap uncertainty for the agreement metric (the paper's Formula 2).

The agreement of class c at (K, G) is ``P_c = mean over images i of c of O[i, c]`` with the overlap
indicator ``O[i, c'] = [top-K local concepts of i ∩ top-G global concepts of c' ≠ ∅]`` — an
``(N, C)`` boolean matrix computed once per configuration (:func:`overlap_matrix`). From it,

``M[c, c'] = mean over images of class c of O[i, c']``  (:func:`class_overlap_means`, ``(C, C)``)

gives the agreement that class c would get with the global list of class c'. Everything below
is vectorised over these matrices, so 1000 permutations × 4 configurations take milliseconds.

Permutation baseline (:func:`permutation_test`)
    The class → global-list assignment is replaced by a uniformly random permutation of the
    evaluated classes (fixed points allowed). Under it ``P_c = M[c, π(c)]`` and the overall score is
    the mean over classes. It keeps the global lists (and so the concepts' frequencies in them)
    exactly and destroys only their link to the classes: it asks whether class c's own list fits
    its images better than the other classes' lists do. One-sided p-value
    ``(1 + #{π : stat(π) ≥ observed}) / (1 + n_perm)``. Note that per class ``M[c, π(c)]`` only
    takes the C values of row c, so a per-class p-value cannot go much below ``1 / C`` (≈ 0.1 for
    10 classes): only the overall p-value can be small.

Frequency-matched random-concept baseline (:func:`frequency_test`)
    Every class gets random global lists of the same length as its own (G, or fewer where the
    ranking kept fewer), drawn without replacement with probability proportional to a weight per
    concept (sequential weighted sampling, implemented with the Efraimidis–Spirakis keys
    ``u^(1/w)``). :mod:`conceptrank.stages.evaluate` uses as weight the number of *labelled units* carrying
    the concept (the concept's prevalence in the layer: a concept held by many units has more
    chances to reach an image's top-K), falling back to the concept's number of occurrences in the
    global lists when the tally cannot be read; summary.json records which. Same p-value formula
    over the draws.

Bootstrap (:func:`bootstrap_agreement`)
    Images are resampled with replacement within each class (class sizes fixed); the overall
    statistic is the mean over classes of the resampled per-class scores. 95 % percentile
    intervals.

Lift over chance = observed / baseline mean (nan when the baseline mean is 0).

Pure computation only; the I/O edge is :func:`conceptrank.stages.evaluate.run_evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "EncodedRankings",
    "ChanceResult",
    "BootstrapResult",
    "encode_rankings",
    "membership",
    "overlap_matrix",
    "class_overlap_means",
    "weighted_sample_sets",
    "permutation_test",
    "frequency_test",
    "bootstrap_agreement",
    "p_value",
    "lift",
]


@dataclass(frozen=True)
class EncodedRankings:
    """Integer-coded local and global rankings of the evaluated images.

    Attributes
    ----------
    concepts : tuple of V concept names (ids index into it).
    classes : tuple of C evaluated class names (class ids index into it).
    images : tuple of N image names.
    y : (N,) int64 class id of every image.
    local : (N, Kmax) int64 concept ids in rank order, padded with -1.
    global_ : (C, Gmax) int64 concept ids of each class's supporting global list, padded with -1.
    """

    concepts: tuple[str, ...]
    classes: tuple[str, ...]
    images: tuple[str, ...]
    y: np.ndarray
    local: np.ndarray
    global_: np.ndarray

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class ChanceResult:
    """Observed agreement against a chance baseline, for one (K, G).

    Attributes
    ----------
    observed : (C,) per-class agreement P_c.
    null_mean : (C,) mean of P_c under the null.
    p : (C,) one-sided per-class p-values.
    observed_overall : mean of ``observed``.
    null_overall : (n,) overall statistic of every null draw.
    p_overall : one-sided p-value of the overall statistic.
    n : number of permutations / draws.
    """

    observed: np.ndarray
    null_mean: np.ndarray
    p: np.ndarray
    observed_overall: float
    null_overall: np.ndarray
    p_overall: float
    n: int

    @property
    def null_overall_mean(self) -> float:
        return float(np.mean(self.null_overall))

    @property
    def lift(self) -> np.ndarray:
        """(C,) observed / null mean per class."""
        return lift(self.observed, self.null_mean)

    @property
    def lift_overall(self) -> float:
        return float(lift(self.observed_overall, self.null_overall_mean))


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap intervals of the agreement, for one (K, G).

    Attributes
    ----------
    estimate : (C,) per-class point estimates; ``estimate_overall`` their mean.
    low, high : (C,) per-class interval bounds; ``low_overall``, ``high_overall`` for the mean.
    level : confidence level (0.95).
    n : number of bootstrap replicates.
    """

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    estimate_overall: float
    low_overall: float
    high_overall: float
    level: float
    n: int


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


def encode_rankings(
    local: Mapping[str, Sequence[str]],
    image_class: Mapping[str, str],
    global_: Mapping[str, Sequence[str]],
    classes: Sequence[str],
    vocabulary: Sequence[str] = (),
) -> EncodedRankings:
    """Integer-code rankings for the vectorised statistics.

    Parameters
    ----------
    local : image → local concepts in rank order (missing: none).
    image_class : image → class, for the N evaluated images (in this order).
    global_ : class → supporting global concepts in rank order (missing: none).
    classes : the C evaluated classes (every class of ``image_class`` must be among them).
    vocabulary : concepts to include in the vocabulary first (e.g. every labelled concept, so
        that random draws can pick concepts no ranking mentions); others are appended.
    """
    names: list[str] = []
    index: dict[str, int] = {}

    def cid(x: str) -> int:
        if x not in index:
            index[x] = len(names)
            names.append(x)
        return index[x]

    for x in vocabulary:
        cid(x)
    classes = tuple(classes)
    cindex = {c: i for i, c in enumerate(classes)}
    images = tuple(image_class)
    missing = sorted({image_class[i] for i in images} - set(classes))
    if missing:
        raise ValueError(f"classes {missing} of image_class are not in classes")
    y = np.array([cindex[image_class[i]] for i in images], dtype=np.int64)
    lists = [[cid(x) for x in local.get(i, ())] for i in images]
    kmax = max([len(v) for v in lists] + [1])
    loc = np.full((len(images), kmax), -1, dtype=np.int64)
    for r, v in enumerate(lists):
        loc[r, : len(v)] = v
    glists = [[cid(x) for x in global_.get(c, ())] for c in classes]
    gmax = max([len(v) for v in glists] + [1])
    glo = np.full((len(classes), gmax), -1, dtype=np.int64)
    for r, v in enumerate(glists):
        glo[r, : len(v)] = v
    return EncodedRankings(tuple(names), classes, images, y, loc, glo)


def membership(ids: np.ndarray, depth: int, n_concepts: int) -> np.ndarray:
    """Boolean set matrix of the first ``depth`` entries of padded id lists.

    Parameters
    ----------
    ids : (n, L) int concept ids, -1 = padding.
    depth : number of leading entries kept.
    n_concepts : V.

    Returns
    -------
    (n, V) bool — ``out[r, v]`` is True when concept v is among the first ``depth`` entries of row r.
    """
    ids = np.asarray(ids)[:, :depth]
    out = np.zeros((ids.shape[0], n_concepts), dtype=bool)
    rows, cols = np.nonzero(ids >= 0)
    out[rows, ids[rows, cols]] = True
    return out


def overlap_matrix(enc: EncodedRankings, k: int, g: int) -> np.ndarray:
    """``O[i, c] = [top-k local concepts of image i ∩ top-g global concepts of class c ≠ ∅]``.

    Returns
    -------
    (N, C) bool.
    """
    L = membership(enc.local, k, enc.n_concepts).astype(np.float32)
    G = membership(enc.global_, g, enc.n_concepts).astype(np.float32)
    return (L @ G.T) > 0


def class_overlap_means(O: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """``M[c, c'] = mean over images i of class c of O[i, c']``.

    Parameters
    ----------
    O : (N, C') overlap indicators (or any per-image scores).
    y : (N,) class ids in [0, n_classes).

    Returns
    -------
    (n_classes, C') float64; rows of classes without images are nan.
    """
    O = np.asarray(O, dtype=np.float64)
    onehot = np.zeros((n_classes, O.shape[0]))
    onehot[y, np.arange(O.shape[0])] = 1.0
    counts = onehot.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (onehot @ O) / counts


def p_value(null: np.ndarray, observed: np.ndarray | float, axis: int = 0) -> np.ndarray:
    """One-sided Monte-Carlo p-value ``(1 + #{null ≥ observed}) / (1 + n)`` along ``axis``.

    A tolerance of 1e-12 makes null values equal to the observed one count as ≥ (they are
    fractions of small integers, computed along different paths).
    """
    null = np.asarray(null, dtype=np.float64)
    n = null.shape[axis]
    ge = (null >= np.asarray(observed) - 1e-12).sum(axis=axis)
    return (1.0 + ge) / (1.0 + n)


def lift(observed, baseline):
    """observed / baseline, nan where the baseline is 0."""
    observed = np.asarray(observed, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(baseline > 0, observed / np.where(baseline > 0, baseline, 1.0), np.nan)
    return out if out.ndim else float(out)


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------


def permutation_test(M: np.ndarray, n_perm: int = 1000, rng: np.random.Generator | int | None = 0) -> ChanceResult:
    """Permutation baseline: global lists reassigned across classes at random.

    Parameters
    ----------
    M : (C, C) ``M[c, c']`` = agreement of class c's images with class c''s global list
        (:func:`class_overlap_means`); the observed scores are its diagonal.
    n_perm : number of random permutations (≥ 1).
    rng : a Generator or a seed.

    Returns
    -------
    :class:`ChanceResult` with ``n = n_perm``.
    """
    rng = np.random.default_rng(rng)
    M = np.asarray(M, dtype=np.float64)
    C = M.shape[0]
    if M.shape != (C, C):
        raise ValueError(f"M must be square, got {M.shape}")
    perms = rng.permuted(np.tile(np.arange(C), (n_perm, 1)), axis=1)  # (n_perm, C)
    null = M[np.arange(C)[None, :], perms]  # (n_perm, C)
    obs = np.diag(M).copy()
    return _chance_result(null, obs, n_perm)


def _chance_result(null: np.ndarray, obs: np.ndarray, n: int) -> ChanceResult:
    """Per-class and overall p-values of ``obs`` (C,) against null draws ``null`` (n, C)."""
    null_overall = null.mean(axis=1)
    return ChanceResult(
        observed=obs,
        null_mean=null.mean(axis=0),
        p=p_value(null, obs),
        observed_overall=float(obs.mean()),
        null_overall=null_overall,
        p_overall=float(p_value(null_overall, obs.mean())),
        n=int(n),
    )


def weighted_sample_sets(
    weights: np.ndarray, size: int, n: int, rng: np.random.Generator | int | None = 0
) -> np.ndarray:
    """``n`` random sets of ``size`` distinct items drawn with probability ∝ ``weights``.

    Sequential weighted sampling without replacement (as ``rng.choice(..., replace=False, p=w)``),
    vectorised with Efraimidis–Spirakis keys: item v gets key ``log(u_v) / w_v`` and the ``size``
    largest keys win. Items of weight 0 are never drawn; when fewer than ``size`` items have a
    positive weight, all of them are drawn.

    Parameters
    ----------
    weights : (V,) non-negative.

    Returns
    -------
    (n, V) bool.
    """
    rng = np.random.default_rng(rng)
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and non-negative")
    V = w.shape[0]
    out = np.zeros((n, V), dtype=bool)
    pos = np.flatnonzero(w > 0)
    size = min(int(size), pos.size)
    if size <= 0 or n <= 0:
        return out
    if size == pos.size:
        out[:, pos] = True
        return out
    u = rng.random((n, pos.size))
    keys = np.log(np.maximum(u, np.finfo(np.float64).tiny)) / w[pos]
    top = np.argpartition(-keys, size - 1, axis=1)[:, :size]
    out[np.arange(n)[:, None], pos[top]] = True
    return out


def frequency_test(
    enc: EncodedRankings,
    k: int,
    g: int,
    weights: np.ndarray,
    n_draw: int = 1000,
    rng: np.random.Generator | int | None = 0,
) -> ChanceResult:
    """Frequency-matched random-concept baseline for one (K, G).

    Every class gets ``n_draw`` random global lists with as many concepts as its own top-G list,
    drawn by :func:`weighted_sample_sets` with ``weights``; draw r of every class forms the r-th
    null value of the overall statistic.

    Parameters
    ----------
    enc : encoded rankings.
    weights : (V,) non-negative weight of every concept of ``enc.concepts``.
    """
    rng = np.random.default_rng(rng)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (enc.n_concepts,):
        raise ValueError(f"weights must be ({enc.n_concepts},), got {weights.shape}")
    L = membership(enc.local, k, enc.n_concepts).astype(np.float32)  # (N, V)
    G = membership(enc.global_, g, enc.n_concepts)
    sizes = G.sum(axis=1)
    C = enc.n_classes
    obs = np.diag(class_overlap_means(overlap_matrix(enc, k, g), enc.y, C)).copy()
    null = np.full((n_draw, C), np.nan)
    present = [c for c in range(C) if np.any(enc.y == c)]
    for size in sorted({int(sizes[c]) for c in present}):
        group = [c for c in present if int(sizes[c]) == size]
        # one call per list length: draws of class group[j] are rows j*n_draw … (j+1)*n_draw − 1
        D = weighted_sample_sets(weights, size, n_draw * len(group), rng).astype(np.float32)
        for j, c in enumerate(group):
            rows = np.flatnonzero(enc.y == c)
            null[:, c] = ((L[rows] @ D[j * n_draw:(j + 1) * n_draw].T) > 0).mean(axis=0)
    return _chance_result(null, obs, n_draw)


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------


def bootstrap_agreement(
    hits: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    n_boot: int = 1000,
    level: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> BootstrapResult:
    """Percentile bootstrap over images, resampled within each class.

    Parameters
    ----------
    hits : (N,) per-image scores (the overlap indicator ``O[i, y_i]`` for Formula 2).
    y : (N,) class ids; every class in [0, n_classes) must have at least one image.
    n_boot : replicates.
    level : confidence level of the two-sided percentile interval.

    Returns
    -------
    :class:`BootstrapResult`; the overall statistic is the mean of the per-class scores.
    """
    rng = np.random.default_rng(rng)
    hits = np.asarray(hits, dtype=np.float64)
    y = np.asarray(y)
    reps = np.zeros((n_boot, n_classes))
    est = np.zeros(n_classes)
    for c in range(n_classes):
        h = hits[y == c]
        if h.size == 0:
            raise ValueError(f"class id {c} has no images")
        est[c] = h.mean()
        idx = rng.integers(0, h.size, size=(n_boot, h.size))
        reps[:, c] = h[idx].mean(axis=1)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.percentile(reps, q, axis=0)
    overall = reps.mean(axis=1)
    olo, ohi = np.percentile(overall, q)
    return BootstrapResult(
        estimate=est, low=lo, high=hi, estimate_overall=float(est.mean()),
        low_overall=float(olo), high_overall=float(ohi), level=float(level), n=int(n_boot),
    )
