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

:func:`rank_concepts` is the stage over in-memory objects (activations, unit labels, a
:class:`RankConfig`) returning a :class:`RankResult` that holds the rankings, the fitted SVM and its
scores; its parts live in :mod:`conceptrank.core.ranking`. :func:`run_rank` reads the files, calls
it and writes the outputs (formats in :mod:`conceptrank.io.rankings`, :mod:`conceptrank.io.svm`).
Whenever it recomputes, it first removes what ``evaluate`` wrote into the same folder, so scores of
an old ranking never sit beside a new one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from conceptrank.core.faithfulness import SVMParams
from conceptrank.core.rankers import (
    RANKERS,
    ProbeActivations,
    UnitBank,
    rank_lists,
    resolve_ranker,
)
from conceptrank.core.ranking import (
    DEFAULT_C_GRID,
    PROTOCOLS,
    ClassificationMetrics,
    GlobalRanker,
    Protocol,
    RankedConcept,
    classification_metrics,
    protocol_fixed_C,
    protocol_min_iou,
    protocol_pools,
    unit_concept_table,
)
from conceptrank.errors import ConceptrankError
from conceptrank.io import cache
from conceptrank.io.activations import Activations, load_activations, npz_path
from conceptrank.io.cache import (
    Manifest,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    lookup,
    manifest_section,
    package_versions,
    read_json,
    stage_key,
)
from conceptrank.io.rankings import (
    EVALUATE_OUTPUTS,
    RANK_OUTPUTS,
    check_written_by,
    global_concepts_text,
    images_text,
    local_concepts_text,
    rankings_document,
    read_ranked_lists,
)
from conceptrank.io.svm import load_svm, save_svm
from conceptrank.io.tally_csv import UnitLabels, read_tally
from conceptrank.stages.probe import (
    PROBE_FILE,
    load_probe_activations,
    stored_fingerprints,
)

__all__ = ["RankConfig", "RankResult", "rank_concepts", "run_rank", "check_compatible", "ranker_side_inputs"]

RANK_FORMAT = 2  # bump when an output's bytes change for the same inputs (2: svm.npz train_mean, standardized)


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
    ranker : a ranker of :mod:`conceptrank.core.rankers`; None — the protocol's: ``paper`` for the
        paper protocol, ``DEFAULT_RANKER`` for the standard one when its inputs are there (else
        ``paper``, with a note).
    """

    protocol: Protocol = "standard"
    top_local: int = 10
    top_global: int = 10
    min_iou: float | None = None
    categories: tuple[str, ...] | None = None
    seed: int = 0
    grid: bool = False
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    folds: int = 5
    max_iter: int = 20000
    ranker: str | None = None

    def validate(self) -> None:
        """Raise :class:`ConceptrankError` for an invalid setting."""
        if self.ranker is not None and self.ranker not in RANKERS:
            raise ConceptrankError(f"unknown ranker {self.ranker!r}: expected one of {', '.join(RANKERS)}")
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
        return protocol_min_iou(self.protocol, self.min_iou)

    @property
    def local_pool(self) -> int | None:
        return protocol_pools(self.protocol)[0]

    @property
    def global_pool(self) -> int | None:
        return protocol_pools(self.protocol)[1]

    @property
    def fixed_C(self) -> float | None:
        """The C used without search (paper protocol without ``grid``), else None."""
        return protocol_fixed_C(self.protocol, self.grid)

    def as_json(self) -> dict:
        d = asdict(self)
        d["categories"] = list(self.categories) if self.categories is not None else None
        d["c_grid"] = list(self.c_grid)
        return d


@dataclass(frozen=True)
class RankResult:
    """What :func:`rank_concepts` computed (and :func:`run_rank` wrote, or reused).

    Attributes
    ----------
    protocol : 'standard' or 'paper'.
    classes : (C,) class names in model order.
    images, image_classes, splits : (N,) per ranked image, in activations order; ``splits`` are
        the ones used (the 50/50 fallback assigns train/test).
    local : N tuples of at most K :class:`RankedConcept` (score = mean activation).
    global_for, global_against : C tuples of at most G :class:`RankedConcept` (score = weight).
    svm : the kept linear model with its scaler and training mean.
    best_C : the C of the kept model; ``cv_fold_scores`` C → per-fold macro F1.
    metrics : classification scores on the evaluated part (``evaluated_split``).
    split_fallback : the standard protocol made a 50/50 split (every image was ``all``).
    best_fold : paper protocol: the kept fold model (None for standard).
    n_train, n_test : images the final model was fit on / scored on.
    n_units, n_labelled_units, n_concepts : U, units that carry a concept, distinct concepts.
    n_iter : liblinear iterations of the kept model; ``missing_classes`` classes it never saw.
    cv_description : how C was chosen, in words.
    warnings : notes worth reading (convergence, classes missing from a paper fold model, ...).
    out : the output folder (:func:`run_rank` only); ``reused`` True when an earlier run's
        outputs for the same inputs were reused.
    ranker : the ranker that made the lists; ``ranker_note`` why the default gave way, or None.
    """

    protocol: Protocol
    classes: tuple[str, ...]
    images: tuple[str, ...]
    image_classes: tuple[str, ...]
    splits: tuple[str, ...]
    local: tuple[tuple[RankedConcept, ...], ...]
    global_for: tuple[tuple[RankedConcept, ...], ...]
    global_against: tuple[tuple[RankedConcept, ...], ...]
    svm: SVMParams
    best_C: float
    cv_fold_scores: dict
    metrics: ClassificationMetrics
    evaluated_split: str
    split_fallback: bool
    best_fold: int | None
    n_train: int
    n_test: int
    n_units: int
    n_labelled_units: int
    n_concepts: int
    n_iter: int = 0
    missing_classes: tuple[str, ...] = ()
    cv_description: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)
    out: Path | None = None
    reused: bool = False
    ranker: str = "paper"
    ranker_note: str | None = None

    @property
    def cv_scores(self) -> dict:
        """C → mean macro F1 over the CV folds."""
        return {C: float(np.mean(s)) for C, s in sorted(self.cv_fold_scores.items())}

    @property
    def test_accuracy(self) -> float:
        return self.metrics.accuracy

    @property
    def macro_f1(self) -> float:
        return self.metrics.macro_f1

    def summary(self) -> str:
        lines = [
            f"rank ({self.protocol}): {self.n_labelled_units}/{self.n_units} units labelled, "
            f"{self.n_concepts} distinct concepts, {len(self.classes)} classes"
            + (" (reused cached result)" if self.reused else ""),
            f"  best C {self.best_C:g}; {self.evaluated_split} accuracy {self.test_accuracy:.3f}, "
            f"macro F1 {self.macro_f1:.3f} (train {self.n_train}, evaluated {self.n_test} images)",
        ]
        if self.ranker != "paper" or self.ranker_note:
            lines.append(f"  ranker {self.ranker}" + (f" ({self.ranker_note})" if self.ranker_note else ""))
        if self.out is not None:
            lines.append(f"  → {self.out}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the stage: in-memory objects → RankResult
# --------------------------------------------------------------------------------------------


def _assign_splits(act: Activations, seed: int) -> tuple[np.ndarray, bool]:
    """Splits used by the standard protocol: as given, or a stratified 50/50 fallback.

    Refuses a mix of ``all`` with ``train`` / ``test`` (which images would ``all`` be?) and a
    file that has only one of train and test.
    """
    from sklearn.model_selection import train_test_split

    where = act.path if act.path is not None else "the activations"
    splits = act.splits.astype("<U5")  # room for 'train' when the file only holds 'all'
    n_all = int((splits == "all").sum())
    has_test = bool((splits == "test").any())
    has_train = bool((splits == "train").any())
    if (has_test or has_train) and n_all:
        raise ConceptrankError(
            f"{where}: {n_all} image(s) have split 'all' beside train/test images; the standard protocol "
            "will not guess which part they belong to: give every image train or test (or map 'all' "
            "explicitly when extracting)"
        )
    if has_test and has_train:
        return splits, False
    if not has_train and not has_test:
        idx = np.arange(len(splits))
        try:
            tr, te = train_test_split(idx, test_size=0.5, stratify=act.classes, random_state=seed)
        except ValueError as e:
            raise ConceptrankError(f"no train/test split in {where} and the 50/50 stratified fallback failed: {e}") from None
        splits[tr] = "train"
        splits[te] = "test"
        return splits, True
    missing = "test" if has_train else "train"
    raise ConceptrankError(
        f"{where} has no '{missing}' images; the standard protocol needs both train and test "
        "splits (or none at all: then a stratified 50/50 split is made)"
    )


@dataclass(frozen=True)
class _Fit:
    """The fitted classifier and which images it was fit and scored on."""

    model: GlobalRanker
    splits: np.ndarray
    fallback: bool
    eval_index: np.ndarray
    evaluated: str
    n_train: int
    cv_description: str
    notes: tuple[str, ...]


def _fit_standard(act: Activations, X: np.ndarray, cfg: RankConfig) -> _Fit:
    """StandardScaler + C by stratified CV on train, refit on train, scored on test."""
    splits, fallback = _assign_splits(act, cfg.seed)
    tr = np.flatnonzero(splits == "train")
    te = np.flatnonzero(splits == "test")
    y = act.classes
    labels, n = np.unique(y[tr], return_counts=True)
    counts = dict(zip(labels.tolist(), n.tolist()))  # a class without training images is missing here
    small = [(c, counts.get(c, 0)) for c in np.unique(y).tolist() if counts.get(c, 0) < cfg.folds]
    if small:
        desc = ", ".join(f"{c!r} has {n}" for c, n in small)
        raise ConceptrankError(
            f"{len(small)} class(es) have fewer training images than the {cfg.folds} CV folds ({desc})"
        )
    model = GlobalRanker("standard", None, cfg.c_grid, cfg.folds, cfg.seed, cfg.max_iter).fit(X[tr], y[tr])
    desc = f"StratifiedKFold(n_splits={cfg.folds}, shuffle=True, random_state={cfg.seed}) on train; scaler fit on train"
    return _Fit(model, splits, fallback, te, "test (50/50 fallback)" if fallback else "test", len(tr), desc, ())


def _fit_paper(act: Activations, X: np.ndarray, cfg: RankConfig) -> _Fit:
    """The published code's KFold over all images, best fold model kept, no scaling."""
    model = GlobalRanker("paper", cfg.fixed_C, cfg.c_grid, cfg.folds, cfg.seed, cfg.max_iter).fit(X, act.classes)
    notes = []
    if model.missing_classes_:
        notes.append(
            f"the kept fold model never saw class(es) {model.missing_classes_} (KFold without "
            "shuffling over class-ordered images); they get no global concepts"
        )
    desc = (f"KFold(n_splits={cfg.folds}) without shuffling over all images in a seeded random order "
            f"(seed {cfg.seed}, standing in for the published code's os.listdir order); best fold model kept; no scaling")
    eval_idx = model.eval_index_
    return _Fit(model, act.splits, False, eval_idx, "paper best fold", X.shape[0] - len(eval_idx), desc, tuple(notes))


def _fit_classifier(act: Activations, cfg: RankConfig) -> _Fit:
    X = act.mean.astype(np.float64)
    fit = (_fit_standard if cfg.protocol == "standard" else _fit_paper)(act, X, cfg)
    if fit.model.convergence_warnings_:
        note = f"{fit.model.convergence_warnings_} SVM fit(s) reached max_iter={cfg.max_iter} without converging"
        fit = replace(fit, notes=fit.notes + (note,))
    return fit


def _labelled_concepts(labels: UnitLabels, n_units: int, cfg: RankConfig, source: str) -> list:
    """Per unit its (concept, category, iou) or None; refuses a width mismatch or no labelled unit."""
    if labels.num_units != n_units:
        raise ConceptrankError(
            f"the tally {labels.source or 'given'} has {labels.num_units} units but the activations {source} are "
            f"{n_units} units wide: they come from different layers"
        )
    unit_concepts = labels.concepts(cfg.effective_min_iou, cfg.categories)
    if not any(uc is not None and uc[0] for uc in unit_concepts):
        cats = f" in categories {list(cfg.categories)}" if cfg.categories else ""
        raise ConceptrankError(
            f"no unit of {labels.source or 'the tally'} has a concept{cats} with IoU ≥ {cfg.effective_min_iou:g}; "
            "lower --min-iou or widen --categories"
        )
    return unit_concepts


def _svm_params(model: GlobalRanker, classes: list[str]) -> SVMParams:
    return SVMParams(
        coef=model.coef_.astype(np.float64), intercept=model.intercept_.astype(np.float64),
        mean=model.scaler_mean_, scale=model.scaler_scale_, classes=tuple(classes),
        train_mean=np.asarray(model.train_mean_, dtype=np.float64), standardized=model.protocol == "standard",
    )


def rank_concepts(act: Activations, labels: UnitLabels, cfg: RankConfig, *, thresholds: np.ndarray | None = None,
                  probe: ProbeActivations | None = None) -> RankResult:
    """Rank concepts locally (per image) and globally (per class, from a linear SVM).

    Parameters
    ----------
    act : per-image mean activations (N, U) with images, classes and splits (N,) (and ``max``).
    labels : Network Dissection labels of the U units (``tally.csv``).
    cfg : :class:`RankConfig`.
    thresholds : (U,) the dissection's thresholds; probe : the probe set's activations — what the
        rankers beyond the paper's need (:func:`conceptrank.core.rankers.resolve_ranker`).

    Returns
    -------
    :class:`RankResult` with the rankings, the SVM and its scores (``out`` None).
    """
    cfg.validate()
    N, U = act.mean.shape
    unit_concepts = _labelled_concepts(labels, U, cfg, str(act.path or "given"))
    ids, names = unit_concept_table(unit_concepts)
    fit = _fit_classifier(act, cfg)
    model, X = fit.model, act.mean.astype(np.float64)
    y = act.classes
    metrics = classification_metrics(y[fit.eval_index], model.predict(X[fit.eval_index]), model.classes_)
    classes = [str(c) for c in model.classes_]
    available = [n for n, v in (("max", act.max), ("thresholds", thresholds), ("probe", probe)) if v is not None]
    ranker, note = resolve_ranker(cfg.protocol, cfg.ranker, available)
    rows = np.flatnonzero(fit.splits == "train") if cfg.protocol == "standard" else np.arange(N)
    mx = None if act.max is None else np.asarray(act.max, dtype=np.float64)
    _, local, pos, neg = rank_lists(
        ranker, X[rows], y[rows], act.mean, UnitBank(unit_concepts, thresholds), model, k=cfg.top_local,
        g=cfg.top_global, max_fit=None if mx is None else mx[rows], max_all=mx, probe=probe,
        local_pool=cfg.local_pool, global_pool=cfg.global_pool)
    return RankResult(
        protocol=cfg.protocol, classes=tuple(classes),
        images=tuple(act.images.tolist()), image_classes=tuple(y.tolist()), splits=tuple(fit.splits.tolist()),
        local=tuple(tuple(r) for r in local), global_for=tuple(tuple(r) for r in pos),
        global_against=tuple(tuple(r) for r in neg), svm=_svm_params(model, classes),
        best_C=model.best_C_, cv_fold_scores={C: tuple(s) for C, s in sorted(model.cv_scores_.items())},
        metrics=metrics, evaluated_split=fit.evaluated, split_fallback=fit.fallback, best_fold=model.best_fold_,
        n_train=int(fit.n_train), n_test=int(len(fit.eval_index)), n_units=int(U),
        n_labelled_units=int((ids >= 0).sum()), n_concepts=len(names), n_iter=model.n_iter_,
        missing_classes=tuple(model.missing_classes_), cv_description=fit.cv_description, warnings=fit.notes,
        ranker=ranker, ranker_note=note,
    )


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _RankInputs:
    """The files a rank run reads and what identifies them (the cache key)."""

    act_path: Path
    tally: Path
    extract_json: Path
    dissect_json: Path
    extract_meta: dict | None
    dissect_meta: dict | None
    fingerprints: dict | None
    key: str | None
    params: dict


def _rank_inputs(activations: Path, tally: Path, cfg: RankConfig) -> _RankInputs:
    act_path = npz_path(Path(activations))
    tally = Path(tally)
    extract_json, dissect_json = act_path.parent / "extract.json", tally.parent / "dissect.json"
    extract_meta, dissect_meta = _read_json_if(extract_json), _read_json_if(dissect_json)
    params = {"format": RANK_FORMAT, "config": cfg.as_json(), "inputs": [str(act_path), str(tally)]}
    key = fingerprints = None
    if act_path.is_file() and tally.is_file():
        beside = [tally.parent / "thresholds.npy", tally.parent / PROBE_FILE]  # the rankers' extra inputs
        fingerprints = {
            "activations_sha256": file_sha256(act_path),
            "tally_sha256": file_sha256(tally),
            "ranker_inputs_sha256": [file_sha256(p) if p.is_file() else None for p in beside],
            "extract": (extract_meta or {}).get("fingerprints"),
            "dissect": (dissect_meta or {}).get("fingerprints"),
        }
        key = stage_key("rank", fingerprints, params)
        check_written_by(act_path, fingerprints["activations_sha256"], extract_json, extract_meta,
                         "re-run `conceptrank extract` (or remove that manifest)")
        check_written_by(tally, fingerprints["tally_sha256"], dissect_json, dissect_meta,
                         "re-run `conceptrank dissect` (or remove that manifest)")
    return _RankInputs(act_path, tally, extract_json, dissect_json, extract_meta, dissect_meta, fingerprints, key, params)


def ranker_side_inputs(tally: Path, dissect_meta: dict | None) -> tuple[np.ndarray | None, ProbeActivations | None]:
    """``thresholds.npy`` and ``probe_activations.npz`` beside ``tally``, when there (the probe file only
    when it was made with the dissection's model and layer, as ``dissect_meta`` records)."""
    folder = Path(tally).parent
    thresholds = None
    if (folder / "thresholds.npy").is_file():
        try:
            thresholds = np.load(folder / "thresholds.npy", allow_pickle=False).astype(np.float64).reshape(-1)
        except (OSError, ValueError) as e:
            raise ConceptrankError(f"cannot read {folder / 'thresholds.npy'}: {e}") from None
    probe = None
    stored = stored_fingerprints(folder / PROBE_FILE) if (folder / PROBE_FILE).is_file() else None
    meta = dissect_meta or {}
    if stored and stored["model"] == (meta.get("fingerprints") or {}).get("model") and stored["layer"] == meta.get("layer"):
        probe = load_probe_activations(folder / PROBE_FILE)
    return thresholds, probe


def _invalidate(out: Path) -> None:
    """Remove the manifest and what ``evaluate`` wrote: none of it belongs to the new ranking."""
    (out / "rank.json").unlink(missing_ok=True)
    for name in EVALUATE_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    cache.remove_temps(out, RANK_OUTPUTS + ("rank.json",))


def _classifier_json(res: RankResult, cfg: RankConfig) -> dict:
    m = res.metrics
    return {
        "protocol": res.protocol,
        "classes": list(res.classes),
        "best_C": res.best_C,
        "c_grid": sorted(res.cv_fold_scores),
        "cv": res.cv_description,
        "cv_scores": [{"C": C, "fold_macro_f1": list(s), "mean_macro_f1": float(np.mean(s))}
                      for C, s in sorted(res.cv_fold_scores.items())],
        "best_fold": res.best_fold,
        "evaluated_split": res.evaluated_split,
        "split_fallback": res.split_fallback,
        "n_train": res.n_train,
        "n_test": res.n_test,
        "test_accuracy": m.accuracy,
        "macro_precision": m.macro_precision,
        "macro_recall": m.macro_recall,
        "macro_f1": m.macro_f1,
        "per_class": m.per_class,
        "confusion_matrix": m.confusion_matrix,
        "confusion_matrix_axes": "rows = true class, columns = predicted class, in 'classes' order",
        "standardized": res.svm.standardized,
        "svm": {
            "multi_class": "crammer_singer", "loss": "hinge", "dual": True, "class_weight": "balanced",
            "random_state": cfg.seed, "max_iter": cfg.max_iter, "n_iter": res.n_iter,
        },
        "missing_classes": list(res.missing_classes),
        "warnings": list(res.warnings),
    }


def _write_rank_outputs(out: Path, res: RankResult, cfg: RankConfig) -> None:
    """Every output but the manifest, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "local_concepts.csv", local_concepts_text(res.images, res.image_classes, res.splits, res.local))
    atomic_write_text(out / "images.csv", images_text(res.images, res.image_classes, res.splits, res.local))
    atomic_write_text(out / "global_concepts.csv", global_concepts_text(res.classes, res.global_for, res.global_against))
    atomic_write_json(out / "rankings.json", rankings_document(
        res.protocol, res.classes, res.images, res.image_classes, res.splits, res.local, res.global_for,
        res.global_against))
    atomic_write_json(out / "classifier.json", _classifier_json(res, cfg))
    save_svm(out / "svm.npz", res.svm)


def _write_rank_manifest(out: Path, res: RankResult, cfg: RankConfig, inp: _RankInputs) -> None:
    """rank.json, written last: it vouches for the outputs above."""
    atomic_write_json(out / "rank.json", {
        "stage": "rank",
        "config": inp.params["config"],
        "protocol": cfg.protocol,
        "ranker": res.ranker,
        "ranker_note": res.ranker_note,
        "top_local": cfg.top_local,
        "top_global": cfg.top_global,
        "min_iou": cfg.effective_min_iou,
        "categories": inp.params["config"]["categories"],
        "local_pool": cfg.local_pool,
        "global_pool": cfg.global_pool,
        "inputs": {"activations": str(inp.act_path), "tally": str(inp.tally)},
        "fingerprints": inp.fingerprints,
        "layer": (inp.extract_meta or {}).get("layer") or (inp.dissect_meta or {}).get("layer"),
        "n_images": len(res.images),
        "n_units": res.n_units,
        "n_labelled_units": res.n_labelled_units,
        "n_concepts": res.n_concepts,
        "classes": list(res.classes),
        "packages": package_versions(),
        "cache": manifest_section("rank", inp.key, inp.fingerprints, inp.params, out, RANK_OUTPUTS),
    })


def run_rank(activations: Path, tally: Path, out: Path, cfg: RankConfig) -> RankResult:
    """Read activations and tally, :func:`rank_concepts`, write the outputs into ``out``.

    Parameters
    ----------
    activations : the extract folder or its ``activations.npz``.
    tally : a NetDissect-Lite ``tally.csv`` with as many units as the activations are wide.
    out : output folder (created).
    cfg : :class:`RankConfig`.

    Writes ``local_concepts.csv``, ``global_concepts.csv``, ``images.csv``, ``rankings.json``,
    ``classifier.json``, ``svm.npz`` and ``rank.json`` (atomically, ``rank.json`` last). When
    ``rank.json`` was written for the same activations and tally bytes, configuration and package
    versions, and the outputs are intact, they are reused (``RankResult.reused``). When it
    recomputes, the previous ``evaluate`` outputs in ``out`` are removed.
    """
    cfg.validate()
    out = Path(out)
    inp = _rank_inputs(activations, tally, cfg)
    if inp.key is not None:
        manifest = lookup(out / "rank.json", inp.key)
        reused = _reused_result(out, manifest) if manifest is not None else None
        if reused is not None:
            return reused
    act = load_activations(inp.act_path)
    labels = read_tally(inp.tally)
    check_compatible(inp.extract_meta, inp.dissect_meta, str(inp.extract_json), str(inp.dissect_json))
    thresholds, probe = ranker_side_inputs(inp.tally, inp.dissect_meta)
    res = rank_concepts(act, labels, cfg, thresholds=thresholds, probe=probe)
    _invalidate(out)
    _write_rank_outputs(out, res, cfg)
    _write_rank_manifest(out, res, cfg, inp)
    return replace(res, out=out)


def _reused_result(out: Path, manifest: Manifest) -> RankResult | None:
    """The result of an earlier run whose manifest matched, read back from its outputs."""
    meta = manifest.data
    try:
        clf = read_json(out / "classifier.json")
        lists = read_ranked_lists(out)
        classes = tuple(str(c) for c in clf["classes"])
        metrics = ClassificationMetrics(
            accuracy=float(clf["test_accuracy"]), macro_precision=float(clf["macro_precision"]),
            macro_recall=float(clf["macro_recall"]), macro_f1=float(clf["macro_f1"]),
            per_class=clf["per_class"], confusion_matrix=clf["confusion_matrix"])
        return RankResult(
            protocol=meta["protocol"], classes=classes, images=lists.images, image_classes=lists.image_classes,
            splits=lists.splits, local=lists.local,
            global_for=tuple(lists.global_for.get(c, ()) for c in classes),
            global_against=tuple(lists.global_against.get(c, ()) for c in classes),
            svm=load_svm(out / "svm.npz"), best_C=float(clf["best_C"]),
            cv_fold_scores={float(r["C"]): tuple(float(x) for x in r["fold_macro_f1"]) for r in clf["cv_scores"]},
            metrics=metrics, evaluated_split=str(clf["evaluated_split"]), split_fallback=bool(clf["split_fallback"]),
            best_fold=clf.get("best_fold"), n_train=int(clf["n_train"]), n_test=int(clf["n_test"]),
            n_units=int(meta["n_units"]), n_labelled_units=int(meta["n_labelled_units"]),
            n_concepts=int(meta["n_concepts"]), n_iter=int((clf.get("svm") or {}).get("n_iter", 0)),
            missing_classes=tuple(clf.get("missing_classes") or ()), cv_description=str(clf.get("cv", "")),
            warnings=tuple(str(w) for w in clf.get("warnings", ())), out=out, reused=True,
            ranker=str(meta.get("ranker", "paper")), ranker_note=meta.get("ranker_note"),
        )
    except (OSError, ValueError, KeyError, TypeError, ConceptrankError):
        return None
