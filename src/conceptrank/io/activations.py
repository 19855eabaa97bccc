"""``activations.npz``, the output of ``extract``: per image (N) and unit (U), mean activations."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptrank.core.ranking import SPLITS
from conceptrank.errors import ConceptrankError


@dataclass(frozen=True)
class Activations:
    """Contents of ``activations.npz``: mean (N, U), images/classes/splits (N,) str.

    ``path`` is None for activations computed in memory (``extract_activations``), which also fill
    ``max`` (N, U), ``layer``, ``class_names`` (the target set's class order) and ``skipped``
    ((image, reason) of the images that could not be used).
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
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mean", "images", "classes", "splits") if k not in z.files]
            if missing:
                raise ConceptrankError(f"{path}: missing array(s) {', '.join(missing)}")
            mean, images, classes, splits = (z[k] for k in ("mean", "images", "classes", "splits"))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, ConceptrankError):
            raise
        raise ConceptrankError(f"cannot read {path}: {e}") from None
    if mean.ndim != 2:
        raise ConceptrankError(f"{path}: 'mean' must be (images, units), got shape {mean.shape}")
    n = mean.shape[0]
    for name, arr in (("images", images), ("classes", classes), ("splits", splits)):
        if arr.shape != (n,):
            raise ConceptrankError(f"{path}: '{name}' has shape {arr.shape}, expected ({n},) like 'mean'")
    if n == 0:
        raise ConceptrankError(f"{path}: no images")
    bad = ~np.all(np.isfinite(mean), axis=1)
    if bad.any():
        raise ConceptrankError(f"{path}: {int(bad.sum())} image(s) have NaN or infinite activations (first: {images[bad][0]})")
    images, classes, splits = (np.asarray(a).astype(str) for a in (images, classes, splits))
    unknown = sorted(set(splits.tolist()) - set(SPLITS))
    if unknown:
        raise ConceptrankError(f"{path}: unknown split value(s) {unknown}; expected train, test or all")
    return Activations(path, mean, images, classes, splits)
