"""Small CNN architectures that model cards can name (the synthetic world's source model).

The layout mirrors torchvision's ResNet naming (``conv1``, ``layer1`` … ``layer4``, ``fc``) so that
the same layer names work on the synthetic model and on a real ResNet.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ConceptNet", "ARCHITECTURES", "build_architecture"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=False),
        )
    )


class ConceptNet(nn.Module):
    """A four-stage CNN: each stage halves the resolution (64 px input → 8×8 at ``layer4``).

    Parameters
    ----------
    num_classes : int
        Width of the output layer.
    width : int
        Channels of ``layer1``; later stages use 2×, 4× and 4× that.
    stem_pool : bool
        Pool right after ``conv1`` instead of after ``layer1`` (``layer1`` then runs at half
        resolution): the same ``layer4`` size at about 1.4x the training speed, which buys the
        synthetic world's source model more epochs within its time budget.

    Input ``(B, 3, H, W)`` → logits ``(B, num_classes)``; ``layer4`` outputs ``(B, 4*width, H/8, W/8)``.
    """

    def __init__(self, num_classes: int, width: int = 32, stem_pool: bool = False) -> None:
        super().__init__()
        self.conv1 = _block(3, width)
        self.pool0 = nn.MaxPool2d(2) if stem_pool else nn.Identity()
        self.layer1 = _block(width, width)
        self.pool1 = nn.Identity() if stem_pool else nn.MaxPool2d(2)
        self.layer2 = _block(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.layer3 = _block(2 * width, 4 * width)
        self.pool3 = nn.MaxPool2d(2)
        self.layer4 = _block(4 * width, 4 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.pool0(self.conv1(x)))
        x = self.layer2(self.pool1(x))
        x = self.layer3(self.pool2(x))
        x = self.layer4(self.pool3(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHITECTURES = {"conceptnet": ConceptNet}


def build_architecture(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a conceptrank architecture by name (see ``ARCHITECTURES``)."""
    if name not in ARCHITECTURES:
        raise KeyError(name)
    return ARCHITECTURES[name](num_classes=num_classes, **kwargs)
