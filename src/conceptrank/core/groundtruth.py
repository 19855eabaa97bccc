"""Ground-truth scores of concept rankings where the concepts really present are known.

A synthetic world's ``truth.json`` holds ``{"classes": {class: [planted concepts]},
"images": {image file name: [concepts visible in it]}, "categories": {concept: category}}``.

Global precision@G / recall@G
    per class, the share of its top-G global concepts that are planted class concepts, and the
    share of the planted concepts found among them. The denominator of precision is the number of
    concepts actually listed (G, or fewer where the ranking kept fewer). With |planted| < G
    precision@G cannot exceed |planted| / G, so the **R-precision** (precision at depth
    |planted concepts of the class|) is reported too.
Local precision@K
    per image, the share of its top-K local concepts that are visible in the image. Images are
    matched by file name (``JPEGImages/x.jpg`` ↔ ``x.jpg``). Mean over images.
Restricted scores
    only concepts whose category is among the categories of the planted class concepts are kept
    (both in the rankings — then cut at G or K — and in the random baseline): a world that plants
    colours, objects, materials and scenes says nothing about parts or textures, which are present
    in its images without defining any class.
Oracle bound
    the best precision any list of the same length could reach using only the labelled concepts
    (``min(n, |targets ∩ labelled|) / n``): when the dissection labels few of the planted concepts,
    the limit is the dissection, not the ranking.
Random-concept baseline
    the same scores for random lists of the same lengths, drawn without replacement from the
    labelled concepts with probability ∝ a weight per concept (the number of labelled units
    carrying it; see :func:`conceptrank.core.baselines.weighted_sample_sets`); Monte-Carlo means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Mapping, Sequence

import numpy as np

from conceptrank.core.baselines import weighted_sample_sets

__all__ = [
    "Truth",
    "image_key",
    "filter_categories",
    "global_truth_scores",
    "local_truth_precision",
    "random_global_scores",
    "random_local_precision",
    "oracle_precision",
]


@dataclass(frozen=True)
class Truth:
    """A parsed truth.json.

    Attributes
    ----------
    classes : class → tuple of planted concepts.
    images : image file name → frozenset of visible concepts.
    categories : concept → category.
    """

    classes: Mapping[str, tuple[str, ...]]
    images: Mapping[str, frozenset]
    categories: Mapping[str, str]

    @property
    def planted_categories(self) -> frozenset:
        """Categories of the planted class concepts (unknown concepts ignored)."""
        return frozenset(self.categories[x] for v in self.classes.values() for x in v if x in self.categories)


def image_key(image: str) -> str:
    """The file name of an image path (``JPEGImages/a_001.jpg`` → ``a_001.jpg``)."""
    return PurePosixPath(str(image).replace("\\", "/")).name


def filter_categories(xs: Sequence[str], categories: Mapping[str, str], allowed: frozenset | set | None) -> list[str]:
    """Keep the concepts whose category is in ``allowed`` (all when ``allowed`` is None)."""
    if allowed is None:
        return list(xs)
    return [x for x in xs if categories.get(x) in allowed]


def global_truth_scores(
    global_: Mapping[str, Sequence[str]],
    planted: Mapping[str, Sequence[str]],
    g: int | None,
    categories: Mapping[str, str] | None = None,
    allowed: frozenset | set | None = None,
) -> dict[str, dict[str, float]]:
    """Per class precision@g and recall@g of the global concepts against the planted ones.

    Parameters
    ----------
    global_ : class → global concepts in rank order.
    planted : class → planted concepts (classes missing here are skipped).
    g : depth; None → the class's number of planted concepts (R-precision).
    categories, allowed : keep only concepts of these categories before cutting at g.

    Returns
    -------
    class → {"precision", "recall", "n"} (n = concepts compared; precision nan when n = 0).
    """
    out = {}
    for c, lst in global_.items():
        if c not in planted:
            continue
        T = set(planted[c])
        lst = filter_categories(lst, categories or {}, allowed)
        d = len(T) if g is None else g
        top = list(dict.fromkeys(lst))[:d]
        hit = len(set(top) & T)
        out[c] = {
            "precision": hit / len(top) if top else float("nan"),
            "recall": hit / len(T) if T else float("nan"),
            "n": len(top),
        }
    return out


def local_truth_precision(
    local: Mapping[str, Sequence[str]],
    present: Mapping[str, frozenset | set],
    k: int,
    categories: Mapping[str, str] | None = None,
    allowed: frozenset | set | None = None,
) -> dict[str, float]:
    """Per image precision@k of its local concepts against the concepts visible in it.

    Parameters
    ----------
    local : image → local concepts in rank order; images are looked up in ``present`` by
        :func:`image_key` (images not found are skipped).
    present : image file name → visible concepts.

    Returns
    -------
    image → precision (nan when the image has no local concept after filtering).
    """
    out = {}
    for img, lst in local.items():
        key = image_key(img)
        if key not in present:
            continue
        top = list(dict.fromkeys(filter_categories(lst, categories or {}, allowed)))[:k]
        out[img] = len(set(top) & set(present[key])) / len(top) if top else float("nan")
    return out


def random_global_scores(
    vocabulary: Sequence[str],
    weights: np.ndarray,
    planted: Mapping[str, Sequence[str]],
    sizes: Mapping[str, int],
    n_draw: int = 1000,
    rng: np.random.Generator | int | None = 0,
) -> dict[str, dict[str, float]]:
    """Expected precision / recall of random global lists (Monte Carlo).

    Parameters
    ----------
    vocabulary : (V,) concepts that can be drawn; ``weights`` (V,) their weights (0 = never).
    planted : class → planted concepts.
    sizes : class → list length to draw (classes missing here are skipped).

    Returns
    -------
    class → {"precision", "recall"} means over ``n_draw`` draws.
    """
    rng = np.random.default_rng(rng)
    index = {x: i for i, x in enumerate(vocabulary)}
    out = {}
    for c, s in sizes.items():
        if c not in planted or s <= 0:
            continue
        T = np.zeros(len(vocabulary), dtype=bool)
        T[[index[x] for x in planted[c] if x in index]] = True
        D = weighted_sample_sets(weights, s, n_draw, rng)
        hit = (D & T).sum(axis=1)
        size = np.maximum(D.sum(axis=1), 1)
        out[c] = {"precision": float(np.mean(hit / size)), "recall": float(np.mean(hit) / max(len(set(planted[c])), 1))}
    return out


def random_local_precision(
    vocabulary: Sequence[str],
    weights: np.ndarray,
    present: Mapping[str, frozenset | set],
    sizes: Mapping[str, int],
    n_draw: int = 200,
    rng: np.random.Generator | int | None = 0,
) -> dict[str, float]:
    """Expected precision of random local lists against the visible concepts (Monte Carlo).

    Images with the same list length share the same ``n_draw`` random lists.

    Parameters
    ----------
    vocabulary, weights : (V,) drawable concepts and their weights.
    present : image file name → visible concepts.
    sizes : image → list length (looked up in ``present`` by :func:`image_key`).

    Returns
    -------
    image → mean precision over the draws.
    """
    rng = np.random.default_rng(rng)
    index = {x: i for i, x in enumerate(vocabulary)}
    V = len(vocabulary)
    by_size: dict[int, list[str]] = {}
    for img, s in sizes.items():
        if image_key(img) in present and s > 0:
            by_size.setdefault(int(s), []).append(img)
    out = {}
    for s, imgs in sorted(by_size.items()):
        D = weighted_sample_sets(weights, s, n_draw, rng).astype(np.float32)  # (n, V)
        size = np.maximum(D.sum(axis=1), 1)
        P = np.zeros((len(imgs), V), dtype=np.float32)
        for r, img in enumerate(imgs):
            P[r, [index[x] for x in present[image_key(img)] if x in index]] = 1.0
        prec = (P @ D.T) / size  # (images, n)
        for r, img in enumerate(imgs):
            out[img] = float(prec[r].mean())
    return out


def oracle_precision(targets: set | frozenset, vocabulary: set | frozenset, size: int) -> float:
    """Best achievable precision of a list of ``size`` concepts from ``vocabulary`` against ``targets``.

    ``min(size, |targets ∩ vocabulary|) / size``; nan for size 0.
    """
    if size <= 0:
        return float("nan")
    return min(size, len(set(targets) & set(vocabulary))) / size
