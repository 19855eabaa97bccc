"""ConceptNet relation semantics and the region geometry that grounds relations (known answers)."""

from __future__ import annotations

import numpy as np

from conceptrank.core.relations import (
    Relation,
    canonical_relation,
    coverage,
    degree_matched_chance,
    degree_pools,
    entailed,
    fit_scores,
    grounding_kind,
    is_negative,
    is_symmetric,
    oriented,
    pair_geometry,
    precision_recall,
    support_table,
)


def test_semantics():
    assert canonical_relation("/r/PartOf") == "PartOf"
    assert canonical_relation("mw:MayHaveProperty") == "MayHaveProperty"
    assert canonical_relation("/r/dbpedia/genre") == "dbpedia/genre"
    assert entailed("PartOf") == ("PartOf", "AtLocation", "LocatedNear", "RelatedTo")
    assert entailed("MadeOf") == ("MadeOf", "HasA", "LocatedNear", "RelatedTo")
    assert entailed("Antonym") == ("Antonym",)
    assert is_symmetric("Antonym") and is_symmetric("LocatedNear") and not is_symmetric("PartOf")
    assert all(is_negative(r) for r in ("NotHasProperty", "Antonym", "DistinctFrom")) and not is_negative("HasA")
    assert grounding_kind("PartOf") == "contained" and grounding_kind("MadeOf") == "overlap"
    assert grounding_kind("AtLocation") == "near" and grounding_kind("NotHasProperty") is None
    assert oriented("sky", "RelatedTo", "blue") == Relation("blue", "RelatedTo", "sky")
    assert oriented("sky", "AtLocation", "blue") == Relation("sky", "AtLocation", "blue")


def _masks():
    """One 10×10 image: whole (rows 0-5), part inside it (rows 1-2, cols 1-2), a far blob, an adjacent one."""
    m = np.zeros((1, 4, 10, 10), bool)
    m[0, 0, 0:6, 0:6] = True      # whole, 36 px
    m[0, 1, 1:3, 1:3] = True      # part, 4 px, inside
    m[0, 2, 8:10, 8:10] = True    # far, 4 px
    m[0, 3, 0:6, 7:9] = True      # adjacent to whole (one empty column between), 12 px
    return m


def test_geometry_against_brute_force():
    m = _masks()
    g = pair_geometry(m, radius=2)
    for a in range(4):
        assert g.area[0, a] == m[0, a].sum()
        for b in range(4):
            assert g.inter[0, a, b] == (m[0, a] & m[0, b]).sum()
    assert g.near[0, 0, 3] and not g.near[0, 0, 2] and not g.near[0, 1, 3]
    s = fit_scores(g, [1, 0, 0, 1], [0, 1, 3, 2], ["contained", "contained", "near", "overlap"])
    np.testing.assert_allclose(s[0], [1.0, 4 / 36, 1.0, 0.0])
    empty = np.zeros((1, 2, 4, 4), bool)
    empty[0, 0, :2] = True
    assert np.isnan(fit_scores(pair_geometry(empty), [0], [1], ["overlap"])).all()


def test_support_table_counts_fitting_images():
    m = np.concatenate([_masks(), _masks(), np.zeros((1, 4, 10, 10), bool)])
    m[1, 1] = False
    m[1, 1, 5:7, 5:7] = True  # the part sticks out of the whole by 3 of its 4 pixels in image 1
    sup = support_table(pair_geometry(m, radius=2), np.arange(3), min_fit=0.5)
    assert sup["contained"][1, 0] == 1 / 3
    assert sup["near"][0, 3] == 2 / 3 and sup["near"][0, 2] == 0


def test_precision_recall_coverage():
    t = {Relation("a", "PartOf", "b"), Relation("c", "HasA", "d")}
    f = {Relation("a", "PartOf", "b"), Relation("x", "IsA", "y"), Relation("c", "HasA", "e")}
    assert precision_recall(f, t) == (1 / 3, 1 / 2)
    assert np.isnan(precision_recall(set(), t)[0])
    assert coverage(f, t) == 1 / 3


def test_degree_pools_and_chance():
    deg = {"a": 1, "b": 1, "c": 1, "d": 5, "e": 2}
    pools = degree_pools(deg)
    assert pools["a"] == ("a", "b", "c")
    assert "d" in pools["d"] and len(pools["d"]) == 3
    truth = {Relation("a", "PartOf", "b")}
    cands = [Relation("a", "PartOf", "b")]
    p, r = degree_matched_chance(cands, pools, lambda rel: True, truth, 3000, np.random.default_rng(0))
    # head uniform over {a,b,c}, tail over the other two: P(a, b) = 1/3 · 1/2
    assert abs(p - 1 / 6) < 0.03 and abs(r - 1 / 6) < 0.03
