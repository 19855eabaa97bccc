"""Read a run folder (``demo`` / ``run`` output) into plain, immutable records for the report.

Every stage's output is optional: a missing or unreadable file leaves its part empty and adds a
line to :attr:`RunData.warnings`, so that the report shows what exists and says what does not.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from conceptrank.errors import ConceptrankError
from conceptrank.io.rankings import run_folder_mismatches
from conceptrank.io.svm import load_svm

__all__ = ["UnitLabel", "RankedConcept", "ImageRecord", "RunData", "load_run", "extra_summary_keys", "KNOWN_SUMMARY_KEYS"]

# summary.json keys that the overview shows in its own tables; any other key is an "extra score".
KNOWN_SUMMARY_KEYS = frozenset({
    "ranking", "protocol", "split", "n_images", "n_classes", "images_per_class", "omitted_classes", "configs",
    "std_ddof", "agreement", "details", "inputs",
})


@dataclass(frozen=True)
class UnitLabel:
    """A unit's Network Dissection label: ``unit`` is 1-based as in tally.csv."""

    unit: int
    concept: str
    category: str
    iou: float


@dataclass(frozen=True)
class RankedConcept:
    """A row of local_concepts.csv (``value`` = mean activation) or global_concepts.csv (``value`` = SVM weight)."""

    rank: int
    concept: str
    category: str
    unit: int  # 1-based
    value: float
    sign: str = "+"


@dataclass(frozen=True)
class ImageRecord:
    """A target image: ``row`` indexes activations.npz; ``image`` is relative to the target image root."""

    row: int
    image: str
    cls: str
    split: str


@dataclass(frozen=True)
class RunData:
    """Everything the report shows, read from a run folder.

    Attributes
    ----------
    root : the run folder.
    config, model : run.json's two parts ({} when absent).
    dissect, extract, rank, classifier, summary : the stages' JSON files (None when absent).
    layer : the dissected / extracted layer.
    units : every unit's label from tally.csv, in unit order.
    categories : tally categories in file order.
    iou_threshold : IoU from which a unit counts as labelled (interpretable).
    thresholds : (U,) per-unit activation thresholds, or None.
    top_images : {'index', 'value', 'images'} from top_images.npz, or None.
    probe_root, target_root : the probe set folder and the folder target image paths are relative to.
    classes : class order (classifier.json, else rank.json, else first appearance).
    images : the target images (rank/images.csv, else activations.npz).
    local : image path → its local concepts in rank order.
    global_concepts : class → its global concepts, '+' then '-', each in rank order.
    precision : class → config name → agreement.
    configs : agreement configurations in order.
    predictions : image path → predicted class (from svm.npz and the mean activations).
    warnings : what could not be read.
    planted : class → its planted concepts, from truth.json when the run has one (else empty).
    visible : image file name → concepts drawn in it (truth.json), else empty.
    model_card : the model card (model.json) when the model is one, else {}.
    class_chance : config → class → {'permutation_mean', 'ci_low', 'ci_high', …} from evaluation.json.
    """

    root: Path
    config: Mapping[str, Any]
    model: Mapping[str, Any]
    dissect: Mapping[str, Any] | None
    extract: Mapping[str, Any] | None
    rank: Mapping[str, Any] | None
    classifier: Mapping[str, Any] | None
    summary: Mapping[str, Any] | None
    layer: str
    units: tuple[UnitLabel, ...]
    categories: tuple[str, ...]
    iou_threshold: float
    thresholds: np.ndarray | None
    top_images: Mapping[str, np.ndarray] | None
    probe_root: Path | None
    target_root: Path | None
    classes: tuple[str, ...]
    images: tuple[ImageRecord, ...]
    local: Mapping[str, tuple[RankedConcept, ...]]
    global_concepts: Mapping[str, tuple[RankedConcept, ...]]
    precision: Mapping[str, Mapping[str, float]]
    configs: tuple[str, ...]
    predictions: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    planted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    visible: Mapping[str, frozenset] = field(default_factory=dict)
    model_card: Mapping[str, Any] = field(default_factory=dict)
    class_chance: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)

    def labelled_units(self) -> list[UnitLabel]:
        """Units with a concept and IoU ≥ :attr:`iou_threshold`, by IoU descending (ties: unit number)."""
        out = [u for u in self.units if u.concept and u.iou >= self.iou_threshold and u.iou > 0]
        return sorted(out, key=lambda u: (-u.iou, u.unit))


# -- readers -----------------------------------------------------------------------------------
def _json(path: Path, warnings: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        warnings.append(f"cannot read {path.name}: {e}")
        return None


def _csv(path: Path, warnings: list[str]) -> list[dict[str, str]] | None:
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:
        warnings.append(f"cannot read {path.name}: {e}")
        return None


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _int(v: Any, default: int = 0) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _existing(*paths: Any) -> Path | None:
    for p in paths:
        if p and Path(p).exists():
            return Path(p)
    return None


def _read_tally(path: Path, warnings: list[str]) -> tuple[tuple[UnitLabel, ...], tuple[str, ...]]:
    from conceptrank.io.tally_csv import TallyError, read_tally

    try:
        t = read_tally(path)
    except (TallyError, OSError) as e:
        warnings.append(str(e))
        return (), ()
    units = tuple(UnitLabel(u + 1, t.label[u], t.category[u], float(t.score[u])) for u in range(t.num_units))
    return units, t.categories


def _ranked(rows: list[dict[str, str]] | None, key: str, value: str) -> dict[str, list[RankedConcept]]:
    out: dict[str, list[RankedConcept]] = {}
    for r in rows or []:
        out.setdefault(r.get(key, ""), []).append(RankedConcept(
            _int(r.get("rank")), r.get("concept", ""), r.get("category", ""), _int(r.get("unit")),
            _float(r.get(value)), r.get("sign", "+") or "+",
        ))
    return out


def _predictions(rank_dir: Path, mean: np.ndarray | None, names: list[str], warnings: list[str]) -> dict[str, str]:
    path = rank_dir / "svm.npz"
    if mean is None or not path.is_file():
        return {}
    try:
        svm = load_svm(path)
    except (OSError, ValueError, KeyError) as e:  # ConceptrankError is a ValueError
        warnings.append(f"cannot read svm.npz: {e}")
        return {}
    if svm.coef.shape[1] != mean.shape[1]:
        warnings.append(f"svm.npz has {svm.coef.shape[1]} units, activations {mean.shape[1]}: no predictions shown")
        return {}
    scores = svm.decision(mean)
    classes = svm.classes
    pred = np.argmax(scores, axis=1)
    return {names[i]: classes[int(pred[i])] for i in range(len(names))}


def _truth(config: Mapping, summary: Mapping | None, warnings: list[str]):
    """truth.json of the run (config, then summary.json), or None."""
    from conceptrank.io.truth import read_truth

    s = summary or {}
    gt = s.get("ground_truth") if isinstance(s.get("ground_truth"), Mapping) else {}
    path = _existing(config.get("truth"), s.get("truth") if isinstance(s.get("truth"), str) else None, gt.get("path"))
    if path is None:
        return None
    try:
        return read_truth(path)
    except ConceptrankError as e:
        warnings.append(f"planted concepts not shown: {e}")
        return None


def _model_card(config: Mapping, model: Mapping) -> dict:
    for spec in (model.get("model"), config.get("model")):
        if not spec:
            continue
        p = Path(str(spec))
        card = p if p.suffix == ".json" else p / "model.json"
        if card.is_file():
            got = _json(card, [])
            if isinstance(got, dict):
                return got
    return {}


def _class_chance(details: Mapping | None) -> dict:
    chance = (details or {}).get("chance")
    if not isinstance(chance, Mapping):
        return {}
    return {str(cfg): {str(c): dict(v) for c, v in per.items() if isinstance(v, Mapping)}
            for cfg, per in chance.items() if isinstance(per, Mapping)}


def _dissect_arrays(ddir: Path, warnings: list[str]) -> tuple[np.ndarray | None, dict | None]:
    """thresholds.npy and top_images.npz of a dissection folder (None for what is missing or unreadable)."""
    thresholds = None
    if (ddir / "thresholds.npy").is_file():
        try:
            thresholds = np.load(ddir / "thresholds.npy", allow_pickle=False).astype(np.float64).reshape(-1)
        except (OSError, ValueError) as e:
            warnings.append(f"cannot read thresholds.npy: {e}")
    top_images = None
    if (ddir / "top_images.npz").is_file():
        try:
            with np.load(ddir / "top_images.npz", allow_pickle=False) as z:
                top_images = {k: z[k] for k in ("index", "value", "images")}
        except (OSError, ValueError, KeyError) as e:
            warnings.append(f"cannot read top_images.npz: {e}")
    return thresholds, top_images


def _activations(npz: Path, warnings: list[str]) -> tuple[np.ndarray | None, list[str], list[str], list[str]]:
    """activations.npz's (N, U) means, image names, classes and splits (None and empty lists when absent)."""
    if not npz.is_file():
        return None, [], [], []
    try:
        with np.load(npz, allow_pickle=False) as z:
            images = [str(s) for s in z["images"]]
            splits = [str(s) for s in z["splits"]] if "splits" in z.files else ["all"] * len(images)
            return np.asarray(z["mean"], dtype=np.float64), images, [str(s) for s in z["classes"]], splits
    except (OSError, ValueError, KeyError) as e:
        warnings.append(f"cannot read activations.npz: {e}")
        return None, [], [], []


def load_run(run: str | Path) -> RunData:
    """Read a run folder; raises ConceptrankError only when it is not a run folder at all."""
    root = Path(run)
    if not root.is_dir():
        raise ConceptrankError(f"run folder not found: {root}")
    warnings: list[str] = []
    rj = _json(root / "run.json", warnings) or {}
    config, model = rj.get("config") or {}, rj.get("model") or {}
    layer = str(config.get("layer") or "")
    stage_dirs = [root / d for d in ("dissect", "extract", "rank")]
    if not rj and not any(d.is_dir() for d in stage_dirs):
        raise ConceptrankError(f"{root} is not a run folder (no run.json, dissect/, extract/ or rank/)")
    warnings += [f"PARTS OF DIFFERENT RUNS: {m}" for m in run_folder_mismatches(root)]

    # dissect: a single layer writes dissect/, several write dissect/<layer>/
    ddir = root / "dissect"
    if layer and not (ddir / "tally.csv").exists() and (ddir / layer / "tally.csv").exists():
        ddir = ddir / layer
    dissect = _json(ddir / "dissect.json", warnings)
    rank = _json(root / "rank" / "rank.json", warnings)
    tally = _existing(ddir / "tally.csv", config.get("tally"), (rank or {}).get("inputs", {}).get("tally"))
    units, categories = _read_tally(tally, warnings) if tally else ((), ())
    if tally is None:
        warnings.append("no tally.csv: unit labels are not shown")
    layer = layer or str((dissect or {}).get("layer") or (rank or {}).get("layer") or "")
    thr_default = 0.04
    iou_threshold = _float(((dissect or {}).get("config") or {}).get("iou_threshold", math.nan))
    if math.isnan(iou_threshold):
        iou_threshold = _float((rank or {}).get("min_iou", thr_default))
        iou_threshold = thr_default if math.isnan(iou_threshold) else iou_threshold
    thresholds, top_images = _dissect_arrays(ddir, warnings)
    probe_root = _existing(config.get("probe"), (dissect or {}).get("probe"))

    # extract
    extract = _json(root / "extract" / "extract.json", warnings)
    dataset = (extract or {}).get("dataset") or {}
    troot = _existing(dataset.get("root"), config.get("target"))
    target_root = (troot.parent if troot.is_file() else troot) if troot else None
    mean, act_images, act_classes, act_splits = _activations(root / "extract" / "activations.npz", warnings)

    # rank / evaluate
    rdir = root / "rank"
    classifier = _json(rdir / "classifier.json", warnings)
    summary = _json(rdir / "summary.json", warnings)
    row_of = {name: i for i, name in enumerate(act_images)}
    images_csv = _csv(rdir / "images.csv", warnings)
    if images_csv is not None:
        images = tuple(ImageRecord(row_of.get(r.get("image", ""), -1), r.get("image", ""), r.get("class", ""),
                                   r.get("split", "")) for r in images_csv)
    else:
        images = tuple(ImageRecord(i, n, c, s) for i, (n, c, s) in enumerate(zip(act_images, act_classes, act_splits)))
    local = {k: tuple(sorted(v, key=lambda r: r.rank))
             for k, v in _ranked(_csv(rdir / "local_concepts.csv", warnings), "image", "score").items()}
    glob = {k: tuple(sorted(v, key=lambda r: (r.sign != "+", r.rank)))
            for k, v in _ranked(_csv(rdir / "global_concepts.csv", warnings), "class", "weight").items()}
    prec_rows = _csv(rdir / "precision.csv", warnings) or []
    precision = {r.get("class", ""): {k: _float(v) for k, v in r.items() if k != "class"} for r in prec_rows}
    if summary and summary.get("configs"):
        configs = tuple(str(c) for c in summary["configs"])
    else:
        configs = tuple(k for k in (prec_rows[0] if prec_rows else {}) if k != "class")
    classes = (classifier or {}).get("classes") or (rank or {}).get("classes")
    if not classes:
        classes = list(dict.fromkeys([im.cls for im in images] + list(precision) + list(glob)))
    predictions = _predictions(rdir, mean, act_images, warnings)
    truth = _truth(config, summary, warnings)
    details_name = (summary or {}).get("details")
    details = _json(rdir / Path(details_name).name, warnings) if isinstance(details_name, str) and details_name else None
    return RunData(
        root=root, config=config, model=model, dissect=dissect, extract=extract, rank=rank, classifier=classifier,
        summary=summary, layer=layer, units=units, categories=tuple(categories), iou_threshold=float(iou_threshold),
        thresholds=thresholds, top_images=top_images, probe_root=probe_root, target_root=target_root,
        classes=tuple(str(c) for c in classes), images=images, local=local, global_concepts=glob,
        precision=precision, configs=configs, predictions=predictions, warnings=tuple(warnings),
        planted=dict(truth.classes) if truth else {}, visible=dict(truth.images) if truth else {},
        model_card=_model_card(config, model), class_chance=_class_chance(details),
    )


# -- summary.json extras ------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tables(obj: Mapping[str, Any], title: str, out: dict) -> None:
    """Collect ``obj``'s numbers: scalars, tables of flat numeric sub-dicts, and notes (recursing)."""
    rows: dict[tuple[str, ...], list[tuple[str, dict]]] = {}
    for k, v in obj.items():
        name = f"{title}.{k}" if title else str(k)
        if k == "note" and isinstance(v, str):
            out["notes"].append(v)
        elif _is_number(v):
            out["scalars"].append((name, v))
        elif isinstance(v, str) and len(v) <= 300:
            out["scalars"].append((name, v))
        elif isinstance(v, (list, tuple)):
            if v and all(isinstance(x, str) for x in v):
                if "note" in str(k):
                    out["notes"].extend(v)
                else:
                    out["scalars"].append((name, ", ".join(v)))
            elif v and all(_is_number(x) for x in v):
                out["scalars"].append((name, ", ".join(f"{x:g}" for x in v)))
        elif isinstance(v, Mapping):
            nums = {str(kk): vv for kk, vv in v.items() if _is_number(vv)}
            if nums and not any(isinstance(vv, Mapping) for vv in v.values()):
                rows.setdefault(tuple(nums), []).append((str(k), nums))  # a row of a table
                if isinstance(v.get("note"), str):
                    out["notes"].append(v["note"])
            else:
                _tables(v, name, out)
    for cols, rs in rows.items():
        out["tables"].append({"title": title, "columns": list(cols), "rows": [(r, [d[c] for c in cols]) for r, d in rs]})


def extra_summary_keys(summary: Mapping[str, Any] | None) -> list[dict]:
    """summary.json keys beyond the agreement table (chance baselines, bootstrap, ground truth, …), generically.

    Nested dicts whose values are flat dicts of numbers (e.g. one per configuration) become tables:
    one row per sub-dict, one column per number. Other numbers and short strings become
    ``scalars`` (a list of strings joined by commas); ``note`` strings and lists under a key with
    "note" in its name become ``notes``.

    Returns
    -------
    One dict per key that holds anything to show: ``key``, ``scalars`` (list of ``(name, value)``),
    ``tables`` (list of ``{title, columns, rows: [(label, values)]}``) and ``notes`` (list of str).
    """
    out = []
    for key, value in (summary or {}).items():
        if key in KNOWN_SUMMARY_KEYS or value is None:
            continue
        item: dict = {"key": str(key), "scalars": [], "tables": [], "notes": []}
        if isinstance(value, Mapping):
            _tables(value, "", item)
        else:
            _tables({str(key): value}, "", item)
            item["scalars"] = [("", v) for _, v in item["scalars"]]
        if item["scalars"] or item["tables"] or item["notes"]:
            out.append(item)
    return out
