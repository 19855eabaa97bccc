"""Local (per image) and global (per class) concept rankings.

Pipeline (Ferreira dos Santos & Mileo, XKDD 2022):

* every unit of the layer gets the concept that Network Dissection gave it (``tally.csv``);
* **local ranking** — per image, units ordered by their mean activation, mapped to concepts and
  deduplicated in rank order: the image's top-K concepts;
* **global ranking** — a linear SVM (Crammer–Singer) on the per-image mean activations; per class
  the most positively weighted units, mapped to concepts and deduplicated: the class's top-G
  concepts (plus the most negatively weighted ones, "evidence against").

Two protocols:

``standard``
    Units with IoU < 0.04 get no concept. The SVM is fit on the ``train`` split only: a
    ``StandardScaler`` fit on train, C chosen from ``c_grid`` by stratified k-fold CV (macro F1)
    on train (the scaler is refit inside every fold), refit on all of train, scored once on
    ``test``. When every image's split is ``all`` the images are split 50/50, stratified by class,
    with the seed; this is recorded in ``classifier.json`` (``split_fallback``) and the assigned
    splits are written to ``local_concepts.csv`` / ``images.csv``.
``paper``
    The published code's choices: every unit keeps its best label (min IoU 0), only the top 20
    units of an image are considered for its local ranking, no standardization, ``KFold(5)``
    without shuffling over *all* images (in the order of ``activations.npz``), the fold model with
    the best macro F1 is kept (first one on ties) and scored on its own held-out fold, C = 0.001
    (``grid=True``: the C with the best mean fold F1 from ``c_grid``, then its best fold model);
    global lists come from the top 10 positively weighted units, deduplicated, so they may hold
    fewer than G concepts.

Concepts are identified by their name (as the published code deduplicates on ``label``); the
category reported is the one of the first unit that brought the concept in.

Pure computation (:func:`unit_concept_table`, :func:`local_rankings`, :func:`global_rankings`,
:class:`GlobalRanker`, :func:`classification_metrics`) is separate from the I/O edge
(:func:`run_rank`).
"""

from __future__ import annotations

import csv
import io
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from . import cache
from .cache import (
    Manifest,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    lookup,
    manifest_section,
    package_versions,
    read_json,
    save_npz,
    stage_key,
)
from .errors import ConceptrankError
from .tally import read_tally

__all__ = [
    "PROTOCOLS",
    "PAPER_C",
    "PAPER_LOCAL_POOL",
    "PAPER_GLOBAL_POOL",
    "DEFAULT_MIN_IOU",
    "RankConfig",
    "RankResult",
    "RankedConcept",
    "GlobalRanker",
    "unit_concept_table",
    "local_rankings",
    "global_rankings",
    "classification_metrics",
    "load_activations",
    "check_compatible",
    "run_rank",
    "rank",
]

PROTOCOLS = ("standard", "paper")
PAPER_C = 0.001
PAPER_LOCAL_POOL = 20
PAPER_GLOBAL_POOL = 10
DEFAULT_MIN_IOU = {"standard": 0.04, "paper": 0.0}
DEFAULT_C_GRID = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
SPLITS = ("train", "test", "all")
RANK_FORMAT = 1  # bump when an output's bytes change for the same inputs
RANK_OUTPUTS = ("local_concepts.csv", "global_concepts.csv", "images.csv", "rankings.json", "classifier.json", "svm.npz")

UnitConcepts = Sequence["tuple[str, str, float] | None"]


# --------------------------------------------------------------------------------------------
# configuration and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankConfig:
    """Parameters of the ``rank`` stage.

    Attributes
    ----------
    protocol : 'standard' or 'paper' (see the module docstring).
    top_local : K, concepts kept per image.
    top_global : G, concepts kept per class and sign.
    min_iou : a unit whose IoU is below this gets no concept; None → 0.04 (standard) or 0 (paper).
    categories : only labels of these categories count (None: all).
    seed : seeds the CV shuffling, the SVM and the 50/50 fallback split.
    grid : paper protocol only — grid-search C over ``c_grid`` instead of C = 0.001.
    c_grid : candidate values of C.
    folds : number of CV folds (the paper protocol uses this many KFold folds too; default 5).
    max_iter : liblinear iteration cap.
    """

    protocol: str = "standard"
    top_local: int = 10
    top_global: int = 10
    min_iou: float | None = None
    categories: tuple[str, ...] | None = None
    seed: int = 0
    grid: bool = False
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    folds: int = 5
    max_iter: int = 20000

    def validate(self) -> None:
        """Raise :class:`ConceptrankError` for an invalid setting."""
        if self.protocol not in PROTOCOLS:
            raise ConceptrankError(f"unknown protocol {self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if self.top_local < 1 or self.top_global < 1:
            raise ConceptrankError(f"--top-local and --top-global must be ≥ 1 (got {self.top_local}, {self.top_global})")
        if self.min_iou is not None and not (0.0 <= self.min_iou <= 1.0):
            raise ConceptrankError(f"--min-iou must lie in [0, 1] (got {self.min_iou})")
        if not self.c_grid or any(not (c > 0) for c in self.c_grid):
            raise ConceptrankError(f"the C grid must hold positive values (got {list(self.c_grid)})")
        if self.folds < 2:
            raise ConceptrankError(f"folds must be ≥ 2 (got {self.folds})")
        if self.categories is not None and not self.categories:
            raise ConceptrankError("--categories is empty")

    @property
    def effective_min_iou(self) -> float:
        return DEFAULT_MIN_IOU[self.protocol] if self.min_iou is None else float(self.min_iou)

    @property
    def local_pool(self) -> int | None:
        return PAPER_LOCAL_POOL if self.protocol == "paper" else None

    @property
    def global_pool(self) -> int | None:
        return PAPER_GLOBAL_POOL if self.protocol == "paper" else None

    @property
    def fixed_C(self) -> float | None:
        """The C used without search (paper protocol without ``grid``), else None."""
        return PAPER_C if (self.protocol == "paper" and not self.grid) else None


@dataclass(frozen=True)
class RankResult:
    """What :func:`run_rank` produced.

    Attributes
    ----------
    out : output folder.
    protocol : 'standard' or 'paper'.
    best_C : the C of the kept model.
    cv_scores : C → mean macro F1 over the CV folds.
    test_accuracy, macro_f1 : on the evaluated split (``evaluated_split``).
    n_units : U, width of the layer.
    n_labelled_units : units that carry a concept.
    n_concepts : distinct concepts over the labelled units.
    evaluated_split : 'test', 'test (50/50 fallback)' or 'paper best fold'.
    n_train, n_test : images the final model was fit on / scored on.
    classes : class names in model order.
    warnings : notes worth reading (convergence, classes missing from a paper fold model, ...).
    """

    out: Path
    protocol: str
    best_C: float
    cv_scores: dict
    test_accuracy: float
    macro_f1: float
    n_units: int
    n_labelled_units: int
    n_concepts: int
    evaluated_split: str = "test"
    n_train: int = 0
    n_test: int = 0
    classes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    reused: bool = False  # True when the outputs of an earlier run with the same inputs were reused

    def summary(self) -> str:
        lines = [
            f"rank ({self.protocol}): {self.n_labelled_units}/{self.n_units} units labelled, "
            f"{self.n_concepts} distinct concepts, {len(self.classes)} classes"
            + (" (reused cached result)" if self.reused else ""),
            f"  best C {self.best_C:g}; {self.evaluated_split} accuracy {self.test_accuracy:.3f}, "
            f"macro F1 {self.macro_f1:.3f} (train {self.n_train}, evaluated {self.n_test} images)",
            f"  → {self.out}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


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
    coef: np.ndarray, unit_concepts: UnitConcepts, g: int, pool: int | None = None, sign: str = "+"
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
    best_fold_ : paper protocol: index of the kept fold model (None for standard).
    eval_index_ : paper protocol: indices (into the fitted X) of the kept fold's held-out part.
    missing_classes_ : classes the kept model never saw (paper protocol only; usually empty).
    n_iter_ : liblinear iterations of the kept model.
    convergence_warnings_ : number of fits that stopped at ``max_iter``.
    """

    def __init__(
        self,
        protocol: str = "standard",
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


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
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
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "per_class": {
            str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).astype(int).tolist(),
    }


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """Contents of ``activations.npz``: mean (N, U), images/classes/splits (N,) str."""

    path: Path
    mean: np.ndarray
    images: np.ndarray
    classes: np.ndarray
    splits: np.ndarray


def _npz_path(activations: Path) -> Path:
    activations = Path(activations)
    return activations / "activations.npz" if activations.is_dir() else activations


def load_activations(activations: str | Path) -> Activations:
    """Read ``activations.npz`` (given the file or the extract folder) and check its arrays."""
    path = _npz_path(Path(activations))
    if not path.exists():
        raise ConceptrankError(f"activations file not found: {path} (run `conceptrank extract` first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mean", "images", "classes", "splits") if k not in z.files]
            if missing:
                raise ConceptrankError(f"{path}: missing array(s) {', '.join(missing)}")
            mean, images, classes, splits = (z[k] for k in ("mean", "images", "classes", "splits"))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, ConceptrankError):
            raise
        raise ConceptrankError(f"cannot read {path}: {e}") from None
    if mean.ndim != 2:
        raise ConceptrankError(f"{path}: 'mean' must be (images, units), got shape {mean.shape}")
    n = mean.shape[0]
    for name, arr in (("images", images), ("classes", classes), ("splits", splits)):
        if arr.shape != (n,):
            raise ConceptrankError(f"{path}: '{name}' has shape {arr.shape}, expected ({n},) like 'mean'")
    if n == 0:
        raise ConceptrankError(f"{path}: no images")
    bad = ~np.all(np.isfinite(mean), axis=1)
    if bad.any():
        raise ConceptrankError(f"{path}: {int(bad.sum())} image(s) have NaN or infinite activations (first: {images[bad][0]})")
    images, classes, splits = (np.asarray(a).astype(str) for a in (images, classes, splits))
    unknown = sorted(set(splits.tolist()) - set(SPLITS))
    if unknown:
        raise ConceptrankError(f"{path}: unknown split value(s) {unknown}; expected train, test or all")
    return Activations(path, mean, images, classes, splits)


def _read_json_if(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise ConceptrankError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else None


def check_compatible(extract_meta: dict | None, dissect_meta: dict | None, extract_path: str = "extract.json", dissect_path: str = "dissect.json") -> None:
    """Raise when activations and tally come from different layers or models.

    Compares ``layer`` and ``fingerprints.model`` of extract.json and dissect.json (each only when
    both files carry it).
    """
    if not extract_meta or not dissect_meta:
        return
    el, dl = extract_meta.get("layer"), dissect_meta.get("layer")
    if isinstance(el, str) and isinstance(dl, str) and el != dl:
        raise ConceptrankError(
            f"layer mismatch: the activations are from layer {el!r} ({extract_path}) but the tally "
            f"dissects layer {dl!r} ({dissect_path})"
        )
    em = (extract_meta.get("fingerprints") or {}).get("model")
    dm = (dissect_meta.get("fingerprints") or {}).get("model")
    if em and dm and em != dm:
        raise ConceptrankError(
            f"model mismatch: the activations come from model {em} ({extract_path}) but the tally "
            f"from model {dm} ({dissect_path})"
        )


def _fmt(x: float) -> str:
    return repr(float(x))


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez-compatible archive with fixed timestamps, so equal arrays give equal bytes."""
    save_npz(path, **arrays)


def _assign_splits(act: Activations, seed: int) -> tuple[np.ndarray, bool]:
    """Splits used by the standard protocol: as given, or a stratified 50/50 fallback."""
    splits = act.splits.astype("<U5")  # room for 'train' when the file only holds 'all'
    has_test = bool((splits == "test").any())
    has_train = bool((splits == "train").any())
    if has_test and has_train:
        return splits, False
    if not has_train and not has_test:
        idx = np.arange(len(splits))
        try:
            tr, te = train_test_split(idx, test_size=0.5, stratify=act.classes, random_state=seed)
        except ValueError as e:
            raise ConceptrankError(f"no train/test split in {act.path} and the 50/50 stratified fallback failed: {e}") from None
        splits[tr] = "train"
        splits[te] = "test"
        return splits, True
    missing = "test" if has_train else "train"
    raise ConceptrankError(
        f"{act.path} has no '{missing}' images; the standard protocol needs both train and test "
        "splits (or none at all: then a stratified 50/50 split is made)"
    )


def run_rank(activations: Path, tally: Path, out: Path, cfg: RankConfig) -> RankResult:
    """Rank concepts locally and globally; write the outputs into ``out``.

    Parameters
    ----------
    activations : the extract folder or its ``activations.npz``.
    tally : a NetDissect-Lite ``tally.csv`` with as many units as the activations are wide.
    out : output folder (created).
    cfg : :class:`RankConfig`.

    Writes ``local_concepts.csv``, ``global_concepts.csv``, ``images.csv``, ``classifier.json``,
    ``svm.npz`` and ``rank.json`` (atomically, ``rank.json`` last). When ``rank.json`` was written
    for the same activations and tally bytes, configuration and package versions, and the outputs
    are intact, they are reused (``RankResult.reused``).
    """
    cfg.validate()
    out = Path(out)
    tally = Path(tally)
    act_path = _npz_path(Path(activations))
    extract_json = act_path.parent / "extract.json"
    dissect_json = tally.parent / "dissect.json"
    extract_meta = _read_json_if(extract_json)
    dissect_meta = _read_json_if(dissect_json)
    cfg_dict = asdict(cfg)
    cfg_dict["categories"] = list(cfg.categories) if cfg.categories is not None else None
    cfg_dict["c_grid"] = list(cfg.c_grid)
    key = fingerprints = None
    if act_path.is_file() and tally.is_file():
        fingerprints = {
            "activations_sha256": file_sha256(act_path),
            "tally_sha256": file_sha256(tally),
            "extract": (extract_meta or {}).get("fingerprints"),
            "dissect": (dissect_meta or {}).get("fingerprints"),
        }
        key = stage_key("rank", fingerprints, {"format": RANK_FORMAT, "config": cfg_dict,
                                               "inputs": [str(act_path), str(tally)]})
        manifest = lookup(out / "rank.json", key)
        if manifest is not None:
            reused = _reused_result(out, manifest)
            if reused is not None:
                return reused
    (out / "rank.json").unlink(missing_ok=True)  # never leave a previous run's manifest vouching for new outputs
    cache.remove_temps(out, RANK_OUTPUTS + ("rank.json",))

    act = load_activations(activations)
    labels = read_tally(tally)
    check_compatible(extract_meta, dissect_meta, str(extract_json), str(dissect_json))

    N, U = act.mean.shape
    if labels.num_units != U:
        raise ConceptrankError(
            f"the tally {tally} has {labels.num_units} units but the activations {act.path} are "
            f"{U} units wide: they come from different layers"
        )
    unit_concepts = labels.concepts(cfg.effective_min_iou, cfg.categories)
    ids, names = unit_concept_table(unit_concepts)
    n_labelled = int((ids >= 0).sum())
    if n_labelled == 0:
        cats = f" in categories {list(cfg.categories)}" if cfg.categories else ""
        raise ConceptrankError(
            f"no unit of {tally} has a concept{cats} with IoU ≥ {cfg.effective_min_iou:g}; "
            "lower --min-iou or widen --categories"
        )

    # ---- classifier ----
    X = act.mean.astype(np.float64)
    y = act.classes
    notes: list[str] = []
    if cfg.protocol == "standard":
        splits, fallback = _assign_splits(act, cfg.seed)
        tr = np.flatnonzero(splits == "train")
        te = np.flatnonzero(splits == "test")
        all_classes = np.unique(y)
        tr_classes, tr_counts = np.unique(y[tr], return_counts=True)
        counts = dict(zip(tr_classes.tolist(), tr_counts.tolist()))
        small = [(c, counts.get(c, 0)) for c in all_classes.tolist() if counts.get(c, 0) < cfg.folds]
        if small:
            desc = ", ".join(f"{c!r} has {n}" for c, n in small)
            raise ConceptrankError(
                f"{len(small)} class(es) have fewer training images than the {cfg.folds} CV folds ({desc})"
            )
        model = GlobalRanker("standard", None, cfg.c_grid, cfg.folds, cfg.seed, cfg.max_iter).fit(X[tr], y[tr])
        eval_idx = te
        evaluated = "test (50/50 fallback)" if fallback else "test"
        n_train = len(tr)
        cv_desc = f"StratifiedKFold(n_splits={cfg.folds}, shuffle=True, random_state={cfg.seed}) on train; scaler fit on train"
    else:
        splits, fallback = act.splits, False
        model = GlobalRanker("paper", cfg.fixed_C, cfg.c_grid, cfg.folds, cfg.seed, cfg.max_iter).fit(X, y)
        eval_idx = model.eval_index_
        evaluated = "paper best fold"
        n_train = N - len(eval_idx)
        cv_desc = (f"KFold(n_splits={cfg.folds}) without shuffling over all images in a seeded random order "
                   f"(seed {cfg.seed}, standing in for the published code's os.listdir order); best fold model kept; no scaling")
        if model.missing_classes_:
            notes.append(
                f"the kept fold model never saw class(es) {model.missing_classes_} (KFold without "
                "shuffling over class-ordered images); they get no global concepts"
            )
    if model.convergence_warnings_:
        notes.append(f"{model.convergence_warnings_} SVM fit(s) reached max_iter={cfg.max_iter} without converging")
    metrics = classification_metrics(y[eval_idx], model.predict(X[eval_idx]), model.classes_)
    classes = [str(c) for c in model.classes_]

    # ---- rankings ----
    local = local_rankings(act.mean, unit_concepts, cfg.top_local, cfg.local_pool)
    pos = global_rankings(model.coef_, unit_concepts, cfg.top_global, cfg.global_pool, "+")
    neg = global_rankings(model.coef_, unit_concepts, cfg.top_global, cfg.global_pool, "-")

    # ---- outputs ----
    out.mkdir(parents=True, exist_ok=True)
    local_rows = [
        [act.images[i], act.classes[i], splits[i], r + 1, rc.concept, rc.category, rc.unit + 1, _fmt(rc.score)]
        for i, ranking in enumerate(local)
        for r, rc in enumerate(ranking)
    ]
    atomic_write_text(
        out / "local_concepts.csv",
        _csv_text(["image", "class", "split", "rank", "concept", "category", "unit", "score"], local_rows),
    )
    atomic_write_text(
        out / "images.csv",
        _csv_text(
            ["image", "class", "split", "n_concepts"],
            [[act.images[i], act.classes[i], splits[i], len(local[i])] for i in range(N)],
        ),
    )
    global_rows = []
    for ci, c in enumerate(classes):
        for sign, lists in (("+", pos), ("-", neg)):
            for r, rc in enumerate(lists[ci]):
                global_rows.append([c, r + 1, rc.concept, rc.category, rc.unit + 1, _fmt(rc.score), sign])
    atomic_write_text(
        out / "global_concepts.csv",
        _csv_text(["class", "rank", "concept", "category", "unit", "weight", "sign"], global_rows),
    )
    # the same rankings as one JSON document, for tools that prefer it to the two CSVs
    def _item(rc: RankedConcept, key: str) -> dict:
        return {"concept": rc.concept, "category": rc.category, "unit": rc.unit + 1, key: float(rc.score)}

    atomic_write_json(out / "rankings.json", {
        "protocol": cfg.protocol,
        "global": {c: {"for": [_item(rc, "weight") for rc in pos[ci]],
                       "against": [_item(rc, "weight") for rc in neg[ci]]} for ci, c in enumerate(classes)},
        "local": [{"image": act.images[i], "class": act.classes[i], "split": splits[i],
                   "concepts": [_item(rc, "score") for rc in local[i]]} for i in range(N)],
    })
    cv_scores = [
        {"C": C, "fold_macro_f1": scores, "mean_macro_f1": float(np.mean(scores))}
        for C, scores in sorted(model.cv_scores_.items())
    ]
    classifier = {
        "protocol": cfg.protocol,
        "classes": classes,
        "best_C": model.best_C_,
        "c_grid": sorted(model.cv_scores_),
        "cv": cv_desc,
        "cv_scores": cv_scores,
        "best_fold": model.best_fold_,
        "evaluated_split": evaluated,
        "split_fallback": fallback,
        "n_train": int(n_train),
        "n_test": int(len(eval_idx)),
        "test_accuracy": metrics["accuracy"],
        "macro_precision": metrics["macro_precision"],
        "macro_recall": metrics["macro_recall"],
        "macro_f1": metrics["macro_f1"],
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "confusion_matrix_axes": "rows = true class, columns = predicted class, in 'classes' order",
        "standardized": cfg.protocol == "standard",
        "svm": {
            "multi_class": "crammer_singer", "loss": "hinge", "dual": True, "class_weight": "balanced",
            "random_state": cfg.seed, "max_iter": cfg.max_iter, "n_iter": model.n_iter_,
        },
        "missing_classes": model.missing_classes_,
        "warnings": notes,
    }
    atomic_write_json(out / "classifier.json", classifier)
    _save_npz(
        out / "svm.npz",
        coef=model.coef_.astype(np.float64),
        intercept=model.intercept_.astype(np.float64),
        scaler_mean=model.scaler_mean_,
        scaler_scale=model.scaler_scale_,
        classes=np.array(classes, dtype=str),
    )
    rank_meta = {
        "stage": "rank",
        "config": cfg_dict,
        "protocol": cfg.protocol,
        "top_local": cfg.top_local,
        "top_global": cfg.top_global,
        "min_iou": cfg.effective_min_iou,
        "categories": cfg_dict["categories"],
        "local_pool": cfg.local_pool,
        "global_pool": cfg.global_pool,
        "inputs": {"activations": str(act.path), "tally": str(tally)},
        "fingerprints": fingerprints,
        "layer": (extract_meta or {}).get("layer") or (dissect_meta or {}).get("layer"),
        "n_images": int(N),
        "n_units": int(U),
        "n_labelled_units": n_labelled,
        "n_concepts": len(names),
        "classes": classes,
        "packages": package_versions(),
        "cache": manifest_section("rank", key, fingerprints,
                                  {"format": RANK_FORMAT, "config": cfg_dict, "inputs": [str(act_path), str(tally)]},
                                  out, RANK_OUTPUTS),
    }
    atomic_write_json(out / "rank.json", rank_meta)  # last: it vouches for the outputs above

    return RankResult(
        out=out,
        protocol=cfg.protocol,
        best_C=model.best_C_,
        cv_scores={C: float(np.mean(s)) for C, s in sorted(model.cv_scores_.items())},
        test_accuracy=metrics["accuracy"],
        macro_f1=metrics["macro_f1"],
        n_units=int(U),
        n_labelled_units=n_labelled,
        n_concepts=len(names),
        evaluated_split=evaluated,
        n_train=int(n_train),
        n_test=int(len(eval_idx)),
        classes=tuple(classes),
        warnings=tuple(notes),
    )


def _reused_result(out: Path, manifest: Manifest) -> RankResult | None:
    """The result of an earlier run whose manifest matched, read back from rank.json and classifier.json."""
    meta = manifest.data
    try:
        clf = read_json(out / "classifier.json")
        return RankResult(
            out=out,
            protocol=str(meta["protocol"]),
            best_C=float(clf["best_C"]),
            cv_scores={float(r["C"]): float(r["mean_macro_f1"]) for r in clf["cv_scores"]},
            test_accuracy=float(clf["test_accuracy"]),
            macro_f1=float(clf["macro_f1"]),
            n_units=int(meta["n_units"]),
            n_labelled_units=int(meta["n_labelled_units"]),
            n_concepts=int(meta["n_concepts"]),
            evaluated_split=str(clf["evaluated_split"]),
            n_train=int(clf["n_train"]),
            n_test=int(clf["n_test"]),
            classes=tuple(str(c) for c in clf["classes"]),
            warnings=tuple(str(w) for w in clf.get("warnings", ())),
            reused=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ``conceptrank.rank`` (lazy export in __init__) resolves to this function.
rank = run_rank
