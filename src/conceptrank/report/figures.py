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
    cells carry their value as text when there are at most 20 classes. Every text is ≥ 9 pt: the
    figure grows with the number of classes instead of the text shrinking.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({n}, {n}) for {n} classes")
    norm = normalize_rows(cm)
    longest = max((len(str(c)) for c in classes), default=1)
    per_class = 0.5 if n <= 20 else 0.3  # room for a 2-digit cell value, or for a 9 pt label alone
    side = float(np.clip(1.2 + per_class * n + 0.075 * longest, 4.5, 30.0))
    fig = _new_figure(side + 1.3, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("fraction of the true class's images", fontsize=10)
    cb.ax.tick_params(labelsize=9)
    labels = [mpl_text(c) for c in classes]
    fs = 10 if n <= 20 else 9
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), labels, fontsize=fs)
    ax.set_xlabel("Predicted class", fontsize=11)
    ax.set_ylabel("True class", fontsize=11)
    ax.set_title(mpl_text(title), fontsize=12)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                v = norm[i, j]
                if v > 0:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=10 if n <= 12 else 9,
                            color="white" if v > 0.5 else "black")
    return fig


CHANCE_COLOR = "#c9ced6"
AT_CHANCE_COLOR = "#a7b0bb"


def _chance_band(ax, x: np.ndarray, chance: float | Sequence[float] | None, width: float) -> None:
    """Grey region from 0 to the chance agreement: one band, or one per bar when chance varies per bar."""
    if chance is None:
        return
    c = np.broadcast_to(np.asarray(chance, dtype=np.float64), x.shape)
    if not np.isfinite(c).any():
        return
    label = "chance (random global lists)"
    if np.ndim(chance) == 0:
        ax.axhspan(0.0, float(c[0]), color=CHANCE_COLOR, alpha=0.6, zorder=0, label=label, gid="chance-band")
        return
    bars = ax.bar(x, np.nan_to_num(c, nan=0.0), width=width, color=CHANCE_COLOR, alpha=0.7, zorder=0, label=label,
                  edgecolor="none")
    for b in bars:
        b.set_gid("chance-band")


def _at_chance_note(ax, reason: str) -> None:
    lines = ["At chance:"] + [r.strip() for r in reason.split(";") if r.strip()]
    ax.text(0.5, 0.45, mpl_text("\n".join(lines)), transform=ax.transAxes, ha="center", va="center",
            fontsize=9, gid="at-chance",
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#9a5b00", "alpha": 0.92})


def agreement_bars_figure(classes: Sequence[str], values: Sequence[float], config: str,
                          mean: float | None = None, chance: float | Sequence[float] | None = None,
                          interval: tuple[Sequence[float], Sequence[float]] | None = None,
                          at_chance: str | None = None) -> Figure:
    """Agreement per class for one K:G configuration, as bars (the paper's Figs. 4–5).

    Parameters
    ----------
    classes : class names (x axis, in the given order).
    values : agreement of each class in [0, 1] (NaN draws no bar).
    config : configuration name such as ``5L-1G`` (goes into the title).
    mean : draw this mean as a dashed line (default: the mean of the finite values).
    chance : the agreement random global lists give: one value (a band) or one per class (a grey
        bar behind each class's bar).
    interval : per-class (low, high) of a confidence interval, drawn as error bars clipped to [0, 1].
    at_chance : when the configuration is no better than chance, why (bars turn grey and say so).
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) != len(classes):
        raise ValueError(f"{len(v)} values for {len(classes)} classes")
    n = len(classes)
    fig = _new_figure(float(np.clip(2.5 + 0.32 * n, 5.5, 16.0)), 4.4)
    ax = fig.add_subplot()
    x = np.arange(n)
    _chance_band(ax, x, chance, 0.92)
    color = AT_CHANCE_COLOR if at_chance else "#4c72b0"
    yerr = None
    if interval is not None:
        lo, hi = (np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0) for a in interval)
        vv = np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0)
        yerr = np.nan_to_num(np.vstack([np.clip(vv - lo, 0, None), np.clip(hi - vv, 0, None)]), nan=0.0)
    ax.bar(x, np.nan_to_num(v, nan=0.0), color=color, width=0.62, yerr=yerr, capsize=3, hatch="//" if at_chance else None,
           edgecolor="white" if at_chance else None, error_kw={"elinewidth": 1, "ecolor": "#333"},
           label="agreement" + (" (95% interval)" if yerr is not None else ""))
    finite = v[np.isfinite(v)]
    if mean is None and finite.size:
        mean = float(finite.mean())
    if mean is not None and np.isfinite(mean):
        ax.axhline(mean, color="#c44e52", linestyle="--", linewidth=1.2, label=f"mean {mean:.3g}")
    # legend outside the axes: bars reach 1.0, so any inside corner may hide one
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    ax.set_xticks(x, [mpl_text(c) for c in classes], rotation=90, fontsize=9)
    ax.tick_params(axis="y", labelsize=9)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("Agreement")
    ax.set_xlabel("Class")
    ax.set_title(f"Agreement per class ({mpl_text(config)})" + (" — at chance" if at_chance else ""))
    ax.grid(axis="y", alpha=0.3)
    if at_chance:
        _at_chance_note(ax, at_chance)
    return fig


def agreement_summary_figure(configs: Sequence[str], means: Sequence[float], stds: Sequence[float],
                             chance: Sequence[float] | None = None,
                             at_chance: Sequence[bool] | None = None) -> Figure:
    """Mean ± standard deviation of the per-class agreement for each configuration (Fig. 6).

    Parameters
    ----------
    configs : configuration names (x axis).
    means, stds : per configuration; the error bars span mean ± std, clipped to [0, 1].
    chance : per configuration, the agreement random global lists give (a grey bar behind).
    at_chance : per configuration, whether it is no better than chance (grey, hatched, labelled).
    """
    m = np.asarray(means, dtype=np.float64)
    s = np.asarray(stds, dtype=np.float64)
    if not (len(m) == len(s) == len(configs)):
        raise ValueError("configs, means and stds must have the same length")
    flags = np.zeros(len(m), bool) if at_chance is None else np.asarray(at_chance, dtype=bool)
    fig = _new_figure(max(5.0, 2.4 + 1.0 * len(configs)), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(configs))
    _chance_band(ax, x, chance, 0.8)
    mm, ss = np.nan_to_num(m, nan=0.0), np.nan_to_num(s, nan=0.0)
    yerr = np.vstack([np.minimum(ss, mm), np.minimum(ss, np.clip(1.0 - mm, 0.0, None))])
    colors = [AT_CHANCE_COLOR if f else "#55a868" for f in flags]
    bars = ax.bar(x, mm, yerr=yerr, capsize=6, color=colors, width=0.6, error_kw={"elinewidth": 1.2},
                  label="agreement (mean ± std)")
    for b, f in zip(bars, flags):
        if f:
            b.set_hatch("//")
            b.set_edgecolor("white")
    for xi, mi, f in zip(x, m, flags):
        if np.isfinite(mi) and mi > 0.08:  # the value at the bar's foot, clear of the error bar
            ax.text(xi + 0.27, 0.02, f"{mi:.2f}", ha="right", va="bottom", fontsize=9, color="white")
        if f:
            ax.text(xi, min(1.0, mi) + 0.03, "at chance", ha="center", va="bottom", fontsize=9, color="#9a5b00",
                    gid="at-chance")
    ax.set_xticks(x, [mpl_text(c) for c in configs], fontsize=9)
    ax.tick_params(axis="y", labelsize=9)
    ax.set_ylim(0.0, 1.12)
    ax.set_xlabel("Configuration (K local, G global concepts)")
    ax.set_ylabel("Agreement (mean ± std over classes)")
    ax.set_title("Agreement per configuration")
    ax.grid(axis="y", alpha=0.3)
    if chance is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
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
    ax.bar_label(bars, fontsize=9)
    if concepts is not None:
        cb = ax.bar(x + off, [concepts.get(c, 0) for c in cats], width=width, color=colors, alpha=0.45,
                    hatch="//", label="distinct concepts")
        ax.bar_label(cb, fontsize=9)
        ax.legend(fontsize=9)
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
    fig = _new_figure(float(np.clip(1.5 + 0.22 * n, 5.0, 16.0)), 4.4)
    ax = fig.add_subplot()
    x = np.arange(n)
    colors = [_category_color(categories, r[1]) for r in rows]
    ax.bar(x, [int(r[2]) for r in rows], color=colors, width=0.8)
    ax.set_xticks(x, [mpl_text(r[0]) for r in rows], rotation=90, fontsize=9)
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
                  fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` (format from the suffix: .png, .pdf, .svg) and release its memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None} if path.suffix.lower() == ".png" else None)
    fig.clear()
    return path
