"""Readers and stages on committed fixtures in the real datasets' formats and with their quirks.

The fixtures (``tests/fixtures/broden_quirks/``, ``tests/fixtures/stanford40_quirks/``) are written by
``tests/fixtures/make_fixtures.py``, whose docstring lists every quirk and the file that carries it.
Their tables are hand-written text, not conceptrank's writer output.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conceptrank.core.tally import label_category_matrix
from conceptrank.errors import TargetError
from conceptrank.io.activations import load_activations
from conceptrank.io.broden import BrodenDataset, WriterRow, decode_mask, write_broden
from conceptrank.io.images import load_rgb
from conceptrank.io.targets import TargetItem, load_targets
from conceptrank.nn.hooks import record_layers
from conceptrank.nn.models import LoadedModel
from conceptrank.nn.nets import ConceptNet
from conceptrank.stages.dissect import DissectConfig, run_dissect
from conceptrank.stages.extract import ExtractConfig, run_extract
from conceptrank.testing.reference import naive_tally

FIX = Path(__file__).resolve().parent / "fixtures"
BRODEN = {224: FIX / "broden_quirks" / "broden1_224", 227: FIX / "broden_quirks" / "broden1_227"}
SEG = {224: 112, 227: 113}
S40_ROOT = FIX / "stanford40_quirks"
S40 = S40_ROOT / "Stanford40"
ALL_CATS = ["color", "object", "part", "material", "scene", "texture"]


def _generator():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the fixture is what the generator writes ------------------------------------------------------
def test_generator_reproduces_committed_fixtures(tmp_path):
    _generator().main(tmp_path)
    for name in ("broden_quirks", "stanford40_quirks"):
        want = sorted(p.relative_to(FIX / name) for p in (FIX / name).rglob("*") if p.is_file())
        got = sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
        assert got == want, f"{name}: regenerate with tests/fixtures/make_fixtures.py"
        for rel in want:
            a, b = FIX / name / rel, tmp_path / name / rel
            if rel.suffix.lower() in (".jpg", ".png"):
                with Image.open(a) as ia, Image.open(b) as ib:
                    assert ia.mode == ib.mode and ia.size == ib.size, rel
                    diff = np.abs(np.asarray(ia, np.int16) - np.asarray(ib, np.int16)).max()
                # PNGs are lossless; JPEGs may differ by rounding between libjpeg builds
                assert diff <= (0 if rel.suffix == ".png" else 3), rel
            else:
                assert a.read_bytes() == b.read_bytes(), rel
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert total < 400_000  # a few hundred KB


# -- Broden: tables -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [224, 227])
def test_broden_tables_labels_and_primary(size):
    ds = BrodenDataset(BRODEN[size])
    assert ds.categories == ALL_CATS
    assert sorted(ds.labels) == [1, 2, 3, 6, 8, 12, 13, 14, 15, 16, 17, 18, 20, 22, 26, 27, 29, 35, 40, 257, 300,
                                 301, 303, 514, 1001]
    assert ds.num_labels == 1002 and ds.label_names[4] == "" and ds.label_names[1001] == "handle"  # gaps
    assert ds.labels[12].syns == ("person", "individual", "someone", "somebody", "mortal", "soul")
    assert ds.labels[40].syns == ("fabric", "cloth", "material", "textile")
    assert ds.labels[13].syns == ()
    assert ds.labels[16].categories == ("object", "material")
    assert ds.labels[18].categories == ("object", "part")
    primary = {n: ds.category_of_label(n) for n in ds.labels}
    assert primary[16] == "material"  # glass: more coverage in c_material.csv than in c_object.csv
    assert primary[17] == "material"  # wood: equal coverage → the later category in category.csv
    assert ds.coverage["object"][17] == ds.coverage["material"][17] > 0
    assert primary[18] == "object"  # door: more coverage as object than as part
    assert primary[35] == "object"  # never used (frequency 0) but still in its category
    assert [primary[n] for n in (1, 12, 300, 257, 514, 20, 26)] == ["color", "object", "part", "material", "material",
                                                                    "scene", "texture"]


@pytest.mark.parametrize("size", [224, 227])
def test_broden_rows_planes_and_scalars(size):
    ds = BrodenDataset(BRODEN[size])
    seg = SEG[size]
    assert len(ds) == 8 and ds.dropped_rows == 1  # pascal/2008_000099.jpg has no data at all
    by = {r.image: r for r in ds.records}
    assert "pascal/2008_000099.jpg" not in by
    assert {r.image.split("/")[0] for r in ds.records} == {"ade20k", "pascal", "opensurfaces", "dtd"}
    assert all((r.ih, r.iw, r.sh, r.sw) == (size, size, seg, seg) for r in ds.records)
    assert [r.split for r in ds.records] == ["train", "train", "train", "train", "val", "val", "val", "train"]
    a1 = by["ade20k/ADE_train_00000001.jpg"]
    assert a1.planes == tuple(f"ade20k/ADE_train_00000001_{s}.png" for s in ("color", "object", "part_1", "part_2"))
    assert a1.scalars == (20,)
    assert by["ade20k/ADE_train_00000002.jpg"].scalars == (20, 22)  # several scene labels: '20;22'
    assert by["pascal/2008_000002.jpg"].planes == ("pascal/2008_000002_object.png",) + tuple(
        f"pascal/2008_000002_part_{k}.png" for k in (1, 2, 3))
    assert by["dtd/striped_0010.jpg"].planes == () and by["dtd/striped_0010.jpg"].scalars == (26, 27)
    assert by["dtd/dotted_0001.jpg"].scalars == (29,)
    assert by["dtd/banded_0002.jpg"].planes == ("dtd/banded_0002_color.png",)
    # row numbers are physical index.csv lines (header = 1), also with CRLF line ends (227)
    assert by["ade20k/ADE_train_00000002.jpg"].row == 6
    for i in range(len(ds)):
        planes = ds.load_planes(i)
        assert planes.shape == (len(ds.records[i].planes), seg, seg)
        img = ds.load_image(i)
        assert img.mode == "RGB" and img.size == (size, size)


@pytest.mark.parametrize("size", [224, 227])
def test_broden_mask_encodings(size):
    ds = BrodenDataset(BRODEN[size])
    seg = SEG[size]
    idx = {r.image: i for i, r in enumerate(ds.records)}
    imgs = BRODEN[size] / "images"

    def frac(rect):
        y0, _, y1, _ = rect
        yc = (np.arange(seg) + 0.5) / seg
        return ((yc >= y0) & (yc < y1)).mean()

    # grayscale (mode L) material mask: value v is label v + 256*v (brick 257 top 60 %, tile 514 below)
    with Image.open(imgs / "opensurfaces/100963_material.png") as im:
        assert im.mode == "L"
    mat = ds.load_planes(idx["opensurfaces/100963.jpg"])[1]
    assert set(np.unique(mat)) == {257, 514}
    assert (mat == 257).mean() == pytest.approx(frac((0, 0, .6, 1)))
    # palette (mode P) part mask with label numbers > 255 in the G channel
    with Image.open(imgs / "ade20k/ADE_train_00000002_part_1.png") as im:
        assert im.mode == "P"
    assert set(np.unique(ds.load_planes(idx["ade20k/ADE_train_00000002.jpg"])[2])) == {0, 300, 1001}
    # RGB material mask whose blue channel holds noise: blue is ignored
    with Image.open(imgs / "opensurfaces/100964_material.png") as im:
        assert np.asarray(im)[..., 2].any()
    assert set(np.unique(decode_mask(imgs / "opensurfaces/100964_material.png"))) == {16, 17, 40}
    # three overlapping Pascal part planes: some pixels carry two part labels
    pas = ds.load_planes(idx["pascal/2008_000002.jpg"])
    assert [sorted(np.unique(p)) for p in pas] == [[0, 12, 14], [0, 300], [0, 301], [0, 303]]
    assert ((pas[2] == 301) & (pas[3] == 303)).any() and ((pas[1] == 300) & (pas[2] == 301)).any()
    # a grayscale JPEG probe image decodes to RGB
    with Image.open(imgs / "pascal/2008_000002.jpg") as im:
        assert im.mode == "L"
    assert ds.load_image(idx["pascal/2008_000002.jpg"]).mode == "RGB"


@pytest.mark.parametrize("size", [224, 227])
def test_broden_category_subsets(size):
    ops = BrodenDataset(BRODEN[size], ["scene", "object", "part"])  # kept in category.csv order
    assert ops.categories == ["object", "part", "scene"]
    assert [r.image for r in ops.records] == ["ade20k/ADE_train_00000001.jpg", "pascal/2008_000002.jpg",
                                              "ade20k/ADE_train_00000002.jpg"]
    assert ops.dropped_rows == 6
    assert ops.category_of_label(16) == "object" and ops.category_of_label(17) == "object"  # material not selected
    assert ops.category_of_label(257) == "" and ops.category_of_label(1) == ""
    assert ops.records[0].planes == tuple(f"ade20k/ADE_train_00000001_{s}.png" for s in ("object", "part_1", "part_2"))

    mt = BrodenDataset(BRODEN[size], ["material", "texture"])
    assert [r.image for r in mt.records] == ["opensurfaces/100963.jpg", "dtd/banded_0002.jpg", "opensurfaces/100964.jpg",
                                             "dtd/striped_0010.jpg", "dtd/dotted_0001.jpg"]
    assert mt.dropped_rows == 4 and mt.records[1].planes == () and mt.records[1].scalars == (26,)
    assert mt.category_of_label(16) == "material" and mt.category_of_label(18) == ""


def test_our_writer_reproduces_the_hand_written_tables(tmp_path):
    """write_broden over the fixture's rows and masks reads back exactly like the hand-written tables."""
    ds = BrodenDataset(BRODEN[227])
    shutil.copytree(BRODEN[227] / "images", tmp_path / "images")
    with open(BRODEN[227] / "index.csv", newline="") as f:
        rows = [WriterRow(r["image"], r["split"], int(r["ih"]), int(r["iw"]), int(r["sh"]), int(r["sw"]),
                          {c: [int(x) if x.isdigit() else x for x in r[c].split(";") if x] for c in ALL_CATS})
                for r in csv.DictReader(f)]
    labels = [(n, info.name, c) for n, info in ds.labels.items() for c in info.categories]
    write_broden(tmp_path, ALL_CATS, labels, rows, {n: info.syns for n, info in ds.labels.items()})
    ours = BrodenDataset(tmp_path)
    assert ours.labels == ds.labels and ours.coverage == ds.coverage
    np.testing.assert_array_equal(ours.primary, ds.primary)
    assert [(r.image, r.planes, r.scalars, r.sh) for r in ours.records] == [
        (r.image, r.planes, r.scalars, r.sh) for r in ds.records]


# -- Broden: dissection equals the naive reference ------------------------------------------------
class QuirkNet(nn.Module):
    """ConceptNet(width=4) plus ``pool7``: layer2's maps average-pooled to 7×7, so that masks of
    112 px (×16) and 113 px (non-integer scale) are both exercised; ``body.layer4`` is 28×28."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = ConceptNet(num_classes=3, width=4)
        for m in self.body.modules():  # non-trivial batch-norm statistics, still deterministic
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        self.pool7 = nn.AdaptiveAvgPool2d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        self.pool7(b.layer2(b.pool1(b.layer1(b.conv1(x)))))
        return b(x)


def _quirk_model(size: int) -> LoadedModel:
    net = QuirkNet().eval()
    return LoadedModel(net, "quirknet", "none", (size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "quirk-fp")


@pytest.mark.parametrize("size,cats", [(224, None), (227, None), (227, ("part", "material", "texture"))])
def test_dissect_equals_naive_reference(tmp_path, size, cats):
    ds = BrodenDataset(BRODEN[size], cats)
    model = _quirk_model(size)
    layers = ["body.layer4", "pool7"]
    q = 0.05
    cfg = DissectConfig(categories=cats, quantile=q, workers=0, batch_size=16, progress=False, device="cpu")
    results = run_dissect(model, None, layers, ds, tmp_path / "out", cfg)

    # the same features, one batch as in dissect
    x = torch.stack([model.to_tensor(ds.load_image(i), (size, size)) for i in range(len(ds))])
    with torch.inference_mode(), record_layers(model.module, layers) as rec:
        model.module(x)
    C = len(ds.categories)
    label_cat = label_category_matrix(ds.primary, C)
    planes = [ds.load_planes(i) for i in range(len(ds))]
    scalars = [list(r.scalars) for r in ds.records]
    active = np.zeros(C, bool)
    for res, name, hw in zip(results, layers, (28, 7)):
        feats = rec[name].numpy()
        assert feats.shape[2:] == (hw, hw)  # upsampled to 112 or 113: 4x, 16x, 113/28, 113/7
        U = feats.shape[1]
        want_thr = np.quantile(feats.transpose(1, 0, 2, 3).reshape(U, -1).astype(np.float64), 1 - q, axis=1)
        np.testing.assert_allclose(res.thresholds, want_thr, rtol=0, atol=1e-6)
        truth, both, act = naive_tally(feats, res.thresholds, planes, scalars, label_cat)
        iou = both / (act @ label_cat.T + truth[None, :] - both + 1e-10)
        np.testing.assert_allclose(res.iou, iou, rtol=0, atol=1e-12)
        assert (both > 0).sum() >= 8  # a non-trivial tally
        active |= (act > 0).any(axis=0)
        # tally.csv: categories in category.csv order, truth columns equal the reference's
        with open(res.out / "tally.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [k[: -len("-label")] for k in rows[0] if k.endswith("-label")] == ds.categories
        for r in rows:
            u = int(r["unit"]) - 1
            for ci, c in enumerate(ds.categories):
                assert int(r[f"{c}-truth"]) == truth[res.best_label[u, ci]]
                assert int(r[f"{c}-intersect"]) == both[u, res.best_label[u, ci]]
        assert res.counts["images"] == len(ds) and res.counts["dropped_rows"] == ds.dropped_rows
    assert active.all()  # units fire on labels of every selected category


# -- Stanford 40, image folder, manifest ----------------------------------------------------------
class Feat(nn.Module):
    """``feat`` = the normalized input itself (mean 0, std 1 normalization: pixel values in [0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x):
        return self.feat(x)


def _feat_model(size: int = 24) -> LoadedModel:
    return LoadedModel(Feat().eval(), "feat", "none", (size, size), (0.0,) * 3, (1.0,) * 3, "feat-fp")


CFG = ExtractConfig(workers=0, batch_size=4, device="cpu")
ACTIONS = ("applauding", "riding_a_bike", "writing_on_a_book")


def test_stanford40_index_and_split_files():
    ts = load_targets(S40)
    assert ts.layout == "stanford40" and ts.classes == ACTIONS
    assert ts.counts() == {"applauding": 4, "riding_a_bike": 4, "writing_on_a_book": 3}
    assert ts.items[:4] == tuple(TargetItem(f"JPEGImages/applauding_00{k}.jpg", "applauding", s)
                                 for k, s in [(1, "train"), (2, "train"), (3, "test"), (4, "test")])
    # riding_a_bike_test.txt has CRLF line ends and no final newline
    assert [it.rel for it in ts.items if it.cls == "riding_a_bike" and it.split == "test"] == [
        "JPEGImages/riding_a_bike_003.jpg", "JPEGImages/riding_a_bike_004.jpg"]
    train = load_targets(S40, split_file="train.txt")  # ImageSplits/train.txt: all actions together
    test = load_targets(S40, split_file="test.txt")
    assert {it.split for it in train.items} == {"train"} and len(train) == 6
    assert {it.split for it in test.items} == {"test"} and len(test) == 5
    assert set(train.items) | set(test.items) == set(ts.items)
    assert ts.has_person_boxes()


def test_stanford40_extract_mixed_modes_and_sizes(tmp_path):
    modes = {}
    for p in sorted((S40 / "JPEGImages").iterdir()):
        with Image.open(p) as im:
            modes[p.name] = (im.mode, im.size)
    assert {m for m, _ in modes.values()} == {"RGB", "L", "CMYK"} and len({s for _, s in modes.values()}) >= 8
    res = run_extract(_feat_model(), None, "feat", S40, tmp_path / "o", CFG)
    assert (res.n_images, res.n_units, res.n_skipped) == (11, 3, 0)
    z = load_activations(tmp_path / "o")
    assert tuple(z.class_names) == ACTIONS
    assert list(z.classes) == ["applauding"] * 4 + ["riding_a_bike"] * 4 + ["writing_on_a_book"] * 3
    assert list(z.splits[:4]) == ["train", "train", "test", "test"]
    assert np.isfinite(z.mean).all() and (z.mean >= 0).all() and (z.max <= 1).all()
    gray = [n for n, (m, _) in modes.items() if m == "L"]
    for n in gray:  # grayscale images give three equal channels
        row = list(z.images).index(f"JPEGImages/{n}")
        assert np.ptp(z.mean[row]) < 1e-6


def test_stanford40_crop_person(tmp_path):
    res = run_extract(_feat_model(), None, "feat", S40, tmp_path / "crop", ExtractConfig(crop="person", workers=0,
                                                                                          device="cpu"))
    assert res.n_images == 10 and res.skipped == (("JPEGImages/writing_on_a_book_003.jpg", "no person box"),)
    run_extract(_feat_model(), None, "feat", S40, tmp_path / "whole", CFG)
    crop, whole = load_activations(tmp_path / "crop"), load_activations(tmp_path / "whole")
    wrow = {r: i for i, r in enumerate(whole.images)}
    for i, rel in enumerate(crop.images):
        pix = np.asarray(load_rgb(S40 / rel), np.float64) / 255.0
        box = _xml_box(S40 / "XMLAnnotations" / (Path(rel).stem + ".xml"))
        x0, y0, x1, y1 = box[0], box[1], min(box[2], pix.shape[1]), min(box[3], pix.shape[0])  # clipped
        person = pix[y0:y1, x0:x1].mean(axis=(0, 1))
        np.testing.assert_allclose(crop.mean[i], person, atol=0.02, err_msg=rel)  # the crop is the person
        assert np.abs(whole.mean[wrow[rel]] - person).max() > 0.05, rel  # the whole image is not


def _xml_box(path: Path) -> tuple[int, ...]:
    import xml.etree.ElementTree as ET

    bb = ET.parse(path).getroot().find("object/bndbox")
    return tuple(int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))


def test_imagefolder_layout_extract(tmp_path):
    root = S40_ROOT / "imagefolder"
    res = run_extract(_feat_model(), None, "feat", root, tmp_path / "o", CFG)
    assert (res.n_images, res.n_skipped) == (5, 0)
    z = load_activations(tmp_path / "o")
    assert list(z.images) == ["applauding/a1.jpg", "applauding/a2.png", "applauding/clap, close.jpg",
                                 "riding_a_bike/B3.JPG", "riding_a_bike/bike 2.jpg"]  # notes.txt, .hidden.jpg ignored
    assert tuple(z.class_names) == ("applauding", "riding_a_bike") and set(z.splits) == {"all"}


def test_manifest_layout_extract(tmp_path):
    # 'val' and an empty split cell beside train/test rows are refused unless mapped explicitly
    with pytest.raises(TargetError, match=r"manifest\.csv: split 'val' \(1 image\(s\), first 'imagefolder/riding_a_bike/bike 2\.jpg'\)"):
        run_extract(_feat_model(), None, "feat", S40_ROOT / "manifest.csv", tmp_path / "bad", CFG)
    cfg = dataclasses.replace(CFG, split_map="val=test,all=drop")
    res = run_extract(_feat_model(), None, "feat", S40_ROOT / "manifest.csv", tmp_path / "o", cfg)
    assert (res.n_images, res.n_skipped) == (5, 0)
    meta = json.loads((tmp_path / "o" / "extract.json").read_text())
    assert meta["dataset"]["dropped_by_split_map"] == {"all": 1}
    z = load_activations(tmp_path / "o")
    got = list(zip(z.images, z.classes, z.splits))
    assert got == [
        ("Stanford40/JPEGImages/applauding_001.jpg", "applauding", "train"),
        ("Stanford40/JPEGImages/applauding_003.jpg", "applauding", "test"),
        ("imagefolder/applauding/clap, close.jpg", "applauding", "test"),
        ("Stanford40/JPEGImages/riding_a_bike_002.jpg", "riding_a_bike", "train"),
        ("imagefolder/riding_a_bike/bike 2.jpg", "riding_a_bike", "test"),
    ]
