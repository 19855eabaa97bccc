"""Bilinear upsampling that reproduces PIL's ``resize(BILINEAR)`` on float ('F') images bit for bit.

PIL resamples in two separable passes (horizontal first). For every output pixel it sums
``pixel * weight`` over its filter taps sequentially in double precision and stores float32. The
weights are the triangle filter at half-pixel centres, truncated at the edges and renormalized
(= clamped-edge bilinear when upsampling). We replay exactly those operations as tensor ops over
all maps at once: one gather-multiply-add per tap, in PIL's tap order, with no fused multiply-add
(a BLAS matmul would use FMA and differ in the last bit).

The fast windowed path (:func:`upsample_approx_rows_cols`) is a float32 matrix product whose error
bound assumes true float32 arithmetic: it runs under :func:`full_float32`, which switches off the
TF32 / bf16 matmuls that ``torch.set_float32_matmul_precision("high" | "medium")`` allows, for its
duration, and restores the caller's settings.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import numpy as np
import torch

__all__ = ["full_float32", "pil_bilinear_taps", "upsample_bilinear", "upsample_approx_rows_cols", "upsample_error_bound", "upsample_at", "tap_ranges",
           "upsample_above_chunks", "count_above"]


@functools.lru_cache(maxsize=64)
def pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear filter taps: ``(index, weight)`` arrays of shape ``(out_size, ksize)``.

    Unused taps have weight 0 and repeat the last valid index.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ss = 1.0 / filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, ksize), np.int64)
    wts = np.zeros((out_size, ksize), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C does
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = []
        for x in range(xmax):
            d = abs((x + xmin - center + 0.5) * ss)
            ws.append(1.0 - d if d < 1.0 else 0.0)
        total = 0.0
        for w in ws:  # sequential double sum, as PIL does
            total += w
        for x, w in enumerate(ws):
            idx[xx, x] = xmin + x
            wts[xx, x] = w / total if total != 0.0 else w
        idx[xx, xmax:] = xmin + max(xmax - 1, 0)
    return idx, wts


def _pass(x: torch.Tensor, in_size: int, out_size: int, dim: int) -> torch.Tensor:
    idx, wts = pil_bilinear_taps(in_size, out_size)
    idx_t = torch.from_numpy(idx).to(x.device)
    w_t = torch.from_numpy(wts).to(x.device)
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    for t in range(idx.shape[1]):
        if not wts[:, t].any():
            continue  # a tap that is zero for every output adds exact zeros
        acc = acc + torch.index_select(x, dim, idx_t[:, t]) * w_t[:, t].reshape(shape)
    return acc.to(torch.float32)


def upsample_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample ``(P, h, w)`` float32 maps to ``(P, sh, sw)`` float32 exactly as PIL would.

    Parameters
    ----------
    maps : torch.Tensor, shape (P, h, w), float32
    size : (sh, sw)
    """
    _, h, w = maps.shape
    sh, sw = size
    x = maps.to(torch.float32)
    if sw != w:
        x = _pass(x.to(torch.float64), w, sw, dim=2)
    if sh != h:
        x = _pass(x.to(torch.float64), h, sh, dim=1)
    return x


@functools.lru_cache(maxsize=64)
def _dense_matrix(in_size: int, out_size: int) -> np.ndarray:
    idx, wts = pil_bilinear_taps(in_size, out_size)
    W = np.zeros((out_size, in_size), np.float64)
    for t in range(idx.shape[1]):
        np.add.at(W, (np.arange(out_size), idx[:, t]), wts[:, t])
    return W


def upsample_error_bound(maps: torch.Tensor) -> torch.Tensor:
    """Per map, a bound on ``|upsample_approx_rows_cols − upsample_bilinear|``: ``(P,)`` float32.

    Both are sums of at most h (resp. w) products per pass with weights summing to 1, so each
    differs from the exact value by a few float32 ulps of the map's largest magnitude; the bound
    is ~10× that.
    """
    _, h, w = maps.shape
    return maps.abs().amax(dim=(1, 2)).to(torch.float32) * (1e-6 * (h + w + 4))


def upsample_at(maps: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
    """PIL-exact upsampled values at selected pixels only.

    Parameters
    ----------
    maps : (P, h, w) float32
    index, rows, cols : (A,) int64 — map index and output pixel of each value wanted.
    size : (sh, sw) of the full upsampled map.

    Returns
    -------
    (A,) float32 — equal to ``upsample_bilinear(maps, size)[index, rows, cols]``.
    """
    _, h, w = maps.shape
    sh, sw = size
    dev = maps.device
    x = maps.to(torch.float64)
    cidx, cw = (torch.from_numpy(a).to(dev) for a in pil_bilinear_taps(w, sw))
    ridx, rw = (torch.from_numpy(a).to(dev) for a in pil_bilinear_taps(h, sh))
    if sw == w:  # no horizontal pass: the identity
        cidx, cw = torch.arange(w, device=dev)[:, None], torch.ones(w, 1, dtype=torch.float64, device=dev)
    if sh == h:
        ridx, rw = torch.arange(h, device=dev)[:, None], torch.ones(h, 1, dtype=torch.float64, device=dev)
    out = torch.zeros(index.shape[0], dtype=torch.float64, device=dev)
    for t in range(ridx.shape[1]):
        y = ridx[rows, t]
        acc = torch.zeros(index.shape[0], dtype=torch.float64, device=dev)
        for j in range(cidx.shape[1]):  # the horizontal pass, sequential in double, stored as float32
            acc = acc + x[index, y, cidx[cols, j]] * cw[cols, j]
        tmp = acc.to(torch.float32).to(torch.float64) if sw != w else acc
        out = out + tmp * rw[rows, t]
    return out.to(torch.float32)


@functools.lru_cache(maxsize=64)
def tap_ranges(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each input index, the first and last output index whose filter gives it a nonzero weight.

    An upsampled value is a convex combination of its taps, so it can exceed a threshold only in
    outputs that have some input above it among their taps: these ranges bound where to look.
    """
    idx, wts = pil_bilinear_taps(in_size, out_size)
    lo = np.full(in_size, out_size, np.int64)
    hi = np.full(in_size, -1, np.int64)
    for t in range(idx.shape[1]):
        nz = wts[:, t] != 0
        outs = np.nonzero(nz)[0]
        np.minimum.at(lo, idx[nz, t], outs)
        np.maximum.at(hi, idx[nz, t], outs)
    return lo, hi


def upsample_approx_rows_cols(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                              size: tuple[int, int]) -> torch.Tensor:
    """Fast float32 bilinear upsampling of a window per map, by two batched matrix products:
    ``(P, h, w)`` → ``(P, R, Q)``, within ``upsample_error_bound`` of PIL's values.

    ``rows`` (P, R) and ``cols`` (P, Q) are the output rows and columns to compute for each map.
    """
    _, h, w = maps.shape
    sh, sw = size
    dev = maps.device
    wh = torch.from_numpy(_dense_matrix(h, sh).astype(np.float32)).to(dev)[rows]  # (P, R, h)
    ww = torch.from_numpy(_dense_matrix(w, sw).astype(np.float32)).to(dev)[cols]  # (P, Q, w)
    with full_float32():
        return torch.bmm(torch.bmm(wh, maps.to(torch.float32)), ww.transpose(1, 2))


def _matmul_backends() -> list:
    """The per-backend float32 matmul settings of torch's precision API (torch ≥ 2.9), if any."""
    found = []
    for backend in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)):
        if backend is not None and hasattr(backend, "fp32_precision"):
            found.append(backend)
    return found


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Matrix products in true IEEE float32 (no TF32, no bf16) inside the block, on CUDA and on CPUs
    (oneDNN); the caller's settings are restored exactly on exit.

    With torch's per-backend precision API the CUDA and oneDNN matmul ``fp32_precision`` are set to
    ``"ieee"``; with older torch, ``torch.set_float32_matmul_precision("highest")`` and the
    cuda/cudnn ``allow_tf32`` flags are switched off and restored.
    """
    backends = _matmul_backends()
    if backends:
        saved = [b.fp32_precision for b in backends]
        inherited = getattr(torch.backends, "fp32_precision", "none") in ("none", "ieee")
        if all(v == "ieee" or (v == "none" and inherited) for v in saved):
            yield
            return
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, v in zip(backends, saved):
                b.fp32_precision = v
        return
    precision = torch.get_float32_matmul_precision()
    cuda_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = cuda_tf32, cudnn_tf32


def upsample_above_chunks(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices, masks)`` of the maps with a cell within the error bound of their threshold, in chunks;
    ``masks`` is PIL-exact ``upsample_bilinear(maps[indices], size) > thresholds[indices]``."""
    sh, sw = size
    maps = maps.to(torch.float32)
    thr = thresholds.to(torch.float32).to(maps.device)
    eps = 2 * upsample_error_bound(maps)
    hot = torch.nonzero((maps > (thr - eps)[:, None, None]).flatten(1).any(dim=1)).flatten()
    for chunk in torch.split(hot, max(1, (1 << 22) // max(sh * sw, 1))):
        m = maps[chunk]
        rows = torch.arange(sh, device=maps.device).expand(len(chunk), sh)
        cols = torch.arange(sw, device=maps.device).expand(len(chunk), sw)
        d = upsample_approx_rows_cols(m, rows, cols, size).sub_(thr[chunk][:, None, None])
        e = eps[chunk][:, None, None]
        mask = d > e
        amb = torch.nonzero((d >= -e) & ~mask, as_tuple=True)
        if amb[0].numel():
            exact = upsample_at(m, amb[0], amb[1], amb[2], size)
            mask[amb] = exact > thr[chunk][amb[0]]
        yield chunk, mask


def count_above(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per map, its upsampled pixels above threshold, without the full masks: ``(P,)`` int64."""
    out = torch.zeros(maps.shape[0], dtype=torch.int64, device=maps.device)
    for chunk, mask in upsample_above_chunks(maps, thresholds, size):
        out[chunk] = mask.flatten(1).sum(dim=1)
    return out
