"""The ranker benchmark: every concept ranker on synthetic worlds whose truth is known, side by side.

For each world seed a probe and target set are generated (:func:`conceptrank.pipeline.run_ranker_benchmark`
calls :func:`conceptrank.synthetic.world.generate_world` without a model), one source model is used for every seed (the source task does not depend on the
seed: it is the same task on other random images), and the layer is dissected, the target set
extracted and the probe set's per-image activations computed once. Every ranker of
:mod:`conceptrank.core.rankers` is then fit on the training split (one standard-protocol SVM shared
by all) and scored on the test split:

``P@1``, ``R-prec``
    global precision at 1 and at depth |planted concepts| against the planted class concepts
    (:mod:`conceptrank.core.groundtruth`, restricted to the planted categories).
``P@K``
    local precision at K against the concepts visible in each test image (restricted likewise).
``agree``, ``lift``
    the paper's Formula 2 at K local / 1 global concept (:func:`conceptrank.stages.evaluate.agreement`)
    and its lift over global lists permuted across classes (:func:`conceptrank.core.baselines.permutation_test`).
``deletion``
    ratio of the SVM score drop when *all* units of a class's top-G concepts are set to their training
    mean, to the drop for as many random labelled units (:func:`conceptrank.core.faithfulness.deletion_test`):
    > 1 when the concepts matter to the decision.
``stability``
    mean pairwise Jaccard of every class's top-G concepts across refits on the training part of each
    of ``folds`` stratified folds (SVM C fixed to the chosen one).

Two reference rows per world: ``random`` (random lists drawn ∝ labelled units per concept) and
``best reachable`` (the best precision any list of labelled concepts could reach). The ``winner`` is
the ranker with the highest mean over seeds of ``(P@1 + R-prec/best + P@K/best) / 3``.

:func:`benchmark_world` is pure (in-memory world in, rows out); :func:`run_benchmark` reads and
writes (worlds, dissection, extraction, ``benchmark.csv``, ``benchmark.json``, ``benchmark.png``).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptrank.core.groundtruth import (
    Truth,
    global_truth_scores,
    image_key,
    local_truth_precision,
    oracle_precision,
    random_global_scores,
    random_local_precision,
)
from conceptrank.core.rankers import RANKERS, ProbeActivations, UnitBank, make_ranker
from conceptrank.core.ranking import DEFAULT_MIN_IOU
from conceptrank.errors import ConceptrankError

__all__ = [
    "METRICS",
    "BenchmarkConfig",
    "BenchmarkResult",
    "WorldData",
    "benchmark_figure",
    "benchmark_world",
    "format_table",
    "prepare_world",
    "run_benchmark",
    "summarize_rows",
    "targets_text",
    "winner",
]

METRICS = ("p_at_1", "r_precision", "local_p_at_k", "agreement", "agreement_lift", "deletion_ratio", "stability")
_LABELS = {"p_at_1": "P@1", "r_precision": "R-prec", "local_p_at_k": "P@{k}", "agreement": "agree {k}L-1G",
           "agreement_lift": "lift", "deletion_ratio": "deletion", "stability": "stability"}
REFERENCE_ROWS = ("random", "best reachable")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Parameters of the ranker benchmark.

    Attributes
    ----------
    seeds : world seeds (the demo uses 0; the default is chosen on others).
    rankers : ranker names (:data:`conceptrank.core.rankers.RANKERS`).
    size, probe_images, images_per_class : world parameters (None: the world's defaults).
    model : source model card folder; None — the shipped model when there is one, else one is trained
        once (seed 0) and reused for every seed (:func:`conceptrank.pipeline.run_ranker_benchmark`).
    layer : the dissected layer.
    k : local depth K of P@K and of the agreement.
    depth : global depth G of the deletion test and of the stability.
    min_iou : a unit below this IoU gets no concept (the standard protocol's 0.04).
    folds : stability refits; n_random : random unit sets per class in the deletion test.
    n_draw : Monte-Carlo draws of the random baselines; n_perm : permutations of the agreement lift.
    seed : the SVM's and the baselines' seed (not the world's).
    workers, batch_size, device : forward passes.
    """

    seeds: tuple[int, ...] = (1, 2, 3)
    rankers: tuple[str, ...] = RANKERS
    size: int | None = None
    probe_images: int | None = None
    images_per_class: int | None = None
    model: Path | None = None
    layer: str = "layer4"
    k: int = 5
    depth: int = 5
    min_iou: float = DEFAULT_MIN_IOU["standard"]
    folds: int = 5
    n_random: int = 20
    n_draw: int = 200
    n_perm: int = 1000
    seed: int = 0
    workers: int = 0
    batch_size: int = 64
    device: str = "auto"

    def validate(self) -> None:
        if not self.seeds:
            raise ConceptrankError("--seeds is empty")
        unknown = [r for r in self.rankers if r not in RANKERS]
        if unknown or not self.rankers:
            raise ConceptrankError(f"unknown ranker(s) {unknown or '(none given)'}: expected some of {', '.join(RANKERS)}")
        for name in ("k", "depth", "n_random", "n_draw", "n_perm"):
            if int(getattr(self, name)) < 1:
                raise ConceptrankError(f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(self, name)})")
        if self.folds < 2:
            raise ConceptrankError(f"--folds must be ≥ 2 (got {self.folds})")


@dataclass(frozen=True)
class WorldData:
    """One world, in memory: the target activations, the dissection, the probe activations, the truth.

    Attributes
    ----------
    name : row label (e.g. ``seed 1``).
    mean, max : (N, U) per-image mean / max activations of the target images.
    classes, splits, images : (N,) str.
    bank : the dissection's unit labels and thresholds.
    probe : the probe set's activations and concept presence.
    truth : the world's ground truth.
    """

    name: str
    mean: np.ndarray
    max: np.ndarray
    classes: np.ndarray
    splits: np.ndarray
    images: np.ndarray
    bank: UnitBank
    probe: ProbeActivations
    truth: Truth


@dataclass(frozen=True)
class BenchmarkResult:
    """What :func:`run_benchmark` measured.

    Attributes
    ----------
    rows : per world and ranker (and the two reference rows) a dict with ``world``, ``ranker`` and
        the :data:`METRICS` (nan where not defined), plus ``best_r_precision`` and ``best_local``.
    mean_rows : the same averaged over worlds.
    winner : the ranker with the best mean score (see the module docstring).
    k : local depth; timings : seconds per phase; out : output folder.
    """

    rows: tuple[dict, ...]
    mean_rows: tuple[dict, ...]
    winner: str
    k: int
    timings: dict = field(default_factory=dict)
    out: Path | None = None

    def table(self) -> str:
        """The mean table (and the winner's targets) as aligned text."""
        return format_table(self.mean_rows, self.k) + "\n" + targets_text(self.mean_rows, self.winner)


# --------------------------------------------------------------------------------------------
# pure computation
# --------------------------------------------------------------------------------------------


def _nanmean(v) -> float:
    a = np.asarray(list(v), dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _reference_rows(world: WorldData, vocab: list[str], weights: np.ndarray, test: np.ndarray, k: int,
                    n_draw: int, seed: int) -> list[dict]:
    """The ``random`` and ``best reachable`` rows of one world."""
    truth = world.truth
    allowed = truth.planted_categories
    w = np.array([wt if truth.categories.get(x) in allowed else 0.0 for x, wt in zip(vocab, weights)])
    reach = {x for x, wt in zip(vocab, w) if wt > 0}
    rng = np.random.default_rng([seed, 11])
    planted = {c: truth.classes[c] for c in np.unique(world.classes) if c in truth.classes}
    r1 = random_global_scores(vocab, w, planted, {c: 1 for c in planted}, n_draw, rng)
    rr = random_global_scores(vocab, w, planted, {c: len(set(v)) for c, v in planted.items()}, n_draw, rng)
    imgs = [i for i in world.images[test] if image_key(i) in truth.images]
    rl = random_local_precision(vocab, w, truth.images, {i: k for i in imgs}, n_draw, rng)
    random_row = {"p_at_1": _nanmean(v["precision"] for v in r1.values()),
                  "r_precision": _nanmean(v["precision"] for v in rr.values()),
                  "local_p_at_k": _nanmean(rl.values())}
    best_row = {"p_at_1": _nanmean(oracle_precision(set(v), reach, 1) for v in planted.values()),
                "r_precision": _nanmean(oracle_precision(set(v), reach, len(set(v))) for v in planted.values()),
                "local_p_at_k": _nanmean(oracle_precision(truth.images[image_key(i)], reach, k) for i in imgs)}
    rows = []
    for name, vals in (("random", random_row), ("best reachable", best_row)):
        row = {m: float("nan") for m in METRICS}
        row.update(vals)
        rows.append({"world": world.name, "ranker": name, **row})
    return rows


def _truth_metrics(world: WorldData, test: np.ndarray, local: list, global_: list, classes, k: int) -> dict:
    truth = world.truth
    cats = dict(truth.categories)
    allowed = truth.planted_categories
    glob = {str(c): [rc.concept for rc in lst] for c, lst in zip(classes, global_)}
    loc = {str(i): [rc.concept for rc in lst] for i, lst in zip(world.images[test], local)}
    g1 = global_truth_scores(glob, truth.classes, 1, cats, allowed)
    gr = global_truth_scores(glob, truth.classes, None, cats, allowed)
    lp = local_truth_precision(loc, truth.images, k, cats, allowed)
    # a class with an empty list scores 0, not nan: the ranker found nothing for it
    zero = lambda d: [0.0 if not math.isfinite(v["precision"]) else v["precision"] for v in d.values()]
    return {"p_at_1": _nanmean(zero(g1)), "r_precision": _nanmean(zero(gr)),
            "local_p_at_k": _nanmean(0.0 if not math.isfinite(v) else v for v in lp.values())}


def _agreement(world: WorldData, test: np.ndarray, local: list, global_: list, classes, vocab, k: int,
               n_perm: int, seed: int) -> tuple[float, float]:
    """Formula 2 at (k, 1) over the test images and its permutation lift."""
    from conceptrank.core.baselines import (
        class_overlap_means,
        encode_rankings,
        overlap_matrix,
        permutation_test,
    )

    image_class = {str(i): str(c) for i, c in zip(world.images[test], world.classes[test])}
    loc = {str(i): [rc.concept for rc in lst] for i, lst in zip(world.images[test], local)}
    glob = {str(c): [rc.concept for rc in lst] for c, lst in zip(classes, global_)}
    cls = [str(c) for c in classes if str(c) in set(image_class.values())]
    enc = encode_rankings(loc, image_class, glob, cls, vocab)
    M = class_overlap_means(overlap_matrix(enc, k, 1), enc.y, enc.n_classes)
    perm = permutation_test(M, n_perm, np.random.default_rng([seed, 12]))
    return perm.observed_overall, perm.lift_overall


def _deletion(ranker, svm, world: WorldData, test: np.ndarray, global_: list, depth: int, n_random: int,
              seed: int) -> float:
    """Deletion ratio with all units of each class's top-``depth`` concepts removed."""
    from conceptrank.core.faithfulness import deletion_test

    ids = ranker.unit_ids_
    index = {x: i for i, x in enumerate(ranker.concepts_)}
    top_units = [np.flatnonzero(np.isin(ids, [index[rc.concept] for rc in lst[:depth]])) for lst in global_]
    Z = (world.mean[test] - svm.scaler_mean_) / svm.scaler_scale_
    cpos = {c: i for i, c in enumerate(svm.classes_)}
    y = np.array([cpos[c] for c in world.classes[test]])
    res = deletion_test(Z, y, svm.coef_, svm.intercept_, top_units, np.flatnonzero(ids >= 0), n_random,
                        np.random.default_rng([seed, 13]))
    return res.ratio_overall


def _fold_svms(world: WorldData, train: np.ndarray, C: float, folds: int, seed: int) -> list:
    from sklearn.model_selection import StratifiedKFold

    from conceptrank.core.ranking import GlobalRanker

    X, y = world.mean[train], world.classes[train]
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, GlobalRanker("standard", C=C, folds=2, seed=seed).fit(X[tr], y[tr])) for tr, _ in skf.split(X, y)]


def _stability(name: str, world: WorldData, train: np.ndarray, fold_svms: list, depth: int) -> float:
    from conceptrank.core.faithfulness import mean_pairwise_jaccard

    runs = []
    for tr, svm in fold_svms:
        idx = np.flatnonzero(train)[tr]
        r = make_ranker(name).fit(world.mean[idx], world.classes[idx], world.bank, X_max=world.max[idx],
                                  probe=world.probe, svm=svm)
        runs.append(r.global_sets(depth))
    return _nanmean(mean_pairwise_jaccard(runs))


def benchmark_world(world: WorldData, cfg: BenchmarkConfig = BenchmarkConfig(), echo: Callable[[str], None] | None = None) -> list[dict]:
    """Score every ranker of ``cfg.rankers`` on one world; returns its rows (rankers, then references).

    Rows hold ``world``, ``ranker``, the :data:`METRICS` and ``seconds`` (fit and score, stability
    refits included).
    """
    from conceptrank.core.ranking import GlobalRanker

    train, test = world.splits == "train", world.splits == "test"
    if not train.any() or not test.any():
        raise ConceptrankError(f"world {world.name}: the benchmark needs train and test images")
    svm = GlobalRanker("standard", seed=cfg.seed).fit(world.mean[train], world.classes[train])
    fold_svms = _fold_svms(world, train, svm.best_C_, cfg.folds, cfg.seed)
    ids, names, _, _ = world.bank.table()
    vocab = list(names)
    weights = np.bincount(ids[ids >= 0], minlength=len(vocab)).astype(np.float64)
    rows = []
    for name in cfg.rankers:
        t0 = time.perf_counter()
        r = make_ranker(name).fit(world.mean[train], world.classes[train], world.bank, X_max=world.max[train],
                                  probe=world.probe, svm=svm)
        local = r.local(world.mean[test], world.max[test], k=max(cfg.k, 10))
        glob = r.global_(max(cfg.depth, 10))
        row = {"world": world.name, "ranker": name}
        row.update(_truth_metrics(world, test, local, glob, r.classes_, cfg.k))
        row["agreement"], row["agreement_lift"] = _agreement(world, test, local, glob, r.classes_, vocab, cfg.k,
                                                             cfg.n_perm, cfg.seed)
        row["deletion_ratio"] = _deletion(r, svm, world, test, glob, cfg.depth, cfg.n_random, cfg.seed)
        row["stability"] = _stability(name, world, train, fold_svms, cfg.depth)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if echo:
            echo(f"  {world.name} {name}: P@1 {row['p_at_1']:.2f}, R-prec {row['r_precision']:.3f}, "
                 f"P@{cfg.k} {row['local_p_at_k']:.3f} ({row['seconds']:.1f}s)")
    return rows + _reference_rows(world, vocab, weights, test, cfg.k, cfg.n_draw, cfg.seed)


def summarize_rows(rows: Sequence[dict]) -> list[dict]:
    """Mean over worlds of every ranker's (and reference row's) metrics, in first-seen order."""
    order = list(dict.fromkeys(r["ranker"] for r in rows))
    out = []
    for name in order:
        sel = [r for r in rows if r["ranker"] == name]
        row = {"world": "mean", "ranker": name, "n_worlds": len(sel)}
        for m in METRICS + ("seconds",):
            row[m] = _nanmean(r.get(m, float("nan")) for r in sel)
        out.append(row)
    best = next((r for r in out if r["ranker"] == "best reachable"), None)
    for row in out:
        for m in ("r_precision", "local_p_at_k"):
            row[f"{m}_of_best"] = row[m] / best[m] if best and best[m] > 0 else float("nan")
    return out


def _score(row: dict) -> float:
    return (row["p_at_1"] + row["r_precision_of_best"] + row["local_p_at_k_of_best"]) / 3


def winner(mean_rows: Sequence[dict]) -> str:
    """The ranker (not a reference row) with the highest ``(P@1 + R-prec/best + P@K/best) / 3``."""
    cands = [r for r in mean_rows if r["ranker"] not in REFERENCE_ROWS and math.isfinite(_score(r))]
    if not cands:
        raise ConceptrankError("no ranker produced scores")
    return max(cands, key=_score)["ranker"]


def _cell(x: float, fmt: str = ".3f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, fmt)


def format_table(mean_rows: Sequence[dict], k: int) -> str:
    """Rankers side by side, with the random and best-reachable rows below them."""
    head = ["ranker", "P@1", "R-prec", "(of best)", f"P@{k}", "(of best)", f"agree {k}L-1G", "lift",
            "deletion", "stability"]
    body = []
    for r in mean_rows:
        body.append([r["ranker"], _cell(r["p_at_1"], ".2f"), _cell(r["r_precision"]), _cell(r["r_precision_of_best"], ".2f"),
                     _cell(r["local_p_at_k"]), _cell(r["local_p_at_k_of_best"], ".2f"), _cell(r["agreement"]),
                     _cell(r["agreement_lift"], ".2f"), _cell(r["deletion_ratio"], ".2f"), _cell(r["stability"], ".2f")])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for j, row in enumerate(body):
        if mean_rows[j]["ranker"] == REFERENCE_ROWS[0]:
            lines.append("-" * len(lines[0]))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def targets_text(mean_rows: Sequence[dict], best_ranker: str) -> str:
    """Whether the winner meets issue 13's targets (P@1 ≥ 0.9, R-prec and P@K ≥ 0.8 × best reachable)."""
    r = next(x for x in mean_rows if x["ranker"] == best_ranker)
    checks = [("global P@1", r["p_at_1"], 0.9), ("R-prec / best", r["r_precision_of_best"], 0.8),
              ("local P@K / best", r["local_p_at_k_of_best"], 0.8)]
    parts = [f"{n} {_cell(v, '.2f')} {'≥' if v >= t else '<'} {t}" for n, v, t in checks]
    return f"winner: {best_ranker} — " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# I/O edge
# --------------------------------------------------------------------------------------------


def prepare_world(model, world: Path, out: Path, cfg: BenchmarkConfig, name: str) -> WorldData:
    """Dissect, extract and compute the probe activations of one world (each stage reuses its outputs)."""
    from conceptrank.io.broden import BrodenDataset
    from conceptrank.io.tally_csv import read_tally
    from conceptrank.io.truth import read_truth
    from conceptrank.stages.dissect import DissectConfig, run_dissect
    from conceptrank.stages.extract import ExtractConfig, run_extract
    from conceptrank.stages.probe import load_probe_activations, run_probe_activations

    dcfg = DissectConfig(batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device, progress=False)
    run_dissect(model, None, cfg.layer, BrodenDataset(world / "probe"), out / "dissect", dcfg)
    ecfg = ExtractConfig(batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device)
    run_extract(model, None, cfg.layer, world / "target", out / "extract", ecfg)
    with np.load(out / "extract" / "activations.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("mean", "max", "classes", "splits", "images")}
    bank = UnitBank(read_tally(out / "dissect" / "tally.csv").concepts(cfg.min_iou),
                    np.load(out / "dissect" / "thresholds.npy", allow_pickle=False))
    probe = load_probe_activations(run_probe_activations(model, cfg.layer, world / "probe", out / "dissect",
                                                         batch_size=cfg.batch_size, workers=cfg.workers,
                                                         device=cfg.device))
    return WorldData(name, arrays["mean"].astype(np.float64), arrays["max"].astype(np.float64),
                     arrays["classes"].astype(str), arrays["splits"].astype(str), arrays["images"].astype(str),
                     bank, probe, read_truth(world / "truth.json"))


def run_benchmark(out: str | Path, worlds: Sequence[tuple[int, Path]], model: str,
                  cfg: BenchmarkConfig = BenchmarkConfig(), echo: Callable[[str], None] = print) -> BenchmarkResult:
    """Run every ranker on the given worlds; write ``benchmark.csv``, ``benchmark.json``, ``benchmark.png``.

    Parameters
    ----------
    out : output folder; each world's dissection, extraction and probe activations go to
        ``out/seed<N>/`` and are reused by later runs with the same inputs.
    worlds : (seed, world folder) pairs, each folder holding ``probe/``, ``target/``, ``truth.json``
        (:func:`conceptrank.pipeline.run_ranker_benchmark` generates them).
    model : the model card (or torchvision name) every world is ranked with.
    """
    from conceptrank.nn.models import load_model

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(model)
    rows: list[dict] = []
    for seed, world in worlds:
        t1 = time.perf_counter()
        data = prepare_world(loaded, Path(world), out / f"seed{seed}", cfg, f"seed {seed}")
        t2 = time.perf_counter()
        rows += benchmark_world(data, cfg, echo)
        timings[f"seed {seed} prepare"] = t2 - t1
        timings[f"seed {seed} rankers"] = time.perf_counter() - t2
    mean_rows = summarize_rows(rows)
    timings["total"] = time.perf_counter() - t0
    res = BenchmarkResult(tuple(rows), tuple(mean_rows), winner(mean_rows), cfg.k, timings, out)
    _write_outputs(out, res, cfg)
    return res


def _csv_rows(res: BenchmarkResult) -> str:
    cols = ["world", "ranker", *METRICS, "r_precision_of_best", "local_p_at_k_of_best", "seconds"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in list(res.rows) + list(res.mean_rows):
        w.writerow([r.get(c, "") if isinstance(r.get(c, ""), str) else _cell(r.get(c, float("nan")), ".6g")
                    for c in cols])
    return buf.getvalue()


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_outputs(out: Path, res: BenchmarkResult, cfg: BenchmarkConfig) -> None:
    import dataclasses

    from conceptrank.io.cache import atomic_write_json, atomic_write_text

    atomic_write_text(out / "benchmark.csv", _csv_rows(res))
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    atomic_write_json(out / "benchmark.json", _json_safe({
        "config": conf, "winner": res.winner, "table": res.table(), "mean": list(res.mean_rows),
        "worlds": list(res.rows), "timings": res.timings, "metrics": {m: _LABELS[m].format(k=cfg.k) for m in METRICS},
    }))
    from conceptrank.io.cache import atomic_write

    fig = benchmark_figure(res.mean_rows, cfg.k)
    with atomic_write(out / "benchmark.png", "wb") as f:
        fig.savefig(f, format="png", dpi=120, metadata={"Software": None})


def benchmark_figure(mean_rows: Sequence[dict], k: int):
    """Grouped bars per ranker: global P@1, R-precision and local P@K, with random and best-reachable marks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rankers = [r for r in mean_rows if r["ranker"] not in REFERENCE_ROWS]
    ref = {r["ranker"]: r for r in mean_rows if r["ranker"] in REFERENCE_ROWS}
    metrics = [("p_at_1", "global P@1"), ("r_precision", "global R-precision"), ("local_p_at_k", f"local P@{k}")]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    x = np.arange(len(rankers))
    for ax, (m, title) in zip(axes, metrics):
        vals = [r[m] for r in rankers]
        ax.bar(x, vals, color=["#c44e52" if r["ranker"] == "paper" else "#4c72b0" for r in rankers])
        for name, style in (("random", ":"), ("best reachable", "--")):
            if name in ref and math.isfinite(ref[name][m]):
                ax.axhline(ref[name][m], color="#333333", linestyle=style, linewidth=1, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, [r["ranker"] for r in rankers], rotation=45, ha="right", fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel(f"mean over {rankers[0].get('n_worlds', 1) if rankers else 0} world(s)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Concept rankers against the synthetic worlds' truth (paper's method in red)", fontsize=10)
    return fig
