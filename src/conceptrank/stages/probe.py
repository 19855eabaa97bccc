"""Per-image activations of one layer on the probe set, with the concepts visible in each image.

The probe-fitted rankers (``net2vec``, ``ibd``, ``tcav`` in :mod:`conceptrank.core.rankers`) learn
concept vectors from them: which combination of units says "this concept is in the image".
Dissection itself keeps only per-unit thresholds and counts, so this is one more forward pass over
the probe images (the same reduction as ``extract``: mean and max of every unit's map).

:func:`probe_activations` computes, :func:`run_probe_activations` writes
``probe_activations.npz`` (``mean``, ``max`` (P, U) float32, ``present`` (P, L) bool, ``concepts``
(L,), ``images`` (P,)) and :func:`load_probe_activations` reads it back.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from conceptrank.core.rankers import ProbeActivations
from conceptrank.errors import ConceptrankError
from conceptrank.io.cache import load_npz

__all__ = ["PROBE_FILE", "load_probe_activations", "probe_activations", "probe_presence", "run_probe_activations",
           "stored_fingerprints"]

PROBE_FILE = "probe_activations.npz"


def probe_presence(probe) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(present (P, L) bool, names (L,))``: label l is in some mask plane or scalar of image p.

    Parameters
    ----------
    probe : :class:`conceptrank.io.broden.BrodenDataset`; column l is label number l (0 unused).
    """
    L = probe.num_labels
    present = np.zeros((len(probe), L), dtype=bool)
    for i, rec in enumerate(probe.records):
        for plane in probe.load_planes(i):
            present[i, np.unique(plane)] = True
        present[i, [s for s in rec.scalars if 0 <= s < L]] = True
    present[:, 0] = False
    names = tuple(probe.labels[n].name if n in probe.labels else "" for n in range(L))
    return present, names


def probe_activations(model, layer: str, probe, batch_size: int = 64, workers: int = 0, device: str = "auto") -> ProbeActivations:
    """Mean and max of every unit on every probe image, and the concepts visible in it.

    Parameters
    ----------
    model : :class:`conceptrank.nn.models.LoadedModel`.
    layer : dotted layer name.
    probe : :class:`conceptrank.io.broden.BrodenDataset`.

    Raises
    ------
    ConceptrankError
        When a probe image cannot be used (the probe set must be complete, as for dissection).
    """
    from conceptrank.io.targets import TargetItem, TargetSet
    from conceptrank.stages.extract import ExtractConfig, extract_activations

    items = tuple(TargetItem(rec.image, "probe", rec.split) for rec in probe.records)
    targets = TargetSet(probe.root / "images", "imagefolder", items, ("probe",))
    cfg = ExtractConfig(batch_size=batch_size, workers=workers, device=device)
    acts = extract_activations(model, layer, targets, cfg)
    if acts.skipped:
        rel, why = acts.skipped[0]
        raise ConceptrankError(f"{len(acts.skipped)} probe image(s) could not be used (first: {rel}: {why})")
    present, names = probe_presence(probe)
    return ProbeActivations(acts.mean, acts.max, present, names)


def _fingerprints(model, layer: str, probe) -> dict:
    return {"model": str(model.fingerprint), "layer": str(layer), "probe": probe.fingerprint()}


def run_probe_activations(model, layer: str, probe_dir: Path, out: Path, **kw) -> Path:
    """Write ``out/probe_activations.npz`` for the probe set in ``probe_dir``, unless one made with the
    same model, layer and probe set is there (then it is reused).

    The file records those fingerprints (``model``, ``layer``, ``probe`` arrays) so that ``rank`` can
    refuse one that belongs to another dissection. ``kw``: ``batch_size``, ``workers``, ``device``.
    """
    from conceptrank.io.broden import BrodenDataset
    from conceptrank.io.cache import save_npz

    probe = BrodenDataset(probe_dir)
    path = Path(out) / PROBE_FILE
    fps = _fingerprints(model, layer, probe)
    if stored_fingerprints(path) == fps:
        return path
    pa = probe_activations(model, layer, probe, **kw)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_npz(path, mean=pa.mean.astype(np.float32), max=pa.max.astype(np.float32), present=pa.present,
             concepts=np.array(pa.concepts, dtype=str), images=np.array([r.image for r in probe.records], dtype=str),
             **{k: np.array(v) for k, v in fps.items()})
    return path


def stored_fingerprints(path: Path) -> dict | None:
    """The ``model`` / ``layer`` / ``probe`` fingerprints a probe_activations.npz was made with (None if unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: str(z[k]) for k in ("model", "layer", "probe")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def load_probe_activations(path: str | Path) -> ProbeActivations:
    """Read ``probe_activations.npz`` (the file or its folder) and check its arrays."""
    path = Path(path)
    if path.is_dir():
        path = path / PROBE_FILE
    if not path.is_file():
        raise ConceptrankError(f"probe activations not found: {path}")
    z = load_npz(path, ("mean", "max", "present", "concepts"))
    mean, mx, present, concepts = (z[k] for k in ("mean", "max", "present", "concepts"))
    if mean.ndim != 2 or mx.shape != mean.shape or present.shape[0] != mean.shape[0] or present.shape[1] != concepts.shape[0]:
        raise ConceptrankError(f"{path}: inconsistent shapes mean {mean.shape}, max {mx.shape}, present "
                               f"{present.shape}, concepts {concepts.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(mx))):
        raise ConceptrankError(f"{path}: NaN or infinite activations")
    return ProbeActivations(mean, mx, present.astype(bool), tuple(str(c) for c in concepts))
