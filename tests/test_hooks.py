"""Hooks that cannot lie: a layer that runs several times per forward pass, or returns a tuple,
is an error (or, by explicit option, every call is recorded)."""

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from conceptrank.errors import ConceptrankError
from conceptrank.nn.hooks import output_shapes, record_layers


def _resnet_stage() -> nn.Module:
    """A ResNet-50 style stage: torchvision's Bottleneck, whose relu runs after conv1, conv2 and the sum."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), Bottleneck(32, 8), Bottleneck(32, 8)).eval()


def test_module_running_three_times_per_forward_is_an_error():
    net = _resnet_stage()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), pytest.raises(ConceptrankError, match=r"'1\.relu' \(ReLU\) runs 2 times in one forward"):
        with record_layers(net, ["1.relu"]):
            net(x)
    assert not net[1].relu._forward_hooks and not net._forward_pre_hooks  # hooks removed
    with torch.no_grad(), record_layers(net, ["1.relu", "1"], calls="all") as rec:
        net(x)
        assert [t.shape[1] for t in rec["1.relu"]] == [8, 8, 32]  # every call, in order
        torch.testing.assert_close(rec["1.relu"][2], rec["1"][0])
        net(x)  # a new forward pass starts a new list
        assert len(rec["1.relu"]) == 3


def test_separate_forward_passes_are_not_repeated_calls():
    net = _resnet_stage()
    with torch.no_grad(), record_layers(net, ["2"]) as rec:
        for _ in range(2):
            rec.clear()
            net(torch.zeros(1, 3, 16, 16))
            assert rec["2"].shape == (1, 32, 16, 16)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


def test_tuple_output_is_an_error_not_its_first_element():
    net = TupleOut()
    with pytest.raises(ConceptrankError, match=r"layer 'lstm' returns a tuple, not a tensor"):
        with record_layers(net, ["lstm"]):
            net(torch.zeros(2, 5, 4))
    shapes = output_shapes(net, torch.zeros(2, 5, 4))  # the layer listing still describes it
    assert shapes["lstm"] == ["tuple"]
