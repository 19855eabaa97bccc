"""Pure computation of the concept rankings: unit → concept table, local and global rankings,
the Crammer–Singer linear SVM with its C grid (:class:`GlobalRanker`), classification metrics.

See :mod:`conceptrank.stages.rank` for the two protocols (``standard`` and ``paper``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from conceptrank.errors import ConceptrankError

Protocol = Literal["standard", "paper"]
Sign = Literal["+", "-"]
PROTOCOLS: tuple[Protocol, ...] = ("standard", "paper")
# the published code's choices (the ``paper`` protocol), in one place
PAPER_C = 0.001  # the SVM's C without grid search
PAPER_LOCAL_POOL = 20  # only an image's 20 most activated units make its local ranking
PAPER_GLOBAL_POOL = 10  # only a class's 10 most weighted units make its global ranking
DEFAULT_MIN_IOU: dict[str, float] = {"standard": 0.04, "paper": 0.0}  # IoU from which a unit carries a concept
DEFAULT_C_GRID = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
SPLITS = ("train", "test", "all")  # the split names every stage understands (io.targets maps any other)


def protocol_min_iou(protocol: str, min_iou: float | None = None) -> float:
    """The IoU from which a unit carries a concept: ``min_iou``, else the protocol's default."""
    return DEFAULT_MIN_IOU[protocol] if min_iou is None else float(min_iou)


def protocol_fixed_C(protocol: str, grid: bool) -> float | None:
    """The C used without search (the paper protocol without ``grid``), else None."""
    return PAPER_C if (protocol == "paper" and not grid) else None


def protocol_pools(protocol: str) -> tuple[int | None, int | None]:
    """(local pool, global pool) of a protocol: (20, 10) for the paper's, (None, None) otherwise."""
    return (PAPER_LOCAL_POOL, PAPER_GLOBAL_POOL) if protocol == "paper" else (None, None)

UnitConcepts = Sequence["tuple[str, str, float] | None"]


class RankedConcept(NamedTuple):
    """One entry of a ranking.

    ``unit`` is the 0-based unit index (the CSV files write it 1-based, like the tally);
    ``score`` is the image's mean activation (local) or the SVM weight (global).
    """

    concept: str
    category: str
    unit: int
    score: float


# --------------------------------------------------------------------------------------------
# pure computation: rankings
# --------------------------------------------------------------------------------------------


def unit_concept_table(unit_concepts: UnitConcepts) -> tuple[np.ndarray, list[str]]:
    """Integer concept ids per unit.

    Parameters
    ----------
    unit_concepts : length U; per unit ``(concept, category, iou)`` or None.

    Returns
    -------
    ids : np.ndarray (U,) int64 — concept id per unit, -1 for a unit without concept.
    names : list of concept names indexed by id (in order of first unit).
    """
    names: list[str] = []
    index: dict[str, int] = {}
    ids = np.full(len(unit_concepts), -1, dtype=np.int64)
    for u, c in enumerate(unit_concepts):
        if c is None or not c[0]:
            continue
        if c[0] not in index:
            index[c[0]] = len(names)
            names.append(c[0])
        ids[u] = index[c[0]]
    return ids, names


def _dedup_first(units: np.ndarray, ids: np.ndarray, limit: int) -> np.ndarray:
    """Units (in the given order) whose concept is seen for the first time, at most ``limit``.

    ``units`` (L,) are unit indices in rank order, all labelled; ``ids`` maps unit → concept id.
    """
    if units.size == 0:
        return units
    cid = ids[units]
    _, first = np.unique(cid, return_index=True)
    first.sort()
    return units[first[:limit]]


def local_rankings(
    mean: np.ndarray, unit_concepts: UnitConcepts, k: int, pool: int | None = None
) -> list[list[RankedConcept]]:
    """Top-K concepts of every image.

    Parameters
    ----------
    mean : (N, U) per-image mean activation of every unit.
    unit_concepts : length U; ``(concept, category, iou)`` or None (unit skipped).
    k : K, distinct concepts kept per image.
    pool : only the ``pool`` most activated units (labelled or not) are considered (paper: 20);
        None considers all units.

    Returns
    -------
    list of N lists, each of at most K :class:`RankedConcept` — units sorted by mean activation
    descending (ties: lower unit index first), mapped to concepts, deduplicated in rank order.
    """
    mean = np.asarray(mean)
    if mean.ndim != 2 or mean.shape[1] != len(unit_concepts):
        raise ValueError(f"mean must be (N, {len(unit_concepts)}), got {mean.shape}")
    if k < 1:
        raise ValueError("k must be ≥ 1")
    ids, _ = unit_concept_table(unit_concepts)
    labelled = np.flatnonzero(ids >= 0)
    out: list[list[RankedConcept]] = []
    chunk = 1024
    for start in range(0, mean.shape[0], chunk):
        block = mean[start : start + chunk]
        if pool is None:
            # Sorting only the labelled columns keeps their relative order (ties by unit index).
            order = labelled[np.argsort(-block[:, labelled], axis=1, kind="stable")]
        else:
            order = np.argsort(-block, axis=1, kind="stable")[:, :pool]
        for r in range(block.shape[0]):
            row = order[r]
            if pool is not None:
                row = row[ids[row] >= 0]
            units = _dedup_first(row, ids, k)
            out.append([
                RankedConcept(unit_concepts[u][0], unit_concepts[u][1], int(u), float(block[r, u]))
                for u in units
            ])
    return out


def global_rankings(
    coef: np.ndarray, unit_concepts: UnitConcepts, g: int, pool: int | None = None, sign: Sign = "+"
) -> list[list[RankedConcept]]:
    """Top-G concepts of every class from the SVM weights.

    Parameters
    ----------
    coef : (C, U) weights, one row per class.
    unit_concepts : length U; ``(concept, category, iou)`` or None (unit skipped).
    g : G, distinct concepts kept per class.
    pool : only the ``pool`` units with the largest weights of the requested sign are considered
        (paper: 10), so fewer than G concepts may remain; None considers all of them.
    sign : '+' — units with positive weight, largest first ("evidence for");
        '-' — units with negative weight, most negative first ("evidence against").

    Returns
    -------
    list of C lists of at most G :class:`RankedConcept` (score = the signed weight); ties in
    weight go to the lower unit index.
    """
    coef = np.asarray(coef, dtype=np.float64)
    if coef.ndim != 2 or coef.shape[1] != len(unit_concepts):
        raise ValueError(f"coef must be (C, {len(unit_concepts)}), got {coef.shape}")
    if sign not in ("+", "-"):
        raise ValueError("sign must be '+' or '-'")
    if g < 1:
        raise ValueError("g must be ≥ 1")
    ids, _ = unit_concept_table(unit_concepts)
    out = []
    for w in coef:
        key = -w if sign == "+" else w
        order = np.argsort(key, kind="stable")
        order = order[key[order] < 0]  # strictly positive (or negative) weights only
        if pool is not None:
            order = order[:pool]
        order = order[ids[order] >= 0]
        units = _dedup_first(order, ids, g)
        out.append([RankedConcept(unit_concepts[u][0], unit_concepts[u][1], int(u), float(w[u])) for u in units])
    return out


# --------------------------------------------------------------------------------------------
# pure computation: the classifier
# --------------------------------------------------------------------------------------------


def _svm(C: float, seed: int, max_iter: int) -> LinearSVC:
    return LinearSVC(
        C=C, multi_class="crammer_singer", loss="hinge", dual=True, class_weight="balanced",
        random_state=seed, max_iter=max_iter,
    )


def _full_params(model: LinearSVC, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(C, U) coef and (C,) intercept over ``classes`` from a fitted LinearSVC.

    A binary Crammer–Singer model stores one row w (class 1 minus class 0); it is written as
    rows (-w/2, +w/2) and intercepts (-b/2, +b/2), which give the same decisions. A class absent
    from the model's training data (possible with the paper protocol's unshuffled KFold) gets a
    zero row and intercept -inf: it can never be predicted. Returns also those missing classes.
    """
    mc = list(model.classes_)
    coef = np.asarray(model.coef_, dtype=np.float64)
    icpt = np.asarray(model.intercept_, dtype=np.float64)
    if len(mc) == 2 and coef.shape[0] == 1:
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
    full_coef = np.zeros((len(classes), coef.shape[1]))
    full_icpt = np.full(len(classes), -np.inf)
    missing = []
    pos = {c: i for i, c in enumerate(mc)}
    for i, c in enumerate(classes):
        if c in pos:
            full_coef[i] = coef[pos[c]]
            full_icpt[i] = icpt[pos[c]]
        else:
            missing.append(str(c))
    return full_coef, full_icpt, missing


class GlobalRanker(ClassifierMixin, BaseEstimator):
    """Crammer–Singer linear SVM with the model selection of a ranking protocol.

    Parameters
    ----------
    protocol : 'standard' — StandardScaler (fit on the data given to ``fit``, refit in every
        fold), C chosen by ``StratifiedKFold(folds, shuffle=True, random_state=seed)`` macro F1,
        final model refit on all the data; 'paper' — no scaling, ``KFold(folds)`` without
        shuffling, the fold model with the best macro F1 is kept.
    C : a fixed C (no search); None searches ``c_grid``.
    c_grid : candidate C values (searched in ascending order; ties go to the smaller C).
    folds : number of folds.
    seed : ``random_state`` of the folds and of liblinear.
    max_iter : liblinear iteration cap.

    Attributes
    ----------
    classes_ : (C,) class labels, sorted.
    coef_ : (C, U) float64 weights, in the scaled feature space.
    intercept_ : (C,) float64.
    best_C_ : the C of the kept model.
    cv_scores_ : dict C → list of per-fold macro F1.
    scaler_mean_, scaler_scale_ : (U,) — decision = ((X - mean) / scale) @ coef_.T + intercept_;
        zeros / ones when not standardized.
    train_mean_ : (U,) mean of the features the kept model was fit on (= ``scaler_mean_`` when
        standardized; the kept fold's training part for 'paper').
    best_fold_ : paper protocol: index of the kept fold model (None for standard).
    eval_index_ : paper protocol: indices (into the fitted X) of the kept fold's held-out part.
    missing_classes_ : classes the kept model never saw (paper protocol only; usually empty).
    n_iter_ : liblinear iterations of the kept model.
    convergence_warnings_ : number of fits that stopped at ``max_iter``.
    """

    def __init__(
        self,
        protocol: Protocol = "standard",
        C: float | None = None,
        c_grid: Sequence[float] = DEFAULT_C_GRID,
        folds: int = 5,
        seed: int = 0,
        max_iter: int = 20000,
    ):
        self.protocol = protocol
        self.C = C
        self.c_grid = c_grid
        self.folds = folds
        self.seed = seed
        self.max_iter = max_iter

    # -- helpers -------------------------------------------------------------------------------

    def _candidates(self) -> list[float]:
        if self.C is not None:
            return [float(self.C)]
        return sorted(float(c) for c in self.c_grid)

    def _fit_one(self, X: np.ndarray, y: np.ndarray, C: float) -> LinearSVC:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                model = _svm(C, self.seed, self.max_iter).fit(X, y)
            except ValueError as e:
                raise ConceptrankError(f"the SVM cannot be fit (C={C:g}): {e}") from None
        self._n_conv += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        return model

    # -- estimator API -------------------------------------------------------------------------

    def fit(self, X: np.ndarray, y: Sequence[str]) -> "GlobalRanker":
        """Select C and fit.

        Parameters
        ----------
        X : (N, U) features — for 'standard' the training split only.
        y : (N,) class labels.
        """
        if self.protocol not in PROTOCOLS:
            raise ConceptrankError(f"unknown protocol {self.protocol!r}")
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or X.shape[0] != y.shape[0]:
            raise ValueError(f"X must be (N, U) with N = len(y); got {X.shape} and {y.shape}")
        if not np.all(np.isfinite(X)):
            raise ConceptrankError("features contain NaN or infinite values")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ConceptrankError(f"the classifier needs at least 2 classes, got {list(self.classes_)}")
        self._n_conv = 0
        if self.protocol == "standard":
            self._fit_standard(X, y)
        else:
            self._fit_paper(X, y)
        self.convergence_warnings_ = self._n_conv
        del self._n_conv
        return self

    def _fit_standard(self, X: np.ndarray, y: np.ndarray) -> None:
        labels, counts = np.unique(y, return_counts=True)
        small = [(str(c), int(n)) for c, n in zip(labels, counts) if n < self.folds]
        if small:
            desc = ", ".join(f"{c!r} has {n}" for c, n in small)
            raise ConceptrankError(
                f"{len(small)} class(es) have fewer training images than the {self.folds} CV folds ({desc}); "
                "add images or lower the number of folds"
            )
        skf = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=self.seed)
        splits = list(skf.split(X, y))
        self.cv_scores_ = {}
        for C in self._candidates():
            scores = []
            for tr, va in splits:
                sc = StandardScaler().fit(X[tr])
                m = self._fit_one(sc.transform(X[tr]), y[tr], C)
                pred = m.predict(sc.transform(X[va]))
                scores.append(float(f1_score(y[va], pred, average="macro", labels=self.classes_, zero_division=0)))
            self.cv_scores_[C] = scores
        self.best_C_ = _argmax_C(self.cv_scores_)
        sc = StandardScaler().fit(X)
        model = self._fit_one(sc.transform(X), y, self.best_C_)
        self.coef_, self.intercept_, self.missing_classes_ = _full_params(model, self.classes_)
        self.scaler_mean_ = np.asarray(sc.mean_, dtype=np.float64)
        self.scaler_scale_ = np.asarray(sc.scale_, dtype=np.float64)
        self.train_mean_ = self.scaler_mean_
        self.n_iter_ = int(model.n_iter_)
        self.best_fold_ = None
        self.eval_index_ = None

    def _fit_paper(self, X: np.ndarray, y: np.ndarray) -> None:
        if X.shape[0] < self.folds:
            raise ConceptrankError(f"{X.shape[0]} images are fewer than the {self.folds} KFold folds")
        # The published code listed images with os.listdir (an arbitrary, effectively shuffled
        # order) and then ran KFold without shuffling. Our images come sorted by class, where
        # unshuffled folds would hold out whole classes; a seeded permutation stands in for the
        # listdir order, and the folds over it are KFold's contiguous, unshuffled blocks.
        perm = np.random.default_rng(self.seed).permutation(X.shape[0])
        splits = [(perm[tr], perm[va]) for tr, va in KFold(n_splits=self.folds).split(perm)]
        self.cv_scores_ = {}
        best: dict[float, tuple[float, int, Any]] = {}
        for C in self._candidates():
            scores = []
            keep = (0.0, 0, None)
            for i, (tr, va) in enumerate(splits):
                m = self._fit_one(X[tr], y[tr], C)
                f1 = float(f1_score(y[va], m.predict(X[va]), average="macro", zero_division=0))
                scores.append(f1)
                if keep[2] is None or f1 > keep[0]:  # published code: strictly better replaces
                    keep = (f1, i, m)
            self.cv_scores_[C] = scores
            best[C] = keep
        self.best_C_ = _argmax_C(self.cv_scores_)
        _, fold, model = best[self.best_C_]
        self.coef_, self.intercept_, self.missing_classes_ = _full_params(model, self.classes_)
        U = X.shape[1]
        self.scaler_mean_ = np.zeros(U)
        self.scaler_scale_ = np.ones(U)
        self.train_mean_ = X[splits[fold][0]].mean(axis=0)
        self.n_iter_ = int(model.n_iter_)
        self.best_fold_ = fold
        self.eval_index_ = splits[fold][1]

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(N, C) scores: ((X - scaler_mean_) / scaler_scale_) @ coef_.T + intercept_."""
        X = np.asarray(X, dtype=np.float64)
        return ((X - self.scaler_mean_) / self.scaler_scale_) @ self.coef_.T + self.intercept_

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N,) predicted class labels (argmax of the decision; ties to the first class)."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def _argmax_C(cv_scores: dict[float, list[float]]) -> float:
    """The C with the highest mean fold score; ties go to the smaller C."""
    best, best_mean = None, -np.inf
    for C in sorted(cv_scores):
        m = float(np.mean(cv_scores[C]))
        if m > best_mean:
            best, best_mean = C, m
    return float(best)


@dataclass(frozen=True)
class ClassificationMetrics:
    """How well the linear ranker classifies the evaluated images.

    Attributes
    ----------
    accuracy, macro_precision, macro_recall, macro_f1 : macro averages run over the classes present
        in the true or predicted labels (sklearn's default).
    per_class : class → {"precision", "recall", "f1", "support"}.
    confusion_matrix : (C, C) counts as nested lists; rows = true class, columns = predicted, in
        the order of the ``classes`` given.
    """

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict
    confusion_matrix: list


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> ClassificationMetrics:
    """Accuracy, macro and per-class precision/recall/F1, confusion matrix (rows = true class).

    Macro averages run over the classes present in ``y_true`` or ``y_pred`` (sklearn's default),
    so an evaluated part lacking some classes (a paper-protocol fold) is not scored on them.

    Parameters
    ----------
    y_true, y_pred : (N,) labels.
    classes : label order of the per-class entries and of the confusion matrix.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    classes = list(classes)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    present = [c for c in classes if c in set(y_true.tolist()) | set(y_pred.tolist())]
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
    return ClassificationMetrics(
        accuracy=float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        macro_precision=float(mp),
        macro_recall=float(mr),
        macro_f1=float(mf),
        per_class={
            str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=classes).astype(int).tolist(),
    )
