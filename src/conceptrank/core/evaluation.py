"""Agreement between local and global concept rankings (the paper's Formula 2) and the numbers to
trust it by: chance baselines, bootstrap intervals, ranking agreement, ground-truth precision.

For a class c, a number K of local and G of global concepts::

    P_c = |{images i of class c : top-K local concepts of i ∩ top-G global (+) concepts of c ≠ ∅}|
          / |images of class c|

Concepts are compared by name. An image without local concepts counts as no overlap; a class
without global concepts scores 0. Summary statistics over classes are mean, population standard
deviation (``ddof=0``), min and max. Random streams are seeded by ``(seed, stream, ...)`` so that
every number is reproducible and independent of which others are computed.

Pure computation over in-memory rankings; the stage is :mod:`conceptrank.stages.evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from conceptrank.errors import ConceptrankError

__all__ = [
    "config_name",
    "parse_configs",
    "agreement",
    "summarize",
    "chance_scores",
    "ranking_agreement_scores",
    "truth_scores",
    "json_number",
    "nanmean",
]

# independent random streams per component: np.random.default_rng([seed, stream, ...])
S_PERM, S_FREQ, S_BOOT, S_GT_GLOBAL, S_GT_LOCAL, S_DELETION = 1, 2, 3, 4, 5, 6


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


def json_number(x: Any) -> float | None:
    """A JSON-safe float: None for nan / inf."""
    x = float(x)
    return x if math.isfinite(x) else None


def nanmean(v) -> float | None:
    v = np.asarray(list(v), dtype=np.float64)
    v = v[np.isfinite(v)]
    return json_number(v.mean()) if v.size else None


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
        perm = permutation_test(M, n_perm, np.random.default_rng([seed, S_PERM, k, g]))
        freq = frequency_test(enc, k, g, weights, n_draw, np.random.default_rng([seed, S_FREQ, k, g]))
        bs = bootstrap_agreement(O[np.arange(O.shape[0]), enc.y], enc.y, C, n_boot,
                                 rng=np.random.default_rng([seed, S_BOOT, k, g]))
        base[name] = {
            "observed": json_number(perm.observed_overall),
            "permutation_mean": json_number(perm.null_overall_mean),
            "permutation_lift": json_number(perm.lift_overall),
            "permutation_p": json_number(perm.p_overall),
            "frequency_mean": json_number(freq.null_overall_mean),
            "frequency_lift": json_number(freq.lift_overall),
            "frequency_p": json_number(freq.p_overall),
        }
        boot[name] = {"mean": json_number(bs.estimate_overall), "low": json_number(bs.low_overall), "high": json_number(bs.high_overall)}
        per[name] = {
            c: {
                "agreement": json_number(perm.observed[i]),
                "permutation_mean": json_number(perm.null_mean[i]), "permutation_lift": json_number(perm.lift[i]),
                "permutation_p": json_number(perm.p[i]),
                "frequency_mean": json_number(freq.null_mean[i]), "frequency_lift": json_number(freq.lift[i]),
                "frequency_p": json_number(freq.p[i]),
                "ci_low": json_number(bs.low[i]), "ci_high": json_number(bs.high[i]),
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
                "jaccard": json_number(jaccard_at(agg, glob, g)), "ndcg": json_number(ndcg_at(agg, glob, g)),
                "rbo": json_number(rbo(agg, glob, p, g)), "local": agg[:g], "global": glob,
            }
        per[name] = rows
        overall[name] = {m: nanmean(np.nan if r[m] is None else r[m] for r in rows.values())
                         for m in ("jaccard", "ndcg", "rbo")}
    return overall, per


@dataclass(frozen=True)
class _TruthData:
    """What the ground-truth blocks share: the truth, concept categories, drawable concepts."""

    truth: Any
    cats: dict
    allowed: frozenset
    vocabulary: Sequence[str]
    weights: np.ndarray
    w_restr: np.ndarray
    v_restr: set
    glob: dict
    loc: dict
    n_draw: int
    seed: int


def _global_truth_block(t: _TruthData, g: int | None) -> tuple[dict, dict]:
    """Global precision / recall at depth g (None: R-precision) with random and oracle bounds."""
    from conceptrank.core.groundtruth import (
        global_truth_scores,
        oracle_precision,
        random_global_scores,
    )

    truth = t.truth
    rng = np.random.default_rng([t.seed, S_GT_GLOBAL, 0 if g is None else g])
    a = global_truth_scores(t.glob, truth.classes, g)
    r = global_truth_scores(t.glob, truth.classes, g, t.cats, t.allowed)
    ra = random_global_scores(t.vocabulary, t.weights, truth.classes, {c: v["n"] for c, v in a.items()}, t.n_draw, rng)
    rr = random_global_scores(t.vocabulary, t.w_restr, truth.classes, {c: v["n"] for c, v in r.items()}, t.n_draw, rng)
    per = {c: {"precision": json_number(a[c]["precision"]), "recall": json_number(a[c]["recall"]),
               "precision_restricted": json_number(r[c]["precision"]), "recall_restricted": json_number(r[c]["recall"]),
               "random_precision": json_number(ra.get(c, {}).get("precision", np.nan)),
               "random_precision_restricted": json_number(rr.get(c, {}).get("precision", np.nan)),
               "oracle_precision_restricted": json_number(oracle_precision(set(truth.classes[c]), t.v_restr, r[c]["n"])),
               "global": t.glob[c][:5]}
           for c in a}
    summ = {m: nanmean(np.nan if v[m] is None else v[m] for v in per.values())
            for m in ("precision", "recall", "precision_restricted", "recall_restricted",
                      "random_precision", "random_precision_restricted", "oracle_precision_restricted")}
    return summ, per


def _concept_diagnosis(t: _TruthData, k: int) -> dict:
    """Per concept: how often it is in an image's top-k, and how often it is then visible."""
    from conceptrank.core.groundtruth import image_key

    images = t.truth.images
    seen: dict[str, list[int]] = {}
    for i, v in t.loc.items():
        vis = images[image_key(i)]
        for x in list(dict.fromkeys(v))[:k]:
            seen.setdefault(x, [0, 0])
            seen[x][0] += 1
            seen[x][1] += x in vis
    prevalence = {x: sum(x in images[image_key(i)] for i in t.loc) / max(len(t.loc), 1) for x in seen}
    return {
        x: {"in_top_k": n, "visible_when_listed": h / n, "visible_in_images": prevalence[x], "category": t.cats.get(x, "")}
        for x, (n, h) in sorted(seen.items(), key=lambda kv: -kv[1][0])
    }


def _local_truth_block(t: _TruthData, k: int) -> dict:
    """Local precision@k (mean over images), restricted and not, with random and oracle bounds."""
    from conceptrank.core.groundtruth import (
        image_key,
        local_truth_precision,
        oracle_precision,
        random_local_precision,
    )

    images, loc, cats, allowed = t.truth.images, t.loc, t.cats, t.allowed
    rng = np.random.default_rng([t.seed, S_GT_LOCAL, k])
    a = local_truth_precision(loc, images, k)
    r = local_truth_precision(loc, images, k, cats, allowed)
    sizes_a = {i: min(k, len(dict.fromkeys(v))) for i, v in loc.items()}
    sizes_r = {i: min(k, len(dict.fromkeys(x for x in v if cats.get(x) in allowed))) for i, v in loc.items()}
    ra = random_local_precision(t.vocabulary, t.weights, images, sizes_a, min(t.n_draw, 200), rng)
    rr = random_local_precision(t.vocabulary, t.w_restr, images, sizes_r, min(t.n_draw, 200), rng)
    orr = [oracle_precision(images[image_key(i)], t.v_restr, s) for i, s in sizes_r.items()]
    return {
        "precision": nanmean(a.values()), "precision_restricted": nanmean(r.values()),
        "random_precision": nanmean(ra.values()), "random_precision_restricted": nanmean(rr.values()),
        "oracle_precision_restricted": nanmean(orr), "n_images": len(a),
    }


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
    from conceptrank.core.groundtruth import image_key

    cats = dict(categories or {})
    cats.update(truth.categories)
    allowed = truth.planted_categories
    weights = np.asarray(weights, dtype=np.float64)
    mask = np.array([cats.get(x) in allowed for x in vocabulary], dtype=bool)
    w_restr = np.where(mask, weights, 0.0)
    warnings = []
    missing = [c for c in classes if c not in truth.classes]
    if missing:
        warnings.append(f"classes without planted concepts in the truth (skipped): {', '.join(missing)}")
    known = [i for i in local if image_key(i) in truth.images]
    if len(known) < len(local):
        warnings.append(f"{len(local) - len(known)} of {len(local)} evaluated images are not in the truth")
    t = _TruthData(truth, cats, allowed, vocabulary, weights, w_restr, {x for x, w in zip(vocabulary, w_restr) if w > 0},
                   {c: list(global_.get(c, ())) for c in classes if c in truth.classes}, {i: local[i] for i in known},
                   n_draw, seed)
    out: dict = {"global": {}, "local": {}}
    per_class: dict = {}
    for g in sorted({g for _, g in configs}):
        out["global"][f"G={g}"], per_class[f"G={g}"] = _global_truth_block(t, g)
    out["global"]["R"], per_class["R"] = _global_truth_block(t, None)
    for k in sorted({k for k, _ in configs}):
        per_class[f"concepts K={k}"] = _concept_diagnosis(t, k)
        out["local"][f"K={k}"] = _local_truth_block(t, k)
    out["planted_categories"] = sorted(allowed)
    out["warnings"] = warnings
    return out, per_class
