"""Streaming statistics with ``add(batch)``, a result method, ``state_dict`` and ``merge``.

Modelled on davidbau/dissect's ``runningstats``: each object sees the data once, batch by batch,
and two objects that saw disjoint parts of the data can be merged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TopKQuantile", "TopImages", "quantile_rank_count"]


def quantile_rank_count(total: int, quantile: float) -> int:
    """How many of the largest values determine numpy's 'linear' ``(1 - quantile)`` quantile exactly.

    numpy interpolates between ascending positions ``floor(p*(M-1))`` and the next one, with
    ``p = 1 - quantile``; both lie within the top ``M - floor(p*(M-1))`` values.
    """
    if total <= 0:
        raise ValueError("total must be positive")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    p = 1.0 - quantile
    lo = math.floor(p * (total - 1))
    return total - lo


class TopKQuantile:
    """Exact per-unit upper quantile from a running top-k of each unit's values.

    The ``(1 - quantile)`` quantile (numpy's default 'linear' method) of ``total`` values per unit
    needs only the top ``k = M - floor((1-q)(M-1))`` of them, ≈ ``q·M``: memory is ``U × k`` floats,
    0.5% of the feature volume for the default quantile, instead of every activation.

    Parameters
    ----------
    num_units : int
        U, number of units (rows).
    total : int
        M, number of values each unit will receive in all (N images × h × w).
    quantile : float
        Upper tail fraction (NetDissect's 0.005).
    """

    def __init__(self, num_units: int, total: int, quantile: float = 0.005, device: str | torch.device = "cpu") -> None:
        self.num_units = int(num_units)
        self.total = int(total)
        self.quantile = float(quantile)
        self.k = quantile_rank_count(self.total, self.quantile)
        self.device = torch.device(device)
        self.top = torch.empty(self.num_units, 0, dtype=torch.float32, device=self.device)
        self._buf: list[torch.Tensor] = []
        self._buf_n = 0
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """Add a batch of values, shape ``(U, n)``."""
        if values.shape[0] != self.num_units:
            raise ValueError(f"expected {self.num_units} rows, got {values.shape[0]}")
        values = values.to(self.device, torch.float32)
        self.count += values.shape[1]
        if self.count > self.total:
            raise ValueError(f"received {self.count} values per unit, more than the declared total {self.total}")
        self._buf.append(values)
        self._buf_n += values.shape[1]
        # Amortize: select the top k only when the buffer holds at least k (and 64k) new values.
        if self._buf_n >= max(self.k, 65536):
            self._compact()

    def _compact(self) -> None:
        if not self._buf:
            return
        allv = torch.cat([self.top] + self._buf, dim=1)
        self._buf, self._buf_n = [], 0
        if allv.shape[1] > self.k:
            allv = torch.topk(allv, self.k, dim=1, largest=True, sorted=False).values
        self.top = allv

    def merge(self, other: "TopKQuantile") -> None:
        """Fold in another accumulator that saw different values of the same units."""
        if other.num_units != self.num_units or other.quantile != self.quantile or other.total != self.total:
            raise ValueError("can only merge accumulators with equal units, quantile and total")
        other._compact()
        self._buf.append(other.top.to(self.device))
        self._buf_n += other.top.shape[1]
        self.count += other.count
        self._compact()

    def result(self, quantile: float | None = None) -> np.ndarray:
        """Per-unit quantile, shape ``(U,)`` float64; requires all ``total`` values to have been added.

        ``quantile`` may name any upper-tail fraction up to the one the accumulator was built
        for (its top-k holds every value those need); default: that one.
        """
        q = self.quantile if quantile is None else float(quantile)
        if self.count != self.total:
            raise ValueError(f"received {self.count} of {self.total} values per unit; the quantile would be wrong")
        if quantile_rank_count(self.total, q) > self.k:
            raise ValueError(f"quantile {q} needs more values than the {self.k} kept for quantile {self.quantile}")
        self._compact()
        top = torch.sort(self.top.double(), dim=1, descending=True).values.cpu().numpy()
        M = self.total
        idx = (1.0 - q) * (M - 1)
        lo = math.floor(idx)
        t = idx - lo
        a = top[:, M - 1 - lo]
        b = top[:, M - 2 - lo] if lo + 1 <= M - 1 else a
        diff = b - a
        # numpy's _lerp: a + d*t, computed from the other end when t >= 0.5
        return np.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)

    def state_dict(self) -> dict:
        self._compact()
        return {
            "num_units": self.num_units, "total": self.total, "quantile": self.quantile,
            "count": self.count, "top": self.top.cpu().numpy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device = "cpu") -> "TopKQuantile":
        obj = cls(int(state["num_units"]), int(state["total"]), float(state["quantile"]), device)
        obj.top = torch.as_tensor(np.array(state["top"], dtype=np.float32), device=obj.device)
        obj.count = int(state["count"])
        return obj


class TopImages:
    """Per unit, the ``k`` images with the highest value (e.g. the map's maximum), as a mergeable
    statistic. Deterministic: ties in value go to the lower image index, whatever the batching
    or sharding.

    Attributes ``value`` (U, ≤k) float32 descending and ``index`` (U, ≤k) int64 image numbers.
    """

    def __init__(self, num_units: int, k: int, value: np.ndarray | None = None, index: np.ndarray | None = None) -> None:
        self.k = int(k)
        self.value = np.zeros((num_units, 0), np.float32) if value is None else np.asarray(value, np.float32)
        self.index = np.zeros((num_units, 0), np.int64) if index is None else np.asarray(index, np.int64)

    def add(self, values: torch.Tensor, offset: int) -> None:
        """``values`` (B, U) of images ``offset .. offset+B-1``."""
        B, U = values.shape
        idx = np.broadcast_to(np.arange(offset, offset + B, dtype=np.int64), (U, B))
        self._keep(values.T.float().cpu().numpy(), idx)

    def merge(self, other: "TopImages") -> None:
        """Fold in another statistic over other images of the same units."""
        if other.value.shape[0] != self.value.shape[0] or other.k != self.k:
            raise ValueError("can only merge top images with equal units and k")
        self._keep(other.value, other.index)

    def _keep(self, value: np.ndarray, index: np.ndarray) -> None:
        v = np.concatenate([self.value, value], axis=1)
        i = np.concatenate([self.index, index], axis=1)
        order = np.lexsort((i, -v), axis=1)[:, :self.k]  # value descending, then index ascending
        self.value = np.take_along_axis(v, order, axis=1)
        self.index = np.take_along_axis(i, order, axis=1)

    def state_dict(self) -> dict:
        return {"k": self.k, "value": self.value, "index": self.index}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TopImages":
        value = np.asarray(state["value"], np.float32)
        return cls(value.shape[0], int(state["k"]), value, state["index"])
