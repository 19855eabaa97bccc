"""rules: per-class symbolic rules over concept facts, with the numbers that say whether to trust them.

``learn_rules`` (pure) binarises the layer's maps into concept facts (:mod:`conceptrank.core.facts`),
learns each class's rules on the **train** split (:mod:`conceptrank.core.rules`), once on the true
labels and once on the SVM's predictions (a *surrogate* of the decision the tool explains), and
scores every rule set on the **test** split. The share threshold of our binarisation is chosen by
k-fold cross-validation on the train split (surrogate fidelity of the chosen learner); the test split
is never used to choose anything.

``run_rules`` reads a run folder, recomputes the layer maps of every target image once (batched;
cached in ``RUN/rules/map_stats.npz``), and writes ``RUN/rules/``:

``rules.txt``  the surrogate rules of the chosen learner and binarisation, readable;
``rules.lp``   the same rules as an answer-set program (clingo), with the priority policy;
``facts.lp``   every target image's facts, so ``clingo rules.lp facts.lp`` predicts every image;
``rules.json`` per rule its literals, support, confidence, coverage and the images it fires on;
               the comparison of learners × binarisations × labels; counts of bad cases; and the
               solver check (clingo's predictions against the Python evaluator's, image by image).
``comparison.csv`` the comparison table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from conceptrank.core.facts import (
    Facts,
    FactsMethod,
    MapStats,
    concept_facts,
    nesyfold_facts,
    truth_facts,
)
from conceptrank.core.ranking import DEFAULT_MIN_IOU
from conceptrank.core.rules import (
    LEARNERS,
    Learner,
    RuleSet,
    facts_ceiling,
    fit_rules,
    score_ruleset,
)
from conceptrank.errors import RulesError
from conceptrank.stages.maps import run_config

__all__ = ["RulesConfig", "RuleReport", "RulesResult", "learn_rules", "run_rules", "MIN_SHARE_GRID",
           "rules_json", "read_rules", "rules_summary", "explain_rules"]

MIN_SHARE_GRID = (0.0, 0.01, 0.02, 0.05)
Target = Literal["svm", "true"]


@dataclass(frozen=True)
class RulesConfig:
    """Options of the rules stage.

    learner : the learner whose surrogate rules are written to rules.txt / rules.lp.
    facts : the binarisation of those rules ('share' ours, 'nesyfold' the alternative).
    max_literals, max_rules : budget per rule and per class.
    min_share : our binarisation's share; None chooses it from ``MIN_SHARE_GRID`` by CV on train.
    min_iou : a unit names a concept when its tally IoU is at least this (NetDissect's 0.04).
    compare : also learn every other learner × binarisation × label set (the comparison table).
    jobs : worker processes for the independent fits (CV folds, comparison rows); 0: one per core.
        The results do not depend on it.
    """

    learner: Learner = "ripper"
    facts: FactsMethod = "share"
    max_literals: int = 3
    max_rules: int = 5
    min_share: float | None = None
    min_iou: float = DEFAULT_MIN_IOU["standard"]
    folds: int = 3
    compare: bool = True
    learners: tuple[str, ...] = LEARNERS
    seed: int = 0
    batch_size: int = 64
    jobs: int = 1

    def validate(self) -> None:
        if self.learner not in LEARNERS or any(x not in LEARNERS for x in self.learners):
            raise RulesError(f"--learner must be one of {', '.join(LEARNERS)}, got {self.learner!r}")
        if self.facts not in ("share", "nesyfold"):
            raise RulesError(f"--facts must be share or nesyfold, got {self.facts!r}")
        if self.max_literals < 1 or self.max_rules < 1:
            raise RulesError("--max-literals and --max-rules must be at least 1")
        if self.min_share is not None and not 0.0 <= self.min_share < 1.0:
            raise RulesError(f"--min-share must be in [0, 1), got {self.min_share}")
        if self.folds < 2:
            raise RulesError("folds must be at least 2")
        if self.jobs < 0:
            raise RulesError(f"--jobs must be 0 (every core) or more, got {self.jobs}")


@dataclass(frozen=True)
class RuleReport:
    """One learned rule set and its scores: ``test`` on the test split, ``train`` on the train split."""

    facts: str
    learner: str
    target: str
    ruleset: RuleSet
    test: dict
    train: dict


@dataclass(frozen=True)
class RulesResult:
    """What ``learn_rules`` found.

    primary : the surrogate rules of the chosen learner and binarisation.
    reports : every rule set learned (primary included), for the comparison.
    facts : the binarisations used, by method.
    svm_accuracy : the SVM's test accuracy against the true labels.
    cv : min_share → mean cross-validated surrogate fidelity on train ({} when not chosen by CV).
    ceiling : binarisation → test fidelity of an unconstrained logistic regression on the same facts.
    counts : bad cases, counted (images without any fact per split, classes without positives).
    """

    primary: RuleReport
    reports: tuple[RuleReport, ...]
    facts: Mapping[str, Facts]
    svm_accuracy: float
    cv: dict
    counts: dict
    config: RulesConfig = RulesConfig()
    out: Path | None = None
    solver: dict = field(default_factory=dict)
    maps_reused: bool = False
    ceiling: dict = field(default_factory=dict)

    def table(self) -> str:
        """The comparison as a fixed-width table (test split)."""
        head = f"{'facts':9} {'learner':7} {'labels':6} {'rules':>5} {'lit/r':>5} {'max/c':>5} " \
               f"{'cover':>6} {'acc':>6} {'fidel':>6} {'P+lit':>6}"
        lines = [f"rules (test split; SVM accuracy {self.svm_accuracy:.3f}; budget ≤ "
                 f"{self.primary.ruleset.params['max_literals']} literals, ≤ {self.primary.ruleset.params['max_rules']} rules/class)",
                 head]
        for r in self.reports:
            t = r.test
            mark = " *" if r is self.primary else ""
            lines.append(f"{r.facts:9} {r.learner:7} {r.target:6} {t['rules']:5d} {t['literals_per_rule']:5.2f} "
                         f"{t['max_rules_per_class']:5d} {_f(t['coverage'])} {_f(t['accuracy'])} {_f(t['fidelity'])} "
                         f"{_f(t['positive_literal_precision'])}{mark}")
        share = self.facts.get("share")
        if share is not None:
            how = "chosen by CV on train" if self.cv else "given"
            lines.append(f"share facts: a unit fires above its dissection threshold on > {share.params['min_share']} "
                         f"of its map ({how}); nesyfold facts: ‖map‖₂ ≥ 0.6·mean + 0.7·std; truth: planted, visible")
        if self.ceiling:
            lines.append("ceiling (logistic regression on the same facts, no budget), fidelity: "
                         + ", ".join(f"{m} {_f(v).strip()}" for m, v in self.ceiling.items()))
        lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        if self.solver:
            lines.append(f"solver check (clingo vs Python): {self.solver['agree']}/{self.solver['images']} images agree")
        lines.append("* = written to rules.txt / rules.lp;  P+lit = positive literals naming a planted concept")
        return "\n".join(lines)

    def summary(self) -> str:
        return self.table() + (f"\n→ {self.out}" if self.out else "")


def _f(x: float | None) -> str:
    return f"{x:6.3f}" if x is not None else f"{'-':>6}"


# ---------------------------------------------------------------------------------------------
# pure
# ---------------------------------------------------------------------------------------------


def learn_rules(stats: MapStats, unit_concepts: Sequence[str | None], labels: np.ndarray, splits: np.ndarray,
                svm_pred: np.ndarray, classes: Sequence[str], cfg: RulesConfig = RulesConfig(),
                planted: Mapping[str, Sequence[str]] | None = None,
                visible: Sequence[frozenset] | None = None) -> RulesResult:
    """Facts → rules → scores.

    Parameters
    ----------
    stats : per image (N) and unit (U) map statistics; unit_concepts : U concepts (None: unlabelled).
    labels, splits, svm_pred : (N,) true classes, 'train'/'test', the SVM's predicted classes.
    planted : class → planted concepts (synthetic world) for the positive-literal precision.
    visible : per image the concepts truth says are in it (synthetic world): adds the ``truth``
        facts to the comparison, as the reference a perfect concept detector would give.
    """
    cfg.validate()
    labels, splits, svm_pred = (np.asarray(a).astype(str) for a in (labels, splits, svm_pred))
    train, test = splits == "train", splits == "test"
    if not train.any() or not test.any():
        raise RulesError(f"rules need train and test images; got {int(train.sum())} train, {int(test.sum())} test")
    pool = _executor(cfg.jobs)
    methods = _methods(stats, unit_concepts, cfg, visible)
    combos = [(cfg.facts, cfg.learner, "svm")]
    if cfg.compare:
        combos += [(m, ln, t) for m in methods for ln in cfg.learners for t in ("svm", "true")
                   if (m, ln, t) != combos[0]]

    def fit(f: Facts, rows: np.ndarray, y: np.ndarray, learner: str):
        return pool.submit(fit_rules, f.present[rows], y[rows], classes, f.names, f.concepts, learner,
                           cfg.max_literals, cfg.max_rules, cfg.seed)

    def submit(f: Facts, learner: str, target: str):
        return fit(f, train, svm_pred if target == "svm" else labels, learner)

    pending_cv = _submit_cv(fit, stats.share, unit_concepts, svm_pred, train, cfg) if "share" in methods else None
    facts: dict[str, Facts] = {}
    if "nesyfold" in methods:
        facts["nesyfold"] = nesyfold_facts(stats.l2, train, unit_concepts)
    if "truth" in methods:
        facts["truth"] = truth_facts(visible)
    fitting = {c: submit(facts[c[0]], c[1], c[2]) for c in combos if c[0] != "share"}  # beside the CV
    cv: dict = {}
    if pending_cv is not None:
        share = cfg.min_share
        if share is None:
            cv = _cv_scores(pending_cv)
            share = max(cv, key=lambda s: (cv[s], -s))
        facts["share"] = concept_facts(stats.share, unit_concepts, share)
        fitting.update({c: submit(facts["share"], c[1], c[2]) for c in combos if c[0] == "share"})
    facts = {m: facts[m] for m in methods}  # the chosen binarisation first
    reports = []
    for method, learner, target in combos:
        f, rs = facts[method], fitting[(method, learner, target)].result()
        reports.append(RuleReport(method, learner, target, rs,
                                  score_ruleset(rs, f.present[test], labels[test], svm_pred[test], planted),
                                  score_ruleset(rs, f.present[train], labels[train], svm_pred[train], planted)))
    ceiling = {m: facts_ceiling(f.present[train], svm_pred[train], f.present[test], svm_pred[test], cfg.seed)
               for m, f in facts.items()}
    counts = _counts(facts[cfg.facts], splits, reports[0].ruleset)
    svm_acc = float((svm_pred[test] == labels[test]).mean())
    return RulesResult(reports[0], tuple(reports), facts, svm_acc, cv, counts, cfg, ceiling=ceiling)


def _methods(stats: MapStats, unit_concepts, cfg: RulesConfig, visible) -> list[str]:
    """The binarisations to state facts with, the chosen one first (``truth`` on a synthetic world)."""
    if stats.share is None and (cfg.facts == "share" or cfg.compare):
        raise RulesError("the share binarisation needs the dissection thresholds")
    methods = [cfg.facts] + ([m for m in ("share", "nesyfold") if m != cfg.facts] if cfg.compare else [])
    if "share" in methods and not any(unit_concepts):
        raise RulesError(f"no unit has a concept with IoU ≥ {cfg.min_iou}: nothing to state facts about")
    return methods + (["truth"] if cfg.compare and visible is not None else [])


def _submit_cv(fit, share: np.ndarray, unit_concepts, svm_pred, train, cfg: RulesConfig) -> list:
    """The CV fits that choose min_share (none when it is given), ``fit(facts, rows, labels, learner)``
    submitting each: ``[(s, facts at s, [(held-out rows, their SVM labels, future)] per fold)]``."""
    from sklearn.model_selection import KFold

    if cfg.min_share is not None:
        return []
    idx = np.nonzero(train)[0]
    folds = list(KFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(idx))
    out = []
    for s in MIN_SHARE_GRID:
        f = concept_facts(share, unit_concepts, s)
        out.append((s, f, [(idx[b], svm_pred[idx[b]], fit(f, idx[a], svm_pred, cfg.learner)) for a, b in folds]))
    return out


def _cv_scores(pending: list) -> dict:
    """min_share → mean surrogate fidelity of the fold rules on the held-out part of each fold."""
    return {s: float(np.mean([score_ruleset(fut.result(), f.present[rows], y, y)["fidelity"] for rows, y, fut in runs]))
            for s, f, runs in pending}


def _executor(jobs: int):
    """Worker processes for the fits (0: one per core), started with ``PYTHONHASHSEED=0``: imodels'
    SkopeRules orders tied candidate rules by iterating a ``set`` of strings, so in a process with a
    random hash seed its rules would change from run to run. The results do not depend on ``jobs``."""
    import os

    from joblib.externals.loky import get_reusable_executor

    n = max(1, jobs if jobs > 0 else (os.cpu_count() or 1))
    return get_reusable_executor(max_workers=n, env={"PYTHONHASHSEED": "0"})


def _counts(facts: Facts, splits: np.ndarray, ruleset: RuleSet) -> dict:
    empty = facts.empty_images
    return {
        "images_without_facts_train": int((empty & (splits == "train")).sum()),
        "images_without_facts_test": int((empty & (splits == "test")).sum()),
        "classes_without_positive_train_image": len(ruleset.no_positives),
        "classes_without_rules": sum(1 for v in ruleset.per_class().values() if not v),
    }


# ---------------------------------------------------------------------------------------------
# read → compute → write
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunInputs:
    run_cfg: dict
    extract_meta: dict
    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    svm_pred: np.ndarray
    classes: tuple[str, ...]
    unit_concepts: list
    thresholds: np.ndarray | None
    key: str


def _read_run(run: Path, cfg: RulesConfig) -> _RunInputs:
    from conceptrank.io import cache
    from conceptrank.io.activations import load_activations
    from conceptrank.io.runfolder import check_run_folder
    from conceptrank.io.svm import load_svm
    from conceptrank.io.tally_csv import read_tally

    check_run_folder(run, ("rank", "extract"), "rules")
    if not (run / "extract" / "extract.json").is_file():
        raise RulesError(f"{run / 'extract' / 'extract.json'} not found: the rules need to know the model and layer")
    run_cfg = run_config(run)
    meta = cache.read_json(run / "extract" / "extract.json")
    acts = load_activations(run / "extract")
    svm = load_svm(run / "rank")
    tally = run / "dissect" / "tally.csv"
    if not tally.is_file() and run_cfg.get("tally"):
        tally = Path(run_cfg["tally"])
    labels = read_tally(tally)
    if labels.num_units != acts.mean.shape[1]:
        raise RulesError(f"{tally} has {labels.num_units} units but the activations {acts.mean.shape[1]}")
    thresholds = None
    tpath = tally.parent / "thresholds.npy"
    if tpath.is_file():
        thresholds = np.load(tpath, allow_pickle=False).astype(np.float64)
        if thresholds.shape != (labels.num_units,):
            raise RulesError(f"{tpath}: shape {thresholds.shape}, expected ({labels.num_units},)")
    elif cfg.facts == "share" or cfg.compare:
        raise RulesError(f"{tpath} not found: the concept facts need the dissection thresholds "
                         "(re-run `conceptrank dissect`, or use --facts nesyfold --no-compare)")
    unit_concepts = [c[0] if c else None for c in labels.concepts(cfg.min_iou)]
    key = cache.hash_json({"model": (meta.get("fingerprints") or {}).get("model"), "layer": meta.get("layer"),
                           "dataset": (meta.get("fingerprints") or {}).get("dataset_files"),
                           "images": acts.images.tolist(),
                           "thresholds": cache.array_sha256(thresholds) if thresholds is not None else None})
    return _RunInputs(run_cfg, meta, acts.images, acts.classes, acts.splits, _svm_predictions(svm, acts.mean),
                      tuple(svm.classes), unit_concepts, thresholds, key)


def _svm_predictions(svm, mean: np.ndarray) -> np.ndarray:
    d = svm.decision(mean)
    classes = np.asarray(svm.classes)
    if d.shape[1] == 1 and len(classes) == 2:  # a binary SVM: one score, positive means classes[1]
        return classes[(d[:, 0] > 0).astype(int)]
    return classes[d.argmax(axis=1)]


def _map_statistics(inp: _RunInputs, cache_path: Path, batch_size: int) -> tuple[MapStats, bool]:
    """Share above threshold and L2 norm of every image's maps, from ``cache_path`` when its key matches.

    ``share`` is None when the run has no dissection thresholds.
    """
    import torch

    from conceptrank.core.facts import map_stats
    from conceptrank.io.cache import save_npz
    from conceptrank.progress import Progress
    from conceptrank.stages.maps import iter_layer_maps

    if cache_path.is_file():
        with np.load(cache_path, allow_pickle=False) as z:
            if {"key", "share", "l2", "has_share"} <= set(z.files) and str(z["key"]) == inp.key:
                return MapStats(z["share"] if bool(z["has_share"]) else None, z["l2"]), True
    n, u = len(inp.images), len(inp.unit_concepts)
    share, l2 = np.zeros((n, u)), np.zeros((n, u))
    thr = inp.thresholds if inp.thresholds is not None else np.full(u, np.inf)
    with Progress(n, "rules: layer maps", "img") as bar:
        for start, maps, size in iter_layer_maps(inp.run_cfg, inp.extract_meta, list(inp.images), batch_size):
            if maps.shape[1] != u:
                raise RulesError(f"the model's layer has {maps.shape[1]} units, the tally {u}")
            s = map_stats(torch.from_numpy(maps), thr, size)
            share[start:start + len(maps)], l2[start:start + len(maps)] = s.share, s.l2
            bar.update(len(maps))
    has_share = inp.thresholds is not None
    save_npz(cache_path, key=np.asarray(inp.key), images=inp.images.astype(str), share=share, l2=l2,
             has_share=np.asarray(has_share))
    return MapStats(share if has_share else None, l2), False


def run_rules(run: str | Path, cfg: RulesConfig = RulesConfig(), truth: str | Path | None = None,
              out: str | Path | None = None) -> RulesResult:
    """Read a run folder, learn and score the rules, write ``RUN/rules/`` (or ``out``)."""
    from conceptrank.core.rules import facts_program, rules_program, rules_text

    cfg.validate()
    run = Path(run)
    out = Path(out) if out is not None else run / "rules"
    inp = _read_run(run, cfg)
    out.mkdir(parents=True, exist_ok=True)
    stats, reused = _map_statistics(inp, out / "map_stats.npz", cfg.batch_size)
    truth = truth if truth is not None else inp.run_cfg.get("truth")
    planted, visible = None, None
    if truth:
        from conceptrank.core.groundtruth import image_key
        from conceptrank.io.truth import read_truth

        t = read_truth(truth)
        planted = t.classes
        keys = [image_key(i) for i in inp.images]
        if t.images and all(k in t.images for k in keys):
            visible = [t.images[k] for k in keys]
    res = learn_rules(stats, inp.unit_concepts, inp.labels, inp.splits, inp.svm_pred, inp.classes, cfg, planted,
                      visible)
    primary = res.primary
    facts = res.facts[primary.facts]
    header = [f"conceptrank rules of {run}: learner {primary.learner}, {primary.facts} facts "
              f"{facts.params}, learned on the train split from the SVM's predictions (a surrogate)"]
    lp, fl = rules_program(primary.ruleset, header), facts_program(inp.images, facts.names, facts.present)
    solver = _solver_check(primary.ruleset, facts, inp.images, lp, fl)
    res = replace(res, out=out, solver=solver, maps_reused=reused)
    _write_outputs(out, res, inp, rules_text(primary.ruleset, header), lp, fl)
    return res


def _solver_check(ruleset: RuleSet, facts: Facts, images: np.ndarray, lp: str, fl: str) -> dict:
    """clingo's predictions on ``lp`` + ``fl`` against :func:`conceptrank.core.rules.predict`, per image."""
    from conceptrank.core.rules import asp_names, predict, solve_program

    labels, winner = predict(ruleset, facts.present)
    heads = dict(zip(asp_names(ruleset.classes), ruleset.classes))
    solved = solve_program(lp, fl)
    agree = 0
    for img, lab, w in zip(images, labels, winner):
        cls, rule = solved.get(str(img), ("", ""))
        agree += heads.get(cls, "") == lab and rule == (f"r{w + 1}" if w >= 0 else "")
    return {"images": int(len(images)), "agree": int(agree)}


POLICY = ("An image gets the class of the highest-priority rule that fires on it; priority: Laplace confidence "
          "(support + 1) / (fires + 2) on the train split (desc), support (desc), fewer literals, class order, learner order. An image on which "
          "no rule fires is uncovered: no class, counted wrong in accuracy and fidelity.")
_SCORE_COLUMNS = ("rules", "literals_per_rule", "max_rules_per_class", "coverage", "accuracy", "fidelity",
                  "positive_literal_precision", "accuracy_covered", "fidelity_covered")


def rules_json(res: RulesResult, images: np.ndarray, splits: np.ndarray, labels: np.ndarray,
               svm_pred: np.ndarray) -> dict:
    """The ``rules.json`` document: the primary rules with their numbers and images, and the comparison."""
    from conceptrank.core.rules import asp_names, fire_matrix, predict

    p = res.primary
    rs, facts = p.ruleset, res.facts[p.facts]
    preds, heads = asp_names(rs.names), dict(zip(rs.classes, asp_names(rs.classes)))
    fires = fire_matrix(rs.rules, facts.present)
    _, winner = predict(rs, facts.present)
    test = np.asarray(splits) == "test"
    rules = []
    for i, r in enumerate(rs.rules):
        body = [{"predicate": preds[v], "concept": rs.concepts[v], "positive": pos} for v, pos in r.body]
        clause = f"{heads[r.head]}(X) :- " + (", ".join(("" if b["positive"] else "not ") + f"{b['predicate']}(X)"
                                                          for b in body) or "image(X)") + "."
        on = fires[:, i]
        rules.append({
            "id": f"r{i + 1}", "priority": i + 1, "class": r.head, "clause": clause, "literals": body,
            "support": r.support, "confidence": r.confidence, "laplace": r.laplace, "coverage": r.coverage,
            "fires_train": r.fires,
            "test": {"fires": int((on & test).sum()), "decides": int(((winner == i) & test).sum()),
                     "correct": int((on & test & (labels == r.head)).sum()),
                     "agrees_with_svm": int((on & test & (svm_pred == r.head)).sum())},
            "fires_on": {s: [str(x) for x in images[on & (splits == s)]] for s in ("train", "test")},
        })
    return {
        "format": "conceptrank-rules", "version": 1, "policy": POLICY,
        "config": {k: v for k, v in asdict(res.config).items() if k != "jobs"},  # jobs: not a result
        "learner": p.learner, "labels": "svm predictions (surrogate)", "classes": list(rs.classes),
        "facts": {"method": facts.method, "params": facts.params,
                  "predicates": [{"name": n, "asp": a, "concept": c, "units": [u + 1 for u in us]}
                                 for n, a, c, us in zip(facts.names, preds, facts.concepts, facts.units)]},
        "svm_test_accuracy": res.svm_accuracy, "cv_min_share": {str(k): v for k, v in res.cv.items()},
        "ceiling_fidelity": res.ceiling,
        "counts": res.counts, "classes_without_positive_train_image": list(rs.no_positives),
        "solver_check": res.solver, "scores": {"test": p.test, "train": p.train}, "rules": rules,
        "comparison": [{"facts": r.facts, "learner": r.learner, "labels": r.target, "test": r.test, "train": r.train,
                        "rules": _clauses(r.ruleset)} for r in res.reports],
    }


def _clauses(rs: RuleSet) -> list[str]:
    from conceptrank.core.rules import rules_text

    return [line.split("  %")[0] for line in rules_text(rs).splitlines() if line and not line.startswith("%")]


def _write_outputs(out: Path, res: RulesResult, inp: _RunInputs, text: str, lp: str, fl: str) -> None:
    import csv
    import io

    from conceptrank.io.cache import atomic_write_json, atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("facts", "learner", "labels") + _SCORE_COLUMNS)
    for r in res.reports:
        w.writerow([r.facts, r.learner, r.target] + ["" if r.test[c] is None else r.test[c] for c in _SCORE_COLUMNS])
    doc = rules_json(res, inp.images, inp.splits, inp.labels, inp.svm_pred)
    atomic_write_text(out / "rules.txt", text)
    atomic_write_text(out / "rules.lp", lp)
    atomic_write_text(out / "facts.lp", fl)
    atomic_write_text(out / "comparison.csv", buf.getvalue())
    atomic_write_json(out / "rules.json", doc)  # last: its presence means the others are complete



# ---------------------------------------------------------------------------------------------
# readers for evaluate, explain and the report
# ---------------------------------------------------------------------------------------------


def read_rules(path: str | Path) -> dict | None:
    """``rules.json`` (given it or its run folder / rules folder), or None when there is none."""
    from conceptrank.io.cache import read_json

    path = Path(path)
    for p in (path, path / "rules.json", path / "rules" / "rules.json"):
        if p.is_file():
            try:
                doc = read_json(p)
            except (OSError, ValueError) as e:
                raise RulesError(f"cannot read {p}: {e}") from None
            if not isinstance(doc, dict) or doc.get("format") != "conceptrank-rules" or "rules" not in doc:
                raise RulesError(f"{p}: not a conceptrank rules.json")
            return doc
    return None


def rules_summary(path: str | Path) -> dict | None:
    """The numbers of ``rules.json`` for ``evaluate``'s summary: the written rules' test scores and the
    comparison (test split), or None when the run has no rules."""
    doc = read_rules(path)
    if doc is None:
        return None
    return {"learner": doc["learner"], "facts": doc["facts"]["method"], "facts_params": doc["facts"]["params"],
            "svm_test_accuracy": doc["svm_test_accuracy"], "test": doc["scores"]["test"], "counts": doc["counts"],
            "solver_check": doc.get("solver_check"),
            "comparison": [{"facts": r["facts"], "learner": r["learner"], "labels": r["labels"], **r["test"]}
                           for r in doc["comparison"]]}


def explain_rules(run: str | Path, images: Sequence[str]) -> dict[str, list[str]]:
    """Per image (as named in activations.npz) the lines saying which rule decided it and which facts
    made it fire, or that none did; {} when the run has no rules."""
    doc = read_rules(run)
    if doc is None:
        return {}
    fired: dict[str, list[dict]] = {}
    for rule in doc["rules"]:  # in priority order
        for split_images in rule["fires_on"].values():
            for img in split_images:
                fired.setdefault(img, []).append(rule)
    out = {}
    for img in images:
        rules = fired.get(str(img), [])
        if not rules:
            out[str(img)] = [f"rules ({doc['learner']}): no rule fired — uncovered, no class"]
            continue
        w = rules[0]
        have = [lit["predicate"] for lit in w["literals"] if lit["positive"]]
        lack = [lit["predicate"] for lit in w["literals"] if not lit["positive"]]
        why = "; ".join(x for x in (("present: " + ", ".join(have)) if have else "",
                                    ("absent: " + ", ".join(lack)) if lack else "") if x) or "no condition"
        lines = [f"rules ({doc['learner']}): {w['id']} decided {w['class']}: {w['clause']} "
                 f"(support {w['support']}, confidence {w['confidence']:.2f})", f"  because {why}"]
        if len(rules) > 1:
            lines.append("  also fired (lower priority): " + ", ".join(f"{r['id']} ({r['class']})" for r in rules[1:]))
        out[str(img)] = lines
    return out
