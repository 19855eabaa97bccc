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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from conceptrank.core.ranking import (
    DEFAULT_C_GRID,
    DEFAULT_MIN_IOU,
    PAPER_C,
    PAPER_GLOBAL_POOL,
    PAPER_LOCAL_POOL,
    PROTOCOLS,
    GlobalRanker,
    RankedConcept,
    classification_metrics,
    global_rankings,
    local_rankings,
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
    save_npz,
    stage_key,
)
from conceptrank.io.tally_csv import read_tally

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

RANK_FORMAT = 1  # bump when an output's bytes change for the same inputs
RANK_OUTPUTS = ("local_concepts.csv", "global_concepts.csv", "images.csv", "rankings.json", "classifier.json", "svm.npz")



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
    act_path = npz_path(Path(activations))
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


# ``conceptrank.stages.rank`` (lazy export in __init__) resolves to this function.
rank = run_rank
