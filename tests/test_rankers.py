"""Concept rankers (core/rankers.py): planted unit banks where the right concepts are known."""

from __future__ import annotations

import numpy as np
import pytest

from conceptrank.core.rankers import (
    RANKERS,
    ProbeActivations,
    UnitBank,
    _best_unit,
    decompose_weights,
    fit_concept_vectors,
    make_ranker,
    ranked_lists,
)
from conceptrank.core.ranking import GlobalRanker, global_rankings, local_rankings
from conceptrank.errors import ConceptrankError

# units 0,1: red · 2,3: circle · 4: sky · 5: loud (a unit with a large scale, nearly always on) · 6: none
CONCEPTS = ("red", "circle", "sky", "loud")
UNIT_CONCEPT = (0, 0, 1, 1, 2, 3, -1)
BANK = UnitBank(
    tuple(None if c < 0 else (CONCEPTS[c], "object" if c == 1 else "color", 0.2 - 0.02 * u)
          for u, c in enumerate(UNIT_CONCEPT)),
    thresholds=np.array([1.0, 1.0, 1.0, 1.0, 1.0, 10.5, 1.0]),
)


def _activations(present: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, U) mean and max activations: a unit fires where its concept is; 'loud' is on everywhere."""
    N = present.shape[0]
    mean = np.zeros((N, len(UNIT_CONCEPT)))
    for u, c in enumerate(UNIT_CONCEPT):
        if c < 0:
            mean[:, u] = 0.3 + 0.1 * rng.random(N)
        elif CONCEPTS[c] == "loud":
            mean[:, u] = 5.0 + 0.3 * present[:, c] + 0.2 * rng.random(N)
        else:
            mean[:, u] = 0.8 * present[:, c] + 0.1 * rng.random(N)
    return mean, 2.0 * mean


def _class_presence(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class A: red, B: circle, C: sky, each always present in its class and at random (0.2) elsewhere;
    loud at random (0.5) everywhere."""
    y = np.array(["A"] * n + ["B"] * n + ["C"] * n)
    present = rng.random((3 * n, 4)) < np.array([0.2, 0.2, 0.2, 0.5])
    for c in range(3):
        present[c * n:(c + 1) * n, c] = True
    return present, y


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    present, y = _class_presence(30, rng)
    mean, mx = _activations(present, rng)
    probe_present = rng.random((200, 4)) < 0.5
    pm, px = _activations(probe_present, rng)
    probe = ProbeActivations(pm, px, probe_present, CONCEPTS)
    svm = GlobalRanker("standard", C=1.0, folds=2).fit(mean, y)
    return {"mean": mean, "max": mx, "y": y, "present": present, "probe": probe, "svm": svm}


def _fit(name, d):
    return make_ranker(name).fit(d["mean"], d["y"], BANK, X_max=d["max"], probe=d["probe"], svm=d["svm"])


@pytest.mark.parametrize("name", RANKERS)
def test_global_top_concept_is_the_planted_one(planted, name):
    r = _fit(name, planted)
    tops = {c: lst[0].concept for c, lst in zip(r.classes_, r.global_(3))}
    assert tops == {"A": "red", "B": "circle", "C": "sky"}


@pytest.mark.parametrize("name", ["presence", "net2vec"])
def test_local_presence_rankers_find_what_is_in_the_image(planted, name):
    r = _fit(name, planted)
    local = r.local(planted["mean"], planted["max"], k=2)
    two = np.flatnonzero(planted["present"].sum(axis=1) == 2)
    assert two.size > 5
    for i in two:
        assert {rc.concept for rc in local[i]} == {CONCEPTS[c] for c in np.flatnonzero(planted["present"][i])}


@pytest.mark.parametrize("name", ["paper", "aggregate"])
def test_raw_mean_rankers_fall_for_the_loud_unit(planted, name):
    r = _fit(name, planted)
    assert {lst[0].concept for lst in r.local(planted["mean"], planted["max"], k=1)} == {"loud"}


@pytest.mark.parametrize("name", ["contribution", "ibd", "tcav"])
def test_decision_rankers_name_the_evidence_of_the_predicted_class(planted, name):
    r = _fit(name, planted)
    only = np.flatnonzero(planted["present"][:, :3].sum(axis=1) == 1)  # one class concept: no doubt
    assert only.size > 10
    local = r.local(planted["mean"][only], planted["max"][only], k=1)
    want = np.array(CONCEPTS)[np.argmax(planted["present"][only, :3], axis=1)]
    assert [lst[0].concept for lst in local] == want.tolist()


def test_paper_ranker_is_the_core_functions_unchanged(planted):
    r = make_ranker("paper", local_pool=3, global_pool=4).fit(planted["mean"], planted["y"], BANK, svm=planted["svm"])
    uc = list(BANK.unit_concepts)
    assert r.local(planted["mean"], k=2) == local_rankings(planted["mean"], uc, 2, 3)
    for sign in "+-":
        assert r.global_(2, sign) == global_rankings(planted["svm"].coef_, uc, 2, 4, sign)


def test_reported_unit_is_the_concepts_best_unit(planted):
    r = _fit("presence", planted)
    i = int(np.flatnonzero(planted["present"][:, 0])[0])
    red = next(rc for rc in r.local(planted["mean"], planted["max"], k=4)[i] if rc.concept == "red")
    assert red.unit == int(np.argmax(planted["max"][i, :2]))


def test_best_unit_hand_matrix():
    ids = np.array([1, 0, 1, -1, 0])
    T = np.array([[3.0, 1.0, 5.0, 9.0, 1.0],
                  [2.0, 4.0, 2.0, 0.0, 0.0]])
    assert _best_unit(T, ids, 3).tolist() == [[1, 2, -1], [1, 0, -1]]  # ties → lower unit; concept 2 has none


def test_ranked_lists_signs_and_ties():
    S = np.array([[0.5, -1.0, 0.5, 2.0]])
    units = np.arange(4)[None, :]
    names, cats = ["a", "b", "c", "d"], ["x"] * 4
    assert [rc.concept for rc in ranked_lists(S, units, names, cats, 3)[0]] == ["d", "a", "c"]
    assert [rc.concept for rc in ranked_lists(S, units, names, cats, 9, "+")[0]] == ["d", "a", "c"]
    assert [rc.concept for rc in ranked_lists(S, units, names, cats, 9, "-")[0]] == ["b"]


def test_ibd_decomposition_solved_by_hand():
    Q = np.eye(4)[:3]  # orthonormal concept vectors e1, e2, e3
    W = np.array([[2.0, -1.0, 0.5, 0.0]])
    S, R = decompose_weights(W, Q)
    np.testing.assert_allclose(S, [[2.0, 0.0, 0.5]], atol=1e-12)  # −e2 cannot be used (s ≥ 0)
    np.testing.assert_allclose(R, [[0.0, -1.0, 0.0, 0.0]], atol=1e-12)
    q2 = np.array([1.0, 1.0]) / np.sqrt(2)
    S, R = decompose_weights(np.array([[1.0, 1.0]]), np.array([[1.0, 0.0], q2]))
    np.testing.assert_allclose(S, [[0.0, np.sqrt(2)]], atol=1e-9)
    np.testing.assert_allclose(R, 0.0, atol=1e-9)


def test_ibd_ranker_recovers_a_planted_weight_vector():
    rng = np.random.default_rng(1)
    present = rng.random((300, 4)) < 0.5
    pm, px = _activations(present, rng)
    probe = ProbeActivations(pm, px, present, CONCEPTS)
    present_t, y = _class_presence(40, rng)
    mean, _ = _activations(present_t, rng)
    r = make_ranker("ibd").fit(mean, y, BANK, probe=probe, svm=GlobalRanker("standard", C=1.0, folds=2).fit(mean, y))
    s = dict(zip(r.classes_, r.coefficients_))
    assert [int(np.argmax(s[c])) for c in "ABC"] == [0, 1, 2]
    np.testing.assert_allclose(r.coefficients_ @ r.concept_vectors_ + r.residual_, r.svm_.coef_, atol=1e-12)
    assert np.all(r.coefficients_ >= 0)


def test_concept_vectors_separate_present_from_absent():
    rng = np.random.default_rng(2)
    F = rng.normal(size=(200, 3))
    Y = np.stack([F[:, 0] > 0, F[:, 2] < 0, np.zeros(200, bool)], axis=1)
    coef, icpt = fit_concept_vectors(F, Y, C=10.0)
    assert np.argmax(coef[0]) == 0 and np.argmin(coef[1]) == 2
    assert np.all(coef[2] == 0) and icpt[2] < -5  # never present: prevalence only


def test_concept_vectors_are_fitted_once_per_probe(planted):
    probe = ProbeActivations(planted["probe"].mean, planted["probe"].max, planted["probe"].present, CONCEPTS)
    a = make_ranker("ibd").fit(planted["mean"], planted["y"], BANK, probe=probe, svm=planted["svm"])
    b = make_ranker("tcav").fit(planted["mean"], planted["y"], BANK, probe=probe, svm=planted["svm"])
    np.testing.assert_array_equal(a.concept_vectors_, b.concept_vectors_)
    assert len(probe._fits) == 1


def test_missing_inputs_are_named(planted):
    with pytest.raises(ConceptrankError, match="maxima"):
        make_ranker("presence").fit(planted["mean"], planted["y"], BANK)
    with pytest.raises(ConceptrankError, match="thresholds"):
        make_ranker("presence").fit(planted["mean"], planted["y"], UnitBank(BANK.unit_concepts), X_max=planted["max"])
    with pytest.raises(ConceptrankError, match="probe"):
        make_ranker("net2vec").fit(planted["mean"], planted["y"], BANK, X_max=planted["max"])
    with pytest.raises(ConceptrankError, match="unknown ranker"):
        make_ranker("magic")
    with pytest.raises(ConceptrankError, match="know no concept"):
        ProbeActivations(planted["probe"].mean, planted["probe"].max, planted["probe"].present[:, :2],
                         ("red", "circle")).columns(["sky"])


# --------------------------------------------------------------------------------------------
# choosing a ranker, and the probe activations it learns from
# --------------------------------------------------------------------------------------------


def test_resolve_ranker_defaults_and_fallback():
    from conceptrank.core.rankers import DEFAULT_RANKER, resolve_ranker

    assert resolve_ranker("paper", None, ()) == ("paper", None)
    assert resolve_ranker("standard", None, ("max", "thresholds", "probe")) == (DEFAULT_RANKER, None)
    name, note = resolve_ranker("standard", None, ("max",))
    assert name == "paper" and DEFAULT_RANKER in note and "probe" in note
    assert resolve_ranker("standard", "presence", ()) == ("presence", None)  # asked for: its fit names what is missing
    with pytest.raises(ConceptrankError, match="unknown ranker"):
        resolve_ranker("standard", "nope", ())


def test_rank_lists_matches_the_ranker(planted):
    from conceptrank.core.rankers import rank_lists

    r, local, pos, neg = rank_lists("net2vec", planted["mean"], planted["y"], planted["mean"][:5], BANK, planted["svm"],
                                    k=2, g=3, max_fit=planted["max"], max_all=planted["max"][:5], probe=planted["probe"])
    assert local == r.local(planted["mean"][:5], planted["max"][:5], k=2) and len(local) == 5
    assert pos == r.global_(3, "+") and neg == r.global_(3, "-")
    assert all(rc.score > 0 for lst in pos for rc in lst) and all(rc.score < 0 for lst in neg for rc in lst)


def test_probe_activations_of_a_planted_probe(tmp_path):
    from broden_fixture import make_planted_probe, planted_model

    from conceptrank.stages.probe import load_probe_activations, run_probe_activations

    root = make_planted_probe(tmp_path / "probe", n=6)
    path = run_probe_activations(planted_model(), "units", root, tmp_path / "out")
    pa = load_probe_activations(path)
    names = list(pa.concepts)
    assert pa.mean.shape == (6, 6) and pa.max.shape == (6, 6)
    for obj in ("redthing", "greenthing", "bluething", "yellowthing", "bg"):
        assert pa.present[:, names.index(obj)].all()
    assert pa.present[:, names.index("street-s")].tolist() == [True, False] * 3
    assert pa.present[:, names.index("park-s")].tolist() == [False, True] * 3
    assert not pa.present[:, 0].any() and not pa.present[:, 6].any()  # label 0 and the unused number 6
    assert np.all(pa.max[:, :4] > 0.9)  # every image holds every colour square: the detectors fire
    before = path.stat().st_mtime_ns
    assert run_probe_activations(planted_model(), "units", root, tmp_path / "out") == path
    assert path.stat().st_mtime_ns == before  # same model, layer and probe set: reused
    from conceptrank.stages.probe import stored_fingerprints

    assert stored_fingerprints(path)["model"] == "planted-fingerprint" and stored_fingerprints(path)["layer"] == "units"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConceptrankError, match="cannot read"):
        load_probe_activations(tmp_path / "bad.npz")
