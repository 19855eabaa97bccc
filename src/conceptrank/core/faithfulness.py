"""Is a concept what *drove* the classifier? Decision decompositions, deletion tests, stability.

The global ranker is linear: for an image with mean activations x (U,) the score of class c is

``s_c(x) = Σ_u z_u · w_cu + b'_c``  with  ``z = (x − train_mean) / scaler_scale``

and ``b'_c`` the score of an image at the training mean (``svm.npz`` stores ``train_mean`` beside
the scaler; under the standard protocol they coincide, under the paper protocol the scaler is the
identity — mean 0, scale 1 — while ``train_mean`` is the mean of the kept fold model's training
images). Grouping the units by the concept Network Dissection gave them splits the score **exactly**
into per-concept contributions ``Σ_{u of concept k} z_u w_cu``, a remainder from the unlabelled
units and that bias (:func:`concept_contributions`). A unit's contribution is positive when it is
above its training mean on a positively weighted unit (or below it on a negatively weighted one).

Deletion test (:func:`deletion_test`)
    For class c, the units listed for its top-G global concepts (the best-weighted unit of each
    concept, as written in ``global_concepts.csv``) are set to their *training mean* — z = 0 in
    the centered space of :meth:`SVMParams.centered`, so their contribution vanishes — and the drop of the class's score (mean
    over the class's evaluated images) and of its recall is measured. The same is done for
    ``n_random`` random sets of as many labelled units (uniformly, without replacement). The ratio
    ``drop_top / mean drop_random`` is > 1 when the global concepts matter more to the decision
    than arbitrary labelled units; overall it is the ratio of the class means.
Stability (:func:`fold_stability`, :func:`seed_stability`)
    mean pairwise Jaccard of every class's top-G global concept set between refits: on the
    training part of each of the ``folds`` stratified folds (with the chosen C), and with the
    whole model selection rerun under different seeds (for the standard protocol the seed changes
    the CV split, hence possibly C).

Pure computation; the I/O edges are :func:`conceptrank.io.svm.load_svm` and :mod:`conceptrank.stages.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from conceptrank.core.baselines import weighted_sample_sets

__all__ = [
    "SVMParams",
    "Contributions",
    "DeletionResult",
    "concept_contributions",
    "deletion_test",
    "fit_linear_svm",
    "top_concept_sets",
    "mean_pairwise_jaccard",
    "fold_stability",
    "seed_stability",
]


# --------------------------------------------------------------------------------------------
# the linear model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SVMParams:
    """A fitted linear ranker as stored in ``svm.npz``.

    Attributes
    ----------
    coef : (C, U) float64 weights in the scaled space.
    intercept : (C,) float64.
    mean, scale : (U,) float64 scaler parameters (zeros / ones when not standardized).
    classes : tuple of C class names.
    train_mean : (U,) float64 mean of the features the model was fit on (None: ``mean``, which
        is the training mean whenever the features were standardized).
    standardized : whether ``mean`` / ``scale`` come from a StandardScaler (the standard protocol).
    """

    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    classes: tuple[str, ...]
    train_mean: np.ndarray | None = None
    standardized: bool = True

    @property
    def reference(self) -> np.ndarray:
        """(U,) the training mean: what "removing" a unit sets it to."""
        return self.mean if self.train_mean is None else self.train_mean

    def standardize(self, X: np.ndarray) -> np.ndarray:
        """(N, U) → (N, U) float64 ``(X − mean) / scale``."""
        return (np.asarray(X, dtype=np.float64) - self.mean) / self.scale

    def centered(self, X: np.ndarray) -> np.ndarray:
        """(N, U) → (N, U) float64 ``(X − train mean) / scale``: 0 for a unit at its training mean."""
        return (np.asarray(X, dtype=np.float64) - self.reference) / self.scale

    @property
    def centered_intercept(self) -> np.ndarray:
        """(C,) the scores of an image at the training mean, so that
        ``centered(X) @ coef.T + centered_intercept == decision(X)``."""
        if self.train_mean is None:
            return self.intercept.copy()
        shift = (self.reference - self.mean) / self.scale
        return self.intercept + self.coef @ shift

    def decision(self, X: np.ndarray) -> np.ndarray:
        """(N, U) → (N, C) scores."""
        return self.standardize(X) @ self.coef.T + self.intercept


# --------------------------------------------------------------------------------------------
# decision decomposition
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contributions:
    """Exact decomposition of the SVM scores into concept contributions.

    ``per_concept.sum(-1) + remainder + bias == decision`` (up to float64 rounding).

    Attributes
    ----------
    concepts : tuple of V concept names.
    per_unit : (N, C, U) ``z_u · w_cu``.
    per_concept : (N, C, V) sums of ``per_unit`` over each concept's units.
    remainder : (N, C) sum over the unlabelled units.
    bias : (C,) intercepts.
    decision : (N, C) scores computed directly (``z @ coef.T + intercept``).
    """

    concepts: tuple[str, ...]
    per_unit: np.ndarray
    per_concept: np.ndarray
    remainder: np.ndarray
    bias: np.ndarray
    decision: np.ndarray

    def total(self) -> np.ndarray:
        """(N, C) contributions + remainder + bias (equals ``decision``)."""
        return self.per_concept.sum(axis=-1) + self.remainder + self.bias


def concept_contributions(X: np.ndarray, svm: SVMParams, unit_ids: np.ndarray, concepts: Sequence[str]) -> Contributions:
    """Per-concept contributions to every class score.

    Parameters
    ----------
    X : (N, U) or (U,) mean activations.
    svm : the linear model.
    unit_ids : (U,) concept id of every unit, -1 for unlabelled (:func:`conceptrank.stages.rank.unit_concept_table`).
    concepts : V concept names indexed by id.

    Returns
    -------
    :class:`Contributions` (N = 1 for a single image).
    """
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    unit_ids = np.asarray(unit_ids)
    U = svm.coef.shape[1]
    if X.shape[1] != U or unit_ids.shape != (U,):
        raise ValueError(f"X must be (N, {U}) and unit_ids ({U},); got {X.shape} and {unit_ids.shape}")
    Z = svm.centered(X)
    per_unit = Z[:, None, :] * svm.coef[None, :, :]  # (N, C, U)
    V = len(concepts)
    onehot = np.zeros((U, V))
    lab = np.flatnonzero(unit_ids >= 0)
    onehot[lab, unit_ids[lab]] = 1.0
    per_concept = per_unit @ onehot
    remainder = per_unit[:, :, unit_ids < 0].sum(axis=-1)
    decision = svm.decision(X)
    return Contributions(tuple(concepts), per_unit, per_concept, remainder, svm.centered_intercept, decision)


# --------------------------------------------------------------------------------------------
# deletion test
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionResult:
    """Score and recall drops when a class's global-concept units are set to their training mean.

    Attributes
    ----------
    drop_top : (C,) mean drop of the class score over the class's images, top-G units removed.
    drop_random : (C, R) the same for R random sets of labelled units.
    recall_before : (C,) recall of each class (argmax of the scores).
    recall_top : (C,) recall after removing the top units; ``recall_random`` (C, R).
    n_units : (C,) size of the removed sets.
    """

    drop_top: np.ndarray
    drop_random: np.ndarray
    recall_before: np.ndarray
    recall_top: np.ndarray
    recall_random: np.ndarray
    n_units: np.ndarray

    @property
    def drop_random_mean(self) -> np.ndarray:
        return self.drop_random.mean(axis=1)

    @property
    def ratio(self) -> np.ndarray:
        """(C,) drop_top / mean drop_random (nan when the random drop is not positive)."""
        r = self.drop_random_mean
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(r > 0, self.drop_top / np.where(r > 0, r, 1.0), np.nan)

    @property
    def ratio_overall(self) -> float:
        """mean_c drop_top / mean_c mean drop_random (nan when the latter is not positive)."""
        den = float(np.nanmean(self.drop_random_mean))
        return float(np.nanmean(self.drop_top)) / den if den > 0 else float("nan")

    @property
    def recall_drop_top(self) -> np.ndarray:
        return self.recall_before - self.recall_top

    @property
    def recall_drop_random(self) -> np.ndarray:
        """(C,) mean over the random sets."""
        return self.recall_before - self.recall_random.mean(axis=1)


def deletion_test(
    Z: np.ndarray,
    y: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
    top_units: Sequence[Sequence[int]],
    candidates: np.ndarray,
    n_random: int = 20,
    rng: np.random.Generator | int | None = 0,
) -> DeletionResult:
    """Deletion test of every class's top global units against random labelled units.

    Parameters
    ----------
    Z : (N, U) centered features of the evaluated images, :meth:`SVMParams.centered` (a unit set
        to its training mean has z = 0).
    y : (N,) class ids into the rows of ``coef``.
    coef, intercept : (C, U), (C,) the linear model in the centered space (the intercept is
        :attr:`SVMParams.centered_intercept`).
    top_units : per class (length C), the unit indices to remove.
    candidates : (L,) unit indices random sets are drawn from (the labelled units).
    n_random : random sets per class (R).

    Returns
    -------
    :class:`DeletionResult`; classes without images get nan.
    """
    rng = np.random.default_rng(rng)
    Z = np.asarray(Z, dtype=np.float64)
    coef = np.asarray(coef, dtype=np.float64)
    y = np.asarray(y)
    candidates = np.asarray(candidates, dtype=np.int64)
    C = coef.shape[0]
    S = Z @ coef.T + intercept
    drop_top = np.full(C, np.nan)
    drop_rand = np.full((C, n_random), np.nan)
    rec0 = np.full(C, np.nan)
    rec_top = np.full(C, np.nan)
    rec_rand = np.full((C, n_random), np.nan)
    sizes = np.zeros(C, dtype=np.int64)

    def after(rows: np.ndarray, units: np.ndarray) -> tuple[float, float]:
        Zs = Z[np.ix_(rows, units)]
        removed = Zs @ coef[:, units].T  # (n_c, C): every class loses these units' contributions
        S2 = S[rows] - removed
        c = y[rows[0]]
        return float(removed[:, c].mean()), float(np.mean(np.argmax(S2, axis=1) == c))

    for c in range(C):
        rows = np.flatnonzero(y == c)
        units = np.asarray(list(top_units[c]), dtype=np.int64)
        sizes[c] = units.size
        if rows.size == 0:
            continue
        rec0[c] = float(np.mean(np.argmax(S[rows], axis=1) == c))
        drop_top[c], rec_top[c] = after(rows, units) if units.size else (0.0, rec0[c])
        draws = weighted_sample_sets(np.ones(candidates.size), units.size, n_random, rng)
        for r in range(n_random):
            ru = candidates[draws[r]]
            drop_rand[c, r], rec_rand[c, r] = after(rows, ru) if ru.size else (0.0, rec0[c])
    return DeletionResult(drop_top, drop_rand, rec0, rec_top, rec_rand, sizes)


# --------------------------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------------------------


def fit_linear_svm(
    X: np.ndarray, y: np.ndarray, C: float, classes: Sequence[str], seed: int = 0, max_iter: int = 20000,
    standardize: bool = True,
) -> SVMParams:
    """One Crammer–Singer LinearSVC fit with rank.py's settings (no model selection).

    Parameters
    ----------
    X : (N, U) raw features; y : (N,) labels.
    classes : the full class order (a class absent from y gets a zero row, intercept -inf).
    standardize : fit a StandardScaler on X first (the standard protocol).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    from conceptrank.core.ranking import _full_params, _svm

    X = np.asarray(X, dtype=np.float64)
    if standardize:
        sc = StandardScaler().fit(X)
        mean, scale = np.asarray(sc.mean_, np.float64), np.asarray(sc.scale_, np.float64)
    else:
        mean, scale = np.zeros(X.shape[1]), np.ones(X.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = _svm(C, seed, max_iter).fit((X - mean) / scale, y)
    coef, icpt, _ = _full_params(model, np.asarray(classes))
    return SVMParams(coef, icpt, mean, scale, tuple(classes), mean if standardize else X.mean(axis=0), standardize)


def top_concept_sets(coef: np.ndarray, unit_concepts, g: int, pool: int | None = None) -> list[frozenset]:
    """Per class, the set of its top-g supporting global concepts (:func:`conceptrank.stages.rank.global_rankings`)."""
    from conceptrank.core.ranking import global_rankings

    return [frozenset(rc.concept for rc in lst) for lst in global_rankings(coef, unit_concepts, g, pool, "+")]


def mean_pairwise_jaccard(runs: Sequence[Sequence[frozenset]]) -> np.ndarray:
    """Per class, the mean Jaccard index over all pairs of runs.

    Parameters
    ----------
    runs : R runs, each a length-C sequence of concept sets.

    Returns
    -------
    (C,) float64 — pairs where both sets are empty count as 1 (identical); nan with fewer than 2 runs.
    """
    R = len(runs)
    C = len(runs[0]) if R else 0
    out = np.full(C, np.nan)
    if R < 2:
        return out
    for c in range(C):
        vals = []
        for a in range(R):
            for b in range(a + 1, R):
                A, B = runs[a][c], runs[b][c]
                vals.append(1.0 if not (A or B) else len(A & B) / len(A | B))
        out[c] = float(np.mean(vals))
    return out


def _parallel(fn, args: list, n_jobs: int) -> list:
    if n_jobs == 1 or len(args) < 2:
        return [fn(*a) for a in args]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=n_jobs)(delayed(fn)(*a) for a in args)


def fold_stability(
    X: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    C: float,
    gs: Sequence[int],
    unit_concepts,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 20000,
    standardize: bool = True,
    pool: int | None = None,
    n_jobs: int = 1,
) -> dict[int, np.ndarray]:
    """Jaccard stability of the top-G global concepts across CV-fold refits.

    The model is refit (fixed ``C``) on the training part of each fold of
    ``StratifiedKFold(folds, shuffle=True, random_state=seed)`` over (X, y).

    Returns
    -------
    g → (C,) mean pairwise Jaccard per class.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    models = _parallel(
        fit_linear_svm, [(X[tr], y[tr], C, classes, seed, max_iter, standardize) for tr, _ in splits], n_jobs
    )
    return {g: mean_pairwise_jaccard([top_concept_sets(m.coef, unit_concepts, g, pool) for m in models]) for g in gs}


def _ranker_coef(X, y, protocol, fixed_C, c_grid, folds, seed, max_iter) -> tuple[np.ndarray, float]:
    from conceptrank.core.ranking import GlobalRanker

    m = GlobalRanker(protocol, fixed_C, tuple(c_grid), folds, seed, max_iter).fit(X, y)
    return m.coef_, m.best_C_


def seed_stability(
    X: np.ndarray,
    y: np.ndarray,
    gs: Sequence[int],
    unit_concepts,
    protocol: str = "standard",
    seeds: Sequence[int] = (0, 1, 2),
    c_grid: Sequence[float] | None = None,
    folds: int = 5,
    fixed_C: float | None = None,
    max_iter: int = 20000,
    pool: int | None = None,
    known: dict | None = None,
    n_jobs: int = 1,
) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Jaccard stability of the top-G global concepts across seeds of the whole model selection.

    Parameters
    ----------
    X, y : the data the ranker is fit on (train split for the standard protocol).
    c_grid : candidate C values (None: :data:`conceptrank.core.ranking.DEFAULT_C_GRID`).
    known : optional seed → (coef (C, U), best C) already fitted (the ranking's own model), reused.

    Returns
    -------
    (g → (C,) mean pairwise Jaccard per class, seed → chosen C).
    """
    from conceptrank.core.ranking import DEFAULT_C_GRID

    c_grid = DEFAULT_C_GRID if c_grid is None else c_grid
    known = dict(known or {})
    todo = [s for s in seeds if s not in known]
    fitted = _parallel(_ranker_coef, [(X, y, protocol, fixed_C, c_grid, folds, s, max_iter) for s in todo], n_jobs)
    known.update(dict(zip(todo, fitted)))
    coefs = [known[s][0] for s in seeds]
    chosen = {int(s): float(known[s][1]) for s in seeds}
    return {g: mean_pairwise_jaccard([top_concept_sets(c, unit_concepts, g, pool) for c in coefs]) for g in gs}, chosen
