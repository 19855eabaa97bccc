"""Per image and unit of one layer: the mean (the paper's Formula 1) and the max of its activation map.

:func:`extract_activations` is the pure computation (a stream of images through the model, nothing
written, an :class:`~conceptrank.io.activations.Activations` returned); :func:`run_extract` is the I/O
edge (loads the model and the target index, calls :func:`extract_activations`,
writes ``activations.npz``, ``skipped.csv`` and ``extract.json`` atomically).

Images are decoded in DataLoader worker processes with :func:`conceptrank.io.images.load_rgb`;
an image that cannot be used travels through the loader as a marker with its reason, is filtered
out by the collate function, and ends up in ``skipped`` (and ``skipped.csv``), never silently
dropped. Memory beyond the two ``(N, U)`` outputs does not grow with the dataset.

Caching and resume (see :mod:`conceptrank.io.cache`): :func:`run_extract` reuses ``activations.npz``
when ``extract.json`` was written for the same key (model weights, layer, target index and file
stats, input size, crop, normalization, decode limits, package versions); otherwise it streams into
memmaps under ``out/.partial/<key>/`` with a checkpoint every ``CONCEPTRANK_CHECKPOINT_SECONDS``,
resumes from there after a crash or kill, and deletes the folder once the outputs are written.
A forward pass that runs out of CUDA memory is retried with half the images (down to one, then an
error naming ``--batch-size``).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal

import numpy as np
import torch
from torch import nn

from conceptrank.errors import ConceptrankError
from conceptrank.io import cache
from conceptrank.io import images as _images
from conceptrank.io.activations import Activations
from conceptrank.io.images import ImageDecodeError, load_rgb
from conceptrank.io.resume import ResumableRows
from conceptrank.io.targets import TargetError, TargetSet, load_targets, person_box
from conceptrank.nn.device import forward_in_chunks, on_device, resolve_device
from conceptrank.nn.hooks import record_layers, resolve_layer
from conceptrank.nn.models import LoadedModel, load_model
from conceptrank.progress import Progress

__all__ = ["ExtractConfig", "ExtractResult", "extract_activations", "run_extract"]

CROPS = ("none", "person")
FORMAT = "conceptrank-extract"
FORMAT_VERSION = 2  # bump when an output's bytes change for the same inputs


@dataclass(frozen=True)
class ExtractConfig:
    """Parameters of :func:`extract_activations`.

    Attributes
    ----------
    layout : str
        Target set layout for :func:`~conceptrank.io.targets.load_targets` (``auto``,
        ``stanford40``, ``imagefolder``, ``manifest``).
    resize : int, optional
        Resize every image to ``resize × resize`` (aspect ratio not kept, as in the paper); default:
        the model's ``input_size``.
    crop : str
        ``none`` (whole image, as in the paper) or ``person`` (crop to the Stanford 40
        ``XMLAnnotations`` person box first; images without a box are skipped).
    batch_size : int
        Images per forward pass.
    workers : int
        DataLoader worker processes decoding images (0: decode in this process).
    device : str
        ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    engine : str
        ``local`` (this process) or ``ray`` (Ray actors over shards of the image list).
    ray_address : str
        ``auto`` (a running cluster), ``local`` (start one here) or a cluster address.
    ray_workers : int, optional
        Actors to start (default: one per GPU, else one per 2 CPUs of the cluster).
    split_map : str
        Maps split names other than train/test/all (and ``all`` beside train/test) explicitly,
        e.g. ``"val=train,extra=drop"`` (see :func:`~conceptrank.io.targets.load_targets`).
    """

    layout: str = "auto"
    resize: int | None = None
    crop: Literal["none", "person"] = "none"
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    engine: Literal["local", "ray"] = "local"
    ray_address: str = "auto"
    ray_workers: int | None = None
    split_map: str = ""

    def validate(self) -> None:
        """Raise ConceptrankError for invalid values (called by :func:`extract`, not at construction,
        so that the CLI prints the error as one line)."""
        if self.crop not in CROPS:
            raise ConceptrankError(f"unknown crop {self.crop!r}; choose one of {', '.join(CROPS)}")
        if self.resize is not None and not 1 <= int(self.resize) <= 4096:
            raise ConceptrankError(f"--resize must be a number of pixels in [1, 4096], got {self.resize}")
        if int(self.batch_size) < 1:
            raise ConceptrankError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.workers) < 0:
            raise ConceptrankError(f"workers must be >= 0, got {self.workers}")
        if self.engine not in ("local", "ray"):
            raise ConceptrankError(f"--engine must be local or ray, got {self.engine!r}")
        if self.ray_workers is not None and int(self.ray_workers) < 1:
            raise ConceptrankError(f"ray workers must be >= 1, got {self.ray_workers}")


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`run_extract` wrote.

    Attributes
    ----------
    out : Path
        The output folder.
    layer : str
        Dotted layer name.
    n_images, n_units : int
        Rows and columns of the ``mean`` / ``max`` arrays.
    n_skipped : int
        Images that could not be used.
    skipped : tuple of (rel, reason)
        Those images, in dataset order.
    timings : dict
        ``load`` (model and target index), ``forward`` (decoding and forward passes, which overlap
        when workers > 0) and ``total``, in seconds.
    """

    out: Path
    layer: str
    n_images: int
    n_units: int
    n_skipped: int
    skipped: tuple[tuple[str, str], ...]
    timings: dict
    reused: bool = False  # True when the outputs of an earlier run with the same key were reused

    def summary(self, show: int = 10) -> str:
        """Human-readable summary; lists up to ``show`` skipped images."""
        how = "reused cached result, " if self.reused else ""
        lines = [
            f"extract {self.layer}: {self.n_images} images x {self.n_units} units -> "
            f"{self.out / 'activations.npz'} ({how}{self.timings.get('total', 0.0):.1f} s)"
        ]
        if self.n_skipped:
            reasons = collections.Counter(r for _, r in self.skipped)
            by = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"skipped {self.n_skipped} image(s): {by} (all listed in {self.out / 'skipped.csv'})")
            for rel, reason in self.skipped[:show]:
                lines.append(f"  {rel}: {reason}")
            if self.n_skipped > show:
                lines.append(f"  ... and {self.n_skipped - show} more")
        else:
            lines.append("skipped 0 images")
        return "\n".join(lines)


# -- streaming dataset ----------------------------------------------------------------------------
class _ImageStream(torch.utils.data.Dataset):
    """Decodes item ``i`` into ``(i, x, None)`` with ``x`` a ``(3, H, W)`` float32 tensor, or into
    ``(i, None, reason)`` when the image cannot be used. Holds no model weights (cheap to send to
    worker processes); the decode limits are captured at construction so workers use the same."""

    def __init__(
        self,
        paths: list[str],
        rels: list[str],
        size: tuple[int, int],
        prep: LoadedModel,
        boxes_root: str | None,
    ) -> None:
        self.paths = paths
        self.rels = rels
        self.size = size
        self.prep = prep
        self.boxes_root = boxes_root
        self.max_pixels = _images.MAX_PIXELS
        self.min_side = _images.MIN_SIDE

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.paths[i], self.max_pixels, self.min_side)
            if self.boxes_root is not None:
                img = _crop_person(img, self.boxes_root, self.rels[i], self.min_side)
        except ImageDecodeError as e:
            return (i, None, e.reason)
        except TargetError:
            return (i, None, "bad person box")
        return (i, self.prep.to_tensor(img, self.size), None)


def _crop_person(img, root: str, rel: str, min_side: int):
    """Crop to the XML person box (PIL box: pixel edges, clipped to the image)."""
    box = person_box(root, rel)
    if box is None:
        raise ImageDecodeError(rel, "no person box")
    x0, y0, x1, y1 = box
    x0, y0 = max(0, min(x0, img.width)), max(0, min(y0, img.height))
    x1, y1 = max(0, min(x1, img.width)), max(0, min(y1, img.height))
    if x1 - x0 < min_side or y1 - y0 < min_side:
        raise ImageDecodeError(rel, "bad person box")
    return img.crop((x0, y0, x1, y1))


def _collate(batch):
    """Stack the decoded images of a batch and pass skip markers through.

    Returns
    -------
    idx : LongTensor (b,)
        Dataset indices of the decoded images.
    x : Tensor (b, 3, H, W) or None
        None when every image of the batch was skipped.
    skipped : list of (index, reason)
    """
    kept = [(i, x) for i, x, _ in batch if x is not None]
    skipped = [(i, r) for i, x, r in batch if x is None]
    idx = torch.tensor([i for i, _ in kept], dtype=torch.long)
    x = torch.stack([x for _, x in kept]) if kept else None
    return idx, x, skipped


# -- computation ----------------------------------------------------------------------------------
def reduce_activations(a: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max over the spatial axes of a layer output.

    Parameters
    ----------
    a : Tensor (B, U, h, w) or (B, U)
        A 2-D output counts as ``h = w = 1``.

    Returns
    -------
    mean, max : float32 Tensors (B, U)

    Raises
    ------
    ConceptrankError
        For any other number of dimensions.
    """
    if not isinstance(a, torch.Tensor):
        raise ConceptrankError(f"layer {layer!r} outputs a {type(a).__name__}, not a tensor")
    a = a.float()
    if a.dim() == 4:
        return a.mean(dim=(2, 3)), a.amax(dim=(2, 3))
    if a.dim() == 2:
        return a, a
    raise ConceptrankError(
        f"layer {layer!r} outputs shape {tuple(a.shape)} ({a.dim()}-D); expected (B, U, h, w) feature "
        "maps or (B, U) vectors. Choose a convolutional layer (see `conceptrank layers`)."
    )


def image_stream(model: LoadedModel, targets: TargetSet, cfg: ExtractConfig) -> _ImageStream:
    """The decoding dataset of the target images (preprocessing only, no weights: cheap to send to
    loader workers and to engine workers)."""
    size = (int(cfg.resize), int(cfg.resize)) if cfg.resize else tuple(int(s) for s in model.input_size)
    boxes_root = None
    if cfg.crop == "person":
        if not targets.has_person_boxes():
            raise ConceptrankError(
                f"--crop person needs Stanford 40 person boxes in {targets.annotations_dir}, which does not "
                f"exist (layout {targets.layout}); use --crop none"
            )
        boxes_root = str(targets.image_root)
    items = targets.items
    return _ImageStream([str(targets.path(it)) for it in items], [it.rel for it in items], size,
                        dataclasses.replace(model, module=nn.Identity()), boxes_root)


@dataclass
class ExtractRows:
    """Rows filled so far: ``mean``/``max`` (N, U) buffers (None before the first kept image), the
    first ``pos`` of them filled, for the items ``kept``; ``skipped`` (item index, reason); ``next``
    the first item not yet processed; ``batches`` done."""

    total: int
    mean: np.ndarray | None = None
    max: np.ndarray | None = None
    pos: int = 0
    kept: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    next: int = 0
    batches: int = 0

    def open(self, rows: ResumableRows, units: int, fresh: bool = True) -> None:
        shape = (self.total, units)
        make = rows.create if fresh else rows.reopen
        self.mean, self.max = (make(name, shape, np.float32) for name in ("mean", "max"))

    def add(self, idx: torch.Tensor, mean: np.ndarray, mx: np.ndarray, rows: ResumableRows) -> None:
        if self.mean is None:
            self.open(rows, mean.shape[1])
        b = mean.shape[0]
        self.mean[self.pos:self.pos + b] = mean
        self.max[self.pos:self.pos + b] = mx
        self.pos += b
        self.kept.extend(int(i) for i in idx)

    def checkpoint(self, rows: ResumableRows) -> None:
        meta = {"next": self.next, "pos": self.pos, "batches": self.batches,
                "units": None if self.mean is None else int(self.mean.shape[1])}
        rows.save(self.batches, meta, {
            "kept": np.asarray(self.kept, np.int64),
            "skipped_index": np.asarray([i for i, _ in self.skipped], np.int64),
            "skipped_reason": _str_array(r for _, r in self.skipped),
        })

    @classmethod
    def resume(cls, rows: ResumableRows, total: int) -> "ExtractRows":
        """The rows of this key's last checkpoint, or empty ones."""
        state = rows.resume()
        if state is None:
            return cls(total)
        meta, arr = state
        try:
            got = cls(total, pos=int(meta["pos"]), next=int(meta["next"]), batches=int(meta["batches"]),
                      kept=[int(i) for i in arr["kept"]],
                      skipped=[(int(i), str(r)) for i, r in zip(arr["skipped_index"], arr["skipped_reason"])])
            if meta["units"] is not None:
                got.open(rows, int(meta["units"]), fresh=False)
            if len(got.kept) != got.pos:
                raise ValueError("inconsistent checkpoint")
        except (OSError, ValueError, KeyError, TypeError):
            rows.close()
            return cls(total)
        print(f"extract: resuming from a checkpoint (image {got.next}/{total})", file=sys.stderr, flush=True)
        return got


def _check_finite(mean: np.ndarray, mx: np.ndarray, idx: torch.Tensor, items, layer: str) -> None:
    finite = np.isfinite(mean).all(axis=1) & np.isfinite(mx).all(axis=1)
    if not finite.all():
        bad = [items[int(idx[j])].rel for j in np.flatnonzero(~finite)]
        shown = ", ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConceptrankError(
            f"layer {layer!r} produced NaN/inf activations for {len(bad)} image(s) in this batch: "
            f"{shown} (check the weights and the input normalization)"
        )


def reduce_batches(module: nn.Module, layer: str, stream: _ImageStream, start: int, stop: int, cfg: ExtractConfig,
                   device: torch.device, items) -> Iterator[tuple[torch.Tensor, np.ndarray | None, np.ndarray | None, list]]:
    """Items ``start .. stop-1`` through ``module`` (already on ``device`` in eval mode), in batches.

    Yields ``(kept item indices (b,), mean (b, U), max (b, U), skipped [(index, reason)])`` per
    batch; ``mean``/``max`` are None when the whole batch was skipped.
    """
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(stream, range(start, stop)), batch_size=int(cfg.batch_size), shuffle=False,
        num_workers=int(cfg.workers), collate_fn=_collate, pin_memory=device.type == "cuda")
    oom: dict = {}
    it = iter(loader)
    try:
        with torch.inference_mode(), record_layers(module, [layer]) as store:
            def run(chunk: torch.Tensor):
                store.clear()
                try:
                    module(chunk.to(device, non_blocking=True))
                except (torch.cuda.OutOfMemoryError, ConceptrankError):
                    raise
                except RuntimeError as e:
                    raise ConceptrankError(
                        f"forward pass failed on input {tuple(chunk.shape)} (first image "
                        f"{items[int(idx[0])].rel}): {str(e).splitlines()[0]}"
                    ) from None
                if layer not in store:
                    raise ConceptrankError(f"layer {layer!r} was not reached by the model's forward pass")
                m, mx = reduce_activations(store.pop(layer), layer)
                return m.cpu().numpy(), mx.cpu().numpy()

            for idx, x, skip in it:
                if x is None:
                    yield idx, None, None, skip
                    continue
                parts = forward_in_chunks(x, run, oom, f"extract {layer} forward pass")
                m, mx = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
                _check_finite(m, mx, idx, items, layer)
                yield idx, m, mx, skip
    finally:
        del it  # shuts worker processes down now, also when an error escapes


def _fill_rows(model: LoadedModel, layer: str, stream, state: ExtractRows, rows: ResumableRows, cfg, device,
               items) -> None:
    """Stream the items from ``state.next`` on into ``state``, checkpointing as due."""
    with on_device(model.module, device), Progress(state.total - state.next, f"extract {layer}") as bar:
        for idx, m, mx, skip in reduce_batches(model.module, layer, stream, state.next, state.total, cfg, device, items):
            state.skipped.extend(skip)
            state.next += len(skip) + len(idx)
            if m is not None:
                state.add(idx, m, mx, rows)
            bar.update(len(skip) + len(idx))
            state.batches += 1
            if state.next < state.total and rows.due(state.batches):
                state.checkpoint(rows)


def extract_activations(
    model: LoadedModel,
    layer: str,
    targets: TargetSet,
    cfg: ExtractConfig = ExtractConfig(),
    *,
    resume_dir: str | Path | None = None,
    resume_key: str = "",
) -> Activations:
    """Stream the target images through the model and reduce one layer's activation maps.

    Pure computation: reads images, writes nothing (unless ``resume_dir`` is given).

    Parameters
    ----------
    model : LoadedModel
        Its ``module`` is put in eval mode and moved to the device for the duration of the call
        (restored afterwards); ``to_tensor`` gives the input.
    layer : str
        Dotted layer name (``layer4``, ``features.28``).
    targets : TargetSet
    cfg : ExtractConfig
    resume_dir : path, optional
        Folder for the partial results (memmaps) and a checkpoint written every
        ``CONCEPTRANK_CHECKPOINT_SECONDS``; a checkpoint there written for ``resume_key`` is resumed.
        The caller deletes the folder when done.
    resume_key : str
        Identifies the inputs; a checkpoint with another key is ignored.

    Returns
    -------
    Activations
        ``mean`` (N, U) float32: mean over ``h × w`` of unit ``u``'s activation map on kept image
        ``n``; ``max`` (N, U) the maximum; ``images``/``classes``/``splits`` (N,) of the kept images in
        dataset order, ``class_names``, ``layer``, and ``skipped`` (rel, reason) of the images that
        could not be used. ``path`` is None (nothing was read from a file).

    Raises
    ------
    UnknownLayerError
        ``layer`` is not a submodule (the message lists the valid names).
    ConceptrankError
        Invalid config, ``crop='person'`` without ``XMLAnnotations``, a layer output that is neither
        4-D nor 2-D or never reached, a failed forward pass, or NaN/inf activations (naming images).
    """
    cfg.validate()
    resolve_layer(model.module, layer)  # fail fast, before any worker starts
    device = resolve_device(cfg.device)
    stream = image_stream(model, targets, cfg)
    if cfg.engine == "ray":
        from conceptrank.engines.ray import RayEngine

        engine = RayEngine(cfg.ray_address, cfg.ray_workers)
        try:
            state = sharded_rows(engine, model, layer, stream, targets, cfg, resume_dir, resume_key)
        finally:
            engine.close()
    else:
        rows = ResumableRows(resume_dir, resume_key, "extract")
        state = ExtractRows.resume(rows, len(targets.items))
        _fill_rows(model, layer, stream, state, rows, cfg, device, targets.items)
        rows.close()
    return _activations(state, targets, layer)


# -- sharded engines (Ray) ------------------------------------------------------------------------
SHARDS_PER_WORKER = 4


class _ExtractShards:
    """Shard work of a sharded extraction (picklable; ``setup`` runs once per worker): per shard the
    kept item indices, their mean and max rows and the skipped items."""

    def __init__(self, model: LoadedModel, layer: str, stream: _ImageStream, cfg: ExtractConfig, items) -> None:
        self.model, self.layer, self.stream, self.cfg, self.items = model, layer, stream, cfg, items
        self.device = None

    def setup(self) -> None:
        self.device = resolve_device(self.cfg.device)
        self.model.module.eval().to(self.device)

    def __call__(self, shard, report):
        kept, means, maxes, skipped = [], [], [], []
        for idx, m, mx, skip in reduce_batches(self.model.module, self.layer, self.stream, shard.start, shard.stop,
                                               self.cfg, self.device, self.items):
            skipped.extend(skip)
            if m is not None:
                kept.extend(int(i) for i in idx)
                means.append(m)
                maxes.append(mx)
            report(len(skip) + len(idx))
        if not means:
            return np.zeros(0, np.int64), None, None, skipped
        return np.asarray(kept, np.int64), np.concatenate(means), np.concatenate(maxes), skipped


class _ShardedRows:
    """Results of finished shards at their items' positions (memmaps with a checkpoint)."""

    def __init__(self, rows: ResumableRows, total: int) -> None:
        self.rows, self.total = rows, total
        self.mean = self.max = None
        self.kept = np.zeros(total, bool)
        self.skipped: dict[int, str] = {}
        self.done: set[int] = set()

    def place(self, shard, kept, mean, mx, skipped) -> None:
        if mean is not None:
            if self.mean is None:
                shape = (self.total, mean.shape[1])
                self.mean, self.max = (self.rows.create(n, shape, np.float32) for n in ("mean", "max"))
            self.mean[kept], self.max[kept] = mean, mx
            self.kept[kept] = True
        self.skipped.update({int(i): str(r) for i, r in skipped})
        self.done.add(shard.index)

    def checkpoint(self) -> None:
        units = None if self.mean is None else int(self.mean.shape[1])
        items = sorted(self.skipped)
        self.rows.save(len(self.done), {"done": sorted(self.done), "units": units}, {
            "kept": self.kept, "skipped_index": np.asarray(items, np.int64),
            "skipped_reason": _str_array(self.skipped[i] for i in items)})

    def resume(self) -> None:
        state = self.rows.resume()
        if state is None:
            return
        meta, arr = state
        try:
            if meta["units"] is not None:
                shape = (self.total, int(meta["units"]))
                self.mean, self.max = (self.rows.reopen(n, shape, np.float32) for n in ("mean", "max"))
            self.kept = np.asarray(arr["kept"], bool)
            self.skipped = {int(i): str(r) for i, r in zip(arr["skipped_index"], arr["skipped_reason"])}
            self.done = {int(i) for i in meta["done"]}
        except (OSError, ValueError, KeyError, TypeError):
            self.__init__(self.rows, self.total)
            return
        print(f"extract: resuming from a checkpoint ({len(self.done)} shards done)", file=sys.stderr, flush=True)

    def result(self) -> ExtractRows:
        kept = np.flatnonzero(self.kept)
        out = ExtractRows(self.total, pos=len(kept), kept=kept.tolist(), next=self.total,
                          skipped=[(i, self.skipped[i]) for i in sorted(self.skipped)])
        if self.mean is not None:
            out.mean, out.max = self.mean[kept], self.max[kept]
        return out


def sharded_rows(engine, model: LoadedModel, layer: str, stream: _ImageStream, targets: TargetSet,
                 cfg: ExtractConfig, resume_dir=None, resume_key: str = "") -> ExtractRows:
    """The extraction over shards of the item list on ``engine`` (a Local- or RayEngine), resumable
    from the driver's checkpoint in ``resume_dir``; the same rows as the local pass."""
    from conceptrank.engines.shards import make_shards

    total = len(targets.items)
    shards = make_shards(total, int(cfg.batch_size), SHARDS_PER_WORKER * engine.workers)
    state = _ShardedRows(ResumableRows(resume_dir, resume_key + "/sharded", "extract"), total)
    state.resume()
    todo = [sh for sh in shards if sh.index not in state.done]
    work = _ExtractShards(model, layer, stream, cfg, targets.items)
    with Progress(sum(len(sh) for sh in todo), f"extract {layer} ({engine.workers} workers)") as bar:
        for shard, part in engine.map(work, todo, bar):
            state.place(shard, *part)
            if len(state.done) < len(shards) and state.rows.due(len(state.done)):
                state.checkpoint()
    result = state.result()
    state.rows.close()
    return result


def _activations(state: ExtractRows, targets: TargetSet, layer: str) -> Activations:
    items = [targets.items[i] for i in state.kept]
    if state.mean is None:
        mean = mx = np.zeros((0, 0), np.float32)
    else:  # copies: the partial files are deleted by the caller
        mean, mx = np.array(state.mean[:state.pos]), np.array(state.max[:state.pos])
    return Activations(
        path=None, mean=mean, images=_str_array(it.rel for it in items), classes=_str_array(it.cls for it in items),
        splits=_str_array(it.split for it in items), max=mx, layer=layer, class_names=_str_array(targets.classes),
        skipped=tuple((targets.items[i].rel, reason) for i, reason in state.skipped))


# -- I/O edge -------------------------------------------------------------------------------------
def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    with cache.atomic_write(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "reason"])
        w.writerows(skipped)


def _str_array(values) -> np.ndarray:
    values = list(values)
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def run_extract(
    model: str | LoadedModel,
    weights: str | None,
    layer: str,
    dataset: str | Path,
    out: str | Path,
    cfg: ExtractConfig = ExtractConfig(),
) -> ExtractResult:
    """Load model and targets, run :func:`extract_activations`, write the outputs.

    Writes (atomically) ``out/activations.npz`` with ``mean`` and ``max`` ``(N, U)`` float32,
    ``images`` / ``classes`` / ``splits`` ``(N,)`` unicode (per kept image) and ``class_names``
    (the dataset's class order); ``out/skipped.csv`` (``image,reason``, always written); and
    ``out/extract.json`` (config, model, layer, fingerprints, counts, timings, package versions),
    written last.

    Parameters
    ----------
    model : str or LoadedModel
        A model card / torchvision name for :func:`~conceptrank.nn.models.load_model`, or a loaded model
        (then ``weights`` is ignored).
    weights : str, optional
    layer : str
    dataset : path
        Target set root (or CSV manifest), read with ``cfg.layout``.
    out : path
        Output folder (created).
    cfg : ExtractConfig

    Raises
    ------
    ConceptrankError
        Also when every image was skipped (``skipped.csv`` is still written).
    """
    t0 = time.perf_counter()
    cfg.validate()
    out = Path(out)
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), weights)
    resolve_layer(loaded.module, layer)
    targets = load_targets(dataset, cfg.layout, split_map=cfg.split_map)
    key, fingerprints, params, cache_params = _extract_key(loaded, layer, targets, cfg)
    manifest = cache.lookup(out / "extract.json", key)
    if manifest is not None:
        reused = _reused(out, layer, manifest, t0)
        if reused is not None:
            return reused

    why = cache.why_recompute(out / "extract.json", key, fingerprints, cache_params)
    if why:
        print(f"extract {layer}: recomputing ({why})", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    cache.remove_temps(out, ("extract.json", "activations.npz", "skipped.csv"))
    partial = out / ".partial" / key[:32]
    cache.clear_scratch(out / ".partial", keep=partial.name)
    t1 = time.perf_counter()
    acts = extract_activations(loaded, layer, targets, cfg, resume_dir=partial, resume_key=key)
    t2 = time.perf_counter()
    _write_activations(out, acts, targets, partial)
    timings = {"load": round(t1 - t0, 4), "forward": round(t2 - t1, 4), "total": round(time.perf_counter() - t0, 4)}
    meta = _extract_manifest(loaded, layer, targets, cfg, acts, fingerprints, params, timings)
    meta["cache"] = cache.manifest_section("extract", key, fingerprints, cache_params, out, meta["outputs"].values())
    cache.atomic_write_json(out / "extract.json", meta)  # last: it vouches for the outputs above
    cache.remove_scratch(partial)
    return ExtractResult(out=out, layer=layer, n_images=int(acts.mean.shape[0]), n_units=int(acts.mean.shape[1]),
                         n_skipped=len(acts.skipped), skipped=acts.skipped, timings=timings)


def _extract_key(loaded: LoadedModel, layer: str, targets: TargetSet, cfg: ExtractConfig):
    """``(stage key, fingerprints, params, cache params)`` of an extraction."""
    size = [int(cfg.resize)] * 2 if cfg.resize else [int(s) for s in loaded.input_size]
    params = {
        "version": 1,
        "input_size": size,
        "crop": cfg.crop,
        "normalization": {"mean": list(loaded.mean), "std": list(loaded.std)},
        "reductions": ["mean", "max"],
        "decode": {"max_pixels": _images.MAX_PIXELS, "min_side": _images.MIN_SIDE},
    }
    fingerprints = {
        "model": loaded.fingerprint,
        "layer": layer,
        "dataset": targets.fingerprint(),
        "params": cache.hash_json(params),
        "dataset_files": cache.files_fingerprint(targets.image_root, [it.rel for it in targets.items]),
    }
    if cfg.crop == "person":
        fingerprints["person_boxes"] = cache.files_fingerprint(
            targets.annotations_dir, [PurePosixPath(it.rel).stem + ".xml" for it in targets.items])
    cache_params = {**params, "format": FORMAT_VERSION, "layout": targets.layout, "classes": list(targets.classes)}
    return cache.stage_key("extract", fingerprints, cache_params), fingerprints, params, cache_params


def _write_activations(out: Path, acts: Activations, targets: TargetSet, partial: Path) -> None:
    """skipped.csv, then activations.npz (ConceptrankError when every image was skipped)."""
    _write_skipped(out / "skipped.csv", list(targets.skipped) + list(acts.skipped))  # index-level skips too
    if not len(acts.images):
        cache.remove_scratch(partial)
        reasons = collections.Counter(r for _, r in acts.skipped)
        raise ConceptrankError(
            f"all {len(targets.items)} images were skipped ("
            + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            + f"); see {out / 'skipped.csv'}"
        )
    cache.save_npz(out / "activations.npz", mean=acts.mean, max=acts.max, images=acts.images, classes=acts.classes,
                   splits=acts.splits, class_names=acts.class_names)


def _extract_manifest(loaded, layer, targets, cfg, acts: Activations, fingerprints, params, timings) -> dict:
    per_class = {c: 0 for c in targets.classes}
    per_split: dict[str, int] = {}
    for cls, split in zip(acts.classes.tolist(), acts.splits.tolist()):
        per_class[cls] += 1
        per_split[split] = per_split.get(split, 0) + 1
    skipped = acts.skipped
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("engine", "ray_address", "ray_workers")}
    return {
        "format": FORMAT,
        "version": 1,
        "stage": "extract",
        "config": config,
        "engine": cfg.engine,
        "input_size": params["input_size"],
        "model": loaded.describe(),
        "layer": layer,
        "dataset": {
            "root": str(targets.root),
            "layout": targets.layout,
            "classes": list(targets.classes),
            "items": len(targets.items),
            "dropped_by_split_map": dict(targets.dropped),
        },
        "fingerprints": fingerprints,
        "params": params,
        "counts": {
            "images": int(acts.mean.shape[0]),
            "units": int(acts.mean.shape[1]),
            "skipped": len(skipped),
            "per_class": per_class,
            "per_split": per_split,
            "skipped_reasons": dict(collections.Counter(r for _, r in skipped)),
        },
        "timings": timings,
        "package_versions": cache.package_versions(),
        "outputs": {"activations": "activations.npz", "skipped": "skipped.csv"},
    }


def _reused(out: Path, layer: str, manifest: cache.Manifest, t0: float) -> ExtractResult | None:
    """The result of an earlier run whose manifest matched, read back from its outputs."""
    counts = manifest.data.get("counts") or {}
    try:
        with open(out / "skipped.csv", encoding="utf-8", errors="surrogateescape", newline="") as f:
            rows = list(csv.reader(f))[1:]
        skipped = tuple((r[0], r[1]) for r in rows)
        n_images, n_units = int(counts["images"]), int(counts["units"])
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return None
    return ExtractResult(out=out, layer=layer, n_images=n_images, n_units=n_units, n_skipped=len(skipped),
                         skipped=skipped, timings={"total": round(time.perf_counter() - t0, 4)}, reused=True)
