"""Network Dissection with NetDissect-Lite's exact semantics (``shared/spec/netdissect-semantics.md``).

Two passes over the probe set, the model run once (local engine):

1. *forward*: each image through the model; the hooked layers' maps ``(N, U, h, w)`` go to a
   feature cache on disk (a memmap, deleted afterwards) and into a running top-k per unit from
   which the exact ``1 - quantile`` threshold follows;
   The loader workers decode each image's mask planes too, while the model runs, and pack them
   into a flat mask store beside the features (``uint16`` labels, ``P·sh·sw`` per image);
2. *tally*: only counting. Per batch, only the (image, unit) pairs whose map exceeds the unit's
   threshold somewhere are upsampled (PIL-exact bilinear) and intersected with every label at once
   as tensor operations (:class:`conceptrank.core.tally.TallyAccumulator`).

Each layer's statistics live in a :class:`_LayerRun` (running top-k, top images, thresholds, tally
counts) with ``state_dict``/``load_state_dict``/``merge``: the checkpoint of a local run and the
partial results of the Ray engine's shards (:mod:`conceptrank.engines.ray`) are both such states.

:func:`dissect_layers` is the computation (nothing written but scratch); :func:`run_dissect` the
file layer. Caching and resume (see :mod:`conceptrank.io.cache`): each layer's outputs are reused
when its ``dissect.json`` was written for the same key (model weights, layer, probe index and
files, thresholds, every parameter, package versions); layers of a multi-layer run are keyed one by
one. Otherwise the run works in ``out/.features/<key>/`` (feature memmaps plus a checkpoint of the
layer states, written every ``CONCEPTRANK_CHECKPOINT_SECONDS``), resumes from the last checkpoint
after a crash or kill, and deletes the folder when every output is written.

GPU memory: a batch whose forward pass runs out of CUDA memory is retried in halves (down to one
image at a time, then an error naming ``--batch-size``); later batches keep the smaller size.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from conceptrank.core.stats import TopImages, TopKQuantile
from conceptrank.core.tally import (
    TallyAccumulator,
    best_labels,
    float32_floor,
    label_category_matrix,
)
from conceptrank.errors import BrodenError, ConceptrankError
from conceptrank.io import cache
from conceptrank.io.broden import BrodenDataset
from conceptrank.io.cache import (
    atomic_write_json,
    atomic_write_text,
    hash_json,
    package_versions,
)
from conceptrank.io.resume import ResumableRows
from conceptrank.io.tally_csv import format_tally
from conceptrank.nn.device import forward_in_chunks, on_device, resolve_device
from conceptrank.progress import Progress, track

__all__ = [
    "DissectConfig",
    "DissectResult",
    "LayerDissection",
    "TallyAccumulator",
    "dissect_layers",
    "run_dissect",
    "float32_floor",
    "label_category_matrix",
    "best_labels",
]

TOP_IMAGES = 16
FORMAT_VERSION = 2  # bump when an output's bytes change for the same inputs
OUTPUTS = ("tally.csv", "thresholds.npy", "top_images.npz", "tally_counts.npz")
Preprocess = Literal["model", "netdissect"]
Store = Literal["float32", "float16"]


@dataclass(frozen=True)
class DissectConfig:
    """Parameters of a dissection (all but batch size, workers, device, progress and the engine key
    the outputs' fingerprint).

    ``engine``: ``local`` (this process; the model runs once, features cached on disk between the
    passes) or ``ray`` (Ray actors over shards of the probe set, see :mod:`conceptrank.engines`);
    ``ray_address``: ``auto`` (a running cluster), ``local`` (start one here) or an address;
    ``ray_workers``: actors to start (default: one per GPU, else one per 2 CPUs of the cluster).
    """

    categories: tuple[str, ...] | None = None
    quantile: float = 0.005
    iou_threshold: float = 0.04
    preprocess: Preprocess = "model"
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    store: Store = "float32"  # dtype of the on-disk feature cache between the two passes
    progress: bool = True
    # also label units at this second quantile (same pass) and report how many keep their label
    stability_quantile: float | None = None
    engine: Literal["local", "ray"] = "local"
    ray_address: str = "auto"
    ray_workers: int | None = None

    def validate(self) -> None:
        if self.preprocess not in ("model", "netdissect"):
            raise ConceptrankError(f"--preprocess must be 'model' or 'netdissect', got {self.preprocess!r}")
        if not 0.0 < self.quantile < 1.0:
            raise ConceptrankError(f"--quantile must lie in (0, 1), got {self.quantile}")
        if not 0.0 <= self.iou_threshold <= 1.0:  # also refuses NaN
            raise ConceptrankError(f"--iou-threshold must lie in [0, 1], got {self.iou_threshold}")
        if self.store not in ("float32", "float16"):
            raise ConceptrankError(f"--store must be float32 or float16, got {self.store!r}")
        if self.batch_size < 1:
            raise ConceptrankError("--batch-size must be >= 1")
        if self.stability_quantile is not None and not 0.0 < self.stability_quantile < 1.0:
            raise ConceptrankError(f"stability quantile must lie in (0, 1), got {self.stability_quantile}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConceptrankError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.engine not in ("local", "ray"):
            raise ConceptrankError(f"--engine must be local or ray, got {self.engine!r}")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ConceptrankError(f"ray workers must be >= 1, got {self.ray_workers}")


@dataclass(frozen=True)
class LayerDissection:
    """Outcome of dissecting one layer.

    Attributes
    ----------
    layer : dotted layer name.
    thresholds : (U,) float64 per-unit thresholds.
    iou : (U, L) float64 IoU of every unit with every label.
    best_label : (U, C) int best label per unit and category; ``best_category`` (U,) index into
        ``categories``; ``score`` (U,) the unit's best IoU.
    truth (L,), intersect (U, L), activation (U, C) : int64 tally counts; ``label_category`` (L, C).
    top_index, top_value : (U, k) the probe images with the highest map maxima per unit.
    stability : label stability at ``stability_quantile`` (None when not asked for).
    out : folder holding tally.csv, thresholds.npy, dissect.json (None before it is written).
    reused : True when the outputs of an earlier run with the same key were reused.
    """

    layer: str
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
    truth: np.ndarray | None = None
    intersect: np.ndarray | None = None
    activation: np.ndarray | None = None
    label_category: np.ndarray | None = None
    top_index: np.ndarray | None = None
    top_value: np.ndarray | None = None
    stability: dict | None = None
    resumed: dict | None = None
    out: Path | None = None
    reused: bool = False

    def unit_label(self, u: int) -> tuple[str, str, float]:
        """``(label name, category, iou)`` of unit ``u`` (0-based)."""
        c = int(self.best_category[u])
        return self.label_names[self.best_label[u, c]], self.categories[c], float(self.score[u])

    def summary(self) -> str:
        n = len(self.score)
        det = int((self.score >= self.iou_threshold).sum())
        per = ", ".join(f"{k} {v}" for k, v in self.counts.get("unique_concepts", {}).items())
        head = (f"dissect {self.layer}: {det}/{n} units with IoU >= {self.iou_threshold} "
                f"({self.counts.get('concepts', 0)} distinct concepts: {per}); ")
        dest = f" -> {self.out / 'tally.csv'}" if self.out is not None else ""
        if self.reused:
            return head + f"reused cached result ({self.timings.get('total', 0):.2f}s){dest}"
        return head + f"{self.counts.get('images', 0)} probe images in {self.timings.get('total', 0):.1f}s{dest}"


@dataclass(frozen=True)
class DissectResult:
    """Every dissected layer, in the order asked for; iterable and indexable by position or name."""

    layers: tuple[LayerDissection, ...]
    timings: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerDissection]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> LayerDissection:
        if isinstance(key, str):
            for r in self.layers:
                if r.layer == key:
                    return r
            raise KeyError(key)
        return self.layers[key]

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.layers)


# -- data loading ------------------------------------------------------------------------------
class _Failed:
    """A BrodenError raised in a loader worker, carried to the main process as a value: torch would
    re-raise it with its worker traceback pasted into the message."""

    def __init__(self, error: BrodenError) -> None:
        self.error = error

    def __len__(self) -> int:
        return 0


class _ProbeImages(torch.utils.data.Dataset):
    """Probe image ``i`` as a model input; with ``mask_dtype`` also its mask planes, decoded and
    packed flat (``P·sh·sw`` labels of that dtype) in the loader worker, while the model runs."""

    def __init__(self, ds: BrodenDataset, to_tensor, size, mask_dtype=None):
        self.ds, self.to_tensor, self.size, self.mask_dtype = ds, to_tensor, size, mask_dtype

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            x = self.to_tensor(self.ds.load_image(i), self.size)
            if self.mask_dtype is None:
                return x
            return x, torch.from_numpy(self.ds.load_planes(i).astype(self.mask_dtype).reshape(-1))
        except BrodenError as e:
            return _Failed(e)


def _collate_images(batch):
    """``(B, 3, H, W)`` inputs, or ``(inputs, [packed masks])`` when the items carry masks."""
    failed = [b for b in batch if isinstance(b, _Failed)]
    if failed:
        return failed[0]
    if isinstance(batch[0], tuple):
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
    return torch.stack(batch)


def mask_layout(probe: BrodenDataset) -> tuple[np.ndarray, type]:
    """Where each image's packed planes start in a flat mask store: offsets ``(N + 1,)`` int64, and
    the narrowest dtype that holds every label number."""
    sizes = [len(r.planes) * r.sh * r.sw for r in probe.records]
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets, (np.uint16 if probe.num_labels < (1 << 16) else np.int32)


def _unpack_planes(store: np.ndarray, offsets: np.ndarray, probe: BrodenDataset, i: int) -> torch.Tensor:
    r = probe.records[i]
    flat = np.asarray(store[offsets[i]:offsets[i + 1]], dtype=np.int64)
    return torch.from_numpy(flat.reshape(len(r.planes), r.sh, r.sw))


def _loader(dataset, batch_size, workers, collate_fn=None):
    kwargs = {}
    if workers > 0:
        kwargs = {"num_workers": workers, "prefetch_factor": 4, "persistent_workers": False}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, **kwargs)


def _unwrap(batch):
    if isinstance(batch, _Failed):
        raise batch.error
    return batch


def _probe_size(ds: BrodenDataset) -> tuple[int, int]:
    sizes: dict[tuple[int, int], int] = {}
    for r in ds.records:
        sizes[(r.ih, r.iw)] = sizes.get((r.ih, r.iw), 0) + 1
    return max(sizes, key=lambda k: sizes[k])


# -- what a dissection computes -----------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Everything every pass and shard of one dissection needs besides the model and the probe.

    ``given`` maps a layer to the (U,) thresholds to use instead of computing them.
    """

    layers: tuple[str, ...]
    images: int
    size: tuple[int, int]
    label_cat: np.ndarray
    quantile: float
    stability_quantile: float | None
    given: dict
    store: str
    preprocess: str
    batch_size: int
    workers: int

    @property
    def qmax(self) -> float:
        return max(self.quantile, self.stability_quantile or 0.0)

    def needs_topk(self, layer: str) -> bool:
        return layer not in self.given or bool(self.stability_quantile)

    def stored(self, f: torch.Tensor) -> torch.Tensor:
        """The values the thresholds and the tally compare: ``f`` at the feature store's precision."""
        return f.half().float() if self.store == "float16" else f


class _LayerRun:
    """One layer's statistics through both passes: running top-k and top images (pass 1), then
    thresholds and tally counts (pass 2). Runs over disjoint images merge exactly (:meth:`merge`),
    and :meth:`state_dict` / :meth:`load_state_dict` make checkpoints and shard results.
    """

    def __init__(self, name: str, plan: _Plan, device: torch.device | str = "cpu") -> None:
        self.name, self.plan, self.device = name, plan, torch.device(device)
        self.shape: tuple[int, int, int] | None = None
        self.topk: TopKQuantile | None = None
        self.top: TopImages | None = None
        self.thr: np.ndarray | None = None
        self.thr_alt: np.ndarray | None = None
        self.acc: TallyAccumulator | None = None
        self.alt: TallyAccumulator | None = None
        self.threshold_seconds = 0.0

    def _start(self, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        U, h, w = self.shape
        self.top = TopImages(U, TOP_IMAGES)
        if self.plan.needs_topk(self.name):
            self.topk = TopKQuantile(U, self.plan.images * h * w, self.plan.qmax, device=self.device)

    def observe(self, stored: torch.Tensor, maxima: torch.Tensor, first: int) -> None:
        """Pass 1: ``stored`` (B, U, h, w) features of images ``first..first+B-1``, ``maxima`` (B, U)."""
        if self.shape is None:
            self._start(stored.shape[1:])
        self.top.add(maxima.cpu(), first)
        if self.topk is not None:
            ts = time.perf_counter()
            # thresholds are taken over exactly the values the tally will compare
            self.topk.add(stored.permute(1, 0, 2, 3).reshape(stored.shape[1], -1))
            self.threshold_seconds += time.perf_counter() - ts

    def set_thresholds(self) -> None:
        """End of pass 1: thresholds from the top-k (or the given ones), empty tallies."""
        ts = time.perf_counter()
        U = self.shape[0]
        if self.name in self.plan.given:
            t = self.plan.given[self.name]
            if t.shape != (U,):
                raise ConceptrankError(f"thresholds for layer {self.name!r} have {t.size} values; the layer has {U} units")
            self.thr = t
        else:
            self.thr = self.topk.result(self.plan.quantile)
        if self.plan.stability_quantile:
            self.thr_alt = self.topk.result(self.plan.stability_quantile)
        self.topk = None
        self.acc = TallyAccumulator(self.thr, self.plan.label_cat, self.device)
        if self.thr_alt is not None:
            self.alt = TallyAccumulator(self.thr_alt, self.plan.label_cat, self.device)
        self.threshold_seconds += time.perf_counter() - ts

    @classmethod
    def for_tally(cls, name: str, plan: _Plan, shape, thr: np.ndarray, thr_alt: np.ndarray | None,
                  device="cpu") -> "_LayerRun":
        """A run that starts at pass 2 with the given thresholds (a shard of a sharded tally)."""
        run = cls(name, plan, device)
        run._start(shape)
        run.topk, run.thr, run.thr_alt = None, thr, thr_alt
        run.acc = TallyAccumulator(thr, plan.label_cat, run.device)
        if thr_alt is not None:
            run.alt = TallyAccumulator(thr_alt, plan.label_cat, run.device)
        return run

    def tally(self, stored: torch.Tensor, planes, scalars) -> None:
        """Pass 2: count one batch's features against its masks."""
        self.acc.add(stored, planes, scalars)
        if self.alt is not None:
            self.alt.add(stored, planes, scalars)

    def merge(self, other: "_LayerRun") -> None:
        """Fold in the run of the same layer over other images (a shard)."""
        if other.shape is None:
            return
        if self.shape is None:
            self._start(other.shape)
        elif self.shape != other.shape:
            raise ValueError(f"layer {self.name}: shard maps of shape {other.shape}, expected {self.shape}")
        self.top.merge(other.top)
        if self.topk is not None and other.topk is not None:
            self.topk.merge(other.topk)
        if other.acc is not None:
            if self.acc is None:
                self.thr, self.thr_alt = other.thr, other.thr_alt
                self.acc = TallyAccumulator(self.thr, self.plan.label_cat, self.device)
                self.alt = None if other.alt is None else TallyAccumulator(self.thr_alt, self.plan.label_cat, self.device)
            self.acc.merge(other.acc)
            if self.alt is not None:
                self.alt.merge(other.alt)

    def state_dict(self) -> dict:
        """Arrays and JSON values (see :func:`_split_state`); empty before the first batch."""
        if self.shape is None:
            return {}
        st: dict = {"shape": list(self.shape), "top_value": self.top.value, "top_index": self.top.index,
                    "threshold_seconds": self.threshold_seconds}
        if self.topk is not None:
            t = self.topk.state_dict()
            st["topk_values"] = t.pop("top")
            st["topk"] = t
        for tag, thr, acc in (("acc", self.thr, self.acc), ("alt", self.thr_alt, self.alt)):
            if acc is not None:
                a = acc.state_dict()
                st[f"{tag}_thr"] = np.asarray(thr, np.float64)
                st.update({f"{tag}_{k}": a[k] for k in ("truth", "intersect", "activation")})
                st[f"{tag}_images"] = int(a["images"])
        return st

    def load_state_dict(self, st: dict) -> None:
        """Inverse of :meth:`state_dict`; ValueError/KeyError on a state that does not fit."""
        if not st:
            return
        self._start(tuple(st["shape"]))
        self.top = TopImages.from_state_dict({"k": TOP_IMAGES, "value": st["top_value"], "index": st["top_index"]})
        self.threshold_seconds = float(st.get("threshold_seconds", 0.0))
        self.topk = (TopKQuantile.from_state_dict({**st["topk"], "top": st["topk_values"]}, self.device)
                     if "topk" in st else None)
        for tag in ("acc", "alt"):
            if f"{tag}_thr" in st:
                acc = TallyAccumulator.from_state_dict(
                    {k: st[f"{tag}_{k}"] for k in ("truth", "intersect", "activation", "images")}
                    | {"thresholds": st[f"{tag}_thr"]}, self.plan.label_cat, self.device)
                if tag == "acc":
                    self.thr, self.acc = acc.thresholds, acc
                else:
                    self.thr_alt, self.alt = acc.thresholds, acc


def _split_state(prefix: str, state: dict) -> tuple[dict, dict]:
    """A state dict as ``(JSON meta, arrays named prefix/key)`` for a checkpoint."""
    meta = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    arrays = {f"{prefix}/{k}": v for k, v in state.items() if isinstance(v, np.ndarray)}
    return meta, arrays


def _join_state(prefix: str, meta: dict, arrays: dict) -> dict:
    lead = prefix + "/"
    return {**meta, **{k[len(lead):]: v for k, v in arrays.items() if k.startswith(lead)}}


def runs_state(runs: dict[str, _LayerRun]) -> tuple[dict, dict]:
    """Every layer run's state as ``(meta, arrays)`` (a checkpoint's or a shard's payload)."""
    meta, arrays = {}, {}
    for name, run in runs.items():
        meta[name], arr = _split_state(name, run.state_dict())
        arrays.update(arr)
    return meta, arrays


def load_runs(plan: _Plan, meta: dict, arrays: dict, device="cpu") -> dict[str, _LayerRun]:
    """Inverse of :func:`runs_state`."""
    runs = {}
    for name in plan.layers:
        runs[name] = _LayerRun(name, plan, device)
        runs[name].load_state_dict(_join_state(name, meta.get(name) or {}, arrays))
    return runs


# -- forward passes ------------------------------------------------------------------------------
def _checked(name: str, f: torch.Tensor, probe: BrodenDataset, first: int) -> torch.Tensor:
    """``f`` as float32 (B, U, h, w); ConceptrankError for other shapes or NaN/inf (naming images)."""
    if f.dim() != 4:
        raise ConceptrankError(f"layer {name!r} outputs shape {tuple(f.shape)}; dissection needs (B, U, h, w) maps")
    # a sum is finite when every value is (cheap); only then look closer
    if not torch.isfinite(f.sum()) and not torch.isfinite(f).all():
        bad = torch.nonzero(~torch.isfinite(f).flatten(1).all(1)).flatten().tolist()
        files = [probe.records[first + j].image for j in bad[:3]]
        raise ConceptrankError(
            f"layer {name!r} produced NaN/inf activations for probe image(s) {files}; "
            "check the model weights and --preprocess"
        )
    return f.float()


def forward_batches(model, plan: _Plan, probe: BrodenDataset, device: torch.device, start: int, stop: int,
                    progress: bool = True, desc: str = "dissect: forward", mask_dtype=None) -> Iterator[tuple]:
    """Features of probe images ``start .. stop-1`` in batches of ``plan.batch_size``.

    The model must already be on ``device`` in eval mode. Yields ``(first image, {layer: (B, U, h, w)
    float32 on the CPU}, packed masks)``: with ``mask_dtype`` the loader workers also decode each
    image's mask planes (a flat tensor per image, see :func:`mask_layout`), else None. Every layer of
    the plan must be reached by the forward pass.
    """
    from conceptrank.nn.hooks import record_layers
    from conceptrank.nn.models import netdissect_tensor

    to_tensor = netdissect_tensor if plan.preprocess == "netdissect" else model.to_tensor
    dataset = torch.utils.data.Subset(_ProbeImages(probe, to_tensor, plan.size, mask_dtype), range(start, stop))
    loader = _loader(dataset, plan.batch_size, plan.workers, _collate_images)
    module, oom, i0 = model.module, {}, start
    with torch.inference_mode(), record_layers(module, plan.layers) as rec:
        def run(chunk):
            rec.clear()
            module(chunk.to(device))
            return {n: rec[n] for n in plan.layers if n in rec}

        for batch in track(loader, stop - start, desc, "img", enabled=progress, count=_batch_len):
            batch = _unwrap(batch)
            x, packed = batch if isinstance(batch, tuple) else (batch, None)
            parts = forward_in_chunks(x, run, oom, "dissect forward pass")
            feats = {}
            for name in plan.layers:
                if any(name not in p for p in parts):
                    raise ConceptrankError(f"layer {name!r} was not reached by the model's forward pass")
                f = parts[0][name] if len(parts) == 1 else torch.cat([p[name] for p in parts])
                feats[name] = _checked(name, f, probe, i0).cpu()
            yield i0, feats, packed
            i0 += x.shape[0]


def _batch_len(batch) -> int:
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


# -- the local engine: model run once, features cached on disk between the passes ---------------
def _checkpoint(rows: ResumableRows, runs: dict[str, _LayerRun], phase: int, nxt: int, batches: int) -> None:
    meta, arrays = runs_state(runs)
    rows.save(batches, {"pass": phase, "next": nxt, "batches": batches, "layers": meta}, arrays)


def _resume(rows: ResumableRows, plan: _Plan, probe, device) -> tuple[int, int, int, dict, dict | None]:
    """``(pass, next image, batches, layer runs, resumed)`` from the last checkpoint, or a fresh start."""
    fresh = (1, 0, 0, {n: _LayerRun(n, plan, device) for n in plan.layers}, None)
    state = rows.resume()
    if state is None:
        return fresh
    meta, arrays = state
    try:
        phase, start, batches = int(meta["pass"]), int(meta["next"]), int(meta["batches"])
        runs = load_runs(plan, meta["layers"], arrays, device)
        for name, run in runs.items():
            rows.reopen(name, (plan.images,) + run.shape, _store_dtype(plan), writable=phase == 1)
        offsets, dtype = mask_layout(probe)
        rows.reopen("masks", (int(offsets[-1]),), dtype, writable=phase == 1)
    except (OSError, ValueError, KeyError, TypeError):
        rows.close()
        return fresh
    print(f"dissect: resuming from a checkpoint (pass {phase}, image {start}/{plan.images})", file=sys.stderr, flush=True)
    return phase, start, batches, runs, {"pass": phase, "image": start}


def _store_dtype(plan: _Plan):
    return np.float16 if plan.store == "float16" else np.float32


def _forward_pass(model, plan, probe, device, runs, rows: ResumableRows, start: int, batches: int, progress: bool) -> None:
    """Pass 1 from image ``start``: features and decoded masks to the store, running top-k and top
    images (the loader decodes the masks while the model runs)."""
    N = plan.images
    offsets, mask_dtype = mask_layout(probe)
    if "masks" not in rows.arrays:
        rows.create("masks", (int(offsets[-1]),), mask_dtype, "the decoded-mask cache")
    masks = rows.arrays["masks"]
    for i0, feats, packed in forward_batches(model, plan, probe, device, start, N, progress, mask_dtype=mask_dtype):
        B = len(packed)
        masks[offsets[i0]:offsets[i0 + B]] = np.concatenate([p.numpy() for p in packed])
        for name, f in feats.items():
            stored = plan.stored(f)
            if name not in rows.arrays:
                rows.create(name, (N,) + tuple(f.shape[1:]), _store_dtype(plan), f"the feature cache of layer {name!r}",
                            "pass --store float16 (half the bytes) or free space / choose an --out on a larger disk")
            rows.arrays[name][i0:i0 + B] = stored.numpy()
            runs[name].observe(stored, f.amax(dim=(2, 3)), i0)
        batches += 1
        if i0 + B < N and rows.due(batches):
            _checkpoint(rows, runs, 1, i0 + B, batches)


def _tally_pass(plan, probe, runs, rows: ResumableRows, start: int, batches: int, progress: bool) -> None:
    """Pass 2 from image ``start``: only counting, every layer's stored features against the stored masks."""
    offsets, _ = mask_layout(probe)
    masks, N = rows.arrays["masks"], plan.images
    i0 = start
    starts = range(start, N, plan.batch_size)
    for i0 in track(starts, N - start, "dissect: tally", "img", enabled=progress,
                    count=lambda i: min(plan.batch_size, N - i)):
        stop = min(i0 + plan.batch_size, N)
        planes = [_unpack_planes(masks, offsets, probe, i) for i in range(i0, stop)]
        scalars = [list(probe.records[i].scalars) for i in range(i0, stop)]
        for name, run in runs.items():
            run.tally(torch.from_numpy(np.asarray(rows.arrays[name][i0:stop], dtype=np.float32)), planes, scalars)
        i0 = stop
        batches += 1
        if rows.due(batches):
            _checkpoint(rows, runs, 2, i0, batches)
    if batches and rows.clock.last_batches != batches:
        _checkpoint(rows, runs, 2, i0, batches)  # a kill while the outputs are written resumes right here


def _local_runs(model, plan: _Plan, probe, cfg: DissectConfig, work_dir: Path, resume_key: str):
    """Both passes in this process, resumable from ``work_dir``: ``(runs, timings, resumed)``."""
    device = resolve_device(cfg.device)
    rows = ResumableRows(work_dir, resume_key, "dissect")
    phase, start, batches, runs, resumed = _resume(rows, plan, probe, device)
    timings = {"forward": 0.0, "threshold": 0.0, "tally": 0.0}
    with on_device(model.module, device):
        if phase == 1:
            t0 = time.perf_counter()
            _forward_pass(model, plan, probe, device, runs, rows, start, batches, cfg.progress)
            for run in runs.values():
                run.set_thresholds()
            timings["threshold"] = sum(r.threshold_seconds for r in runs.values())
            timings["forward"] = time.perf_counter() - t0 - timings["threshold"]
            phase, start, batches = 2, 0, 0
            _checkpoint(rows, runs, 2, 0, 0)  # pass 1 is never redone
        t0 = time.perf_counter()
        _tally_pass(plan, probe, runs, rows, start, batches, cfg.progress)
        timings["tally"] = time.perf_counter() - t0
    rows.close()  # close the memmaps before the folder is deleted
    return runs, timings, resumed


# -- sharded engines (Ray): two passes over shards, the forward pass recomputed in the second -------
SHARDS_PER_WORKER = 4  # more shards than workers: load balance, and less work lost to a dead worker


class _DissectShards:
    """Shard work of a sharded dissection (picklable; ``setup`` runs once per worker).

    Pass 1 (``tally`` None): each shard's running top-k and top images. Pass 2 (``tally`` maps a
    layer to ``(shape, thresholds, stability thresholds)``): the shard's forward pass again, its masks
    decoded by the same loader, and its tally counts. Returns :func:`runs_state` of the shard's layer runs.
    """

    def __init__(self, model, plan: _Plan, probe: BrodenDataset, device: str, tally: dict | None = None) -> None:
        self.model, self.plan, self.probe, self.device_spec, self.tally = model, plan, probe, device, tally
        self.device = None

    def setup(self) -> None:
        self.device = resolve_device(self.device_spec)
        self.model.module.eval().to(self.device)

    def __call__(self, shard, report) -> tuple[dict, dict]:
        plan, dev = self.plan, self.device
        if self.tally is None:
            runs = {n: _LayerRun(n, plan, dev) for n in plan.layers}
            for i0, batch, _ in forward_batches(self.model, plan, self.probe, dev, shard.start, shard.stop, False):
                for name, f in batch.items():
                    runs[name].observe(plan.stored(f), f.amax(dim=(2, 3)), i0)
                report(next(iter(batch.values())).shape[0])
        else:
            runs = {n: _LayerRun.for_tally(n, plan, *self.tally[n], dev) for n in plan.layers}
            _, dtype = mask_layout(self.probe)
            feats = forward_batches(self.model, plan, self.probe, dev, shard.start, shard.stop, progress=False,
                                    mask_dtype=dtype)
            for i0, batch, packed in feats:
                recs = self.probe.records[i0:i0 + len(packed)]
                planes = [p.long().reshape(len(r.planes), r.sh, r.sw) for p, r in zip(packed, recs)]
                scalars = [list(r.scalars) for r in recs]
                for name, f in batch.items():
                    runs[name].tally(plan.stored(f), planes, scalars)
                report(len(planes))
        return runs_state(runs)


def _ray_runs(model, plan: _Plan, probe, cfg: DissectConfig, work_dir, resume_key: str):
    from conceptrank.engines.ray import RayEngine

    engine = RayEngine(cfg.ray_address, cfg.ray_workers)
    try:
        return sharded_runs(engine, model, plan, probe, cfg, work_dir, resume_key)
    finally:
        engine.close()


def _sharded_checkpoint(ckpt: ResumableRows, runs, phase: int, done: set) -> None:
    meta, arrays = runs_state(runs)
    ckpt.save(len(done), {"pass": phase, "done": sorted(done), "layers": meta}, arrays)


def _sharded_resume(ckpt: ResumableRows, plan: _Plan, shards) -> tuple[int, set, dict, dict | None]:
    fresh = (1, set(), {n: _LayerRun(n, plan) for n in plan.layers}, None)
    state = ckpt.resume()
    if state is None:
        return fresh
    meta, arrays = state
    try:
        phase, done = int(meta["pass"]), {int(i) for i in meta["done"]}
        runs = load_runs(plan, meta["layers"], arrays)
    except (ValueError, KeyError, TypeError):
        return fresh
    print(f"dissect: resuming from a checkpoint (pass {phase}, {len(done)} of {len(shards)} shards done)",
          file=sys.stderr, flush=True)
    return phase, done, runs, {"pass": phase, "shards_done": len(done)}


def _merge_shards(engine, work, shards, done: set, runs, ckpt: ResumableRows, phase: int, plan, progress: bool) -> None:
    todo = [s for s in shards if s.index not in done]
    desc = "dissect: forward" if phase == 1 else "dissect: forward + tally"
    with Progress(sum(len(s) for s in todo), f"{desc} ({engine.workers} workers)", "img", enabled=progress) as bar:
        for shard, (meta, arrays) in engine.map(work, todo, bar):
            part = load_runs(plan, meta, arrays)
            for name, run in runs.items():
                run.merge(part[name])
            done.add(shard.index)
            if len(done) < len(shards) and ckpt.due(len(done)):
                _sharded_checkpoint(ckpt, runs, phase, done)


def sharded_runs(engine, model, plan: _Plan, probe, cfg: DissectConfig, work_dir, resume_key: str):
    """Both passes over shards of the probe set on ``engine`` (a Local- or RayEngine), resumable
    from the driver's checkpoint in ``work_dir``: ``(runs, timings, resumed)``.

    Pass 1 merges the shards' top-k states into thresholds; pass 2 recomputes each shard's forward
    pass and merges its tally counts (no feature store crosses the network).
    """
    from conceptrank.engines.shards import make_shards

    shards = make_shards(plan.images, plan.batch_size, SHARDS_PER_WORKER * engine.workers)
    ckpt = ResumableRows(work_dir, resume_key + "/sharded", "dissect")
    phase, done, runs, resumed = _sharded_resume(ckpt, plan, shards)
    timings = {"forward": 0.0, "threshold": 0.0, "tally": 0.0}
    if phase == 1:
        t0 = time.perf_counter()
        _merge_shards(engine, _DissectShards(model, plan, probe, cfg.device), shards, done, runs, ckpt, 1, plan,
                      cfg.progress)
        timings["forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for run in runs.values():
            run.set_thresholds()
        timings["threshold"] = time.perf_counter() - t0
        phase, done = 2, set()
        _sharded_checkpoint(ckpt, runs, 2, done)
    t0 = time.perf_counter()
    tally = {n: (r.shape, r.thr, r.thr_alt) for n, r in runs.items()}
    _merge_shards(engine, _DissectShards(model, plan, probe, cfg.device, tally), shards, done, runs, ckpt, 2, plan,
                  cfg.progress)
    timings["tally"] = time.perf_counter() - t0
    _sharded_checkpoint(ckpt, runs, 2, done)  # a kill while the outputs are written resumes right here
    return runs, timings, resumed


# -- results -------------------------------------------------------------------------------------
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


def _label_stability(base: TallyAccumulator, alt: TallyAccumulator, probe: BrodenDataset, cfg: DissectConfig) -> dict:
    """How many units keep their label when the activation quantile changes."""
    _, best_a, cat_a, iou_a = _labels(base, probe)
    _, best_b, cat_b, iou_b = _labels(alt, probe)
    rows = np.arange(len(cat_a))
    det = iou_a >= cfg.iou_threshold
    same = best_a[rows, cat_a] == best_b[rows, cat_b]
    return {
        "quantile": cfg.quantile,
        "other_quantile": cfg.stability_quantile,
        "same_label_detectors": float(same[det].mean()) if det.any() else None,
        "same_label_all_units": float(same.mean()),
        "detectors_at_other_quantile": int((iou_b >= cfg.iou_threshold).sum()),
        "detectors": int(det.sum()),
    }


def _counts(probe: BrodenDataset, best, best_cat, score, iou_threshold: float) -> dict:
    names = probe.label_names
    det = score >= iou_threshold
    unique: dict[str, int] = {}
    concepts = set()
    for u in np.nonzero(det)[0]:
        c = int(best_cat[u])
        lab = names[best[u, c]]
        if lab and (probe.categories[c], lab) not in concepts:
            concepts.add((probe.categories[c], lab))
            unique[probe.categories[c]] = unique.get(probe.categories[c], 0) + 1
    return {
        "images": len(probe),
        "dropped_rows": probe.dropped_rows,
        "units": int(len(score)),
        "detectors": int(det.sum()),
        "concepts": len(concepts),
        "unique_concepts": {c: unique.get(c, 0) for c in probe.categories},
        "detectors_per_category": {c: int((det & (best_cat == ci)).sum()) for ci, c in enumerate(probe.categories)},
    }


def _layer_result(run: _LayerRun, probe: BrodenDataset, cfg: DissectConfig, timings: dict,
                  resumed: dict | None) -> LayerDissection:
    acc = run.acc
    iou, best, best_cat, score = _labels(acc, probe)
    st = acc.state_dict()
    stability = _label_stability(acc, run.alt, probe, cfg) if run.alt is not None else None
    return LayerDissection(
        run.name, tuple(probe.categories), tuple(probe.label_names), np.asarray(run.thr, np.float64), iou, best,
        best_cat, score, cfg.iou_threshold, _counts(probe, best, best_cat, score, cfg.iou_threshold), dict(timings),
        truth=st["truth"], intersect=st["intersect"], activation=st["activation"],
        label_category=np.asarray(run.plan.label_cat, np.int64), top_index=run.top.index, top_value=run.top.value,
        stability=stability, resumed=resumed)


# -- the stage -----------------------------------------------------------------------------------
def _layer_list(layers: str | Sequence[str]) -> list[str]:
    """One layer name or several, deduplicated in order (a string is one name, never iterated)."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ConceptrankError("no layer to dissect: name at least one --layer")
    return list(dict.fromkeys(names))


def _make_plan(model, layers: list[str], probe: BrodenDataset, cfg: DissectConfig, thresholds) -> _Plan:
    from conceptrank.nn.hooks import resolve_layer

    for name in layers:
        resolve_layer(model.module, name)  # fail before any work
    if len(probe) == 0:
        raise ConceptrankError(f"the probe set {probe.root} has no images in categories {list(probe.categories)}")
    given = {name: np.asarray(thresholds[name], dtype=np.float64).reshape(-1)
             for name in layers if thresholds is not None and name in thresholds}
    return _Plan(tuple(layers), len(probe), _probe_size(probe), label_category_matrix(probe.primary, len(probe.categories)),
                 cfg.quantile, cfg.stability_quantile, given, cfg.store, cfg.preprocess, int(cfg.batch_size),
                 int(cfg.workers))


def dissect_layers(model, layers: str | Sequence[str], probe: BrodenDataset, cfg: DissectConfig = DissectConfig(), *,
                   thresholds: dict[str, np.ndarray] | None = None, work_dir: str | Path | None = None,
                   resume_key: str = "") -> DissectResult:
    """Dissect one layer (a name) or several of ``model`` (a :class:`~conceptrank.nn.models.LoadedModel`)
    on ``probe``; nothing is written but scratch.

    Parameters
    ----------
    thresholds : maps a layer to ``(U,)`` values to use instead of computing them.
    work_dir : scratch folder for the feature cache and checkpoints (a temporary one by default); a
        checkpoint there written for ``resume_key`` is resumed. The caller deletes it when done.
    resume_key : identifies the inputs; a checkpoint with another key is ignored.

    The model's device and train/eval mode are restored on return.
    """
    cfg.validate()
    t_start = time.perf_counter()
    names = _layer_list(layers)
    plan = _make_plan(model, names, probe, cfg, thresholds)
    if cfg.engine == "ray":
        runs, timings, resumed = _ray_runs(model, plan, probe, cfg, work_dir, resume_key)
    elif work_dir is None:
        with tempfile.TemporaryDirectory(prefix="conceptrank-dissect-") as tmp:
            runs, timings, resumed = _local_runs(model, plan, probe, cfg, Path(tmp), resume_key)
    else:
        runs, timings, resumed = _local_runs(model, plan, probe, cfg, Path(work_dir), resume_key)
    timings["total"] = time.perf_counter() - t_start
    return DissectResult(tuple(_layer_result(runs[n], probe, cfg, timings, resumed) for n in names), dict(timings))


# -- the file layer ------------------------------------------------------------------------------
def _probe_files_fingerprint(probe: BrodenDataset) -> str:
    rels: list[str] = []
    for r in probe.records:
        rels.append(r.image)
        rels.extend(r.planes)
    return cache.files_fingerprint(probe.root / "images", rels)


def _cache_params(model, probe: BrodenDataset, cfg: DissectConfig, size) -> dict:
    """Everything besides the fingerprints that shapes a layer's outputs (not batch size, workers,
    device, progress or the engine)."""
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


_RUN_ONLY = ("batch_size", "workers", "device", "progress", "engine", "ray_address", "ray_workers")


def _write_layer(res: LayerDissection, outdir: Path, model, probe: BrodenDataset, cfg: DissectConfig, key: str,
                 fingerprints: dict, params: dict) -> LayerDissection:
    """tally.csv, thresholds.npy, top_images.npz, tally_counts.npz, then dissect.json (last)."""
    rows = np.arange(len(res.score))[:, None]
    best = res.best_label
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outdir / "tally.csv", format_tally(
        probe.categories, best, res.truth[best], res.activation, res.intersect[rows, best], res.iou[rows, best],
        res.label_names))
    with cache.atomic_write(outdir / "thresholds.npy", "wb") as f:
        np.save(f, np.asarray(res.thresholds, np.float64))
    images = np.array([[probe.records[j].image for j in row] for row in res.top_index], dtype=str)
    cache.save_npz(outdir / "top_images.npz", index=res.top_index, value=res.top_value, images=images)
    cache.save_npz(outdir / "tally_counts.npz", truth=res.truth, intersect=res.intersect, activation=res.activation,
                   label_category=res.label_category)
    old_params = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY}
    manifest = {
        "stage": "dissect",
        "layer": res.layer,
        "config": {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY[4:]},
        "engine": cfg.engine,
        "model": model.describe(),
        "probe": str(probe.root),
        "categories": list(probe.categories),
        "fingerprints": {**fingerprints, "params": hash_json(old_params),
                         "thresholds": hash_json(np.asarray(res.thresholds).tolist())},
        "counts": res.counts,
        "label_stability": res.stability,
        "timings": {k: round(v, 4) for k, v in res.timings.items()},
        "resumed": res.resumed,
        "package_versions": package_versions(),
        "outputs": {k: k for k in OUTPUTS},
        "cache": cache.manifest_section("dissect", key, fingerprints, params, outdir, OUTPUTS),
    }
    atomic_write_json(outdir / "dissect.json", manifest)  # last: it vouches for the outputs above
    return replace(res, out=outdir)


def _reuse_layer(name, key, outdir: Path, probe, label_cat, cfg, t_start) -> LayerDissection | None:
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
    return LayerDissection(name, tuple(probe.categories), tuple(probe.label_names), acc.thresholds, iou, best,
                           best_cat, score, cfg.iou_threshold, dict(m.data.get("counts") or {}),
                           {"total": time.perf_counter() - t_start}, truth=state["truth"],
                           intersect=state["intersect"], activation=state["activation"],
                           label_category=np.asarray(label_cat, np.int64), out=outdir, reused=True)


def _read_thresholds(thresholds, layers: list[str]) -> dict | None:
    if thresholds is None or isinstance(thresholds, dict):
        return thresholds
    from conceptrank.io.tally_csv import read_thresholds

    if len(layers) != 1:
        raise ConceptrankError("--thresholds applies to a single --layer")
    return {layers[0]: read_thresholds(thresholds)}


def run_dissect(model, weights: str | None, layers: str | Sequence[str], probe, out: str | Path,
                cfg: DissectConfig = DissectConfig(), thresholds: str | Path | dict | None = None) -> DissectResult:
    """File layer of the dissect stage: load, dissect the layers whose outputs are not current, write.

    Parameters
    ----------
    model : a model card / torchvision name (with ``weights``) or a LoadedModel.
    probe : a Broden folder or a :class:`BrodenDataset`.
    out : ``out/tally.csv``, ``thresholds.npy``, ``top_images.npz``, ``tally_counts.npz`` (truth,
        intersect and activation counts) and ``dissect.json`` (the manifest, last) for a single
        layer, the same under ``out/<layer>/`` for several.
    thresholds : a ``.npy`` file (one layer) or a dict layer → ``(U,)`` values to reuse.

    A layer whose outputs were made with the same inputs and parameters is not recomputed (its
    result has ``reused=True``); an interrupted run resumes from its last checkpoint.
    """
    from conceptrank.nn.models import LoadedModel, load_model

    t_start = time.perf_counter()
    cfg.validate()
    names = _layer_list(layers)
    thresholds = _read_thresholds(thresholds, names)
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), weights)
    ds = probe if isinstance(probe, BrodenDataset) else BrodenDataset(probe, cfg.categories)
    plan = _make_plan(loaded, names, ds, cfg, thresholds)
    out = Path(out)
    outdirs = {name: (out if len(names) == 1 else out / name) for name in names}
    common = {"model": loaded.fingerprint, "probe": ds.fingerprint(), "probe_files": _probe_files_fingerprint(ds)}
    params = _cache_params(loaded, ds, cfg, plan.size)
    fps = {name: {**common, "layer": name,
                  "thresholds": cache.array_sha256(plan.given[name]) if name in plan.given else None}
           for name in names}
    keys = {name: cache.stage_key("dissect", fps[name], params) for name in names}
    results = {}
    for name in names:
        res = _reuse_layer(name, keys[name], outdirs[name], ds, plan.label_cat, cfg, t_start)
        if res is not None:
            results[name] = res
    todo = [name for name in names if name not in results]
    if todo:
        results.update(_recompute(loaded, todo, ds, out, outdirs, cfg, plan.given, common, fps, keys, params))
    return DissectResult(tuple(results[name] for name in names), {"total": time.perf_counter() - t_start})


def _recompute(model, todo, probe, out: Path, outdirs, cfg, given, common, fps, keys, params) -> dict:
    for name in todo:  # the old manifest stays: its output hashes stop matching once an output is rewritten
        why = cache.why_recompute(outdirs[name] / "dissect.json", keys[name], fps[name], params)
        if why:
            print(f"dissect {name}: recomputing ({why})", file=sys.stderr, flush=True)
        cache.remove_temps(outdirs[name], OUTPUTS + ("dissect.json",))
    run_key = cache.stage_key("dissect-run", {**common, "layers": todo,
                                              "thresholds": {n: fps[n]["thresholds"] for n in todo}}, params)
    scratch = out / ".features" / run_key[:32]
    cache.clear_scratch(out / ".features", keep=scratch.name)
    computed = dissect_layers(model, todo, probe, cfg, thresholds=given, work_dir=scratch, resume_key=run_key)
    results = {res.layer: _write_layer(res, outdirs[res.layer], model, probe, cfg, keys[res.layer], fps[res.layer], params)
               for res in computed}
    cache.remove_scratch(scratch)
    return results
