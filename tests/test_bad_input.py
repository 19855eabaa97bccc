"""The bad-input matrix: every kind of broken or awkward input, and the test that pins its behaviour.

Each case ends in a clear error naming the culprit (file, and line where there is one) or in a
counted skip listed in the outputs (``skipped.csv``, ``extract.json`` counts, the summary). Tests in
other files are listed, not duplicated; the cases they miss are tested here.

===================================  ===========================================  ==========================================================================
case                                 behaviour                                    covered by
===================================  ===========================================  ==========================================================================
corrupt JPEG                         skip ``corrupt``                             test_targets.py::test_load_rgb_failures,
                                                                                  test_extract.py::test_run_extract_skips_and_converts
  … as a probe image (dissect)       BrodenError: index.csv line + file           test_bad_input.py::test_unusable_probe_image_is_named
truncated file                       skip ``truncated``                           test_targets.py::test_load_rgb_failures,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_bad_input.py::test_unusable_probe_image_is_named
0-byte file                          skip ``empty file``                          test_targets.py::test_load_rgb_failures,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_bad_input.py::test_unusable_probe_image_is_named
grayscale image / mask               converted to RGB                             test_targets.py::test_load_rgb_conversions,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_real_formats.py::test_stanford40_extract_mixed_modes_and_sizes,
                                                                                  test_broden.py::test_grayscale_mask_is_accepted,
                                                                                  test_real_formats.py::test_broden_mask_encodings
CMYK                                 converted to RGB                             test_targets.py::test_load_rgb_conversions,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_real_formats.py::test_stanford40_extract_mixed_modes_and_sizes,
                                                                                  test_bad_input.py::test_probe_images_of_any_mode
RGBA PNG                             composited on white                          test_targets.py::test_load_rgb_conversions,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_bad_input.py::test_probe_images_of_any_mode
16-bit PNG                           scaled to 8 bits (image); refused (mask)     test_targets.py::test_load_rgb_conversions,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_bad_input.py::test_probe_images_of_any_mode,
                                                                                  test_bad_input.py::test_16bit_mask_is_refused
1×1 image                            skip ``too small``                           test_targets.py::test_load_rgb_failures,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_bad_input.py::test_unusable_probe_image_is_named
decompression-bomb-sized image       skip ``too large`` (header only)             test_targets.py::test_load_rgb_failures,
                                                                                  test_extract.py::test_run_extract_skips_and_converts,
                                                                                  test_extract.py::test_monkeypatched_pixel_limit_skips
  … as a mask                        BrodenError from the header, no decoding     test_bad_input.py::test_huge_mask_fails_from_its_header
missing split file                   TargetError naming it                        test_targets.py::test_missing_split_file_is_named,
                                                                                  test_targets.py::test_split_file_restricts (``split_file``),
                                                                                  test_bad_input.py::test_cli_extract_missing_split_file (CLI)
split listing a missing image        TargetError: file, line, image               test_targets.py::test_split_listing_missing_image_names_file_and_line,
                                                                                  test_bad_input.py::test_split_file_option_lists_unknown_image
class with fewer images than folds   ConceptrankError naming class and count      test_rank.py::test_error_class_with_fewer_images_than_folds
non-UTF-8 / spaces in file names     names round-trip to the same bytes           test_extract.py::test_non_utf8_names_round_trip,
                                                                                  test_targets.py::test_imagefolder_non_utf8_name,
                                                                                  test_targets.py::test_manifest_non_utf8_and_no_split_column,
                                                                                  test_targets.py::test_stanford40_parsing_order_and_splits (spaces),
                                                                                  test_real_formats.py::test_imagefolder_layout_extract (space, comma),
                                                                                  test_bad_input.py::test_stanford40_non_utf8_and_space_names,
                                                                                  test_bad_input.py::test_broden_non_utf8_and_space_names
``../`` / absolute paths             rejected, naming file and line               test_broden.py::test_path_traversal_rejected (mask cells),
                                                                                  test_bad_input.py::test_index_image_path_escapes_rejected (image column,
                                                                                  ``C:\\`` drives, empty), test_targets.py::test_split_path_traversal_rejected,
                                                                                  test_targets.py::test_manifest_errors_name_line,
                                                                                  test_bad_input.py::test_split_file_option_path_escapes_rejected,
                                                                                  test_bad_input.py::test_cli_dissect_path_escape (CLI)
mask size mismatch                   BrodenError: mask, line, both sizes          test_dissect.py::test_mask_size_mismatch,
                                                                                  test_bad_input.py::test_cli_dissect_bad_mask (CLI),
                                                                                  test_bad_input.py::test_cli_dissect_bad_mask_with_workers (CLI, workers)
label number missing from label.csv  BrodenError naming file (and line)           test_dissect.py::test_mask_label_absent_from_label_csv (mask),
                                                                                  test_broden.py::test_scalar_label_absent (index.csv),
                                                                                  test_bad_input.py::test_category_table_label_absent (c_*.csv)
model returning NaN/inf              ConceptrankError naming images, no hang      test_extract.py::test_nan_activations_name_images,
                                                                                  test_extract.py::test_layer_not_reached_and_errors_with_workers_do_not_hang,
                                                                                  test_dissect.py::test_nan_activations_fail_fast,
                                                                                  test_bad_input.py::test_inf_activations_extract_and_dissect (inf, workers)
unknown layer                        UnknownLayerError listing the valid names    test_extract.py::test_unknown_layer_lists_valid_layers,
                                                                                  test_dissect.py::test_unknown_layer_lists_valid,
                                                                                  test_extract.py::test_cli_prints_one_line_errors (CLI),
                                                                                  test_models.py::test_cli_layers_and_errors (CLI)
malformed Broden tables              BrodenError naming file (and line)           test_bad_input.py::test_malformed_broden_tables (category without an
                                                                                  index.csv column, sizes <= 0, non-UTF-8 tables; a BOM is accepted),
                                                                                  test_broden.py::test_missing_table, test_dissect.py::test_unknown_category
===================================  ===========================================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from conceptrank.cli import app
from conceptrank.errors import ConceptrankError
from conceptrank.io.activations import load_activations
from conceptrank.io.broden import BrodenDataset, BrodenError, encode_mask
from conceptrank.io.images import load_rgb
from conceptrank.io.targets import TargetError, load_targets
from conceptrank.nn.models import LoadedModel, save_model_card
from conceptrank.nn.nets import ConceptNet
from conceptrank.stages.dissect import DissectConfig, run_dissect
from conceptrank.stages.extract import (
    ExtractConfig,
    extract_activations,
    run_extract,
)

FIX = Path(__file__).resolve().parent / "fixtures"
B224 = FIX / "broden_quirks" / "broden1_224"
S40 = FIX / "stanford40_quirks" / "Stanford40"
DCFG = DissectConfig(workers=0, batch_size=8, progress=False, device="cpu")


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def probe(tmp_path) -> Path:
    """A writable copy of the 224 Broden fixture."""
    return Path(shutil.copytree(B224, tmp_path / "probe"))


@pytest.fixture
def s40(tmp_path) -> Path:
    """A writable copy of the Stanford 40 fixture."""
    return Path(shutil.copytree(S40, tmp_path / "S40"))


class Feat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x):
        return self.feat(x)


class InfNet(nn.Module):
    """``feat`` is +inf on images whose mean input exceeds 0.45, the input itself elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x):
        hot = x.mean(dim=(1, 2, 3), keepdim=True) > 0.45
        return self.feat(torch.where(hot, torch.full_like(x, float("inf")), x))


def _loaded(module: nn.Module, size=(16, 16)) -> LoadedModel:
    return LoadedModel(module.eval(), "test", "none", size, (0.0,) * 3, (1.0,) * 3, "fp-test")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (there is no pytest-timeout here)."""

    def boom(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: hang?")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _set_index(root: Path, old: str, new: str) -> None:
    text = (root / "index.csv").read_text()
    assert old in text
    (root / "index.csv").write_text(text.replace(old, new, 1))


def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(t: bytes, b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _card(tmp_path: Path) -> str:
    torch.manual_seed(0)
    save_model_card(tmp_path / "card", ConceptNet(num_classes=3, width=4), "conceptnet", 3, (32, 32),
                    (0.5,) * 3, (0.25,) * 3, arch_kwargs={"width": 4})
    return str(tmp_path / "card")


def _one_error_line(result, *needles: str) -> str:
    """The CLI failed with exit code 2 and printed exactly one ``error: …`` line holding ``needles``."""
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- probe images (dissect) -----------------------------------------------------------------------
@pytest.mark.parametrize("damage,reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:2] + bytes(range(256)) * 4), "corrupt"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: Image.new("RGB", (1, 1)).save(p, "JPEG"), "too small"),
])
def test_unusable_probe_image_is_named(probe, tmp_path, damage, reason):
    img = probe / "images" / "opensurfaces" / "100963.jpg"  # index.csv line 4
    damage(img)
    ds = BrodenDataset(probe)
    with pytest.raises(BrodenError, match=rf"index.csv line 4: cannot use image .*100963\.jpg \({reason}"):
        ds.load_image(2)
    with pytest.raises(BrodenError, match=r"100963\.jpg"):
        run_dissect(_loaded(ConceptNet(3, 4), (224, 224)), None, ["layer2"], ds, tmp_path / "out", DCFG)


def test_probe_images_of_any_mode(probe):
    """Probe images decode exactly like target images (CMYK, RGBA on white, 16-bit scaled)."""
    rng = np.random.default_rng(0)
    imgs = probe / "images"
    rgb = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(imgs / "dtd" / "banded_0002.jpg", "JPEG")
    rgba = np.concatenate([rgb, np.full((224, 224, 1), 0, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(imgs / "dtd" / "striped_0010.jpg", "PNG")  # a PNG named .jpg
    Image.fromarray(rng.integers(0, 65536, (224, 224)).astype(np.uint16)).save(imgs / "dtd" / "dotted_0001.jpg", "PNG")
    ds = BrodenDataset(probe)
    idx = {r.image: i for i, r in enumerate(ds.records)}
    for rel in ("dtd/banded_0002.jpg", "dtd/striped_0010.jpg", "dtd/dotted_0001.jpg"):
        got = ds.load_image(idx[rel])
        assert got.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(load_rgb(imgs / rel)))
    assert (np.asarray(ds.load_image(idx["dtd/striped_0010.jpg"])) == 255).all()  # transparent → white


# -- masks ----------------------------------------------------------------------------------------
def test_16bit_mask_is_refused(probe):
    mask = probe / "images" / "opensurfaces" / "100963_material.png"
    Image.fromarray(np.full((112, 112), 257, np.uint16)).save(mask)
    ds = BrodenDataset(probe)
    with pytest.raises(BrodenError, match=r"100963_material\.png: 16/32-bit"):
        ds.load_planes(2)


@pytest.mark.parametrize("side,pattern", [
    (10_000, r"100963_material\.png \(index.csv line 4\) is 10000x10000, expected sh x sw = 112x112"),
    (60_000, r"100963_material\.png: cannot decode \(.*decompression bomb"),  # refused by PIL at open
])
def test_huge_mask_fails_from_its_header(probe, side, pattern):
    mask = probe / "images" / "opensurfaces" / "100963_material.png"
    _png_header_only(mask, side, side)  # 300 MB or 10 GB of RGB if decoded
    ds = BrodenDataset(probe)
    with pytest.raises(BrodenError, match=pattern):
        ds.load_planes(2)


def test_category_table_label_absent(probe):
    with open(probe / "c_scene.csv", "a") as f:
        f.write("3,99,nowhere-s,1,1.0\n")
    with pytest.raises(BrodenError, match=r"c_scene\.csv line 4: label number 99 is not in label.csv"):
        BrodenDataset(probe)
    BrodenDataset(probe, ["object"])  # only the selected categories' tables are read


# -- paths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,pattern", [
    ("../outside.jpg", "escapes the dataset root"),
    ("ade20k/../../outside.jpg", "escapes the dataset root"),
    ("/etc/passwd", "escapes the dataset root"),
    (r"C:\images\x.jpg", "escapes the dataset root"),
    ("", "empty file path"),
])
def test_index_image_path_escapes_rejected(probe, bad, pattern):
    _set_index(probe, "ade20k/ADE_train_00000002.jpg,", f"{bad},")
    with pytest.raises(BrodenError, match=rf"index.csv line 6: .*{pattern}"):
        BrodenDataset(probe)


@pytest.mark.parametrize("bad", ["../S40/JPEGImages/applauding_001.jpg", "/etc/passwd", "JPEGImages/../../x.jpg"])
def test_split_file_option_path_escapes_rejected(s40, bad):
    (s40 / "ImageSplits" / "mine.txt").write_text(f"applauding_001.jpg\n{bad}\n")
    with pytest.raises(TargetError, match=r"mine\.txt line 2: .*(escapes|absolute)"):
        load_targets(s40, split_file="mine.txt")


def test_split_file_option_lists_unknown_image(s40):
    (s40 / "ImageSplits" / "mine.txt").write_text("applauding_001.jpg\napplauding_077.jpg\n")
    with pytest.raises(TargetError, match=r"mine\.txt line 2: image 'applauding_077\.jpg' is not in the dataset"):
        load_targets(s40, split_file="mine.txt")


# -- file names -----------------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="non-UTF-8 file names need a POSIX file system")
def test_stanford40_non_utf8_and_space_names(s40, tmp_path):
    """An action whose name is Latin-1 (not UTF-8) and one whose name holds spaces."""
    latin = b"caf\xe9_au_lait".decode("utf-8", "surrogateescape")
    spaced = "reading a map"
    for cls, src in ((latin, "applauding_001.jpg"), (spaced, "applauding_003.jpg")):
        shutil.copy(s40 / "JPEGImages" / src, s40 / "JPEGImages" / f"{cls}_001.jpg")
        for split, names in (("train", f"{cls}_001.jpg\n"), ("test", "")):
            (s40 / "ImageSplits" / f"{cls}_{split}.txt").write_bytes(names.encode("utf-8", "surrogateescape"))
    with open(s40 / "ImageSplits" / "actions.txt", "ab") as f:
        f.write(b"caf\xe9_au_lait\t1\nreading a map\t1\n")
    ts = load_targets(s40)
    assert ts.classes[-2:] == (latin, spaced) and ts.counts()[latin] == 1
    res = run_extract(_loaded(Feat()), None, "feat", s40, tmp_path / "o", ExtractConfig(workers=0, device="cpu"))
    assert res.n_images == 13 and res.n_skipped == 0
    z = load_activations(tmp_path / "o")
    names = list(z.images)
    assert names[-2:] == [f"JPEGImages/{latin}_001.jpg", f"JPEGImages/{spaced}_001.jpg"]
    assert list(z.class_names[-2:]) == [latin, spaced]
    a, b = names.index("JPEGImages/applauding_001.jpg"), names.index(f"JPEGImages/{latin}_001.jpg")
    np.testing.assert_array_equal(z.mean[a], z.mean[b])  # the same bytes were read


@pytest.mark.skipif(os.name != "posix", reason="non-UTF-8 file names need a POSIX file system")
def test_broden_non_utf8_and_space_names(probe, tmp_path):
    imgs = probe / "images" / "opensurfaces"
    os.rename(imgs / "100963.jpg", os.path.join(os.fsencode(imgs), b"caf\xe9 1.jpg"))
    os.rename(imgs / "100963_material.png", os.path.join(os.fsencode(imgs), b"caf\xe9 1_material.png"))
    raw = (probe / "index.csv").read_bytes()
    raw = raw.replace(b"opensurfaces/100963.jpg", b"opensurfaces/caf\xe9 1.jpg")
    raw = raw.replace(b"opensurfaces/100963_material.png", b"opensurfaces/caf\xe9 1_material.png")
    (probe / "index.csv").write_bytes(raw)
    ds = BrodenDataset(probe)
    rec = ds.records[2]
    assert rec.image == "opensurfaces/caf\udce9 1.jpg"
    assert ds.load_image(2).size == (224, 224)
    assert set(np.unique(ds.load_planes(2)[1])) == {257, 514}
    (res,) = run_dissect(_loaded(ConceptNet(3, 4), (224, 224)), None, ["layer4"], ds, tmp_path / "out", DCFG)
    assert res.counts["images"] == 8


# -- tables ---------------------------------------------------------------------------------------
def test_malformed_broden_tables(probe):
    # a selected category that index.csv has no column for
    text = (probe / "index.csv").read_text().splitlines()
    (probe / "index.csv").write_text("\n".join(ln.rsplit(",", 1)[0] for ln in text) + "\n")
    with pytest.raises(BrodenError, match=r"index.csv: no column for selected category \['texture'\]"):
        BrodenDataset(probe)
    assert len(BrodenDataset(probe, ["object", "scene"])) == 3
    shutil.copy(B224 / "index.csv", probe / "index.csv")
    # a non-positive size
    _set_index(probe, "dtd/banded_0002.jpg,train,224,224,112,112", "dtd/banded_0002.jpg,train,224,224,0,112")
    with pytest.raises(BrodenError, match=r"index.csv line 5: column 'sh' must be a positive size, got 0"):
        BrodenDataset(probe)
    shutil.copy(B224 / "index.csv", probe / "index.csv")
    # label.csv that is not UTF-8
    good = (probe / "label.csv").read_bytes()
    (probe / "label.csv").write_bytes(good.replace(b"brick", b"br\xefck"))
    with pytest.raises(BrodenError, match=r"label\.csv: not UTF-8"):
        BrodenDataset(probe)
    # a UTF-8 byte-order mark (a table saved by a spreadsheet) is fine
    (probe / "label.csv").write_bytes(b"\xef\xbb\xbf" + good)
    (probe / "category.csv").write_bytes(b"\xef\xbb\xbf" + (probe / "category.csv").read_bytes())
    (probe / "index.csv").write_bytes(b"\xef\xbb\xbf" + (probe / "index.csv").read_bytes())
    ds = BrodenDataset(probe)
    assert len(ds) == 8 and ds.labels[257].name == "brick"


# -- NaN / inf ------------------------------------------------------------------------------------
def test_inf_activations_extract_and_dissect(tmp_path):
    ts = load_targets(S40)
    with deadline(120):
        with pytest.raises(ConceptrankError, match=r"NaN/inf activations for \d+ image\(s\).*JPEGImages/\w+\.jpg"):
            extract_activations(_loaded(InfNet()), "feat", ts, ExtractConfig(workers=2, batch_size=2, device="cpu"))
        ds = BrodenDataset(B224)
        with pytest.raises(ConceptrankError, match=r"NaN/inf activations for probe image\(s\) \['\w+/.*\.jpg"):
            run_dissect(_loaded(InfNet(), (224, 224)), None, ["feat"], ds, tmp_path / "out",
                    DissectConfig(workers=2, batch_size=2, progress=False, device="cpu"))


# -- the command line -----------------------------------------------------------------------------
runner = CliRunner()


def test_cli_extract_missing_split_file(s40, tmp_path):
    (s40 / "ImageSplits" / "riding_a_bike_test.txt").unlink()
    r = runner.invoke(app, ["extract", "--model", _card(tmp_path), "--layer", "layer4", "--dataset", str(s40),
                            "--out", str(tmp_path / "o"), "--workers", "0", "--device", "cpu"])
    _one_error_line(r, "missing split file", str(s40 / "ImageSplits" / "riding_a_bike_test.txt"))


def test_cli_extract_manifest_path_escape(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split\n../secret.jpg,a,train\n")
    r = runner.invoke(app, ["extract", "--model", _card(tmp_path), "--layer", "layer4", "--dataset",
                            str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--workers", "0"])
    _one_error_line(r, "m.csv line 2", "'../secret.jpg'", "escapes")


def _dissect_args(tmp_path: Path, probe: Path, workers: int) -> list[str]:
    return ["dissect", "--model", _card(tmp_path), "--layer", "layer4", "--probe", str(probe),
            "--out", str(tmp_path / "out"), "--workers", str(workers), "--batch-size", "4", "--device", "cpu"]


def test_cli_dissect_path_escape(probe, tmp_path):
    _set_index(probe, "pascal/2008_000002_part_2.png", "../../2008_000002_part_2.png")
    r = runner.invoke(app, _dissect_args(tmp_path, probe, 0))
    _one_error_line(r, "index.csv line 3", "'../../2008_000002_part_2.png' escapes the dataset root")


def _bad_mask(probe: Path) -> Path:
    mask = probe / "images" / "pascal" / "2008_000002_part_3.png"
    encode_mask(np.zeros((56, 56), int)).save(mask)
    return mask


def test_cli_dissect_bad_mask(probe, tmp_path):
    mask = _bad_mask(probe)
    r = runner.invoke(app, _dissect_args(tmp_path, probe, 0))
    _one_error_line(r, f"mask {mask} (index.csv line 3) is 56x56, expected sh x sw = 112x112")


def test_cli_dissect_bad_mask_with_workers(probe, tmp_path):
    mask = _bad_mask(probe)
    with deadline(120):
        r = runner.invoke(app, _dissect_args(tmp_path, probe, 1))
    _one_error_line(r, f"mask {mask} (index.csv line 3) is 56x56")


def test_matrix_names_existing_tests():
    """Every ``file::test`` in the table above exists (the matrix does not rot)."""
    import re

    refs = set(re.findall(r"(test_\w+\.py)::(test_\w+)", __doc__))
    assert len(refs) > 30
    here = Path(__file__).resolve().parent
    missing = [f"{f}::{t}" for f, t in sorted(refs)
               if not re.search(rf"^def {t}\(", (here / f).read_text(encoding="utf-8"), re.M)]
    assert not missing
