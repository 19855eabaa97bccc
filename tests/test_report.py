"""The HTML report: pure figure functions, overlays, escaping, and write_report on a hand-made run folder.

``make_tiny_run`` builds a complete run folder by hand (a tiny WorldNet model card, a planted
Broden probe set, target images, and every stage's files) so these tests do not depend on the
dissect / extract / rank / evaluate stages; test_report_browser.py reuses it.
"""

from __future__ import annotations

import csv
import io
import re
from html import escape as html_escape
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from broden_fixture import make_planted_probe
from PIL import Image

from conceptrank.errors import ConceptrankError
from conceptrank.io.tally_csv import format_tally
from conceptrank.nn.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_model,
    save_model_card,
)
from conceptrank.nn.nets import WorldNet
from conceptrank.report import ReportOptions, write_report
from conceptrank.report import figures as F
from conceptrank.report import visuals as V
from conceptrank.report.data import extra_summary_keys, load_run

EVIL_CONCEPT = "<script>alert(1)</script>"
EVIL_FILE = 'JPEGImages/we"ird & name.jpg'
CLASSES = ["alpha", "b<i>&amp;", "c$d"]  # markup and a mathtext '$' in class names
LABELS = ["", "red-c", EVIL_CONCEPT, "blue-c", "square", "circle"]  # label 0 = none
U = 16  # WorldNet(width=4): layer4 has 4*4 units
PLANTED = {CLASSES[0]: ["red-c", "square"], CLASSES[1]: ["blue-c"], CLASSES[2]: ["circle", "hexagon"]}  # truth.json


def _write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def make_tiny_run(root: Path, n_per_class: int = 4) -> Path:
    """A complete run folder under ``root/run`` whose inputs live in ``root`` (model, probe, target).

    Unit labels are assigned by hand: units 1..10 get IoUs 0.32, 0.29, … (≥ 0.04, labelled), the rest
    fall below the threshold. Unit 2's concept is ``EVIL_CONCEPT``; one target image is ``EVIL_FILE``.
    """
    root = Path(root)
    run = root / "run"
    torch.manual_seed(0)
    net = WorldNet(num_classes=3, width=4).eval()
    save_model_card(root / "model", net, "worldnet", 3, (32, 32), IMAGENET_MEAN, IMAGENET_STD,
                    arch_kwargs={"width": 4})
    model = load_model(str(root / "model"))
    probe = make_planted_probe(root / "probe", n=12, size=32, seg=16)

    # -- dissect: real maps for top images and thresholds; hand-made labels ------------------------
    with open(probe / "index.csv", newline="") as f:
        probe_images = [r["image"] for r in csv.DictReader(f)]
    x = torch.stack([model.to_tensor(Image.open(probe / "images" / p).convert("RGB"), (32, 32)) for p in probe_images])
    from conceptrank.nn.hooks import record_layers

    with torch.no_grad(), record_layers(model.module, ["layer4"]) as rec:
        model.module(x)
    maps = rec["layer4"].numpy()  # (12, 16, 4, 4)
    thresholds = np.quantile(maps.transpose(1, 0, 2, 3).reshape(U, -1), 0.8, axis=1).astype(np.float64)
    mx = maps.max(axis=(2, 3))  # (12, 16)
    order = np.argsort(-mx.T, axis=1, kind="stable")  # (16, 12)
    top_value = np.take_along_axis(mx.T, order, axis=1).astype(np.float32)
    top_images = np.array([[probe_images[j] for j in row] for row in order], dtype=str)

    iou = np.zeros((U, 2))
    best = np.zeros((U, 2), np.int64)
    for u in range(U):
        score = 0.32 - 0.03 * u if u < 10 else 0.02 - 0.001 * u
        lab = [1, 2, 3, 4, 5][u % 5]
        cat = 0 if lab <= 3 else 1
        best[u, cat] = lab
        iou[u, cat] = score
        best[u, 1 - cat] = 4 if cat == 0 else 1
        iou[u, 1 - cat] = score / 3
    ones = np.ones((U, 2), np.int64)
    ddir = run / "dissect"
    ddir.mkdir(parents=True)
    (ddir / "tally.csv").write_text(format_tally(["color", "object"], best, ones * 50, ones * 60, ones * 20, iou, LABELS),
                                    encoding="utf-8")
    np.save(ddir / "thresholds.npy", thresholds)
    np.savez(ddir / "top_images.npz", index=order, value=top_value, images=top_images)
    _json(ddir / "dissect.json", {
        "stage": "dissect", "layer": "layer4", "probe": str(probe), "categories": ["color", "object"],
        "config": {"quantile": 0.2, "iou_threshold": 0.04, "preprocess": "model"},
        "counts": {"images": 12, "units": U, "detectors": 10, "concepts": 5},
    })

    # -- target images and extract ----------------------------------------------------------------
    rng = np.random.default_rng(0)
    target = root / "target"
    names, classes, splits = [], [], []
    for ci, c in enumerate(CLASSES):
        for i in range(n_per_class):
            rel = EVIL_FILE if (ci == 0 and i == 0) else f"JPEGImages/c{ci}_{i:02d}.jpg"
            p = target / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            arr = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).resize((40, 32), Image.NEAREST).save(p)  # not square on purpose
            names.append(rel)
            classes.append(c)
            splits.append("test" if i % 2 == 0 else "train")
    xt = torch.stack([model.to_tensor(Image.open(target / n).convert("RGB"), (32, 32)) for n in names])
    with torch.no_grad(), record_layers(model.module, ["layer4"]) as rec:
        model.module(xt)
    mean = rec["layer4"].mean(dim=(2, 3)).numpy().astype(np.float32)
    (run / "extract").mkdir(parents=True)
    np.savez(run / "extract" / "activations.npz", mean=mean, max=mean, images=np.array(names), classes=np.array(classes),
             splits=np.array(splits), class_names=np.array(CLASSES))
    _json(run / "extract" / "extract.json", {
        "layer": "layer4", "input_size": [32, 32], "config": {"crop": "none"},
        "dataset": {"root": str(target), "layout": "imagefolder", "classes": CLASSES, "items": len(names)},
        "counts": {"images": len(names), "units": U},
    })

    # -- rank / evaluate ---------------------------------------------------------------------------
    rdir = run / "rank"
    unit_label = {u + 1: (LABELS[best[u, int(iou[u, 1] > iou[u, 0])]], ["color", "object"][int(iou[u, 1] > iou[u, 0])])
                  for u in range(10)}
    local_rows, image_rows = [], []
    for i, (n, c, s) in enumerate(zip(names, classes, splits)):
        units = [u for u in np.argsort(-mean[i], kind="stable") + 1 if u in unit_label][:3]
        for r, u in enumerate(units):
            local_rows.append([n, c, s, r + 1, unit_label[u][0], unit_label[u][1], int(u), float(mean[i, u - 1])])
        image_rows.append([n, c, s, len(units)])
    _write_csv(rdir / "local_concepts.csv", ["image", "class", "split", "rank", "concept", "category", "unit", "score"], local_rows)
    _write_csv(rdir / "images.csv", ["image", "class", "split", "n_concepts"], image_rows)
    coef = np.random.default_rng(1).standard_normal((3, U))
    global_rows = []
    for ci, c in enumerate(CLASSES):
        for sign in "+-":
            labelled = [u for u in range(1, 11)]
            ws = sorted(labelled, key=lambda u: -coef[ci, u - 1] if sign == "+" else coef[ci, u - 1])[:3]
            for r, u in enumerate(ws):
                global_rows.append([c, r + 1, unit_label[u][0], unit_label[u][1], u, float(coef[ci, u - 1]), sign])
    _write_csv(rdir / "global_concepts.csv", ["class", "rank", "concept", "category", "unit", "weight", "sign"], global_rows)
    np.savez(rdir / "svm.npz", coef=coef, intercept=np.zeros(3), scaler_mean=np.zeros(U), scaler_scale=np.ones(U),
             classes=np.array(CLASSES))
    cm = [[1, 1, 0], [0, 2, 0], [0, 0, 0]]  # the last class has no evaluated images: an all-zero row
    _json(rdir / "classifier.json", {
        "protocol": "standard", "classes": CLASSES, "best_C": 0.01, "evaluated_split": "test", "n_train": 6,
        "n_test": 6, "test_accuracy": 0.5, "macro_precision": 0.4, "macro_recall": 0.45, "macro_f1": 0.42,
        "per_class": {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for c in CLASSES},
        "confusion_matrix": cm, "warnings": [],
    })
    _json(rdir / "rank.json", {"protocol": "standard", "top_local": 3, "top_global": 3, "min_iou": 0.04,
                               "layer": "layer4", "classes": CLASSES})
    prec = {"alpha": [0.5, 1.0], CLASSES[1]: [0.25, 0.75], CLASSES[2]: [1.0, 1.0]}
    _write_csv(rdir / "precision.csv", ["class", "3L-1G", "3L-3G"], [[c, *prec[c]] for c in CLASSES])
    _json(rdir / "summary.json", {
        "protocol": "standard", "split": "test", "n_images": 6, "n_classes": 3, "omitted_classes": [],
        "configs": ["3L-1G", "3L-3G"], "std_ddof": 0,
        "agreement": {
            "3L-1G": {"k": 3, "g": 1, "mean": 0.5833, "std": 0.3118, "min": 0.25, "max": 1.0},
            "3L-3G": {"k": 3, "g": 3, "mean": 0.9167, "std": 0.1179, "min": 0.75, "max": 1.0},
        },
        "chance": {"3L-1G": {"mean": 0.123}},
        "baselines": {
            "note": "lift = observed / chance", "n_permutations": 1000, "n_draws": 1000,
            "3L-1G": {"observed": 0.5833, "permutation_mean": 0.2, "permutation_lift": 2.9165, "permutation_p": 1 / 1001,
                      "frequency_mean": 0.25, "frequency_lift": 2.333, "frequency_p": 1 / 1001},
            "3L-3G": {"observed": 0.9167, "permutation_mean": 0.9, "permutation_lift": 1.0186, "permutation_p": 0.41,
                      "frequency_mean": 0.88, "frequency_lift": 1.04, "frequency_p": 0.3},
        },
        "bootstrap": {"n": 1000, "level": 0.95, "3L-1G": {"mean": 0.5833, "low": 0.41, "high": 0.75},
                      "3L-3G": {"mean": 0.9167, "low": 0.83, "high": 1.0}},
        "truth": {"path": "x", "scores": {"concept_recall": 0.875, "flag": True}, "note": "planted <b>truth</b>"},
        "details": "evaluation.json",
    })
    _json(rdir / "evaluation.json", {"classes": CLASSES, "chance": {cfg: {c: {
        "agreement": prec[c][i], "permutation_mean": [0.2, 0.9][i], "ci_low": max(0.0, prec[c][i] - 0.25),
        "ci_high": min(1.0, prec[c][i] + 0.25)} for c in CLASSES} for i, cfg in enumerate(["3L-1G", "3L-3G"])}})
    _json(root / "truth.json", {"classes": PLANTED, "images": {}, "categories": {}})
    _json(run / "run.json", {
        "config": {"out": str(run), "model": str(root / "model"), "weights": None, "layer": "layer4",
                   "probe": str(probe), "target": str(target), "protocol": "standard", "seed": 0,
                   "truth": str(root / "truth.json")},
        "model": model.describe(),
    })
    return run


# -- HTML helpers ------------------------------------------------------------------------------
class _Collect(HTMLParser):
    """Every element's tag and attributes, plus the document's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse_html(text: str) -> _Collect:
    p = _Collect()
    p.feed(text)
    return p


def local_refs(doc: _Collect) -> list[str]:
    """``src`` and ``href`` values that point at files (not anchors)."""
    out = []
    for tag, attrs in doc.elements:
        for key in ("src", "href"):
            v = attrs.get(key)
            if v and not v.startswith("#"):
                out.append(v)
    return out


def with_class(doc: _Collect, cls: str) -> list[dict]:
    return [a for _, a in doc.elements if cls in (a.get("class") or "").split()]


# -- pure figure functions -----------------------------------------------------------------------
def test_normalize_rows_keeps_empty_rows_zero():
    m = F.normalize_rows([[2, 2], [0, 0], [1, 3]])
    np.testing.assert_allclose(m, [[0.5, 0.5], [0, 0], [0.25, 0.75]])


def test_confusion_matrix_figure_is_normalized_per_true_class():
    cm = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])
    fig = F.confusion_matrix_figure(cm, ["a", "b", "c$"])
    ax = fig.axes[0]
    arr = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(arr, [[0.8, 0.2, 0], [0.25, 0.25, 0.5], [0, 0, 0]])
    assert ax.get_xlabel() == "Predicted class" and ax.get_ylabel() == "True class"
    assert "normalized per true class" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", r"c\$"]
    assert {t.get_text() for t in ax.texts} == {"0.80", "0.20", "0.25", "0.50"}
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # a '$' in a label must not start mathtext
    assert buf.getvalue()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        F.confusion_matrix_figure(cm, ["a", "b"])


def test_agreement_bars_figure_heights_and_labels():
    fig = F.agreement_bars_figure(["x", "y", "z"], [0.5, 1.0, float("nan")], "5L-1G")
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.5, 1.0, 0.0]
    assert ax.get_title() == "Agreement per class (5L-1G)"
    assert ax.get_ylabel() == "Agreement" and ax.get_xlabel() == "Class"
    assert ax.get_ylim() == (0.0, 1.05)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    (line,) = ax.get_lines()
    assert line.get_ydata()[0] == pytest.approx(0.75)  # mean of the finite values


def test_agreement_summary_figure_error_bars():
    fig = F.agreement_summary_figure(["5L-1G", "10L-10G"], [0.4, 0.9], [0.1, 0.05])
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.4, 0.9]
    (errs,) = [c for c in ax.collections if len(c.get_segments()) == 2]
    spans = sorted(round(abs(s[1][1] - s[0][1]), 6) for s in errs.get_segments())
    assert spans == [0.1, 0.2]
    assert ax.get_title() == "Agreement per configuration"
    assert "mean ± std" in ax.get_ylabel()


def test_units_per_category_figure():
    fig = F.units_per_category_figure({"color": 5, "object": 2, "scene": 0}, total_units=16,
                                      concepts={"color": 3, "object": 1, "scene": 0})
    ax = fig.axes[0]
    heights = [int(p.get_height()) for p in ax.patches]
    assert heights == [5, 2, 0, 3, 1, 0]
    assert ax.get_title() == "Interpretable units per category (7 of 16)"
    assert ax.get_xlabel() == "Concept category"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["color", "object", "scene"]


def test_concept_frequency_figure_sorted_and_limited():
    rows = [("b", "color", 2), ("a", "object", 5), ("c", "color", 2), ("d", "scene", 1)]
    fig = F.concept_frequency_figure(rows, ["color", "object", "scene"], limit=3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [int(p.get_height()) for p in ax.patches if p.get_height() > 0] == [5, 2, 2]
    assert ax.get_title() == "Units per concept (top 3 of 4 concepts)"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"color", "object"}


def test_save_figure_writes_png(tmp_path):
    path = F.save_figure(F.agreement_summary_figure(["a"], [0.5], [0.1]), tmp_path / "sub" / "f.png", dpi=50)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 50


# -- overlays --------------------------------------------------------------------------------------
def test_mask_overlay_darkens_outside_and_outlines():
    rgb = np.full((6, 6, 3), 200, np.uint8)
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    out = V.mask_overlay(rgb, mask, dim=0.5)
    assert tuple(out[0, 0]) == (100, 100, 100)  # outside: dimmed
    assert tuple(out[2, 2]) == (200, 200, 200)  # interior: unchanged
    assert tuple(out[1, 1]) == (255, 221, 0)  # boundary: outlined
    with pytest.raises(ValueError):
        V.mask_overlay(rgb, mask[:5])


def test_heatmap_overlay_leaves_zero_heat_unchanged():
    rgb = (np.arange(48).reshape(4, 4, 3) * 5).astype(np.uint8)
    np.testing.assert_array_equal(V.heatmap_overlay(rgb, np.zeros((4, 4))), rgb)
    hot = V.heatmap_overlay(rgb, np.ones((4, 4)))
    assert not np.array_equal(hot, rgb)


def test_fit_size_and_upsampled():
    assert V.fit_size(200, 100, 96) == (96, 48)
    assert V.fit_size(10, 40, 96) == (24, 96)
    up = V.upsampled(np.ones((2, 3, 3), np.float32), (12, 9))
    assert up.shape == (2, 12, 9) and np.allclose(up, 1.0)


# -- reading a run ---------------------------------------------------------------------------------
def test_extra_summary_keys_become_tables_scalars_and_notes():
    summary = {
        "agreement": {"5L-1G": {"mean": 1}}, "split": "test", "details": "evaluation.json", "ground_truth": None,
        "bootstrap": {"note": "95% interval", "n": 1000, "5L-1G": {"mean": 0.5, "low": 0.4, "high": 0.6},
                      "5L-5G": {"mean": 0.7, "low": 0.6, "high": 0.8}},
        "stability": {"folds": {"G=1": 0.5, "G=5": 0.8}, "seeds_C": {"0": 0.01}},
        "truth": "/x/truth.json", "evaluation_notes": ["a note"], "flag": True,
        "nested": {"global": {"G=1": {"precision": 0.3, "concepts": ["a"]}}, "categories": ["color", "scene"]},
    }
    extras = {e["key"]: e for e in extra_summary_keys(summary)}
    assert list(extras) == ["bootstrap", "stability", "truth", "evaluation_notes", "nested"]
    b = extras["bootstrap"]
    assert b["scalars"] == [("n", 1000)] and b["notes"] == ["95% interval"]
    assert b["tables"] == [{"title": "", "columns": ["mean", "low", "high"],
                            "rows": [("5L-1G", [0.5, 0.4, 0.6]), ("5L-5G", [0.7, 0.6, 0.8])]}]
    assert [t["columns"] for t in extras["stability"]["tables"]] == [["G=1", "G=5"], ["0"]]
    assert extras["truth"]["scalars"] == [("", "/x/truth.json")]
    assert extras["evaluation_notes"]["notes"] == ["a note"]
    assert extras["nested"]["tables"] == [{"title": "global", "columns": ["precision"], "rows": [("G=1", [0.3])]}]
    assert extras["nested"]["scalars"] == [("categories", "color, scene")] and extras["nested"]["notes"] == []


def test_load_run_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConceptrankError):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptrankError, match="not a run folder"):
        load_run(tmp_path / "empty")


# -- write_report on the tiny run ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = make_tiny_run(root)
    path = write_report(run)
    return run, path, path.read_text(encoding="utf-8")


def test_write_report_files_and_sections(tiny_report):
    run, path, text = tiny_report
    assert path == run / "report.html"
    for name in ("confusion_matrix.png", "agreement_3L-1G.png", "agreement_3L-3G.png", "agreement_summary.png",
                 "units_per_category.png", "concept_frequency.png"):
        assert (run / "figures" / name).is_file(), name
    doc = parse_html(text)
    ids = {a.get("id") for _, a in doc.elements}
    assert {"overview", "figures", "units", "classes", "selfcheck"} <= ids
    cards = with_class(doc, "unit-card")
    assert [c["data-unit"] for c in cards] == [str(u) for u in range(1, 11)]  # IoU ≥ 0.04, by IoU
    assert json.loads(cards[1]["data-concepts"]) == [EVIL_CONCEPT]
    sections = with_class(doc, "class-section")
    assert [s["data-class"] for s in sections] == CLASSES
    panels = with_class(doc, "image-panel")
    assert len(panels) == 3 * 2  # images_per_class=3, but only 2 test images per class
    assert all(p["data-class"] in CLASSES for p in panels)
    body = " ".join(doc.text)
    assert "0.583 ± 0.31" in body and "0.917 ± 0.12" in body  # agreement mean ± std, 3 and 2 significant digits
    assert "0.123" in body and "0.875" in body  # extra summary keys (chance, ground truth)
    assert "0.1230" not in body and "0.8750" not in body  # no 4-decimal dumps
    assert "evaluation.json" in body  # the details file is linked
    assert "planted <b>truth</b>" in body  # a note, shown as text


def test_write_report_paths_are_relative_and_resolve(tiny_report):
    run, _, text = tiny_report
    refs = local_refs(parse_html(text))
    assert refs
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc and not ref.startswith("/"), ref
        assert (run / unquote(parts.path)).is_file(), ref


def test_write_report_thumbnails_are_small(tiny_report):
    run, _, _ = tiny_report
    thumbs = list((run / "figures" / "units").glob("*.jpg")) + list((run / "figures" / "images").glob("*.jpg"))
    assert len(thumbs) >= 10 * 4
    for p in thumbs:
        with Image.open(p) as im:
            assert max(im.size) <= 128


def test_write_report_escapes_every_name(tiny_report):
    _, _, text = tiny_report
    assert "<script>alert(1)" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "b<i>" not in text and "b&lt;i&gt;&amp;amp;" in text
    assert 'we"ird' not in text and "we&#34;ird &amp; name.jpg" in text
    # JSON in data attributes: quotes and markup escaped for a single-quoted attribute
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in text
    doc = parse_html(text)
    assert EVIL_CONCEPT in " ".join(doc.text)  # shown as text
    names = [a.get("alt") for tag, a in doc.elements if tag == "img"]
    assert EVIL_FILE in names


def test_write_report_is_repeatable(tmp_path):
    run = make_tiny_run(tmp_path)
    write_report(run)
    first = set(p.name for p in (run / "figures" / "units").iterdir())
    users = run / "figures" / "units" / "mine.jpg"  # not written by report: never deleted
    users.write_bytes(b"x")
    write_report(run, ReportOptions(unit_images=2, images_per_class=1, top_units=1, max_units=3))
    assert users.read_bytes() == b"x"
    second = set(p.name for p in (run / "figures" / "units").iterdir()) - {"mine.jpg"}
    linked = {unquote(urlsplit(r).path).rsplit("/", 1)[-1] for r in local_refs(parse_html(
        (run / "report.html").read_text(encoding="utf-8"))) if "/units/" in r}
    assert second == linked and len(second) < len(first)  # the first report's other thumbnails are gone
    assert not (run / ".report-staging").exists()
    doc = parse_html((run / "report.html").read_text(encoding="utf-8"))
    assert len(with_class(doc, "unit-card")) == 3
    assert len(with_class(doc, "image-panel")) == 3


def test_write_report_without_model_probe_or_target(tmp_path):
    run = make_tiny_run(tmp_path)
    shutil.rmtree(tmp_path / "model")
    shutil.rmtree(tmp_path / "probe")
    shutil.rmtree(tmp_path / "target")
    text = write_report(run).read_text(encoding="utf-8")
    doc = parse_html(text)
    assert len(with_class(doc, "unit-card")) == 10
    assert len(with_class(doc, "image-panel")) == 6
    body = " ".join(doc.text)
    assert "cannot load the model" in body
    assert "probe set is not available" in body
    assert "image unavailable" in body
    for ref in local_refs(doc):
        assert (run / unquote(urlsplit(ref).path)).is_file(), ref


def test_write_report_with_only_a_ranking(tmp_path):
    """A run made from an existing tally (no dissect/ folder) and no evaluation still gets a report."""
    run = make_tiny_run(tmp_path)
    shutil.rmtree(run / "dissect")
    for name in ("summary.json", "precision.csv"):
        (run / "rank" / name).unlink()
    doc = parse_html(write_report(run).read_text(encoding="utf-8"))
    assert with_class(doc, "class-section")
    assert not with_class(doc, "unit-card")
    assert (run / "figures" / "confusion_matrix.png").is_file()


def test_cli_report(tiny_report, tmp_path):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    run, path, text = tiny_report
    path.unlink()
    res = CliRunner().invoke(app, ["report", "--run", str(run)])
    assert res.exit_code == 0, res.output
    assert path.is_file() and "report: " in res.output
    res = CliRunner().invoke(app, ["report", "--run", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "run folder not found" in res.output


def _cells(text: str, row_attr: str) -> list[str]:
    """Texts of the <td> cells of the agreement table's row whose data-config is ``row_attr``."""
    import re

    m = re.search(r'<tr class="[^"]*" data-config="' + re.escape(row_attr) + r'">(.*?)</tr>', text, re.S)
    assert m, row_attr
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", m.group(1), re.S)]


def test_agreement_table_has_chance_lift_and_p(tiny_report):
    _, _, text = tiny_report
    head = text[text.index('<table class="grid" id="agreement">'):]
    head = head[:head.index("</thead>")]
    for h in ("Chance level", "Lift (× chance)", ">p<", "95% interval (bootstrap)", "Verdict"):
        assert h in head, h
    above = _cells(text, "3L-1G")
    assert above[3:8] == ["0.583 ± 0.31", "0.410–0.750", "0.200", "2.92", "≤ 0.001"]  # p at the permutation floor
    assert above[8] == "above chance"
    at = _cells(text, "3L-3G")
    assert at[5:8] == ["0.900", "1.02", "0.41"] and at[8].startswith("at chance")
    assert 'class="at-chance" data-config="3L-3G"' in text and 'class="" data-config="3L-1G"' in text


def test_further_scores_are_tables_with_plain_headings(tiny_report):
    _, _, text = tiny_report
    extra = text[text.index('id="extra-scores"'):text.index('<section id="figures">')]
    assert "Agreement against chance" in extra and "Chance: shuffled classes" in extra
    assert "RANKING_AGREEMENT" not in extra and "oracle_precision_restricted" not in extra
    assert "<h4>Truth</h4>" in extra and "<th>Concept recall</th>" in extra  # an unknown key: humanized, still shown


def test_planted_concepts_are_starred(tiny_report):
    run, _, text = tiny_report
    doc = parse_html(text)
    planted = [a for a in with_class(doc, "planted") if "chip" in a.get("class", "")]
    assert {a["data-concept"] for a in planted} >= {"red-c", "square", "blue-c", "circle", "hexagon"}
    sec = text[text.index('id="class-2"'):]
    sec = sec[:sec.index("Global concepts against")]
    assert "★" in sec and "hexagon" in sec and "not in the top global concepts" in sec
    # every starred global row is a planted concept of that class
    for i, c in enumerate(CLASSES):
        s = text[text.index(f'id="class-{i}"'):]
        s = s[:s.index("Example images")]
        starred = re.findall(r'class="chip planted" data-concept="([^"]+)"', s)
        assert set(starred) <= set(PLANTED[c]) | {html_escape(x) for x in PLANTED[c]}


def test_title_names_architecture_and_weights(tiny_report):
    _, _, text = tiny_report
    title = text[text.index("<title>") + 7:text.index("</title>")]
    assert title == "conceptrank report — worldnet (width 4), weights.safetensors · layer4"


def test_agreement_figures_draw_chance_and_clip_error_bars():
    fig = F.agreement_bars_figure(["x", "y"], [0.5, 1.0], "5L-1G", chance=[0.2, 0.3],
                                  interval=([0.3, 0.9], [0.8, 1.0]))
    ax = fig.axes[0]
    band = [p for p in ax.patches if p.get_gid() == "chance-band"]
    assert [round(p.get_height(), 6) for p in band] == [0.2, 0.3]
    errs = [c for c in ax.collections if len(c.get_segments()) == 2][0]
    assert max(max(pt[1] for pt in seg) for seg in errs.get_segments()) <= 1.0
    assert not [t for t in ax.texts if t.get_gid() == "at-chance"]
    fig = F.agreement_bars_figure(["x", "y"], [1.0, 1.0], "10L-10G", chance=0.99, at_chance="p = 1.0")
    ax = fig.axes[0]
    assert ax.get_title().endswith("at chance")
    assert [t.get_text() for t in ax.texts if t.get_gid() == "at-chance"] == ["At chance:\np = 1.0"]
    fig = F.agreement_summary_figure(["a", "b"], [0.95, 0.5], [0.1, 0.1], chance=[0.9, 0.2], at_chance=[True, False])
    ax = fig.axes[0]
    errs = [c for c in ax.collections if len(c.get_segments()) == 2][0]
    tops = sorted(round(max(pt[1] for pt in seg), 6) for seg in errs.get_segments())
    assert tops == [0.6, 1.0]  # 0.95 + 0.1 is clipped to 1
    assert [t.get_text() for t in ax.texts if t.get_gid() == "at-chance"] == ["at chance"]
    assert len([p for p in ax.patches if p.get_gid() == "chance-band"]) == 2


def test_confusion_matrix_text_is_at_least_9pt():
    fig = F.confusion_matrix_figure(np.eye(12, dtype=int) * 5 + 1, [f"class_{i}" for i in range(12)])
    ax = fig.axes[0]
    sizes = [t.get_fontsize() for t in ax.texts] + [t.get_fontsize() for t in ax.get_xticklabels()]
    assert sizes and min(sizes) >= 9


def test_old_cards_architecture_shows_todays_name(tiny_report):
    from dataclasses import replace

    from conceptrank.report.html import _model_description

    data = load_run(tiny_report[0])
    assert _model_description(data) == ("worldnet (width 4)", "weights.safetensors")
    old = replace(data, model_card={**data.model_card, "architecture": "conceptnet"})
    assert _model_description(old)[0] == "worldnet (width 4)"
    tv = replace(data, model_card={}, model={"model": "resnet18", "weights": "none"})
    assert _model_description(tv) == ("resnet18", "random init")


def test_every_figure_text_is_at_least_9pt():
    figs = [
        F.confusion_matrix_figure(np.eye(40, dtype=int) + 1, [f"class_{i}" for i in range(40)]),
        F.agreement_bars_figure([f"c{i}" for i in range(40)], np.linspace(0, 1, 40), "5L-1G", chance=0.3),
        F.agreement_summary_figure(["a", "b"], [0.5, 0.99], [0.1, 0.1], chance=[0.2, 0.98], at_chance=[False, True]),
        F.units_per_category_figure({"color": 5, "object": 2}, 16, {"color": 3, "object": 1}),
        F.concept_frequency_figure([(f"k{i}", "color", i) for i in range(50)], ["color"]),
    ]
    for fig in figs:
        fig.canvas.draw()
        texts = [t for t in fig.findobj(lambda o: hasattr(o, "get_fontsize") and hasattr(o, "get_text"))
                 if t.get_text().strip() and t.get_visible()]
        assert texts and min(t.get_fontsize() for t in texts) >= 9, [
            (t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 9][:5]


def test_the_overview_says_how_the_synthetic_source_model_was_trained():
    from conceptrank.report.html import _source_task

    card = {"source_task": {"config": {"train_images": 12000, "epochs": 30},
                            "heldout_accuracy": {"shape": 0.82, "color": 0.922, "material": 0.764, "scene": 1.0,
                                                 "mean": 0.876}}}
    assert _source_task(card) == ("the synthetic world's source task (12000 images × 30 epochs; held-out accuracy "
                                  "shape 0.82, color 0.92, material 0.76, scene 1.0)")
    assert _source_task({"architecture": "resnet152"}) is None


def test_class_graphs_are_drawn_once_per_relations_file(tmp_path, monkeypatch):
    """RUN/relate/graphs/ is reused while relations.json and the dpi are unchanged, redrawn otherwise."""
    import json

    import conceptrank.report.relations as rel

    (tmp_path / "relate").mkdir()
    src = tmp_path / "relate" / "relations.json"
    doc = {"classes": {"a b": {"candidates": [{"relation": ["x", "PartOf", "y"], "support": 0.5}],
                               "recovered": [["x", "PartOf", "y"]]}, "c": {"candidates": []}}}
    src.write_text(json.dumps(doc))
    drawn = []
    real = rel.draw_relation_graph
    monkeypatch.setattr(rel, "draw_relation_graph", lambda path, *a, **k: drawn.append(path.name) or real(path, *a, **k))
    out = rel.draw_class_graphs(tmp_path, dpi=40)
    assert drawn == ["a-b.png"] and (out / "a-b.png").is_file()
    rel.draw_class_graphs(tmp_path, dpi=40)
    assert drawn == ["a-b.png"]  # reused
    section = rel.relations_section(tmp_path, tmp_path / "figures", dpi=40)
    assert drawn == ["a-b.png"] and (tmp_path / "figures" / "relations" / "a-b.png").read_bytes() == (out / "a-b.png").read_bytes()
    assert [c["src"] for c in section["classes"]] == ["figures/relations/a-b.png", None]
    rel.draw_class_graphs(tmp_path, dpi=41)
    doc["classes"]["a b"]["recovered"] = []
    src.write_text(json.dumps(doc))
    rel.draw_class_graphs(tmp_path, dpi=41)
    assert drawn == ["a-b.png"] * 3
