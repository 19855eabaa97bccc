"""Tests of conceptrank.stages.rank: rankings on hand-built inputs, the classifier's protocol, errors, outputs."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from conceptrank.core.ranking import (
    GlobalRanker,
    RankedConcept,
    global_rankings,
    local_rankings,
)
from conceptrank.errors import ConceptrankError
from conceptrank.stages.rank import RankConfig, run_rank

rank_mod = importlib.import_module("conceptrank.core.ranking")  # where GlobalRanker builds its LinearSVC
from conceptrank.io.tally_csv import format_tally

# --------------------------------------------------------------------------------------------
# helpers: tiny hand-made stage outputs
# --------------------------------------------------------------------------------------------

PLANTED_LABELS = ["sky", "grass", "dog", "sky", "tree", "car", "", "road", "water", "person", "cat", "bird"]


def write_tally(path: Path, labels, ious=None, categories=None) -> Path:
    """A NetDissect-Lite tally.csv; ``labels[u]`` is unit u's (0-based) label, '' for none."""
    U = len(labels)
    categories = categories or ["object"] * U
    cats = sorted(set(categories))
    names = [""] + sorted({lab for lab in labels if lab})
    best = np.zeros((U, len(cats)), dtype=int)
    iou = np.zeros((U, len(cats)))
    for u, lab in enumerate(labels):
        if lab:
            c = cats.index(categories[u])
            best[u, c] = names.index(lab)
            iou[u, c] = 0.05 + 0.01 * u if ious is None else ious[u]
    z = np.zeros_like(best)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_tally(cats, best, z, z, z, iou, names), encoding="utf-8")
    return path


def write_activations(folder: Path, mean, classes, splits, images=None, meta=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(classes)
    images = images or [f"{c}/{i:03d}.jpg" for i, c in enumerate(classes)]
    mean = np.asarray(mean, dtype=np.float32)
    np.savez(folder / "activations.npz", mean=mean, max=mean, images=np.array(images),
             classes=np.array(classes), splits=np.array(splits))
    if meta is not None:
        (folder / "extract.json").write_text(json.dumps(meta))
    assert len(splits) == n
    return folder


def planted(n_train=10, n_test=6, classes=("a", "b", "c"), U=12, seed=0, boost=2.0):
    """Class ci's images have unit ci high (+boost) over uniform [0, 0.5) noise."""
    rng = np.random.default_rng(seed)
    cls, spl = [], []
    for c in classes:
        cls += [c] * (n_train + n_test)
        spl += ["train"] * n_train + ["test"] * n_test
    mean = (rng.random((len(cls), U)) * 0.5).astype(np.float32)
    for i, c in enumerate(cls):
        mean[i, classes.index(c)] += boost
    return mean, cls, spl


def make_world(tmp: Path, **kw):
    mean, cls, spl = planted(**kw)
    act = write_activations(tmp / "extract", mean, cls, spl)
    tally = write_tally(tmp / "dissect" / "tally.csv", PLANTED_LABELS[: mean.shape[1]])
    return act, tally, mean, cls, spl


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


FAST = dict(c_grid=(0.01, 1.0), folds=3)

# --------------------------------------------------------------------------------------------
# local rankings (pure)
# --------------------------------------------------------------------------------------------

UC = [("sky", "scene", 0.2), None, ("dog", "object", 0.1), ("sky", "scene", 0.3), ("red", "color", 0.05)]


def test_local_rankings_hand_matrix():
    mean = np.array([
        [0.9, 5.0, 0.1, 0.8, 0.5],   # order: u1(None) u0 u3 u4 u2 → sky(u0), red(u4), dog(u2)
        [0.2, 0.0, 0.7, 0.7, 0.7],   # ties 0.7 go to the lower unit: u2 u3 u4 u0 → dog, sky(u3), red
    ])
    got = local_rankings(mean, UC, k=10)
    assert got[0] == [
        RankedConcept("sky", "scene", 0, 0.9),
        RankedConcept("red", "color", 4, 0.5),
        RankedConcept("dog", "object", 2, pytest.approx(0.1)),
    ]
    assert [(r.concept, r.unit) for r in got[1]] == [("dog", 2), ("sky", 3), ("red", 4)]
    # K cuts after deduplication, in rank order
    assert [r.concept for r in local_rankings(mean, UC, k=2)[0]] == ["sky", "red"]


def test_local_dedup_keeps_rank_order():
    # units 0 and 3 share 'sky'; unit 3 is the most active → 'sky' comes first, from unit 3,
    # and unit 0's later 'sky' is dropped (not moved).
    mean = np.array([[0.6, 0.0, 0.7, 0.9, 0.5]])
    got = local_rankings(mean, UC, k=5)[0]
    assert [(r.concept, r.unit) for r in got] == [("sky", 3), ("dog", 2), ("red", 4)]


def test_local_pool_limits_units_considered():
    # 25 units: units 0..19 all 'sky', unit 20 'dog', 21.. unlabelled; activation decreasing with u
    uc = [("sky", "object", 0.1)] * 20 + [("dog", "object", 0.1)] + [None] * 4
    mean = np.arange(25, 0, -1, dtype=np.float32)[None, :]
    assert [r.concept for r in local_rankings(mean, uc, k=10, pool=20)[0]] == ["sky"]
    assert [r.concept for r in local_rankings(mean, uc, k=10, pool=21)[0]] == ["sky", "dog"]
    assert [r.concept for r in local_rankings(mean, uc, k=10)[0]] == ["sky", "dog"]
    # unlabelled units inside the pool still use up pool places
    uc2 = [None] * 20 + [("dog", "object", 0.1)] * 5
    assert local_rankings(mean, uc2, k=10, pool=20)[0] == []


# --------------------------------------------------------------------------------------------
# global rankings (pure)
# --------------------------------------------------------------------------------------------


def test_global_rankings_hand():
    coef = np.array([
        [0.5, 9.0, 0.7, 0.7, -0.2],   # + : u1 None, u2 dog (tie with u3 → u2 first), u3 sky, u0 sky dup
        [-0.1, 0.0, -0.3, -0.3, 0.4],  # + : red only; - : u2 dog, u3 sky, u0 sky dup
    ])
    pos = global_rankings(coef, UC, g=10)
    assert [(r.concept, r.unit, r.score) for r in pos[0]] == [("dog", 2, 0.7), ("sky", 3, 0.7)]
    assert [(r.concept, r.unit) for r in pos[1]] == [("red", 4)]
    neg = global_rankings(coef, UC, g=10, sign="-")
    assert [(r.concept, r.unit, r.score) for r in neg[0]] == [("red", 4, -0.2)]
    assert [(r.concept, r.unit) for r in neg[1]] == [("dog", 2), ("sky", 3)]
    assert [r.concept for r in global_rankings(coef, UC, g=1)[0]] == ["dog"]


def test_global_pool_gives_fewer_than_g():
    # the 10 largest positive weights all sit on 'sky' units; other concepts follow
    uc = [("sky", "object", 0.1)] * 10 + [("dog", "object", 0.1), ("cat", "object", 0.1)]
    coef = np.array([np.r_[np.linspace(2.0, 1.0, 10), 0.5, 0.4]])
    assert [r.concept for r in global_rankings(coef, uc, g=10, pool=10)[0]] == ["sky"]
    assert [r.concept for r in global_rankings(coef, uc, g=10)[0]] == ["sky", "dog", "cat"]
    # positive weights only, even inside the pool
    coef2 = np.array([[1.0, -1.0] + [0.0] * 10])
    assert [r.unit for r in global_rankings(coef2, uc, g=10, pool=10)[0]] == [0]


# --------------------------------------------------------------------------------------------
# planted features through run_rank
# --------------------------------------------------------------------------------------------


def test_planted_features_top_concepts(tmp_path):
    act, tally, mean, cls, spl = make_world(tmp_path)
    res = run_rank(act, tally, tmp_path / "out", RankConfig(top_local=3, top_global=3, **FAST))
    glob = read_csv(tmp_path / "out" / "global_concepts.csv")
    top = {r["class"]: (r["concept"], r["unit"]) for r in glob if r["sign"] == "+" and r["rank"] == "1"}
    # class a ↔ unit 1 (sky), b ↔ unit 2 (grass), c ↔ unit 3 (dog); units are 1-based in the CSV
    assert top == {"a": ("sky", "1"), "b": ("grass", "2"), "c": ("dog", "3")}
    # the planted unit is also every image's rank-1 local concept
    loc = read_csv(tmp_path / "out" / "local_concepts.csv")
    first = {r["image"]: r["concept"] for r in loc if r["rank"] == "1"}
    assert len(first) == len(cls)
    for i, c in enumerate(cls):
        assert first[f"{c}/{i:03d}.jpg"] == PLANTED_LABELS["abc".index(c)]
    assert res.test_accuracy == 1.0 and res.macro_f1 == 1.0
    assert res.n_units == 12 and res.n_labelled_units == 11 and res.n_concepts == 10
    s = res.summary()
    assert "11/12 units labelled" in s and "10 distinct concepts" in s and "accuracy 1.000" in s


def test_output_files_layout(tmp_path):
    act, tally, mean, cls, spl = make_world(tmp_path)
    run_rank(act, tally, tmp_path / "out", RankConfig(top_local=4, top_global=3, **FAST))
    out = tmp_path / "out"
    loc = read_csv(out / "local_concepts.csv")
    assert list(loc[0]) == ["image", "class", "split", "rank", "concept", "category", "unit", "score"]
    # score is the image's mean activation of that (1-based) unit, exactly
    for r in loc[:40]:
        i = int(r["image"].split("/")[1][:3])
        assert float(r["score"]) == float(mean[i, int(r["unit"]) - 1])
        assert r["class"] == cls[i] and r["split"] == spl[i]
    ranks = [int(r["rank"]) for r in loc if r["image"] == loc[0]["image"]]
    assert ranks == [1, 2, 3, 4]
    glob = read_csv(out / "global_concepts.csv")
    assert list(glob[0]) == ["class", "rank", "concept", "category", "unit", "weight", "sign"]
    z = np.load(out / "svm.npz")
    assert z["coef"].shape == (3, 12) and z["coef"].dtype == np.float64
    assert z["intercept"].shape == (3,) and z["scaler_mean"].shape == (12,) and z["scaler_scale"].shape == (12,)
    assert list(z["classes"]) == ["a", "b", "c"]
    # standardized on train only: scaler_mean is the train mean
    tr = np.array(spl) == "train"
    np.testing.assert_allclose(z["scaler_mean"], mean[tr].astype(np.float64).mean(axis=0))
    for c in "abc":
        for sign in "+-":
            rows = [r for r in glob if r["class"] == c and r["sign"] == sign]
            assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))  # restarts per sign
            assert len(rows) == 3
            w = [float(r["weight"]) for r in rows]
            ci = "abc".index(c)
            for r in rows:  # weights are the coef entries of those units
                assert float(r["weight"]) == z["coef"][ci, int(r["unit"]) - 1]
            assert (all(x > 0 for x in w) and w == sorted(w, reverse=True)) if sign == "+" else (
                all(x < 0 for x in w) and w == sorted(w))
    clf = json.loads((out / "classifier.json").read_text())
    assert clf["classes"] == ["a", "b", "c"] and clf["evaluated_split"] == "test"
    assert clf["n_train"] == 30 and clf["n_test"] == 18
    assert np.array(clf["confusion_matrix"]).tolist() == [[6, 0, 0], [0, 6, 0], [0, 0, 6]]
    assert set(clf["per_class"]) == {"a", "b", "c"}
    meta = json.loads((out / "rank.json").read_text())
    assert meta["top_local"] == 4 and meta["top_global"] == 3 and meta["protocol"] == "standard"
    assert len(meta["fingerprints"]["activations_sha256"]) == 64 and len(meta["fingerprints"]["tally_sha256"]) == 64
    assert "numpy" in meta["packages"]
    imgs = read_csv(out / "images.csv")
    assert len(imgs) == len(cls) and all(r["n_concepts"] == "4" for r in imgs)
    # rankings.json holds exactly what the two CSVs hold
    js = json.loads((out / "rankings.json").read_text())
    for c in "abc":
        for sign, key in (("+", "for"), ("-", "against")):
            rows = [r for r in glob if r["class"] == c and r["sign"] == sign]
            assert [(d["concept"], d["unit"]) for d in js["global"][c][key]] == [(r["concept"], int(r["unit"])) for r in rows]
    first = js["local"][0]
    assert [d["concept"] for d in first["concepts"]] == [r["concept"] for r in loc if r["image"] == first["image"]]


def test_reproducible(tmp_path):
    act, tally, *_ = make_world(tmp_path)
    cfg = RankConfig(**FAST)
    run_rank(act, tally, tmp_path / "o1", cfg)
    run_rank(act, tally, tmp_path / "o2", cfg)
    for name in ("local_concepts.csv", "global_concepts.csv", "classifier.json", "svm.npz", "rank.json", "images.csv"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name


def test_min_iou_and_categories(tmp_path):
    labels = ["sky", "grass", "dog", "tree"]
    ious = [0.5, 0.03, 0.2, 0.1]
    mean, cls, spl = planted(U=4)
    act = write_activations(tmp_path / "ex", mean, cls, spl)
    tally = write_tally(tmp_path / "t" / "tally.csv", labels, ious, categories=["scene", "texture", "object", "object"])
    r = run_rank(act, tally, tmp_path / "o", RankConfig(**FAST))  # default 0.04 drops 'grass'
    assert r.n_labelled_units == 3
    concepts = {row["concept"] for row in read_csv(tmp_path / "o" / "local_concepts.csv")}
    assert concepts == {"sky", "dog", "tree"}
    r = run_rank(act, tally, tmp_path / "o", RankConfig(min_iou=0.15, **FAST))
    assert r.n_labelled_units == 2
    r = run_rank(act, tally, tmp_path / "o", RankConfig(categories=("object",), **FAST))
    assert r.n_labelled_units == 2
    assert {row["category"] for row in read_csv(tmp_path / "o" / "local_concepts.csv")} == {"object"}
    r = run_rank(act, tally, tmp_path / "o", RankConfig(protocol="paper"))  # paper: min IoU 0
    assert r.n_labelled_units == 4


# --------------------------------------------------------------------------------------------
# the classifier
# --------------------------------------------------------------------------------------------


class _SpySVC(rank_mod.LinearSVC):
    calls: list = []

    def fit(self, X, y, sample_weight=None):
        _SpySVC.calls.append((np.array(X), np.array(y), self.C))
        return super().fit(X, y, sample_weight)


@pytest.fixture
def spy(monkeypatch):
    _SpySVC.calls = []
    monkeypatch.setattr(rank_mod, "LinearSVC", _SpySVC)
    return _SpySVC.calls


def test_grid_search_and_stratified_folds(tmp_path, spy):
    act, tally, *_ = make_world(tmp_path, n_train=10, n_test=4)
    grid = (0.001, 0.1, 10.0)
    res = run_rank(act, tally, tmp_path / "o", RankConfig(c_grid=grid, folds=5))
    assert res.best_C in grid and sorted(res.cv_scores) == list(grid)
    best = max(sorted(res.cv_scores), key=lambda C: res.cv_scores[C])  # first max = smallest C on ties
    assert res.best_C == best
    # 3 C × 5 folds + 1 refit; every CV fit has 8 of the 10 train images of every class
    assert len(spy) == 16
    for X, y, C in spy[:15]:
        assert X.shape[0] == 24 and sorted(np.unique(y, return_counts=True)[1].tolist()) == [8, 8, 8]
    X, y, C = spy[-1]
    assert X.shape[0] == 30 and C == res.best_C
    clf = json.loads((tmp_path / "o" / "classifier.json").read_text())
    assert [e["C"] for e in clf["cv_scores"]] == list(grid)
    assert all(len(e["fold_macro_f1"]) == 5 for e in clf["cv_scores"])


def test_grid_search_picks_the_better_C():
    # with C tiny the weights stay ~0 and the balanced hinge solution cannot separate the classes
    # as well as a larger C on this noisy problem — the CV scores must say so and be used
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 6))
    y = np.array(["a", "b", "c"] * 20)
    X[np.arange(60), np.arange(60) % 3] += 1.5
    m = GlobalRanker(c_grid=(1e-6, 1.0), folds=3, seed=0).fit(X, y)
    means = {C: np.mean(s) for C, s in m.cv_scores_.items()}
    assert means[1.0] > means[1e-6]
    assert m.best_C_ == 1.0
    assert m.coef_.shape == (3, 6) and m.intercept_.shape == (3,)
    np.testing.assert_allclose(m.scaler_mean_, X.mean(axis=0))
    # predictions are the argmax of the stored parameters
    dec = ((X - m.scaler_mean_) / m.scaler_scale_) @ m.coef_.T + m.intercept_
    assert (m.predict(X) == m.classes_[dec.argmax(axis=1)]).all()


def test_test_split_untouched_during_selection(tmp_path, spy):
    mean, cls, spl = planted(n_train=10, n_test=6)
    act = write_activations(tmp_path / "ex", mean, cls, spl)
    tally = write_tally(tmp_path / "t" / "tally.csv", PLANTED_LABELS)
    cfg = RankConfig(c_grid=(0.001, 0.1, 10.0), folds=5)
    r1 = run_rank(act, tally, tmp_path / "o1", cfg)
    corrupt = mean.copy()
    te = np.array(spl) == "test"
    corrupt[te] = np.random.default_rng(9).normal(size=corrupt[te].shape) * 1e6
    act2 = write_activations(tmp_path / "ex2", corrupt, cls, spl)
    r2 = run_rank(act2, tally, tmp_path / "o2", cfg)
    assert r1.best_C == r2.best_C and r1.cv_scores == r2.cv_scores
    z1, z2 = np.load(tmp_path / "o1" / "svm.npz"), np.load(tmp_path / "o2" / "svm.npz")
    for k in ("coef", "intercept", "scaler_mean", "scaler_scale"):
        np.testing.assert_array_equal(z1[k], z2[k])
    assert all(X.shape[0] <= 30 for X, _, _ in spy)  # never more than the 30 train images
    assert r2.test_accuracy < 1.0 == r1.test_accuracy  # the corrupted test split was scored


def test_split_fallback_when_all(tmp_path):
    mean, cls, _ = planted(n_train=10, n_test=0)
    act = write_activations(tmp_path / "ex", mean, cls, ["all"] * len(cls))
    tally = write_tally(tmp_path / "t" / "tally.csv", PLANTED_LABELS)
    res = run_rank(act, tally, tmp_path / "o", RankConfig(folds=2, c_grid=(0.1,)))
    clf = json.loads((tmp_path / "o" / "classifier.json").read_text())
    assert clf["split_fallback"] is True and clf["n_train"] == 15 and clf["n_test"] == 15
    assert res.evaluated_split == "test (50/50 fallback)"
    imgs = read_csv(tmp_path / "o" / "images.csv")
    for c in "abc":  # stratified: 5 + 5 per class
        assert sum(r["class"] == c and r["split"] == "test" for r in imgs) == 5


def test_paper_protocol(tmp_path, spy):
    # U = 40: units 0..19 'sky' and the most active in every image; 20..39 distinct concepts;
    # class ci lifts unit 20 + ci
    rng = np.random.default_rng(3)
    U = 40
    cls = [c for c in "abc" for _ in range(10)]
    rng.shuffle(cls)
    cls = list(cls)
    mean = rng.random((30, U)).astype(np.float32) * 0.5
    mean[:, :20] += np.linspace(3.0, 2.0, 20, dtype=np.float32)
    for i, c in enumerate(cls):
        mean[i, 20 + "abc".index(c)] += 1.0
    labels = ["sky"] * 20 + [f"c{u}" for u in range(20, U)]
    act = write_activations(tmp_path / "ex", mean, cls, ["all"] * 30)
    tally = write_tally(tmp_path / "t" / "tally.csv", labels, ious=[0.01] * U)  # low IoU: paper keeps
    res = run_rank(act, tally, tmp_path / "o", RankConfig(protocol="paper", top_local=10, top_global=10))
    assert res.best_C == 0.001 and res.n_labelled_units == U and res.evaluated_split == "paper best fold"
    # top-20 local pool: only 'sky' ever gets in, though K = 10
    loc = read_csv(tmp_path / "o" / "local_concepts.csv")
    assert {r["concept"] for r in loc} == {"sky"} and len(loc) == 30
    # 5 KFold fits: unshuffled contiguous folds over the seeded image order (standing in for
    # os.listdir's), on unscaled features; no refit
    assert len(spy) == 5 and all(C == 0.001 for _, _, C in spy)
    perm = np.random.default_rng(0).permutation(30)
    for f, (X, y, _) in enumerate(spy):
        keep = perm[np.setdiff1d(np.arange(30), np.arange(6 * f, 6 * f + 6))]
        np.testing.assert_array_equal(X, mean[keep].astype(np.float64))
    z = np.load(tmp_path / "o" / "svm.npz")
    np.testing.assert_array_equal(z["scaler_mean"], np.zeros(U))
    np.testing.assert_array_equal(z["scaler_scale"], np.ones(U))

    # global: from the top 10 positive weights only, deduplicated (independent re-computation)
    def dedup(units):
        out = []
        for u in units:
            if labels[u] not in out:
                out.append(labels[u])
        return out[:10]

    glob = read_csv(tmp_path / "o" / "global_concepts.csv")
    differs = 0
    for ci, c in enumerate(z["classes"]):
        w = z["coef"][ci]
        positive = [u for u in sorted(range(U), key=lambda u: (-w[u], u)) if w[u] > 0]
        got = [r["concept"] for r in glob if r["class"] == c and r["sign"] == "+"]
        assert got == dedup(positive[:10])
        assert labels[20 + ci] in got  # the planted unit's concept
        differs += got != dedup(positive)
    assert differs > 0  # the pool matters here: some list is shorter than G because 'sky' repeats
    clf = json.loads((tmp_path / "o" / "classifier.json").read_text())
    assert clf["best_fold"] in range(5) and clf["n_test"] == 6 and clf["standardized"] is False
    assert len(clf["cv_scores"]) == 1 and len(clf["cv_scores"][0]["fold_macro_f1"]) == 5
    fold_f1 = clf["cv_scores"][0]["fold_macro_f1"]
    assert clf["best_fold"] == int(np.argmax(fold_f1))  # first best fold


def test_paper_grid(tmp_path, spy):
    act, tally, *_ = make_world(tmp_path)
    res = run_rank(act, tally, tmp_path / "o", RankConfig(protocol="paper", grid=True, c_grid=(0.01, 1.0)))
    assert sorted(res.cv_scores) == [0.01, 1.0] and res.best_C in (0.01, 1.0)
    assert len(spy) == 10  # 2 C × 5 folds, no refit


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_error_class_with_fewer_images_than_folds(tmp_path):
    mean, cls, spl = planted(n_train=10, n_test=3)
    # keep only 3 train images of class 'b'
    drop = [i for i, (c, s) in enumerate(zip(cls, spl)) if c == "b" and s == "train"][3:]
    keep = [i for i in range(len(cls)) if i not in drop]
    act = write_activations(tmp_path / "ex", mean[keep], [cls[i] for i in keep], [spl[i] for i in keep])
    tally = write_tally(tmp_path / "t" / "tally.csv", PLANTED_LABELS)
    with pytest.raises(ConceptrankError, match=r"'b' has 3") as e:
        run_rank(act, tally, tmp_path / "o", RankConfig(folds=5))
    assert "5 CV folds" in str(e.value)


def test_error_tally_width(tmp_path):
    act, *_ = make_world(tmp_path)
    tally = write_tally(tmp_path / "t2" / "tally.csv", PLANTED_LABELS[:10])
    with pytest.raises(ConceptrankError, match=r"10 units.*12 units wide"):
        run_rank(act, tally, tmp_path / "o", RankConfig(**FAST))


def test_error_layer_and_model_mismatch(tmp_path):
    mean, cls, spl = planted()
    act = write_activations(tmp_path / "ex", mean, cls, spl,
                            meta={"layer": "layer4", "fingerprints": {"model": "m1", "layer": "l", "dataset": "d"}})
    tally = write_tally(tmp_path / "dis" / "tally.csv", PLANTED_LABELS)
    dj = tmp_path / "dis" / "dissect.json"
    dj.write_text(json.dumps({"layer": "layer3", "fingerprints": {"model": "m1"}}))
    with pytest.raises(ConceptrankError, match=r"layer mismatch.*'layer4'.*'layer3'"):
        run_rank(act, tally, tmp_path / "o", RankConfig(**FAST))
    dj.write_text(json.dumps({"layer": "layer4", "fingerprints": {"model": "m2"}}))
    with pytest.raises(ConceptrankError, match=r"model mismatch.*m1.*m2"):
        run_rank(act, tally, tmp_path / "o", RankConfig(**FAST))
    dj.write_text(json.dumps({"layer": "layer4", "fingerprints": {"model": "m1"}}))
    run_rank(act / "activations.npz", tally, tmp_path / "o", RankConfig(**FAST))  # the .npz path works too
    meta = json.loads((tmp_path / "o" / "rank.json").read_text())
    assert meta["fingerprints"]["dissect"] == {"model": "m1"} and meta["layer"] == "layer4"


def test_error_no_labelled_units_and_bad_splits(tmp_path):
    mean, cls, spl = planted()
    act = write_activations(tmp_path / "ex", mean, cls, spl)
    tally = write_tally(tmp_path / "t" / "tally.csv", PLANTED_LABELS, ious=[0.01] * 12)
    with pytest.raises(ConceptrankError, match="no unit .* has a concept"):
        run_rank(act, tally, tmp_path / "o", RankConfig(**FAST))
    act2 = write_activations(tmp_path / "ex2", mean, cls, ["train"] * len(cls))
    tally2 = write_tally(tmp_path / "t2" / "tally.csv", PLANTED_LABELS)
    with pytest.raises(ConceptrankError, match="no 'test' images"):
        run_rank(act2, tally2, tmp_path / "o", RankConfig(**FAST))
    with pytest.raises(ConceptrankError, match="unknown protocol"):
        run_rank(act2, tally2, tmp_path / "o", RankConfig(protocol="nope"))
    with pytest.raises(ConceptrankError, match="not found"):
        run_rank(tmp_path / "missing", tally2, tmp_path / "o", RankConfig())


def test_rank_concepts_in_memory_is_what_run_rank_writes(tmp_path):
    from conceptrank.io.activations import Activations
    from conceptrank.io.rankings import read_ranked_lists
    from conceptrank.io.svm import load_svm
    from conceptrank.io.tally_csv import read_tally
    from conceptrank.stages.rank import rank_concepts

    mean, cls, spl = planted()
    act = Activations(None, mean, np.array([f"{c}/{i:03d}.jpg" for i, c in enumerate(cls)]), np.array(cls),
                      np.array(spl))
    tally = write_tally(tmp_path / "tally.csv", PLANTED_LABELS)
    cfg = RankConfig(top_local=3, top_global=3, **FAST)
    res = rank_concepts(act, read_tally(tally), cfg)
    assert res.out is None and not res.reused and len(res.local) == len(cls) and res.classes == ("a", "b", "c")
    assert [rc.concept for rc in res.global_for[0]][:1] == ["sky"]  # class a lifts unit 0 (sky)
    written = run_rank(write_activations(tmp_path / "ex", mean, cls, spl), tally, tmp_path / "r", cfg)
    lists = read_ranked_lists(tmp_path / "r")
    assert lists.local == res.local == written.local
    assert tuple(lists.global_for[c] for c in res.classes) == res.global_for
    assert np.array_equal(load_svm(tmp_path / "r").coef, res.svm.coef)
    reused = run_rank(tmp_path / "ex", tally, tmp_path / "r", cfg)
    assert reused.reused and reused.local == res.local and reused.global_against == res.global_against
    assert reused.metrics == res.metrics and np.array_equal(reused.svm.train_mean, res.svm.train_mean)
