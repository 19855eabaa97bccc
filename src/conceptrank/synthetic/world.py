"""The synthetic concept world: a probe set, a labelled target set, ground truth and a source model.

Everything is drawn by one scene renderer (:func:`render_scene`) so that the probe set's masks, the
target set's ground truth and the source model's training data agree about what each concept looks
like. A scene is a background (one of six *scenes*, optionally overlaid with a *texture*) with 1–4
*objects*: a shape in a *colour*, filled plain or with a *material* pattern, optionally with *parts*
(a dark ``rim`` around its outline, a contrasting ``core`` dot at its centre). Later objects occlude
earlier ones and every label map holds only what is visible.

``generate_world(out)`` writes::

    out/probe/      a Broden-format probe set (see shared/spec/broden-format.md)
    out/target/     a Stanford-40-layout target set whose classes are defined by planted concepts
    out/truth.json  per-class planted concepts, per-image visible concepts, concept categories
    out/model/      a ConceptNet model card trained on the world's source task (optional)

The same seed gives byte-identical files: every random draw comes from a ``numpy`` generator seeded
with ``(seed, stream, index…)``, images are JPEGs of fixed quality and masks PNGs.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from conceptrank.errors import ConceptrankError
from conceptrank.io.broden import WriterRow, encode_mask, write_broden

__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "PARTS",
    "MATERIALS",
    "SCENES",
    "TEXTURES",
    "TARGET_CLASSES",
    "JPEG_QUALITY",
    "Vocabulary",
    "ObjectSpec",
    "SceneSpec",
    "PlacedObject",
    "RenderedScene",
    "WorldInfo",
    "concept_vocabulary",
    "render_scene",
    "random_scene_spec",
    "class_scene_spec",
    "probe_scene",
    "target_scene",
    "source_scene",
    "downsample_labels",
    "jpeg_roundtrip",
    "generate_world",
]

# -- the concept vocabulary -------------------------------------------------------------------
CATEGORIES = ("color", "object", "part", "material", "scene", "texture")

#: Broden's eleven colour names with a prototype RGB each.
COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black-c", (22, 22, 24)),
    ("blue-c", (40, 80, 215)),
    ("brown-c", (125, 78, 38)),
    ("green-c", (40, 160, 50)),
    ("grey-c", (128, 128, 128)),
    ("orange-c", (245, 135, 20)),
    ("pink-c", (245, 150, 195)),
    ("purple-c", (125, 45, 170)),
    ("red-c", (210, 30, 30)),
    ("white-c", (240, 240, 240)),
    ("yellow-c", (240, 220, 40)),
)
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
PARTS = ("rim", "core")
MATERIALS = ("striped", "dotted", "checkered", "wavy")
SCENES = (
    "sky-s", "forest-s", "desert-s", "ocean-s", "night-s", "room-s",
    "snow-s", "field-s", "street-s", "sunset-s", "cave-s", "beach-s",
)
TEXTURES = ("banded", "flecked", "blotchy")

#: Target classes and the concepts that define them (shared between classes, unique per class).
TARGET_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("juggling", ("circle", "red-c", "dotted")),
    ("fishing", ("ring", "blue-c", "wavy", "ocean-s")),
    ("gardening", ("diamond", "green-c", "forest-s")),
    ("climbing", ("triangle", "grey-c", "sky-s")),
    ("stargazing", ("star", "yellow-c", "night-s")),
    ("cooking", ("square", "orange-c", "room-s")),
    ("sailing", ("triangle", "white-c", "ocean-s")),
    ("riding_a_camel", ("brown-c", "desert-s")),
    ("playing_chess", ("square", "checkered", "room-s")),
    ("blowing_bubbles", ("ring", "pink-c", "sky-s")),
)

JPEG_QUALITY = 90
_KEEP_P = 0.8  # probability that a planted concept is kept in a target image
_TEXTURE_P = 0.3  # probability that a background carries a texture
# Share of probe images on a studio backdrop without a scene label. Image-level labels make a unit's
# IoU at most quantile / (share of images with the label), so with every image carrying one of 12
# scenes no scene unit could pass IoU 0.04 at NetDissect's 0.005 quantile. 0.55 rather than 0.4
# raised the reachable ground-truth precision (more scene detectors) on seed 0.
_STUDIO_P = 0.55
_MIN_VISIBLE = 0.5  # an object keeps at least this fraction of its pixels when others land on it

# Random streams: each (seed, stream, index...) tuple seeds its own generator, so e.g. the probe
# set does not change when the number of target images does.
_STREAM_PROBE, _STREAM_TARGET, _STREAM_SPLIT, _STREAM_SOURCE_TRAIN, _STREAM_SOURCE_HELDOUT = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Vocabulary:
    """The world's labels with their global Broden numbers (colours first, 1-based).

    Attributes
    ----------
    labels : tuple of (number, name, category)
    number : dict name → number
    category : dict name → category
    names : tuple of str, index = number (index 0 is '')
    """

    labels: tuple[tuple[int, str, str], ...]
    number: Mapping[str, int]
    category: Mapping[str, str]
    names: tuple[str, ...]

    def of(self, category: str) -> tuple[str, ...]:
        """Names of the labels in ``category`` in number order."""
        return tuple(n for _, n, c in self.labels if c == category)


def concept_vocabulary() -> Vocabulary:
    """The synthetic world's label table (the same for every seed)."""
    groups = (
        ("color", tuple(n for n, _ in COLORS)),
        ("object", SHAPES),
        ("part", PARTS),
        ("material", MATERIALS),
        ("scene", SCENES),
        ("texture", TEXTURES),
    )
    labels = []
    for cat, names in groups:
        for name in names:
            labels.append((len(labels) + 1, name, cat))
    return Vocabulary(
        labels=tuple(labels),
        number={n: k for k, n, _ in labels},
        category={n: c for _, n, c in labels},
        names=("",) + tuple(n for _, n, _ in labels),
    )


# -- scene specifications -----------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """What an object looks like; where it goes is drawn by the renderer.

    ``scale`` is the ``(min, max)`` radius as a fraction of the image side.
    """

    shape: str
    color: str
    material: str | None = None
    rim: bool = False
    core: bool = False
    scale: tuple[float, float] = (0.12, 0.24)
    planted: bool = False


@dataclass(frozen=True)
class SceneSpec:
    """A background scene, an optional texture over it, and objects in drawing order.

    ``scene`` None is a plain studio backdrop in one colour that carries no scene label (like the
    object-centric sources of the real Broden, which have no scene annotation).
    """

    scene: str | None
    texture: str | None
    objects: tuple[ObjectSpec, ...]


@dataclass(frozen=True)
class PlacedObject:
    """An object as drawn: centre and radius in pixels, rotation in radians, visible pixel count."""

    spec: ObjectSpec
    cx: float
    cy: float
    radius: float
    angle: float
    visible: int


@dataclass(frozen=True)
class RenderedScene:
    """A rendered scene with full-resolution ground truth.

    Attributes
    ----------
    image : np.ndarray (S, S, 3) uint8, before JPEG compression.
    planes : dict category → tuple of (S, S) int32 label maps holding global label numbers
        (``color``: 1 plane, ``object``: 1, ``part``: 2 (rim, core), ``material``: 1).
    image_labels : dict category → tuple of label numbers (``scene``: 1, ``texture``: 0 or 1).
    concepts : frozenset of str — every concept visible in the image (names as in label.csv).
    objects : tuple of PlacedObject, in drawing order.
    spec : SceneSpec — what was rendered.
    """

    image: np.ndarray
    planes: dict[str, tuple[np.ndarray, ...]]
    image_labels: dict[str, tuple[int, ...]]
    concepts: frozenset[str]
    objects: tuple[PlacedObject, ...]
    spec: SceneSpec

    def main_object(self) -> PlacedObject | None:
        """The object with most visible pixels (the first one on ties), None if nothing is visible."""
        best = None
        for o in self.objects:
            if o.visible > 0 and (best is None or o.visible > best.visible):
                best = o
        return best


def _random_object(rng: np.random.Generator, scale=(0.12, 0.24)) -> ObjectSpec:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))][0]
    material = MATERIALS[rng.integers(len(MATERIALS))] if rng.random() < 0.55 else None
    return ObjectSpec(
        shape=shape,
        color=color,
        material=material,
        rim=bool(rng.random() < 0.5),
        core=bool(rng.random() < 0.45) and shape != "ring",  # a ring's centre is its hole
        scale=scale,
    )


def _random_texture(rng: np.random.Generator) -> str | None:
    return TEXTURES[rng.integers(len(TEXTURES))] if rng.random() < _TEXTURE_P else None


def random_scene_spec(
    rng: np.random.Generator,
    min_objects: int = 1,
    max_objects: int = 4,
    scale=(0.12, 0.28),
    studio_p: float = 0.0,
) -> SceneSpec:
    """A scene with random background, texture and ``min_objects``–``max_objects`` random objects.

    With probability ``studio_p`` the background is a studio backdrop without a scene label.
    """
    scene = None if rng.random() < studio_p else SCENES[rng.integers(len(SCENES))]
    texture = _random_texture(rng)
    n = int(rng.integers(min_objects, max_objects + 1))
    return SceneSpec(scene, texture, tuple(_random_object(rng, scale) for _ in range(n)))


def _other(rng: np.random.Generator, choices: Sequence, avoid) -> object:
    rest = [c for c in choices if c != avoid]
    return rest[rng.integers(len(rest))]


def class_scene_spec(rng: np.random.Generator, planted: Sequence[str]) -> SceneSpec:
    """A scene that plants a class's concepts, each kept with probability 0.8 (at least two kept).

    Object concepts become planted objects (the first one takes the class's colour and material;
    a class with a colour or material but no shape gets a planted object of random shape). A dropped
    concept is replaced by a random different value. One or two random distractor objects are added
    and all objects are drawn in random order.
    """
    vocab_cat = concept_vocabulary().category
    planted = list(planted)
    keep = [bool(rng.random() < _KEEP_P) for _ in planted]
    while sum(keep) < min(2, len(planted)):
        dropped = [i for i, k in enumerate(keep) if not k]
        keep[dropped[rng.integers(len(dropped))]] = True
    kept = {c for c, k in zip(planted, keep) if k}

    by_cat: dict[str, list[str]] = {}
    for c in planted:
        by_cat.setdefault(vocab_cat[c], []).append(c)

    def pick(choices: Sequence, concept, default):
        if concept is None:
            return default
        return concept if concept in kept else _other(rng, choices, concept)

    scene_c = (by_cat.get("scene") or [None])[0]
    color_c = (by_cat.get("color") or [None])[0]
    material_c = (by_cat.get("material") or [None])[0]
    scene = pick(SCENES, scene_c, SCENES[rng.integers(len(SCENES))])
    shapes = by_cat.get("object") or ([] if color_c is None and material_c is None else [None])
    objects = []
    for k, shape_c in enumerate(shapes):
        rand = _random_object(rng)
        shape = pick(SHAPES, shape_c, rand.shape)
        color, material = rand.color, rand.material
        if k == 0:
            color = pick([n for n, _ in COLORS], color_c, color)
            material = pick(list(MATERIALS) + [None], material_c, material)
        objects.append(
            ObjectSpec(shape, color, material, rand.rim, rand.core and shape != "ring", (0.19, 0.3), planted=True)
        )
    n_distract = int(rng.integers(1, 3))
    objects += [_random_object(rng, (0.11, 0.2)) for _ in range(n_distract)]
    order = rng.permutation(len(objects))
    return SceneSpec(scene, _random_texture(rng), tuple(objects[i] for i in order))


# -- drawing ------------------------------------------------------------------------------------
def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-2, 2]: a ``cells``-grid of normals upsampled bilinearly."""
    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(g, "F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def _gradient(c1, c2, t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)[..., None]
    return np.asarray(c1, np.float32) * (1 - t) + np.asarray(c2, np.float32) * t


def _jitter(rng: np.random.Generator, rgb, amount: int = 14) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255)


def _background(rng: np.random.Generator, scene: str | None, size: int, cnum: Mapping[str, int]):
    """Background RGB (float32, S×S×3) and its colour label map (int32, global numbers)."""
    S = size
    Y, X = np.mgrid[0:S, 0:S].astype(np.float32) / S
    lab = np.zeros((S, S), np.int32)
    if scene is None:  # studio backdrop: a neutral tone, a soft gradient, no scene
        # Neutral only: a red backdrop would add a whole image to red-c's area and drown the IoU of
        # units that detect red objects.
        name = ("black-c", "grey-c", "white-c")[rng.integers(3)]
        rgb0 = dict(COLORS)[name]
        a = rng.uniform(0, 2 * np.pi)
        t = 0.5 + (X - 0.5) * np.cos(a) + (Y - 0.5) * np.sin(a)
        base = _jitter(rng, rgb0, 10)
        rgb = _gradient(base * 1.1, base * 0.8, t)
        lab[:] = cnum[name]
    elif scene == "sky-s":
        tilt = rng.uniform(-0.3, 0.3)
        rgb = _gradient(_jitter(rng, (70, 130, 225)), _jitter(rng, (165, 200, 245)), Y + tilt * (X - 0.5))
        lab[:] = cnum["blue-c"]
        for _ in range(int(rng.integers(0, 4))):
            cx, cy = rng.uniform(0, 1), rng.uniform(0, 0.8)
            rx, ry = rng.uniform(0.1, 0.25), rng.uniform(0.04, 0.09)
            m = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1
            rgb[m] = _jitter(rng, (238, 240, 245), 8)
            lab[m] = cnum["white-c"]
    elif scene == "ocean-s":
        h0 = rng.uniform(0.25, 0.45)
        sky = _gradient(_jitter(rng, (120, 170, 235)), _jitter(rng, (185, 215, 245)), Y / h0)
        sea = _gradient(_jitter(rng, (25, 80, 160)), _jitter(rng, (10, 40, 105)), (Y - h0) / (1 - h0))
        p, q = rng.uniform(0.07, 0.12), rng.uniform(0.3, 0.6)
        wave = np.sin(2 * np.pi * (Y / p + 0.35 * np.sin(2 * np.pi * X / q + rng.uniform(0, 6.3)))) > 0.55
        sea = sea + 35 * wave[..., None]
        below = Y >= h0
        rgb = np.where(below[..., None], sea, sky)
        lab[:] = cnum["blue-c"]
    elif scene == "forest-s":
        rgb = _gradient(_jitter(rng, (30, 85, 30)), _jitter(rng, (55, 125, 45)), Y)
        rgb = rgb * (1 + 0.22 * _lowfreq(rng, S, 7))[..., None]
        lab[:] = cnum["green-c"]
        for _ in range(int(rng.integers(2, 5))):
            x0, w = rng.uniform(0, 0.95), rng.uniform(0.04, 0.08)
            top = rng.uniform(0.3, 0.6)
            m = (X >= x0) & (X < x0 + w) & (Y >= top)
            rgb[m] = _jitter(rng, (95, 62, 32), 10)
            lab[m] = cnum["brown-c"]
    elif scene == "desert-s":
        h0 = rng.uniform(0.15, 0.35)
        sky = _gradient(_jitter(rng, (130, 180, 235)), _jitter(rng, (200, 220, 240)), Y / h0)
        sand = _gradient(_jitter(rng, (235, 200, 95)), _jitter(rng, (215, 170, 70)), (Y - h0) / (1 - h0))
        q = rng.uniform(0.4, 0.8)
        dune = 1 + 0.1 * np.sin(2 * np.pi * (X / q + 2.5 * Y) + rng.uniform(0, 6.3))
        sand = sand * dune[..., None]
        below = Y >= h0
        rgb = np.where(below[..., None], sand, sky)
        lab[:] = np.where(below, cnum["yellow-c"], cnum["blue-c"])
    elif scene == "night-s":
        rgb = _gradient(_jitter(rng, (6, 6, 28), 5), _jitter(rng, (22, 22, 55), 6), Y)
        lab[:] = cnum["black-c"]
        stars = rng.random((S, S)) < 0.012
        rgb[stars] = 235
        lab[stars] = cnum["white-c"]
        if rng.random() < 0.5:
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.08)
            m = (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
            rgb[m] = _jitter(rng, (235, 235, 215), 6)
            lab[m] = cnum["white-c"]
    elif scene == "room-s":
        h0 = rng.uniform(0.55, 0.78)
        wall = _gradient(_jitter(rng, (180, 175, 165)), _jitter(rng, (150, 146, 140)), Y / h0)
        floor = np.broadcast_to(_jitter(rng, (125, 82, 45)), (S, S, 3)).astype(np.float32)
        planks = (np.floor((Y - h0) * S / max(2.0, S * 0.06)) % 2) == 1
        floor = floor * (1 - 0.15 * planks[..., None])
        below = Y >= h0
        rgb = np.where(below[..., None], floor, wall)
        lab[:] = np.where(below, cnum["brown-c"], cnum["grey-c"])
        if rng.random() < 0.6:
            x0, y0 = rng.uniform(0.05, 0.6), rng.uniform(0.05, 0.25)
            w, h = rng.uniform(0.2, 0.35), rng.uniform(0.18, min(0.3, h0 - y0 - 0.05))
            m = (X >= x0) & (X < x0 + w) & (Y >= y0) & (Y < y0 + h)
            rgb[m] = _jitter(rng, (150, 190, 235))
            lab[m] = cnum["blue-c"]
    elif scene == "snow-s":
        h0 = rng.uniform(0.3, 0.5)
        sky = _gradient(_jitter(rng, (150, 152, 160)), _jitter(rng, (195, 197, 205)), Y / h0)
        snow = _gradient(_jitter(rng, (240, 242, 248), 6), _jitter(rng, (215, 222, 240), 6), (Y - h0) / (1 - h0))
        snow = snow * (1 - 0.07 * np.clip(_lowfreq(rng, S, 4), 0, 2))[..., None]  # drifts
        below = Y >= h0 + 0.04 * np.sin(2 * np.pi * X / rng.uniform(0.5, 1.0) + rng.uniform(0, 6.3))
        rgb = np.where(below[..., None], snow, sky)
        lab[:] = np.where(below, cnum["white-c"], cnum["grey-c"])
    elif scene == "field-s":
        h0 = rng.uniform(0.25, 0.5)
        sky = _gradient(_jitter(rng, (90, 150, 230)), _jitter(rng, (175, 210, 245)), Y / h0)
        grass = _gradient(_jitter(rng, (110, 185, 60)), _jitter(rng, (60, 140, 35)), (Y - h0) / (1 - h0))
        blades = rng.random((S, S)) < 0.25
        blades = blades | np.roll(blades, 1, axis=0)  # short vertical strokes
        grass = grass * (1 - 0.25 * blades[..., None])
        below = Y >= h0
        rgb = np.where(below[..., None], grass, sky)
        lab[:] = np.where(below, cnum["green-c"], cnum["blue-c"])
    elif scene == "street-s":
        h_road = rng.uniform(0.65, 0.8)
        rgb = _gradient(_jitter(rng, (110, 165, 230)), _jitter(rng, (170, 205, 240)), Y)
        lab[:] = cnum["blue-c"]
        x = rng.uniform(-0.1, 0.05)
        while x < 1:
            w, top = rng.uniform(0.18, 0.35), rng.uniform(0.1, 0.45)
            name = "brown-c" if rng.random() < 0.5 else "grey-c"
            base = _jitter(rng, (140, 88, 58) if name == "brown-c" else (118, 118, 124))
            m = (X >= x) & (X < x + w) & (Y >= top) & (Y < h_road)
            rgb[m] = base
            lab[m] = cnum[name]
            win = m & ((X - x) * S % 6 < 3) & ((Y - top) * S % 7 < 3.5) & (X - x > 0.03) & (Y - top > 0.04)
            rgb[win] = _jitter(rng, (35, 35, 45), 6)
            lab[win] = cnum["black-c"]
            x += w + rng.uniform(0.0, 0.06)
        road = Y >= h_road
        rgb[road] = _jitter(rng, (80, 80, 86))
        lab[road] = cnum["grey-c"]
        dash = road & (np.abs(Y - (1 + h_road) / 2) < 0.025) & ((X * S) % 12 < 6)
        rgb[dash] = 235
        lab[dash] = cnum["white-c"]
    elif scene == "sunset-s":
        h0 = rng.uniform(0.55, 0.75)
        t = Y / h0
        rgb = _gradient(_jitter(rng, (105, 45, 125)), _jitter(rng, (250, 140, 45)), t)
        lab[:] = np.where(t < 0.5, cnum["purple-c"], cnum["orange-c"])
        cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.07, 0.12)
        sun = (X - cx) ** 2 + (Y - h0 + 0.02) ** 2 <= r * r
        rgb[sun] = _jitter(rng, (250, 225, 70), 6)
        lab[sun] = cnum["yellow-c"]
        ground = Y >= h0 + 0.05 * np.sin(2 * np.pi * X / rng.uniform(0.4, 0.9) + rng.uniform(0, 6.3))
        rgb[ground] = _jitter(rng, (25, 18, 22), 6)
        lab[ground] = cnum["black-c"]
    elif scene == "cave-s":
        rgb = np.broadcast_to(_jitter(rng, (85, 60, 40), 7), (S, S, 3)).astype(np.float32)
        rgb = rgb * (1 + 0.3 * np.clip(_lowfreq(rng, S, 8), -1.5, 1.5))[..., None]
        lab[:] = cnum["brown-c"]
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.65)
        rx, ry = rng.uniform(0.15, 0.3), rng.uniform(0.2, 0.35)
        hole = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1
        rgb[hole] = _jitter(rng, (15, 12, 10), 5)
        lab[hole] = cnum["black-c"]
    elif scene == "beach-s":
        h1 = rng.uniform(0.2, 0.35)
        h2 = h1 + rng.uniform(0.12, 0.22)
        sky = _gradient(_jitter(rng, (100, 165, 235)), _jitter(rng, (180, 215, 245)), Y / h1)
        sea = np.broadcast_to(_jitter(rng, (30, 120, 170)), (S, S, 3)).astype(np.float32)
        sand = _gradient(_jitter(rng, (225, 205, 150)), _jitter(rng, (240, 220, 165)), (Y - h2) / (1 - h2))
        shore = h2 + 0.03 * np.sin(2 * np.pi * X / rng.uniform(0.3, 0.6) + rng.uniform(0, 6.3))
        rgb = np.where((Y < h1)[..., None], sky, np.where((Y < shore)[..., None], sea, sand))
        foam = (Y >= shore) & (Y < shore + 0.03)
        rgb[foam] = 240
        lab[:] = np.where(Y < shore, cnum["blue-c"], cnum["yellow-c"])
        lab[foam] = cnum["white-c"]
    else:  # pragma: no cover - specs come from SCENES
        raise ValueError(f"unknown scene {scene!r}")
    rgb = rgb * (1 + 0.06 * _lowfreq(rng, S, 3))[..., None]
    return rgb.astype(np.float32), lab


def _texture(rng: np.random.Generator, texture: str, rgb: np.ndarray) -> np.ndarray:
    S = rgb.shape[0]
    Y, X = np.mgrid[0:S, 0:S].astype(np.float32) / S
    if texture == "banded":
        a = rng.uniform(0, np.pi)
        t = X * np.cos(a) + Y * np.sin(a)
        mult = 1 + 0.2 * np.sign(np.sin(2 * np.pi * t / rng.uniform(0.12, 0.2)))
    elif texture == "flecked":
        mult = 1 + rng.choice([-0.45, 0.45], (S, S)) * (rng.random((S, S)) < 0.12)
    elif texture == "blotchy":
        mult = 1 + 0.3 * np.clip(_lowfreq(rng, S, 6), -1.5, 1.5)
    else:  # pragma: no cover
        raise ValueError(f"unknown texture {texture!r}")
    return rgb * mult[..., None].astype(np.float32)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(1.1 * math.cos(t), 1.1 * math.sin(t)) for t in np.radians([-90, 30, 150])]
        pts = [(x, y + 0.2) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            t = math.radians(-90 + 36 * k)
            rr = 1.1 if k % 2 == 0 else 0.45
            pts.append((rr * math.cos(t), rr * math.sin(t)))
    elif shape == "cross":
        a, b = 0.33, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "diamond":
        pts = [(0, -1.15), (0.62, 0), (0, 1.15), (-0.62, 0)]
    elif shape == "hexagon":
        pts = [(0.95 * math.cos(t), 0.95 * math.sin(t)) for t in np.radians(np.arange(0, 360, 60))]
    else:  # pragma: no cover
        raise ValueError(f"no polygon for {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    if shape in ("circle", "ring"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        if shape == "ring":
            ri = 0.55 * r
            d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        d.polygon(_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(im, dtype=bool)


def _erode(m: np.ndarray, steps: int) -> np.ndarray:
    # Edge padding: an object cut by the image border has no rim along the border.
    out = m
    for _ in range(steps):
        p = np.pad(out, 1, mode="edge")
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def _pattern(material: str, X, Y, cx, cy, angle, period, phase) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    u = (X - cx) * c + (Y - cy) * s + phase
    v = -(X - cx) * s + (Y - cy) * c + phase
    if material == "striped":
        return (u % period) < period / 2
    if material == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    if material == "checkered":
        return ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    if material == "wavy":
        return ((v + 0.3 * period * np.sin(2 * np.pi * u / (1.6 * period))) % period) < period / 2
    raise ValueError(f"unknown material {material!r}")  # pragma: no cover


def _lum(rgb) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def render_scene(rng: np.random.Generator, spec: SceneSpec, size: int) -> RenderedScene:
    """Render ``spec`` at ``size``×``size`` pixels with full-resolution label maps.

    Positions, scales and rotations are drawn from ``rng``; an object's placement is redrawn (up to
    12 times) when it would hide more than half of an earlier object.

    Returns
    -------
    RenderedScene
    """
    vocab = concept_vocabulary()
    num = vocab.number
    palette = dict(COLORS)
    S = size
    rgb, _ = _background(rng, spec.scene, S, num)
    # Colour labels lie on objects only: a scene's large areas of sky, sea or sand would give a colour
    # so much area that no unit could reach IoU 0.04 with it at a 0.005 activation quantile (IoU is
    # at most quantile / coverage), leaving the colours that backgrounds take undissectable.
    color_lab = np.zeros((S, S), np.int32)
    if spec.texture is not None:
        rgb = _texture(rng, spec.texture, rgb)
    object_lab = np.zeros((S, S), np.int32)
    rim_lab = np.zeros((S, S), np.int32)
    core_lab = np.zeros((S, S), np.int32)
    material_lab = np.zeros((S, S), np.int32)
    owner = np.zeros((S, S), np.int32)  # 1-based index of the object owning each pixel
    areas: list[int] = []
    Y, X = np.mgrid[0:S, 0:S].astype(np.float32)
    geoms = []
    for k, o in enumerate(spec.objects):
        best = None
        for _ in range(12):
            r = S * rng.uniform(*o.scale)
            # Keep most of the object inside the image: a shape cut in half is no longer that shape.
            lo, hi = max(0.12 * S, 0.75 * r), min(0.88 * S, S - 0.75 * r)
            cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
            angle = rng.uniform(-np.pi / 6, np.pi / 6)
            m = _shape_mask(o.shape, cx, cy, r, angle, S)
            if k:
                counts = np.bincount(owner[~m], minlength=k + 1)[1:]
                worst = min(counts[j] / max(areas[j], 1) for j in range(k))
            else:
                worst = 1.0
            if best is None or worst > best[0]:
                best = (worst, r, cx, cy, angle, m)
            if worst >= _MIN_VISIBLE:
                break
        _, r, cx, cy, angle, m = best
        areas.append(int(m.sum()))
        geoms.append((cx, cy, r, angle))

        base = _jitter(rng, palette[o.color], 16)
        phi = rng.uniform(0, 2 * np.pi)
        shade = 1 + 0.14 * np.clip(((X - cx) * math.cos(phi) + (Y - cy) * math.sin(phi)) / max(r, 1), -1, 1)
        fill = base[None, None, :] * shade[..., None]
        lum = _lum(base)
        pat = None
        if o.material is not None:
            pat = _pattern(
                o.material, X, Y, cx, cy, rng.uniform(-np.pi, np.pi),
                max(3.0, S * rng.uniform(0.07, 0.1)), rng.uniform(0, 10),
            ) & m
            alt = base * 0.55 if lum > 80 else np.minimum(base + 90, 255)
            fill[pat] = alt * shade[pat][:, None]
        rim = core = None
        if o.rim:
            rim = m & ~_erode(m, max(1, int(round(r * 0.14))))
            fill[rim] = base * 0.3 if lum > 70 else np.minimum(base + 130, 255)
        if o.core:
            rc = max(1.3, 0.3 * r)
            core = ((X - cx) ** 2 + (Y - cy) ** 2 <= rc * rc) & m
            fill[core] = 25 if lum > 140 else 235
        rgb[m] = fill[m]
        owner[m] = k + 1
        color_lab[m] = num[o.color]
        object_lab[m] = num[o.shape]
        material_lab[m] = num[o.material] if o.material is not None else 0
        rim_lab[m] = 0
        core_lab[m] = 0
        if rim is not None:
            rim_lab[rim] = num["rim"]
        if core is not None:
            core_lab[core] = num["core"]

    # Global lighting, sensor noise.
    rgb = rgb * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)
    rgb = rgb + rng.normal(0, rng.uniform(2, 6), rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    visible = np.bincount(owner.ravel(), minlength=len(spec.objects) + 1)[1:]
    placed = tuple(
        PlacedObject(o, float(g[0]), float(g[1]), float(g[2]), float(g[3]), int(v))
        for o, g, v in zip(spec.objects, geoms, visible)
    )
    planes = {
        "color": (color_lab,),
        "object": (object_lab,),
        "part": (rim_lab, core_lab),
        "material": (material_lab,),
    }
    image_labels = {
        "scene": (num[spec.scene],) if spec.scene is not None else (),
        "texture": (num[spec.texture],) if spec.texture is not None else (),
    }
    present: set[int] = set()
    for ps in planes.values():
        for p in ps:
            present.update(int(v) for v in np.flatnonzero(np.bincount(p.ravel())) if v)
    for labs in image_labels.values():
        present.update(labs)
    concepts = frozenset(vocab.names[n] for n in present)
    return RenderedScene(image, planes, image_labels, concepts, placed, spec)


def downsample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour downsampling of a label map (sample at each output pixel's centre)."""
    H, W = labels.shape
    rows = np.minimum(((np.arange(height) + 0.5) * H / height).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * W / width).astype(np.int64), W - 1)
    return labels[rows[:, None], cols[None, :]]


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """The image as it reads back after saving as JPEG with ``quality`` (what the model sees)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


# -- the three image streams --------------------------------------------------------------------
def probe_scene(seed: int, index: int, size: int) -> RenderedScene:
    """Probe image ``index`` (0-based) of the world with ``seed``: 1–4 random objects.

    55 % of probe images have a studio backdrop without scene label, the rest one of the scenes.
    """
    rng = np.random.default_rng([seed, _STREAM_PROBE, index])
    return render_scene(rng, random_scene_spec(rng, 1, 4, studio_p=_STUDIO_P), size)


def source_scene(seed: int, index: int, size: int, split: str = "train") -> RenderedScene:
    """Source-task image ``index``: one dominant object and 0–2 smaller ones, in random drawing order.

    ``split`` (``"train"`` or ``"heldout"``) selects an independent random stream.
    """
    stream = {"train": _STREAM_SOURCE_TRAIN, "heldout": _STREAM_SOURCE_HELDOUT}[split]
    rng = np.random.default_rng([seed, stream, index])
    scene = SCENES[rng.integers(len(SCENES))]
    # dominant object radius 0.28-0.40 of the side (was 0.22-0.34): shapes are learnt faster
    objects = [_random_object(rng, (0.28, 0.40))]
    objects += [_random_object(rng, (0.1, 0.18)) for _ in range(int(rng.integers(0, 3)))]
    order = rng.permutation(len(objects))
    spec = SceneSpec(scene, _random_texture(rng), tuple(objects[i] for i in order))
    return render_scene(rng, spec, size)


def target_scene(seed: int, class_index: int, index: int, size: int) -> RenderedScene:
    """Target image ``index`` (0-based) of class ``TARGET_CLASSES[class_index]``."""
    rng = np.random.default_rng([seed, _STREAM_TARGET, class_index, index])
    return render_scene(rng, class_scene_spec(rng, TARGET_CLASSES[class_index][1]), size)


# -- the world ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldInfo:
    """What :func:`generate_world` wrote.

    Attributes
    ----------
    out, probe_dir, target_dir, truth_path : Path
    model_dir : Path or None (None without a model).
    seed, size : int
    probe_images : int — images in the probe set.
    images_per_class : int
    train_images, test_images : int — target images in each split.
    classes : tuple of str — target classes in actions.txt order.
    concepts : tuple of str — every label name in label.csv order.
    source_accuracy : dict head → held-out accuracy of the source model, or None.
    timings : dict stage → seconds.
    """

    out: Path
    probe_dir: Path
    target_dir: Path
    truth_path: Path
    model_dir: Path | None
    seed: int
    size: int
    probe_images: int
    images_per_class: int
    train_images: int
    test_images: int
    classes: tuple[str, ...]
    concepts: tuple[str, ...]
    source_accuracy: Mapping[str, float] | None = None
    timings: Mapping[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"synthetic world (seed {self.seed}, {self.size}x{self.size} px) in {self.out}",
            f"  probe:  {self.probe_dir}  {self.probe_images} images, {len(self.concepts)} labels "
            f"in {len(CATEGORIES)} categories (Broden format)",
            f"  target: {self.target_dir}  {len(self.classes)} classes x {self.images_per_class} images "
            f"({self.train_images} train / {self.test_images} test, Stanford 40 layout)",
            f"  truth:  {self.truth_path}",
        ]
        if self.model_dir is not None:
            acc = ", ".join(f"{k} {v:.3f}" for k, v in (self.source_accuracy or {}).items())
            lines.append(f"  model:  {self.model_dir}  (conceptnet; held-out source accuracy: {acc})")
        else:
            lines.append("  model:  not trained (--no-model)")
        if self.timings:
            lines.append("  time:   " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _check_params(seed, size, probe_images, images_per_class) -> None:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name, v in (("seed", seed), ("size", size), ("probe_images", probe_images),
                    ("images_per_class", images_per_class)):
        if not is_int(v):
            raise ConceptrankError(f"{name} must be an integer, got {v!r}")
    if seed < 0:
        raise ConceptrankError(f"seed must be >= 0, got {seed}")
    if size < 32 or size % 16:
        raise ConceptrankError(
            f"size must be a multiple of 16 and at least 32 (masks are size/2 and the model's layer4 "
            f"is size/8), got {size}"
        )
    if probe_images < 1:
        raise ConceptrankError(f"probe_images must be at least 1, got {probe_images}")
    if images_per_class < 10:
        raise ConceptrankError(
            f"images_per_class must be at least 10 (half train, half test, and 5-fold cross-validation "
            f"needs >= 5 images per class in each split), got {images_per_class}"
        )


_WORLD_ENTRIES = {"probe", "target", "model", "truth.json"}


def _prepare_out(out: Path) -> None:
    """Create ``out`` or clear an earlier world in it; refuse a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise ConceptrankError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _WORLD_ENTRIES)
        if foreign:
            raise ConceptrankError(
                f"--out {out} is not empty and does not look like a synthetic world (it holds "
                f"{foreign[:5]}); choose a new or empty folder"
            )
        for name in _WORLD_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _write_probe(root: Path, seed: int, size: int, n: int, progress: bool) -> None:
    vocab = concept_vocabulary()
    sh = sw = size // 2
    sub = root / "images" / "synth"
    sub.mkdir(parents=True, exist_ok=True)
    rows: list[WriterRow] = []
    for i in range(n):
        sc = probe_scene(seed, i, size)
        stem = f"synth/{i + 1:05d}"
        Image.fromarray(sc.image).save(root / "images" / f"{stem}.jpg", "JPEG", quality=JPEG_QUALITY)
        cells: dict[str, list[str | int]] = {}
        for cat, planes in sc.planes.items():
            items: list[str | int] = []
            for k, plane in enumerate(planes, start=1):
                small = downsample_labels(plane, sh, sw)
                if not small.any():
                    continue
                name = f"{stem}_{cat}_{k}.png" if len(planes) > 1 else f"{stem}_{cat}.png"
                encode_mask(small).save(root / "images" / name)
                items.append(name)
            cells[cat] = items
        for cat, labs in sc.image_labels.items():
            cells[cat] = list(labs)
        split = "val" if i % 10 == 9 else "train"
        rows.append(WriterRow(f"{stem}.jpg", split, size, size, sh, sw, cells))
        if progress and (i + 1) % 400 == 0:
            _say(progress, f"  probe: {i + 1}/{n} images")
    write_broden(root, CATEGORIES, vocab.labels, rows)


def _write_target(root: Path, seed: int, size: int, per_class: int, progress: bool):
    """Write the Stanford-40 layout; return ({image file: visible concepts}, n_train, n_test)."""
    vocab = concept_vocabulary()
    jpg = root / "JPEGImages"
    splits = root / "ImageSplits"
    jpg.mkdir(parents=True, exist_ok=True)
    splits.mkdir(parents=True, exist_ok=True)
    present: dict[str, list[str]] = {}
    all_train: list[str] = []
    all_test: list[str] = []
    for ci, (cls, _) in enumerate(TARGET_CLASSES):
        names = []
        for i in range(per_class):
            sc = target_scene(seed, ci, i, size)
            name = f"{cls}_{i + 1:03d}.jpg"
            Image.fromarray(sc.image).save(jpg / name, "JPEG", quality=JPEG_QUALITY)
            present[name] = sorted(sc.concepts, key=vocab.number.__getitem__)
            names.append(name)
        perm = np.random.default_rng([seed, _STREAM_SPLIT, ci]).permutation(per_class)
        train_idx = set(perm[: per_class // 2].tolist())
        train = [nm for k, nm in enumerate(names) if k in train_idx]
        test = [nm for k, nm in enumerate(names) if k not in train_idx]
        (splits / f"{cls}_train.txt").write_text("".join(f"{nm}\n" for nm in train))
        (splits / f"{cls}_test.txt").write_text("".join(f"{nm}\n" for nm in test))
        all_train += train
        all_test += test
        _say(progress, f"  target: {cls} ({per_class} images)")
    (splits / "actions.txt").write_text(
        "action_name\tnumber_of_images\n" + "".join(f"{c}\t{per_class}\n" for c, _ in TARGET_CLASSES)
    )
    (splits / "train.txt").write_text("".join(f"{nm}\n" for nm in all_train))
    (splits / "test.txt").write_text("".join(f"{nm}\n" for nm in all_test))
    return present, len(all_train), len(all_test)


def generate_world(
    out,
    *,
    seed: int = 0,
    size: int = 64,
    probe_images: int = 1200,
    images_per_class: int = 80,
    train_model: bool = True,
    progress: bool = True,
    _train_images: int | None = None,
    _train_epochs: int | None = None,
    _heldout_images: int | None = None,
) -> WorldInfo:
    """Write the synthetic concept world into ``out``.

    Parameters
    ----------
    out : path
        Folder to write into; created if missing. An earlier world there is replaced; a folder
        holding anything else is refused.
    seed : int
        The same seed gives byte-identical files.
    size : int
        Image side in pixels: a multiple of 16, at least 32. Masks are ``size/2``.
    probe_images : int
        Images in the Broden-format probe set.
    images_per_class : int
        Target images per class (at least 10; half train, half test).
    train_model : bool
        Train the source model and save its card in ``out/model``.
    progress : bool
        Report progress on stderr.
    _train_images, _train_epochs, _heldout_images : int, optional
        Private knobs that shrink the source-model training (tests).

    Returns
    -------
    WorldInfo

    Raises
    ------
    ConceptrankError
        For bad parameters or an ``out`` folder that holds something other than a world.
    """
    _check_params(seed, size, probe_images, images_per_class)
    seed, size = int(seed), int(size)
    out = Path(out)
    _prepare_out(out)
    vocab = concept_vocabulary()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    _say(progress, f"writing probe set ({probe_images} images, {size}px) ...")
    _write_probe(out / "probe", seed, size, probe_images, progress)
    timings["probe"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _say(progress, f"writing target set ({len(TARGET_CLASSES)} classes x {images_per_class}) ...")
    present, n_train, n_test = _write_target(out / "target", seed, size, images_per_class, progress)
    truth = {
        "classes": {c: list(cs) for c, cs in TARGET_CLASSES},
        "images": present,
        "categories": {name: cat for _, name, cat in vocab.labels},
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    timings["target"] = time.perf_counter() - t0

    accuracy = None
    model_dir = None
    if train_model:
        from conceptrank.synthetic.train import train_source_model

        t0 = time.perf_counter()
        kwargs = {}
        if _train_images is not None:
            kwargs["train_images"] = _train_images
        if _train_epochs is not None:
            kwargs["epochs"] = _train_epochs
        if _heldout_images is not None:
            kwargs["heldout_images"] = _heldout_images
        res = train_source_model(out / "model", seed=seed, size=size, progress=progress, **kwargs)
        model_dir = res.model_dir
        accuracy = dict(res.heldout_accuracy)
        timings["model"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    return WorldInfo(
        out=out,
        probe_dir=out / "probe",
        target_dir=out / "target",
        truth_path=out / "truth.json",
        model_dir=model_dir,
        seed=seed,
        size=size,
        probe_images=probe_images,
        images_per_class=images_per_class,
        train_images=n_train,
        test_images=n_test,
        classes=tuple(c for c, _ in TARGET_CLASSES),
        concepts=tuple(vocab.names[1:]),
        source_accuracy=accuracy,
        timings=timings,
    )
