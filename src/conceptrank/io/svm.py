"""``svm.npz``, the fitted linear ranker written by ``rank``.

Arrays: ``coef`` (C, U), ``intercept`` (C,), ``scaler_mean`` / ``scaler_scale`` (U,) — the decision is
``((x − scaler_mean) / scaler_scale) @ coef.T + intercept`` —, ``train_mean`` (U,) the mean of the
features the model was fit on (what the deletion test and ``explain`` set a removed unit to),
``standardized`` () bool, and ``classes`` (C,) str. No pickles.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from conceptrank.core.faithfulness import SVMParams
from conceptrank.errors import ConceptrankError
from conceptrank.io.cache import save_npz

__all__ = ["load_svm", "save_svm"]

_ARRAYS = ("coef", "intercept", "scaler_mean", "scaler_scale", "train_mean", "standardized", "classes")


def save_svm(path: str | Path, svm: SVMParams) -> None:
    """Write ``svm.npz`` atomically with fixed timestamps (equal parameters give equal bytes)."""
    save_npz(
        Path(path),
        coef=np.asarray(svm.coef, dtype=np.float64),
        intercept=np.asarray(svm.intercept, dtype=np.float64),
        scaler_mean=np.asarray(svm.mean, dtype=np.float64),
        scaler_scale=np.asarray(svm.scale, dtype=np.float64),
        train_mean=np.asarray(svm.reference, dtype=np.float64),
        standardized=np.array(bool(svm.standardized)),
        classes=np.array(list(svm.classes), dtype=str),
    )


def load_svm(path: str | Path) -> SVMParams:
    """Read ``svm.npz`` (or the rank folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "svm.npz"
    if not path.exists():
        raise ConceptrankError(f"{path} not found (re-run `conceptrank rank`)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConceptrankError(f"cannot read {path}: not a complete .npz archive ({e}); re-run `conceptrank rank`") from None
    with z:
        missing = [k for k in _ARRAYS if k not in z.files]
        if missing:
            older = " (written by an older conceptrank: re-run `conceptrank rank`)" if set(missing) <= {
                "train_mean", "standardized"} else ""
            raise ConceptrankError(f"{path}: missing array(s) {', '.join(missing)}{older}")
        return SVMParams(
            coef=np.asarray(z["coef"], dtype=np.float64),
            intercept=np.asarray(z["intercept"], dtype=np.float64),
            mean=np.asarray(z["scaler_mean"], dtype=np.float64),
            scale=np.asarray(z["scaler_scale"], dtype=np.float64),
            classes=tuple(str(c) for c in z["classes"]),
            train_mean=np.asarray(z["train_mean"], dtype=np.float64),
            standardized=bool(z["standardized"]),
        )
