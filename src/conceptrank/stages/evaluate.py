"""Agreement between local and global concept rankings (the paper's Formula 2), and numbers to trust it by.

For a class c, a number K of local and G of global concepts::

    P_c = |{images i of class c : top-K local concepts of i ∩ top-G global (+) concepts of c ≠ ∅}|
          / |images of class c|

Concepts are compared by name. An image without local concepts counts as no overlap; a class
without global concepts scores 0; a class with no images in the evaluated split is omitted (and
listed under ``omitted_classes``).

The summary statistics over classes are mean, population standard deviation (numpy's default
``ddof=0``), min and max. ``summary.json`` keeps the agreement scores under ``"agreement"``.

Beyond the paper (each under its own key of ``summary.json``, overall numbers only; the per-class
numbers go to ``evaluation.json`` next to it):

``baselines``
    lift over chance and one-sided p-values against (a) global lists permuted across classes and
    (b) frequency-matched random global lists (:mod:`conceptrank.core.baselines`).
``bootstrap``
    95 % percentile intervals of the mean agreement, images resampled within classes.
``ranking_agreement``
    Jaccard@G, nDCG@G and RBO (p = 0.9) between each class's aggregated local ranking and its
    global ranking (:mod:`conceptrank.core.rankmetrics`).
``ground_truth``
    with ``truth`` (a synthetic world's truth.json): global precision/recall@G, R-precision and
    local precision@K against the planted / visible concepts, restricted to the planted concept
    categories and unrestricted, beside random-concept baselines (:mod:`conceptrank.core.groundtruth`).
``deletion``
    score and recall drop when a class's top-G global units are set to their training mean, as a
    ratio to random labelled units (:mod:`conceptrank.core.faithfulness`).
``stability``
    Jaccard of the top-G global concepts across CV-fold refits and across seeds; the unit-label
    stability of ``dissect.json`` when it is there.

The last three need the ranking's inputs (``rank.json`` ``inputs``: activations and tally, or the
run folder layout ``../extract/activations.npz``, ``../dissect/tally.csv``) and ``svm.npz``; what
cannot be found is skipped with a note. Random streams are seeded by ``(seed, stream)`` so that every
number is reproducible and independent of which others are computed.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from conceptrank.errors import ConceptrankError
from conceptrank.io.cache import atomic_write_json, atomic_write_text, file_sha256, read_json
from conceptrank.io.rankings import Ranking, check_ranking_inputs, ranking_input_paths, read_ranking

__all__ = [
    "DEFAULT_CONFIGS",
    "EvaluateConfig",
    "EvaluateResult",
    "Ranking",
    "agreement",
    "config_name",
    "parse_configs",
    "read_ranking",
    "summarize",
    "chance_scores",
    "ranking_agreement_scores",
    "truth_scores",
    "run_evaluate",
    "evaluate",
]

DEFAULT_CONFIGS = "5:1,5:5,5:10,10:10"
SPLIT_CHOICES = ("test", "train", "all")
# independent random streams per component: np.random.default_rng([seed, stream])
_S_PERM, _S_FREQ, _S_BOOT, _S_GT_GLOBAL, _S_GT_LOCAL, _S_DELETION = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class EvaluateConfig:
    """Parameters of the ``evaluate`` stage.

    Attributes
    ----------
    configs : K:G pairs, as text ("5:1,5:5") or a sequence of (K, G).
    split : 'test', 'train' or 'all'; None → 'test' for standard rankings, 'all' for the paper
        protocol (as the paper evaluated).
    truth : a synthetic world's truth.json → ground-truth scores.
    seed : seeds every random baseline, bootstrap and deletion draw (and the fold split of the
        fold-stability refits is the ranking's own seed).
    n_perm : permutations of the permutation baseline.
    n_draw : random global lists per class of the frequency-matched baseline (and of the
        ground-truth random baseline).
    n_boot : bootstrap replicates.
    n_random : random unit sets per class in the deletion test.
    stability_seeds : seeds of the seed-stability refits (empty: skipped).
    faithfulness : compute the deletion test and stability (needs activations, tally, svm.npz).
    n_jobs : parallel SVM refits (joblib).
    """

    configs: str | Sequence[tuple[int, int]] = DEFAULT_CONFIGS
    split: str | None = None
    truth: Path | None = None
    seed: int = 0
    n_perm: int = 1000
    n_draw: int = 1000
    n_boot: int = 1000
    n_random: int = 20
    stability_seeds: tuple[int, ...] = (0, 1, 2)
    faithfulness: bool = True
    n_jobs: int = 1

    def validate(self) -> None:
        for name in ("n_perm", "n_draw", "n_boot", "n_random"):
            if int(getattr(self, name)) < 1:
                raise ConceptrankError(f"{name} must be ≥ 1 (got {getattr(self, name)})")


def _f(x: Any, fmt: str = ".3f") -> str:
    """Format a number; '–' for None / nan."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt)


def _grid(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`run_evaluate` produced.

    Attributes
    ----------
    out : output folder.
    split : the evaluated split.
    configs : the (K, G) pairs, in order.
    per_class : class → config name (e.g. '5L-1G') → P_c.
    summary : the content of summary.json.
    details : the content of evaluation.json (per-class numbers of every extra score).
    """

    out: Path
    split: str
    configs: tuple[tuple[int, int], ...]
    per_class: dict
    summary: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [config_name(k, g) for k, g in self.configs]

    def table(self) -> str:
        """The agreement per config with its chance baselines, then the extra scores, compactly."""
        s = self.summary
        head = (
            f"agreement (Formula 2), split {self.split}, protocol {s.get('protocol', '?')}: "
            f"{s.get('n_classes', 0)} classes, {s.get('n_images', 0)} images"
        )
        base = s.get("baselines") or {}
        boot = s.get("bootstrap") or {}
        rows = [("config", "mean ± std", "95% CI", "min", "max", "perm", "lift", "p", "freq", "lift", "p")]
        for name in self.names:
            a = s["agreement"][name]
            b = base.get(name) or {}
            ci = boot.get(name) or {}
            rows.append((
                name, f"{a['mean']:.3f} ± {a['std']:.3f}",
                f"[{_f(ci.get('low'))}, {_f(ci.get('high'))}]" if ci else "–",
                f"{a['min']:.3f}", f"{a['max']:.3f}",
                _f(b.get("permutation_mean")), _f(b.get("permutation_lift"), ".2f"), _f(b.get("permutation_p"), ".2g"),
                _f(b.get("frequency_mean")), _f(b.get("frequency_lift"), ".2f"), _f(b.get("frequency_p"), ".2g"),
            ))
        lines = [head] + _grid(rows, "  ")
        if base:
            lines.append(
                f"  chance: perm = global lists permuted across classes ({base.get('n_permutations')}×), "
                f"freq = random lists ∝ {base.get('frequency_source')} ({base.get('n_draws')}×); "
                "lift = mean / chance; p one-sided"
            )
        if s.get("omitted_classes"):
            lines.append(f"  omitted (no images in split {self.split}): {', '.join(s['omitted_classes'])}")

        ra = s.get("ranking_agreement") or {}
        dl = s.get("deletion") or {}
        st = s.get("stability") or {}
        if ra or dl or st:
            rows = [("config", "Jaccard@G", "nDCG@G", "RBO", "deletion ratio", "score drop top/rand",
                     "recall drop top/rand", "stab folds", "stab seeds")]
            for k, g in self.configs:
                name = config_name(k, g)
                r = ra.get(name) or {}
                d = dl.get(f"G={g}") or {}
                rows.append((
                    name, _f(r.get("jaccard")), _f(r.get("ndcg")), _f(r.get("rbo")),
                    _f(d.get("ratio"), ".2f"),
                    f"{_f(d.get('score_drop_top'))}/{_f(d.get('score_drop_random'))}" if d else "–",
                    f"{_f(d.get('recall_drop_top'))}/{_f(d.get('recall_drop_random'))}" if d else "–",
                    _f((st.get("folds") or {}).get(f"G={g}")), _f((st.get("seeds") or {}).get(f"G={g}")),
                ))
            lines.append("beyond agreement (local vs global ranking at depth G; faithfulness; stability as mean Jaccard):")
            lines += _grid(rows, "  ")
            notes = []
            if dl.get("skipped"):
                notes.append(f"deletion skipped: {dl['skipped']}")
            elif dl:
                notes.append(f"deletion: top-G units → train mean vs {dl.get('n_random')} random labelled-unit sets")
            if st.get("skipped"):
                notes.append(f"stability skipped: {st['skipped']}")
            elif st.get("seeds_C"):
                notes.append("seeds " + ", ".join(f"{sd} (C {c:g})" for sd, c in st["seeds_C"].items()))
            lab = st.get("labels") if st else None
            if isinstance(lab, dict) and lab.get("same_label_detectors") is not None:
                notes.append(
                    f"unit labels at quantile {lab.get('quantile')} vs {lab.get('other_quantile')}: "
                    f"{_f(lab.get('same_label_detectors'))} of detectors keep their label"
                )
            if notes:
                lines.append("  " + "; ".join(notes))

        gt = s.get("ground_truth")
        if gt:
            cats = ", ".join(gt.get("planted_categories") or [])
            lines.append(f"ground truth ({gt.get('path')}; 'restr' = categories {cats}; rand = random concepts):")
            rows = [("config", "global P@G restr/all/rand/max", "R@G restr", "local P@K restr/all/rand/max")]
            for k, g in self.configs:
                gg = (gt.get("global") or {}).get(f"G={g}") or {}
                lk = (gt.get("local") or {}).get(f"K={k}") or {}
                rows.append((
                    config_name(k, g),
                    f"{_f(gg.get('precision_restricted'))}/{_f(gg.get('precision'))}/"
                    f"{_f(gg.get('random_precision_restricted'))}/{_f(gg.get('oracle_precision_restricted'))}",
                    _f(gg.get("recall_restricted")),
                    f"{_f(lk.get('precision_restricted'))}/{_f(lk.get('precision'))}/"
                    f"{_f(lk.get('random_precision_restricted'))}/{_f(lk.get('oracle_precision_restricted'))}",
                ))
            lines += _grid(rows, "  ")
            rp = (gt.get("global") or {}).get("R") or {}
            if rp:
                lines.append(
                    f"  R-precision (G = planted concepts per class): restr {_f(rp.get('precision_restricted'))}, "
                    f"all {_f(rp.get('precision'))}, rand {_f(rp.get('random_precision_restricted'))}, "
                    f"max {_f(rp.get('oracle_precision_restricted'))} (max = best reachable with the labelled concepts)"
                )
            for w in gt.get("warnings") or []:
                lines.append(f"  note: {w}")
        for w in s.get("evaluation_notes") or []:
            lines.append(f"note: {w}")
        lines.append(f"→ {self.out}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# pure computation
# --------------------------------------------------------------------------------------------


def config_name(k: int, g: int) -> str:
    """'5L-1G' for K=5 local and G=1 global concepts."""
    return f"{k}L-{g}G"


def parse_configs(configs: str | Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Parse "5:1,5:5" (or a sequence of pairs) into ((5, 1), (5, 5)); errors name the bad item."""
    if isinstance(configs, str):
        items = [s.strip() for s in configs.split(",")]
        pairs = []
        for item in items:
            parts = item.split(":")
            try:
                if len(parts) != 2:
                    raise ValueError
                k, g = int(parts[0]), int(parts[1])
            except ValueError:
                raise ConceptrankError(
                    f"bad --configs item {item!r}: expected K:G with positive integers (e.g. 5:1)"
                ) from None
            pairs.append((k, g, item))
    else:
        pairs = []
        for item in configs:
            try:
                k, g = item
                if int(k) != k or int(g) != g:
                    raise ValueError
                pairs.append((int(k), int(g), repr(item)))
            except (TypeError, ValueError):
                raise ConceptrankError(f"bad config {item!r}: expected a (K, G) pair of positive integers") from None
    if not pairs:
        raise ConceptrankError("no K:G configurations given")
    out: list[tuple[int, int]] = []
    for k, g, item in pairs:
        if k < 1 or g < 1:
            raise ConceptrankError(f"bad --configs item {item!r}: K and G must be ≥ 1")
        if (k, g) in out:
            raise ConceptrankError(f"--configs lists {k}:{g} twice")
        out.append((k, g))
    return tuple(out)


def agreement(
    local: Mapping[str, Sequence[str]],
    image_class: Mapping[str, str],
    global_: Mapping[str, Sequence[str]],
    k: int,
    g: int,
) -> dict[str, float]:
    """Formula 2: per class, the share of its images whose top-K local concepts meet its top-G global ones.

    Parameters
    ----------
    local : image → its local concepts in rank order (an image missing here has none).
    image_class : image → class, for every image evaluated (defines the class sizes).
    global_ : class → its global (supporting) concepts in rank order (missing: none).
    k, g : numbers of local / global concepts compared.

    Returns
    -------
    dict class → P_c in [0, 1], for every class with at least one image; classes in the order of
    ``global_`` first, then the remaining ones sorted.
    """
    if k < 1 or g < 1:
        raise ValueError(f"k and g must be ≥ 1 (got {k}, {g})")
    hits: dict[str, int] = {}
    total: dict[str, int] = {}
    gsets = {c: set(list(v)[:g]) for c, v in global_.items()}
    for img, c in image_class.items():
        total[c] = total.get(c, 0) + 1
        concepts = set(list(local.get(img, ()))[:k])
        if concepts & gsets.get(c, set()):
            hits[c] = hits.get(c, 0) + 1
    order = [c for c in global_ if c in total] + sorted(c for c in total if c not in global_)
    return {c: hits.get(c, 0) / total[c] for c in order}


def summarize(values: Sequence[float]) -> dict:
    """mean, std (population, ddof=0), min, max of per-class scores."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for nan / inf."""
    x = float(x)
    return x if math.isfinite(x) else None


def _nanmean(v) -> float | None:
    v = np.asarray(list(v), dtype=np.float64)
    v = v[np.isfinite(v)]
    return _num(v.mean()) if v.size else None


def chance_scores(
    enc,
    configs: Sequence[tuple[int, int]],
    weights: np.ndarray,
    n_perm: int = 1000,
    n_draw: int = 1000,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict, dict, dict]:
    """Permutation and frequency-matched baselines and bootstrap intervals for every configuration.

    Parameters
    ----------
    enc : :class:`conceptrank.core.baselines.EncodedRankings` of the evaluated images.
    configs : (K, G) pairs.
    weights : (V,) concept weights of the frequency-matched baseline.

    Returns
    -------
    (baselines, bootstrap, per_class): the first two map config name → overall numbers; the
    third maps config name → class → per-class numbers.
    """
    from conceptrank.core.baselines import (
        bootstrap_agreement,
        class_overlap_means,
        frequency_test,
        overlap_matrix,
        permutation_test,
    )

    base: dict = {}
    boot: dict = {}
    per: dict = {}
    C = enc.n_classes
    for k, g in configs:
        name = config_name(k, g)
        O = overlap_matrix(enc, k, g)
        M = class_overlap_means(O, enc.y, C)
        perm = permutation_test(M, n_perm, np.random.default_rng([seed, _S_PERM, k, g]))
        freq = frequency_test(enc, k, g, weights, n_draw, np.random.default_rng([seed, _S_FREQ, k, g]))
        bs = bootstrap_agreement(O[np.arange(O.shape[0]), enc.y], enc.y, C, n_boot,
                                 rng=np.random.default_rng([seed, _S_BOOT, k, g]))
        base[name] = {
            "observed": _num(perm.observed_overall),
            "permutation_mean": _num(perm.null_overall_mean),
            "permutation_lift": _num(perm.lift_overall),
            "permutation_p": _num(perm.p_overall),
            "frequency_mean": _num(freq.null_overall_mean),
            "frequency_lift": _num(freq.lift_overall),
            "frequency_p": _num(freq.p_overall),
        }
        boot[name] = {"mean": _num(bs.estimate_overall), "low": _num(bs.low_overall), "high": _num(bs.high_overall)}
        per[name] = {
            c: {
                "agreement": _num(perm.observed[i]),
                "permutation_mean": _num(perm.null_mean[i]), "permutation_lift": _num(perm.lift[i]),
                "permutation_p": _num(perm.p[i]),
                "frequency_mean": _num(freq.null_mean[i]), "frequency_lift": _num(freq.lift[i]),
                "frequency_p": _num(freq.p[i]),
                "ci_low": _num(bs.low[i]), "ci_high": _num(bs.high[i]),
            }
            for i, c in enumerate(enc.classes)
        }
    return base, boot, per


def ranking_agreement_scores(
    local: Mapping[str, Sequence[str]],
    image_class: Mapping[str, str],
    global_: Mapping[str, Sequence[str]],
    classes: Sequence[str],
    configs: Sequence[tuple[int, int]],
    p: float = 0.9,
) -> tuple[dict, dict]:
    """Jaccard@G, nDCG@G and RBO between each class's aggregated local ranking and its global one.

    The aggregated local ranking of a class is :func:`conceptrank.core.rankmetrics.aggregate_local` of its
    images' top-K lists; both rankings are compared at depth G.

    Returns
    -------
    (overall, per_class): config name → {"jaccard", "ndcg", "rbo"} means over classes (nan-skipping),
    and config name → class → the same per class (plus the two rankings' heads).
    """
    from conceptrank.core.rankmetrics import aggregate_local, jaccard_at, ndcg_at, rbo

    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for img, c in image_class.items():
        by_class.setdefault(c, []).append(img)
    overall: dict = {}
    per: dict = {}
    for k, g in configs:
        name = config_name(k, g)
        rows = {}
        for c in classes:
            agg = aggregate_local((local.get(i, ()) for i in by_class[c]), k)
            glob = list(global_.get(c, ()))[:g]
            rows[c] = {
                "jaccard": _num(jaccard_at(agg, glob, g)), "ndcg": _num(ndcg_at(agg, glob, g)),
                "rbo": _num(rbo(agg, glob, p, g)), "local": agg[:g], "global": glob,
            }
        per[name] = rows
        overall[name] = {m: _nanmean(np.nan if r[m] is None else r[m] for r in rows.values())
                         for m in ("jaccard", "ndcg", "rbo")}
    return overall, per


def truth_scores(
    truth,
    local: Mapping[str, Sequence[str]],
    global_: Mapping[str, Sequence[str]],
    classes: Sequence[str],
    configs: Sequence[tuple[int, int]],
    vocabulary: Sequence[str],
    weights: np.ndarray,
    categories: Mapping[str, str] | None = None,
    n_draw: int = 1000,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Ground-truth precision / recall of the rankings with random-concept baselines.

    Parameters
    ----------
    truth : :class:`conceptrank.core.groundtruth.Truth`.
    local : image → local concepts (the evaluated images only).
    global_ : class → global concepts.
    classes : evaluated classes.
    vocabulary, weights : (V,) the drawable (labelled) concepts and their weights.
    categories : concept → category for concepts the truth does not know (e.g. from the rankings).

    Returns
    -------
    (summary, per_class): ``summary["global"]["G=g"]`` and ``summary["global"]["R"]`` (R-precision)
    hold precision / recall restricted and unrestricted, the random baselines and the oracle bound;
    ``summary["local"]["K=k"]`` the local precision (mean over images); per_class the per-class
    global numbers and, under ``"concepts K=k"``, per concept how often it is listed in an image's
    top-k and how often it is then visible (a diagnosis of the detectors).
    """
    from conceptrank.core.groundtruth import (
        global_truth_scores,
        image_key,
        local_truth_precision,
        oracle_precision,
        random_global_scores,
        random_local_precision,
    )

    cats = dict(categories or {})
    cats.update(truth.categories)
    allowed = truth.planted_categories
    weights = np.asarray(weights, dtype=np.float64)
    mask = np.array([cats.get(x) in allowed for x in vocabulary], dtype=bool)
    w_restr = np.where(mask, weights, 0.0)
    v_restr = {x for x, w in zip(vocabulary, w_restr) if w > 0}
    glob = {c: list(global_.get(c, ())) for c in classes if c in truth.classes}
    warnings = []
    missing = [c for c in classes if c not in truth.classes]
    if missing:
        warnings.append(f"classes without planted concepts in the truth (skipped): {', '.join(missing)}")
    known = [i for i in local if image_key(i) in truth.images]
    if len(known) < len(local):
        warnings.append(f"{len(local) - len(known)} of {len(local)} evaluated images are not in the truth")
    loc = {i: local[i] for i in known}

    def global_block(g: int | None) -> tuple[dict, dict]:
        rng = np.random.default_rng([seed, _S_GT_GLOBAL, 0 if g is None else g])
        a = global_truth_scores(glob, truth.classes, g)
        r = global_truth_scores(glob, truth.classes, g, cats, allowed)
        ra = random_global_scores(vocabulary, weights, truth.classes, {c: v["n"] for c, v in a.items()}, n_draw, rng)
        rr = random_global_scores(vocabulary, w_restr, truth.classes, {c: v["n"] for c, v in r.items()}, n_draw, rng)
        per = {c: {"precision": _num(a[c]["precision"]), "recall": _num(a[c]["recall"]),
                   "precision_restricted": _num(r[c]["precision"]), "recall_restricted": _num(r[c]["recall"]),
                   "random_precision": _num(ra.get(c, {}).get("precision", np.nan)),
                   "random_precision_restricted": _num(rr.get(c, {}).get("precision", np.nan)),
                   "oracle_precision_restricted": _num(oracle_precision(set(truth.classes[c]), v_restr, r[c]["n"])),
                   "global": glob[c][:5]}
               for c in a}
        summ = {m: _nanmean(np.nan if v[m] is None else v[m] for v in per.values())
                for m in ("precision", "recall", "precision_restricted", "recall_restricted",
                          "random_precision", "random_precision_restricted", "oracle_precision_restricted")}
        return summ, per

    out: dict = {"global": {}, "local": {}}
    per_class: dict = {}
    for g in sorted({g for _, g in configs}):
        out["global"][f"G={g}"], per_class[f"G={g}"] = global_block(g)
    out["global"]["R"], per_class["R"] = global_block(None)
    for k in sorted({k for k, _ in configs}):
        rng = np.random.default_rng([seed, _S_GT_LOCAL, k])
        a = local_truth_precision(loc, truth.images, k)
        r = local_truth_precision(loc, truth.images, k, cats, allowed)
        sizes_a = {i: min(k, len(dict.fromkeys(v))) for i, v in loc.items()}
        sizes_r = {i: min(k, len(dict.fromkeys(x for x in v if cats.get(x) in allowed))) for i, v in loc.items()}
        ra = random_local_precision(vocabulary, weights, truth.images, sizes_a, min(n_draw, 200), rng)
        rr = random_local_precision(vocabulary, w_restr, truth.images, sizes_r, min(n_draw, 200), rng)
        orr = [oracle_precision(truth.images[image_key(i)], v_restr, s) for i, s in sizes_r.items()]
        # diagnosis per concept: how often it is in a top-k list, and how often it is then visible
        seen: dict[str, list[int]] = {}
        for i, v in loc.items():
            vis = truth.images[image_key(i)]
            for x in list(dict.fromkeys(v))[:k]:
                seen.setdefault(x, [0, 0])
                seen[x][0] += 1
                seen[x][1] += x in vis
        prevalence = {x: sum(x in truth.images[image_key(i)] for i in loc) / max(len(loc), 1) for x in seen}
        per_class[f"concepts K={k}"] = {
            x: {"in_top_k": n, "visible_when_listed": h / n, "visible_in_images": prevalence[x],
                "category": cats.get(x, "")}
            for x, (n, h) in sorted(seen.items(), key=lambda kv: -kv[1][0])
        }
        out["local"][f"K={k}"] = {
            "precision": _nanmean(a.values()), "precision_restricted": _nanmean(r.values()),
            "random_precision": _nanmean(ra.values()), "random_precision_restricted": _nanmean(rr.values()),
            "oracle_precision_restricted": _nanmean(orr),
            "n_images": len(a),
        }
    out["planted_categories"] = sorted(allowed)
    out["warnings"] = warnings
    return out, per_class


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """What the extra scores need beyond the CSVs (each None when it cannot be found)."""

    unit_concepts: list | None  # length U, (concept, category, iou) or None
    tally: Path | None
    act: Any  # conceptrank.stages.rank.Activations
    svm: Any  # conceptrank.core.faithfulness.SVMParams
    classifier: dict | None
    dissect_meta: dict | None
    notes: tuple[str, ...]


def _read_unit_concepts(rk: Ranking, tally: Path, notes: list[str]) -> list | None:
    from conceptrank.io.tally_csv import TallyError, read_tally

    try:
        return read_tally(tally).concepts(rk.min_iou, rk.label_categories)
    except (TallyError, OSError, ValueError) as e:
        notes.append(f"cannot read the tally {tally}: {e}")
        return None


def _read_optional_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _load_inputs(rk: Ranking) -> _Inputs:
    """Find the ranking's tally, activations, svm.npz, classifier.json and dissect.json.

    Raises :class:`~conceptrank.errors.StaleInputError` when the activations or the tally found are
    not the bytes ``rank.json`` recorded (a stage was re-run after ``rank``).
    """
    from conceptrank.io.activations import load_activations
    from conceptrank.io.svm import load_svm

    notes: list[str] = []
    act_path, tally = ranking_input_paths(rk.path, rk.meta)
    check_ranking_inputs(rk.path, rk.meta, act_path, tally)
    unit_concepts = _read_unit_concepts(rk, tally, notes) if tally is not None else None
    act = None
    if act_path is not None:
        try:
            act = load_activations(act_path)
        except ConceptrankError as e:
            notes.append(str(e))
    svm = None
    if (rk.path / "svm.npz").exists():
        try:
            svm = load_svm(rk.path / "svm.npz")
        except (ConceptrankError, OSError, ValueError) as e:
            notes.append(f"cannot read {rk.path / 'svm.npz'}: {e}")
    classifier = _read_optional_json(rk.path / "classifier.json")
    run = rk.path.parent
    dissect_json = tally.parent / "dissect.json" if tally is not None else run / "dissect" / "dissect.json"
    dissect_meta = _read_optional_json(dissect_json)
    if unit_concepts is not None and act is not None and len(unit_concepts) != act.mean.shape[1]:
        notes.append(f"the tally {tally} has {len(unit_concepts)} units but the activations are {act.mean.shape[1]} wide")
        act = None
    if svm is not None and act is not None and svm.coef.shape[1] != act.mean.shape[1]:
        notes.append("svm.npz and the activations differ in width")
        svm = None
    return _Inputs(unit_concepts, tally, act, svm, classifier, dissect_meta, tuple(notes))


def _concept_weights(rk: Ranking, inputs: _Inputs, g_max: int) -> tuple[list[str], np.ndarray, str]:
    """Vocabulary and weights of the frequency-matched baseline (see :mod:`conceptrank.core.baselines`)."""
    if inputs.unit_concepts is not None:
        counts: dict[str, int] = {}
        for uc in inputs.unit_concepts:
            if uc is not None and uc[0]:
                counts[uc[0]] = counts.get(uc[0], 0) + 1
        if counts:
            vocab = list(counts)
            return vocab, np.array([counts[x] for x in vocab], dtype=np.float64), "labelled units per concept"
    counts = {}
    for lst in rk.global_pos.values():
        for x in lst[:g_max]:
            counts[x] = counts.get(x, 0) + 1
    vocab = list(counts)
    return vocab, np.array([counts[x] for x in vocab], dtype=np.float64), "occurrences in the global lists (tally not found)"


def _faithfulness(
    rk: Ranking, inputs: _Inputs, image_class: Mapping[str, str], class_order: Sequence[str],
    configs: Sequence[tuple[int, int]], cfg: EvaluateConfig,
) -> tuple[dict, dict, dict, dict]:
    """Deletion test and stability; returns (deletion summary, deletion per class, stability summary, stability per class)."""
    from conceptrank.core.faithfulness import (
        deletion_test,
        fold_stability,
        seed_stability,
    )
    from conceptrank.core.ranking import DEFAULT_C_GRID, protocol_fixed_C, unit_concept_table

    gs = sorted({g for _, g in configs})
    deletion: dict = {}
    del_per: dict = {}
    stability: dict = {}
    stab_per: dict = {}
    why = None
    if inputs.unit_concepts is None:
        why = "the tally was not found"
    elif inputs.act is None:
        why = "the activations were not found"
    elif inputs.svm is None:
        why = "svm.npz was not found"
    if why is not None:
        return {"skipped": why}, {}, {"skipped": why}, {}

    act, svm = inputs.act, inputs.svm
    row = {img: i for i, img in enumerate(act.images.tolist())}
    missing = [i for i in image_class if i not in row]
    if missing:
        why = f"{len(missing)} evaluated images are not in the activations (first: {missing[0]})"
        return {"skipped": why}, {}, {"skipped": why}, {}
    ids, _ = unit_concept_table(inputs.unit_concepts)
    labelled = np.flatnonzero(ids >= 0)
    cidx = {c: i for i, c in enumerate(svm.classes)}

    # ---- deletion ----
    if not rk.global_units:
        deletion = {"skipped": "global_concepts.csv has no unit column"}
    else:
        ev = [i for i in image_class if image_class[i] in cidx]
        Z = svm.centered(act.mean[[row[i] for i in ev]])
        y = np.array([cidx[image_class[i]] for i in ev])
        deletion = {"n_random": cfg.n_random,
                    "note": "per class, the units of its top-G global concepts (one per concept, as listed) are set "
                            "to their training mean (svm.npz train_mean, under both protocols); drops are means over the class's "
                            "evaluated images; ratio = mean top drop / mean random drop over classes"}
        for g in gs:
            top = [[u for u in rk.global_units.get(c, [])[:g] if u >= 0] for c in svm.classes]
            res = deletion_test(Z, y, svm.coef, svm.centered_intercept, top, labelled, cfg.n_random,
                                np.random.default_rng([cfg.seed, _S_DELETION, g]))
            deletion[f"G={g}"] = {
                "ratio": _num(res.ratio_overall),
                "score_drop_top": _nanmean(res.drop_top), "score_drop_random": _nanmean(res.drop_random_mean),
                "recall_drop_top": _nanmean(res.recall_drop_top),
                "recall_drop_random": _nanmean(res.recall_drop_random),
                "recall_before": _nanmean(res.recall_before),
            }
            del_per[f"G={g}"] = {
                c: {"ratio": _num(res.ratio[i]), "score_drop_top": _num(res.drop_top[i]),
                    "score_drop_random": _num(res.drop_random_mean[i]),
                    "recall_before": _num(res.recall_before[i]), "recall_after_top": _num(res.recall_top[i]),
                    "recall_after_random": _num(np.mean(res.recall_random[i])), "units": [int(u) + 1 for u in top[i]]}
                for c, i in cidx.items() if c in class_order
            }

    # ---- stability ----
    rcfg = rk.meta.get("config") or {}
    protocol = rk.protocol
    clf = inputs.classifier or {}
    best_C = clf.get("best_C")
    rank_seed = int(rcfg.get("seed", 0))
    folds = int(rcfg.get("folds", 5))
    max_iter = int(rcfg.get("max_iter", 20000))
    c_grid = tuple(rcfg.get("c_grid") or DEFAULT_C_GRID)
    pool = rk.meta.get("global_pool")
    fixed_C = protocol_fixed_C(protocol, bool(rcfg.get("grid")))
    fit_imgs = [i for i, (c, sp) in rk.images.items() if (protocol == "paper" or sp == "train") and i in row]
    if best_C is None:
        stability = {"skipped": "classifier.json has no best_C"}
    elif len(fit_imgs) < 2:
        stability = {"skipped": "no training images"}
    else:
        X = act.mean[[row[i] for i in fit_imgs]].astype(np.float64)
        y = np.array([rk.images[i][0] for i in fit_imgs])
        classes = list(svm.classes)
        try:
            by_fold = fold_stability(X, y, classes, float(best_C), gs, inputs.unit_concepts, folds, rank_seed,
                                     max_iter, protocol == "standard", pool, 1)
            stability["folds"] = {f"G={g}": _nanmean(v) for g, v in by_fold.items()}
            for g, v in by_fold.items():
                stab_per.setdefault(f"G={g}", {}).update({c: {"folds": _num(v[i])} for i, c in enumerate(classes)})
        except (ValueError, ConceptrankError) as e:
            stability["folds_skipped"] = str(e)
        if len(cfg.stability_seeds) >= 2:
            known = {rank_seed: (svm.coef, float(best_C))} if rank_seed in cfg.stability_seeds else {}
            try:
                by_seed, chosen = seed_stability(X, y, gs, inputs.unit_concepts, protocol, cfg.stability_seeds, c_grid,
                                                 folds, fixed_C, max_iter, pool, known, cfg.n_jobs)
                stability["seeds"] = {f"G={g}": _nanmean(v) for g, v in by_seed.items()}
                stability["seeds_C"] = {str(k): v for k, v in chosen.items()}
                for g, v in by_seed.items():
                    for i, c in enumerate(classes):
                        stab_per.setdefault(f"G={g}", {}).setdefault(c, {})["seeds"] = _num(v[i])
            except (ValueError, ConceptrankError) as e:
                stability["seeds_skipped"] = str(e)
        stability["note"] = (f"mean pairwise Jaccard of each class's top-G global concepts: refits on the training part "
                             f"of {folds} stratified folds (C {float(best_C):g}), and full refits with seeds "
                             f"{', '.join(map(str, cfg.stability_seeds))}")
    return deletion, del_per, stability, stab_per


def run_evaluate(ranking: Path, out: Path | None, cfg: EvaluateConfig) -> EvaluateResult:
    """Score the agreement of a ranking for every K:G configuration, with baselines and extra scores.

    Parameters
    ----------
    ranking : an output folder of ``rank``.
    out : output folder (default: ``ranking``).
    cfg : :class:`EvaluateConfig`.

    Writes ``precision.csv`` (class, then one column per configuration, rows in class order),
    ``summary.json`` (overall numbers) and ``evaluation.json`` (per-class numbers and timings).
    """
    cfg.validate()
    configs = parse_configs(cfg.configs)
    rk = read_ranking(ranking)
    top_local = rk.meta.get("top_local")
    top_global = rk.meta.get("top_global")
    for k, g in configs:
        if top_local is not None and k > int(top_local):
            raise ConceptrankError(
                f"config {k}:{g} asks for K={k} local concepts but the ranking kept only "
                f"--top-local {top_local}; re-run `conceptrank rank` with --top-local {k}"
            )
        if top_global is not None and g > int(top_global):
            raise ConceptrankError(
                f"config {k}:{g} asks for G={g} global concepts but the ranking kept only "
                f"--top-global {top_global}; re-run `conceptrank rank` with --top-global {g}"
            )
    split = cfg.split if cfg.split is not None else ("all" if rk.protocol == "paper" else "test")
    if split not in SPLIT_CHOICES:
        raise ConceptrankError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_CHOICES)}")
    truth = None
    if cfg.truth is not None:
        from conceptrank.io.truth import read_truth

        truth = read_truth(cfg.truth)

    image_class = {img: c for img, (c, s) in rk.images.items() if split == "all" or s == split}
    if not image_class:
        present = sorted({s for _, s in rk.images.values()})
        raise ConceptrankError(f"no images in split {split!r} of {rk.path} (splits present: {', '.join(present)})")
    present_classes = set(image_class.values())
    class_order = [c for c in rk.classes if c in present_classes] + sorted(present_classes - set(rk.classes))
    omitted = [c for c in rk.classes if c not in present_classes]

    per_config: dict[str, dict[str, float]] = {}
    for k, g in configs:
        p = agreement(rk.local, image_class, rk.global_pos, k, g)
        per_config[config_name(k, g)] = {c: p[c] for c in class_order}
    names = list(per_config)
    per_class = {c: {n: per_config[n][c] for n in names} for c in class_order}

    n_per_class = {c: 0 for c in class_order}
    for c in image_class.values():
        n_per_class[c] += 1
    summary: dict = {
        "ranking": str(rk.path),
        "inputs": {"rank.json_sha256": file_sha256(rk.path / "rank.json")},
        "protocol": rk.protocol,
        "split": split,
        "n_images": len(image_class),
        "n_classes": len(class_order),
        "images_per_class": n_per_class,
        "omitted_classes": omitted,
        "configs": names,
        "std_ddof": 0,
        "agreement": {
            config_name(k, g): {"k": k, "g": g, **summarize(per_config[config_name(k, g)].values())}
            for k, g in configs
        },
        "truth": None if cfg.truth is None else str(cfg.truth),
    }
    details: dict = {"classes": class_order, "timings": {}}
    timings = details["timings"]

    # ---- chance baselines and bootstrap ----
    from conceptrank.core.baselines import encode_rankings

    t0 = time.perf_counter()
    inputs = _load_inputs(rk)
    g_max = max(g for _, g in configs)
    vocab, weights, source = _concept_weights(rk, inputs, int(top_global or g_max))
    enc = encode_rankings(rk.local, image_class, rk.global_pos, class_order, vocab)
    w_full = np.zeros(enc.n_concepts)
    w_full[: len(weights)] = weights
    base, boot, chance_per = chance_scores(enc, configs, w_full, cfg.n_perm, cfg.n_draw, cfg.n_boot, cfg.seed)
    summary["baselines"] = {
        "note": "lift = observed mean agreement / chance mean; p = (1 + #null ≥ observed) / (1 + n), one-sided, "
                "over the mean of classes; permutation: global lists reassigned across classes at random; "
                f"frequency: random global lists of the same length drawn ∝ {source}",
        "n_permutations": cfg.n_perm, "n_draws": cfg.n_draw, "frequency_source": source, **base,
    }
    summary["bootstrap"] = {"note": "95% percentile interval of the mean agreement; images resampled within classes",
                            "n": cfg.n_boot, "level": 0.95, **boot}
    details["chance"] = chance_per
    timings["baselines"] = round(time.perf_counter() - t0, 3)

    # ---- ranking agreement ----
    t0 = time.perf_counter()
    ra, ra_per = ranking_agreement_scores(rk.local, image_class, rk.global_pos, class_order, configs)
    summary["ranking_agreement"] = {
        "note": "per class, aggregated local ranking (concepts by share of the class's images having them in their "
                "top-K, then mean position) vs the global ranking, at depth G: Jaccard, nDCG (graded relevance "
                "G - rank + 1), extrapolated RBO (p = 0.9); means over classes",
        **ra,
    }
    details["ranking_agreement"] = ra_per
    timings["ranking_agreement"] = round(time.perf_counter() - t0, 3)

    # ---- ground truth ----
    if truth is not None:
        t0 = time.perf_counter()
        gt, gt_per = truth_scores(truth, {i: rk.local.get(i, []) for i in image_class}, rk.global_pos, class_order,
                                  configs, vocab, weights, rk.categories, cfg.n_draw, cfg.seed)
        summary["ground_truth"] = {
            "path": str(cfg.truth),
            "note": "global precision/recall@G of the global concepts vs the planted class concepts; local "
                    "precision@K of the image's concepts vs those visible in it; 'restricted' keeps only concepts "
                    "of the planted categories; 'R' = precision at depth |planted|; random_* = random concepts "
                    "drawn ∝ labelled units",
            **gt,
        }
        details["ground_truth"] = gt_per
        timings["ground_truth"] = round(time.perf_counter() - t0, 3)
    else:
        summary["ground_truth"] = None

    # ---- faithfulness ----
    if cfg.faithfulness:
        t0 = time.perf_counter()
        deletion, del_per, stability, stab_per = _faithfulness(rk, inputs, image_class, class_order, configs, cfg)
        summary["deletion"] = deletion
        summary["stability"] = stability
        details["deletion"] = del_per
        details["stability"] = stab_per
        timings["faithfulness"] = round(time.perf_counter() - t0, 3)
    else:
        summary["stability"] = {}
    if inputs.dissect_meta and inputs.dissect_meta.get("label_stability") is not None:
        summary.setdefault("stability", {})["labels"] = inputs.dissect_meta["label_stability"]
    if inputs.notes:
        summary["evaluation_notes"] = list(inputs.notes)
    summary["details"] = "evaluation.json"

    out = Path(out) if out is not None else rk.path
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class"] + names)
    for c in class_order:
        w.writerow([c] + [repr(float(per_class[c][n])) for n in names])
    atomic_write_text(out / "precision.csv", buf.getvalue())
    atomic_write_json(out / "evaluation.json", details)
    atomic_write_json(out / "summary.json", summary)
    return EvaluateResult(out=out, split=split, configs=configs, per_class=per_class, summary=summary, details=details)


# ``conceptrank.stages.evaluate`` (lazy export in __init__) resolves to this function.
evaluate = run_evaluate
