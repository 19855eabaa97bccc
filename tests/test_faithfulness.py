"""Tests of the numbers beyond the paper's metric: chance baselines, bootstrap, ranking measures,
ground truth, decision decomposition, deletion test and stability — each on data whose answer is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conceptrank.core.baselines import (
    bootstrap_agreement,
    class_overlap_means,
    encode_rankings,
    frequency_test,
    overlap_matrix,
    p_value,
    permutation_test,
    weighted_sample_sets,
)
from conceptrank.core.evaluation import agreement, chance_scores
from conceptrank.core.faithfulness import (
    concept_contributions,
    deletion_test,
    fit_linear_svm,
    fold_stability,
    mean_pairwise_jaccard,
    seed_stability,
    top_concept_sets,
)
from conceptrank.core.groundtruth import (
    Truth,
    global_truth_scores,
    local_truth_precision,
    oracle_precision,
    random_global_scores,
    random_local_precision,
)
from conceptrank.core.ranking import global_rankings, unit_concept_table
from conceptrank.core.rankmetrics import aggregate_local, jaccard_at, ndcg_at, rbo
from conceptrank.io.activations import load_activations
from conceptrank.io.svm import load_svm
from conceptrank.io.tally_csv import format_tally, read_tally
from conceptrank.stages.evaluate import EvaluateConfig, run_evaluate
from conceptrank.stages.explain import explain_vector
from conceptrank.stages.rank import RankConfig, run_rank

# --------------------------------------------------------------------------------------------
# hand-made rankings: a planted world and null worlds
# --------------------------------------------------------------------------------------------

N_CLASSES, PER_CLASS, VOCAB, K, G = 8, 15, 40, 5, 3


def rankings(seed: int, planted: bool):
    """Class c's global list is concepts 3c..3c+2. Planted: every image's local list holds one of
    its class's concepts (plus random others); null: local lists are random, class-blind."""
    rng = np.random.default_rng(seed)
    concepts = [f"k{v}" for v in range(VOCAB)]
    glob = {f"C{c}": [concepts[3 * c + j] for j in range(G)] for c in range(N_CLASSES)}
    local, image_class = {}, {}
    for c in range(N_CLASSES):
        for i in range(PER_CLASS):
            img = f"C{c}_{i}.jpg"
            image_class[img] = f"C{c}"
            if planted:
                own = concepts[3 * c + rng.integers(G)]
                pool = [x for x in concepts if x not in glob[f"C{c}"]]
                others = list(rng.choice(pool, K - 1, replace=False))
                pos = rng.integers(K)
                local[img] = others[:pos] + [own] + others[pos:]
            else:
                local[img] = list(rng.choice(concepts, K, replace=False))
    classes = [f"C{c}" for c in range(N_CLASSES)]
    return encode_rankings(local, image_class, glob, classes, concepts), local, image_class, glob


def test_overlap_matrix_matches_formula_2():
    enc, local, image_class, glob = rankings(0, planted=False)
    for k, g in ((1, 1), (3, 2), (5, 3)):
        M = class_overlap_means(overlap_matrix(enc, k, g), enc.y, enc.n_classes)
        expect = agreement(local, image_class, glob, k, g)
        assert np.allclose(np.diag(M), [expect[c] for c in enc.classes])


def test_p_value_formula():
    assert p_value(np.array([0.1, 0.5, 0.5, 0.9]), 0.5) == pytest.approx(4 / 5)
    assert p_value(np.array([0.1, 0.2]), 0.9) == pytest.approx(1 / 3)


def test_permutation_planted_is_significant():
    enc, *_ = rankings(0, planted=True)
    M = class_overlap_means(overlap_matrix(enc, K, G), enc.y, enc.n_classes)
    res = permutation_test(M, 1000, 0)
    assert res.observed_overall == 1.0
    assert res.p_overall <= 3 / 1001  # only (near-)identity permutations reach 1.0
    assert res.lift_overall > 2
    # per class the permutation null only takes the C values of row c: p ≥ roughly 1/C
    assert np.all(res.p >= 1 / 1001) and np.all(res.p < 0.5)
    again = permutation_test(M, 1000, 0)
    assert np.array_equal(again.null_overall, res.null_overall)  # seeded


def test_permutation_null_is_not_significant():
    ps = []
    for seed in range(20):
        enc, *_ = rankings(seed, planted=False)
        M = class_overlap_means(overlap_matrix(enc, K, G), enc.y, enc.n_classes)
        res = permutation_test(M, 1000, seed)
        ps.append(res.p_overall)
        assert 0.5 < res.lift_overall < 1.6
    ps = np.array(ps)
    # p-values under the null are roughly uniform: few small ones, mean near 1/2
    assert np.mean(ps < 0.05) <= 0.2 and 0.25 < ps.mean() < 0.8


def test_permutation_degenerate_null_is_one():
    # every image has the same local list → every permutation scores exactly the observed mean
    enc, _, image_class, glob = rankings(0, planted=False)
    same = {i: ["k0", "k4", "k7", "k30", "k31"] for i in image_class}
    enc = encode_rankings(same, image_class, glob, enc.classes, enc.concepts)
    M = class_overlap_means(overlap_matrix(enc, K, G), enc.y, enc.n_classes)
    res = permutation_test(M, 500, 1)
    assert res.p_overall == 1.0 and res.lift_overall == pytest.approx(1.0)


def test_frequency_baseline_planted_vs_null():
    w = np.ones(VOCAB)
    enc, *_ = rankings(1, planted=True)
    res = frequency_test(enc, K, G, w, 1000, 0)
    assert res.p_overall <= 2 / 1001 and res.lift_overall > 1.5
    # chance overlap of 5 random vs 3 random concepts of 40: 1 − C(37,5)/C(40,5)
    chance = 1 - math.comb(VOCAB - G, K) / math.comb(VOCAB, K)
    assert res.null_overall_mean == pytest.approx(chance, abs=0.02)
    ps = []
    for seed in range(20):
        enc, *_ = rankings(seed, planted=False)
        ps.append(frequency_test(enc, K, G, w, 1000, seed).p_overall)
    ps = np.array(ps)
    assert np.mean(ps < 0.05) <= 0.2 and 0.25 < ps.mean() < 0.8


def test_weighted_sample_sets():
    w = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
    one = weighted_sample_sets(w, 1, 20000, 0)
    assert np.all(one.sum(axis=1) == 1)
    assert np.allclose(one.mean(axis=0), w / w.sum(), atol=0.015)
    two = weighted_sample_sets(w, 2, 5000, 1)
    assert np.all(two.sum(axis=1) == 2) and not two[:, 3].any()
    # sequential sampling: P(first = 4) = 0.4, then P(second = 0 | first = 4) = 1/6, ...
    p0 = sum(w[a] / 10 * w[0] / (10 - w[a]) for a in (1, 2, 4)) + w[0] / 10
    assert two[:, 0].mean() == pytest.approx(p0, abs=0.02)
    assert np.all(weighted_sample_sets(w, 10, 3, 2) == (w > 0))


def test_bootstrap_contains_estimate():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 30)
    hits = rng.random(150) < np.repeat([0.2, 0.5, 0.8, 1.0, 0.0], 30)
    res = bootstrap_agreement(hits, y, 5, 1000, rng=1)
    assert np.all(res.low <= res.estimate) and np.all(res.estimate <= res.high)
    assert res.low_overall <= res.estimate_overall <= res.high_overall
    assert res.low[3] == res.high[3] == 1.0 and res.low[4] == res.high[4] == 0.0  # no variation
    assert res.high[1] - res.low[1] > 0.2  # a 50 % class over 30 images: ± ~0.18
    # more images → narrower
    y2 = np.repeat(np.arange(5), 300)
    hits2 = rng.random(1500) < 0.5
    wide = bootstrap_agreement(hits[:30], np.zeros(30, int), 1, 500, rng=2)
    narrow = bootstrap_agreement(hits2[y2 == 0], np.zeros(300, int), 1, 500, rng=2)
    assert narrow.high[0] - narrow.low[0] < wide.high[0] - wide.low[0]


def test_chance_scores_all_configs():
    rng = np.random.default_rng(0)
    concepts = [f"k{v}" for v in range(60)]
    local = {f"i{i}": list(rng.choice(concepts, 10, replace=False)) for i in range(800)}
    image_class = {f"i{i}": f"C{i % 10}" for i in range(800)}
    glob = {f"C{c}": list(rng.choice(concepts, 10, replace=False)) for c in range(10)}
    enc = encode_rankings(local, image_class, glob, [f"C{c}" for c in range(10)], concepts)
    base, boot, per = chance_scores(enc, [(5, 1), (5, 5), (5, 10), (10, 10)], np.ones(60), 1000, 1000, 1000, 0)
    assert set(base) == {"5L-1G", "5L-5G", "5L-10G", "10L-10G"}
    for name, b in base.items():
        assert boot[name]["low"] <= b["observed"] <= boot[name]["high"]
        assert b["permutation_lift"] == pytest.approx(b["observed"] / b["permutation_mean"])


# --------------------------------------------------------------------------------------------
# ranking measures, hand-computed
# --------------------------------------------------------------------------------------------


def test_jaccard_hand():
    assert jaccard_at(["a", "b", "c"], ["b", "c", "d"], 3) == 0.5
    assert jaccard_at(["a", "b", "c"], ["b", "c", "d"], 1) == 0.0
    assert jaccard_at(["a", "b"], ["b", "a", "x"], 2) == 1.0
    assert math.isnan(jaccard_at([], [], 3))


def test_ndcg_hand():
    # reference a, b, c → relevance 3, 2, 1
    dcg = 2 / math.log2(2) + 3 / math.log2(3) + 0
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(["b", "a", "x"], ["a", "b", "c"], 3) == pytest.approx(dcg / idcg)
    assert ndcg_at(["a", "b", "c"], ["a", "b", "c"], 3) == pytest.approx(1.0)
    assert ndcg_at(["x", "y"], ["a", "b"], 2) == 0.0
    assert ndcg_at(["a"], ["a", "b"], 1) == 1.0
    assert math.isnan(ndcg_at(["a"], [], 2))


def test_rbo_hand():
    # X1 = 0, X2 = 2, X3 = 2: RBO_ext = 2/3·p³ + (1−p)/p·(0·p + 2/2·p² + 2/3·p³)
    p = 0.9
    expect = 2 / 3 * p**3 + (1 - p) / p * (p**2 + 2 / 3 * p**3)
    assert rbo(["a", "b", "c"], ["b", "a", "d"], p) == pytest.approx(expect)
    assert expect == pytest.approx(0.63)
    assert rbo(["a", "b", "c"], ["a", "b", "c"], p) == pytest.approx(1.0)
    assert rbo(["a", "b"], ["c", "d"], p) == 0.0
    assert rbo(["a", "b", "c", "z"], ["b", "a", "d", "y"], p, depth=3) == pytest.approx(expect)  # truncation
    assert rbo([], ["a"], p) == 0.0


def test_aggregate_local_hand():
    lists = [["a", "b", "c"], ["b", "a"], ["c", "b"]]
    # top-2 counts: a 2 (positions 1, 2), b 3, c 1
    assert aggregate_local(lists, 2) == ["b", "a", "c"]
    # ties in count broken by mean position, then name
    assert aggregate_local([["x", "y"], ["y", "x"], ["z"]], 2) == ["x", "y", "z"]


# --------------------------------------------------------------------------------------------
# ground truth, hand-made
# --------------------------------------------------------------------------------------------

CATS = {"red": "color", "blue": "color", "circle": "object", "square": "object", "rim": "part", "sky-s": "scene"}
TRUTH = Truth(
    classes={"A": ("red", "circle"), "B": ("blue", "square")},
    images={"a1.jpg": frozenset({"red", "circle", "rim"}), "b1.jpg": frozenset({"blue", "rim"})},
    categories=CATS,
)


def test_planted_categories():
    assert TRUTH.planted_categories == {"color", "object"}


def test_global_truth_hand():
    glob = {"A": ["rim", "red", "square"], "B": ["blue", "square", "red"], "Z": ["red"]}
    s = global_truth_scores(glob, TRUTH.classes, 2)
    assert s["A"] == {"precision": 0.5, "recall": 0.5, "n": 2}
    assert s["B"] == {"precision": 1.0, "recall": 1.0, "n": 2}
    assert "Z" not in s  # no planted concepts
    r = global_truth_scores(glob, TRUTH.classes, 2, CATS, TRUTH.planted_categories)
    assert r["A"] == {"precision": 0.5, "recall": 0.5, "n": 2}  # rim dropped → red, square
    assert global_truth_scores(glob, TRUTH.classes, 1, CATS, TRUTH.planted_categories)["A"]["precision"] == 1.0
    assert global_truth_scores(glob, TRUTH.classes, None)["B"]["precision"] == 1.0  # R-precision, |T| = 2


def test_local_truth_hand():
    local = {"JPEGImages/a1.jpg": ["rim", "red", "sky-s"], "JPEGImages/b1.jpg": ["red", "blue"], "x/zz.jpg": ["red"]}
    a = local_truth_precision(local, TRUTH.images, 2)
    assert a == {"JPEGImages/a1.jpg": 1.0, "JPEGImages/b1.jpg": 0.5}  # matched by file name; zz skipped
    r = local_truth_precision(local, TRUTH.images, 2, CATS, TRUTH.planted_categories)
    assert r == {"JPEGImages/a1.jpg": 1.0, "JPEGImages/b1.jpg": 0.5}  # a1 → [red]
    assert local_truth_precision(local, TRUTH.images, 3)["JPEGImages/a1.jpg"] == pytest.approx(2 / 3)
    assert oracle_precision({"red", "circle", "rim"}, {"red", "blue", "rim"}, 2) == 1.0
    assert oracle_precision({"red", "circle", "rim"}, {"red", "blue", "rim"}, 3) == pytest.approx(2 / 3)


def test_random_truth_baselines():
    vocab = list(CATS)
    g = random_global_scores(vocab, np.ones(6), TRUTH.classes, {"A": 2, "B": 3}, 4000, 0)
    assert g["A"]["precision"] == pytest.approx(2 / 6, abs=0.03)  # |T ∩ V| / |V|
    assert g["B"]["recall"] == pytest.approx(3 / 6, abs=0.03)  # E|D ∩ T| / |T| = 3·2/6 / 2
    loc = random_local_precision(vocab, np.ones(6), TRUTH.images, {"q/a1.jpg": 2, "b1.jpg": 1}, 4000, 1)
    assert loc["q/a1.jpg"] == pytest.approx(3 / 6, abs=0.03) and loc["b1.jpg"] == pytest.approx(2 / 6, abs=0.03)
    # zero weight is never drawn
    w = np.array([0, 0, 1, 1, 0, 0.0])  # only circle, square
    assert random_global_scores(vocab, w, TRUTH.classes, {"A": 1}, 500, 0)["A"]["precision"] == pytest.approx(0.5, abs=0.1)


# --------------------------------------------------------------------------------------------
# decision decomposition, deletion and stability on planted activations
# --------------------------------------------------------------------------------------------

UNITS, CLS, N_TR, N_TE = 24, 4, 40, 40


def planted_activations(seed=0, strength=3.0):
    """Unit c (c < CLS) fires for class c; the rest is noise. Returns train/test X, y (class ids)."""
    rng = np.random.default_rng(seed)
    def make(n):
        y = np.repeat(np.arange(CLS), n)
        X = rng.random((len(y), UNITS))
        X[np.arange(len(y)), y] += strength
        return X, y
    return make(N_TR), make(N_TE)


def unit_concepts_distinct(n_unlabelled=4):
    """Every unit its own concept, except the last ``n_unlabelled`` units."""
    return [(f"u{u}", "object", 0.1) if u < UNITS - n_unlabelled else None for u in range(UNITS)]


def test_deletion_planted_ratio_above_one():
    (Xtr, ytr), (Xte, yte) = planted_activations(0)
    classes = [str(c) for c in range(CLS)]
    svm = fit_linear_svm(Xtr, np.array(classes)[ytr], 1.0, classes)
    uc = unit_concepts_distinct()
    top = [[rc.unit for rc in lst] for lst in global_rankings(svm.coef, uc, 1)]
    assert top == [[c] for c in range(CLS)]  # the planted units are the top global concepts
    labelled = np.flatnonzero(unit_concept_table(uc)[0] >= 0)
    res = deletion_test(svm.standardize(Xte), yte, svm.coef, svm.intercept, top, labelled, 20, 0)
    assert res.ratio_overall > 3 and np.all(res.ratio > 1)
    assert np.all(res.recall_before > 0.9)
    assert res.recall_drop_top.mean() > res.recall_drop_random.mean()
    # the score drop equals the removed contributions, by linearity
    c0 = yte == 0
    z = svm.standardize(Xte)[c0]
    assert res.drop_top[0] == pytest.approx(np.mean(z[:, 0] * svm.coef[0, 0]))


def test_deletion_null_ratio_near_one():
    # every labelled unit equally informative (exchangeable) and "top" units picked blind to the weights
    rng = np.random.default_rng(5)
    classes = [str(c) for c in range(CLS)]
    means = rng.normal(size=(CLS, UNITS))
    ratios = []
    for seed in range(10):
        r = np.random.default_rng(seed)
        ytr = np.repeat(np.arange(CLS), 60)
        yte = np.repeat(np.arange(CLS), 60)
        Xtr = means[ytr] + r.normal(size=(len(ytr), UNITS))
        Xte = means[yte] + r.normal(size=(len(yte), UNITS))
        svm = fit_linear_svm(Xtr, np.array(classes)[ytr], 0.1, classes)
        labelled = np.arange(UNITS)
        top = [list(r.choice(UNITS, 3, replace=False)) for _ in range(CLS)]
        res = deletion_test(svm.standardize(Xte), yte, svm.coef, svm.intercept, top, labelled, 40, seed)
        ratios.append(res.ratio_overall)
    assert 0.7 < np.mean(ratios) < 1.3


def test_mean_pairwise_jaccard_hand():
    runs = [[frozenset("ab"), frozenset()], [frozenset("ac"), frozenset()], [frozenset("ab"), frozenset()]]
    out = mean_pairwise_jaccard(runs)
    assert out[0] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3) and out[1] == 1.0
    assert np.isnan(mean_pairwise_jaccard(runs[:1])).all()


def test_stability_planted():
    (Xtr, ytr), _ = planted_activations(1, strength=4.0)
    classes = [str(c) for c in range(CLS)]
    y = np.array(classes)[ytr]
    uc = unit_concepts_distinct()
    folds = fold_stability(Xtr, y, classes, 1.0, [1, 3], uc, folds=5, seed=0)
    assert np.all(folds[1] == 1.0)  # the planted unit is always the top-1 concept
    assert np.all((folds[3] > 0) & (folds[3] <= 1))
    seeds, chosen = seed_stability(Xtr, y, [1], uc, "standard", (0, 1), c_grid=(0.1, 1.0), folds=3)
    assert np.all(seeds[1] == 1.0) and set(chosen) == {0, 1}
    sets = top_concept_sets(fit_linear_svm(Xtr, y, 1.0, classes).coef, uc, 1)
    assert sets == [frozenset({f"u{c}"}) for c in range(CLS)]


# --------------------------------------------------------------------------------------------
# through rank's real outputs: exact decomposition and run_evaluate's extra scores
# --------------------------------------------------------------------------------------------

LABELS = ["red", "blue", "circle", "square", "rim", "", "sky-s", "red", "", "blue", "circle", "square"]


def tiny_run(tmp: Path, seed=0, noise=0.6):
    """3 classes × (10 train + 6 test), 12 units; class c lifts unit c (red, blue, circle)."""
    rng = np.random.default_rng(seed)
    cls, spl = [], []
    for c in ("A", "B", "C"):
        cls += [c] * 16
        spl += ["train"] * 10 + ["test"] * 6
    mean = (rng.random((48, 12)) * noise).astype(np.float32)
    for i, c in enumerate(cls):
        mean[i, "ABC".index(c)] += 1.0
    ex = tmp / "extract"
    ex.mkdir(parents=True)
    images = np.array([f"JPEGImages/{c}_{i:03d}.jpg" for i, c in enumerate(cls)])
    np.savez(ex / "activations.npz", mean=mean, max=mean, images=images, classes=np.array(cls), splits=np.array(spl))
    names = [""] + sorted({x for x in LABELS if x})
    best = np.array([[names.index(x)] for x in LABELS])
    iou = np.array([[0.05 + 0.01 * u if x else 0.0] for u, x in enumerate(LABELS)])
    z = np.zeros_like(best)
    (tmp / "dissect").mkdir()
    (tmp / "dissect" / "tally.csv").write_text(format_tally(["object"], best, z, z, z, iou, names))
    truth = {
        "classes": {"A": ["red", "dotted"], "B": ["blue"], "C": ["circle", "sky-s"]},
        "images": {Path(im).name: ({"A": ["red"], "B": ["blue", "rim"], "C": ["circle"]}[c])
                   for im, c in zip(images, cls)},
        "categories": {"red": "color", "blue": "color", "circle": "object", "square": "object", "rim": "part",
                       "sky-s": "scene", "dotted": "material"},
    }
    (tmp / "truth.json").write_text(json.dumps(truth))
    return ex, tmp / "dissect" / "tally.csv"


@pytest.mark.parametrize("protocol", ["standard", "paper"])
def test_contributions_sum_exactly(tmp_path, protocol):
    ex, tally = tiny_run(tmp_path)
    out = tmp_path / "rank"
    run_rank(ex, tally, out, RankConfig(protocol=protocol, top_local=5, top_global=5, c_grid=(0.1, 1.0), folds=3))
    act = load_activations(ex)
    svm = load_svm(out)
    with np.load(out / "svm.npz") as z:
        X = act.mean.astype(np.float64)
        decision = ((X - z["scaler_mean"]) / z["scaler_scale"]) @ z["coef"].T + z["intercept"]
    rk = json.loads((out / "rank.json").read_text())
    uc = read_tally(tally).concepts(rk["min_iou"])
    ids, names = unit_concept_table(uc)
    con = concept_contributions(X, svm, ids, names)
    assert np.max(np.abs(con.total() - decision)) < 1e-9
    assert np.array_equal(con.decision.argmax(1), decision.argmax(1))
    # one image: the explanation's parts add up to its predicted class's score
    for i in (0, 20, 47):
        e = explain_vector(X[i], svm, uc)
        p = svm.classes.index(e.predicted)
        assert abs(e.total - decision[i, p]) < 1e-9 and e.predicted == svm.classes[int(decision[i].argmax())]
        assert e.margin >= 0 and abs(e.margin - (decision[i, p] - np.sort(decision[i])[-2])) < 1e-12
        assert abs(sum(e.margin_contributions.values()) + e.margin_remainder + e.margin_bias - e.margin) < 1e-9
        assert all(c.contribution > 0 for c in e.for_) and all(c.contribution < 0 for c in e.against)


def test_run_evaluate_extra_scores(tmp_path):
    ex, tally = tiny_run(tmp_path)
    out = tmp_path / "rank"
    run_rank(ex, tally, out, RankConfig(top_local=5, top_global=5, c_grid=(0.1, 1.0), folds=3))
    cfg = EvaluateConfig(configs="1:1,5:5", truth=tmp_path / "truth.json", n_perm=200, n_draw=200, n_boot=200,
                         stability_seeds=(0, 1), n_jobs=1)
    res = run_evaluate(out, None, cfg)
    s = json.loads((out / "summary.json").read_text())
    d = json.loads((out / "evaluation.json").read_text())
    assert s["agreement"]["1L-1G"]["mean"] == 1.0  # class c's top unit is its own concept
    b = s["baselines"]["1L-1G"]
    assert b["observed"] == 1.0 and b["permutation_lift"] > 1.5
    assert s["baselines"]["frequency_source"] == "labelled units per concept"
    assert s["bootstrap"]["1L-1G"]["low"] <= 1.0 <= s["bootstrap"]["1L-1G"]["high"]
    assert s["ranking_agreement"]["1L-1G"] == {"jaccard": 1.0, "ndcg": 1.0, "rbo": 1.0}
    gt = s["ground_truth"]
    assert gt["planted_categories"] == ["color", "material", "object", "scene"]
    assert gt["global"]["G=1"]["precision"] == 1.0  # red, blue, circle
    assert gt["global"]["G=1"]["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert gt["local"]["K=1"]["precision"] == 1.0
    assert s["deletion"]["G=1"]["ratio"] > 1
    assert s["stability"]["folds"]["G=1"] == 1.0 and s["stability"]["seeds"]["G=1"] == 1.0
    assert set(d["chance"]["1L-1G"]) == {"A", "B", "C"} and "deletion" in d
    table = res.table()
    for word in ("lift", "95% CI", "deletion ratio", "stab folds", "ground truth", "R-precision"):
        assert word in table
    # numbers are reproducible with the seed
    again = run_evaluate(out, tmp_path / "again", cfg)
    assert again.summary["baselines"] == res.summary["baselines"]


def test_run_evaluate_without_inputs_skips(tmp_path):
    ex, tally = tiny_run(tmp_path)
    out = tmp_path / "rank"
    run_rank(ex, tally, out, RankConfig(top_local=5, top_global=5, c_grid=(1.0,), folds=3))
    (ex / "activations.npz").rename(ex / "moved.npz")
    res = run_evaluate(out, None, EvaluateConfig(configs="1:1", n_perm=50, n_draw=50, n_boot=50))
    assert "skipped" in res.summary["deletion"] and "baselines" in res.summary
    assert "deletion skipped" in res.table()
