"""Row arrays filled in order that survive a kill: memmaps under a scratch folder plus a checkpoint
that says how far they are filled (shared by dissect's feature cache and extract's partial outputs).

A checkpoint is only written after every memmap it vouches for is flushed, so a resumed run never
trusts rows that are not on disk. Without a folder the rows live in memory and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from conceptrank.io import cache

__all__ = ["ResumableRows"]


class ResumableRows:
    """Named ``(N, ...)`` arrays and their resume checkpoint.

    Parameters
    ----------
    folder : scratch folder (created), or None for in-memory rows without checkpoints.
    key : identifies the inputs; a checkpoint written for another key is ignored.
    stage : name of the checkpoint clock (see :class:`conceptrank.io.cache.Checkpointer`).
    """

    def __init__(self, folder: str | Path | None, key: str, stage: str) -> None:
        self.folder = None if folder is None else Path(folder)
        self.key = key
        self.arrays: dict[str, np.ndarray] = {}
        self.clock = cache.Checkpointer(stage)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "checkpoint.npz"

    def resume(self) -> tuple[dict, dict] | None:
        """``(meta, arrays)`` of this key's last checkpoint, or None."""
        if self.folder is None:
            return None
        return cache.load_checkpoint(self.checkpoint_path, self.key)

    def create(self, name: str, shape: tuple[int, ...], dtype, what: str | None = None,
               hint: str = "free space or choose an --out on a disk with more room") -> np.ndarray:
        """A new array ``name`` of ``shape`` (contents undefined until written).

        On disk, the free space is checked and the file's blocks reserved first
        (:func:`conceptrank.io.cache.create_memmap`); ``what`` and ``hint`` word the error.
        """
        if self.folder is None:
            arr = np.empty(shape, dtype)
        else:
            arr = cache.create_memmap(self.folder / f"{name}.npy", dtype, shape, what or f"the partial array {name!r}", hint)
        self.arrays[name] = arr
        return arr

    def reopen(self, name: str, shape: tuple[int, ...], dtype, writable: bool = True) -> np.ndarray:
        """The array ``name`` a checkpoint refers to; ValueError when it is missing or differs."""
        if self.folder is None:
            raise ValueError("in-memory rows cannot be reopened")
        mm = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="r+" if writable else "r")
        if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
            raise ValueError(f"partial array {self.folder / name}.npy has shape {mm.shape} {mm.dtype}, "
                             f"expected {tuple(shape)} {np.dtype(dtype)}")
        self.arrays[name] = mm
        return mm

    def due(self, batches: int) -> bool:
        """Whether a checkpoint is due after ``batches`` batches (never without a folder)."""
        return self.folder is not None and self.clock.due(batches)

    def save(self, batches: int, meta: Mapping[str, Any], arrays: Mapping[str, Any] | None = None) -> None:
        """Flush every array, then write the checkpoint ``meta`` (JSON) + ``arrays``."""
        if self.folder is None:
            return
        for arr in self.arrays.values():
            if isinstance(arr, np.memmap) and arr.mode != "r":
                arr.flush()
        cache.write_checkpoint(self.checkpoint_path, {**dict(meta), "key": self.key}, arrays)
        self.clock.saved(batches)

    def close(self) -> None:
        """Drop the arrays (closes the memmaps, e.g. before the folder is deleted)."""
        self.arrays.clear()
