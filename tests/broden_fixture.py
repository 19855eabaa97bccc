"""Tiny hand-built Broden probe sets for dissect tests, with a model whose units detect known concepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from conceptrank.io.broden import WriterRow, encode_mask, write_broden
from conceptrank.nn.models import LoadedModel

# Concept colours: object labels 1..4 are solid squares of these colours.
COLORS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}
LABELS = [
    (1, "redthing", "object"),
    (2, "greenthing", "object"),
    (3, "bluething", "object"),
    (4, "yellowthing", "object"),
    (5, "bg", "part"),
    (7, "street-s", "scene"),  # label-number gap: 6 is unused
    (8, "park-s", "scene"),
]


def make_planted_probe(root: Path, n: int = 24, size: int = 32, seg: int = 16, seed: int = 0) -> Path:
    """A Broden set where each image holds one square of each colour (objects), a second mask plane
    (part 'bg' = background pixels), and an image-level scene label."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images" / "sub").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = np.full((size, size, 3), 128, np.uint8)
        lab = np.zeros((size, size), np.int32)
        # one square of each colour, one per quadrant, aligned to the model's 4-px pooling grid
        q, s = size // 2, size // 4
        for (qy, qx), obj in zip([(0, 0), (0, 1), (1, 0), (1, 1)], rng.permutation([1, 2, 3, 4])):
            y = qy * q + 4 * int(rng.integers(0, (q - s) // 4 + 1))
            x = qx * q + 4 * int(rng.integers(0, (q - s) // 4 + 1))
            img[y:y + s, x:x + s] = COLORS[int(obj)]
            lab[y:y + s, x:x + s] = obj
        name = f"sub/img{i:03d}.png"  # lossless so masks match pixels exactly
        Image.fromarray(img).save(root / "images" / name)
        step = size // seg
        small = lab[step // 2::step, step // 2::step]
        encode_mask(small).save(root / "images" / f"sub/img{i:03d}_object.png")
        encode_mask(np.where(small == 0, 5, 0)).save(root / "images" / f"sub/img{i:03d}_part_1.png")
        rows.append(WriterRow(name, "train", size, size, seg, seg, {
            "object": [f"sub/img{i:03d}_object.png"],
            "part": [f"sub/img{i:03d}_part_1.png"],
            "scene": [7 if i % 2 == 0 else 8],
        }))
    write_broden(root, ["color", "object", "part", "scene"], LABELS, rows)
    return root


class PlantedNet(nn.Module):
    """Unit i (i < 4) responds to the colour of object label i+1, pooled to (H/4, W/4); units 4.. are noise."""

    def __init__(self, noise_units: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.noise_units = noise_units
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("colors", torch.tensor([COLORS[k] for k in (1, 2, 3, 4)], dtype=torch.float32) / 255.0)
        self.register_buffer("noise", torch.rand(64, noise_units, 64, 64, generator=g))
        self.units = nn.Identity()
        self.pool = nn.AvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = ((x[:, None] - self.colors[None, :, :, None, None]) ** 2).sum(dim=2)  # (B, 4, H, W)
        detect = self.pool(torch.exp(-d / 0.05))
        h, w = detect.shape[-2:]
        noise = self.noise[: x.shape[0], :, :h, :w]
        return self.units(torch.cat([detect, noise], dim=1))


def planted_model(noise_units: int = 2) -> LoadedModel:
    net = PlantedNet(noise_units).eval()
    return LoadedModel(net, "planted", "none", (32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "planted-fingerprint")
