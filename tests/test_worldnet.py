"""The synthetic world's source model: WorldNet, old ``conceptnet`` cards, load_model and the RNG,
the dense task's targets, the parts table, and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conceptrank.nn.models import load_model, save_model_card
from conceptrank.nn.nets import ARCHITECTURES, WorldNet
from conceptrank.synthetic.world import OBJECT_PARTS, PARTS, SHAPES, concept_vocabulary, probe_scene


@pytest.mark.parametrize("stride, stem_pool", [(8, False), (8, True), (4, False), (4, True)])
def test_worldnet_layer4_size(stride, stem_pool):
    net = WorldNet(num_classes=3, width=4, stem_pool=stem_pool, layer4_stride=stride).eval()
    with torch.no_grad():
        f = net.features(torch.zeros(1, 3, 64, 64))
        assert tuple(f.shape) == (1, 16, 64 // stride, 64 // stride)
        assert tuple(net(torch.zeros(2, 3, 64, 64)).shape) == (2, 3)


def test_old_conceptnet_cards_still_load(tmp_path):
    net = WorldNet(num_classes=5, width=4, stem_pool=True).eval()
    save_model_card(tmp_path / "m", net, "conceptnet", 5, (32, 32), (0.5,) * 3, (0.25,) * 3, {"width": 4, "stem_pool": True})
    m = load_model(str(tmp_path / "m"))
    assert isinstance(m.module, WorldNet) and set(ARCHITECTURES) >= {"worldnet", "conceptnet"}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(m.module(x).numpy(), net(x).numpy())


@pytest.mark.parametrize("spec", ["card", "resnet18"])
def test_load_model_leaves_the_global_rng_alone(tmp_path, spec):
    save_model_card(tmp_path / "m", WorldNet(num_classes=3, width=4), "worldnet", 3, (32, 32), (0.5,) * 3, (0.25,) * 3,
                    {"width": 4})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(str(tmp_path / "m") if spec == "card" else spec, None if spec == "card" else "none")
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_cell_coverage_by_hand():
    from conceptrank.synthetic.train import _cell_coverage

    plane = np.zeros((8, 8), np.int32)
    plane[0:2, 0:4] = 2  # 8 of cell (0, 0)'s 16 pixels
    plane[7, 7] = 1  # 1 pixel of cell (1, 1)
    part = np.zeros((8, 8), np.int32)
    part[0, 0] = 3
    cov = _cell_coverage([plane, part], 4, 3).astype(np.float64)
    assert cov.shape == (3, 2, 2)
    expected = np.zeros((3, 2, 2))
    expected[1, 0, 0] = 0.5
    expected[0, 1, 1] = 1 / 16
    expected[2, 0, 0] = 1 / 16
    np.testing.assert_allclose(cov, expected)


def test_parts_follow_the_object_parts_table():
    vocab = concept_vocabulary()
    assert set(OBJECT_PARTS) == set(SHAPES) and {p for ps in OBJECT_PARTS.values() for p in ps} == set(PARTS)
    seen = set()
    for i in range(40):
        sc = probe_scene(2, i, 64)
        obj, part = sc.planes["object"][0], sc.planes["part"][0]
        for n in np.unique(part[part > 0]):
            shapes = {vocab.names[s] for s in np.unique(obj[part == n])}
            name = vocab.names[n]
            assert all(name in OBJECT_PARTS[s] for s in shapes), (name, shapes)
            seen.add(name)
        for o in sc.objects:
            assert set(o.spec.parts) <= set(OBJECT_PARTS[o.spec.shape])
    assert seen == set(PARTS)


# -- the shipped model ---------------------------------------------------------------------------
def test_the_shipped_model_fits_the_default_world_and_reproduces_its_card():
    from PIL import Image

    from conceptrank.synthetic.build import SHIPPED_MODEL_DIR, shipped_model_fits
    from conceptrank.synthetic.train import TrainConfig, render_source_images

    fits, why = shipped_model_fits(64)
    assert fits, why  # after a change to the renderer or the training code: `make model`
    card = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())
    task = card["source_task"]
    assert card["architecture"] == "worldnet" and task["config"] == TrainConfig().to_json()
    assert {"command", "code_version", "seed"} <= set(card["provenance"])
    assert card["provenance"]["command"].startswith("conceptrank synth") and "--retrain" in card["provenance"]["command"]
    text = (SHIPPED_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert card["provenance"]["code_version"] in text and card["weights_sha256"] in text
    assert (SHIPPED_MODEL_DIR / "weights.safetensors").stat().st_size < 5 * 2**20
    m = load_model(str(SHIPPED_MODEL_DIR))
    images, _ = render_source_images(task["seed"], 64, 2, "heldout")
    x = torch.stack([m.to_tensor(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        np.testing.assert_allclose(m.module(x).numpy(), np.asarray(task["reference"]["logits"]), atol=1e-5, rtol=0)


def test_build_world_uses_the_shipped_model_when_it_fits_and_trains_otherwise(tmp_path):
    from conceptrank.synthetic.build import SHIPPED_MODEL_DIR, build_world
    from conceptrank.synthetic.train import TrainConfig

    said: list[str] = []
    w = build_world(tmp_path / "a", seed=5, size=64, probe_images=4, images_per_class=10, progress=False, echo=said.append)
    assert "shipped" in said[0] and w.model_note == "worldnet, shipped"
    assert (w.model_dir / "weights.safetensors").read_bytes() == (SHIPPED_MODEL_DIR / "weights.safetensors").read_bytes()
    said.clear()
    tiny = TrainConfig(train_images=32, epochs=1, heldout_images=8, width=16)
    w = build_world(tmp_path / "b", size=32, probe_images=4, images_per_class=10, config=tiny, progress=False,
                    echo=said.append)
    assert "training the source model" in said[0] and "32 px" in said[0] and w.model_note == "worldnet, trained here"
    assert json.loads((w.model_dir / "model.json").read_text())["source_task"]["config"]["width"] == 16
