"""The NetDissect tally as a streaming statistic: per label the truth area, per unit and label the
intersection, per unit and category the activation area (``shared/spec/netdissect-semantics.md``).

:class:`TallyAccumulator` follows the ``add / result / state_dict / merge`` shape of
:mod:`conceptrank.core.stats`: shards of the probe set tallied apart and merged give the same
integers as one pass over all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from conceptrank.core.upsample import (
    tap_ranges,
    upsample_approx_rows_cols,
    upsample_at,
    upsample_error_bound,
)

__all__ = ["TallyAccumulator", "best_labels", "label_category_matrix", "float32_floor"]

_PAIR_BUDGET = 1 << 22  # upsampled window pixels processed at once (memory bound)


def float32_floor(t: np.ndarray) -> np.ndarray:
    """Largest float32 ≤ t, elementwise: for float32 x, ``x > t`` ⟺ ``x > float32_floor(t)``."""
    t = np.asarray(t, dtype=np.float64)
    t32 = t.astype(np.float32)
    over = t32.astype(np.float64) > t
    t32[over] = np.nextafter(t32[over], np.float32(-np.inf))
    return t32


def label_category_matrix(primary: np.ndarray, num_categories: int) -> np.ndarray:
    """One-hot ``(L, C)`` of each label's primary category (rows of -1 stay zero)."""
    m = np.zeros((len(primary), num_categories), np.int64)
    ok = primary >= 0
    m[np.nonzero(ok)[0], primary[ok]] = 1
    return m


def best_labels(iou: np.ndarray, primary: np.ndarray, num_categories: int) -> np.ndarray:
    """Best label per unit and category: ``(U, C)`` argmax over labels whose primary category is c.

    Ties go to the lowest label number; a category with all-zero IoU gets label 0 (numpy argmax).
    """
    U, L = iou.shape
    out = np.zeros((U, num_categories), np.int64)
    for c in range(num_categories):
        masked = iou * (primary[:L] == c)[None, :]
        out[:, c] = masked.argmax(axis=1)
    return out


@dataclass
class _Group:
    """Images of one mask size, ready for counting.

    ``stack`` (G, K, S) int64 label of every plane at every pixel (S = sh·sw); ``sc_count`` (G, L)
    how often each image-level label is listed; ``sc_cat`` (G, C) categories of those labels.
    """

    stack: torch.Tensor
    sc_count: torch.Tensor
    sc_cat: torch.Tensor
    planes: int
    sh: int
    sw: int


@dataclass
class _Windows:
    """Per active (image, unit) pair: its map, error bound and the output window that can exceed the
    threshold (first row/column ``r0``/``c0``, height/width ``bh``/``bw``)."""

    img: torch.Tensor
    unit: torch.Tensor
    maps: torch.Tensor
    eps: torch.Tensor
    r0: torch.Tensor
    c0: torch.Tensor
    bh: torch.Tensor
    bw: torch.Tensor


class TallyAccumulator:
    """Streaming NetDissect tally: truth, intersection and per-category activation counts.

    Parameters
    ----------
    thresholds : (U,) float64 per-unit thresholds; a pixel is active when its upsampled value is
        strictly greater.
    label_cat : (L, C) int one-hot of every label's primary category.

    Accumulates ``truth`` (L,), ``intersect`` (U, L), ``activation`` (U, C), all int64.
    """

    def __init__(self, thresholds: np.ndarray, label_cat: np.ndarray, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.thresholds = np.asarray(thresholds, np.float64)
        self.thr32 = torch.from_numpy(float32_floor(self.thresholds)).to(self.device)
        self.label_cat = torch.as_tensor(np.array(label_cat, dtype=np.float32), device=self.device)
        U = len(self.thresholds)
        L, C = self.label_cat.shape
        self.truth = torch.zeros(L, dtype=torch.int64, device=self.device)
        self.intersect = torch.zeros(U, L, dtype=torch.int64, device=self.device)
        self.activation = torch.zeros(U, C, dtype=torch.int64, device=self.device)
        self.images = 0

    @property
    def num_units(self) -> int:
        return len(self.thresholds)

    def add(self, features: torch.Tensor, planes: Sequence[torch.Tensor], scalars: Sequence[Sequence[int]],
            max_elements: int = 1 << 24) -> None:
        """Tally one batch.

        Parameters
        ----------
        features : (B, U, h, w) float32 activations of the batch.
        planes : B tensors ``(P_i, sh, sw)`` int of global label numbers (P_i may be 0).
        scalars : B lists of image-level label numbers.
        max_elements : bound on (active pairs × mask pixels) processed at once (memory).
        """
        feats = features.to(self.device, torch.float32)
        B, U, h, w = feats.shape
        if U != self.num_units:
            raise ValueError(f"features have {U} units, thresholds {self.num_units}")
        planes = [p.to(self.device, torch.int64) for p in planes]
        self._add_truth(planes, scalars)
        # bilinear values never exceed the map's max: only these (image, unit) pairs can be active
        active = feats.amax(dim=(2, 3)) > self.thr32[None, :]  # (B, U)
        n_active = active.sum(dim=1).tolist()
        b = 0
        while b < B:
            e = _group_end(planes, n_active, b, max_elements)
            self._add_group(feats[b:e], active[b:e], planes[b:e], scalars[b:e])
            b = e
        self.images += B

    def _add_truth(self, planes: Sequence[torch.Tensor], scalars: Sequence[Sequence[int]]) -> None:
        """Every plane's labelled pixels, plus sh·sw per image-level label."""
        flat = [p.reshape(-1) for p in planes if p.numel()]
        if flat:
            cnt = torch.bincount(torch.cat(flat), minlength=self.truth.shape[0])
            cnt[0] = 0
            self.truth += cnt
        sc_lab = [lab for sc in scalars for lab in sc]
        if sc_lab:
            sizes = [int(p.shape[-2] * p.shape[-1]) for p, sc in zip(planes, scalars) for _ in sc]
            self.truth.index_add_(0, torch.as_tensor(sc_lab, device=self.device),
                                  torch.as_tensor(sizes, dtype=torch.int64, device=self.device))

    def _add_group(self, feats: torch.Tensor, active: torch.Tensor, planes, scalars) -> None:
        """Images of one mask size: all their active (image, unit) pairs at once.

        Each pair's map is upsampled with a fast float32 matrix product; pixels whose value lies
        within its error bound of the threshold are recomputed exactly as PIL would, so the
        active masks are PIL-exact. Intersections are counted sparsely over active pixels only.
        """
        pair_img, pair_unit = torch.nonzero(active, as_tuple=True)  # sorted by image, then unit
        if pair_img.numel() == 0:
            return
        group = self._pack_group(planes, scalars)
        win = self._windows(feats, pair_img, pair_unit, group.sh, group.sw)
        for sel in _window_chunks(win.bh * win.bw, win.bh, win.bw):
            rows, cols, mask = self._active_masks(win, sel, group.sh, group.sw)
            self._count(group, win.img[sel], win.unit[sel], rows, cols, mask)

    def _pack_group(self, planes: Sequence[torch.Tensor], scalars: Sequence[Sequence[int]]) -> _Group:
        dev = self.device
        G = len(planes)
        sh, sw = int(planes[0].shape[-2]), int(planes[0].shape[-1])
        S, L = sh * sw, self.truth.shape[0]
        K = max(int(p.shape[0]) for p in planes)
        stack = torch.zeros(G, max(K, 1), S, dtype=torch.int64, device=dev)
        for i, p in enumerate(planes):
            if p.numel():
                stack[i, : p.shape[0]] = p.reshape(p.shape[0], S)
        sc_count = torch.zeros(G, L, dtype=torch.int64, device=dev)
        for i, sc in enumerate(scalars):
            for lab in sc:
                sc_count[i, lab] += 1
        sc_cat = (sc_count.to(torch.float32) @ self.label_cat) > 0
        return _Group(stack, sc_count, sc_cat, K, sh, sw)

    def _windows(self, feats: torch.Tensor, pair_img: torch.Tensor, pair_unit: torch.Tensor,
                 sh: int, sw: int) -> _Windows:
        """Only outputs with a hot input among their taps can exceed the threshold: per pair, the
        window of output rows/columns spanned by its hot cells."""
        dev = self.device
        h, w = feats.shape[-2:]
        maps = feats[pair_img, pair_unit]  # (P, h, w)
        eps = 2 * upsample_error_bound(maps)  # (P,)
        hot = maps > (self.thr32[pair_unit] - eps)[:, None, None]
        rlo, rhi = (torch.from_numpy(a).to(dev) for a in tap_ranges(h, sh))
        clo, chi = (torch.from_numpy(a).to(dev) for a in tap_ranges(w, sw))
        hot_r, hot_c = hot.any(dim=2), hot.any(dim=1)  # (P, h), (P, w)
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        r0 = rlo[torch.where(hot_r, ar_h, h).amin(dim=1).clamp(max=h - 1)]
        r1 = rhi[torch.where(hot_r, ar_h, -1).amax(dim=1).clamp(min=0)]
        c0 = clo[torch.where(hot_c, ar_w, w).amin(dim=1).clamp(max=w - 1)]
        c1 = chi[torch.where(hot_c, ar_w, -1).amax(dim=1).clamp(min=0)]
        bh, bw = (r1 - r0 + 1).clamp(min=1), (c1 - c0 + 1).clamp(min=1)
        return _Windows(pair_img, pair_unit, maps, eps, r0, c0, bh, bw)

    def _active_masks(self, win: _Windows, sel: torch.Tensor, sh: int, sw: int):
        """PIL-exact active masks of the selected pairs' windows.

        Returns ``rows`` (n, BH) and ``cols`` (n, BW) output indices, ``mask`` (n, BH, BW) bool.
        """
        dev = self.device
        units = win.unit[sel]
        bh, bw = win.bh[sel], win.bw[sel]
        ro = torch.arange(int(bh.max()), device=dev)
        co = torch.arange(int(bw.max()), device=dev)
        rows = (win.r0[sel, None] + ro).clamp(max=sh - 1)
        cols = (win.c0[sel, None] + co).clamp(max=sw - 1)
        valid = (ro[None, :] < bh[:, None])[:, :, None] & (co[None, :] < bw[:, None])[:, None, :]
        maps = win.maps[sel]
        d = upsample_approx_rows_cols(maps, rows, cols, (sh, sw)).sub_(self.thr32[units][:, None, None])
        eps = win.eps[sel][:, None, None]
        mask = (d > eps) & valid  # surely active
        maybe = (d >= -eps) & valid  # possibly active
        if int(maybe.sum()) != int(mask.sum()):  # rare: values within the error bound
            amb = torch.nonzero(maybe & ~mask, as_tuple=True)
            exact = upsample_at(maps, amb[0], rows[amb[0], amb[1]], cols[amb[0], amb[2]], (sh, sw))
            mask[amb] = exact > self.thr32[units][amb[0]]
        return rows, cols, mask

    def _count(self, group: _Group, img: torch.Tensor, unit: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the intersections and activation areas of ``n`` pairs' active masks."""
        n, L = img.numel(), self.truth.shape[0]
        size = mask.sum(dim=(1, 2))  # (n,) active pixels per pair
        flags = group.sc_cat[img].clone()  # (n, C)
        if group.planes:
            q, rr, cc = torch.nonzero(mask, as_tuple=True)  # active pixels
            px = rows[q, rr] * group.sw + cols[q, cc]
            labs = group.stack[img[q], :, px]  # (A, K) labels of every plane there
            keys = (q[:, None] * L + labs).reshape(-1)
            inter = torch.bincount(keys, minlength=n * L).reshape(n, L)
            inter[:, 0] = 0
            self.intersect.index_add_(0, unit, inter)
            flags |= ((inter > 0).to(torch.float32) @ self.label_cat) > 0
        if group.sc_count.any():
            self.intersect.index_add_(0, unit, size[:, None] * group.sc_count[img])
        self.activation.index_add_(0, unit, size[:, None] * flags.to(torch.int64))

    def merge(self, other: "TallyAccumulator") -> None:
        """Fold in the counts of an accumulator with the same thresholds that saw other images."""
        if not np.array_equal(self.thresholds, other.thresholds):
            raise ValueError("can only merge tallies made with the same thresholds")
        self.truth += other.truth.to(self.device)
        self.intersect += other.intersect.to(self.device)
        self.activation += other.activation.to(self.device)
        self.images += other.images

    def state_dict(self) -> dict:
        return {
            "thresholds": self.thresholds, "truth": self.truth.cpu().numpy(),
            "intersect": self.intersect.cpu().numpy(), "activation": self.activation.cpu().numpy(),
            "images": self.images,
        }

    @classmethod
    def from_state_dict(cls, state: dict, label_cat: np.ndarray, device: str | torch.device = "cpu") -> "TallyAccumulator":
        """Inverse of :meth:`state_dict` (``label_cat`` as for the constructor)."""
        acc = cls(np.asarray(state["thresholds"], np.float64), label_cat, device)
        for name in ("truth", "intersect", "activation"):
            want = getattr(acc, name)
            got = torch.as_tensor(np.array(state[name], dtype=np.int64), device=acc.device)
            if got.shape != want.shape:
                raise ValueError(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            setattr(acc, name, got)
        acc.images = int(state["images"])
        return acc

    def iou(self) -> np.ndarray:
        """``(U, L)`` IoU = I / (A[u, primary(l)] + T[l] − I + 1e-10)."""
        inter = self.intersect.cpu().numpy().astype(np.float64)
        act = self.activation.cpu().numpy().astype(np.float64) @ self.label_cat.cpu().numpy().astype(np.float64).T
        truth = self.truth.cpu().numpy().astype(np.float64)
        return inter / (act + truth[None, :] - inter + 1e-10)


def _group_end(planes: Sequence[torch.Tensor], n_active: list[int], b: int, max_elements: int) -> int:
    """End of the run of consecutive images from ``b`` with one mask size and bounded work."""
    sh, sw = int(planes[b].shape[-2]), int(planes[b].shape[-1])
    e, work = b, 0
    while e < len(planes) and (int(planes[e].shape[-2]), int(planes[e].shape[-1])) == (sh, sw) and \
            (e == b or work + n_active[e] * sh * sw <= max_elements):
        work += n_active[e] * sh * sw
        e += 1
    return e


def _window_chunks(area: torch.Tensor, bh: torch.Tensor, bw: torch.Tensor):
    """Yield index tensors of pairs to upsample together: similar window sizes (little padding),
    at most ``_PAIR_BUDGET`` padded window pixels per chunk."""
    order = torch.argsort(area, stable=True)
    bh_s, bw_s = bh[order].cpu().numpy(), bw[order].cpu().numpy()
    P, start = int(order.numel()), 0
    while start < P:
        stop = min(P, start + max(1, _PAIR_BUDGET // int(bh_s[start] * bw_s[start])))
        while stop - start > 1 and (stop - start) * int(bh_s[start:stop].max()) * int(bw_s[start:stop].max()) > _PAIR_BUDGET:
            stop = start + (stop - start) // 2
        yield order[start:stop]
        start = stop
