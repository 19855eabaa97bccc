"""The ``evaluate`` stage: how well a ranking's local and global concepts agree, and how far to trust it.

The agreement per class and K:G configuration is the paper's Formula 2
(:func:`conceptrank.core.evaluation.agreement`); a class with no images in the evaluated split is
omitted (and listed under ``omitted_classes``). ``summary.json`` keeps the agreement under
``"agreement"`` and, beyond the paper, one key per extra score (overall numbers; the per-class
numbers go to ``evaluation.json``):

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
    score and recall drop when a class's top-G global units are set to their training mean
    (``svm.npz`` ``train_mean``, under both protocols), as a ratio to random labelled units
    (:mod:`conceptrank.core.faithfulness`).
``stability``
    Jaccard of the top-G global concepts across CV-fold refits and across seeds; the unit-label
    stability of ``dissect.json`` when it is there.

:func:`evaluate_ranking` computes all of it from in-memory objects (a :class:`Ranking`, the
:class:`EvaluationInputs` the last three need, a truth) into an :class:`EvaluateResult`.
:func:`run_evaluate` is the file layer: it reads the rank folder — refusing activations, a tally or
rank outputs whose SHA-256 differ from what ``rank.json`` recorded (:mod:`conceptrank.io.rankings`)
—, reuses its earlier outputs when ``evaluate.json`` was written for the same ranking bytes,
truth and configuration, and otherwise writes ``precision.csv``, ``evaluation.json``,
``summary.json`` (which records the SHA-256 of the ``rank.json`` it scored) and ``evaluate.json``.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from conceptrank.core.evaluation import (
    S_DELETION,
    agreement,
    chance_scores,
    config_name,
    json_number,
    nanmean,
    parse_configs,
    ranking_agreement_scores,
    summarize,
    truth_scores,
)
from conceptrank.errors import ConceptrankError
from conceptrank.io import cache
from conceptrank.io.cache import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    read_json,
)
from conceptrank.io.rankings import (
    RANK_OUTPUTS,
    Ranking,
    check_ranking_inputs,
    ranking_input_paths,
    read_ranking,
)

__all__ = [
    "DEFAULT_CONFIGS",
    "SPLIT_CHOICES",
    "EvaluateConfig",
    "EvaluationInputs",
    "AgreementSummary",
    "EvaluateResult",
    "load_evaluation_inputs",
    "evaluate_ranking",
    "run_evaluate",
]

Split = Literal["test", "train", "all"]
DEFAULT_CONFIGS = "5:1,5:5,5:10,10:10"
SPLIT_CHOICES: tuple[Split, ...] = ("test", "train", "all")
EVALUATE_FILES = ("precision.csv", "summary.json", "evaluation.json")  # evaluate.json, the manifest, vouches for them
_RANK_FILES = ("rank.json",) + RANK_OUTPUTS


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
    split: Split | None = None
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
        if self.split is not None and self.split not in SPLIT_CHOICES:
            raise ConceptrankError(f"unknown split {self.split!r}: expected one of {', '.join(SPLIT_CHOICES)}")


@dataclass(frozen=True)
class EvaluationInputs:
    """What the deletion test, stability and the frequency baseline need beyond the rankings.

    Attributes
    ----------
    unit_concepts : length U, per unit (concept, category, iou) or None; None when no tally.
    act : :class:`conceptrank.io.activations.Activations` the ranking was computed from, or None.
    svm : :class:`conceptrank.core.faithfulness.SVMParams` of the ranking, or None.
    classifier : classifier.json, or None.
    dissect_meta : dissect.json (its ``label_stability``), or None.
    notes : what could not be read, in words.
    """

    unit_concepts: list | None = None
    act: Any = None
    svm: Any = None
    classifier: dict | None = None
    dissect_meta: dict | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgreementSummary:
    """Formula 2 over the classes for one K:G configuration: mean, population std, min, max."""

    k: int
    g: int
    mean: float
    std: float
    min: float
    max: float


def _f(x: Any, fmt: str = ".3f") -> str:
    """Format a number; '–' for None / nan."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return format(x, fmt)


def _grid(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`evaluate_ranking` computed (and :func:`run_evaluate` wrote, or reused).

    Attributes
    ----------
    ranking : the rank folder evaluated; ``ranking_sha256`` the SHA-256 of its rank.json.
    protocol : the ranking's protocol; ``split`` the evaluated split.
    configs : the (K, G) pairs, in order.
    classes : the evaluated classes in order; ``omitted_classes`` those without images in the split.
    images_per_class : class → evaluated images.
    per_class : class → config name (e.g. '5L-1G') → P_c.
    agreement : config name → :class:`AgreementSummary`.
    baselines, bootstrap, ranking_agreement : config name → overall numbers (with a ``note``).
    ground_truth : ground-truth scores (None without a truth).
    deletion, stability : faithfulness scores (``{"skipped": why}`` when they could not be
        computed; deletion None when not asked for).
    notes : what could not be read or computed, in words.
    details : per-class numbers of every extra score and timings (evaluation.json).
    truth : the truth file's path, when given.
    out : the output folder (:func:`run_evaluate` only); ``reused`` True when outputs of an earlier
        run for the same inputs were reused.
    """

    ranking: Path
    protocol: str
    split: str
    configs: tuple[tuple[int, int], ...]
    classes: tuple[str, ...]
    images_per_class: dict
    omitted_classes: tuple[str, ...]
    per_class: dict
    agreement: dict
    baselines: dict = field(default_factory=dict)
    bootstrap: dict = field(default_factory=dict)
    ranking_agreement: dict = field(default_factory=dict)
    ground_truth: dict | None = None
    deletion: dict | None = None
    stability: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)
    truth: str | None = None
    ranking_sha256: str | None = None
    out: Path | None = None
    reused: bool = False
    rules: dict | None = None  # the class rules' numbers (RUN/rules/rules.json, stages/rules.rules_summary)

    @property
    def names(self) -> list[str]:
        return [config_name(k, g) for k, g in self.configs]

    @property
    def summary(self) -> dict:
        """The content of summary.json."""
        s: dict = {
            "ranking": str(self.ranking),
            "inputs": {"rank.json_sha256": self.ranking_sha256},
            "protocol": self.protocol,
            "split": self.split,
            "n_images": int(sum(self.images_per_class.values())),
            "n_classes": len(self.classes),
            "images_per_class": dict(self.images_per_class),
            "omitted_classes": list(self.omitted_classes),
            "configs": self.names,
            "std_ddof": 0,
            "agreement": {n: asdict(a) for n, a in self.agreement.items()},
            "truth": self.truth,
            "baselines": self.baselines,
            "bootstrap": self.bootstrap,
            "ranking_agreement": self.ranking_agreement,
            "ground_truth": self.ground_truth,
        }
        if self.deletion is not None:
            s["deletion"] = self.deletion
        s["stability"] = self.stability
        if self.notes:
            s["evaluation_notes"] = list(self.notes)
        if self.rules is not None:
            s["rules"] = self.rules
        s["details"] = "evaluation.json"
        return s

    @classmethod
    def from_files(cls, out: Path, configs: Sequence[tuple[int, int]]) -> "EvaluateResult":
        """Read back what :func:`run_evaluate` wrote into ``out``."""
        s = read_json(out / "summary.json")
        with open(out / "precision.csv", newline="", encoding="utf-8") as f:
            per_class = {r["class"]: {k: float(v) for k, v in r.items() if k != "class"} for r in csv.DictReader(f)}
        return cls(
            ranking=Path(s["ranking"]), protocol=str(s["protocol"]), split=str(s["split"]), configs=tuple(configs),
            classes=tuple(per_class), images_per_class=dict(s["images_per_class"]),
            omitted_classes=tuple(s["omitted_classes"]), per_class=per_class,
            agreement={n: AgreementSummary(**a) for n, a in s["agreement"].items()},
            baselines=s.get("baselines") or {}, bootstrap=s.get("bootstrap") or {},
            ranking_agreement=s.get("ranking_agreement") or {}, ground_truth=s.get("ground_truth"),
            deletion=s.get("deletion"), stability=s.get("stability") or {},
            notes=tuple(s.get("evaluation_notes") or ()), details=read_json(out / "evaluation.json"),
            truth=s.get("truth"), ranking_sha256=(s.get("inputs") or {}).get("rank.json_sha256"),
            out=out, reused=True, rules=s.get("rules"),
        )

    def table(self) -> str:
        """The agreement per config with its chance baselines, then the extra scores, compactly."""
        s = self.summary
        lines = _agreement_lines(self, s) + _beyond_lines(self, s) + _truth_lines(self, s)
        lines += [f"note: {w}" for w in s.get("evaluation_notes") or []]
        lines.append(f"→ {self.out if self.out is not None else self.ranking}" + (" (reused cached result)" if self.reused else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the printed table
# --------------------------------------------------------------------------------------------


def _agreement_lines(r: EvaluateResult, s: dict) -> list[str]:
    head = (f"agreement (Formula 2), split {r.split}, protocol {s.get('protocol', '?')}: "
            f"{s.get('n_classes', 0)} classes, {s.get('n_images', 0)} images")
    base = s.get("baselines") or {}
    boot = s.get("bootstrap") or {}
    rows = [("config", "mean ± std", "95% CI", "min", "max", "perm", "lift", "p", "freq", "lift", "p")]
    for name in r.names:
        a, b, ci = s["agreement"][name], base.get(name) or {}, boot.get(name) or {}
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
        lines.append(f"  omitted (no images in split {r.split}): {', '.join(s['omitted_classes'])}")
    return lines


def _beyond_notes(dl: dict, st: dict) -> list[str]:
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
    return notes


def _beyond_lines(r: EvaluateResult, s: dict) -> list[str]:
    ra, dl, st = s.get("ranking_agreement") or {}, s.get("deletion") or {}, s.get("stability") or {}
    if not (ra or dl or st):
        return []
    rows = [("config", "Jaccard@G", "nDCG@G", "RBO", "deletion ratio", "score drop top/rand",
             "recall drop top/rand", "stab folds", "stab seeds")]
    for k, g in r.configs:
        a, d = ra.get(config_name(k, g)) or {}, dl.get(f"G={g}") or {}
        rows.append((
            config_name(k, g), _f(a.get("jaccard")), _f(a.get("ndcg")), _f(a.get("rbo")),
            _f(d.get("ratio"), ".2f"),
            f"{_f(d.get('score_drop_top'))}/{_f(d.get('score_drop_random'))}" if d else "–",
            f"{_f(d.get('recall_drop_top'))}/{_f(d.get('recall_drop_random'))}" if d else "–",
            _f((st.get("folds") or {}).get(f"G={g}")), _f((st.get("seeds") or {}).get(f"G={g}")),
        ))
    lines = ["beyond agreement (local vs global ranking at depth G; faithfulness; stability as mean Jaccard):"]
    lines += _grid(rows, "  ")
    notes = _beyond_notes(dl, st)
    return lines + (["  " + "; ".join(notes)] if notes else [])


def _truth_lines(r: EvaluateResult, s: dict) -> list[str]:
    gt = s.get("ground_truth")
    if not gt:
        return []
    cats = ", ".join(gt.get("planted_categories") or [])
    lines = [f"ground truth ({gt.get('path')}; 'restr' = categories {cats}; rand = random concepts):"]
    rows = [("config", "global P@G restr/all/rand/max", "R@G restr", "local P@K restr/all/rand/max")]
    for k, g in r.configs:
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
    return lines + [f"  note: {w}" for w in gt.get("warnings") or []]


def _concept_weights(rk: Ranking, inputs: EvaluationInputs, g_max: int) -> tuple[list[str], np.ndarray, str]:
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


def _faithfulness_skip(inputs: EvaluationInputs, rk: Ranking, image_class: Mapping[str, str]) -> str | None:
    """Why the deletion test and stability cannot be computed, or None."""
    if inputs.unit_concepts is None:
        return "the tally was not found"
    if inputs.act is None:
        return "the activations were not found"
    if inputs.svm is None:
        return "svm.npz was not found"
    rows = set(inputs.act.images.tolist())
    missing = [i for i in image_class if i not in rows]
    if missing:
        return f"{len(missing)} evaluated images are not in the activations (first: {missing[0]})"
    return None


def _deletion_scores(rk: Ranking, inputs: EvaluationInputs, image_class: Mapping[str, str],
                     class_order: Sequence[str], gs: Sequence[int], cfg: EvaluateConfig) -> tuple[dict, dict]:
    """Deletion test at every G: (summary, per class)."""
    from conceptrank.core.faithfulness import deletion_test
    from conceptrank.core.ranking import unit_concept_table

    if not rk.global_units:
        return {"skipped": "global_concepts.csv has no unit column"}, {}
    act, svm = inputs.act, inputs.svm
    row = {img: i for i, img in enumerate(act.images.tolist())}
    ids, _ = unit_concept_table(inputs.unit_concepts)
    labelled = np.flatnonzero(ids >= 0)
    cidx = {c: i for i, c in enumerate(svm.classes)}
    ev = [i for i in image_class if image_class[i] in cidx]
    Z = svm.centered(act.mean[[row[i] for i in ev]])
    y = np.array([cidx[image_class[i]] for i in ev])
    summary: dict = {"n_random": cfg.n_random,
                     "note": "per class, the units of its top-G global concepts (one per concept, as listed) are set "
                             "to their training mean (svm.npz train_mean, under both protocols); drops are means over "
                             "the class's evaluated images; ratio = mean top drop / mean random drop over classes"}
    per: dict = {}
    for g in gs:
        top = [[u for u in rk.global_units.get(c, [])[:g] if u >= 0] for c in svm.classes]
        res = deletion_test(Z, y, svm.coef, svm.centered_intercept, top, labelled, cfg.n_random,
                            np.random.default_rng([cfg.seed, S_DELETION, g]))
        summary[f"G={g}"] = {
            "ratio": json_number(res.ratio_overall),
            "score_drop_top": nanmean(res.drop_top), "score_drop_random": nanmean(res.drop_random_mean),
            "recall_drop_top": nanmean(res.recall_drop_top), "recall_drop_random": nanmean(res.recall_drop_random),
            "recall_before": nanmean(res.recall_before),
        }
        per[f"G={g}"] = {
            c: {"ratio": json_number(res.ratio[i]), "score_drop_top": json_number(res.drop_top[i]),
                "score_drop_random": json_number(res.drop_random_mean[i]),
                "recall_before": json_number(res.recall_before[i]), "recall_after_top": json_number(res.recall_top[i]),
                "recall_after_random": json_number(np.mean(res.recall_random[i])),
                "units": [int(u) + 1 for u in top[i]]}
            for c, i in cidx.items() if c in class_order
        }
    return summary, per


@dataclass(frozen=True)
class _Refit:
    """How the ranking's SVM was selected, read from rank.json / classifier.json, for the refits."""

    protocol: str
    best_C: float | None
    seed: int
    folds: int
    max_iter: int
    c_grid: tuple[float, ...]
    pool: int | None
    fixed_C: float | None

    @classmethod
    def of(cls, rk: Ranking, classifier: dict | None) -> "_Refit":
        from conceptrank.core.ranking import DEFAULT_C_GRID, protocol_fixed_C

        rcfg = rk.meta.get("config") or {}
        best_C = (classifier or {}).get("best_C")
        return cls(rk.protocol, None if best_C is None else float(best_C), int(rcfg.get("seed", 0)),
                   int(rcfg.get("folds", 5)), int(rcfg.get("max_iter", 20000)),
                   tuple(rcfg.get("c_grid") or DEFAULT_C_GRID), rk.meta.get("global_pool"),
                   protocol_fixed_C(rk.protocol, bool(rcfg.get("grid"))))


@dataclass(frozen=True)
class _RankerRefit:
    """Stability of a probe- or decision-based ranker: the ranker itself refit with each SVM refit."""

    name: str
    bank: object
    X_max: np.ndarray | None
    probe: object

    @classmethod
    def of(cls, rk: Ranking, inputs: EvaluationInputs, rows: list[int]) -> "_RankerRefit | None":
        """None for the paper's ranker (its lists are the SVM's weights: the refits below say it all)."""
        from conceptrank.core.rankers import UnitBank
        from conceptrank.stages.rank import ranker_side_inputs

        name = rk.meta.get("ranker") or "paper"
        _, tally = ranking_input_paths(rk.path, rk.meta)
        if name == "paper" or tally is None or inputs.unit_concepts is None:
            return None
        thresholds, probe = ranker_side_inputs(tally, inputs.dissect_meta)
        X_max = None if inputs.act.max is None else np.asarray(inputs.act.max, np.float64)[rows]
        return cls(name, UnitBank(inputs.unit_concepts, thresholds), X_max, probe)

    def sets(self, X, y, rows, svm, gs: Sequence[int]) -> dict[int, list[frozenset]]:
        from conceptrank.core.rankers import make_ranker

        r = make_ranker(self.name).fit(X[rows], y[rows], self.bank, svm=svm, probe=self.probe,
                                       X_max=None if self.X_max is None else self.X_max[rows])
        return {g: r.global_sets(g) for g in gs}

    def stability(self, X, y, rf: "_Refit", gs, cfg: EvaluateConfig, classes, stability: dict) -> tuple[dict, dict]:
        from sklearn.model_selection import StratifiedKFold

        from conceptrank.core.faithfulness import mean_pairwise_jaccard
        from conceptrank.core.ranking import GlobalRanker

        from conceptrank.core.rankers import make_ranker

        per: dict = {}
        uses_svm = make_ranker(self.name).uses_svm

        def svm(rows, seed, C):  # C given: that C, no search (its folds unused: 2, the fewest allowed)
            if not uses_svm:
                return None
            if C is not None:
                return GlobalRanker("standard", C, folds=2, seed=seed, max_iter=rf.max_iter).fit(X[rows], y[rows])
            return GlobalRanker(rf.protocol, rf.fixed_C, rf.c_grid, rf.folds, seed, rf.max_iter).fit(X[rows], y[rows])

        folds = StratifiedKFold(rf.folds, shuffle=True, random_state=rf.seed).split(X, y)
        by_fold = [self.sets(X, y, tr, svm(tr, rf.seed, rf.best_C), gs) for tr, _ in folds]
        every = np.arange(len(y))
        by_seed = []
        if not uses_svm:
            stability["seeds_skipped"] = f"{self.name}'s global lists do not use the SVM: every seed gives the same"
        elif len(cfg.stability_seeds) >= 2:
            by_seed = [self.sets(X, y, every, svm(every, s, None), gs) for s in cfg.stability_seeds]
        for key, runs in (("folds", by_fold), ("seeds", by_seed)):
            if not runs:
                continue
            stability[key] = {}
            for g in gs:
                v = mean_pairwise_jaccard([r[g] for r in runs])
                stability[key][f"G={g}"] = nanmean(v)
                for i, c in enumerate(classes):
                    per.setdefault(f"G={g}", {}).setdefault(c, {})[key] = json_number(v[i])
        stability["note"] = (f"mean pairwise Jaccard of each class's top-G global concepts by the run's ranker "
                             f"({self.name}), refit on the training part of {rf.folds} stratified folds"
                             + (f" with the SVM (C {rf.best_C:g}), and with full refits at seeds "
                                f"{', '.join(map(str, cfg.stability_seeds))}" if uses_svm else ""))
        return stability, per


def _stability_scores(rk: Ranking, inputs: EvaluationInputs, gs: Sequence[int], cfg: EvaluateConfig) -> tuple[dict, dict]:
    """Jaccard stability of the top-G global concepts across fold refits and seeds: (summary, per class)."""
    from conceptrank.core.faithfulness import fold_stability, seed_stability

    act, svm, rf = inputs.act, inputs.svm, _Refit.of(rk, inputs.classifier)
    row = {img: i for i, img in enumerate(act.images.tolist())}
    fit_imgs = [i for i, (c, sp) in rk.images.items() if (rf.protocol == "paper" or sp == "train") and i in row]
    if rf.best_C is None:
        return {"skipped": "classifier.json has no best_C"}, {}
    if len(fit_imgs) < 2:
        return {"skipped": "no training images"}, {}
    X = act.mean[[row[i] for i in fit_imgs]].astype(np.float64)
    y = np.array([rk.images[i][0] for i in fit_imgs])
    classes = list(svm.classes)
    stability: dict = {}
    per: dict = {}
    refit = _RankerRefit.of(rk, inputs, [row[i] for i in fit_imgs])
    if refit is not None:
        try:
            return refit.stability(X, y, rf, gs, cfg, classes, stability)
        except (ValueError, ConceptrankError) as e:
            return {"skipped": f"refitting the {refit.name} ranker: {e}"}, {}
    try:
        by_fold = fold_stability(X, y, classes, rf.best_C, gs, inputs.unit_concepts, rf.folds, rf.seed,
                                 rf.max_iter, rf.protocol == "standard", rf.pool, 1)
        stability["folds"] = {f"G={g}": nanmean(v) for g, v in by_fold.items()}
        for g, v in by_fold.items():
            per.setdefault(f"G={g}", {}).update({c: {"folds": json_number(v[i])} for i, c in enumerate(classes)})
    except (ValueError, ConceptrankError) as e:
        stability["folds_skipped"] = str(e)
    if len(cfg.stability_seeds) >= 2:
        known = {rf.seed: (svm.coef, rf.best_C)} if rf.seed in cfg.stability_seeds else {}
        try:
            by_seed, chosen = seed_stability(X, y, gs, inputs.unit_concepts, rf.protocol, cfg.stability_seeds,
                                             rf.c_grid, rf.folds, rf.fixed_C, rf.max_iter, rf.pool, known, cfg.n_jobs)
            stability["seeds"] = {f"G={g}": nanmean(v) for g, v in by_seed.items()}
            stability["seeds_C"] = {str(k): v for k, v in chosen.items()}
            for g, v in by_seed.items():
                for i, c in enumerate(classes):
                    per.setdefault(f"G={g}", {}).setdefault(c, {})["seeds"] = json_number(v[i])
        except (ValueError, ConceptrankError) as e:
            stability["seeds_skipped"] = str(e)
    stability["note"] = (f"mean pairwise Jaccard of each class's top-G global concepts: refits on the training part "
                         f"of {rf.folds} stratified folds (C {rf.best_C:g}), and full refits with seeds "
                         f"{', '.join(map(str, cfg.stability_seeds))}")
    return stability, per


# --------------------------------------------------------------------------------------------
# the stage: in-memory objects → EvaluateResult
# --------------------------------------------------------------------------------------------


def _check_depths(rk: Ranking, configs: Sequence[tuple[int, int]]) -> None:
    """Refuse a K or G deeper than the ranking kept."""
    top_local, top_global = rk.meta.get("top_local"), rk.meta.get("top_global")
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


def _evaluated_images(rk: Ranking, split: str) -> tuple[dict, list[str], list[str]]:
    """(image → class of the evaluated images, class order, classes without images in the split)."""
    image_class = {img: c for img, (c, s) in rk.images.items() if split == "all" or s == split}
    if not image_class:
        present = sorted({s for _, s in rk.images.values()})
        raise ConceptrankError(f"no images in split {split!r} of {rk.path} (splits present: {', '.join(present)})")
    present_classes = set(image_class.values())
    class_order = [c for c in rk.classes if c in present_classes] + sorted(present_classes - set(rk.classes))
    return image_class, class_order, [c for c in rk.classes if c not in present_classes]


def _chance_block(rk: Ranking, inputs: EvaluationInputs, image_class: dict, class_order: list[str],
                  configs: Sequence[tuple[int, int]], cfg: EvaluateConfig) -> tuple[dict, dict, dict, tuple]:
    """(baselines, bootstrap, per-class chance numbers, (vocabulary, weights)) of every configuration."""
    from conceptrank.core.baselines import encode_rankings

    g_max = max(g for _, g in configs)
    vocab, weights, source = _concept_weights(rk, inputs, int(rk.meta.get("top_global") or g_max))
    enc = encode_rankings(rk.local, image_class, rk.global_pos, class_order, vocab)
    w_full = np.zeros(enc.n_concepts)
    w_full[: len(weights)] = weights
    base, boot, chance_per = chance_scores(enc, configs, w_full, cfg.n_perm, cfg.n_draw, cfg.n_boot, cfg.seed)
    baselines = {
        "note": "lift = observed mean agreement / chance mean; p = (1 + #null ≥ observed) / (1 + n), one-sided, "
                "over the mean of classes; permutation: global lists reassigned across classes at random; "
                f"frequency: random global lists of the same length drawn ∝ {source}",
        "n_permutations": cfg.n_perm, "n_draws": cfg.n_draw, "frequency_source": source, **base,
    }
    bootstrap = {"note": "95% percentile interval of the mean agreement; images resampled within classes",
                 "n": cfg.n_boot, "level": 0.95, **boot}
    return baselines, bootstrap, chance_per, (vocab, weights)


def _truth_block(rk: Ranking, truth, image_class: dict, class_order: list[str], configs, vocab_weights,
                 cfg: EvaluateConfig) -> tuple[dict, dict]:
    gt, gt_per = truth_scores(truth, {i: rk.local.get(i, []) for i in image_class}, rk.global_pos, class_order,
                              configs, *vocab_weights, rk.categories, cfg.n_draw, cfg.seed)
    return {
        "path": None if cfg.truth is None else str(cfg.truth),
        "note": "global precision/recall@G of the global concepts vs the planted class concepts; local "
                "precision@K of the image's concepts vs those visible in it; 'restricted' keeps only concepts "
                "of the planted categories; 'R' = precision at depth |planted|; random_* = random concepts "
                "drawn ∝ labelled units",
        **gt,
    }, gt_per


def _faithfulness_block(rk: Ranking, inputs: EvaluationInputs, image_class: dict, class_order: list[str],
                        configs, cfg: EvaluateConfig) -> tuple[dict, dict, dict, dict]:
    """(deletion, deletion per class, stability, stability per class)."""
    why = _faithfulness_skip(inputs, rk, image_class)
    if why is not None:
        return {"skipped": why}, {}, {"skipped": why}, {}
    gs = sorted({g for _, g in configs})
    deletion, del_per = _deletion_scores(rk, inputs, image_class, class_order, gs, cfg)
    stability, stab_per = _stability_scores(rk, inputs, gs, cfg)
    return deletion, del_per, stability, stab_per


def _timed(timings: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    timings[name] = round(time.perf_counter() - t0, 3)
    return out


def evaluate_ranking(rk: Ranking, cfg: EvaluateConfig, inputs: EvaluationInputs | None = None,
                     truth=None) -> EvaluateResult:
    """Agreement of a ranking for every K:G configuration, with baselines and extra scores.

    Parameters
    ----------
    rk : the rankings (:func:`conceptrank.io.rankings.read_ranking`).
    cfg : :class:`EvaluateConfig` (its ``truth`` path is only recorded; pass the parsed ``truth``).
    inputs : activations, unit labels and SVM for the deletion test, stability and the frequency
        baseline (:func:`load_evaluation_inputs`); None: those scores are skipped.
    truth : :class:`conceptrank.core.groundtruth.Truth` → ground-truth scores.
    """
    cfg.validate()
    configs = parse_configs(cfg.configs)
    _check_depths(rk, configs)
    inputs = inputs if inputs is not None else EvaluationInputs()
    split = cfg.split if cfg.split is not None else ("all" if rk.protocol == "paper" else "test")
    image_class, class_order, omitted = _evaluated_images(rk, split)
    per_config = {config_name(k, g): agreement(rk.local, image_class, rk.global_pos, k, g) for k, g in configs}
    per_class = {c: {n: per_config[n][c] for n in per_config} for c in class_order}
    n_per_class = {c: 0 for c in class_order}
    for c in image_class.values():
        n_per_class[c] += 1
    timings: dict = {}
    details: dict = {"classes": class_order, "timings": timings}
    base, boot, details["chance"], vw = _timed(timings, "baselines", _chance_block, rk, inputs, image_class,
                                               class_order, configs, cfg)
    ra, details["ranking_agreement"] = _timed(timings, "ranking_agreement", ranking_agreement_scores, rk.local,
                                              image_class, rk.global_pos, class_order, configs)
    gt = None
    if truth is not None:
        gt, details["ground_truth"] = _timed(timings, "ground_truth", _truth_block, rk, truth, image_class,
                                             class_order, configs, vw, cfg)
    deletion, stability = None, {}
    if cfg.faithfulness:
        deletion, details["deletion"], stability, details["stability"] = _timed(
            timings, "faithfulness", _faithfulness_block, rk, inputs, image_class, class_order, configs, cfg)
    if inputs.dissect_meta and inputs.dissect_meta.get("label_stability") is not None:
        stability = {**stability, "labels": inputs.dissect_meta["label_stability"]}
    return EvaluateResult(
        ranking=rk.path, protocol=rk.protocol, split=split, configs=configs, classes=tuple(class_order),
        images_per_class=n_per_class, omitted_classes=tuple(omitted), per_class=per_class,
        agreement={n: AgreementSummary(k, g, **summarize(per_config[n][c] for c in class_order))
                   for (k, g), n in zip(configs, per_config)},
        baselines=base, bootstrap=boot,
        ranking_agreement={"note": "per class, aggregated local ranking (concepts by share of the class's images "
                                   "having them in their top-K, then mean position) vs the global ranking, at depth "
                                   "G: Jaccard, nDCG (graded relevance G - rank + 1), extrapolated RBO (p = 0.9); "
                                   "means over classes", **ra},
        ground_truth=gt, deletion=deletion, stability=stability, notes=inputs.notes, details=details,
        truth=None if cfg.truth is None else str(cfg.truth),
        ranking_sha256=rk.manifest_sha256,
    )


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------


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


def _read_optional(reader, path: Path, notes: list[str]):
    try:
        return reader(path)
    except (ConceptrankError, OSError, ValueError) as e:
        notes.append(str(e) if isinstance(e, ConceptrankError) else f"cannot read {path}: {e}")
        return None


def load_evaluation_inputs(rk: Ranking) -> EvaluationInputs:
    """Find and read the ranking's tally, activations, svm.npz, classifier.json and dissect.json.

    What cannot be found or read is None (with a note). Raises
    :class:`~conceptrank.errors.StaleInputError` when the activations or the tally found are not
    the bytes ``rank.json`` recorded (a stage was re-run after ``rank``).
    """
    from conceptrank.io.activations import load_activations
    from conceptrank.io.svm import load_svm

    notes: list[str] = []
    act_path, tally = ranking_input_paths(rk.path, rk.meta)
    check_ranking_inputs(rk.path, rk.meta, act_path, tally)
    unit_concepts = _read_unit_concepts(rk, tally, notes) if tally is not None else None
    act = _read_optional(load_activations, act_path, notes) if act_path is not None else None
    svm = _read_optional(load_svm, rk.path / "svm.npz", notes) if (rk.path / "svm.npz").exists() else None
    dissect_json = tally.parent / "dissect.json" if tally is not None else rk.path.parent / "dissect" / "dissect.json"
    if unit_concepts is not None and act is not None and len(unit_concepts) != act.mean.shape[1]:
        notes.append(f"the tally {tally} has {len(unit_concepts)} units but the activations are {act.mean.shape[1]} wide")
        act = None
    if svm is not None and act is not None and svm.coef.shape[1] != act.mean.shape[1]:
        notes.append("svm.npz and the activations differ in width")
        svm = None
    return EvaluationInputs(unit_concepts, act, svm, _read_optional_json(rk.path / "classifier.json"),
                            _read_optional_json(dissect_json), tuple(notes))


def _cache_key(rk: Ranking, cfg: EvaluateConfig, out: Path) -> tuple[str, dict, dict]:
    """The key under which evaluate.json records its outputs: ranking bytes, dissect.json, truth, config."""
    def digest(p: Path | None) -> str | None:
        return file_sha256(p) if p is not None and p.is_file() else None

    fingerprints = {name: digest(rk.path / name) for name in _RANK_FILES}
    _, tally = ranking_input_paths(rk.path, rk.meta)
    fingerprints["dissect.json"] = digest(tally.parent / "dissect.json") if tally is not None else None
    fingerprints["truth"] = digest(Path(cfg.truth)) if cfg.truth is not None else None
    fingerprints["rules.json"] = digest(rk.path.parent / "rules" / "rules.json")
    params = {"config": asdict(cfg), "out": str(out)}
    return cache.stage_key("evaluate", fingerprints, params), fingerprints, params


def _write_evaluate_outputs(out: Path, res: EvaluateResult, key: str, fingerprints: dict, params: dict) -> None:
    """precision.csv (class, then one column per configuration), evaluation.json, summary.json, then
    the manifest evaluate.json that vouches for them."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").unlink(missing_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class"] + res.names)
    for c in res.classes:
        w.writerow([c] + [repr(float(res.per_class[c][n])) for n in res.names])
    atomic_write_text(out / "precision.csv", buf.getvalue())
    atomic_write_json(out / "evaluation.json", res.details)
    atomic_write_json(out / "summary.json", res.summary)
    atomic_write_json(out / "evaluate.json", {
        "stage": "evaluate",
        "ranking": str(res.ranking),
        "outputs": list(EVALUATE_FILES),
        "cache": cache.manifest_section("evaluate", key, fingerprints, params, out, EVALUATE_FILES),
    })


def compute_evaluation(ranking: Path, cfg: EvaluateConfig) -> EvaluateResult:
    """:func:`evaluate_ranking` on a rank folder, without the rules' numbers and without writing: what
    :func:`run_evaluate` computes, for a caller that runs it beside the rules stage."""
    cfg.validate()
    rk = read_ranking(ranking)
    check_ranking_inputs(rk.path, rk.meta, *ranking_input_paths(rk.path, rk.meta))
    truth = None
    if cfg.truth is not None:
        from conceptrank.io.truth import read_truth

        truth = read_truth(cfg.truth)
    return evaluate_ranking(rk, cfg, load_evaluation_inputs(rk), truth)


def run_evaluate(ranking: Path, out: Path | None, cfg: EvaluateConfig,
                 computed: EvaluateResult | None = None) -> EvaluateResult:
    """Read a rank folder, :func:`evaluate_ranking`, write the outputs (see the module docstring).

    Parameters
    ----------
    ranking : an output folder of ``rank``.
    out : output folder (default: ``ranking``).
    cfg : :class:`EvaluateConfig`.
    computed : :func:`compute_evaluation` of the same folder and config, when already done.
    """
    cfg.validate()
    configs = parse_configs(cfg.configs)
    rk = read_ranking(ranking)
    out = Path(out) if out is not None else rk.path
    act_path, tally = ranking_input_paths(rk.path, rk.meta)
    check_ranking_inputs(rk.path, rk.meta, act_path, tally)
    key, fingerprints, params = _cache_key(rk, cfg, out)
    if cache.lookup(out / "evaluate.json", key) is not None:
        try:
            return EvaluateResult.from_files(out, configs)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    from conceptrank.stages.rules import rules_summary

    res = computed if computed is not None else compute_evaluation(ranking, cfg)
    res = replace(res, rules=rules_summary(rk.path.parent))
    _write_evaluate_outputs(out, res, key, fingerprints, params)
    return replace(res, out=out)
