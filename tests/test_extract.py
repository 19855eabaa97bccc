"""extract: mean/max of a layer's activation maps, streaming with skips, outputs and errors."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conceptrank.errors import ConceptrankError
from conceptrank.io.activations import load_activations
from conceptrank.io.targets import load_targets
from conceptrank.nn.hooks import UnknownLayerError
from conceptrank.nn.models import LoadedModel, load_model, save_model_card
from conceptrank.nn.nets import ConceptNet
from conceptrank.stages.extract import (
    ExtractConfig,
    ExtractResult,
    extract_activations,
    run_extract,
)

H, W = 6, 8  # model input size (H, W); fixture images are W x H so nothing is resized


# -- models with known layers ---------------------------------------------------------------------
class KnownNet(nn.Module):
    """``feat``: identity (B, 3, H, W); ``conv``: fixed 1x1 conv (B, 2, H, W); ``head``: (B, 2) vector;
    ``tokens``: a 3-D output (B, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])[:, :, None, None])
            self.conv.bias.copy_(torch.tensor([0.25, -0.5]))
        self.head = nn.Linear(2, 2)
        self.tokens = nn.Flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.feat(x))
        self.tokens(y)
        return self.head(y.mean(dim=(2, 3)))


class NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(x / (x.sum(dim=(1, 2, 3), keepdim=True) > 1e9).float())  # 0/0 → NaN


def _loaded(module: nn.Module, size=(H, W)) -> LoadedModel:
    return LoadedModel(module.eval(), "test", "none", size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "fp-test")


# -- fixtures -------------------------------------------------------------------------------------
def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(t: bytes, b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def clean_folder(root: Path) -> dict[str, np.ndarray]:
    """Image folder of lossless PNGs; returns rel → (H, W, 3) uint8 pixels."""
    pix = {}
    for k, rel in enumerate(["cat/a.png", "cat/b c.png", "dog/x.png", "dog/y.png", "dog/z.png"]):
        a = _rgb(k)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / rel)
        pix[rel] = a
    return pix


def messy_folder(root: Path) -> dict[str, np.ndarray]:
    """Valid images of many modes plus broken ones; returns the expected RGB pixels of the valid ones."""
    d = root / "things"
    d.mkdir(parents=True)
    expect = {}
    good = _rgb(1)
    Image.fromarray(good).save(d / "01_good.png")
    expect["things/01_good.png"] = good
    g = _rgb(2)[..., 0]
    Image.fromarray(g, "L").save(d / "02_gray.png")
    expect["things/02_gray.png"] = np.repeat(g[..., None], 3, axis=2)
    g16 = np.random.default_rng(3).integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(g16).save(d / "03_g16.png")
    expect["things/03_g16.png"] = np.repeat(np.rint(g16 / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    rgba = np.concatenate([_rgb(4), np.where(np.arange(W)[None, :, None] % 2, 255, 0).repeat(H, 0).astype(np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(d / "04_rgba.png")
    expect["things/04_rgba.png"] = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    Image.fromarray(_rgb(5)).convert("CMYK").save(d / "05_cmyk.jpg", quality=95)
    with Image.open(d / "05_cmyk.jpg") as im:
        expect["things/05_cmyk.jpg"] = np.asarray(im.convert("RGB"))
    Image.fromarray(_rgb(6, 40, 50)).save(d / "06_src.jpg")
    data = (d / "06_src.jpg").read_bytes()
    (d / "06_src.jpg").unlink()
    (d / "07_trunc.jpg").write_bytes(data[: len(data) // 2])
    (d / "08_corrupt.jpg").write_bytes(data[:2] + bytes(range(256)) * 3)
    (d / "09_empty.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "10_one.png")
    _png_header_only(d / "11_huge.png", 100_000, 100_000)
    return expect


def _expected(pix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = pix.astype(np.float64) / 255.0  # (H, W, 3) with mean 0, std 1 normalization
    return x.mean(axis=(0, 1)), x.max(axis=(0, 1))


CFG0 = ExtractConfig(workers=0, batch_size=2, device="cpu")


# -- hand-computed values -------------------------------------------------------------------------
def test_identity_layer_mean_and_max_match_numpy(tmp_path):
    pix = clean_folder(tmp_path)
    ts = load_targets(tmp_path)
    acts = extract_activations(_loaded(KnownNet()), "feat", ts, CFG0)
    mean, mx = acts.mean, acts.max
    assert acts.images.tolist() == [it.rel for it in ts.items] and acts.skipped == () and acts.layer == "feat"
    assert mean.shape == (5, 3) and mean.dtype == np.float32 and mx.dtype == np.float32
    for n, it in enumerate(ts.items):
        em, ex = _expected(pix[it.rel])
        np.testing.assert_allclose(mean[n], em, rtol=0, atol=1e-6)
        np.testing.assert_allclose(mx[n], ex, rtol=0, atol=1e-7)


def test_fixed_conv_and_vector_layers(tmp_path):
    pix = clean_folder(tmp_path)
    ts = load_targets(tmp_path)
    net = KnownNet()
    wgt = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    bias = np.array([0.25, -0.5])
    acts = extract_activations(_loaded(net), "conv", ts, CFG0)
    mean, mx = acts.mean, acts.max
    for n, it in enumerate(ts.items):
        y = np.einsum("hwc,uc->hwu", pix[it.rel] / 255.0, wgt) + bias  # (H, W, U)
        np.testing.assert_allclose(mean[n], y.mean(axis=(0, 1)), atol=1e-5)
        np.testing.assert_allclose(mx[n], y.max(axis=(0, 1)), atol=1e-5)
    head = extract_activations(_loaded(net), "head", ts, CFG0)  # 2-D output: h = w = 1
    vm, vx = head.mean, head.max
    assert vm.shape == (5, 2)
    np.testing.assert_array_equal(vm, vx)
    with torch.no_grad():
        logits = net(torch.stack([torch.from_numpy(pix[it.rel] / 255.0).float().permute(2, 0, 1) for it in ts.items]))
    np.testing.assert_allclose(vm, logits.numpy(), atol=1e-5)


def test_resize_changes_input_size(tmp_path):
    clean_folder(tmp_path)
    ts = load_targets(tmp_path)

    class Shape(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()
            self.seen = []

        def forward(self, x):
            self.seen.append(tuple(x.shape[2:]))
            return self.feat(x)

    net = Shape()
    extract_activations(_loaded(net), "feat", ts, ExtractConfig(resize=4, workers=0, device="cpu"))
    assert set(net.seen) == {(4, 4)}


# -- streaming with bad inputs, outputs ----------------------------------------------------------
def test_run_extract_skips_and_converts(tmp_path, capsys):
    expect = messy_folder(tmp_path / "data")
    res = run_extract(_loaded(KnownNet()), None, "feat", tmp_path / "data", tmp_path / "out", CFG0)
    assert isinstance(res, ExtractResult)
    assert (res.n_images, res.n_units, res.n_skipped) == (5, 3, 5)
    reasons = dict(res.skipped)
    assert reasons == {
        "things/07_trunc.jpg": "truncated",
        "things/08_corrupt.jpg": "corrupt",
        "things/09_empty.jpg": "empty file",
        "things/10_one.png": "too small",
        "things/11_huge.png": "too large",
    }
    with open(tmp_path / "out" / "skipped.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "reason"] and dict(rows[1:]) == reasons

    z = load_activations(tmp_path / "out")
    assert z.max is not None and z.mean.shape == z.max.shape
    assert list(z.images) == sorted(expect) and z.images.dtype.kind == "U"
    assert list(z.classes) == ["things"] * 5 and list(z.splits) == ["all"] * 5
    for n, rel in enumerate(z.images):
        em, ex = _expected(expect[rel])
        np.testing.assert_allclose(z.mean[n], em, atol=1e-6, err_msg=rel)
        np.testing.assert_allclose(z.max[n], ex, atol=1e-6, err_msg=rel)

    meta = json.loads((tmp_path / "out" / "extract.json").read_text())
    assert meta["layer"] == "feat" and meta["model"]["fingerprint"] == "fp-test"
    assert set(meta["fingerprints"]) >= {"model", "layer", "dataset", "params"}
    assert meta["fingerprints"]["dataset"] == load_targets(tmp_path / "data").fingerprint()
    assert meta["counts"]["images"] == 5 and meta["counts"]["units"] == 3 and meta["counts"]["skipped"] == 5
    assert meta["counts"]["per_class"] == {"things": 5}
    assert set(meta["timings"]) >= {"load", "forward", "total"}
    assert "torch" in meta["package_versions"] and meta["config"]["workers"] == 0

    s = res.summary()
    assert "5 images x 3 units" in s and "skipped 5 image(s)" in s and "things/07_trunc.jpg: truncated" in s


def test_monkeypatched_pixel_limit_skips(tmp_path, monkeypatch):
    clean_folder(tmp_path / "d")
    monkeypatch.setattr("conceptrank.io.images.MAX_PIXELS", H * W - 1)
    with pytest.raises(ConceptrankError, match=r"all 5 images were skipped \(5 too large\)"):
        run_extract(_loaded(KnownNet()), None, "feat", tmp_path / "d", tmp_path / "out", CFG0)
    assert len((tmp_path / "out" / "skipped.csv").read_text().splitlines()) == 6
    assert not (tmp_path / "out" / "extract.json").exists()


def test_deterministic_and_workers_agree(tmp_path):
    messy_folder(tmp_path / "data")
    clean_folder(tmp_path / "data")
    torch.manual_seed(0)
    net = ConceptNet(num_classes=3, width=4)
    model = _loaded(net, size=(16, 16))
    a = run_extract(model, None, "layer2", tmp_path / "data", tmp_path / "o1", ExtractConfig(workers=0, batch_size=3, device="cpu"))
    run_extract(model, None, "layer2", tmp_path / "data", tmp_path / "o2", ExtractConfig(workers=0, batch_size=3, device="cpu"))
    c = run_extract(model, None, "layer2", tmp_path / "data", tmp_path / "o3", ExtractConfig(workers=2, batch_size=3, device="cpu"))
    z1, z2, z3 = (load_activations(tmp_path / o) for o in ("o1", "o2", "o3"))
    for k in ("mean", "max", "images", "classes", "splits"):
        np.testing.assert_array_equal(getattr(z1, k), getattr(z2, k))
        np.testing.assert_array_equal(getattr(z1, k), getattr(z3, k))
    assert a.skipped == c.skipped and a.n_skipped == 5
    assert (tmp_path / "o1" / "skipped.csv").read_bytes() == (tmp_path / "o3" / "skipped.csv").read_bytes()


def test_model_card_by_path_matches_direct_forward(tmp_path):
    pix = clean_folder(tmp_path / "data")
    torch.manual_seed(1)
    net = ConceptNet(num_classes=5, width=8).eval()
    save_model_card(tmp_path / "card", net, "conceptnet", 5, (H * 2, W * 2), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                    arch_kwargs={"width": 8})
    res = run_extract(str(tmp_path / "card"), None, "layer3", tmp_path / "data", tmp_path / "out", CFG0)
    assert (res.n_images, res.n_units) == (5, 32)
    z = load_activations(tmp_path / "out" / "activations.npz")
    loaded = load_model(str(tmp_path / "card"))
    feats = {}
    loaded.module.layer3.register_forward_hook(lambda m, i, o: feats.__setitem__("a", o))
    x = torch.stack([loaded.to_tensor(Image.fromarray(pix[r]), (H * 2, W * 2)) for r in z.images])
    with torch.no_grad():
        loaded.module(x)
    np.testing.assert_allclose(z.mean, feats["a"].mean(dim=(2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(z.max, feats["a"].amax(dim=(2, 3)).numpy(), atol=1e-5)
    meta = json.loads((tmp_path / "out" / "extract.json").read_text())
    assert meta["fingerprints"]["model"] == loaded.fingerprint and meta["input_size"] == [H * 2, W * 2]


def test_non_utf8_names_round_trip(tmp_path):
    d = tmp_path / "data" / "cls"
    d.mkdir(parents=True)
    name = b"caf\xe9 1.png".decode("utf-8", "surrogateescape")
    Image.fromarray(_rgb(0)).save(d / name)
    (d / b"bad \xff.png".decode("utf-8", "surrogateescape")).write_bytes(b"")
    res = run_extract(_loaded(KnownNet()), None, "feat", tmp_path / "data", tmp_path / "out", CFG0)
    assert res.n_images == 1 and res.skipped == (("cls/bad \udcff.png", "empty file"),)
    assert load_activations(tmp_path / "out").images[0] == "cls/" + name
    assert (tmp_path / "out" / "skipped.csv").read_bytes() == b"image,reason\ncls/bad \xff.png,empty file\n"
    json.loads((tmp_path / "out" / "extract.json").read_text())


# -- person crop ----------------------------------------------------------------------------------
def _stanford(root: Path, with_xml: bool = True) -> np.ndarray:
    (root / "ImageSplits").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSplits" / "actions.txt").write_text("action_name\tnumber_of_images\njumping\t2\n")
    (root / "ImageSplits" / "jumping_train.txt").write_text("jumping_001.jpg\n")
    (root / "ImageSplits" / "jumping_test.txt").write_text("jumping_002.jpg\n")
    big = _rgb(7, 20, 30)
    Image.fromarray(big).save(root / "JPEGImages" / "jumping_001.jpg", quality=100)
    Image.fromarray(big).save(root / "JPEGImages" / "jumping_002.jpg", quality=100)
    if with_xml:
        (root / "XMLAnnotations").mkdir()
        (root / "XMLAnnotations" / "jumping_001.xml").write_text(
            "<annotation><object><name>person</name><bndbox><xmin>4</xmin><ymin>3</ymin>"
            f"<xmax>{4 + W}</xmax><ymax>{3 + H}</ymax></bndbox></object></annotation>"
        )
    return big


def test_crop_person(tmp_path):
    _stanford(tmp_path / "s40")
    ts = load_targets(tmp_path / "s40")
    acts = extract_activations(_loaded(KnownNet()), "feat", ts, ExtractConfig(crop="person", workers=0, device="cpu"))
    mean, mx = acts.mean, acts.max
    assert acts.images.tolist() == [ts.items[0].rel] and acts.skipped == (("JPEGImages/jumping_002.jpg", "no person box"),)
    with Image.open(tmp_path / "s40" / "JPEGImages" / "jumping_001.jpg") as im:
        crop = np.asarray(im.convert("RGB"))[3:3 + H, 4:4 + W]
    em, ex = _expected(crop)
    np.testing.assert_allclose(mean[0], em, atol=1e-6)
    np.testing.assert_allclose(mx[0], ex, atol=1e-6)


def test_crop_person_needs_annotations(tmp_path):
    _stanford(tmp_path / "s40", with_xml=False)
    with pytest.raises(ConceptrankError, match="XMLAnnotations"):
        extract_activations(_loaded(KnownNet()), "feat", load_targets(tmp_path / "s40"), ExtractConfig(crop="person", workers=0))


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_layer_lists_valid_layers(tmp_path):
    clean_folder(tmp_path / "d")
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'convv'.*Valid layers: feat, conv, head"):
        run_extract(_loaded(KnownNet()), None, "convv", tmp_path / "d", tmp_path / "out", CFG0)
    assert not (tmp_path / "out").exists()


def test_three_d_layer_is_a_clear_error(tmp_path):
    clean_folder(tmp_path)
    with pytest.raises(ConceptrankError, match=r"layer 'tokens' outputs shape \(2, 2, 48\) \(3-D\)"):
        extract_activations(_loaded(KnownNet()), "tokens", load_targets(tmp_path), CFG0)


def test_nan_activations_name_images(tmp_path):
    clean_folder(tmp_path)
    net = NaNNet()
    with pytest.raises(ConceptrankError, match=r"NaN/inf activations for 2 image\(s\).*cat/a\.png, cat/b c\.png"):
        extract_activations(_loaded(net), "feat", load_targets(tmp_path), CFG0)
    assert not net.training and not net.feat._forward_hooks  # state restored, hooks removed


def test_bad_config_values(tmp_path):
    clean_folder(tmp_path)
    ts = load_targets(tmp_path)
    for cfg, pat in [(ExtractConfig(crop="face"), "unknown crop"), (ExtractConfig(batch_size=0), "batch_size"),
                     (ExtractConfig(workers=-1), "workers"), (ExtractConfig(device="tpu"), "unknown device")]:
        with pytest.raises(ConceptrankError, match=pat):
            extract_activations(_loaded(KnownNet()), "feat", ts, cfg)


def test_cli_prints_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from conceptrank.cli import app

    clean_folder(tmp_path / "d")
    torch.manual_seed(0)
    save_model_card(tmp_path / "card", ConceptNet(num_classes=5, width=8), "conceptnet", 5, (16, 16),
                    (0.5,) * 3, (0.25,) * 3, arch_kwargs={"width": 8})
    args = ["extract", "--model", str(tmp_path / "card"), "--dataset", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
            "--workers", "0"]
    r = CliRunner().invoke(app, args + ["--layer", "nope"])
    assert r.exit_code == 2 and "unknown layer 'nope'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, args + ["--layer", "layer4", "--crop", "face"])
    assert r.exit_code == 2 and "unknown crop" in r.output
    r = CliRunner().invoke(app, args + ["--layer", "layer4"])
    assert r.exit_code == 0, r.output
    assert "5 images x 32 units" in r.output and "skipped 0 images" in r.output


def test_layer_not_reached_and_errors_with_workers_do_not_hang(tmp_path):
    clean_folder(tmp_path)
    ts = load_targets(tmp_path)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()
            self.spare = nn.Identity()

        def forward(self, x):
            return self.feat(x)

    with pytest.raises(ConceptrankError, match="'spare' was not reached"):
        extract_activations(_loaded(Unused()), "spare", ts, CFG0)
    with pytest.raises(ConceptrankError, match="NaN/inf"):  # raised while 2 workers are decoding
        extract_activations(_loaded(NaNNet()), "feat", ts, ExtractConfig(workers=2, batch_size=1, device="cpu"))
