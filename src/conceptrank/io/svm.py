"""``svm.npz``, the fitted linear ranker written by ``rank``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptrank.core.faithfulness import SVMParams
from conceptrank.errors import ConceptrankError


def load_svm(path: str | Path) -> SVMParams:
    """Read ``svm.npz`` (or the rank folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "svm.npz"
    if not path.exists():
        raise ConceptrankError(f"{path} not found (re-run `conceptrank rank`)")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("coef", "intercept", "scaler_mean", "scaler_scale", "classes") if k not in z.files]
        if missing:
            raise ConceptrankError(f"{path}: missing array(s) {', '.join(missing)}")
        return SVMParams(
            coef=np.asarray(z["coef"], dtype=np.float64),
            intercept=np.asarray(z["intercept"], dtype=np.float64),
            mean=np.asarray(z["scaler_mean"], dtype=np.float64),
            scale=np.asarray(z["scaler_scale"], dtype=np.float64),
            classes=tuple(str(c) for c in z["classes"]),
        )
