"""Concept facts: the share above the dissection threshold against a full upsampling, hand-made
unit labels, and NeSyFOLD's α·mean + γ·std threshold by hand."""

import numpy as np
import pytest
import torch

from conceptrank.core.facts import concept_facts, map_stats, nesyfold_facts
from conceptrank.core.upsample import upsample_bilinear


def test_map_stats_matches_full_upsampling():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 7, 4, 4, generator=g)
    thr = np.quantile(maps.numpy(), 0.9, axis=(0, 2, 3))  # some maps pass, some never do
    thr[3] = 10.0  # a unit that never fires
    s = map_stats(maps, thr, (16, 16))
    up = upsample_bilinear(maps.reshape(35, 4, 4), (16, 16)).reshape(5, 7, 16, 16)
    brute = (up > torch.tensor(thr, dtype=torch.float32)[None, :, None, None]).float().mean((2, 3)).numpy()
    np.testing.assert_array_equal(s.share, brute)
    assert (s.share[:, 3] == 0).all() and (s.share > 0).any()
    np.testing.assert_allclose(s.l2, np.sqrt((maps.numpy().astype(np.float64) ** 2).sum((2, 3))))


def test_concept_facts_any_unit_of_the_concept():
    share = np.array([[0.0, 0.3, 0.0, 0.5],
                      [0.02, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.9, 0.0]])
    f = concept_facts(share, ["a", "a", "b", None], min_share=0.01)
    assert f.names == ("a", "b") and f.units == ((0, 1), (2,))
    np.testing.assert_array_equal(f.present, [[True, False], [True, False], [False, True]])
    f = concept_facts(share, ["a", "a", "b", None], min_share=0.05)
    np.testing.assert_array_equal(f.present, [[True, False], [False, False], [False, True]])
    np.testing.assert_array_equal(f.empty_images, [False, True, False])
    with pytest.raises(ValueError):
        concept_facts(share, ["a", "a", "b", None], min_share=1.0)


def test_nesyfold_threshold_by_hand():
    l2 = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0], [100.0, 0.0]])
    train = np.array([True, True, True, False])
    f = nesyfold_facts(l2, train, ["red-c", None])
    theta0 = 0.6 * 2.0 + 0.7 * np.std([1.0, 3.0, 2.0])  # 1.2 + 0.7·0.8165 = 1.7715
    assert f.names == ("red-c_u1", "u2") and f.concepts == ("red-c", "")
    np.testing.assert_array_equal(f.present[:, 0], l2[:, 0] >= theta0)
    np.testing.assert_array_equal(f.present[:, 1], [True, True, True, False])  # θ = 0.6·5 + 0 = 3
    with pytest.raises(ValueError):
        nesyfold_facts(l2, np.zeros(4, bool), ["a", None])


def test_truth_facts_and_the_ceiling():
    from conceptrank.core.facts import truth_facts
    from conceptrank.core.rules import facts_ceiling

    f = truth_facts([frozenset({"b", "a"}), frozenset(), frozenset({"c"})])
    assert f.names == ("a", "b", "c") and f.method == "truth"
    np.testing.assert_array_equal(f.present, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    X = np.eye(3, dtype=bool).repeat(10, axis=0)
    y = np.array(["x", "y", "z"]).repeat(10)
    assert facts_ceiling(X, y, X, y) == 1.0
    assert facts_ceiling(X, np.full(30, "x"), X, y) is None  # one class: nothing to fit
