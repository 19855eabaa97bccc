"""Class rules over concept facts: learning (one class against the rest), evaluation, and the same
rules as text and as an answer-set program.

A rule ``cls(X) :- a(X), b(X), not c(X).`` *fires* on an image when its body holds in the image's
facts. Rules are kept in one **priority order** over all classes: by Laplace-corrected confidence
``(support + 1) / (fires + 2)`` on the data they were learned from (descending; CN2's estimate, so
that a rule right on 3 of 3 images does not outrank one right on 40 of 42), then support
(descending), then fewer literals, then class order, then the learner's own order. An image on which several rules fire gets the class of the first
(highest-priority) one; an image on which none fires is *uncovered* and gets no class (counted as
wrong in accuracy and fidelity). The answer-set program encodes exactly this policy.

Learners (all one-vs-rest, ``max_literals`` literals per rule, ``max_rules`` rules per class):

``ripper``
    RIPPER (Cohen 1995) as implemented by ``wittgenstein``: sequential covering with
    grow/prune/optimise passes; each rule is a conjunction of ``predicate = 0/1`` conditions
    (a rule the optimisation pass grew past ``max_literals`` keeps its first, greediest ones).
``skope``
    ``imodels``' SkopeRules: conjunctions read off bagged shallow trees, kept when precise and
    frequent, de-duplicated; the ``max_rules`` best by out-of-bag precision are kept.
``tree``
    a shallow ``sklearn`` decision tree of depth ``max_literals``: each leaf whose majority is the
    class becomes a rule (the path's tests as literals); the ``max_rules`` largest are kept.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np

__all__ = ["Learner", "LEARNERS", "Rule", "RuleSet", "fit_rules", "facts_ceiling", "fire_matrix", "predict", "score_ruleset",
           "asp_names", "rules_text", "rules_program", "facts_program", "solve_program"]

Learner = Literal["ripper", "skope", "tree"]
LEARNERS: tuple[str, ...] = ("ripper", "skope", "tree")
Body = tuple[tuple[int, bool], ...]  # (predicate index, positive?) per literal


@dataclass(frozen=True)
class Rule:
    """``head(X) :- body``, with its counts on the data it was learned from.

    ``support`` images where the body holds and the label is ``head``; ``fires`` images where the
    body holds; ``n`` images in all.
    """

    head: str
    body: Body
    support: int
    fires: int
    n: int

    @property
    def confidence(self) -> float:
        return self.support / self.fires if self.fires else 0.0

    @property
    def laplace(self) -> float:
        """``(support + 1) / (fires + 2)``: the confidence the priority order uses."""
        return (self.support + 1) / (self.fires + 2)

    @property
    def coverage(self) -> float:
        return self.fires / self.n if self.n else 0.0


@dataclass(frozen=True)
class RuleSet:
    """Rules of every class in priority order (``rules[i]`` beats ``rules[j]`` when ``i < j``).

    Attributes
    ----------
    names, concepts : the V predicates and the concept each stands for.
    classes : all classes, in order.
    rules : the rules.
    learner : which learner made them.
    no_positives : classes that had no positive training image (so no rule).
    """

    names: tuple[str, ...]
    concepts: tuple[str, ...]
    classes: tuple[str, ...]
    rules: tuple[Rule, ...]
    learner: str
    no_positives: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)

    def per_class(self) -> dict[str, list[int]]:
        """class → indices of its rules (in priority order)."""
        out: dict[str, list[int]] = {c: [] for c in self.classes}
        for i, r in enumerate(self.rules):
            out[r.head].append(i)
        return out


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def fire_matrix(rules: Sequence[Rule], present: np.ndarray) -> np.ndarray:
    """(N, V) bool facts → (N, R) bool: which rules fire on which images."""
    present = np.asarray(present, dtype=bool)
    out = np.ones((present.shape[0], len(rules)), dtype=bool)
    for j, r in enumerate(rules):
        for v, positive in r.body:
            out[:, j] &= present[:, v] if positive else ~present[:, v]
    return out


def predict(ruleset: RuleSet, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes by the priority policy: ``(labels (N,) str, '' when uncovered; winner (N,) int, -1)``."""
    fires = fire_matrix(ruleset.rules, present)
    covered = fires.any(axis=1)
    winner = np.where(covered, fires.argmax(axis=1), -1)
    heads = np.array([r.head for r in ruleset.rules] + [""], dtype=object)
    return heads[winner].astype(str), winner


def _count(body: Body, present: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    holds = fire_matrix([Rule("", body, 0, 0, 0)], present)[:, 0]
    return int((holds & y).sum()), int(holds.sum())


def score_ruleset(ruleset: RuleSet, present: np.ndarray, y_true: np.ndarray, y_model: np.ndarray | None = None,
                  planted: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Numbers that say whether to trust the rules on some images.

    Parameters
    ----------
    present : (N, V) facts; y_true : (N,) true classes; y_model : (N,) the classifier's predictions.
    planted : class → concepts planted in it (a synthetic world's truth) for the positive-literal precision.

    Returns a dict: images, accuracy, fidelity (None without ``y_model``), coverage, accuracy and
    fidelity on the covered images, rules, literals per rule, max rules per class, positive-literal
    precision (None without ``planted``).
    """
    labels, winner = predict(ruleset, present)
    covered = winner >= 0
    n = len(labels)
    y_true = np.asarray(y_true).astype(str)
    per_class = [len(v) for v in ruleset.per_class().values()]
    out = {
        "images": n,
        "accuracy": float((labels == y_true).mean()) if n else None,
        "coverage": float(covered.mean()) if n else None,
        "accuracy_covered": float((labels == y_true)[covered].mean()) if covered.any() else None,
        "rules": len(ruleset.rules),
        "literals_per_rule": float(np.mean([len(r.body) for r in ruleset.rules])) if ruleset.rules else 0.0,
        "max_rules_per_class": max(per_class, default=0),
        "fidelity": None, "fidelity_covered": None, "positive_literal_precision": None,
    }
    if y_model is not None:
        agree = labels == np.asarray(y_model).astype(str)
        out["fidelity"] = float(agree.mean()) if n else None
        out["fidelity_covered"] = float(agree[covered].mean()) if covered.any() else None
    if planted is not None:
        out["positive_literal_precision"] = positive_literal_precision(ruleset, planted)
    return out


def positive_literal_precision(ruleset: RuleSet, planted: Mapping[str, Sequence[str]]) -> float | None:
    """Share of the rules' positive literals whose concept is planted in the rule's class (None if none)."""
    hits = total = 0
    for r in ruleset.rules:
        for v, positive in r.body:
            if positive:
                total += 1
                hits += ruleset.concepts[v] in set(planted.get(r.head, ()))
    return hits / total if total else None


# ---------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------


def fit_rules(present: np.ndarray, labels: np.ndarray, classes: Sequence[str], names: Sequence[str],
              concepts: Sequence[str], learner: Learner = "ripper", max_literals: int = 3, max_rules: int = 5,
              seed: int = 0) -> RuleSet:
    """Learn each class's rules against the rest and put them in priority order.

    Parameters
    ----------
    present : (n, V) bool facts of the training images; labels : (n,) their labels (true classes,
    or a classifier's predictions for a surrogate).
    """
    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; expected one of {', '.join(LEARNERS)}")
    if max_literals < 1 or max_rules < 1:
        raise ValueError("max_literals and max_rules must be at least 1")
    present = np.asarray(present, dtype=bool)
    labels = np.asarray(labels).astype(str)
    fit = {"ripper": _ripper_bodies, "skope": _skope_bodies, "tree": _tree_bodies}[learner]
    found: list[tuple[int, int, Rule]] = []
    no_pos = []
    for k, cls in enumerate(classes):
        y = labels == cls
        if not y.any():
            no_pos.append(cls)
            continue
        bodies = fit(present, y, max_literals, max_rules, seed) if not y.all() else [()]
        seen: set = set()
        for order, body in enumerate(bodies):
            body = tuple(sorted(set(body), key=lambda lit: (not lit[1], lit[0])))  # positive literals first
            if body in seen or _contradictory(body):
                continue
            seen.add(body)
            support, fires = _count(body, present, y)
            found.append((k, order, Rule(cls, body, support, fires, len(labels))))
    found.sort(key=lambda t: (-t[2].laplace, -t[2].support, len(t[2].body), t[0], t[1]))
    params = {"max_literals": max_literals, "max_rules": max_rules, "seed": seed}
    return RuleSet(tuple(names), tuple(concepts), tuple(classes), tuple(t[2] for t in found), learner,
                   tuple(no_pos), params)


def facts_ceiling(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> float | None:
    """Agreement with ``y_test`` of an unconstrained model on the same facts (L2 logistic regression,
    C = 1): how much of the labels the facts can explain at all, whatever the rule budget."""
    from sklearn.linear_model import LogisticRegression

    y_train = np.asarray(y_train).astype(str)
    if len(np.unique(y_train)) < 2 or train.shape[1] == 0:
        return None
    model = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(train.astype(np.float64), y_train)
    return float((model.predict(test.astype(np.float64)) == np.asarray(y_test).astype(str)).mean())


def _contradictory(body: Body) -> bool:
    return len({v for v, _ in body}) < len(body)


def _tree_bodies(X: np.ndarray, y: np.ndarray, max_literals: int, max_rules: int, seed: int) -> list[Body]:
    from sklearn.tree import DecisionTreeClassifier

    clf = DecisionTreeClassifier(max_depth=max_literals, min_samples_leaf=2, random_state=seed).fit(X, y)
    t = clf.tree_
    pos = list(clf.classes_).index(True)
    leaves: list[tuple[float, Body]] = []
    stack: list[tuple[int, Body]] = [(0, ())]
    while stack:
        node, body = stack.pop()
        if t.children_left[node] == -1:
            frac = t.value[node, 0] / t.value[node, 0].sum()
            if frac.argmax() == pos:
                leaves.append((frac[pos] * t.n_node_samples[node], body))
            continue
        f = int(t.feature[node])
        stack.append((int(t.children_left[node]), body + ((f, False),)))  # X[f] <= 0.5: absent
        stack.append((int(t.children_right[node]), body + ((f, True),)))
    leaves.sort(key=lambda lb: -lb[0])
    return [b for _, b in leaves[:max_rules]]


def _ripper_bodies(X: np.ndarray, y: np.ndarray, max_literals: int, max_rules: int, seed: int) -> list[Body]:
    import pandas as pd
    import wittgenstein as lw

    df = pd.DataFrame(X.astype(np.int64), columns=[f"f{i}" for i in range(X.shape[1])])
    model = lw.RIPPER(max_rules=max_rules, max_rule_conds=max_literals, random_state=seed, verbosity=0)
    with warnings.catch_warnings():  # restores showwarning, which wittgenstein calls directly
        warnings.simplefilter("ignore")
        warnings.showwarning = lambda *a, **k: None
        model.fit(df, y.astype(np.int64), pos_class=1)
    # wittgenstein's max_rule_conds bounds growing, not its optimisation pass: keep the first conditions
    return [tuple((int(c.feature[1:]), bool(int(c.val))) for c in rule.conds[:max_literals])
            for rule in model.ruleset_.rules[:max_rules]]


def _skope_bodies(X: np.ndarray, y: np.ndarray, max_literals: int, max_rules: int, seed: int) -> list[Body]:
    from imodels import SkopeRulesClassifier

    model = SkopeRulesClassifier(max_depth=max_literals, n_estimators=10, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X.astype(np.float64), y.astype(np.int64))
    bodies = []
    for rule in model.rules_[:max_rules]:
        bodies.append(tuple((int(f[2:]), op == ">") for f, op, _ in rule.terms))
    return bodies


# ---------------------------------------------------------------------------------------------
# text and answer-set program
# ---------------------------------------------------------------------------------------------

_RESERVED = frozenset({"image", "rule", "fires", "beaten", "winner", "predict", "covered", "uncovered", "not"})


def asp_names(names: Sequence[str]) -> tuple[str, ...]:
    """ASP-safe, unique predicate names: lower case, ``[a-z0-9_]``, starting with a letter
    (``red-c`` → ``red_c``, ``3d`` → ``c_3d``); clashes get ``_2``, ``_3``, ..."""
    out: list[str] = []
    used = set(_RESERVED)
    for name in names:
        s = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_") or "c"
        if not s[0].isalpha():
            s = "c_" + s
        base, i = s, 2
        while s in used:
            s, i = f"{base}_{i}", i + 1
        used.add(s)
        out.append(s)
    return tuple(out)


def _literal(pred: str, positive: bool) -> str:
    return f"{pred}(X)" if positive else f"not {pred}(X)"


def _clause(ruleset: RuleSet, rule: Rule, preds: Sequence[str], heads: Mapping[str, str]) -> str:
    body = ", ".join(_literal(preds[v], p) for v, p in rule.body) or "image(X)"
    return f"{heads[rule.head]}(X) :- {body}."


def rules_text(ruleset: RuleSet, header: Sequence[str] = ()) -> str:
    """Readable rules, one class at a time, each with its counts (``%`` comments)."""
    preds, heads = asp_names(ruleset.names), dict(zip(ruleset.classes, asp_names(ruleset.classes)))
    lines = [f"% {h}" for h in header]
    lines += ["% An image gets the class of the highest-priority rule that fires on it (#1 first);",
              "% an image on which no rule fires is uncovered.", ""]
    for cls, idx in ruleset.per_class().items():
        lines.append(f"% {cls}: {len(idx)} rule(s)" + (" (no positive training image)" if cls in ruleset.no_positives else ""))
        for i in idx:
            r = ruleset.rules[i]
            lines.append(f"{_clause(ruleset, r, preds, heads)}"
                         f"  % #{i + 1}  support {r.support}, confidence {r.confidence:.2f}, coverage {r.coverage:.3f}")
        lines.append("")
    return "\n".join(lines)


def rules_program(ruleset: RuleSet, header: Sequence[str] = ()) -> str:
    """The rules as an answer-set program: with an image's facts (:func:`facts_program`) its single
    answer set holds ``predict(X, class)`` and ``winner(X, rule)``, or ``uncovered(X)``."""
    preds = asp_names(ruleset.names)
    heads = dict(zip(ruleset.classes, asp_names(ruleset.classes)))
    lines = [f"% {h}" for h in header]
    lines += ["% Run: python -m clingo rules.lp facts.lp  (the clingo package's solver)",
              "% Facts of an image x: image(x). and p(x). for every predicate p that holds in x.",
              "% rule(Id, Class, Priority): the rule with the smallest Priority that fires wins.", ""]
    used = sorted({preds[v] for r in ruleset.rules for v, _ in r.body})
    lines += [f"#defined {p}/1." for p in ["image"] + used]
    for i, r in enumerate(ruleset.rules):
        body = "".join(", " + _literal(preds[v], p) for v, p in r.body)
        lines += ["", f"% {_clause(ruleset, r, preds, heads)}",
                  f"rule(r{i + 1}, {heads[r.head]}, {i + 1}).",
                  f"fires(X, r{i + 1}) :- image(X){body}."]
    lines += ["", "#defined fires/2. #defined rule/3.",
              "beaten(X, R) :- fires(X, R), fires(X, S), rule(R, _, P), rule(S, _, Q), Q < P.",
              "winner(X, R) :- fires(X, R), not beaten(X, R).",
              "predict(X, C) :- winner(X, R), rule(R, C, _).",
              "covered(X) :- fires(X, _).",
              "uncovered(X) :- image(X), not covered(X).",
              "#show predict/2. #show winner/2. #show uncovered/1.", ""]
    return "\n".join(lines)


def _quote(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def facts_program(images: Sequence[str], names: Sequence[str], present: np.ndarray) -> str:
    """``image("x"). red_c("x"). ...`` for each image (row of ``present`` (N, V))."""
    preds = asp_names(names)
    lines = []
    for img, row in zip(images, np.asarray(present, dtype=bool)):
        q = _quote(img)
        lines.append(" ".join([f"image({q})."] + [f"{preds[v]}({q})." for v in np.nonzero(row)[0]]))
    return "\n".join(lines) + "\n"


def solve_program(*programs: str) -> dict[str, tuple[str, str]]:
    """Run clingo on the programs; per image ``(class, winning rule id)``, ``('', '')`` when uncovered.

    Raises ValueError unless there is exactly one answer set (a stratified program has one).
    """
    import clingo

    ctl = clingo.Control(["--models=0", "--warn=none"])
    for p in programs:
        ctl.add("base", [], p)
    ctl.ground([("base", [])])
    models: list[list] = []
    ctl.solve(on_model=lambda m: models.append(list(m.symbols(shown=True))))
    if len(models) != 1:
        raise ValueError(f"expected exactly one answer set, got {len(models)}")
    out: dict[str, list[str]] = {}
    for sym in models[0]:
        img = sym.arguments[0].string
        slot = out.setdefault(img, ["", ""])
        if sym.name == "predict":
            slot[0] = sym.arguments[1].name
        elif sym.name == "winner":
            slot[1] = sym.arguments[1].name
    return {k: (v[0], v[1]) for k, v in out.items()}
