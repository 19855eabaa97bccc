"""A deliberately naive NetDissect-Lite tally: a Python loop over images and units with PIL resizes.

It follows NetDissect-Lite's ``tally_job`` step by step and serves as the reference that the
vectorized :class:`conceptrank.stages.dissect.TallyAccumulator` is tested and benchmarked against.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["naive_tally"]


def naive_tally(
    features: np.ndarray,
    thresholds: np.ndarray,
    planes: Sequence[np.ndarray],
    scalars: Sequence[Sequence[int]],
    label_cat: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference tally.

    Parameters
    ----------
    features : (N, U, h, w) activations.
    thresholds : (U,) float64.
    planes : N arrays ``(P_i, sh, sw)`` of global label numbers.
    scalars : N lists of image-level labels.
    label_cat : (L, C) one-hot primary category of each label.

    Returns
    -------
    truth (L,), intersect (U, L), activation (U, C) — int64 counts.
    """
    N, U = features.shape[:2]
    L, C = label_cat.shape
    truth = np.zeros(L, np.int64)
    both = np.zeros((U, L), np.int64)
    units_cat = np.zeros((U, C), np.int64)
    for i in range(N):
        pix = np.asarray(planes[i])
        sh, sw = pix.shape[-2:]
        for s in scalars[i]:
            truth[s] += sh * sw
        if pix.size:
            t = np.bincount(pix.ravel(), minlength=L)
            t[0] = 0
            truth += t[:L]
        for u in range(U):
            fmap = np.asarray(features[i, u], dtype=np.float32)
            if fmap.max() > thresholds[u]:
                up = np.array(Image.fromarray(fmap).resize((sw, sh), resample=Image.BILINEAR))
                idx = np.argwhere(up > thresholds[u])
                tally_cat = np.zeros(C, np.int64)
                if pix.size:
                    bt = np.bincount(pix[:, idx[:, 0], idx[:, 1]].ravel(), minlength=L)
                    bt[0] = 0
                    tally_cat = bt[:L] @ label_cat
                    both[u] += bt[:L]
                for s in scalars[i]:
                    tally_cat = tally_cat + label_cat[s]
                    both[u, s] += len(idx)
                units_cat[u] += len(idx) * (tally_cat > 0)
    return truth, both, units_cat
