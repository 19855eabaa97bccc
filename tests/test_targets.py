"""Target set indexing (Stanford 40, image folder, manifest), image decoding, person boxes."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptrank.errors import ConceptrankError
from conceptrank.io.images import ImageDecodeError, load_rgb
from conceptrank.io.targets import (
    TargetError,
    TargetItem,
    class_of_stanford_name,
    load_targets,
    person_box,
)


# -- fixture builders -----------------------------------------------------------------------------
def _img(path: Path, w: int = 8, h: int = 6, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def make_stanford(root: Path, splits: dict[str, tuple[list[str], list[str]]], header: bool = True,
                  sep: str = "\t") -> Path:
    """A tiny Stanford 40 tree: JPEGImages, ImageSplits/actions.txt and per-class split files."""
    (root / "ImageSplits").mkdir(parents=True)
    lines = ["action_name\tnumber_of_images"] if header else []
    for k, (cls, (train, test)) in enumerate(splits.items()):
        lines.append(f"{cls}{sep}{len(train) + len(test)}")
        for split, names in (("train", train), ("test", test)):
            (root / "ImageSplits" / f"{cls}_{split}.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
            for j, n in enumerate(names):
                _img(root / "JPEGImages" / n, seed=k * 100 + j)
    (root / "ImageSplits" / "actions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _tiny_stanford(tmp_path: Path) -> Path:
    # actions.txt order is deliberately not alphabetical; one class name holds spaces.
    return make_stanford(
        tmp_path / "S40",
        {
            "writing_on_a_book": (["writing_on_a_book_002.jpg", "writing_on_a_book_001.jpg"], ["writing_on_a_book_003.jpg"]),
            "applauding": (["applauding_001.jpg"], ["applauding_002.jpg", "applauding_010.jpg"]),
            "riding a bike": (["riding a bike_001.jpg"], ["riding a bike_002.jpg"]),
        },
    )


# -- Stanford 40 ----------------------------------------------------------------------------------
def test_stanford40_parsing_order_and_splits(tmp_path):
    root = _tiny_stanford(tmp_path)
    ts = load_targets(root)  # auto
    assert ts.layout == "stanford40"
    assert ts.classes == ("writing_on_a_book", "applauding", "riding a bike")  # actions.txt order
    assert ts.items[:3] == (
        TargetItem("JPEGImages/writing_on_a_book_001.jpg", "writing_on_a_book", "train"),
        TargetItem("JPEGImages/writing_on_a_book_002.jpg", "writing_on_a_book", "train"),
        TargetItem("JPEGImages/writing_on_a_book_003.jpg", "writing_on_a_book", "test"),
    )
    assert [it.split for it in ts.items if it.cls == "applauding"] == ["train", "test", "test"]
    assert TargetItem("JPEGImages/riding a bike_002.jpg", "riding a bike", "test") in ts.items
    assert len(ts) == 8 and ts.counts() == {"writing_on_a_book": 3, "applauding": 3, "riding a bike": 2}
    assert all(ts.path(it).is_file() for it in ts.items)
    assert ts.image_root == root


def test_stanford40_spaces_separator_and_no_header(tmp_path):
    root = make_stanford(tmp_path / "a", {"jumping": (["jumping_001.jpg"], ["jumping_002.jpg"])}, header=False, sep="   ")
    ts = load_targets(root, layout="stanford40")
    assert ts.classes == ("jumping",) and len(ts) == 2


def test_fingerprint_is_stable_and_tracks_content(tmp_path):
    root = _tiny_stanford(tmp_path)
    a, b = load_targets(root), load_targets(root)
    before = a.fingerprint()
    assert before == b.fingerprint() and len(before) == 64
    with open(root / "JPEGImages" / "applauding_001.jpg", "ab") as f:
        f.write(b"\0" * 10)  # same name, different size
    assert load_targets(root).fingerprint() != before


def test_missing_split_file_is_named(tmp_path):
    root = _tiny_stanford(tmp_path)
    (root / "ImageSplits" / "applauding_test.txt").unlink()
    with pytest.raises(TargetError, match=r"missing split file .*applauding_test\.txt"):
        load_targets(root)


def test_split_listing_missing_image_names_file_and_line(tmp_path):
    root = _tiny_stanford(tmp_path)
    (root / "ImageSplits" / "applauding_test.txt").write_text("applauding_002.jpg\n\napplauding_099.jpg\n")
    with pytest.raises(TargetError, match=r"applauding_test\.txt line 3: .*applauding_099\.jpg.*does not exist"):
        load_targets(root)


@pytest.mark.parametrize("bad", ["../applauding_001.jpg", "x/../../applauding_001.jpg", "/etc/applauding_001.jpg",
                                 "..\\applauding_001.jpg"])
def test_split_path_traversal_rejected(tmp_path, bad):
    root = _tiny_stanford(tmp_path)
    (root / "ImageSplits" / "applauding_train.txt").write_text(bad + "\n")
    with pytest.raises(TargetError, match=r"applauding_train\.txt line 1: .*(escapes|absolute)"):
        load_targets(root)


def test_split_class_mismatch_rejected(tmp_path):
    root = _tiny_stanford(tmp_path)
    (root / "ImageSplits" / "applauding_train.txt").write_text("writing_on_a_book_001.jpg\n")
    with pytest.raises(TargetError, match=r"applauding_train\.txt line 1: .*class 'writing_on_a_book'"):
        load_targets(root)


def test_duplicate_listing_rejected(tmp_path):
    root = _tiny_stanford(tmp_path)
    (root / "ImageSplits" / "applauding_test.txt").write_text("applauding_002.jpg\napplauding_001.jpg\n")
    with pytest.raises(TargetError, match="listed twice"):
        load_targets(root)


def test_split_file_restricts(tmp_path):
    root = _tiny_stanford(tmp_path)
    (root / "ImageSplits" / "test.txt").write_text("applauding_002.jpg\nriding a bike_002.jpg\n")
    ts = load_targets(root, split_file="test.txt")
    assert [it.rel for it in ts.items] == ["JPEGImages/applauding_002.jpg", "JPEGImages/riding a bike_002.jpg"]
    assert ts.classes == ("applauding", "riding a bike")
    with pytest.raises(TargetError, match="missing split file"):
        load_targets(root, split_file="nope.txt")


def test_class_of_stanford_name():
    assert class_of_stanford_name("riding_a_bike_012.jpg") == "riding_a_bike"
    assert class_of_stanford_name("JPEGImages/applauding_001.JPG") == "applauding"
    assert class_of_stanford_name("weird.jpg") is None


# -- image folder ---------------------------------------------------------------------------------
def test_imagefolder_layout(tmp_path):
    root = tmp_path / "folder"
    _img(root / "zebra" / "b.png")
    _img(root / "zebra" / "a.JPG")
    _img(root / "cat" / "x y.jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    _img(root / "cat" / ".hidden.jpg")
    (root / "empty").mkdir()
    ts = load_targets(root)
    assert ts.layout == "imagefolder"
    assert ts.classes == ("cat", "zebra")
    assert ts.items == (
        TargetItem("cat/x y.jpeg", "cat", "all"),
        TargetItem("zebra/a.JPG", "zebra", "all"),
        TargetItem("zebra/b.png", "zebra", "all"),
    )


@pytest.mark.skipif(os.name != "posix", reason="non-UTF-8 file names need a POSIX file system")
def test_imagefolder_non_utf8_name(tmp_path):
    d = os.path.join(os.fsencode(tmp_path), b"cls")
    os.makedirs(d)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(os.path.join(d, b"caf\xe9.png").decode("utf-8", "surrogateescape"))
    ts = load_targets(tmp_path)
    assert ts.items[0].rel == "cls/caf\udce9.png"
    assert ts.path(ts.items[0]).is_file()
    assert len(ts.fingerprint()) == 64


def test_empty_dataset_and_unknown_layout(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(TargetError, match="empty dataset"):
        load_targets(tmp_path)
    with pytest.raises(TargetError, match="unknown layout 'voc'"):
        load_targets(tmp_path, layout="voc")
    with pytest.raises(TargetError, match="not found"):
        load_targets(tmp_path / "nope")
    assert issubclass(TargetError, ConceptrankError)


# -- manifest -------------------------------------------------------------------------------------
def test_manifest_layout(tmp_path):
    _img(tmp_path / "imgs" / "a 1.png")
    _img(tmp_path / "imgs" / "b.png")
    _img(tmp_path / "c.png")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,split\nimgs/b.png,dog,test\nimgs/a 1.png,dog,train\nc.png,cat,train\n\n")
    ts = load_targets(csv)
    assert ts.layout == "manifest" and ts.classes == ("cat", "dog")
    assert ts.items == (
        TargetItem("c.png", "cat", "train"),
        TargetItem("imgs/a 1.png", "dog", "train"),
        TargetItem("imgs/b.png", "dog", "test"),
    )
    assert ts.path(ts.items[1]) == tmp_path / "imgs" / "a 1.png"


def test_manifest_non_utf8_and_no_split_column(tmp_path):
    name = b"\xff\xfe.png".decode("utf-8", "surrogateescape")
    Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "m.csv").write_bytes(b"path,label\n\xff\xfe.png,thing\n")
    ts = load_targets(tmp_path / "m.csv")
    assert ts.items == (TargetItem(name, "thing", "all"),)


@pytest.mark.parametrize("row,pattern", [
    ("../x.png,a,train", "escapes"),
    ("/tmp/x.png,a,train", "absolute"),
    ("missing.png,a,train", "does not exist"),
    ("c.png,,train", "empty label"),
])
def test_manifest_errors_name_line(tmp_path, row, pattern):
    _img(tmp_path / "c.png")
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,label,split\nc.png,a,train\n{row}\n")
    if row.startswith("c.png"):
        csv.write_text(f"path,label,split\n{row}\n")
        line = 2
    else:
        line = 3
    with pytest.raises(TargetError, match=rf"m\.csv line {line}: .*{pattern}"):
        load_targets(csv)


def test_manifest_bad_header(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(TargetError, match="header lacks"):
        load_targets(tmp_path / "m.csv", layout="manifest")


# -- person boxes ---------------------------------------------------------------------------------
def test_person_box(tmp_path):
    ann = tmp_path / "XMLAnnotations"
    ann.mkdir()
    (ann / "applauding_001.xml").write_text(
        "<annotation><filename>applauding_001.jpg</filename>"
        "<object><name>person</name><bndbox><xmax>40</xmax><xmin>10</xmin><ymax>30</ymax><ymin>5</ymin></bndbox></object>"
        "<object><name>person</name><bndbox><xmin>2.0</xmin><ymin>8</ymin><xmax>20</xmax><ymax>50</ymax></bndbox></object>"
        "</annotation>"
    )
    (ann / "applauding_002.xml").write_text("<annotation><object><bndbox><xmin>")
    (ann / "applauding_003.xml").write_text("<annotation><size/></annotation>")
    assert person_box(tmp_path, "JPEGImages/applauding_001.jpg") == (2, 5, 40, 50)  # union
    assert person_box(tmp_path, "JPEGImages/applauding_004.jpg") is None
    assert person_box(tmp_path, "JPEGImages/applauding_003.jpg") is None
    with pytest.raises(TargetError, match="applauding_002.xml: malformed"):
        person_box(tmp_path, "JPEGImages/applauding_002.jpg")


# -- image decoding -------------------------------------------------------------------------------
def _png_header_only(path: Path, w: int, h: int) -> Path:
    def chunk(t: bytes, b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def test_load_rgb_conversions(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "gray.png")
    out = np.asarray(load_rgb(tmp_path / "gray.png"))
    assert out.shape == (5, 7, 3) and (out == g[..., None]).all()

    g16 = np.array([[0, 257, 65535], [32896, 1000, 65000]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert (out[..., 0] == np.rint(g16 / 257.0).astype(np.uint8)).all() and (out[..., 0] == out[..., 2]).all()

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    rgba[..., 3] = np.array([[0, 255, 0, 255]] * 3)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert (out[:, 1::2] == rgba[:, 1::2, :3]).all() and (out[:, 0::2] == 255).all()  # on white

    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    assert load_rgb(tmp_path / "cmyk.jpg").mode == "RGB"

    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).convert("P").save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").mode == "RGB"


def test_load_rgb_failures(tmp_path, monkeypatch):
    good = _img(tmp_path / "good.jpg", 32, 24)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(data[:2] + bytes(range(256)) * 2)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    Image.new("RGB", (1, 9)).save(tmp_path / "thin.png")
    _png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    _png_header_only(tmp_path / "big.png", 10_000, 10_000)
    cases = {
        "trunc.jpg": "truncated", "corrupt.jpg": "corrupt", "empty.jpg": "empty file",
        "text.jpg": "unsupported format", "one.png": "too small", "thin.png": "too small",
        "huge.png": "too large", "big.png": "too large", "missing.jpg": "missing file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageDecodeError) as ei:
            load_rgb(tmp_path / name)
        assert ei.value.reason == reason, name
        assert name in str(ei.value)
    assert load_rgb(good).size == (32, 24)
    monkeypatch.setattr("conceptrank.io.images.MAX_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="too large"):
        load_rgb(good)
