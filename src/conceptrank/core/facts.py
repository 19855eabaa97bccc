"""Concept facts: which concepts are present in which image, as booleans a rule learner can use.

Two binarisations of a layer's maps, both exact (computed from the recomputed maps, not from the
per-image means of ``activations.npz``):

``share`` (ours, from the dissection)
    Unit u *fires* in image x when more than ``min_share`` of its upsampled map lies strictly
    above the unit's dissection threshold ``T_u`` (the same mask M_u = upsample(A_u) > T_u that
    Network Dissection scores against the probe's segmentations, with the same PIL-exact bilinear
    upsampling to the model's input size). Concept c is present in x when *any* unit labelled c
    (IoU ≥ ``min_iou`` in the tally) fires. One predicate per labelled concept, named after it.
    ``min_share = 0`` means "some pixel above threshold".
``nesyfold`` (Padalkar, Wang & Gupta, AAAI 2024)
    Filter u is present in x when the L2 norm of its (low-resolution) map is at least
    ``α·mean + γ·std`` of that norm over the train images (α = 0.6, γ = 0.7). One predicate per
    filter; NeSyFOLD names a filter after its semantic concept afterwards, so the predicate is
    ``<concept>_u<unit>`` (``u<unit>`` for a filter dissection did not label; ``unit`` numbered from 1
    as in ``tally.csv``), and its concept is the filter's dissection label.
``truth`` (synthetic worlds only, a reference)
    the concepts truth.json says are visible in the image: what a perfect detector of every
    concept would give. Rules over them show what the concepts can explain at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from conceptrank.core.upsample import count_above

__all__ = ["FactsMethod", "MapStats", "Facts", "map_stats", "concept_facts", "nesyfold_facts", "truth_facts",
           "NESYFOLD_ALPHA", "NESYFOLD_GAMMA"]

FactsMethod = Literal["share", "nesyfold"]
NESYFOLD_ALPHA = 0.6
NESYFOLD_GAMMA = 0.7


@dataclass(frozen=True)
class MapStats:
    """Per image and unit statistics of a layer's maps.

    Attributes
    ----------
    share : (N, U) float64 — fraction of the upsampled map strictly above the unit's threshold.
    l2 : (N, U) float64 — L2 norm of the unit's low-resolution map.
    """

    share: np.ndarray
    l2: np.ndarray


@dataclass(frozen=True)
class Facts:
    """Boolean facts per image.

    Attributes
    ----------
    names : V predicate names (unique).
    concepts : V concepts the predicates stand for ('' when none).
    units : V tuples of the (0-based) units behind each predicate.
    present : (N, V) bool.
    method : the binarisation ('share' or 'nesyfold').
    params : its parameters.
    """

    names: tuple[str, ...]
    concepts: tuple[str, ...]
    units: tuple[tuple[int, ...], ...]
    present: np.ndarray
    method: str
    params: dict = field(default_factory=dict)

    @property
    def empty_images(self) -> np.ndarray:
        """(N,) bool: images in which no predicate holds."""
        return ~self.present.any(axis=1)

    def subset(self, rows: np.ndarray) -> "Facts":
        """The same predicates for the images selected by ``rows`` (a mask or index array)."""
        return Facts(self.names, self.concepts, self.units, self.present[rows], self.method, self.params)


def map_stats(maps: torch.Tensor, thresholds: torch.Tensor | np.ndarray, size: tuple[int, int]) -> MapStats:
    """Above-threshold share of the upsampled maps and L2 norms of a batch of maps.

    Parameters
    ----------
    maps : (B, U, h, w) float — one layer's maps of B images.
    thresholds : (U,) — the dissection thresholds.
    size : (sh, sw) — the upsampled size (the model's input size).
    """
    b, u, h, w = maps.shape
    m = maps.to(torch.float32)
    t = torch.as_tensor(np.asarray(thresholds), dtype=torch.float32, device=m.device)
    flat, tt = m.reshape(b * u, h, w), t.repeat(b)
    counts = count_above(flat, tt, size).to(torch.float64)
    share = counts.reshape(b, u) / float(size[0] * size[1])
    l2 = torch.linalg.vector_norm(m.to(torch.float64).reshape(b, u, h * w), dim=2)
    return MapStats(share.cpu().numpy(), l2.cpu().numpy())


def concept_facts(share: np.ndarray, unit_concepts: Sequence[str | None], min_share: float = 0.0) -> Facts:
    """Our binarisation: concept c present when some unit labelled c has more than ``min_share`` of
    its upsampled map above its dissection threshold.

    Parameters
    ----------
    share : (N, U) — :attr:`MapStats.share`.
    unit_concepts : length U — each unit's concept, None for an unlabelled unit.
    min_share : in [0, 1).
    """
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"min_share must be in [0, 1), got {min_share}")
    share = np.asarray(share)
    if share.shape[1] != len(unit_concepts):
        raise ValueError(f"share has {share.shape[1]} units, unit_concepts {len(unit_concepts)}")
    names = tuple(sorted({c for c in unit_concepts if c}))
    col = {c: i for i, c in enumerate(names)}
    member = np.zeros((share.shape[1], len(names)), dtype=bool)  # (U, V) unit u is labelled concept v
    for u, c in enumerate(unit_concepts):
        if c:
            member[u, col[c]] = True
    fires = share > min_share
    present = (fires.astype(np.int64) @ member.astype(np.int64)) > 0
    units = tuple(tuple(np.nonzero(member[:, v])[0].tolist()) for v in range(len(names)))
    return Facts(names, names, units, present, "share", {"min_share": float(min_share)})


def nesyfold_facts(l2: np.ndarray, train: np.ndarray, unit_concepts: Sequence[str | None],
                   alpha: float = NESYFOLD_ALPHA, gamma: float = NESYFOLD_GAMMA) -> Facts:
    """NeSyFOLD's binarisation: filter u present when ``‖A_u‖₂ ≥ α·mean + γ·std`` over the train images.

    Parameters
    ----------
    l2 : (N, U) — :attr:`MapStats.l2`.
    train : (N,) bool — the images whose norms set the thresholds.
    unit_concepts : length U — each filter's dissection concept (None when unlabelled).
    """
    l2 = np.asarray(l2, dtype=np.float64)
    train = np.asarray(train, dtype=bool)
    if not train.any():
        raise ValueError("nesyfold_facts: no train image to set the thresholds from")
    ref = l2[train]
    theta = alpha * ref.mean(axis=0) + gamma * ref.std(axis=0)
    present = l2 >= theta[None, :]
    concepts = tuple(c or "" for c in unit_concepts)
    names = tuple(f"{c}_u{u + 1}" if c else f"u{u + 1}" for u, c in enumerate(concepts))
    units = tuple((u,) for u in range(len(concepts)))
    return Facts(names, concepts, units, present, "nesyfold", {"alpha": float(alpha), "gamma": float(gamma)})


def truth_facts(visible: Sequence[frozenset | set]) -> Facts:
    """Reference facts from a synthetic world's truth: per image (N) the set of concepts visible in it."""
    names = tuple(sorted({c for v in visible for c in v}))
    col = {c: i for i, c in enumerate(names)}
    present = np.zeros((len(visible), len(names)), dtype=bool)
    for i, v in enumerate(visible):
        present[i, [col[c] for c in v]] = True
    return Facts(names, names, tuple(() for _ in names), present, "truth", {})
