"""NetDissect-Lite ``tally.csv``: the unit → concept table, read and written in its exact layout.

Layout: ``unit,category,label,score`` then, per category in category.csv order,
``<cat>-label,<cat>-truth,<cat>-activation,<cat>-intersect,<cat>-iou``; ``unit`` is 1-based and
rows are sorted by ``score`` descending.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from conceptrank.errors import TallyError

__all__ = ["TallyError", "UnitLabels", "read_tally", "read_thresholds", "format_tally"]


@dataclass(frozen=True)
class UnitLabels:
    """Best concept of every unit of a layer (0-based unit index ``u`` = tally ``unit`` − 1).

    Attributes
    ----------
    label : tuple of str, length U — best label name ('' when none).
    category : tuple of str, length U — category of that label.
    score : np.ndarray (U,) float64 — its IoU.
    categories : tuple of str — categories with per-category columns, in file order.
    per_category : dict category → (labels tuple of length U, iou np.ndarray (U,)).
    source : path of the file read (or '').
    """

    label: tuple[str, ...]
    category: tuple[str, ...]
    score: np.ndarray
    categories: tuple[str, ...]
    per_category: dict
    source: str = ""

    @property
    def num_units(self) -> int:
        return len(self.label)

    def concepts(self, min_iou: float = 0.0, categories: Sequence[str] | None = None) -> list[tuple[str, str, float] | None]:
        """Per unit ``(concept, category, iou)`` or ``None`` when the unit gets no concept.

        With ``categories`` the unit's best label among those categories is used (from the
        per-category columns); a unit whose IoU is below ``min_iou`` or whose label is '' gets None.
        """
        if categories is not None:
            unknown = [c for c in categories if c not in self.categories]
            if unknown:
                raise TallyError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}: the tally "
                                 f"{self.source} has {list(self.categories)}")
        if not math.isfinite(min_iou):
            raise TallyError(f"the minimum IoU must be a number in [0, 1], got {min_iou}")
        out: list[tuple[str, str, float] | None] = []
        for u in range(self.num_units):
            if categories is None:
                lab, cat, iou = self.label[u], self.category[u], float(self.score[u])
            else:
                best = None
                for c in self.categories:
                    if c not in categories:
                        continue
                    labs, ious = self.per_category[c]
                    if best is None or ious[u] >= best[2]:
                        best = (labs[u], c, float(ious[u]))
                if best is None:
                    raise TallyError(f"none of the categories {list(categories)} is in the tally {self.source}")
                lab, cat, iou = best
            out.append((lab, cat, iou) if lab and iou >= min_iou and iou > 0 else None)
        return out


def _score(value: str | None, path: Path, line: int, col: str) -> float:
    """An IoU cell: empty means 0; anything but a finite number in [0, 1] is an error."""
    try:
        v = float(value or 0.0)
    except (TypeError, ValueError):
        raise TallyError(f"{path} line {line}: column {col!r} is not a number: {value!r}") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise TallyError(f"{path} line {line}: column {col!r} must be an IoU in [0, 1], got {value!r}")
    return v


def read_thresholds(path: str | os.PathLike, units: int | None = None) -> np.ndarray:
    """Per-unit activation thresholds (``thresholds.npy``): a 1-D array of finite numbers.

    Raises
    ------
    TallyError
        Naming the file: missing, unreadable, pickled, not 1-D, NaN/inf, or not ``units`` long.
    """
    path = Path(path)
    if not path.is_file():
        raise TallyError(f"thresholds file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise TallyError(f"{path}: not a readable .npy array of thresholds ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "fiu":
        raise TallyError(f"{path}: thresholds must be a 1-D numeric array (one per unit), got "
                         f"{getattr(arr, 'dtype', type(arr))} of shape {getattr(arr, 'shape', '?')}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise TallyError(f"{path}: {bad.size} threshold(s) are NaN or infinite (first: unit {int(bad[0]) + 1})")
    if units is not None and arr.shape[0] != units:
        raise TallyError(f"{path}: {arr.shape[0]} thresholds, the layer has {units} units")
    return arr


def read_tally(path: str | os.PathLike) -> UnitLabels:
    """Read a NetDissect-Lite (or conceptrank) tally.csv."""
    path = Path(path)
    if not path.exists():
        raise TallyError(f"tally file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in ("unit", "category", "label", "score"):
            if col not in header:
                raise TallyError(f"{path}: missing column {col!r} (is this a NetDissect tally.csv?)")
        cats = [h[: -len("-label")] for h in header if h.endswith("-label")]
        rows = list(reader)
    units = []
    for line, r in enumerate(rows, start=2):
        try:
            units.append(int(r["unit"]))
        except ValueError:
            raise TallyError(f"{path} line {line}: unit {r['unit']!r} is not an integer") from None
    n = len(rows)
    if sorted(units) != list(range(1, n + 1)):
        raise TallyError(f"{path}: units must be 1..{n} each exactly once")
    label = [""] * n
    category = [""] * n
    score = np.zeros(n)
    per = {c: ([""] * n, np.zeros(n)) for c in cats}
    for line, r in enumerate(rows, start=2):
        u = int(r["unit"]) - 1
        label[u] = r["label"] or ""
        category[u] = r["category"] or ""
        score[u] = _score(r["score"], path, line, "score")
        for c in cats:
            per[c][0][u] = r.get(f"{c}-label") or ""
            per[c][1][u] = _score(r.get(f"{c}-iou"), path, line, f"{c}-iou")
    return UnitLabels(
        tuple(label), tuple(category), score, tuple(cats),
        {c: (tuple(v[0]), v[1]) for c, v in per.items()}, str(path),
    )


def format_tally(
    categories: Sequence[str],
    best_label: np.ndarray,
    truth: np.ndarray,
    activation: np.ndarray,
    intersect: np.ndarray,
    iou: np.ndarray,
    label_names: Sequence[str],
) -> str:
    """Format tally rows as NetDissect-Lite writes them.

    Parameters
    ----------
    categories : C category names in category.csv order.
    best_label : (U, C) int — best label number per unit and category (0 = none).
    truth : (U, C) int — truth count of that label.
    activation : (U, C) int — the unit's per-category activation count used in the IoU.
    intersect : (U, C) int — intersection count.
    iou : (U, C) float — IoU of that label.
    label_names : names indexed by label number ('' for 0).
    """
    U, C = best_label.shape
    # Best category per unit: highest IoU, ties to the later category (NetDissect-Lite reverses an
    # ascending argsort).
    rev = iou[:, ::-1]
    bestcat = C - 1 - np.argmax(rev, axis=1)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["unit", "category", "label", "score"]
    for c in categories:
        header += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    w.writerow(header)
    order = sorted(range(U), key=lambda u: -iou[u, bestcat[u]])  # stable: ties keep unit order
    for u in order:
        b = bestcat[u]
        row = [u + 1, categories[b], label_names[best_label[u, b]], repr(float(iou[u, b]))]
        for ci in range(C):
            row += [
                label_names[best_label[u, ci]],
                int(truth[u, ci]),
                int(activation[u, ci]),
                int(intersect[u, ci]),
                repr(float(iou[u, ci])),
            ]
        w.writerow(row)
    return buf.getvalue()
