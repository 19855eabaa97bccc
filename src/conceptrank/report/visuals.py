"""Thumbnails with activation overlays: unit cards (probe images) and image panels (target images).

The pure parts (:func:`fit_size`, :func:`mask_overlay`, :func:`heatmap_overlay`, :func:`upsampled`)
work on arrays; :func:`unit_maps` runs the model once over a list of images and keeps only the
(image, unit) maps that are asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "fit_size",
    "thumbnail",
    "upsampled",
    "mask_overlay",
    "heatmap_overlay",
    "unit_maps",
    "save_jpeg",
]

_OUTLINE = np.array([255, 221, 0], np.float32)  # bright yellow mask boundary


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(w, h)`` that fits in a ``max_side`` square with the aspect ratio kept (each side ≥ 1)."""
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail(img: Image.Image, max_side: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB of ``img`` resized (up or down) to fit a ``max_side`` square."""
    w, h = fit_size(img.width, img.height, max_side)
    return np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.uint8)


def upsampled(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(P, h, w)`` activation maps → ``(P, H, W)`` float32, bilinear exactly as dissection upsamples."""
    from conceptrank.core.upsample import upsample_bilinear

    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    return upsample_bilinear(t, size).numpy()


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def mask_overlay(rgb: np.ndarray, mask: np.ndarray, dim: float = 0.3) -> np.ndarray:
    """NetDissect-style unit view: pixels outside ``mask`` darkened to ``dim``, the mask outlined.

    Parameters
    ----------
    rgb : (H, W, 3) uint8.
    mask : (H, W) bool, the thresholded upsampled activation.
    dim : brightness kept outside the mask.
    """
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {rgb.shape[:2]}")
    out = rgb.astype(np.float32) * np.where(mask, 1.0, dim)[:, :, None]
    out[_boundary(mask)] = _OUTLINE
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def heatmap_overlay(rgb: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.6,
                    cmap: str = "jet") -> np.ndarray:
    """``heat`` in [0, 1] blended over the image (opacity grows with the value), ``mask`` outlined.

    Parameters
    ----------
    rgb : (H, W, 3) uint8.
    heat : (H, W) float, clipped to [0, 1].
    mask : optional (H, W) bool whose boundary is drawn.
    alpha : opacity at ``heat = 1``.
    """
    import matplotlib

    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat {heat.shape} does not match image {rgb.shape[:2]}")
    h = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    colors = matplotlib.colormaps[cmap](h)[:, :, :3].astype(np.float32) * 255.0
    a = (alpha * h)[:, :, None]  # opacity follows the value: inactive regions show the image unchanged
    out = rgb.astype(np.float32) * (1.0 - a) + colors * a
    if mask is not None:
        out[_boundary(mask)] = _OUTLINE
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_jpeg(rgb: np.ndarray, path: Path, quality: int = 85) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=quality)
    return path


def unit_maps(module: torch.nn.Module, layer: str, images: Sequence[Image.Image],
              to_tensor: Callable[[Image.Image], torch.Tensor], wanted: Mapping[int, Iterable[int]],
              batch_size: int = 32) -> dict[tuple[int, int], np.ndarray]:
    """Activation maps of selected units on selected images, from one forward pass per batch.

    Parameters
    ----------
    module : the model (eval mode, CPU).
    layer : dotted name of the layer whose output is ``(B, U, h, w)``.
    images : the images (PIL).
    to_tensor : image → ``(3, H, W)`` model input.
    wanted : image position → 0-based unit indices to keep.

    Returns
    -------
    ``{(image position, unit): (h, w) float32 map}``.
    """
    from conceptrank.nn.hooks import record_layers

    out: dict[tuple[int, int], np.ndarray] = {}
    order = [i for i in range(len(images)) if list(wanted.get(i, ()))]
    module.eval()
    with torch.inference_mode(), record_layers(module, [layer]) as rec:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            module(torch.stack([to_tensor(images[i]) for i in idx]))
            f = rec[layer].float()
            if f.dim() == 2:  # (B, U) vectors: a 1×1 "map"
                f = f[:, :, None, None]
            if f.dim() != 4:
                raise ValueError(f"layer {layer!r} outputs shape {tuple(f.shape)}; expected (B, U, h, w)")
            for b, i in enumerate(idx):
                for u in wanted[i]:
                    out[(i, int(u))] = f[b, int(u)].cpu().numpy().copy()
    return out
