"""Background painters of the synthetic world: one function per scene and per texture.

``SCENE_PAINTERS`` maps each scene name of :data:`conceptrank.synthetic.world.SCENES` (and ``None``,
the studio backdrop without a scene label) to a painter; ``TEXTURE_PAINTERS`` maps each texture of
:data:`conceptrank.synthetic.world.TEXTURES` to an overlay. Backgrounds carry no pixel labels: colour
labels lie on objects only (a scene's large areas of sky, sea or sand would give a colour so much
area that no unit could reach IoU 0.04 with it at a 0.005 activation quantile).

Every painter takes a :class:`Canvas` (the generator and pixel grids) and returns a float32
``(S, S, 3)`` RGB image in [0, 255] (not yet clipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

__all__ = ["Canvas", "SCENE_PAINTERS", "TEXTURE_PAINTERS", "paint_background", "apply_texture"]


@dataclass(frozen=True)
class Canvas:
    """A generator and the pixel grids of an ``S``×``S`` image.

    Attributes
    ----------
    rng : np.random.Generator
    size : int — ``S``.
    X, Y : np.ndarray (S, S) float32 — column and row of each pixel as a fraction of ``S``.
    """

    rng: np.random.Generator
    size: int
    X: np.ndarray
    Y: np.ndarray

    @classmethod
    def of(cls, rng: np.random.Generator, size: int) -> "Canvas":
        Y, X = np.mgrid[0:size, 0:size].astype(np.float32) / size
        return cls(rng, size, X, Y)

    def jitter(self, rgb, amount: int = 14) -> np.ndarray:
        """``rgb`` with each channel moved by a uniform integer in ``[-amount, amount]``."""
        return np.clip(np.asarray(rgb, np.float32) + self.rng.integers(-amount, amount + 1, 3), 0, 255)

    def lowfreq(self, cells: int) -> np.ndarray:
        """Smooth noise in about [-2, 2]: a ``cells``-grid of normals upsampled bilinearly."""
        g = self.rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
        return np.asarray(Image.fromarray(g, "F").resize((self.size, self.size), Image.BILINEAR), np.float32)

    def flat(self, rgb) -> np.ndarray:
        return np.broadcast_to(np.asarray(rgb, np.float32), (self.size, self.size, 3)).astype(np.float32)

    def wave(self, period: float) -> np.ndarray:
        """A horizon offset ``0.04·sin(2πX/period + φ)`` with random phase (shape ``(S, S)``)."""
        return 0.04 * np.sin(2 * np.pi * self.X / period + self.rng.uniform(0, 6.3))


def gradient(c1, c2, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend from colour ``c1`` (t=0) to ``c2`` (t=1); ``t`` (S, S) → (S, S, 3) float32."""
    t = np.clip(t, 0.0, 1.0)[..., None]
    return np.asarray(c1, np.float32) * (1 - t) + np.asarray(c2, np.float32) * t


def _split(below: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return np.where(below[..., None], lower, upper)


def _studio(c: Canvas) -> np.ndarray:
    # Neutral tones only: a coloured backdrop would look like a huge object of that colour.
    base = c.jitter(((22, 22, 24), (128, 128, 128), (240, 240, 240))[c.rng.integers(3)], 10)
    a = c.rng.uniform(0, 2 * np.pi)
    t = 0.5 + (c.X - 0.5) * np.cos(a) + (c.Y - 0.5) * np.sin(a)
    return gradient(base * 1.1, base * 0.8, t)


def _sky(c: Canvas) -> np.ndarray:
    X, Y = c.X, c.Y
    tilt = c.rng.uniform(-0.3, 0.3)
    rgb = gradient(c.jitter((70, 130, 225)), c.jitter((165, 200, 245)), Y + tilt * (X - 0.5))
    for _ in range(int(c.rng.integers(0, 4))):  # clouds
        cx, cy = c.rng.uniform(0, 1), c.rng.uniform(0, 0.8)
        rx, ry = c.rng.uniform(0.1, 0.25), c.rng.uniform(0.04, 0.09)
        rgb[((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1] = c.jitter((238, 240, 245), 8)
    return rgb


def _ocean(c: Canvas) -> np.ndarray:
    X, Y = c.X, c.Y
    h0 = c.rng.uniform(0.25, 0.45)
    sky = gradient(c.jitter((120, 170, 235)), c.jitter((185, 215, 245)), Y / h0)
    sea = gradient(c.jitter((25, 80, 160)), c.jitter((10, 40, 105)), (Y - h0) / (1 - h0))
    p, q = c.rng.uniform(0.07, 0.12), c.rng.uniform(0.3, 0.6)
    wave = np.sin(2 * np.pi * (Y / p + 0.35 * np.sin(2 * np.pi * X / q + c.rng.uniform(0, 6.3)))) > 0.55
    return _split(Y >= h0, sea + 35 * wave[..., None], sky)


def _forest(c: Canvas) -> np.ndarray:
    X, Y = c.X, c.Y
    rgb = gradient(c.jitter((30, 85, 30)), c.jitter((55, 125, 45)), Y)
    rgb = rgb * (1 + 0.22 * c.lowfreq(7))[..., None]
    for _ in range(int(c.rng.integers(2, 5))):  # trunks
        x0, w = c.rng.uniform(0, 0.95), c.rng.uniform(0.04, 0.08)
        top = c.rng.uniform(0.3, 0.6)
        rgb[(X >= x0) & (X < x0 + w) & (Y >= top)] = c.jitter((95, 62, 32), 10)
    return rgb


def _desert(c: Canvas) -> np.ndarray:
    X, Y = c.X, c.Y
    h0 = c.rng.uniform(0.15, 0.35)
    sky = gradient(c.jitter((130, 180, 235)), c.jitter((200, 220, 240)), Y / h0)
    sand = gradient(c.jitter((235, 200, 95)), c.jitter((215, 170, 70)), (Y - h0) / (1 - h0))
    q = c.rng.uniform(0.4, 0.8)
    dune = 1 + 0.1 * np.sin(2 * np.pi * (X / q + 2.5 * Y) + c.rng.uniform(0, 6.3))
    return _split(Y >= h0, sand * dune[..., None], sky)


def _night(c: Canvas) -> np.ndarray:
    X, Y, S = c.X, c.Y, c.size
    rgb = gradient(c.jitter((6, 6, 28), 5), c.jitter((22, 22, 55), 6), Y)
    rgb[c.rng.random((S, S)) < 0.012] = 235  # stars
    if c.rng.random() < 0.5:  # moon
        cx, cy, r = c.rng.uniform(0.1, 0.9), c.rng.uniform(0.05, 0.4), c.rng.uniform(0.05, 0.08)
        rgb[(X - cx) ** 2 + (Y - cy) ** 2 <= r * r] = c.jitter((235, 235, 215), 6)
    return rgb


def _room(c: Canvas) -> np.ndarray:
    X, Y, S = c.X, c.Y, c.size
    h0 = c.rng.uniform(0.55, 0.78)
    wall = gradient(c.jitter((180, 175, 165)), c.jitter((150, 146, 140)), Y / h0)
    floor = c.flat(c.jitter((125, 82, 45)))
    planks = (np.floor((Y - h0) * S / max(2.0, S * 0.06)) % 2) == 1
    rgb = _split(Y >= h0, floor * (1 - 0.15 * planks[..., None]), wall)
    if c.rng.random() < 0.6:  # window
        x0, y0 = c.rng.uniform(0.05, 0.6), c.rng.uniform(0.05, 0.25)
        w, h = c.rng.uniform(0.2, 0.35), c.rng.uniform(0.18, min(0.3, h0 - y0 - 0.05))
        rgb[(X >= x0) & (X < x0 + w) & (Y >= y0) & (Y < y0 + h)] = c.jitter((150, 190, 235))
    return rgb


def _snow(c: Canvas) -> np.ndarray:
    Y = c.Y
    h0 = c.rng.uniform(0.3, 0.5)
    sky = gradient(c.jitter((150, 152, 160)), c.jitter((195, 197, 205)), Y / h0)
    snow = gradient(c.jitter((240, 242, 248), 6), c.jitter((215, 222, 240), 6), (Y - h0) / (1 - h0))
    snow = snow * (1 - 0.07 * np.clip(c.lowfreq(4), 0, 2))[..., None]  # drifts
    return _split(Y >= h0 + c.wave(c.rng.uniform(0.5, 1.0)), snow, sky)


def _field(c: Canvas) -> np.ndarray:
    Y, S = c.Y, c.size
    h0 = c.rng.uniform(0.25, 0.5)
    sky = gradient(c.jitter((90, 150, 230)), c.jitter((175, 210, 245)), Y / h0)
    grass = gradient(c.jitter((110, 185, 60)), c.jitter((60, 140, 35)), (Y - h0) / (1 - h0))
    blades = c.rng.random((S, S)) < 0.25
    blades = blades | np.roll(blades, 1, axis=0)  # short vertical strokes
    return _split(Y >= h0, grass * (1 - 0.25 * blades[..., None]), sky)


def _street(c: Canvas) -> np.ndarray:
    X, Y, S = c.X, c.Y, c.size
    h_road = c.rng.uniform(0.65, 0.8)
    rgb = gradient(c.jitter((110, 165, 230)), c.jitter((170, 205, 240)), Y)
    x = c.rng.uniform(-0.1, 0.05)
    while x < 1:  # houses with windows
        w, top = c.rng.uniform(0.18, 0.35), c.rng.uniform(0.1, 0.45)
        brick = c.rng.random() < 0.5
        m = (X >= x) & (X < x + w) & (Y >= top) & (Y < h_road)
        rgb[m] = c.jitter((140, 88, 58) if brick else (118, 118, 124))
        win = m & ((X - x) * S % 6 < 3) & ((Y - top) * S % 7 < 3.5) & (X - x > 0.03) & (Y - top > 0.04)
        rgb[win] = c.jitter((35, 35, 45), 6)
        x += w + c.rng.uniform(0.0, 0.06)
    road = Y >= h_road
    rgb[road] = c.jitter((80, 80, 86))
    rgb[road & (np.abs(Y - (1 + h_road) / 2) < 0.025) & ((X * S) % 12 < 6)] = 235
    return rgb


def _sunset(c: Canvas) -> np.ndarray:
    X, Y = c.X, c.Y
    h0 = c.rng.uniform(0.55, 0.75)
    rgb = gradient(c.jitter((105, 45, 125)), c.jitter((250, 140, 45)), Y / h0)
    cx, r = c.rng.uniform(0.2, 0.8), c.rng.uniform(0.07, 0.12)
    rgb[(X - cx) ** 2 + (Y - h0 + 0.02) ** 2 <= r * r] = c.jitter((250, 225, 70), 6)
    rgb[Y >= h0 + 1.25 * c.wave(c.rng.uniform(0.4, 0.9))] = c.jitter((25, 18, 22), 6)
    return rgb


def _cave(c: Canvas) -> np.ndarray:
    X, Y = c.X, c.Y
    rgb = c.flat(c.jitter((85, 60, 40), 7)) * (1 + 0.3 * np.clip(c.lowfreq(8), -1.5, 1.5))[..., None]
    cx, cy = c.rng.uniform(0.3, 0.7), c.rng.uniform(0.35, 0.65)
    rx, ry = c.rng.uniform(0.15, 0.3), c.rng.uniform(0.2, 0.35)
    rgb[((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1] = c.jitter((15, 12, 10), 5)
    return rgb


def _beach(c: Canvas) -> np.ndarray:
    Y = c.Y
    h1 = c.rng.uniform(0.2, 0.35)
    h2 = h1 + c.rng.uniform(0.12, 0.22)
    sky = gradient(c.jitter((100, 165, 235)), c.jitter((180, 215, 245)), Y / h1)
    sea = c.flat(c.jitter((30, 120, 170)))
    sand = gradient(c.jitter((225, 205, 150)), c.jitter((240, 220, 165)), (Y - h2) / (1 - h2))
    shore = h2 + 0.75 * c.wave(c.rng.uniform(0.3, 0.6))
    rgb = _split(Y < h1, sky, _split(Y < shore, sea, sand))
    rgb[(Y >= shore) & (Y < shore + 0.03)] = 240  # foam
    return rgb


#: Scene name (``None``: studio backdrop) → painter.
SCENE_PAINTERS: dict[str | None, Callable[[Canvas], np.ndarray]] = {
    None: _studio,
    "sky-s": _sky,
    "forest-s": _forest,
    "desert-s": _desert,
    "ocean-s": _ocean,
    "night-s": _night,
    "room-s": _room,
    "snow-s": _snow,
    "field-s": _field,
    "street-s": _street,
    "sunset-s": _sunset,
    "cave-s": _cave,
    "beach-s": _beach,
}


def paint_background(rng: np.random.Generator, scene: str | None, size: int) -> np.ndarray:
    """The background of ``scene`` (``None``: studio backdrop) as float32 ``(S, S, 3)`` RGB."""
    c = Canvas.of(rng, size)
    rgb = SCENE_PAINTERS[scene](c)
    return (rgb * (1 + 0.06 * c.lowfreq(3))[..., None]).astype(np.float32)


def _banded(c: Canvas) -> np.ndarray:
    a = c.rng.uniform(0, np.pi)
    t = c.X * np.cos(a) + c.Y * np.sin(a)
    return 1 + 0.2 * np.sign(np.sin(2 * np.pi * t / c.rng.uniform(0.12, 0.2)))


def _flecked(c: Canvas) -> np.ndarray:
    S = c.size
    return 1 + c.rng.choice([-0.45, 0.45], (S, S)) * (c.rng.random((S, S)) < 0.12)


def _blotchy(c: Canvas) -> np.ndarray:
    return 1 + 0.3 * np.clip(c.lowfreq(6), -1.5, 1.5)


def _meshed(c: Canvas) -> np.ndarray:
    """A grid of thin dark lines."""
    period = c.rng.uniform(0.09, 0.13)
    u = (c.X + c.rng.uniform(0, 1)) % period
    v = (c.Y + c.rng.uniform(0, 1)) % period
    return 1 - 0.4 * ((u < period * 0.22) | (v < period * 0.22))


def _scratched(c: Canvas) -> np.ndarray:
    """Long thin bright scratches in random directions."""
    mult = np.ones((c.size, c.size), np.float32)
    for _ in range(int(c.rng.integers(6, 10))):
        a = c.rng.uniform(0, np.pi)
        d = (c.X - c.rng.uniform(0, 1)) * np.sin(a) - (c.Y - c.rng.uniform(0, 1)) * np.cos(a)
        mult[np.abs(d) < 0.6 / c.size + 0.004] = 1.5
    return mult


#: Texture name → multiplicative overlay painter (returns an ``(S, S)`` factor).
TEXTURE_PAINTERS: dict[str, Callable[[Canvas], np.ndarray]] = {
    "banded": _banded,
    "flecked": _flecked,
    "blotchy": _blotchy,
    "meshed": _meshed,
    "scratched": _scratched,
}


def apply_texture(rng: np.random.Generator, texture: str, rgb: np.ndarray) -> np.ndarray:
    """``rgb`` (S, S, 3) multiplied by the overlay of ``texture``."""
    mult = TEXTURE_PAINTERS[texture](Canvas.of(rng, rgb.shape[0]))
    return rgb * mult[..., None].astype(np.float32)
