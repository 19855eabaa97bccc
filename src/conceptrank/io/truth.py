"""``truth.json``, the synthetic world's ground truth (planted concepts per class and image)."""

from __future__ import annotations

from pathlib import Path

from conceptrank.core.groundtruth import Truth
from conceptrank.errors import ConceptrankError
from conceptrank.io.cache import read_json


def read_truth(path: str | Path) -> Truth:
    """Read and check a truth.json."""
    path = Path(path)
    if not path.exists():
        raise ConceptrankError(f"truth file not found: {path}")
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise ConceptrankError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
        raise ConceptrankError(f"{path}: expected an object with 'classes' (and 'images', 'categories')")
    try:
        classes = {str(c): tuple(str(x) for x in v) for c, v in data["classes"].items()}
        images = {str(i): frozenset(str(x) for x in v) for i, v in (data.get("images") or {}).items()}
        cats = {str(x): str(c) for x, c in (data.get("categories") or {}).items()}
    except (TypeError, AttributeError):
        raise ConceptrankError(f"{path}: 'classes' and 'images' must map names to lists of concepts") from None
    return Truth(classes, images, cats)
