"""The report's figures as pure functions: small data in, a matplotlib ``Figure`` out.

Nothing here reads files or keeps global state; :func:`save_figure` writes a figure and closes it.
Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so they work with the Agg
backend in any thread and never open a window. The layouts follow the paper: the confusion matrix
normalized per true class (Fig. 3), per-class agreement bars for one K:G configuration
(Figs. 4–5), mean ± std per configuration (Fig. 6), and Network Dissection's summaries
(interpretable units per category, units per concept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "CATEGORY_COLORS",
    "mpl_text",
    "normalize_rows",
    "confusion_matrix_figure",
    "agreement_bars_figure",
    "agreement_summary_figure",
    "units_per_category_figure",
    "concept_frequency_figure",
    "save_figure",
]

# NetDissect's bar graph colours categories in this order; later categories reuse the cycle.
CATEGORY_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def mpl_text(s: object) -> str:
    """``s`` as literal matplotlib text: ``$`` would otherwise start mathtext (and can raise)."""
    return str(s).replace("$", r"\$")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _category_color(categories: Sequence[str], cat: str) -> str:
    try:
        i = list(categories).index(cat)
    except ValueError:
        i = len(categories)
    return CATEGORY_COLORS[i % len(CATEGORY_COLORS)]


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows summing to 0 stay 0).

    Parameters
    ----------
    matrix : array-like (n, m) of counts.

    Returns
    -------
    np.ndarray (n, m) float64 whose non-empty rows sum to 1.
    """
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums != 0)


def confusion_matrix_figure(confusion: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str],
                            title: str = "Confusion matrix (normalized per true class)") -> Figure:
    """The confusion matrix, each row normalized by its true class's count (the paper's Fig. 3).

    Parameters
    ----------
    confusion : (n, n) counts, rows = true class, columns = predicted class.
    classes : n class names in matrix order.
    title : axes title.

    Returns
    -------
    Figure with one axes whose image holds the normalized matrix (values in [0, 1]) and a colorbar;
    cells carry their value as text when there are at most 15 classes.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({n}, {n}) for {n} classes")
    norm = normalize_rows(cm)
    side = float(np.clip(2.5 + 0.32 * n, 4.0, 14.0))
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class")
    labels = [mpl_text(c) for c in classes]
    fs = 9 if n <= 15 else max(4, 9 - n // 10)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), labels, fontsize=fs)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(mpl_text(title))
    if n <= 15:
        for i in range(n):
            for j in range(n):
                v = norm[i, j]
                if v > 0:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.5 else "black")
    return fig


def agreement_bars_figure(classes: Sequence[str], values: Sequence[float], config: str,
                          mean: float | None = None) -> Figure:
    """Agreement per class for one K:G configuration, as bars (the paper's Figs. 4–5).

    Parameters
    ----------
    classes : class names (x axis, in the given order).
    values : agreement of each class in [0, 1] (NaN draws no bar).
    config : configuration name such as ``5L-1G`` (goes into the title).
    mean : draw this mean as a dashed line (default: the mean of the finite values).
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) != len(classes):
        raise ValueError(f"{len(v)} values for {len(classes)} classes")
    n = len(classes)
    fig = _new_figure(float(np.clip(1.5 + 0.3 * n, 5.0, 16.0)), 4.2)
    ax = fig.add_subplot()
    x = np.arange(n)
    ax.bar(x, np.nan_to_num(v, nan=0.0), color="#4c72b0", width=0.75)
    finite = v[np.isfinite(v)]
    if mean is None and finite.size:
        mean = float(finite.mean())
    if mean is not None and np.isfinite(mean):
        ax.axhline(mean, color="#c44e52", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        # outside the axes: bars reach 1.0, so any inside corner may hide one
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xticks(x, [mpl_text(c) for c in classes], rotation=90, fontsize=8 if n <= 20 else 6)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("Agreement")
    ax.set_xlabel("Class")
    ax.set_title(f"Agreement per class ({mpl_text(config)})")
    ax.grid(axis="y", alpha=0.3)
    return fig


def agreement_summary_figure(configs: Sequence[str], means: Sequence[float], stds: Sequence[float]) -> Figure:
    """Mean ± standard deviation of the per-class agreement for each configuration (Fig. 6).

    Parameters
    ----------
    configs : configuration names (x axis).
    means, stds : per configuration; the error bars span mean ± std.
    """
    m = np.asarray(means, dtype=np.float64)
    s = np.asarray(stds, dtype=np.float64)
    if not (len(m) == len(s) == len(configs)):
        raise ValueError("configs, means and stds must have the same length")
    fig = _new_figure(max(4.0, 1.2 + 1.0 * len(configs)), 4.0)
    ax = fig.add_subplot()
    x = np.arange(len(configs))
    ax.bar(x, np.nan_to_num(m, nan=0.0), yerr=np.nan_to_num(s, nan=0.0), capsize=6, color="#55a868", width=0.6,
           error_kw={"elinewidth": 1.2})
    for xi, mi in zip(x, m):
        if np.isfinite(mi) and mi > 0.08:  # the value at the bar's foot, clear of the error bar
            ax.text(xi + 0.27, 0.02, f"{mi:.2f}", ha="right", va="bottom", fontsize=8, color="white")
    ax.set_xticks(x, [mpl_text(c) for c in configs])
    ax.set_ylim(0.0, 1.1)
    ax.set_xlabel("Configuration (K local, G global concepts)")
    ax.set_ylabel("Agreement (mean ± std over classes)")
    ax.set_title("Agreement per configuration")
    ax.grid(axis="y", alpha=0.3)
    return fig


def units_per_category_figure(counts: Mapping[str, int], total_units: int | None = None,
                              concepts: Mapping[str, int] | None = None) -> Figure:
    """Interpretable units per concept category (NetDissect's summary), optionally with distinct concepts.

    Parameters
    ----------
    counts : category → number of units labelled with a concept of that category.
    total_units : the layer's width, shown in the title.
    concepts : category → number of distinct concepts; drawn as a second, lighter bar.
    """
    cats = list(counts)
    fig = _new_figure(max(4.0, 1.5 + 0.8 * len(cats)), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(cats))
    width = 0.4 if concepts is not None else 0.7
    off = width / 2 if concepts is not None else 0.0
    colors = [_category_color(cats, c) for c in cats]
    bars = ax.bar(x - off, [counts[c] for c in cats], width=width, color=colors, label="units")
    ax.bar_label(bars, fontsize=8)
    if concepts is not None:
        cb = ax.bar(x + off, [concepts.get(c, 0) for c in cats], width=width, color=colors, alpha=0.45,
                    hatch="//", label="distinct concepts")
        ax.bar_label(cb, fontsize=8)
        ax.legend(fontsize=8)
    ax.set_xticks(x, [mpl_text(c) for c in cats])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Concept category")
    ax.set_ylabel("Interpretable units")
    det = sum(counts.values())
    title = f"Interpretable units per category ({det}" + (f" of {total_units})" if total_units else ")")
    ax.set_title(title)
    ax.margins(y=0.15)
    return fig


def concept_frequency_figure(concepts: Sequence[tuple[str, str, int]], categories: Sequence[str] | None = None,
                             limit: int = 50) -> Figure:
    """Number of units per concept, coloured by category (NetDissect's bar graph).

    Parameters
    ----------
    concepts : ``(concept, category, units)`` triples; drawn sorted by units (descending, ties by
        name).
    categories : category order for the colours and legend (default: order of first appearance).
    limit : draw at most this many concepts (the title says how many were left out).
    """
    rows = sorted(concepts, key=lambda t: (-int(t[2]), str(t[0])))
    total = len(rows)
    rows = rows[:limit]
    if categories is None:
        categories = list(dict.fromkeys(r[1] for r in rows))
    n = len(rows)
    fig = _new_figure(float(np.clip(1.5 + 0.22 * n, 5.0, 16.0)), 4.2)
    ax = fig.add_subplot()
    x = np.arange(n)
    colors = [_category_color(categories, r[1]) for r in rows]
    ax.bar(x, [int(r[2]) for r in rows], color=colors, width=0.8)
    ax.set_xticks(x, [mpl_text(r[0]) for r in rows], rotation=90, fontsize=8 if n <= 30 else 6)
    ax.set_xlim(-0.6, max(n, 1) - 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Units")
    ax.set_xlabel("Concept")
    shown = f"top {n} of {total}" if total > n else f"{total}"
    ax.set_title(f"Units per concept ({shown} concepts)")
    from matplotlib.patches import Patch

    present = [c for c in categories if any(r[1] == c for r in rows)]
    if present:
        ax.legend(handles=[Patch(color=_category_color(categories, c), label=mpl_text(c)) for c in present],
                  fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` (format from the suffix: .png, .pdf, .svg) and release its memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None} if path.suffix.lower() == ".png" else None)
    fig.clear()
    return path
