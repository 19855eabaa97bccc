import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conceptrank.cli import app
from conceptrank.nn.hooks import UnknownLayerError, record_layers, resolve_layer
from conceptrank.nn.models import ModelError, list_layers, load_model, save_model_card
from conceptrank.nn.nets import ConceptNet

runner = CliRunner()


@pytest.fixture
def card(tmp_path):
    torch.manual_seed(0)
    net = ConceptNet(num_classes=5, width=4).eval()
    save_model_card(tmp_path / "m", net, "conceptnet", 5, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                    arch_kwargs={"width": 4})
    return tmp_path / "m", net


def test_card_round_trip(card):
    folder, net = card
    m = load_model(str(folder))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.module(x), net(x))
    assert m.input_size == (32, 32) and m.mean == (0.5, 0.5, 0.5)
    assert load_model(str(folder / "model.json")).fingerprint == m.fingerprint


def test_card_preprocessing(card):
    from PIL import Image

    m = load_model(str(card[0]))
    t = m.to_tensor(Image.new("RGB", (10, 20), (255, 0, 128)), (32, 32))
    assert t.shape == (3, 32, 32)
    assert torch.allclose(t[:, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-6)


def test_card_shape_mismatch_names_layer(card, tmp_path):
    folder, _ = card
    meta = json.loads((folder / "model.json").read_text())
    meta["num_classes"] = 7
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="shape mismatch at 'fc.weight'"):
        load_model(str(folder))


def test_unknown_model_lists_close_matches():
    with pytest.raises(ModelError, match="Did you mean: resnet152"):
        load_model("resnet15")


def test_enum_weights_absent_offline_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"resnet18-f37072fd.pth in .*checkpoints"):
        load_model("resnet18", "IMAGENET1K_V1")
    with pytest.raises(ModelError, match="unknown weights 'IMAGENET9K'"):
        load_model("resnet18", "IMAGENET9K")


def test_enum_weights_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    m = load_model("resnet18", "IMAGENET1K_V1")
    assert m.input_size == (224, 224)
    assert torch.equal(m.module.fc.weight, net.fc.weight)


def test_state_dict_file_with_dataparallel_prefix(tmp_path):
    import torchvision

    net = torchvision.models.resnet18()
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "w.pth")
    m = load_model("resnet18", str(tmp_path / "w.pth"))
    assert torch.equal(m.module.conv1.weight, net.conv1.weight)
    bad = net.state_dict()
    bad["fc.weight"] = torch.zeros(3, 512)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="shape mismatch at 'fc.weight'"):
        load_model("resnet18", str(tmp_path / "bad.pth"))


def test_random_init_is_reproducible():
    a, b = load_model("resnet18", "none"), load_model("resnet18", "none")
    assert torch.equal(a.module.conv1.weight, b.module.conv1.weight)


def test_hooks_removed_even_on_error(card):
    net = card[1]
    with pytest.raises(RuntimeError):
        with record_layers(net, ["layer4", "layer1.conv"]):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(UnknownLayerError, match="Did you mean: layer4"):
        resolve_layer(net, "layer5")


def test_list_layers_shapes(card):
    rows = dict((n, s) for n, _, s in list_layers(load_model(str(card[0]))))
    assert rows["layer4"] == (1, 16, 4, 4)
    assert rows["layer1.conv"] == (1, 4, 32, 32)


def test_cli_layers_and_errors(card):
    r = runner.invoke(app, ["layers", "--model", str(card[0])])
    assert r.exit_code == 0 and "layer4" in r.output and "1x16x4x4" in r.output
    r = runner.invoke(app, ["layers", "--model", "resnet15"])
    assert r.exit_code == 2 and "Did you mean: resnet152" in r.output
    r = runner.invoke(app, ["dissect", "--model", str(card[0]), "--layer", "layer5", "--probe", "nowhere", "--out", "x"])
    assert r.exit_code == 2


def test_help_is_fast_and_lazy():
    code = "import sys, conceptrank.cli; assert 'torch' not in sys.modules, 'torch imported at CLI import'"
    subprocess.run([sys.executable, "-c", code], check=True)
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ["synth", "layers", "dissect", "extract", "rank", "evaluate", "report", "demo", "run", "fetch"]:
        assert cmd in r.output


def test_hook_records_value_before_inplace_ops():
    import torchvision

    net = torchvision.models.resnet18().eval()
    with torch.no_grad(), record_layers(net, ["bn1"]) as rec:
        net(torch.randn(1, 3, 64, 64))
    assert rec["bn1"].min() < 0  # bn1 is followed by ReLU(inplace=True)
