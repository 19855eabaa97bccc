"""Network Dissection with NetDissect-Lite's exact semantics (``shared/spec/netdissect-semantics.md``).

Two passes over the probe set, the model run once:

1. *forward*: each image through the model; the hooked layers' maps ``(N, U, h, w)`` go to a
   feature cache on disk (a memmap, deleted afterwards) and into a running top-k per unit from
   which the exact ``1 - quantile`` threshold follows;
2. *tally*: masks are decoded in loader workers; per batch, only the (image, unit) pairs whose map
   exceeds the unit's threshold somewhere are upsampled (PIL-exact bilinear) and intersected with
   every label at once as tensor operations.

Caching and resume (see :mod:`conceptrank.io.cache`): each layer's outputs are reused when its
``dissect.json`` was written for the same key (model weights, layer, probe index and files,
thresholds, every parameter, package versions); layers of a multi-layer run are keyed one by one.
Otherwise the run works in ``out/.features/<key>/`` (feature memmaps plus a checkpoint of the running
top-k, top images and tally counts, written every ``CONCEPTRANK_CHECKPOINT_SECONDS``), resumes from
the last checkpoint after a crash or kill, and deletes the folder when every output is written.

GPU memory: a batch whose forward pass runs out of CUDA memory is retried in halves (down to one
image at a time, then an error naming ``--batch-size``); later batches keep the smaller size.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from conceptrank.core.stats import TopKQuantile
from conceptrank.core.upsample import (
    tap_ranges,
    upsample_approx_rows_cols,
    upsample_at,
    upsample_error_bound,
)
from conceptrank.errors import ConceptrankError
from conceptrank.io import cache
from conceptrank.io.broden import BrodenDataset, BrodenError
from conceptrank.io.cache import (
    atomic_write_json,
    atomic_write_text,
    hash_json,
    package_versions,
)
from conceptrank.io.tally_csv import format_tally

__all__ = [
    "DissectConfig",
    "DissectResult",
    "TallyAccumulator",
    "dissect",
    "run_dissect",
    "float32_floor",
    "label_category_matrix",
    "best_labels",
    "forward_in_chunks",
]


@dataclass(frozen=True)
class DissectConfig:
    """Parameters of a dissection (all of them key the outputs' fingerprint)."""

    categories: tuple[str, ...] | None = None
    quantile: float = 0.005
    iou_threshold: float = 0.04
    preprocess: str = "model"  # 'model' or 'netdissect'
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    store: str = "float32"  # dtype of the on-disk feature cache between the two passes
    progress: bool = True
    # also label units at this second quantile (same pass) and report how many keep their label
    stability_quantile: float | None = None

    def validate(self) -> None:
        if self.preprocess not in ("model", "netdissect"):
            raise ConceptrankError(f"--preprocess must be 'model' or 'netdissect', got {self.preprocess!r}")
        if not 0.0 < self.quantile < 1.0:
            raise ConceptrankError(f"--quantile must lie in (0, 1), got {self.quantile}")
        if self.store not in ("float32", "float16"):
            raise ConceptrankError(f"--store must be float32 or float16, got {self.store!r}")
        if self.batch_size < 1:
            raise ConceptrankError("--batch-size must be >= 1")
        if self.stability_quantile is not None and not 0.0 < self.stability_quantile < 1.0:
            raise ConceptrankError(f"stability quantile must lie in (0, 1), got {self.stability_quantile}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConceptrankError(f"--device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class DissectResult:
    """Outcome of dissecting one layer.

    Attributes
    ----------
    layer : dotted layer name.
    out : folder holding tally.csv, thresholds.npy, dissect.json.
    thresholds : (U,) float64 per-unit thresholds.
    iou : (U, L) float64 IoU of every unit with every label.
    best_label : (U, C) int best label per unit and category; ``best_category`` (U,) index into
        ``categories``; ``score`` (U,) the unit's best IoU.
    """

    layer: str
    out: Path
    categories: tuple[str, ...]
    label_names: tuple[str, ...]
    thresholds: np.ndarray
    iou: np.ndarray
    best_label: np.ndarray
    best_category: np.ndarray
    score: np.ndarray
    iou_threshold: float
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    reused: bool = False  # True when the outputs of an earlier run with the same key were reused

    def unit_label(self, u: int) -> tuple[str, str, float]:
        """``(label name, category, iou)`` of unit ``u`` (0-based)."""
        c = int(self.best_category[u])
        return self.label_names[self.best_label[u, c]], self.categories[c], float(self.score[u])

    def summary(self) -> str:
        n = len(self.score)
        det = int((self.score >= self.iou_threshold).sum())
        per = ", ".join(f"{k} {v}" for k, v in self.counts.get("unique_concepts", {}).items())
        if self.reused:
            return (
                f"dissect {self.layer}: {det}/{n} units with IoU >= {self.iou_threshold} "
                f"({self.counts.get('concepts', 0)} distinct concepts: {per}); reused cached result "
                f"({self.timings.get('total', 0):.2f}s) -> {self.out / 'tally.csv'}"
            )
        return (
            f"dissect {self.layer}: {det}/{n} units with IoU >= {self.iou_threshold} "
            f"({self.counts.get('concepts', 0)} distinct concepts: {per}); "
            f"{self.counts.get('images', 0)} probe images in {self.timings.get('total', 0):.1f}s -> {self.out / 'tally.csv'}"
        )


# -- pure computation ------------------------------------------------------------------------
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
        self.label_cat = torch.as_tensor(np.asarray(label_cat), dtype=torch.float32, device=self.device)
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
        # truth: every plane's labelled pixels, plus sh*sw per image-level label
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
        # bilinear values never exceed the map's max: only these (image, unit) pairs can be active
        active = feats.amax(dim=(2, 3)) > self.thr32[None, :]  # (B, U)
        n_active = active.sum(dim=1).tolist()
        # groups of consecutive images with one mask size and a bounded amount of work
        b = 0
        while b < B:
            sh, sw = int(planes[b].shape[-2]), int(planes[b].shape[-1])
            e, work = b, 0
            while e < B and (int(planes[e].shape[-2]), int(planes[e].shape[-1])) == (sh, sw) and \
                    (e == b or work + n_active[e] * sh * sw <= max_elements):
                work += n_active[e] * sh * sw
                e += 1
            self._add_group(feats[b:e], active[b:e], planes[b:e], scalars[b:e], sh, sw)
            b = e
        self.images += B

    def _add_group(self, feats, active, planes, scalars, sh: int, sw: int) -> None:
        """Images of one mask size: all their active (image, unit) pairs at once.

        Each pair's map is upsampled with a fast float32 matrix product; pixels whose value lies
        within its error bound of the threshold are recomputed exactly as PIL would, so the
        active masks are PIL-exact. Intersections are counted sparsely over active pixels only.
        """
        dev = self.device
        G = feats.shape[0]
        S = sh * sw
        L = self.truth.shape[0]
        pair_img, pair_unit = torch.nonzero(active, as_tuple=True)  # sorted by image, then unit
        P = pair_img.numel()
        if P == 0:
            return
        K = max(int(p.shape[0]) for p in planes)
        stack = torch.zeros(G, max(K, 1), S, dtype=torch.int64, device=dev)  # label per image, plane, pixel
        for i, p in enumerate(planes):
            if p.numel():
                stack[i, : p.shape[0]] = p.reshape(p.shape[0], S)
        # image-level labels: per image, how often each label is listed
        sc_count = torch.zeros(G, L, dtype=torch.int64, device=dev)
        for i, sc in enumerate(scalars):
            for lab in sc:
                sc_count[i, lab] += 1
        sc_cat = (sc_count.to(torch.float32) @ self.label_cat) > 0  # (G, C)
        h, w = feats.shape[-2:]
        all_maps = feats[pair_img, pair_unit]  # (P, h, w)
        all_eps = 2 * upsample_error_bound(all_maps)  # (P,)
        # Only outputs with a hot input among their taps can exceed the threshold: per pair, the
        # window of output rows/columns spanned by its hot cells.
        hot = all_maps > (self.thr32[pair_unit] - all_eps)[:, None, None]
        rlo, rhi = (torch.from_numpy(a).to(dev) for a in tap_ranges(h, sh))
        clo, chi = (torch.from_numpy(a).to(dev) for a in tap_ranges(w, sw))
        hot_r, hot_c = hot.any(dim=2), hot.any(dim=1)  # (P, h), (P, w)
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        r0 = rlo[torch.where(hot_r, ar_h, h).amin(dim=1).clamp(max=h - 1)]
        r1 = rhi[torch.where(hot_r, ar_h, -1).amax(dim=1).clamp(min=0)]
        c0 = clo[torch.where(hot_c, ar_w, w).amin(dim=1).clamp(max=w - 1)]
        c1 = chi[torch.where(hot_c, ar_w, -1).amax(dim=1).clamp(min=0)]
        bh, bw = (r1 - r0 + 1).clamp(min=1), (c1 - c0 + 1).clamp(min=1)
        order = torch.argsort(bh * bw, stable=True)  # similar window sizes together: little padding
        budget = 1 << 22
        bh_s, bw_s = bh[order].cpu().numpy(), bw[order].cpu().numpy()
        start = 0
        while start < P:
            stop = min(P, start + max(1, budget // int(bh_s[start] * bw_s[start])))
            while stop - start > 1 and (stop - start) * int(bh_s[start:stop].max()) * int(bw_s[start:stop].max()) > budget:
                stop = start + (stop - start) // 2
            sel = order[start:stop]
            start = stop
            pi_img, pi_unit = pair_img[sel], pair_unit[sel]
            n = sel.numel()
            BH, BW = int(bh[sel].max()), int(bw[sel].max())
            ro = torch.arange(BH, device=dev)
            co = torch.arange(BW, device=dev)
            rows = (r0[sel, None] + ro).clamp(max=sh - 1)  # (n, BH)
            cols = (c0[sel, None] + co).clamp(max=sw - 1)  # (n, BW)
            valid = (ro[None, :] < bh[sel, None])[:, :, None] & (co[None, :] < bw[sel, None])[:, None, :]
            maps = all_maps[sel]
            d = upsample_approx_rows_cols(maps, rows, cols, (sh, sw)).sub_(self.thr32[pi_unit][:, None, None])
            eps = all_eps[sel][:, None, None]
            mask = (d > eps) & valid  # surely active
            maybe = (d >= -eps) & valid  # possibly active
            if int(maybe.sum()) != int(mask.sum()):  # rare: values within the error bound
                amb = torch.nonzero(maybe & ~mask, as_tuple=True)
                exact = upsample_at(maps, amb[0], rows[amb[0], amb[1]], cols[amb[0], amb[2]], (sh, sw))
                mask[amb] = exact > self.thr32[pi_unit][amb[0]]
            size = mask.sum(dim=(1, 2))  # (n,) active pixels per pair
            flags = sc_cat[pi_img].clone()  # (n, C)
            if K:
                q, rr, cc = torch.nonzero(mask, as_tuple=True)  # active pixels
                px = rows[q, rr] * sw + cols[q, cc]
                labs = stack[pi_img[q], :, px]  # (A, K) labels of every plane there
                keys = (q[:, None] * L + labs).reshape(-1)
                inter = torch.bincount(keys, minlength=n * L).reshape(n, L)
                inter[:, 0] = 0
                self.intersect.index_add_(0, pi_unit, inter)
                flags |= ((inter > 0).to(torch.float32) @ self.label_cat) > 0
            if sc_count.any():
                self.intersect.index_add_(0, pi_unit, size[:, None] * sc_count[pi_img])
            self.activation.index_add_(0, pi_unit, size[:, None] * flags.to(torch.int64))

    def merge(self, other: "TallyAccumulator") -> None:
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


# -- data loading ------------------------------------------------------------------------------
class _Failed:
    """A BrodenError raised in a loader worker, carried to the main process as a value: torch would
    re-raise it with its worker traceback pasted into the message."""

    def __init__(self, error: BrodenError) -> None:
        self.error = error


class _ProbeImages(torch.utils.data.Dataset):
    def __init__(self, ds: BrodenDataset, to_tensor, size):
        self.ds, self.to_tensor, self.size = ds, to_tensor, size

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.to_tensor(self.ds.load_image(i), self.size)
        except BrodenError as e:
            return _Failed(e)


def _collate_images(batch):
    failed = [b for b in batch if isinstance(b, _Failed)]
    return failed[0] if failed else torch.stack(batch)


class _ProbeMasks(torch.utils.data.Dataset):
    def __init__(self, ds: BrodenDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return torch.from_numpy(self.ds.load_planes(i)), list(self.ds.records[i].scalars)
        except BrodenError as e:
            return _Failed(e)


def _collate_masks(batch):
    failed = [b for b in batch if isinstance(b, _Failed)]
    return failed[0] if failed else ([b[0] for b in batch], [b[1] for b in batch])


def _loader(dataset, batch_size, workers, collate_fn=None):
    kwargs = {}
    if workers > 0:
        kwargs = {"num_workers": workers, "prefetch_factor": 4, "persistent_workers": False}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, **kwargs)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConceptrankError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def _probe_size(ds: BrodenDataset) -> tuple[int, int]:
    sizes: dict[tuple[int, int], int] = {}
    for r in ds.records:
        sizes[(r.ih, r.iw)] = sizes.get((r.ih, r.iw), 0) + 1
    return max(sizes, key=lambda k: sizes[k])


# -- the stage ---------------------------------------------------------------------------------
TOP_IMAGES = 16
FORMAT_VERSION = 2  # bump when an output's bytes change for the same inputs


class _TopImages:
    """Per unit, the probe images with the highest map maximum (for unit cards in the report).

    Deterministic: ties in value go to the lower image index, whatever the batching.
    """

    def __init__(self, num_units: int, k: int, value: np.ndarray | None = None, index: np.ndarray | None = None) -> None:
        self.k = k
        self.value = np.zeros((num_units, 0), np.float32) if value is None else np.asarray(value, np.float32)
        self.index = np.zeros((num_units, 0), np.int64) if index is None else np.asarray(index, np.int64)

    def add(self, maxima: torch.Tensor, offset: int) -> None:
        """``maxima`` (B, U): per image and unit the map's maximum; images are offset..offset+B-1."""
        B, U = maxima.shape
        v = np.concatenate([self.value, maxima.T.float().numpy()], axis=1)
        i = np.concatenate([self.index, np.broadcast_to(np.arange(offset, offset + B, dtype=np.int64), (U, B))], axis=1)
        order = np.lexsort((i, -v), axis=1)[:, :self.k]  # value descending, then index ascending
        self.value = np.take_along_axis(v, order, axis=1)
        self.index = np.take_along_axis(i, order, axis=1)

    def save(self, path: Path, probe: BrodenDataset) -> None:
        images = np.array([[probe.records[j].image for j in row] for row in self.index], dtype=str)
        cache.save_npz(path, index=self.index, value=self.value, images=images)


def forward_in_chunks(x: torch.Tensor, fn, state: dict, what: str = "forward pass") -> list:
    """``[fn(chunk) for chunk in x]`` over chunks of at most ``state['chunk']`` images.

    On ``torch.cuda.OutOfMemoryError`` the chunk is halved (``state['chunk']`` remembers it for later
    batches) and retried; at one image it raises :class:`ConceptrankError` naming ``--batch-size``.
    """
    outs = []
    i, n_all = 0, int(x.shape[0])
    state.setdefault("chunk", n_all)
    first = None  # chunk size that first ran out of memory in this batch
    while i < n_all:
        n = max(1, min(int(state["chunk"]), n_all - i))
        oom = False
        try:
            outs.append(fn(x[i:i + n]))
        except torch.cuda.OutOfMemoryError:
            oom = True  # handled outside the except block so the failed batch's memory can be freed
        if not oom:
            i += n
            continue
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if n == 1:
            raise ConceptrankError(
                f"out of GPU memory in the {what} even for a single image (retried down to --batch-size 1); "
                "use --device cpu, a smaller --resize, or free the GPU (other processes may be using it)"
            )
        first = n if first is None else first
        state["chunk"] = n // 2
    if first is not None:
        print(f"warning: CUDA out of memory in the {what} with {first} images at once; continuing with "
              f"{state['chunk']} (pass --batch-size {state['chunk']} to avoid the retries)", file=sys.stderr, flush=True)
    return outs


def _probe_files_fingerprint(probe: BrodenDataset) -> str:
    rels: list[str] = []
    for r in probe.records:
        rels.append(r.image)
        rels.extend(r.planes)
    return cache.files_fingerprint(probe.root / "images", rels)


def _cache_params(model, probe: BrodenDataset, cfg: DissectConfig, size) -> dict:
    """Everything besides the fingerprints that shapes a layer's outputs (not batch size, workers,
    device or progress)."""
    inp = {"size": list(size), "preprocess": cfg.preprocess}
    if cfg.preprocess == "model":
        inp.update(mean=list(model.mean), std=list(model.std))
    return {
        "format": FORMAT_VERSION,
        "categories": list(probe.categories),
        "quantile": cfg.quantile,
        "iou_threshold": cfg.iou_threshold,
        "store": cfg.store,
        "stability_quantile": cfg.stability_quantile,
        "input": inp,
        "top_images": TOP_IMAGES,
        "images": len(probe),
    }


OUTPUTS = ("tally.csv", "thresholds.npy", "top_images.npz", "tally_counts.npz")


def dissect(model, layers: Sequence[str], probe: BrodenDataset, out: Path, cfg: DissectConfig = DissectConfig(),
            thresholds: dict[str, np.ndarray] | None = None) -> list[DissectResult]:
    """Dissect ``layers`` of ``model`` (a :class:`~conceptrank.nn.models.LoadedModel`) on ``probe``.

    Writes ``out/tally.csv``, ``out/thresholds.npy``, ``out/top_images.npz``,
    ``out/tally_counts.npz`` (truth, intersect and activation counts) and ``out/dissect.json`` (the
    manifest, last) for a single layer, or the same under ``out/<layer>/`` for several.
    ``thresholds`` maps a layer to ``(U,)`` values to reuse instead of computing them.

    A layer whose outputs were made with the same inputs and parameters is not recomputed (its
    result has ``reused=True``); an interrupted run resumes from its last checkpoint.
    """
    from conceptrank.nn.hooks import resolve_layer

    cfg.validate()
    t_start = time.perf_counter()
    layers = list(dict.fromkeys(layers))
    for name in layers:
        resolve_layer(model.module, name)  # fail before any work
    if len(probe) == 0:
        raise ConceptrankError(f"the probe set {probe.root} has no images in categories {list(probe.categories)}")
    out = Path(out)
    outdirs = {name: (out if len(layers) == 1 else out / name) for name in layers}
    size = _probe_size(probe)
    label_cat = label_category_matrix(probe.primary, len(probe.categories))
    given = {name: np.asarray(thresholds[name], dtype=np.float64).reshape(-1)
             for name in layers if thresholds is not None and name in thresholds}
    common = {"model": model.fingerprint, "probe": probe.fingerprint(), "probe_files": _probe_files_fingerprint(probe)}
    params = _cache_params(model, probe, cfg, size)
    fps = {name: {**common, "layer": name, "thresholds": cache.array_sha256(given[name]) if name in given else None}
           for name in layers}
    keys = {name: cache.stage_key("dissect", fps[name], params) for name in layers}

    results: dict[str, DissectResult] = {}
    for name in layers:
        res = _reuse_layer(name, keys[name], outdirs[name], probe, label_cat, cfg, t_start)
        if res is not None:
            results[name] = res
    todo = [name for name in layers if name not in results]
    if todo:
        for name in todo:  # a stale manifest must never vouch for outputs being rewritten
            why = cache.why_recompute(outdirs[name] / "dissect.json", keys[name], fps[name], params)
            if why:
                print(f"dissect {name}: recomputing ({why})", file=sys.stderr, flush=True)
            (outdirs[name] / "dissect.json").unlink(missing_ok=True)
            cache.remove_temps(outdirs[name], OUTPUTS + ("dissect.json",))
        run_key = cache.stage_key("dissect-run", {**common, "layers": todo,
                                                  "thresholds": {n: fps[n]["thresholds"] for n in todo}}, params)
        computed = _compute(model, todo, probe, cfg, given, size, label_cat, out, run_key, t_start)
        for name in todo:
            acc, thr, top_images, stability, timings, resumed = computed[name]
            results[name] = _finish_layer(name, model, probe, cfg, acc, thr, outdirs[name], timings, stability,
                                          top_images, keys[name], fps[name], params, resumed)
        cache.remove_scratch(out / ".features" / run_key[:32])
    return [results[name] for name in layers]


def _reuse_layer(name, key, outdir: Path, probe, label_cat, cfg, t_start) -> DissectResult | None:
    m = cache.lookup(outdir / "dissect.json", key)
    if m is None:
        return None
    try:
        thr = np.load(outdir / "thresholds.npy", allow_pickle=False)
        with np.load(outdir / "tally_counts.npz", allow_pickle=False) as z:
            state = {k: z[k] for k in ("truth", "intersect", "activation")}
        acc = TallyAccumulator.from_state_dict({**state, "thresholds": thr, "images": len(probe)}, label_cat)
    except (OSError, ValueError, KeyError):
        return None
    iou, best, best_cat, score = _labels(acc, probe)
    return DissectResult(name, outdir, tuple(probe.categories), tuple(probe.label_names), acc.thresholds, iou, best,
                         best_cat, score, cfg.iou_threshold, dict(m.data.get("counts") or {}),
                         {"total": time.perf_counter() - t_start}, reused=True)


def _compute(model, layers, probe: BrodenDataset, cfg: DissectConfig, given: dict, size, label_cat, out: Path,
             run_key: str, t_start: float) -> dict:
    """Both passes over the probe set for ``layers``, resumable; returns per layer
    ``(accumulator, thresholds, top images, stability accumulator pair or None, timings)``."""
    from conceptrank.nn.hooks import record_layers
    from conceptrank.nn.models import netdissect_tensor

    device = resolve_device(cfg.device)
    module = model.module.to(device).eval()
    to_tensor = netdissect_tensor if cfg.preprocess == "netdissect" else model.to_tensor
    N = len(probe)
    store_dtype = np.float16 if cfg.store == "float16" else np.float32
    scratch = out / ".features" / run_key[:32]
    cache.clear_scratch(out / ".features", keep=scratch.name)
    scratch.mkdir(parents=True, exist_ok=True)
    ckpt_path = scratch / "checkpoint.npz"
    qmax = max(cfg.quantile, cfg.stability_quantile or 0.0)
    need_topk = [n for n in layers if n not in given or cfg.stability_quantile]

    memmaps: dict[str, np.memmap] = {}
    topk: dict[str, TopKQuantile] = {}
    top_images: dict[str, _TopImages] = {}
    thr: dict[str, np.ndarray] = {}
    thr_alt: dict[str, np.ndarray] = {}
    accs: dict[str, TallyAccumulator] = {}
    alt: dict[str, TallyAccumulator] = {}
    timings = {"forward": 0.0, "threshold": 0.0, "tally": 0.0}
    phase, start, batches, shapes = 1, 0, 0, {}
    resumed = None

    def feature_file(name):
        return scratch / f"{name}.npy"

    state = cache.load_checkpoint(ckpt_path, run_key)
    if state is not None:
        try:
            meta, arr = state
            phase, start, batches = int(meta["pass"]), int(meta["next"]), int(meta["batches"])
            shapes = {n: tuple(int(v) for v in meta["shapes"][n]) for n in layers}
            for n in layers:
                mm = np.lib.format.open_memmap(feature_file(n), mode="r+" if phase == 1 else "r")
                if mm.shape != (N,) + shapes[n] or mm.dtype != store_dtype:
                    raise ValueError(f"feature cache {feature_file(n)} has the wrong shape")
                memmaps[n] = mm
                top_images[n] = _TopImages(shapes[n][0], TOP_IMAGES, arr[f"top_value/{n}"], arr[f"top_index/{n}"])
                if phase == 1 and n in need_topk:
                    topk[n] = TopKQuantile.from_state_dict({**meta["topk"][n], "top": arr[f"topk/{n}"]}, device)
                if phase == 2:
                    thr[n] = arr[f"thr/{n}"]
                    accs[n] = TallyAccumulator.from_state_dict({**_acc_state(arr, "acc", n), "thresholds": thr[n]},
                                                               label_cat, device)
                    if f"thr_alt/{n}" in arr:
                        thr_alt[n] = arr[f"thr_alt/{n}"]
                        alt[n] = TallyAccumulator.from_state_dict(
                            {**_acc_state(arr, "alt", n), "thresholds": thr_alt[n]}, label_cat, device)
            resumed = {"pass": phase, "image": start}
            print(f"dissect: resuming from a checkpoint (pass {phase}, image {start}/{N})", file=sys.stderr, flush=True)
        except (OSError, ValueError, KeyError, TypeError):
            for d in (memmaps, topk, top_images, thr, thr_alt, accs, alt):
                d.clear()
            phase, start, batches, shapes, resumed = 1, 0, 0, {}, None

    def save_checkpoint(phase, nxt, batches):
        for mm in memmaps.values():
            if mm.mode != "r":
                mm.flush()  # the checkpoint must never claim images that are not on disk
        meta = {"key": run_key, "pass": phase, "next": nxt, "batches": batches,
                "shapes": {n: list(shapes[n]) for n in layers}, "topk": {}}
        arrays = {}
        for n in layers:
            arrays[f"top_value/{n}"] = top_images[n].value
            arrays[f"top_index/{n}"] = top_images[n].index
            if phase == 1 and n in topk:
                st = topk[n].state_dict()
                arrays[f"topk/{n}"] = st.pop("top")
                meta["topk"][n] = st
            if phase == 2:
                arrays[f"thr/{n}"] = thr[n]
                arrays.update(_acc_arrays("acc", n, accs[n]))
                if n in alt:
                    arrays[f"thr_alt/{n}"] = thr_alt[n]
                    arrays.update(_acc_arrays("alt", n, alt[n]))
        cache.write_checkpoint(ckpt_path, meta, arrays)

    # -- pass 1: forward once, cache features, running top-k ------------------------------------
    if phase == 1:
        t0 = time.perf_counter()
        ckpt = cache.Checkpointer("dissect-forward")
        dataset = torch.utils.data.Subset(_ProbeImages(probe, to_tensor, size), range(start, N))
        loader = _loader(dataset, cfg.batch_size, cfg.workers, _collate_images)
        i0 = start
        t_thr = 0.0
        oom: dict = {}
        with torch.inference_mode(), record_layers(module, layers) as rec:
            def run(chunk):
                rec.clear()
                module(chunk.to(device))
                return {n: rec[n] for n in layers if n in rec}

            for x in _progress(loader, len(loader), "dissect: forward", cfg.progress):
                if isinstance(x, _Failed):
                    raise x.error
                parts = forward_in_chunks(x, run, oom, "dissect forward pass")
                B = x.shape[0]
                for name in layers:
                    if any(name not in p for p in parts):
                        raise ConceptrankError(f"layer {name!r} was not reached by the model's forward pass")
                    f = parts[0][name] if len(parts) == 1 else torch.cat([p[name] for p in parts])
                    if f.dim() != 4:
                        raise ConceptrankError(f"layer {name!r} outputs shape {tuple(f.shape)}; dissection needs (B, U, h, w) maps")
                    # a sum is finite when every value is (cheap); only then look closer
                    if not torch.isfinite(f.sum()) and not torch.isfinite(f).all():
                        bad = torch.nonzero(~torch.isfinite(f).flatten(1).all(1)).flatten().tolist()
                        files = [probe.records[i0 + j].image for j in bad[:3]]
                        raise ConceptrankError(
                            f"layer {name!r} produced NaN/inf activations for probe image(s) {files}; "
                            "check the model weights and --preprocess"
                        )
                    f = f.float()
                    if name not in memmaps:
                        U, h, w = f.shape[1:]
                        shapes[name] = (U, h, w)
                        memmaps[name] = np.lib.format.open_memmap(
                            feature_file(name), mode="w+", dtype=store_dtype, shape=(N, U, h, w))
                        top_images[name] = _TopImages(U, TOP_IMAGES)
                    if name in need_topk and name not in topk:
                        U, h, w = shapes[name]
                        topk[name] = TopKQuantile(U, N * h * w, qmax, device=device)
                    stored = f.to(torch.float16 if store_dtype == np.float16 else torch.float32)
                    memmaps[name][i0:i0 + B] = stored.cpu().numpy()
                    top_images[name].add(f.amax(dim=(2, 3)).cpu(), i0)
                    if name in topk:
                        ts = time.perf_counter()
                        # thresholds are taken over exactly the values the tally will compare
                        topk[name].add(stored.float().permute(1, 0, 2, 3).reshape(f.shape[1], -1))
                        t_thr += time.perf_counter() - ts
                i0 += B
                batches += 1
                if i0 < N and ckpt.due(batches):
                    save_checkpoint(1, i0, batches)
                    ckpt.saved(batches)
        timings["forward"] = time.perf_counter() - t0 - t_thr

        ts = time.perf_counter()
        for name in layers:
            U = shapes[name][0]
            if name in given:
                t = given[name]
                if t.shape != (U,):
                    raise ConceptrankError(f"thresholds for layer {name!r} have {t.size} values; the layer has {U} units")
                thr[name] = t
            else:
                thr[name] = topk[name].result(cfg.quantile)
            if cfg.stability_quantile:
                thr_alt[name] = topk[name].result(cfg.stability_quantile)
        timings["threshold"] = t_thr + time.perf_counter() - ts
        accs = {name: TallyAccumulator(thr[name], label_cat, device) for name in layers}
        alt = {name: TallyAccumulator(thr_alt[name], label_cat, device) for name in thr_alt}
        topk.clear()
        phase, start, batches = 2, 0, 0
        save_checkpoint(2, 0, 0)  # pass 1 is never redone

    # -- pass 2: tally -------------------------------------------------------------------------
    t0 = time.perf_counter()
    ckpt = cache.Checkpointer("dissect-tally")
    loader = _loader(torch.utils.data.Subset(_ProbeMasks(probe), range(start, N)), cfg.batch_size, cfg.workers,
                     _collate_masks)
    i0 = start
    for batch in _progress(loader, len(loader), "dissect: tally", cfg.progress):
        if isinstance(batch, _Failed):
            raise batch.error
        planes, scalars = batch
        B = len(planes)
        for name in layers:
            f = torch.from_numpy(np.asarray(memmaps[name][i0:i0 + B], dtype=np.float32))
            accs[name].add(f, planes, scalars)
            if name in alt:
                alt[name].add(f, planes, scalars)
        i0 += B
        batches += 1
        if ckpt.due(batches):
            save_checkpoint(2, i0, batches)
            ckpt.saved(batches)
    if batches and ckpt.last_batches != batches:
        save_checkpoint(2, i0, batches)  # a kill while the outputs are written resumes right here
    timings["tally"] = time.perf_counter() - t0
    memmaps.clear()  # close the memmaps before the folder is deleted
    timings["total"] = time.perf_counter() - t_start

    res = {}
    for name in layers:
        stability = _label_stability(accs[name], alt[name], probe, cfg) if name in alt else None
        res[name] = (accs[name], thr[name], top_images[name], stability, timings, resumed)
    return res


def _acc_arrays(prefix: str, name: str, acc: TallyAccumulator) -> dict:
    st = acc.state_dict()
    return {f"{prefix}_{k}/{name}": np.asarray(st[k]) for k in ("truth", "intersect", "activation", "images")}


def _acc_state(arr: dict, prefix: str, name: str) -> dict:
    return {k: arr[f"{prefix}_{k}/{name}"] for k in ("truth", "intersect", "activation", "images")}


def _unit_labels(acc: TallyAccumulator, probe: BrodenDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: best label number and its IoU, ``(U,)`` each."""
    C = len(probe.categories)
    iou = acc.iou()
    best = best_labels(iou, probe.primary, C)
    best_iou = iou[np.arange(iou.shape[0])[:, None], best]
    cat = C - 1 - np.argmax(best_iou[:, ::-1], axis=1)
    rows = np.arange(iou.shape[0])
    return best[rows, cat], best_iou[rows, cat]


def _label_stability(base: TallyAccumulator, alt: TallyAccumulator, probe: BrodenDataset, cfg: DissectConfig) -> dict:
    """How many units keep their label when the activation quantile changes."""
    lab_a, iou_a = _unit_labels(base, probe)
    lab_b, iou_b = _unit_labels(alt, probe)
    det = iou_a >= cfg.iou_threshold
    same = lab_a == lab_b
    return {
        "quantile": cfg.quantile,
        "other_quantile": cfg.stability_quantile,
        "same_label_detectors": float(same[det].mean()) if det.any() else None,
        "same_label_all_units": float(same.mean()),
        "detectors_at_other_quantile": int((iou_b >= cfg.iou_threshold).sum()),
        "detectors": int(det.sum()),
    }


def _labels(acc: TallyAccumulator, probe: BrodenDataset):
    """``(iou (U, L), best label (U, C), best category (U,), score (U,))`` of an accumulator."""
    C = len(probe.categories)
    iou = acc.iou()
    best = best_labels(iou, probe.primary, C)
    U = iou.shape[0]
    best_iou = iou[np.arange(U)[:, None], best]  # (U, C)
    best_cat = C - 1 - np.argmax(best_iou[:, ::-1], axis=1)
    score = best_iou[np.arange(U), best_cat]
    return iou, best, best_cat, score


def _finish_layer(name, model, probe, cfg, acc: TallyAccumulator, thr, outdir: Path, timings,
                  stability: dict | None, top_images: _TopImages, key: str, fingerprints: dict, params: dict,
                  resumed: dict | None = None) -> DissectResult:
    iou, best, best_cat, score = _labels(acc, probe)
    U = iou.shape[0]
    rows = np.arange(U)[:, None]
    best_iou = iou[rows, best]  # (U, C)
    truth = acc.truth.cpu().numpy()[best]
    # activation column: the unit's activation count in that category (the best label's primary)
    act_cols = acc.activation.cpu().numpy()
    inter = acc.intersect.cpu().numpy()[rows, best]
    names = tuple(probe.label_names)
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outdir / "tally.csv", format_tally(probe.categories, best, truth, act_cols, inter, best_iou, names))
    with cache.atomic_write(outdir / "thresholds.npy", "wb") as f:
        np.save(f, np.asarray(thr, np.float64))
    top_images.save(outdir / "top_images.npz", probe)
    st = acc.state_dict()
    cache.save_npz(outdir / "tally_counts.npz", truth=st["truth"], intersect=st["intersect"],
                   activation=st["activation"], label_category=np.asarray(acc.label_cat.cpu().numpy(), np.int64))

    det = score >= cfg.iou_threshold
    unique: dict[str, int] = {}
    concepts = set()
    for u in np.nonzero(det)[0]:
        c = int(best_cat[u])
        lab = names[best[u, c]]
        if lab and (probe.categories[c], lab) not in concepts:
            concepts.add((probe.categories[c], lab))
            unique[probe.categories[c]] = unique.get(probe.categories[c], 0) + 1
    counts = {
        "images": len(probe),
        "dropped_rows": probe.dropped_rows,
        "units": U,
        "detectors": int(det.sum()),
        "concepts": len(concepts),
        "unique_concepts": {c: unique.get(c, 0) for c in probe.categories},
        "detectors_per_category": {c: int((det & (best_cat == ci)).sum()) for ci, c in enumerate(probe.categories)},
    }
    old_params = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "workers", "device", "progress")}
    manifest = {
        "stage": "dissect",
        "layer": name,
        "config": asdict(cfg),
        "model": model.describe(),
        "probe": str(probe.root),
        "categories": list(probe.categories),
        "fingerprints": {
            **fingerprints,
            "params": hash_json(old_params),
            "thresholds": hash_json(np.asarray(thr).tolist()),
        },
        "counts": counts,
        "label_stability": stability,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "resumed": resumed,
        "package_versions": package_versions(),
        "outputs": {k: k for k in OUTPUTS},
        "cache": cache.manifest_section("dissect", key, fingerprints, params, outdir, OUTPUTS),
    }
    atomic_write_json(outdir / "dissect.json", manifest)  # last: it vouches for the outputs above
    return DissectResult(name, outdir, tuple(probe.categories), names, np.asarray(thr, np.float64), iou, best,
                         best_cat, score, cfg.iou_threshold, counts, dict(timings))


def run_dissect(model: str, weights: str | None, layers: Sequence[str], probe: Path, out: Path,
                cfg: DissectConfig, thresholds_file: Path | None = None) -> list[DissectResult]:
    """I/O edge of the dissect stage: load the model, probe set and optional thresholds, dissect."""
    from conceptrank.nn.models import load_model

    loaded = load_model(model, weights)
    ds = BrodenDataset(probe, cfg.categories)
    thr = None
    if thresholds_file is not None:
        if not Path(thresholds_file).exists():
            raise ConceptrankError(f"--thresholds file not found: {thresholds_file}")
        arr = np.load(thresholds_file, allow_pickle=False)
        if len(layers) != 1:
            raise ConceptrankError("--thresholds applies to a single --layer")
        thr = {layers[0]: arr}
    return dissect(loaded, layers, ds, out, cfg, thr)
