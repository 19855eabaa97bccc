"""Class rules: learners recover planted rules, the priority policy and scores by hand, and clingo on
the answer-set program gives exactly the Python evaluator's predictions."""

import numpy as np
import pytest

from conceptrank.core.rules import (LEARNERS, Rule, RuleSet, asp_names, facts_program, fit_rules, predict,
                                    rules_program, rules_text, score_ruleset, solve_program)

NAMES = ("red-c", "ocean-s", "wheel", "3d", "image")


def _planted(n=400, seed=0):
    """Facts of 5 predicates; class a ⇔ red ∧ ¬ocean, b ⇔ wheel (and not a), else c."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, 5)) < 0.5
    y = np.where(X[:, 0] & ~X[:, 1], "a", np.where(X[:, 2], "b", "c"))
    return X, y


@pytest.mark.parametrize("learner", LEARNERS)
def test_learners_recover_planted_rules(learner):
    X, y = _planted()
    rs = fit_rules(X[:300], y[:300], ("a", "b", "c"), NAMES, NAMES, learner, max_literals=3, max_rules=5)
    s = score_ruleset(rs, X[300:], y[300:], y[300:])
    assert s["accuracy"] >= 0.9 and s["max_rules_per_class"] <= 5
    assert all(len(r.body) <= 3 for r in rs.rules)
    a_rules = [r.body for r in rs.rules if r.head == "a"]
    assert {(0, True), (1, False)} <= set(a_rules[0])  # a's highest-priority rule: red-c, not ocean-s


def test_tree_finds_the_exact_body():
    X, y = _planted()
    rs = fit_rules(X, y, ("a", "b", "c"), NAMES, NAMES, "tree", max_literals=2, max_rules=5)
    assert ((0, True), (1, False)) in [r.body for r in rs.rules if r.head == "a"]
    lap = [r.laplace for r in rs.rules]
    assert lap == sorted(lap, reverse=True)  # the priority order
    top = [r for r in rs.rules if r.body == ((0, True), (1, False))][0]
    assert top.confidence == 1.0 and top.support == int((y == "a").sum())


def test_priority_policy_and_scores_by_hand():
    rules = (Rule("b", ((2, True),), 9, 10, 20), Rule("a", ((0, True), (1, False)), 5, 8, 20))
    rs = RuleSet(NAMES, ("red-c", "ocean-s", "wheel", "", ""), ("a", "b", "c"), rules, "hand")
    present = np.array([[1, 0, 1, 0, 0],   # both fire: rule 1 (b) has priority
                        [1, 0, 0, 0, 0],   # a
                        [0, 0, 0, 0, 0],   # nothing: uncovered
                        [0, 1, 1, 0, 0]], bool)
    labels, winner = predict(rs, present)
    assert labels.tolist() == ["b", "a", "", "b"] and winner.tolist() == [0, 1, -1, 0]
    s = score_ruleset(rs, present, ["a", "a", "c", "b"], ["b", "a", "a", "a"], {"a": ["red-c"], "b": ["ocean-s"]})
    assert s["accuracy"] == 0.5 and s["fidelity"] == 0.5 and s["coverage"] == 0.75
    assert s["accuracy_covered"] == pytest.approx(2 / 3) and s["literals_per_rule"] == 1.5
    assert s["positive_literal_precision"] == 0.5  # red-c for a is planted, wheel for b is not


def test_class_without_positives_is_reported():
    X, y = _planted()
    rs = fit_rules(X, y, ("a", "b", "c", "d"), NAMES, NAMES, "tree")
    assert rs.no_positives == ("d",) and not rs.per_class()["d"]
    assert "% d: 0 rule(s) (no positive training image)" in rules_text(rs)


def test_asp_names_are_safe_and_unique():
    assert asp_names(["red-c", "Red C", "3d", "image", "", "a b"]) == ("red_c", "red_c_2", "c_3d", "image_2", "c", "a_b")


def _random_ruleset(rng, v=5, k=3, r=8):
    rules = []
    for i in range(r):
        lits = rng.choice(v, size=rng.integers(0, 4), replace=False)
        body = tuple(sorted((int(x), bool(rng.random() < 0.6)) for x in lits))
        rules.append(Rule(f"class {i % k}", body, 1, 2, 10))
    return RuleSet(NAMES, NAMES, tuple(f"class {i}" for i in range(k)), tuple(rules), "random")


@pytest.mark.parametrize("seed", range(5))
def test_clingo_agrees_with_the_python_evaluator(seed):
    rng = np.random.default_rng(seed)
    rs = _random_ruleset(rng)
    present = rng.random((60, 5)) < 0.4
    present[0] = False  # an image with no fact at all
    images = [f"img {i}/\"q\".jpg" for i in range(60)]
    solved = solve_program(rules_program(rs), facts_program(images, NAMES, present))
    labels, winner = predict(rs, present)
    heads = dict(zip(asp_names(rs.classes), rs.classes))
    assert len(solved) == 60
    for img, lab, w in zip(images, labels, winner):
        cls, rule = solved[img]
        assert (heads.get(cls, ""), rule) == (lab, f"r{w + 1}" if w >= 0 else "")
