"""Small CNN architectures that model cards can name (the synthetic world's source model).

The layout mirrors torchvision's ResNet naming (``conv1``, ``layer1`` … ``layer4``, ``fc``) so that
the same layer names work on the synthetic model and on a real ResNet.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["WorldNet", "ARCHITECTURES", "build_architecture"]


def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=False),
        )
    )


def _pool(on: bool) -> nn.Module:
    return nn.MaxPool2d(2) if on else nn.Identity()


class WorldNet(nn.Module):
    """A four-stage CNN, the synthetic world's source model (64 px input → 8×8 or 16×16 at ``layer4``).

    Parameters
    ----------
    num_classes : int
        Width of the output layer.
    width : int
        Channels of ``layer1``; later stages use 2×, 4× and 4× that.
    stem_pool : bool
        Pool right after ``conv1`` instead of after ``layer1`` (``layer1`` then runs at half
        resolution): the same ``layer4`` size at about 1.4x the training speed.
    layer4_stride : 8 or 4
        Input pixels per ``layer4`` cell. With 4, ``layer3`` and ``layer4`` run at a quarter of the
        input resolution and ``layer4`` is dilated (×2) to keep its receptive field: finer maps for
        Network Dissection (small parts become separable) at about 1.25x the cost.
    concept_units : int
        How many of ``layer4``'s first units are read, one each, as per-cell concept logits
        (``dense_scale[d] * layer4[d] + dense_bias[d]``, see :meth:`forward_dense`): the source
        task can then train them as concept detectors (a concept bottleneck, Koh et al. 2020). 0: none.

    Input ``(B, 3, H, W)`` → logits ``(B, num_classes)``; ``layer4`` outputs
    ``(B, 4*width, H/layer4_stride, W/layer4_stride)``. Pooling layers hold no weights, so cards saved
    with any setting load into the same parameter names.
    """

    def __init__(self, num_classes: int, width: int = 32, stem_pool: bool = False, layer4_stride: int = 8,
                 concept_units: int = 0) -> None:
        super().__init__()
        if layer4_stride not in (4, 8):
            raise ValueError(f"layer4_stride must be 4 or 8, got {layer4_stride}")
        fine = layer4_stride == 4
        pools = ([True, True, False, False] if fine else [True, False, True, True]) if stem_pool else \
            ([False, True, True, False] if fine else [False, True, True, True])
        self.conv1 = _block(3, width)
        self.pool0 = _pool(pools[0])
        self.layer1 = _block(width, width)
        self.pool1 = _pool(pools[1])
        self.layer2 = _block(width, 2 * width)
        self.pool2 = _pool(pools[2])
        self.layer3 = _block(2 * width, 4 * width)
        self.pool3 = _pool(pools[3])
        self.layer4 = _block(4 * width, 4 * width, dilation=2 if fine else 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        if not 0 <= concept_units <= 4 * width:
            raise ValueError(f"concept_units must be between 0 and {4 * width}, got {concept_units}")
        self.concept_units = concept_units
        if concept_units:
            self.dense_scale = nn.Parameter(torch.ones(concept_units))
            self.dense_bias = nn.Parameter(torch.full((concept_units,), -2.0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``layer4``'s output ``(B, 4*width, H/stride, W/stride)``."""
        x = self.layer1(self.pool0(self.conv1(x)))
        x = self.layer2(self.pool1(x))
        x = self.layer3(self.pool2(x))
        return self.layer4(self.pool3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, num_classes)`` and the concept units' per-cell logits ``(B, D, H/stride, W/stride)``."""
        f = self.features(x)
        d = self.concept_units
        dense = f[:, :d] * self.dense_scale.view(1, d, 1, 1) + self.dense_bias.view(1, d, 1, 1)
        return self.fc(torch.flatten(self.avgpool(f), 1)), dense


#: Deprecated name of :class:`WorldNet` (it collided with the ConceptNet knowledge graph); kept so
#: that code written against it still runs.
ConceptNet = WorldNet

#: Architecture names a model card may give; ``conceptnet`` is the name older cards use.
ARCHITECTURES = {"worldnet": WorldNet, "conceptnet": WorldNet}


def build_architecture(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a conceptrank architecture by name (see ``ARCHITECTURES``)."""
    if name not in ARCHITECTURES:
        raise KeyError(name)
    return ARCHITECTURES[name](num_classes=num_classes, **kwargs)
