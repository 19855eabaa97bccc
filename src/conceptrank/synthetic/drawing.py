"""Drawing one object of the synthetic world: its shape, material pattern and parts.

Shapes are masks drawn with PIL; materials are periodic patterns in the object's own rotated frame;
parts are regions of the object painted in a contrasting shade of its colour (``rim`` an outline
band, ``core`` a centre dot, ``cap`` the top segment, ``eyes`` two small dots above the centre,
``stem`` a short stick under the object, ``tips`` the outer ends of a pointed shape). Which parts a
shape can carry is the world's ``OBJECT_PARTS`` table. Parts are drawn in ``PART_ORDER``; a later
part covers an earlier one, in the image and in the part label map alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PART_ORDER", "Geometry", "DrawnObject", "shape_mask", "draw_object"]

#: Drawing order of parts (later ones cover earlier ones).
PART_ORDER = ("cap", "rim", "tips", "stem", "eyes", "core")


@dataclass(frozen=True)
class Geometry:
    """Where an object goes: centre ``(cx, cy)`` and radius in pixels, rotation in radians."""

    cx: float
    cy: float
    radius: float
    angle: float


@dataclass(frozen=True)
class DrawnObject:
    """An object's pixels.

    Attributes
    ----------
    mask : np.ndarray (S, S) bool — the object (its shape plus its stem).
    surface : np.ndarray (S, S) bool — shape pixels not covered by a part (where its material lies).
    rgb : np.ndarray (S, S, 3) float32 — its colours (valid on ``mask``).
    parts : np.ndarray (S, S) int32 — ``PART_ORDER.index(part) + 1`` on each part's pixels, else 0.
    """

    mask: np.ndarray
    surface: np.ndarray
    rgb: np.ndarray
    parts: np.ndarray


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(1.1 * math.cos(t), 1.1 * math.sin(t) + 0.2) for t in np.radians([-90, 30, 150])]
    if shape == "star":
        return [((1.1 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
                 (1.1 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    if shape == "cross":
        a, b = 0.33, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "diamond":
        return [(0, -1.15), (0.62, 0), (0, 1.15), (-0.62, 0)]
    if shape == "hexagon":
        return [(0.95 * math.cos(t), 0.95 * math.sin(t)) for t in np.radians(np.arange(0, 360, 60))]
    if shape == "arrow":
        return [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.05, 0), (0.15, 0.6), (0.15, 0.22), (-1.0, 0.22)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3 / 16
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 16
        return list(zip(x.tolist(), (y + 0.15).tolist()))
    raise ValueError(f"no polygon for {shape!r}")  # pragma: no cover


def shape_mask(shape: str, g: Geometry, size: int) -> np.ndarray:
    """The ``(S, S)`` bool mask of ``shape`` at ``g`` (without parts that extend it, like ``stem``)."""
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    cx, cy, r = g.cx, g.cy, g.radius
    if shape in ("circle", "ring", "crescent"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        if shape == "ring":
            ri = 0.55 * r
            d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
        if shape == "crescent":
            ox, oy = cx + 0.5 * r * math.cos(g.angle), cy + 0.5 * r * math.sin(g.angle)
            ri = 0.85 * r
            d.ellipse([ox - ri, oy - ri, ox + ri, oy + ri], fill=0)
    else:
        c, s = math.cos(g.angle), math.sin(g.angle)
        d.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _unit_polygon(shape)], fill=1)
    return np.asarray(im, dtype=bool)


def stem_mask(g: Geometry, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """A short vertical stick under the object (its ``stem`` part)."""
    r = g.radius
    return (np.abs(X - g.cx) <= max(1.0, 0.16 * r)) & (Y >= g.cy + 0.55 * r) & (Y <= g.cy + 1.35 * r)


def _erode(m: np.ndarray, steps: int) -> np.ndarray:
    # Edge padding: an object cut by the image border has no rim along the border.
    out = m
    for _ in range(steps):
        p = np.pad(out, 1, mode="edge")
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def material_pattern(material: str, X, Y, g: Geometry, angle: float, period: float, phase: float) -> np.ndarray:
    """Where ``material``'s alternate tone goes, ``(S, S)`` bool, in the object's rotated frame."""
    c, s = math.cos(angle), math.sin(angle)
    u = (X - g.cx) * c + (Y - g.cy) * s + phase
    v = -(X - g.cx) * s + (Y - g.cy) * c + phase
    if material == "striped":
        return (u % period) < period / 2
    if material == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    if material == "checkered":
        return ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    if material == "wavy":
        return ((v + 0.3 * period * np.sin(2 * np.pi * u / (1.6 * period))) % period) < period / 2
    if material == "zigzag":
        return ((v + 1.2 * period * np.abs((u / (1.4 * period)) % 1.0 - 0.5)) % period) < period / 2
    if material == "ringed":
        return (np.hypot(X - g.cx, Y - g.cy) % (1.2 * period)) < 0.6 * period
    raise ValueError(f"unknown material {material!r}")  # pragma: no cover


def _lum(rgb) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _contrast(base: np.ndarray, strength: float) -> np.ndarray:
    """A shade of ``base`` that stands out from it: darker on light colours, lighter on dark ones."""
    return base * (1 - strength) if _lum(base) > 80 else np.minimum(base + 255 * strength, 255)


def part_regions(parts: tuple[str, ...], shape: np.ndarray, g: Geometry, X, Y) -> dict[str, np.ndarray]:
    """``(S, S)`` bool region of each of ``parts`` (``shape``: the shape mask without the stem)."""
    r = g.radius
    d2 = (X - g.cx) ** 2 + (Y - g.cy) ** 2
    out = {}
    for p in parts:
        if p == "rim":
            out[p] = shape & ~_erode(shape, max(2, int(round(r * 0.25))))
        elif p == "core":
            out[p] = shape & (d2 <= max(1.3, 0.3 * r) ** 2)
        elif p == "cap":
            out[p] = shape & (Y < g.cy - 0.35 * r)
        elif p == "tips":
            out[p] = shape & (d2 >= (0.68 * r) ** 2)
        elif p == "eyes":
            re = max(1.8, 0.24 * r) ** 2
            ey = g.cy - 0.25 * r
            out[p] = shape & (((X - g.cx - 0.42 * r) ** 2 + (Y - ey) ** 2 <= re) | ((X - g.cx + 0.42 * r) ** 2 + (Y - ey) ** 2 <= re))
        elif p == "stem":
            out[p] = stem_mask(g, X, Y) & ~shape
        else:  # pragma: no cover - parts come from OBJECT_PARTS
            raise ValueError(f"unknown part {p!r}")
    return out


_PART_STRENGTH = {"rim": 0.7, "core": 0.85, "cap": 0.5, "tips": 0.6, "eyes": 0.9, "stem": 0.55}


def draw_object(rng: np.random.Generator, spec, base: np.ndarray, g: Geometry, size: int) -> DrawnObject:
    """Paint one object (``spec``: an ``ObjectSpec``) of colour ``base`` at ``g``.

    The mask is the shape plus its ``stem`` when it has one; the part map holds
    ``PART_ORDER.index(part) + 1`` on each part's visible (not covered by a later part) pixels.
    """
    Y, X = np.mgrid[0:size, 0:size].astype(np.float32)
    shape = shape_mask(spec.shape, g, size)
    regions = part_regions(spec.parts, shape, g, X, Y)
    mask = shape | regions.get("stem", np.zeros_like(shape))
    phi = rng.uniform(0, 2 * np.pi)
    shade = 1 + 0.14 * np.clip(((X - g.cx) * math.cos(phi) + (Y - g.cy) * math.sin(phi)) / max(g.radius, 1), -1, 1)
    fill = base[None, None, :] * shade[..., None]
    if spec.material is not None:
        pat = material_pattern(spec.material, X, Y, g, rng.uniform(-np.pi, np.pi),
                               max(3.0, size * rng.uniform(0.07, 0.1)), rng.uniform(0, 10)) & shape
        fill[pat] = _contrast(base, 0.45) * shade[pat][:, None]
    part_map = np.zeros((size, size), np.int32)
    for k, p in enumerate(PART_ORDER, start=1):
        if p in regions:
            fill[regions[p]] = _contrast(base, _PART_STRENGTH[p])
            part_map[regions[p]] = k
    return DrawnObject(mask, shape & (part_map == 0), fill.astype(np.float32), part_map)
