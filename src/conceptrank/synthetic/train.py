"""Train the synthetic world's source model: a ``WorldNet`` on the world's "ImageNet" task.

The source task is *not* the target classification: each image (one dominant object and 0–2
smaller ones on a random scene) is labelled with the shape, colour and material (``plain`` when
unpatterned) of its largest visible object and with its scene. Added to those heads, a multi-label
*presence* task (the ImageNet/Places analogue): one output per concept of the world's vocabulary
(``presence_concepts()``: colours, objects, parts, materials, scenes, textures), trained with binary
cross-entropy on "is this concept visible anywhere in the image". With global average pooling before
the output, it rewards ``layer4`` units that detect a concept wherever it is — what Network
Dissection should then find. The output layer has ``sum(head sizes) + len(presence_concepts())``
logits, heads first.

And a dense task on ``layer4`` itself (a concept bottleneck, Koh et al. 2020): its first
``len(dense_concepts())`` units are *concept units*, one per concept of the world, each trained with
binary cross-entropy (through a learnt per-unit scale and bias) to predict the share of every
``layer4`` cell the concept covers (image-level scenes and textures cover a whole image). Image-level
supervision alone taught a CPU-sized network too slowly to localize shapes and parts (held-out shape
accuracy 0.14 after 20k training samples, 2 object and 1 part concept found by the dissection); the
dense task gives every cell a target. The other units are free. Whether a concept unit became a
detector is still for the dissection to find out: it is trained on source images, then thresholded
on the probe set like every other unit.

Loss weights (``HEAD_WEIGHTS``, ``PRESENCE_WEIGHTS``): with equal weights the easy concepts
(colours, scenes) win the shared features and shapes, parts and materials get few units; the
presence weights up-weight those.

Training uses bf16 autocast when the CPU has native bf16 (about 2x faster), decided from the CPU
flags so that a machine always trains the same way; the saved weights are float32. The shipped
model (``conceptrank/synthetic/model/``) makes the demo independent of where it runs.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from conceptrank.nn.models import IMAGENET_MEAN, IMAGENET_STD
from conceptrank.synthetic.world import (
    COLORS,
    JPEG_QUALITY,
    MATERIALS,
    SCENES,
    SHAPES,
    concept_vocabulary,
    jpeg_roundtrip,
    source_scene,
)

__all__ = [
    "SOURCE_HEADS",
    "HEAD_WEIGHTS",
    "PRESENCE_WEIGHTS",
    "TrainConfig",
    "SourceModel",
    "presence_concepts",
    "source_heads",
    "render_source_data",
    "render_source_images",
    "source_fingerprint",
    "train_source_model",
]

SOURCE_HEADS = ("shape", "color", "material", "scene")
HEAD_WEIGHTS = {"shape": 1.0, "color": 0.35, "material": 1.0, "scene": 0.2}
#: Per-category weights of the presence loss (see the module docstring for why they are unequal).
PRESENCE_WEIGHTS = {"color": 0.4, "object": 2.5, "part": 2.5, "material": 1.5, "scene": 0.4, "texture": 1.0}


@dataclass(frozen=True)
class TrainConfig:
    """How the source model is trained (the world's seed and image size come separately).

    Attributes
    ----------
    train_images : int — distinct training images, reused each epoch with random horizontal flips.
    epochs : int
    heldout_images : int — images of an independent stream for the reported accuracy.
    batch_size : int
    lr : float — peak Adam learning rate of the one-cycle schedule.
    width : int — ``WorldNet`` width (``layer4`` has ``4 * width`` units).
    layer4_stride : 4 or 8 — input pixels per ``layer4`` cell.
    head_weights : dict head → weight of the main-object heads' cross-entropies.
    presence_weight : float — weight of the multi-label presence loss (0 drops the presence outputs).
    presence_weights : dict category → per-concept BCE weight.
    dense_weight : float — weight of the per-cell concept coverage loss on ``layer4`` (0: none).
    threads : int — torch threads while training (1: the same result whatever the machine's core count).
    """

    train_images: int = 12000
    epochs: int = 30
    heldout_images: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 32
    layer4_stride: int = 4
    head_weights: Mapping[str, float] = field(default_factory=lambda: dict(HEAD_WEIGHTS))
    presence_weight: float = 1.0
    presence_weights: Mapping[str, float] = field(default_factory=lambda: dict(PRESENCE_WEIGHTS))
    dense_weight: float = 2.0
    threads: int = 1

    def arch_kwargs(self) -> dict:
        dense = {"concept_units": len(dense_concepts())} if self.dense_weight > 0 else {}
        return {"width": self.width, "stem_pool": True, "layer4_stride": self.layer4_stride, **dense}

    def to_json(self) -> dict:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


def source_heads() -> dict[str, tuple[str, ...]]:
    """The source task's heads and their class names, in output order."""
    return {
        "shape": SHAPES,
        "color": tuple(n for n, _ in COLORS),
        "material": ("plain",) + MATERIALS,
        "scene": SCENES,
    }


def presence_concepts() -> tuple[str, ...]:
    """The concepts of the source task's presence outputs: every label of the world, in number order."""
    return concept_vocabulary().names[1:]


#: Categories with pixel labels (the dense task's target is their coverage of each ``layer4`` cell);
#: the image-level ones (scene, texture) cover every cell of an image that has them.
DENSE_CATEGORIES = ("color", "object", "part", "material")


def dense_concepts() -> tuple[str, ...]:
    """The concepts of the dense task, one concept unit each: every label of the world in number order."""
    return concept_vocabulary().names[1:]


def _cell_coverage(planes, stride: int, n_labels: int) -> np.ndarray:
    """Share of each ``stride``×``stride`` cell covered by labels ``1…n_labels``: (n_labels, G, G) float16."""
    S = planes[0].shape[0]
    G = S // stride
    cell = (np.arange(S) // stride)[:, None] * G + (np.arange(S) // stride)[None, :]
    counts = np.zeros(G * G * (n_labels + 1), np.int64)
    for p in planes:
        lab = np.where(p <= n_labels, p, 0)
        counts += np.bincount((cell * (n_labels + 1) + lab).ravel(), minlength=counts.size)
    cov = counts.reshape(G * G, n_labels + 1)[:, 1:].T.reshape(n_labels, G, G) / float(stride * stride)
    return cov.astype(np.float16)


@dataclass(frozen=True)
class SourceModel:
    """A trained source model.

    Attributes
    ----------
    model_dir : Path — folder with ``model.json`` and ``weights.safetensors``.
    heads : dict head → class names.
    heldout_accuracy : dict head → accuracy on held-out source images, plus ``mean`` and ``presence_f1``.
    config : TrainConfig
    final_loss : float — mean weighted loss over the last epoch.
    seconds_render, seconds_train : float
    """

    model_dir: Path
    heads: Mapping[str, tuple[str, ...]]
    heldout_accuracy: Mapping[str, float]
    config: TrainConfig
    final_loss: float
    seconds_render: float
    seconds_train: float


def render_source_data(seed: int, size: int, count: int, split: str = "train"):
    """Source-task images, head labels and presence targets (see :func:`render_source_dense`)."""
    return render_source_dense(seed, size, count, split, stride=0)[:3]


def render_source_dense(seed: int, size: int, count: int, split: str = "train", stride: int = 4):
    """Source-task images, head labels, presence targets and dense coverage targets.

    Parameters
    ----------
    seed, size : int
    count : int
        Number of images (image ``i`` is the same whatever ``count`` is).
    split : ``"train"`` or ``"heldout"`` (independent random streams).

    Returns
    -------
    images : np.ndarray (N, S, S, 3) uint8, after a JPEG round trip like the saved probe images.
    labels : np.ndarray (N, 4) int64 — class index per head in ``SOURCE_HEADS`` order.
    presence : np.ndarray (N, P) float32 — 1 where ``presence_concepts()[p]`` is visible.
    dense : np.ndarray (N, D, S/stride, S/stride) float16 — share of each cell covered by
        ``dense_concepts()[d]`` (``(N, 0, 0, 0)`` when ``stride`` is 0).
    """
    heads = source_heads()
    n_dense = len(dense_concepts())
    grid = size // stride if stride else 0
    dense = np.zeros((count, n_dense if stride else 0, grid, grid), np.float16)
    index = {h: {n: i for i, n in enumerate(names)} for h, names in heads.items()}
    pindex = {n: i for i, n in enumerate(presence_concepts())}
    images = np.zeros((count, size, size, 3), np.uint8)
    labels = np.zeros((count, len(SOURCE_HEADS)), np.int64)
    presence = np.zeros((count, len(pindex)), np.float32)
    for i in range(count):
        sc = source_scene(seed, i, size, split)
        presence[i, [pindex[c] for c in sc.concepts]] = 1.0
        if stride:
            dense[i] = _cell_coverage([p for c in DENSE_CATEGORIES for p in sc.planes[c]], stride, n_dense)
            for labs in sc.image_labels.values():
                dense[i, [n - 1 for n in labs]] = 1.0
        spec = sc.main_object().spec
        images[i] = jpeg_roundtrip(sc.image, JPEG_QUALITY)
        labels[i] = (index["shape"][spec.shape], index["color"][spec.color],
                     index["material"][spec.material or "plain"], index["scene"][sc.spec.scene])
    return images, labels, presence, dense


def render_source_images(seed: int, size: int, count: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`render_source_data` without the presence targets: ``(images, labels)``."""
    images, labels, _ = render_source_data(seed, size, count, split)
    return images, labels


def source_fingerprint(seed: int, size: int, count: int = 8) -> str:
    """SHA-256 of the first ``count`` training and held-out source images and their targets.

    It changes when the renderer, the vocabulary or the source task changes, so a saved model can
    tell whether it was trained on the world the code draws today.
    """
    h = hashlib.sha256(f"{seed}:{size}:{','.join(presence_concepts())}".encode())
    for split in ("train", "heldout"):
        for arr in render_source_data(seed, size, count, split):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _fast_bf16() -> bool:
    """Whether the CPU has native bf16 dot products (then bf16 autocast trains ~2x faster).

    Decided from the CPU's feature flags, not by timing, so that a machine always trains the same way.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _to_input(images_u8):
    """``(N, S, S, 3)`` uint8 → ImageNet-normalized ``(N, 3, S, S)`` float32."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


class _Loss:
    """The weighted sum of the heads' cross-entropies and the presence BCE over output slices."""

    def __init__(self, cfg: TrainConfig) -> None:
        import torch

        heads = source_heads()
        self.weights = [cfg.head_weights[h] for h in heads]
        self.bounds = np.cumsum([0] + [len(v) for v in heads.values()])
        self.presence_weight = cfg.presence_weight
        self.n_presence = len(presence_concepts()) if cfg.presence_weight > 0 else 0
        cat = concept_vocabulary().category
        self.concept_weights = torch.tensor([cfg.presence_weights[cat[c]] for c in presence_concepts()],
                                            dtype=torch.float32)
        self.dense_weight = cfg.dense_weight
        self.dense_weights = torch.tensor([cfg.presence_weights[cat[c]] for c in dense_concepts()],
                                          dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def num_outputs(self) -> int:
        return int(self.bounds[-1]) + self.n_presence

    def __call__(self, logits, labels, presence, dense_logits=None, dense=None):
        import torch.nn.functional as F

        b = self.bounds
        loss = sum(w * F.cross_entropy(logits[:, b[h]: b[h + 1]], labels[:, h]) for h, w in enumerate(self.weights))
        if self.n_presence:
            loss = loss + self.presence_weight * F.binary_cross_entropy_with_logits(
                logits[:, b[-1]:], presence, weight=self.concept_weights, reduction="sum") / len(labels)
        if dense_logits is not None:  # summed over concepts, mean over cells and images
            cells = dense_logits.shape[0] * dense_logits.shape[2] * dense_logits.shape[3]
            loss = loss + self.dense_weight * F.binary_cross_entropy_with_logits(
                dense_logits, dense, weight=self.dense_weights, reduction="sum") / cells
        return loss


def _fit(module, data, loss_fn: _Loss, cfg: TrainConfig, seed: int, progress: bool) -> float:
    """Adam with a one-cycle schedule over ``data = (images, labels, presence)``; returns the last
    epoch's mean loss."""
    import torch

    x_train, y_train, p_train, d_train = data
    n = len(x_train)
    dense = loss_fn.dense_weight > 0
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=1e-5)
    steps = max(1, n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps * cfg.epochs, pct_start=0.25)
    rng = np.random.default_rng([seed, 6])
    use_bf16 = _fast_bf16()
    y_all, p_all = torch.from_numpy(y_train), torch.from_numpy(p_train)
    t0, final_loss = time.perf_counter(), float("nan")
    module.train()
    for ep in range(cfg.epochs):
        perm, flips = rng.permutation(n), rng.random(n) < 0.5
        total = 0.0
        for b in range(steps):
            idx = np.sort(perm[b * cfg.batch_size: (b + 1) * cfg.batch_size])
            xb = np.where(flips[idx][:, None, None, None], x_train[idx][:, :, ::-1], x_train[idx])
            x = _to_input(xb).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits, dlogits = module.forward_dense(x) if dense else (module(x), None)
            target = None
            if dense:  # the coverage maps flip with their images
                target = torch.from_numpy(d_train[idx]).float()
                target = torch.where(torch.from_numpy(flips[idx])[:, None, None, None], target.flip(3), target)
                dlogits = dlogits.float()
            loss = loss_fn(logits.float(), y_all[idx], p_all[idx], dlogits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        final_loss = total / max(steps * cfg.batch_size, 1)
        if progress:
            print(f"  source task: epoch {ep + 1}/{cfg.epochs} loss {final_loss:.3f} "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    module.eval()
    return final_loss


def _evaluate(module, held, loss_fn: _Loss) -> dict[str, float]:
    """Held-out accuracy per head, their mean, and the presence outputs' micro F1."""
    import torch

    x_held, y_held, p_held = held[:3]
    heads = list(source_heads())
    b = loss_fn.bounds
    correct = np.zeros(len(heads))
    tp = pred_pos = true_pos = 0
    with torch.no_grad():
        for s in range(0, len(x_held), 256):
            logits = module(_to_input(x_held[s: s + 256])).numpy()
            for h in range(len(heads)):
                correct[h] += (logits[:, b[h]: b[h + 1]].argmax(1) == y_held[s: s + 256, h]).sum()
            if loss_fn.n_presence:
                pred, true = logits[:, b[-1]:] > 0, p_held[s: s + 256] > 0
                tp, pred_pos, true_pos = tp + (pred & true).sum(), pred_pos + pred.sum(), true_pos + true.sum()
    acc = {h: round(float(c / max(len(x_held), 1)), 4) for h, c in zip(heads, correct)}
    acc["mean"] = round(float(np.mean(list(acc.values()))), 4)
    if loss_fn.n_presence:
        acc["presence_f1"] = round(float(2 * tp / max(pred_pos + true_pos, 1)), 4)
    return acc


def train_source_model(
    model_dir,
    *,
    seed: int = 0,
    size: int = 64,
    config: TrainConfig | None = None,
    progress: bool = True,
    provenance: Mapping | None = None,
) -> SourceModel:
    """Train a ``WorldNet`` on the world's source task and save its model card in ``model_dir``.

    Uses ``config.threads`` threads and a private torch RNG seeded with ``seed`` (the caller's thread
    count and RNG state are restored).

    Parameters
    ----------
    model_dir : path
        Where ``model.json`` and ``weights.safetensors`` go.
    seed, size : int
        The world's seed and image side.
    config : TrainConfig, optional
        Training settings (default ``TrainConfig()``).
    progress : bool
        Report progress on stderr.
    provenance : dict, optional
        Recorded in the card under ``provenance`` (e.g. the command and code version that made it).

    Returns
    -------
    SourceModel
    """
    import torch

    from conceptrank.nn.models import save_model_card
    from conceptrank.nn.nets import WorldNet

    cfg = config or TrainConfig()
    loss_fn = _Loss(cfg)
    t0 = time.perf_counter()
    stride = cfg.layer4_stride if cfg.dense_weight > 0 else 0
    data = render_source_dense(seed, size, cfg.train_images, "train", stride)
    held = render_source_dense(seed, size, cfg.heldout_images, "heldout", 0)
    t_render = time.perf_counter() - t0
    if progress:
        print(f"  source task: rendered {cfg.train_images}+{cfg.heldout_images} images in {t_render:.1f} s",
              file=sys.stderr, flush=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t1 = time.perf_counter()
            module = WorldNet(num_classes=loss_fn.num_outputs, **cfg.arch_kwargs())
            module = module.to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU
            final_loss = _fit(module, data, loss_fn, cfg, seed, progress)
            module = module.to(memory_format=torch.contiguous_format)
            acc = _evaluate(module, held, loss_fn)
            with torch.no_grad():  # logits of two held-out images, so that a reloaded card can be checked
                ref = module(_to_input(held[0][:2])).numpy().astype(np.float64)
            t_train = time.perf_counter() - t1
    finally:
        torch.set_num_threads(old_threads)
    task = {
        "heads": {h: list(v) for h, v in source_heads().items()},
        "heldout_accuracy": acc,
        "presence": {"concepts": list(presence_concepts()) if loss_fn.n_presence else [],
                     "weight": cfg.presence_weight},
        "config": cfg.to_json(),
        "bf16_autocast": _fast_bf16(),
        "seed": seed,
        "size": size,
        "world_fingerprint": source_fingerprint(seed, size),
        "reference": {"split": "heldout", "images": [0, 1][: len(ref)], "logits": ref.tolist()},
    }
    save_model_card(model_dir, module, "worldnet", loss_fn.num_outputs, (size, size), IMAGENET_MEAN, IMAGENET_STD,
                    arch_kwargs=cfg.arch_kwargs(),
                    extra={"source_task": task, **({"provenance": dict(provenance)} if provenance else {})})
    if progress:
        print("  source task: held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()),
              file=sys.stderr, flush=True)
    return SourceModel(Path(model_dir), source_heads(), acc, cfg, final_loss, t_render, t_train)
