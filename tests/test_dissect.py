import csv
import json

import numpy as np
import pytest
import torch
from broden_fixture import make_planted_probe, planted_model

from conceptrank.core.stats import TopKQuantile
from conceptrank.errors import ConceptrankError
from conceptrank.io.broden import BrodenDataset, BrodenError, encode_mask
from conceptrank.io.tally_csv import read_tally
from conceptrank.nn.hooks import UnknownLayerError
from conceptrank.core.tally import TallyAccumulator, float32_floor, label_category_matrix
from conceptrank.stages.dissect import DissectConfig, dissect_layers, run_dissect
from conceptrank.testing.reference import naive_tally

CFG = DissectConfig(workers=0, batch_size=8, progress=False)


# -- streaming quantile ---------------------------------------------------------------------------
@pytest.mark.parametrize("q", [0.005, 0.01, 0.2])
def test_topk_quantile_equals_numpy(q):
    rng = np.random.default_rng(1)
    U, N, hw = 5, 37, 49
    data = rng.standard_normal((N, U, hw)).astype(np.float32)
    data[:, 0] = np.round(data[:, 0])  # many ties
    acc = TopKQuantile(U, N * hw, q)
    for i in range(0, N, 6):
        acc.add(torch.from_numpy(data[i:i + 6]).permute(1, 0, 2).reshape(U, -1))
    got = acc.result()
    want = np.quantile(data.transpose(1, 0, 2).reshape(U, -1).astype(np.float64), 1 - q, axis=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_topk_merge_and_state_dict():
    rng = np.random.default_rng(2)
    vals = torch.from_numpy(rng.standard_normal((3, 1000)).astype(np.float32))
    a, b = TopKQuantile(3, 1000, 0.01), TopKQuantile(3, 1000, 0.01)
    a.add(vals[:, :400])
    b.add(vals[:, 400:])
    a = TopKQuantile.from_state_dict(a.state_dict())
    a.merge(b)
    np.testing.assert_allclose(a.result(), np.quantile(vals.double().numpy(), 0.99, axis=1), atol=1e-12)


def test_topk_refuses_incomplete():
    acc = TopKQuantile(2, 100, 0.005)
    acc.add(torch.zeros(2, 50))
    with pytest.raises(ValueError, match="50 of 100"):
        acc.result()


def test_float32_floor_is_exact_comparison():
    rng = np.random.default_rng(3)
    t = rng.standard_normal(1000)
    x = t.astype(np.float32)  # values right at the rounded threshold
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))]).reshape(3, -1)
    f = float32_floor(t)
    assert ((x > f[None, :]) == (x.astype(np.float64) > t[None, :])).all()


# -- vectorized tally vs. the naive reference ----------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorized_tally_equals_naive(seed):
    rng = np.random.default_rng(seed)
    N, U, h, w, sh, sw, L, C = 7, 6, 4, 5, 11, 13, 9, 3
    feats = rng.standard_normal((N, U, h, w)).astype(np.float32)
    thr = np.quantile(feats.transpose(1, 0, 2, 3).reshape(U, -1), 0.8, axis=1)
    primary = rng.integers(0, C, size=L)
    primary[0] = C - 1
    label_cat = label_category_matrix(primary, C)
    planes, scalars = [], []
    for i in range(N):
        p = rng.integers(0, 3)
        pl = rng.integers(0, 6, size=(p, sh, sw)) * (rng.random((p, sh, sw)) < 0.5)
        planes.append(pl.astype(np.int32))
        scalars.append(list(rng.choice([6, 7, 8], size=rng.integers(0, 3), replace=False)))
    acc = TallyAccumulator(thr, label_cat)
    for i in range(0, N, 3):
        acc.add(torch.from_numpy(feats[i:i + 3]), [torch.from_numpy(p) for p in planes[i:i + 3]], scalars[i:i + 3])
    truth, both, act = naive_tally(feats, thr, planes, scalars, label_cat)
    np.testing.assert_array_equal(acc.truth.numpy(), truth)
    np.testing.assert_array_equal(acc.intersect.numpy(), both)
    np.testing.assert_array_equal(acc.activation.numpy(), act)


# -- planted detectors ----------------------------------------------------------------------------
def test_planted_detectors_are_found(tmp_path):
    probe = make_planted_probe(tmp_path / "probe")
    ds = BrodenDataset(probe)
    # Each colour fills exactly 4 of the 64 feature cells of every image (M = 64N values per unit,
    # 4N of them ~1, the rest ~0). This quantile puts the interpolated threshold halfway between
    # (~0.5), where the bilinear upsampling of a 2x2 block crosses exactly at the square's border.
    n = len(ds)
    cfg = DissectConfig(workers=0, batch_size=8, progress=False, quantile=(4 * n - 0.5) / (64 * n - 1))
    (res,) = run_dissect(planted_model(), None, ["units"], ds, tmp_path / "out", cfg)
    names = ["redthing", "greenthing", "bluething", "yellowthing"]
    for u, name in enumerate(names):
        label, cat, iou = res.unit_label(u)
        assert (label, cat) == (name, "object")
        assert iou > 0.95
    assert res.score[4:].max() < 0.04  # noise units are not detectors
    tally = read_tally(tmp_path / "out" / "tally.csv")
    assert tally.label[:4] == tuple(names)
    assert (tmp_path / "out" / "thresholds.npy").exists()
    meta = json.loads((tmp_path / "out" / "dissect.json").read_text())
    assert meta["counts"]["detectors"] == 4
    assert set(meta["timings"]) >= {"forward", "threshold", "tally", "total"}
    assert not (tmp_path / "out" / ".features").exists()  # the feature cache is deleted


def test_tally_layout_and_sorting(tmp_path):
    probe = make_planted_probe(tmp_path / "probe")
    run_dissect(planted_model(), None, ["units"], BrodenDataset(probe), tmp_path / "out", CFG)
    with open(tmp_path / "out" / "tally.csv", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert header[:4] == ["unit", "category", "label", "score"]
    expect = []
    for c in ["color", "object", "part", "scene"]:  # category.csv order
        expect += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    assert header[4:] == expect
    scores = [float(r[3]) for r in rows[1:]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(int(r[0]) for r in rows[1:]) == list(range(1, 7))


def test_tally_matches_naive_on_probe(tmp_path):
    """End to end: dissect's counts equal the naive reference over the same features."""
    probe = make_planted_probe(tmp_path / "probe", n=10)
    ds = BrodenDataset(probe)
    model = planted_model()
    (res,) = run_dissect(model, None, ["units"], ds, tmp_path / "out", CFG)
    x = torch.stack([model.to_tensor(ds.load_image(i), (32, 32)) for i in range(len(ds))])
    with torch.no_grad():
        feats = model.module(x).numpy()
    planes = [ds.load_planes(i) for i in range(len(ds))]
    scalars = [list(r.scalars) for r in ds.records]
    truth, both, act = naive_tally(feats, res.thresholds, planes, scalars, label_category_matrix(ds.primary, 4))
    iou = both / (act @ label_category_matrix(ds.primary, 4).T + truth[None, :] - both + 1e-10)
    np.testing.assert_allclose(res.iou, iou, atol=1e-12)


def test_thresholds_file_is_reused(tmp_path):
    probe = make_planted_probe(tmp_path / "probe")
    ds = BrodenDataset(probe)
    (a,) = run_dissect(planted_model(), None, ["units"], ds, tmp_path / "a", CFG)
    thr = np.load(tmp_path / "a" / "thresholds.npy") * 0 + 0.5
    (b,) = run_dissect(planted_model(), None, ["units"], ds, tmp_path / "b", CFG, thresholds={"units": thr})
    np.testing.assert_array_equal(b.thresholds, thr)
    assert not np.array_equal(a.iou, b.iou)
    with pytest.raises(ConceptrankError, match="6 units"):
        run_dissect(planted_model(), None, ["units"], ds, tmp_path / "c", CFG, thresholds={"units": thr[:3]})


def test_several_layers_get_their_own_outputs(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=8)
    res = run_dissect(planted_model(), None, ["units", "pool"], BrodenDataset(probe), tmp_path / "out", CFG)
    assert [r.layer for r in res] == ["units", "pool"]
    assert (tmp_path / "out" / "units" / "tally.csv").exists()
    assert (tmp_path / "out" / "pool" / "tally.csv").exists()
    # 'pool' has 4 units (the detectors before the noise is appended): different thresholds
    assert len(res[1].thresholds) == 4 and len(res[0].thresholds) == 6
    meta = json.loads((tmp_path / "out" / "pool" / "dissect.json").read_text())
    assert meta["layer"] == "pool"


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_layer_lists_valid(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=4)
    with pytest.raises(UnknownLayerError, match="Valid layers: units, pool"):
        run_dissect(planted_model(), None, ["unitz"], BrodenDataset(probe), tmp_path / "out", CFG)


def test_nan_activations_fail_fast(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=4)
    model = planted_model()
    model.module.noise[1, 0, 0, 0] = float("nan")
    with pytest.raises(ConceptrankError, match="NaN/inf.*img001"):
        run_dissect(model, None, ["units"], BrodenDataset(probe), tmp_path / "out", CFG)


def test_missing_mask_names_file(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=4)
    (probe / "images" / "sub" / "img002_object.png").unlink()
    with pytest.raises(BrodenError, match="img002_object.png"):
        run_dissect(planted_model(), None, ["units"], BrodenDataset(probe), tmp_path / "out", CFG)


def test_mask_size_mismatch(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=4)
    encode_mask(np.zeros((8, 8), int)).save(probe / "images" / "sub" / "img001_part_1.png")
    with pytest.raises(BrodenError, match=r"img001_part_1.png.*8x8.*16x16"):
        BrodenDataset(probe).load_planes(1)


def test_mask_label_absent_from_label_csv(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=4)
    encode_mask(np.full((16, 16), 6)).save(probe / "images" / "sub" / "img000_part_1.png")  # 6 is a gap
    with pytest.raises(BrodenError, match=r"img000_part_1.png.*\[6\] absent from label.csv"):
        BrodenDataset(probe).load_planes(0)


def test_unknown_category(tmp_path):
    probe = make_planted_probe(tmp_path / "probe", n=4)
    with pytest.raises(BrodenError, match="unknown category.*'texture'"):
        BrodenDataset(probe, ["object", "texture"])


def test_label_stability_between_quantiles(tmp_path):
    probe = make_planted_probe(tmp_path / "probe")
    n = 24
    q = (4 * n - 0.5) / (64 * n - 1)  # see test_planted_detectors_are_found
    cfg = DissectConfig(workers=0, batch_size=8, progress=False, quantile=q, stability_quantile=0.08)
    (res,) = run_dissect(planted_model(), None, ["units"], BrodenDataset(probe), tmp_path / "out", cfg)
    st = json.loads((tmp_path / "out" / "dissect.json").read_text())["label_stability"]
    assert st["other_quantile"] == 0.08 and st["detectors"] == 4
    assert st["same_label_detectors"] == 1.0  # the colour detectors keep their colour
    # the thresholds at the base quantile are unchanged by also computing the other one
    (plain,) = run_dissect(planted_model(), None, ["units"], BrodenDataset(probe), tmp_path / "o2",
                       DissectConfig(workers=0, batch_size=8, progress=False, quantile=q))
    np.testing.assert_array_equal(res.thresholds, plain.thresholds)


def test_topk_other_quantile():
    rng = np.random.default_rng(4)
    vals = rng.standard_normal((2, 5000)).astype(np.float32)
    acc = TopKQuantile(2, 5000, 0.01)
    acc.add(torch.from_numpy(vals))
    np.testing.assert_allclose(acc.result(0.005), np.quantile(vals.astype(np.float64), 0.995, axis=1), atol=1e-12)
    with pytest.raises(ValueError, match="needs more values"):
        acc.result(0.05)


def test_tally_exact_at_the_threshold():
    """Thresholds equal to upsampled values (and one float32 ulp around them): the fast path's
    ambiguous pixels must be decided exactly as PIL's values would be."""
    from conceptrank.core.upsample import upsample_bilinear

    rng = np.random.default_rng(7)
    N, U, h, w, sh, sw, L, C = 6, 5, 7, 7, 112, 112, 6, 2
    feats = rng.standard_normal((N, U, h, w)).astype(np.float32)
    up = upsample_bilinear(torch.from_numpy(feats[0]), (sh, sw)).numpy()  # (U, sh, sw)
    base = np.array([np.sort(up[u].ravel())[-40] for u in range(U)], np.float64)
    label_cat = label_category_matrix(np.array([1, 0, 0, 1, 1, 0]), C)
    planes = [rng.integers(0, L, size=(2, sh, sw)).astype(np.int32) for _ in range(N)]
    scalars = [[] for _ in range(N)]
    for shift in (-1, 0, 1):
        thr = np.nextafter(base.astype(np.float32), np.float32(np.inf) if shift > 0 else np.float32(-np.inf))
        thr = (base if shift == 0 else thr).astype(np.float64)
        acc = TallyAccumulator(thr, label_cat)
        acc.add(torch.from_numpy(feats), [torch.from_numpy(p) for p in planes], scalars)
        truth, both, act = naive_tally(feats, thr, planes, scalars, label_cat)
        np.testing.assert_array_equal(acc.intersect.numpy(), both)
        np.testing.assert_array_equal(acc.activation.numpy(), act)


def test_string_layer_is_one_layer_and_the_model_is_restored(tmp_path):
    """``dissect_layers(model, "units", ...)`` dissects layer 'units' (it used to iterate the string:
    "unknown layer 'u'") and leaves the caller's model in its train/eval mode on its device."""
    ds = BrodenDataset(make_planted_probe(tmp_path / "probe", n=12))
    model = planted_model()
    model.module.train()
    res = dissect_layers(model, "units", ds, CFG)
    assert [r.layer for r in res] == ["units"] and res["units"] is res[0]
    assert model.module.training and all(p.device.type == "cpu" for p in model.module.parameters())
    (ref,) = run_dissect(planted_model(), None, ["units"], ds, tmp_path / "out", CFG)
    np.testing.assert_array_equal(res[0].iou, ref.iou)
    np.testing.assert_array_equal(res[0].thresholds, ref.thresholds)
    assert res[0].out is None and ref.out == tmp_path / "out"
