"""``activations.npz``, the output of ``extract``: per image (N) and unit (U), mean (and max) activations.

Arrays: ``mean`` (N, U) float32, ``max`` (N, U) float32 (optional), ``images`` / ``classes`` /
``splits`` (N,) str, ``class_names`` (C,) str (optional: the target set's class order). No
pickles. :func:`load_activations` is the one reader of this format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptrank.core.ranking import SPLITS
from conceptrank.errors import ConceptrankError
from conceptrank.io.cache import load_npz


@dataclass(frozen=True)
class Activations:
    """Per-image mean activations of a layer, with the images' names, classes and splits.

    Attributes
    ----------
    path : the file read; None for activations computed in memory (``extract_activations``).
    mean : (N, U) per image and unit, the spatial mean of the activation map.
    images, classes, splits : (N,) str; splits are train, test or all.
    max : (N, U) spatial maxima, or None when not known.
    layer : the layer the activations come from, when known.
    class_names : (C,) str, the target set's class order, or None when not known.
    skipped : (image, reason) of the images that could not be used (in memory only).
    """

    path: Path | None
    mean: np.ndarray
    images: np.ndarray
    classes: np.ndarray
    splits: np.ndarray
    max: np.ndarray | None = None
    layer: str | None = None
    class_names: np.ndarray | None = None
    skipped: tuple[tuple[str, str], ...] = ()


def npz_path(activations: Path) -> Path:
    activations = Path(activations)
    return activations / "activations.npz" if activations.is_dir() else activations


def load_activations(activations: str | Path) -> Activations:
    """Read ``activations.npz`` (given the file or the extract folder) and check its arrays."""
    path = npz_path(Path(activations))
    if not path.exists():
        raise ConceptrankError(f"activations file not found: {path} (run `conceptrank extract` first)")
    z = load_npz(path, ("mean", "images", "classes", "splits"), optional=("max", "class_names"))
    mean, images, classes, splits = (z[k] for k in ("mean", "images", "classes", "splits"))
    mx = z.get("max")
    class_names = np.asarray(z["class_names"]).astype(str) if "class_names" in z else None
    if mean.ndim != 2:
        raise ConceptrankError(f"{path}: 'mean' must be (images, units), got shape {mean.shape}")
    n = mean.shape[0]
    for name, arr in (("images", images), ("classes", classes), ("splits", splits)):
        if arr.shape != (n,):
            raise ConceptrankError(f"{path}: '{name}' has shape {arr.shape}, expected ({n},) like 'mean'")
    if n == 0:
        raise ConceptrankError(f"{path}: no images")
    if mx is not None and mx.shape != mean.shape:
        raise ConceptrankError(f"{path}: 'max' has shape {mx.shape}, expected {mean.shape} like 'mean'")
    bad = ~np.all(np.isfinite(mean), axis=1)
    if bad.any():
        raise ConceptrankError(f"{path}: {int(bad.sum())} image(s) have NaN or infinite activations (first: {images[bad][0]})")
    images, classes, splits = (np.asarray(a).astype(str) for a in (images, classes, splits))
    unknown = sorted(set(splits.tolist()) - set(SPLITS))
    if unknown:
        raise ConceptrankError(f"{path}: unknown split value(s) {unknown}; expected train, test or all")
    return Activations(path, mean, images, classes, splits, mx, None, class_names)
