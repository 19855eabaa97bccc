"""Concept rankers: the paper's method and rankers that use more of what dissection knows.

Every ranker has one interface, in scikit-learn style (parameters in ``__init__``, learned
attributes end in ``_``)::

    r = make_ranker("net2vec").fit(X_train, y_train, bank, X_max=M_train, probe=probe, svm=svm)
    r.local(X, X_max=M, k=10)   # per image: top-k RankedConcept, best first
    r.global_(g=10, sign="+")   # per class (r.classes_ order): top-g concepts for (+) / against (-)

``X`` (N, U) are per-image mean activations (the paper's Formula 1), ``X_max`` (N, U) the maxima of
the same maps, ``bank`` (:class:`UnitBank`) what dissection said about every unit, ``probe``
(:class:`ProbeActivations`) per-image activations and concept presence on the probe set, ``svm``
a fitted linear model (:class:`conceptrank.core.ranking.GlobalRanker`; fitted here when omitted).
Concepts are the labelled ones (``bank.concepts``); a concept's ``unit`` in a ranking is its
best-scoring unit for that image / class. Scores are comparable within one ranking, not across
rankers. Notation: ``z = (x − μ) / σ`` with the SVM's scaler, ``w_c`` the SVM weights of class c,
``τ_u`` unit u's dissection threshold, ``IoU_u`` its IoU with its concept, ``u ∈ k`` the units
labelled with concept k.

``paper``
    Ferreira dos Santos & Mileo 2022: local — units by mean activation ``x_u``, mapped to concepts,
    first unit per concept (optionally among the top ``local_pool`` units); global — units by SVM
    weight ``w_cu`` (optionally among the top ``global_pool``), first unit per concept.
    :func:`conceptrank.core.ranking.local_rankings` / ``global_rankings`` unchanged.
``aggregate``
    Concept-level aggregation (every unit of a concept counts, not its best one):
    local ``Σ_{u∈k} IoU_u x_u / Σ_{u∈k} IoU_u``; global ``Σ_{u∈k} IoU_u w_cu`` (``how='iou'``), or the
    plain mean / sum (``how='sum'``).
``presence``
    Network Dissection's own notion of "the concept is here" (Bau et al. 2017: a unit detects its
    concept where its map exceeds ``τ_u``): local ``Σ_{u∈k} IoU_u (max_u / τ_u) / Σ IoU_u``;
    global — the class contrast of that presence, ``(mean_{i∈c} p_ik − mean_i p_ik) / std_i p_ik``
    over the training images.
``contribution``
    Decision contribution, the exact split of the linear score (:mod:`conceptrank.core.faithfulness`):
    local ``Σ_{u∈k} z⁺_u w_ŷu`` for the predicted class ŷ, with ``z⁺ = max(z, 0)`` (only what is
    above its training mean, i.e. present, counts; ``evidence='signed'`` uses ``z``, the exact split);
    global its class mean ``mean_{i∈c} Σ_{u∈k} z⁺_iu w_cu`` over the class's training images.
``net2vec``
    Multi-unit concept vectors (Fong & Vedaldi 2018, Net2Vec, at image level): per concept an
    L2-regularised logistic regression on the probe set's standardized ``[mean, max]`` unit
    activations predicts whether the concept is in the image. Local — its probability
    ``σ(a_k · f(x) + b_k)``; global — its class contrast ``mean_{i∈c} p_ik − mean_i p_ik``.
``ibd``
    Interpretable Basis Decomposition (Zhou et al. 2018): concept vectors ``q_k`` (unit norm) fitted
    on the probe set in the SVM's feature space (logistic regression on ``z`` of the probe's mean
    activations); each class weight vector is decomposed ``w_c ≈ Σ_k s_ck q_k`` with ``s ≥ 0``
    (non-negative least squares). Global — ``s_ck``; local — the concept's part of the predicted
    class's score, ``s_ŷk (q_k · z)``.
``tcav``
    TCAV (Kim et al. 2018): the concept activation vector is the same probe-fitted ``q_k``; the class
    score's directional derivative along it is ``S_c · q_k = w_c · q_k``. The class score is linear in
    ``z``, so the derivative is the same for every image and TCAV's "fraction of images with a
    positive derivative" is 0 or 1: global — the derivative ``w_c · q_k`` itself (the TCAV score
    ranks those with a positive one first); local — ``(q_k · z)(w_ŷ · q_k)``, the concept's
    projection times the predicted class's sensitivity to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
from sklearn.base import BaseEstimator

from conceptrank.core.ranking import (
    GlobalRanker,
    RankedConcept,
    global_rankings,
    local_rankings,
    unit_concept_table,
)
from conceptrank.errors import ConceptrankError

__all__ = [
    "DEFAULT_RANKER",
    "RANKERS",
    "AggregateRanker",
    "ConceptRanker",
    "ContributionRanker",
    "IBDRanker",
    "Net2VecRanker",
    "PaperRanker",
    "PresenceRanker",
    "ProbeActivations",
    "TCAVRanker",
    "UnitBank",
    "decompose_weights",
    "fit_concept_vectors",
    "make_ranker",
    "rank_lists",
    "ranked_lists",
    "ranker_needs",
    "resolve_ranker",
]

RankerName = Literal["paper", "aggregate", "presence", "contribution", "net2vec", "ibd", "tcav"]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitBank:
    """What dissection says about the U units of a layer.

    Attributes
    ----------
    unit_concepts : length U; per unit ``(concept, category, iou)`` or None (no concept).
    thresholds : (U,) dissection thresholds τ_u (``thresholds.npy``), or None.
    """

    unit_concepts: tuple
    thresholds: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit_concepts", tuple(self.unit_concepts))
        if self.thresholds is not None:
            t = np.asarray(self.thresholds, dtype=np.float64).reshape(-1)
            if t.shape != (len(self.unit_concepts),):
                raise ConceptrankError(f"thresholds are ({t.size},) but the layer has {len(self.unit_concepts)} units")
            object.__setattr__(self, "thresholds", t)

    @property
    def num_units(self) -> int:
        return len(self.unit_concepts)

    def table(self) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        """``(ids (U,), names (V,), categories (V,), iou (U,))``; ids −1 / iou 0 for unlabelled units."""
        ids, names = unit_concept_table(self.unit_concepts)
        cats = [""] * len(names)
        iou = np.zeros(len(ids))
        for u, c in enumerate(self.unit_concepts):
            if ids[u] >= 0:
                iou[u] = float(c[2])
                if not cats[ids[u]]:
                    cats[ids[u]] = c[1]
        return ids, names, cats, iou


@dataclass(frozen=True)
class ProbeActivations:
    """Per-image activations of the layer on the probe set and the concepts visible in each image.

    Attributes
    ----------
    mean, max : (P, U) float — mean and max of every unit's map on every probe image.
    present : (P, L) bool — concept l is visible (any pixel, or the image-level label) in image p.
    concepts : length L names of the ``present`` columns.
    """

    mean: np.ndarray
    max: np.ndarray
    present: np.ndarray
    concepts: tuple
    _fits: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def concept_vectors(self, names: Sequence[str], features: Literal["mean", "mean+max"], C: float,
                        max_iter: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Logistic-regression concept vectors on the probe's standardized features (cached per arguments).

        Returns
        -------
        coef : (V, D) over ``(f − mean) / scale``; intercept : (V,); mean, scale : (D,) the probe's
        scaler, with D = U ('mean') or 2U ('mean+max', mean features first).
        """
        key = (tuple(names), features, float(C), int(max_iter))
        if key not in self._fits:
            F = np.asarray(self.mean, dtype=np.float64)
            if features == "mean+max":
                F = np.hstack([F, np.asarray(self.max, dtype=np.float64)])
            mu, sd = F.mean(axis=0), F.std(axis=0)
            sd = np.where(sd > 0, sd, 1.0)
            coef, icpt = fit_concept_vectors((F - mu) / sd, self.columns(names), C, max_iter)
            self._fits[key] = (coef, icpt, mu, sd)
        return self._fits[key]

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """(P, V) presence of the named concepts; a concept the probe set does not know is an error."""
        index = {n: i for i, n in enumerate(self.concepts)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ConceptrankError(f"the probe activations know no concept(s) {missing[:5]}")
        return np.asarray(self.present)[:, [index[n] for n in names]].astype(bool)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _membership(ids: np.ndarray, weights: np.ndarray, V: int) -> np.ndarray:
    """(U, V) matrix with ``weights[u]`` at (u, ids[u]) for labelled units, 0 elsewhere."""
    M = np.zeros((ids.shape[0], V))
    lab = np.flatnonzero(ids >= 0)
    M[lab, ids[lab]] = weights[lab]
    return M


def _best_unit(T: np.ndarray, ids: np.ndarray, V: int) -> np.ndarray:
    """(R, V) index of the unit with the largest term ``T`` (R, U) among each concept's units.

    Ties go to the lower unit index; concepts without units get −1.
    """
    T = np.atleast_2d(np.asarray(T, dtype=np.float64))
    lab = np.flatnonzero(ids >= 0)
    cols = lab[np.argsort(ids[lab], kind="stable")]
    out = np.full((T.shape[0], V), -1, dtype=np.int64)
    if cols.size == 0:
        return out
    groups, starts = np.unique(ids[cols], return_index=True)
    T2 = T[:, cols]
    top = np.maximum.reduceat(T2, starts, axis=1)
    counts = np.diff(np.append(starts, cols.size))
    pos = np.where(T2 >= np.repeat(top, counts, axis=1), np.arange(cols.size)[None, :], cols.size)
    first = np.minimum.reduceat(pos, starts, axis=1)
    out[:, groups] = cols[first]
    return out


def _argmax_products(pairs: Sequence[tuple[np.ndarray, np.ndarray]], sign: np.ndarray | None = None) -> np.ndarray:
    """(R, V) ``argmax_u sign[r, v] · Σ_j A_j[r, u] B_j[v, u]`` over pairs of (R, U), (V, U) arrays.

    The unit a concept vector leans on most for a row; computed in row chunks of bounded memory.
    """
    R, U = pairs[0][0].shape
    V = pairs[0][1].shape[0]
    out = np.zeros((R, V), dtype=np.int64)
    step = max(1, int(4e6 // max(V * U, 1)))
    for r0 in range(0, R, step):
        T = sum(A[r0:r0 + step, None, :] * B[None, :, :] for A, B in pairs)  # (r, V, U)
        if sign is not None:
            T = T * np.sign(sign[r0:r0 + step])[:, :, None]
        out[r0:r0 + step] = np.argmax(T, axis=2)
    return out


def ranked_lists(
    scores: np.ndarray, units: np.ndarray, names: Sequence[str], cats: Sequence[str], depth: int,
    sign: str | None = None,
) -> list[list[RankedConcept]]:
    """Top-``depth`` concepts of every row of a (R, V) score matrix.

    Parameters
    ----------
    scores : (R, V) concept scores; nan never ranks.
    units : (R, V) the unit reported for each (row, concept).
    names, cats : V concept names and categories.
    depth : concepts kept per row.
    sign : None — all concepts, highest first; '+' — positive scores only, highest first;
        '-' — negative scores only, most negative first. Ties go to the lower concept id.
    """
    S = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    key = -S if sign in (None, "+") else S
    keep = np.isfinite(S) if sign is None else (S > 0 if sign == "+" else S < 0)
    key = np.where(keep, key, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :depth]
    out = []
    for r in range(S.shape[0]):
        row = order[r][keep[r, order[r]]]
        out.append([RankedConcept(names[v], cats[v], int(units[r, v]), float(S[r, v])) for v in row])
    return out


def _class_means(A: np.ndarray, y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(C, ...) mean of A's rows over each class's images."""
    return np.stack([A[y == c].mean(axis=0) for c in classes])


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def fit_concept_vectors(
    F: np.ndarray, present: np.ndarray, C: float = 0.1, max_iter: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """One L2-regularised logistic regression per concept: is concept k in the image?

    Parameters
    ----------
    F : (P, D) probe features (already standardized).
    present : (P, V) bool targets.
    C : inverse regularisation strength (sklearn's ``C``).

    Returns
    -------
    coef : (V, D); intercept : (V,). A concept present in every image or none gets a zero vector
    and the log-odds of its (clipped) prevalence.
    """
    from sklearn.linear_model import LogisticRegression

    F = np.asarray(F, dtype=np.float64)
    Y = np.asarray(present, dtype=bool)
    coef = np.zeros((Y.shape[1], F.shape[1]))
    icpt = np.zeros(Y.shape[1])
    for k in range(Y.shape[1]):
        n = int(Y[:, k].sum())
        if n == 0 or n == Y.shape[0]:
            p = np.clip(n / max(Y.shape[0], 1), 1e-3, 1 - 1e-3)
            icpt[k] = np.log(p / (1 - p))
            continue
        lr = LogisticRegression(C=C, max_iter=max_iter).fit(F, Y[:, k])
        coef[k], icpt[k] = lr.coef_[0], lr.intercept_[0]
    return coef, icpt


def decompose_weights(W: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative decomposition of class weight vectors over concept vectors (IBD's basis).

    Solves ``min_s ||w_c − Σ_k s_ck q_k||²`` subject to ``s_ck ≥ 0`` for every class
    (``scipy.optimize.nnls``).

    Parameters
    ----------
    W : (C, U) class weight vectors.
    Q : (V, U) concept vectors.

    Returns
    -------
    S : (C, V) coefficients; residual : (C, U) ``W − S @ Q``.
    """
    from scipy.optimize import nnls

    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    Q = np.asarray(Q, dtype=np.float64)
    S = np.stack([nnls(Q.T, w)[0] for w in W]) if Q.shape[0] else np.zeros((W.shape[0], 0))
    return S, W - S @ Q


# --------------------------------------------------------------------------------------------
# the rankers
# --------------------------------------------------------------------------------------------


class ConceptRanker(BaseEstimator):
    """Base class: the shared ``fit`` bookkeeping and the ``local`` / ``global_`` contract.

    Attributes (after ``fit``)
    --------------------------
    classes_ : (C,) class labels, in the SVM's order.
    concepts_, categories_ : V labelled concept names and categories (order of first unit).
    unit_ids_ : (U,) concept id per unit, −1 unlabelled; ``unit_iou_`` (U,) IoU with it.
    svm_ : the linear model (:class:`GlobalRanker`) used by the decision-based rankers.
    global_scores_ : (C, V) concept scores per class (``paper``: None, it ranks units).
    global_units_ : (C, V) the unit reported for each class and concept.
    """

    needs: ClassVar[tuple[str, ...]] = ()  # among "max", "thresholds", "probe"
    uses_svm: ClassVar[bool] = True

    def fit(self, X, y, bank: UnitBank, *, X_max=None, probe: ProbeActivations | None = None,
            svm: GlobalRanker | None = None) -> ConceptRanker:
        """Fit on the training images.

        Parameters
        ----------
        X : (N, U) mean activations; y : (N,) class labels.
        bank : the dissection's unit labels (and thresholds).
        X_max : (N, U) per-image maxima (``presence``, ``net2vec``).
        probe : probe-set activations and concept presence (``net2vec``, ``ibd``, ``tcav``).
        svm : an already fitted :class:`GlobalRanker` on (X, y); fitted here (standard protocol)
            when omitted and the ranker uses one.
        """
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        self._check_inputs(bank, X_max, probe, X.shape[1])
        if svm is None and self.uses_svm:
            svm = GlobalRanker("standard").fit(X, y)
        self.svm_ = svm
        self.classes_ = np.asarray(svm.classes_) if svm is not None else np.unique(y)
        self.unit_ids_, names, cats, self.unit_iou_ = bank.table()
        self.concepts_, self.categories_ = tuple(names), tuple(cats)
        self.bank_ = bank
        self._fit(X, y, None if X_max is None else np.asarray(X_max, dtype=np.float64), probe)
        return self

    def _check_inputs(self, bank: UnitBank, X_max, probe, U: int) -> None:
        name = next((k for k, v in _CLASSES.items() if v is type(self)), type(self).__name__)
        if bank.num_units != U:
            raise ConceptrankError(f"ranker {name}: the unit bank has {bank.num_units} units, the activations {U}")
        if "max" in self.needs and X_max is None:
            raise ConceptrankError(f"ranker {name} needs the per-image maxima (activations.npz 'max', written by extract)")
        if "thresholds" in self.needs and bank.thresholds is None:
            raise ConceptrankError(f"ranker {name} needs the dissection thresholds (thresholds.npy beside tally.csv, "
                                   "written by dissect)")
        if "probe" in self.needs and probe is None:
            raise ConceptrankError(f"ranker {name} needs the probe set's per-image activations (probe_activations.npz "
                                   "beside tally.csv: `conceptrank probe-activations --out <dissect folder>`)")

    @property
    def n_concepts(self) -> int:
        return len(self.concepts_)

    def _z(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.svm_.scaler_mean_) / self.svm_.scaler_scale_

    def _predicted(self, X: np.ndarray) -> np.ndarray:
        """(N,) index of the predicted class."""
        return np.argmax(self.svm_.decision_function(X), axis=1)

    def _fit(self, X, y, X_max, probe) -> None:
        raise NotImplementedError

    def local_scores(self, X, X_max=None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (N, V), units (N, V))`` of every concept in every image."""
        raise NotImplementedError

    def local(self, X, X_max=None, k: int = 10) -> list[list[RankedConcept]]:
        """Per image its top-``k`` concepts (highest score first)."""
        S, units = self.local_scores(X, X_max)
        return ranked_lists(S, units, self.concepts_, self.categories_, k)

    def global_(self, g: int = 10, sign: str = "+") -> list[list[RankedConcept]]:
        """Per class (``classes_`` order) its top-``g`` concepts with a positive ('+') or negative ('-') score."""
        return ranked_lists(self.global_scores_, self.global_units_, self.concepts_, self.categories_, g, sign)

    def global_sets(self, g: int = 10) -> list[frozenset]:
        """Per class (``classes_`` order) the set of its top-``g`` supporting concepts (what stability compares)."""
        return [frozenset(rc.concept for rc in lst) for lst in self.global_(g, "+")]


class PaperRanker(ConceptRanker):
    """The paper's method, unchanged (the reference).

    Parameters
    ----------
    local_pool : only the top ``local_pool`` units of an image count (paper protocol: 20; None all).
    global_pool : only the top ``global_pool`` weighted units of a class count (paper: 10; None all).
    """

    def __init__(self, local_pool: int | None = None, global_pool: int | None = None):
        self.local_pool = local_pool
        self.global_pool = global_pool

    def _fit(self, X, y, X_max, probe) -> None:
        self.global_scores_ = None
        self.global_units_ = None

    def local(self, X, X_max=None, k: int = 10) -> list[list[RankedConcept]]:
        return local_rankings(np.asarray(X), list(self.bank_.unit_concepts), k, self.local_pool)

    def local_scores(self, X, X_max=None):
        raise NotImplementedError("the paper ranks units, not concepts: use local()")

    def global_(self, g: int = 10, sign: str = "+") -> list[list[RankedConcept]]:
        return global_rankings(self.svm_.coef_, list(self.bank_.unit_concepts), g, self.global_pool, sign)


class AggregateRanker(ConceptRanker):
    """Concept-level aggregation of the paper's scores over all units of a concept.

    Parameters
    ----------
    how : 'iou' — IoU-weighted (local: weighted mean of ``x_u``; global: ``Σ IoU_u w_cu``);
        'sum' — unweighted (local: mean; global: sum).
    """

    def __init__(self, how: Literal["iou", "sum"] = "iou"):
        self.how = how

    def _weights(self) -> np.ndarray:
        if self.how not in ("iou", "sum"):
            raise ConceptrankError(f"aggregate: unknown how={self.how!r} (expected 'iou' or 'sum')")
        w = self.unit_iou_ if self.how == "iou" else np.ones_like(self.unit_iou_)
        return _membership(self.unit_ids_, w, self.n_concepts)

    def _fit(self, X, y, X_max, probe) -> None:
        M = self._weights()
        self.global_scores_ = self.svm_.coef_ @ M
        self.global_units_ = _best_unit(self.svm_.coef_, self.unit_ids_, self.n_concepts)

    def local_scores(self, X, X_max=None):
        X = np.asarray(X, dtype=np.float64)
        M = self._weights()
        return X @ M / M.sum(axis=0), _best_unit(X, self.unit_ids_, self.n_concepts)


class PresenceRanker(ConceptRanker):
    """Presence relative to the dissection threshold: ``max_u(x) / τ_u``, IoU-weighted over a concept's units."""

    needs = ("max", "thresholds")
    uses_svm = False

    def __init__(self):
        pass

    def presence(self, X_max) -> tuple[np.ndarray, np.ndarray]:
        """``(p (N, V), units (N, V))``: IoU-weighted mean of ``max_u / τ_u`` over each concept's units."""
        R = np.asarray(X_max, dtype=np.float64) / np.where(self.bank_.thresholds > 0, self.bank_.thresholds, np.inf)
        M = _membership(self.unit_ids_, self.unit_iou_, self.n_concepts)
        return R @ M / M.sum(axis=0), _best_unit(R, self.unit_ids_, self.n_concepts)

    def _fit(self, X, y, X_max, probe) -> None:
        P, _ = self.presence(X_max)
        sd = P.std(axis=0)
        self.global_scores_ = (_class_means(P, y, self.classes_) - P.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        R = np.asarray(X_max, dtype=np.float64) / np.where(self.bank_.thresholds > 0, self.bank_.thresholds, np.inf)
        self.global_units_ = _best_unit(_class_means(R, y, self.classes_), self.unit_ids_, self.n_concepts)

    def local_scores(self, X, X_max=None):
        if X_max is None:
            raise ConceptrankError("ranker presence needs the per-image maxima (activations.npz 'max')")
        return self.presence(X_max)


class ContributionRanker(ConceptRanker):
    """Decision contribution: ``Σ_{u∈k} z_u w_cu`` (local: predicted class; global: class mean).

    Parameters
    ----------
    evidence : 'present' — only units above their training mean count, ``max(z_u, 0) w_cu``: what
        is *in* the image and drives the score; 'signed' — the exact split ``z_u w_cu``, where a
        unit below its mean on a negatively weighted unit counts as evidence too ("no red, so not
        juggling" ranks red for every other class).
    """

    def __init__(self, evidence: Literal["present", "signed"] = "present"):
        self.evidence = evidence

    def _terms_z(self, X) -> np.ndarray:
        if self.evidence not in ("present", "signed"):
            raise ConceptrankError(f"contribution: unknown evidence={self.evidence!r} (expected 'present' or 'signed')")
        Z = self._z(X)
        return np.maximum(Z, 0.0) if self.evidence == "present" else Z

    def _fit(self, X, y, X_max, probe) -> None:
        T = _class_means(self._terms_z(X), y, self.classes_) * self.svm_.coef_  # (C, U)
        M = _membership(self.unit_ids_, np.ones(len(self.unit_ids_)), self.n_concepts)
        self.global_scores_ = T @ M
        self.global_units_ = _best_unit(T, self.unit_ids_, self.n_concepts)

    def local_scores(self, X, X_max=None):
        T = self._terms_z(X) * self.svm_.coef_[self._predicted(X)]
        M = _membership(self.unit_ids_, np.ones(len(self.unit_ids_)), self.n_concepts)
        return T @ M, _best_unit(T, self.unit_ids_, self.n_concepts)


class Net2VecRanker(ConceptRanker):
    """Probe-fitted multi-unit concept classifiers on ``[mean, max]`` activations.

    Parameters
    ----------
    C : inverse L2 strength of every concept's logistic regression.
    max_iter : solver iteration cap.

    Attributes
    ----------
    coef_ : (V, 2U) concept vectors over the standardized ``[mean, max]`` features;
    intercept_ : (V,); feature_mean_, feature_scale_ : (2U,) the probe's scaler.
    """

    needs = ("max", "probe")
    uses_svm = False

    def __init__(self, C: float = 0.1, max_iter: int = 2000):
        self.C = C
        self.max_iter = max_iter

    def _features(self, X, X_max) -> np.ndarray:
        F = np.hstack([np.asarray(X, dtype=np.float64), np.asarray(X_max, dtype=np.float64)])
        return (F - self.feature_mean_) / self.feature_scale_

    def _fit(self, X, y, X_max, probe) -> None:
        self.coef_, self.intercept_, self.feature_mean_, self.feature_scale_ = probe.concept_vectors(
            self.concepts_, "mean+max", self.C, self.max_iter)
        P, _ = self.local_scores(X, X_max)
        self.global_scores_ = _class_means(P, y, self.classes_) - P.mean(axis=0)
        F = self._features(X, X_max)
        self.global_units_ = self._units(_class_means(F, y, self.classes_) - F.mean(axis=0))

    def _units(self, F: np.ndarray) -> np.ndarray:
        """(R, V) unit with the largest term ``a_k,u f_u`` (a unit's mean and max terms summed)."""
        U = F.shape[1] // 2
        return _argmax_products([(F[:, :U], self.coef_[:, :U]), (F[:, U:], self.coef_[:, U:])])

    def local_scores(self, X, X_max=None):
        if X_max is None:
            raise ConceptrankError("ranker net2vec needs the per-image maxima (activations.npz 'max')")
        F = self._features(X, X_max)
        return _sigmoid(F @ self.coef_.T + self.intercept_), self._units(F)


class _ProbeVectorRanker(ConceptRanker):
    """Concept vectors ``q_k`` (unit norm) fitted on the probe's mean activations in the SVM's space."""

    needs = ("probe",)

    def __init__(self, C: float = 0.1, max_iter: int = 2000):
        self.C = C
        self.max_iter = max_iter

    def _fit_vectors(self, probe: ProbeActivations) -> None:
        # a on (x − m) / s is (a σ / s) on z = (x − μ) / σ, up to a constant: the fit is done once per
        # probe set in its own standardization and mapped into the SVM's
        A, _, _, s = probe.concept_vectors(self.concepts_, "mean", self.C, self.max_iter)
        Q = A * self.svm_.scaler_scale_[None, :] / s[None, :]
        norm = np.linalg.norm(Q, axis=1, keepdims=True)
        self.concept_vectors_ = Q / np.where(norm > 0, norm, 1.0)


class IBDRanker(_ProbeVectorRanker):
    """IBD: ``w_c ≈ Σ_k s_ck q_k``, ``s ≥ 0``; global ``s_ck``, local ``s_ŷk (q_k · z)``.

    Attributes
    ----------
    concept_vectors_ : (V, U) unit-norm q_k; coefficients_ : (C, V) s; residual_ : (C, U);
    explained_ : (C,) share of ``||w_c||²`` the concept part explains, ``1 − ||r_c||² / ||w_c||²``.
    """

    def _fit(self, X, y, X_max, probe) -> None:
        self._fit_vectors(probe)
        W = self.svm_.coef_
        self.coefficients_, self.residual_ = decompose_weights(W, self.concept_vectors_)
        wn = (W**2).sum(axis=1)
        self.explained_ = 1.0 - (self.residual_**2).sum(axis=1) / np.where(wn > 0, wn, 1.0)
        self.global_scores_ = self.coefficients_
        self.global_units_ = np.argmax(self.concept_vectors_, axis=1)[None, :].repeat(W.shape[0], axis=0)

    def local_scores(self, X, X_max=None):
        Z = self._z(X)
        s = self.coefficients_[self._predicted(X)]  # (N, V)
        return s * (Z @ self.concept_vectors_.T), _argmax_products([(Z, self.concept_vectors_)])


class TCAVRanker(_ProbeVectorRanker):
    """TCAV on a linear head: global ``w_c · q_k``; local ``(q_k · z)(w_ŷ · q_k)``.

    Attributes
    ----------
    concept_vectors_ : (V, U) unit-norm CAVs; sensitivity_ : (C, V) ``w_c · q_k``;
    tcav_scores_ : (C, V) share of the class's training images with a positive directional
    derivative (0 or 1 for a linear head).
    """

    def _fit(self, X, y, X_max, probe) -> None:
        self._fit_vectors(probe)
        self.sensitivity_ = self.svm_.coef_ @ self.concept_vectors_.T
        self.tcav_scores_ = (self.sensitivity_ > 0).astype(np.float64)
        self.global_scores_ = self.sensitivity_
        self.global_units_ = _argmax_products([(self.svm_.coef_, self.concept_vectors_)], self.sensitivity_)

    def local_scores(self, X, X_max=None):
        Z = self._z(X)
        sens = self.sensitivity_[self._predicted(X)]  # (N, V)
        return (Z @ self.concept_vectors_.T) * sens, _argmax_products([(Z, self.concept_vectors_)], sens)


_CLASSES = {
    "paper": PaperRanker, "aggregate": AggregateRanker, "presence": PresenceRanker,
    "contribution": ContributionRanker, "net2vec": Net2VecRanker, "ibd": IBDRanker, "tcav": TCAVRanker,
}
RANKERS: tuple[str, ...] = tuple(_CLASSES)


def make_ranker(name: str, **params) -> ConceptRanker:
    """A ranker by name (one of :data:`RANKERS`) with its parameters."""
    if name not in _CLASSES:
        raise ConceptrankError(f"unknown ranker {name!r}: expected one of {', '.join(RANKERS)}")
    return _CLASSES[name](**params)


#: The standard protocol's ranker, chosen by ``conceptrank benchmark-rankers`` on world seeds 1–3
#: (see the README's "Rankers" section); the paper protocol always uses ``paper``.
DEFAULT_RANKER = "net2vec"


def ranker_needs(name: str) -> tuple[str, ...]:
    """Inputs beyond mean activations and unit labels a ranker needs ('max', 'thresholds', 'probe')."""
    if name not in _CLASSES:
        raise ConceptrankError(f"unknown ranker {name!r}: expected one of {', '.join(RANKERS)}")
    return _CLASSES[name].needs


def resolve_ranker(protocol: str, requested: str | None, available: Sequence[str]) -> tuple[str, str | None]:
    """The ranker a rank run uses, and a note when the default had to give way.

    ``requested`` None means the protocol's default: ``paper`` for the paper protocol; for the
    standard protocol :data:`DEFAULT_RANKER` when every input it needs is ``available``, else
    ``paper`` (with a note saying what was missing). A requested ranker is used as is.
    """
    if requested is not None:
        ranker_needs(requested)
        return requested, None
    if protocol == "paper":
        return "paper", None
    missing = [n for n in ranker_needs(DEFAULT_RANKER) if n not in available]
    if missing:
        return "paper", (f"the default ranker {DEFAULT_RANKER!r} needs {', '.join(missing)} "
                         f"({_NEEDS_HELP}); ranked with the paper's method instead")
    return DEFAULT_RANKER, None


_NEEDS_HELP = ("max: activations.npz 'max'; thresholds: thresholds.npy beside tally.csv; "
               "probe: probe_activations.npz beside tally.csv")


def rank_lists(
    name: str, X_fit: np.ndarray, y_fit: np.ndarray, X: np.ndarray, bank: UnitBank, svm: GlobalRanker, *,
    k: int, g: int, max_fit=None, max_all=None, probe: ProbeActivations | None = None,
    local_pool: int | None = None, global_pool: int | None = None,
) -> tuple[ConceptRanker, list, list, list]:
    """Fit ranker ``name`` and rank: ``(ranker, local (N lists), for (C lists), against (C lists))``.

    Parameters
    ----------
    X_fit, y_fit : (n, U), (n,) the images the SVM was fit on; X : (N, U) every image to rank.
    max_fit, max_all : the matching per-image maxima (rankers that need them).
    k, g : concepts per image / per class and sign.
    local_pool, global_pool : the paper ranker's pools (paper protocol: 20 / 10).
    """
    r = PaperRanker(local_pool, global_pool) if name == "paper" else make_ranker(name)
    r.fit(X_fit, y_fit, bank, X_max=max_fit, probe=probe, svm=svm)
    return r, r.local(X, max_all, k=k), r.global_(g, "+"), r.global_(g, "-")
