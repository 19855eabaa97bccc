"""summary.json's scores as tables a reader can take in: plain headings, units, 2–3 significant digits.

Pure functions over the parsed ``summary.json``. The keys the evaluate stage writes today
(``baselines``, ``bootstrap``, ``ranking_agreement``, ``ground_truth``, ``deletion``, ``stability``)
get hand-written tables; any other key falls back to :func:`conceptrank.report.data.extra_summary_keys`
with humanized names, so a new score still shows up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["sig", "p_text", "ScoreTable", "ChanceVerdict", "chance_verdict", "agreement_rows", "score_tables",
           "HANDLED_KEYS", "AT_CHANCE_P", "AT_CHANCE_LIFT"]

AT_CHANCE_P = 0.05  # a configuration whose agreement chance reaches this often is "at chance"
AT_CHANCE_LIFT = 1.05  # … as is one whose agreement is less than 5% above what chance gives
HANDLED_KEYS = frozenset({"baselines", "bootstrap", "ranking_agreement", "ground_truth", "deletion", "stability"})
_BASELINES = (("permutation", "permutation"), ("frequency", "frequency"))


def sig(x: Any, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits (``0.9475`` → ``0.948``, ``1`` → ``1.00``, ``126`` → ``126``)."""
    if isinstance(x, bool) or x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(v):
        return "–"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(float(f"{v:.{digits - 1}e}"))))  # of the rounded value: 0.000999 → 0.001
    if mag >= 6 or mag < -4:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{max(0, digits - 1 - mag)}f}"


def p_text(p: Any, n: int | None = None) -> str:
    """A permutation p-value; at its floor ``1 / (n + 1)`` it reads ``≤ 0.001`` (it is a bound, not a value)."""
    try:
        v = float(p)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(v):
        return "–"
    if n and v <= 1.0 / (n + 1) * (1 + 1e-9):
        return f"≤ {sig(1.0 / (n + 1), 1)}"
    return sig(v, 2)


@dataclass(frozen=True)
class ScoreTable:
    """A table for the report: ``rows`` are ``(label, cells)`` with cells already formatted."""

    key: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    caption: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ChanceVerdict:
    """Whether a configuration's agreement is distinguishable from chance, and why (plain words)."""

    at_chance: bool
    chance: float
    lift: float
    p: float
    reason: str


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def chance_verdict(summary: Mapping[str, Any] | None, config: str) -> ChanceVerdict | None:
    """At chance when any baseline's one-sided p > 0.05 or the smallest lift is below 1.05.

    Returns None when summary.json has no baselines for ``config``.
    """
    b = ((summary or {}).get("baselines") or {}).get(config)
    if not isinstance(b, Mapping):
        return None
    chances = [_num(b.get(f"{k}_mean")) for k, _ in _BASELINES]
    lifts = [_num(b.get(f"{k}_lift")) for k, _ in _BASELINES]
    ps = [_num(b.get(f"{k}_p")) for k, _ in _BASELINES]
    chances, lifts, ps = ([x for x in xs if math.isfinite(x)] for xs in (chances, lifts, ps))
    if not chances:
        return None
    chance, lift, p = max(chances), (min(lifts) if lifts else math.nan), (max(ps) if ps else math.nan)
    reasons = []
    if math.isfinite(p) and p > AT_CHANCE_P:
        reasons.append(f"random global lists do as well (p = {sig(p, 2)})")
    if math.isfinite(lift) and lift < AT_CHANCE_LIFT:
        reasons.append(f"chance alone gives up to {sig(chance)} (lift {sig(lift)}×)")
    return ChanceVerdict(bool(reasons), chance, lift, p, "; ".join(reasons))


def agreement_rows(summary: Mapping[str, Any] | None) -> list[dict]:
    """The main agreement table: mean ± SD, 95% interval, chance, lift and p per configuration."""
    s = summary or {}
    base, boot = s.get("baselines") or {}, s.get("bootstrap") or {}
    n_perm = base.get("n_permutations")
    rows = []
    for name, a in (s.get("agreement") or {}).items():
        b, ci = base.get(name) or {}, boot.get(name) or {}
        v = chance_verdict(s, name)
        rows.append({
            "config": name, "k": a.get("k"), "g": a.get("g"), "mean": sig(a.get("mean")), "std": sig(a.get("std"), 2),
            "min": sig(a.get("min")), "max": sig(a.get("max")),
            "ci": f"{sig(ci['low'])}–{sig(ci['high'])}" if "low" in ci and "high" in ci else "–",
            "chance": sig(b.get("permutation_mean")), "lift": sig(b.get("permutation_lift")),
            "p": p_text(b.get("permutation_p"), n_perm),
            "at_chance": bool(v and v.at_chance), "reason": v.reason if v else "",
        })
    return rows


def _depth(label: str) -> str:
    m = re.fullmatch(r"([GK])=(\d+)", label)
    if m:
        return f"top {m.group(2)}"
    return {"R": "top |planted|"}.get(label, label)


def _baselines(v: Mapping) -> ScoreTable:
    n = v.get("n_permutations")
    rows = []
    for cfg, b in v.items():
        if not isinstance(b, Mapping):
            continue
        rows.append((cfg, (sig(b.get("observed")), sig(b.get("permutation_mean")), sig(b.get("permutation_lift")),
                           p_text(b.get("permutation_p"), n), sig(b.get("frequency_mean")),
                           sig(b.get("frequency_lift")), p_text(b.get("frequency_p"), v.get("n_draws")))))
    return ScoreTable(
        "baselines", "Agreement against chance",
        ("Configuration", "Observed agreement", "Chance: shuffled classes", "Lift (×)", "p",
         "Chance: frequent concepts", "Lift (×)", "p"),
        tuple(rows),
        f"Shuffled classes: each class gets another class's global concepts ({n} permutations). Frequent "
        f"concepts: random global lists drawn in proportion to how many units detect each concept "
        f"({v.get('n_draws')} draws). Lift = observed ÷ chance; p is one-sided (chance ≥ observed).")


def _ranking_agreement(v: Mapping) -> ScoreTable:
    rows = tuple((cfg, (sig(r.get("jaccard"), 2), sig(r.get("ndcg"), 2), sig(r.get("rbo"), 2)))
                 for cfg, r in v.items() if isinstance(r, Mapping))
    return ScoreTable(
        "ranking_agreement", "Local vs global ranking order",
        ("Configuration", "Jaccard overlap (0–1)", "nDCG (0–1)", "Rank-biased overlap (0–1)"), rows,
        "Per class, the concepts ranked by how often they are among its images' top-K local concepts, compared "
        "with its top-G global concepts; means over classes (1 = same lists in the same order).")


def _truth_table(key: str, title: str, part: Mapping, recall: bool) -> ScoreTable:
    restricted_same = all(r.get("precision") == r.get("precision_restricted") for r in part.values()
                          if isinstance(r, Mapping))
    cols = ["Depth", "Precision"] + (["Recall"] if recall else []) + ["Random concepts", "Best possible"]
    if not restricted_same:
        cols.insert(2 + recall, "Precision, planted categories only")
    rows = []
    for depth, r in part.items():
        if not isinstance(r, Mapping):
            continue
        cells = [sig(r.get("precision"), 2)] + ([sig(r.get("recall"), 2)] if recall else [])
        if not restricted_same:
            cells.append(sig(r.get("precision_restricted"), 2))
        cells += [sig(r.get("random_precision"), 2), sig(r.get("oracle_precision_restricted"), 2)]
        rows.append((_depth(depth), tuple(cells)))
    return ScoreTable(key, title, tuple(cols), tuple(rows))


def _ground_truth(v: Mapping) -> list[ScoreTable]:
    out = []
    cats = ", ".join(v.get("planted_categories") or [])
    if isinstance(v.get("global"), Mapping):
        t = _truth_table("ground_truth", "Recovered planted class concepts (global ranking)", v["global"], True)
        out.append(ScoreTable(t.key, t.title, t.columns, t.rows,
                              "Share of each class's top global concepts that are planted class concepts (truth.json), "
                              "and share of planted concepts found; random: concepts drawn in proportion to labelled "
                              "units; best possible: a ranking that lists the planted concepts first"
                              + (f" (planted categories: {cats})." if cats else ".")))
    if isinstance(v.get("local"), Mapping):
        t = _truth_table("ground_truth", "Concepts visible in the image (local ranking)", v["local"], False)
        out.append(ScoreTable(t.key, t.title, t.columns, t.rows,
                              "Share of each image's top local concepts that are really drawn in it; means over images."))
    return out


def _deletion(v: Mapping) -> ScoreTable:
    rows = tuple((_depth(g), (sig(r.get("score_drop_top"), 2), sig(r.get("score_drop_random"), 2), sig(r.get("ratio"), 2),
                              sig(r.get("recall_before"), 2), sig(r.get("recall_drop_top"), 2),
                              sig(r.get("recall_drop_random"), 2)))
                 for g, r in v.items() if isinstance(r, Mapping))
    return ScoreTable(
        "deletion", "Deleting the top global concepts",
        ("Global concepts removed", "Score drop: top concepts", "Score drop: random units", "Ratio (×)",
         "Recall before", "Recall drop: top", "Recall drop: random"), rows,
        f"Each class's top-G concepts' units are set to their training mean; SVM score (decision units) and recall "
        f"drops are means over the class's images, against {v.get('n_random', 'several')} random unit sets of the "
        "same size. A ratio well above 1 means the ranking found units the classifier relies on.")


def _stability(v: Mapping) -> list[ScoreTable]:
    out = []
    depths = [g for g in (v.get("folds") or {}) if g in (v.get("seeds") or {})] or list(v.get("folds") or {})
    if depths:
        rows = []
        for name, label in (("folds", "refits on 5 training folds"), ("seeds", "refits with other seeds")):
            if isinstance(v.get(name), Mapping):
                rows.append((label, tuple(sig(v[name].get(g), 2) for g in depths)))
        out.append(ScoreTable("stability", "Stability of the global concepts",
                              ("Refit",) + tuple(_depth(g) for g in depths), tuple(rows),
                              "Mean pairwise Jaccard overlap (0–1) of each class's top-G global concepts across refits."))
    lab = v.get("labels")
    if isinstance(lab, Mapping):
        q, q2 = (f"{_num(lab.get(k)):g}" for k in ("quantile", "other_quantile"))
        rows = (("Detectors", (str(lab.get("detectors", "–")), str(lab.get("detectors_at_other_quantile", "–")))),
                ("Same label, detectors", (sig(lab.get("same_label_detectors"), 2), "")),
                ("Same label, all units", (sig(lab.get("same_label_all_units"), 2), "")))
        out.append(ScoreTable("stability", "Stability of the unit labels", ("", f"quantile {q}", f"quantile {q2}"),
                              rows, f"Network Dissection repeated with the top-{q2} activation quantile instead of "
                                    f"{q}: how many units stay detectors, and the share that keep their label."))
    return out


def _humanize(name: str) -> str:
    return re.sub(r"[._]+", " ", str(name)).strip().capitalize() or str(name)


def _generic(summary: Mapping[str, Any]) -> list[ScoreTable]:
    from conceptrank.report.data import extra_summary_keys

    def show(x):
        return x if isinstance(x, str) else sig(x)

    out = []
    for e in extra_summary_keys(summary):
        title = _humanize(e["key"])
        if e["scalars"]:
            out.append(ScoreTable(e["key"], title, ("", "Value"),
                                  tuple((_humanize(k) if k else title, (show(v),)) for k, v in e["scalars"]),
                                  notes=tuple(e["notes"])))
        for t in e["tables"]:
            out.append(ScoreTable(e["key"], f"{title}: {_humanize(t['title'])}" if t["title"] else title,
                                  ("",) + tuple(_humanize(c) for c in t["columns"]),
                                  tuple((lbl, tuple(show(x) for x in vals)) for lbl, vals in t["rows"]),
                                  notes=() if e["scalars"] else tuple(e["notes"])))
        if not e["scalars"] and not e["tables"] and e["notes"]:
            out.append(ScoreTable(e["key"], title, (), (), notes=tuple(e["notes"])))
    return out


def score_tables(summary: Mapping[str, Any] | None) -> list[ScoreTable]:
    """Every score in summary.json beyond the agreement table, as readable tables."""
    s = summary or {}
    out: list[ScoreTable] = []
    if isinstance(s.get("baselines"), Mapping):
        out.append(_baselines(s["baselines"]))
    if isinstance(s.get("ranking_agreement"), Mapping):
        out.append(_ranking_agreement(s["ranking_agreement"]))
    if isinstance(s.get("ground_truth"), Mapping):
        out += _ground_truth(s["ground_truth"])
    if isinstance(s.get("deletion"), Mapping):
        out.append(_deletion(s["deletion"]))
    if isinstance(s.get("stability"), Mapping):
        out += _stability(s["stability"])
    rest = {k: v for k, v in s.items() if k not in HANDLED_KEYS and not (k == "truth" and isinstance(v, str))}
    return out + _generic(rest)
