"""The synthetic concept world: a probe set, a labelled target set and ground truth.

Everything is drawn by one scene renderer (:func:`render_scene`) so that the probe set's masks, the
target set's ground truth and the source model's training data agree about what each concept looks
like. A scene is a background (one of twelve *scenes* or a studio backdrop, optionally overlaid with
a *texture*) with 1–4 *objects*: a shape in a *colour*, filled plain or with a *material* pattern,
optionally with *parts* (see ``OBJECT_PARTS``). Later objects occlude earlier ones and every label
map holds only what is visible.

The world is defined by the declarative tables at the top of this module (the ``relations`` stage
derives the world's knowledge graph from them):

``CATEGORIES``      the six Broden categories, in label-number order
``COLORS``          colour name → prototype RGB (Broden's eleven colour names)
``SHAPES``          object concepts (category ``object``)
``PARTS``           part concepts (category ``part``)
``OBJECT_PARTS``    shape → the parts an object of that shape can have
``MATERIALS``       surface patterns (category ``material``)
``SCENES``          background scenes (category ``scene``, image-level labels)
``TEXTURES``        background overlays (category ``texture``, image-level labels)
``TARGET_CLASSES``  target class → the concepts planted in its images

``generate_world(out)`` writes::

    out/probe/      a Broden-format probe set (see shared/spec/broden-format.md)
    out/target/     a Stanford-40-layout target set whose classes are defined by planted concepts
    out/truth.json  per-class planted concepts, per-image visible concepts, concept categories

(:func:`conceptrank.synthetic.build.build_world` adds ``out/model/``, the source model.) The same
seed gives byte-identical files: every random draw comes from a ``numpy`` generator seeded with
``(seed, stream, index…)``, images are JPEGs of fixed quality and masks PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from conceptrank.errors import ConceptrankError
from conceptrank.io.broden import WriterRow, cell_coverage, encode_mask, write_broden
from conceptrank.synthetic.backgrounds import apply_texture, paint_background
from conceptrank.synthetic.drawing import PART_ORDER, Geometry, draw_object, shape_mask, stem_mask

__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "PARTS",
    "OBJECT_PARTS",
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
SHAPES = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon",
    "crescent", "arrow", "heart",
)
#: Parts, each a region of an object painted in a contrasting shade of its colour: ``rim`` an
#: outline band, ``core`` a centre dot, ``cap`` the top segment, ``tips`` the outer ends of a pointed
#: shape, ``stem`` a stick under the object, ``eyes`` two small dots above the centre.
PARTS = ("rim", "core", "cap", "tips", "stem", "eyes")
#: Which parts an object of each shape can carry (a ring's centre is its hole: no core).
OBJECT_PARTS: Mapping[str, tuple[str, ...]] = {
    "circle": ("rim", "core", "cap", "stem", "eyes"),
    "square": ("rim", "core", "cap", "stem", "eyes"),
    "triangle": ("rim", "core", "tips", "stem"),
    "star": ("rim", "core", "tips"),
    "cross": ("rim", "core", "tips"),
    "ring": ("rim", "cap", "stem"),
    "diamond": ("rim", "core", "tips", "stem"),
    "hexagon": ("rim", "core", "cap", "eyes"),
    "crescent": ("rim", "tips"),
    "arrow": ("rim", "tips", "stem"),
    "heart": ("rim", "core", "cap", "eyes"),
}
MATERIALS = ("striped", "dotted", "checkered", "wavy", "zigzag", "ringed")
SCENES = (
    "sky-s", "forest-s", "desert-s", "ocean-s", "night-s", "room-s",
    "snow-s", "field-s", "street-s", "sunset-s", "cave-s", "beach-s",
)
TEXTURES = ("banded", "flecked", "blotchy", "meshed", "scratched")

#: Target classes and the concepts planted in their images (shared between classes, unique per
#: class). A planted part goes on the class's first planted object.
TARGET_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("juggling", ("circle", "red-c", "dotted")),
    ("fishing", ("ring", "blue-c", "wavy", "ocean-s")),
    ("gardening", ("diamond", "green-c", "stem", "forest-s")),
    ("climbing", ("triangle", "grey-c", "sky-s")),
    ("stargazing", ("star", "yellow-c", "tips", "night-s")),
    ("cooking", ("square", "orange-c", "room-s")),
    ("sailing", ("triangle", "white-c", "ocean-s")),
    ("riding_a_camel", ("brown-c", "cap", "desert-s")),
    ("playing_chess", ("square", "checkered", "room-s")),
    ("blowing_bubbles", ("ring", "pink-c", "sky-s")),
)

JPEG_QUALITY = 90
_KEEP_P = 0.8  # probability that a planted concept is kept in a target image
_TEXTURE_P = 0.3  # probability that a background carries a texture
_MATERIAL_P = 0.55  # probability that an object is patterned
_PART_P = 0.35  # probability of each part a shape allows
# Share of probe images on a studio backdrop without a scene label. Image-level labels make a unit's
# IoU at most quantile / (share of images with the label), so with every image carrying one of 12
# scenes no scene unit could pass IoU 0.04 at NetDissect's 0.005 quantile.
_STUDIO_P = 0.55
_SOURCE_MAIN_SCALE = (0.24, 0.38)  # radius of a source image's dominant object (fraction of the side)
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


@lru_cache(maxsize=1)
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
# -- scene specifications -----------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """What an object looks like; where it goes is drawn by the renderer.

    ``parts`` is a subset of ``OBJECT_PARTS[shape]``; ``scale`` is the ``(min, max)`` radius as a
    fraction of the image side.
    """

    shape: str
    color: str
    material: str | None = None
    parts: tuple[str, ...] = ()
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
        (``color``, ``object``, ``part``, ``material``: one plane each).
    image_labels : dict category → tuple of label numbers (``scene``: 0 or 1, ``texture``: 0 or 1).
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


def _random_parts(rng: np.random.Generator, shape: str, avoid: Sequence[str] = ()) -> tuple[str, ...]:
    return tuple(p for p in OBJECT_PARTS[shape] if rng.random() < _PART_P and p not in avoid)


def _random_object(rng: np.random.Generator, scale=(0.12, 0.24)) -> ObjectSpec:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))][0]
    material = MATERIALS[rng.integers(len(MATERIALS))] if rng.random() < _MATERIAL_P else None
    return ObjectSpec(shape=shape, color=color, material=material, parts=_random_parts(rng, shape), scale=scale)


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


def _kept_concepts(rng: np.random.Generator, planted: Sequence[str]) -> set[str]:
    """Each planted concept kept with probability ``_KEEP_P``, at least two kept."""
    keep = [bool(rng.random() < _KEEP_P) for _ in planted]
    while sum(keep) < min(2, len(planted)):
        dropped = [i for i, k in enumerate(keep) if not k]
        keep[dropped[rng.integers(len(dropped))]] = True
    return {c for c, k in zip(planted, keep) if k}


def _planted_objects(rng: np.random.Generator, by_cat: Mapping[str, list[str]], kept: set[str]) -> list[ObjectSpec]:
    """The planted objects of a class: one per planted shape, the first with the planted colour,
    material and part (a class with no shape but one of those gets one object of a fitting shape)."""

    def pick(choices: Sequence, concept, default):
        if concept is None:
            return default
        return concept if concept in kept else _other(rng, choices, concept)

    color_c = (by_cat.get("color") or [None])[0]
    material_c = (by_cat.get("material") or [None])[0]
    part_c = (by_cat.get("part") or [None])[0]
    shapes = by_cat.get("object") or ([None] if (color_c, material_c, part_c) != (None,) * 3 else [])
    objects = []
    for k, shape_c in enumerate(shapes):
        rand = _random_object(rng)
        fitting = [s for s in SHAPES if part_c in OBJECT_PARTS[s]] if k == 0 and part_c else SHAPES
        shape = pick(SHAPES, shape_c, rand.shape if rand.shape in fitting else fitting[rng.integers(len(fitting))])
        color, material = rand.color, rand.material
        parts = _random_parts(rng, shape, avoid=(part_c,) if part_c else ())
        if k == 0:
            color = pick([n for n, _ in COLORS], color_c, color)
            material = pick(list(MATERIALS) + [None], material_c, material)
            if part_c in kept:
                parts = tuple(p for p in OBJECT_PARTS[shape] if p in parts or p == part_c)
        objects.append(ObjectSpec(shape, color, material, parts, (0.19, 0.3), planted=True))
    return objects


def class_scene_spec(rng: np.random.Generator, planted: Sequence[str]) -> SceneSpec:
    """A scene that plants a class's concepts, each kept with probability 0.8 (at least two kept).

    Object concepts become planted objects (the first one takes the class's colour, material and
    part; a class with one of those but no shape gets a planted object of random fitting shape). A
    dropped concept is replaced by a random different value (a dropped part is left out). One or two
    random distractor objects are added and all objects are drawn in random order.
    """
    vocab_cat = concept_vocabulary().category
    kept = _kept_concepts(rng, planted)
    by_cat: dict[str, list[str]] = {}
    for c in planted:
        by_cat.setdefault(vocab_cat[c], []).append(c)
    scene_c = (by_cat.get("scene") or [None])[0]
    scene = SCENES[rng.integers(len(SCENES))]
    if scene_c is not None:
        scene = scene_c if scene_c in kept else _other(rng, SCENES, scene_c)
    objects = _planted_objects(rng, by_cat, kept)
    n_distract = int(rng.integers(1, 3))
    objects += [_random_object(rng, (0.11, 0.2)) for _ in range(n_distract)]
    order = rng.permutation(len(objects))
    return SceneSpec(scene, _random_texture(rng), tuple(objects[i] for i in order))


# -- rendering ----------------------------------------------------------------------------------
def _place(rng: np.random.Generator, o: ObjectSpec, size: int, owner: np.ndarray, areas: list[int]) -> Geometry:
    """Draw a placement for ``o``, redrawn (up to 12 times) while it would hide more than half of an
    earlier object; the best of the tries is kept."""
    S = size
    Y, X = np.mgrid[0:S, 0:S].astype(np.float32)
    best = None
    for _ in range(12):
        r = S * rng.uniform(*o.scale)
        # Keep most of the object inside the image: a shape cut in half is no longer that shape.
        lo, hi = max(0.12 * S, 0.75 * r), min(0.88 * S, S - 0.75 * r)
        g = Geometry(rng.uniform(lo, hi), rng.uniform(lo, hi), r, rng.uniform(-np.pi / 6, np.pi / 6))
        m = shape_mask(o.shape, g, S)
        if "stem" in o.parts:
            m = m | stem_mask(g, X, Y)
        worst = 1.0
        if areas:
            counts = np.bincount(owner[~m], minlength=len(areas) + 1)[1:]
            worst = min(counts[j] / max(areas[j], 1) for j in range(len(areas)))
        if best is None or worst > best[0]:
            best = (worst, g)
        if worst >= _MIN_VISIBLE:
            break
    return best[1]


def _label_planes(drawn, spec: SceneSpec, size: int, num: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Colour, object, part and material label maps of the drawn objects (later ones on top)."""
    planes = {c: np.zeros((size, size), np.int32) for c in ("color", "object", "part", "material")}
    part_numbers = np.array([0] + [num[p] for p in PART_ORDER], np.int32)
    for o, d in zip(spec.objects, drawn):
        planes["color"][d.mask] = num[o.color]
        planes["object"][d.mask] = num[o.shape]
        planes["part"][d.mask] = part_numbers[d.parts[d.mask]]
        planes["material"][d.mask] = 0
        if o.material is not None:
            planes["material"][d.surface] = num[o.material]
    return planes


def render_scene(rng: np.random.Generator, spec: SceneSpec, size: int) -> RenderedScene:
    """Render ``spec`` at ``size``×``size`` pixels with full-resolution label maps.

    Positions, scales and rotations are drawn from ``rng``; an object's placement is redrawn (up to
    12 times) when it would hide more than half of an earlier object. Colour labels lie on objects
    only (see :mod:`conceptrank.synthetic.backgrounds`).

    Returns
    -------
    RenderedScene
    """
    num = concept_vocabulary().number
    palette = dict(COLORS)
    rgb = paint_background(rng, spec.scene, size)
    if spec.texture is not None:
        rgb = apply_texture(rng, spec.texture, rgb)
    owner = np.zeros((size, size), np.int32)  # 1-based index of the object owning each pixel
    areas: list[int] = []
    geoms, drawn = [], []
    for k, o in enumerate(spec.objects):
        g = _place(rng, o, size, owner, areas)
        d = draw_object(rng, o, np.clip(palette[o.color] + rng.integers(-16, 17, 3), 0, 255).astype(np.float32), g, size)
        rgb[d.mask] = d.rgb[d.mask]
        owner[d.mask] = k + 1
        areas.append(int(d.mask.sum()))
        geoms.append(g)
        drawn.append(d)
    # Global lighting, sensor noise.
    rgb = rgb * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)
    rgb = rgb + rng.normal(0, rng.uniform(2, 6), rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    # Only what is visible: labels of a pixel come from the last object drawn on it.
    drawn = [dataclasses.replace(d, mask=d.mask & (owner == k + 1), surface=d.surface & (owner == k + 1))
             for k, d in enumerate(drawn)]
    planes = _label_planes(drawn, spec, size, num)
    visible = np.bincount(owner.ravel(), minlength=len(spec.objects) + 1)[1:]
    placed = tuple(PlacedObject(o, g.cx, g.cy, g.radius, g.angle, int(v)) for o, g, v in zip(spec.objects, geoms, visible))
    image_labels = {
        "scene": (num[spec.scene],) if spec.scene is not None else (),
        "texture": (num[spec.texture],) if spec.texture is not None else (),
    }
    present = {int(v) for p in planes.values() for v in np.flatnonzero(np.bincount(p.ravel())) if v}
    present.update(n for labs in image_labels.values() for n in labs)
    names = concept_vocabulary().names
    concepts = frozenset(names[n] for n in present)
    return RenderedScene(image, {c: (p,) for c, p in planes.items()}, image_labels, concepts, placed, spec)


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
    objects = [_random_object(rng, _SOURCE_MAIN_SCALE)]
    objects += [_random_object(rng, (0.1, 0.2)) for _ in range(int(rng.integers(0, 3)))]
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
    model_note : str or None — where the model came from (shipped or trained here).
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
    model_note: str | None = None
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
            lines.append(f"  model:  {self.model_dir}  ({self.model_note or 'worldnet'}; held-out source accuracy: {acc})")
        else:
            lines.append("  model:  none (--no-model)")
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
            f"is size/4 or size/8), got {size}"
        )
    if probe_images < 1:
        raise ConceptrankError(f"probe_images must be at least 1, got {probe_images}")
    if images_per_class < 10:
        raise ConceptrankError(
            f"images_per_class must be at least 10 (half train, half test, and 5-fold cross-validation "
            f"needs >= 5 images per class in each split), got {images_per_class}"
        )


_WORLD_ENTRIES = {"probe", "target", "model", "truth.json", "knowledge.csv.gz"}


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


_PROBE_CHUNK = 400  # probe images per worker task


def _in_processes(fn, chunks: Sequence[tuple], jobs: int | None = None) -> list:
    """``[fn(*c) for c in chunks]``, in up to ``jobs`` processes (default: one per core, at most 4).

    Every image is drawn from its own seeded stream, so the files do not depend on the split.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    n = min(len(chunks), jobs or min(os.cpu_count() or 1, 4))
    if n <= 1:
        return [fn(*c) for c in chunks]
    with ProcessPoolExecutor(n, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, *zip(*chunks)))


def _probe_rows(root: Path, seed: int, size: int, start: int, stop: int) -> list[WriterRow]:
    """Draw and write probe images ``start … stop-1`` with their mask planes; their index rows."""
    sh = sw = size // 2
    rows: list[WriterRow] = []
    for i in range(start, stop):
        sc = probe_scene(seed, i, size)
        stem = f"synth/{i + 1:05d}"
        Image.fromarray(sc.image).save(root / "images" / f"{stem}.jpg", "JPEG", quality=JPEG_QUALITY)
        cells: dict[str, list[str | int]] = {}
        coverage: dict[str, dict[int, float]] = {}
        for cat, planes in sc.planes.items():
            items: list[str | int] = []
            arrays = []
            for k, plane in enumerate(planes, start=1):
                small = downsample_labels(plane, sh, sw)
                if not small.any():
                    continue
                name = f"{stem}_{cat}_{k}.png" if len(planes) > 1 else f"{stem}_{cat}.png"
                encode_mask(small).save(root / "images" / name)
                items.append(name)
                arrays.append(small)
            cells[cat], coverage[cat] = items, cell_coverage(arrays)
        for cat, labs in sc.image_labels.items():
            cells[cat], coverage[cat] = list(labs), cell_coverage(list(labs))
        split = "val" if i % 10 == 9 else "train"
        rows.append(WriterRow(f"{stem}.jpg", split, size, size, sh, sw, cells, coverage))
    return rows


def _write_probe(root: Path, seed: int, size: int, n: int, progress: bool) -> None:
    (root / "images" / "synth").mkdir(parents=True, exist_ok=True)
    step = _PROBE_CHUNK
    rows: list[WriterRow] = []
    chunks = [(root, seed, size, a, min(a + step, n)) for a in range(0, n, step)]
    for done, part in zip(range(step, n + step, step), _in_processes(_probe_rows, chunks)):
        rows += part
        _say(progress, f"  probe: {min(done, n)}/{n} images")
    write_broden(root, CATEGORIES, concept_vocabulary().labels, rows)


def _target_class(jpg: Path, seed: int, size: int, ci: int, per_class: int) -> dict[str, list[str]]:
    """Draw and write class ``ci``'s target images; {file name: visible concepts} in drawing order."""
    number = concept_vocabulary().number
    present: dict[str, list[str]] = {}
    for i in range(per_class):
        sc = target_scene(seed, ci, i, size)
        name = f"{TARGET_CLASSES[ci][0]}_{i + 1:03d}.jpg"
        Image.fromarray(sc.image).save(jpg / name, "JPEG", quality=JPEG_QUALITY)
        present[name] = sorted(sc.concepts, key=number.__getitem__)
    return present


def _write_target(root: Path, seed: int, size: int, per_class: int, progress: bool):
    """Write the Stanford-40 layout; return ({image file: visible concepts}, n_train, n_test)."""
    jpg = root / "JPEGImages"
    splits = root / "ImageSplits"
    jpg.mkdir(parents=True, exist_ok=True)
    splits.mkdir(parents=True, exist_ok=True)
    present: dict[str, list[str]] = {}
    all_train: list[str] = []
    all_test: list[str] = []
    drawn = _in_processes(_target_class, [(jpg, seed, size, ci, per_class) for ci in range(len(TARGET_CLASSES))])
    for ci, ((cls, _), of_class) in enumerate(zip(TARGET_CLASSES, drawn)):
        present.update(of_class)
        names = list(of_class)
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
    progress: bool = True,
) -> WorldInfo:
    """Write the synthetic concept world's probe set, target set and truth into ``out``.

    The source model is not part of this: :func:`conceptrank.synthetic.build.build_world` writes the
    world and then adds the model.

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
    progress : bool
        Report progress on stderr.

    Returns
    -------
    WorldInfo
        With ``model_dir`` None.

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
    timings["total"] = time.perf_counter() - t_all

    return WorldInfo(
        out=out,
        probe_dir=out / "probe",
        target_dir=out / "target",
        truth_path=out / "truth.json",
        model_dir=None,
        seed=seed,
        size=size,
        probe_images=probe_images,
        images_per_class=images_per_class,
        train_images=n_train,
        test_images=n_test,
        classes=tuple(c for c, _ in TARGET_CLASSES),
        concepts=tuple(vocab.names[1:]),
        timings=timings,
    )
