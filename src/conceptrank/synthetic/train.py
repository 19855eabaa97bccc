"""Train the synthetic world's source model: a ConceptNet on the world's "ImageNet" task.

The source task is *not* the target classification: each image (one dominant object and 0–2
smaller ones on a random scene) is labelled with the shape, colour and material (``plain`` when
unpatterned) of its largest visible object and with its scene. The network has one linear output
of width ``sum(head sizes)``; the loss is a weighted sum of the heads' cross-entropies over their
slices. Learning these heads makes ``layer4`` units that detect shapes, colours, materials and
scenes — what Network Dissection should then find.

Added to those heads, a multi-label *presence* task (the ImageNet/Places analogue): one output per
shape, colour, material and scene (``presence_concepts()``), trained with binary cross-entropy on
"is this concept visible anywhere in the image". With global average pooling before the output, it
rewards ``layer4`` units that detect a concept wherever it is, not only on the largest object. The
output layer has ``sum(head sizes) + len(presence_concepts())`` logits, heads first.

Presence weights per category (``PRESENCE_WEIGHTS``): with equal weights colours and scenes, learnt
fast, take nearly all units (10 colours and 9–10 scenes labelled by the dissection, no shape, no
material); up-weighting shapes and materials keeps shapes and materials labelled. Colour and scene at
0.4 (rather than 0.3 / 0.2) label 3 shapes, 2 materials, 10 colours and 9 scenes on seed 0 and gave
the best global ground-truth precision (P@1 0.8, R-precision 0.425 vs 0.7 / 0.375 at 0.3 / 0.2),
at the cost of local P@5 (0.41 vs 0.46).

Why weighted: with equal weights the easy heads (scene, colour) win the shared features and the shape
head stays near chance within the training budget (held-out shape accuracy about 0.25, against about
0.5 with ``HEAD_WEIGHTS``, for 30-36k training samples); down-weighting the easy heads costs them
little (colour about 0.9, scene about 0.99).

Training uses bf16 autocast when the CPU has native bf16 (about 2x faster on 2 cores), decided from
the CPU flags so that a machine always trains the same way; the saved weights are float32.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
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
    jpeg_roundtrip,
    source_scene,
)

__all__ = ["SOURCE_HEADS", "HEAD_WEIGHTS", "PRESENCE_WEIGHTS", "presence_concepts", "render_source_data", "SourceModel", "source_heads", "render_source_images", "train_source_model"]

SOURCE_HEADS = ("shape", "color", "material", "scene")
HEAD_WEIGHTS = {"shape": 1.0, "color": 0.35, "material": 1.0, "scene": 0.2}
#: Per-category weights of the presence loss (see the module docstring for why they are unequal).
PRESENCE_WEIGHTS = {"shape": 2.5, "color": 0.4, "material": 1.5, "scene": 0.4}
_WIDTH = 32
_THREADS = 2
_ARCH = {"width": _WIDTH, "stem_pool": True}  # pooling after conv1: ~1.4x faster, 7 epochs fit in budget


def source_heads() -> dict[str, tuple[str, ...]]:
    """The source task's heads and their class names, in output order."""
    return {
        "shape": SHAPES,
        "color": tuple(n for n, _ in COLORS),
        "material": ("plain",) + MATERIALS,
        "scene": SCENES,
    }


@dataclass(frozen=True)
class SourceModel:
    """A trained source model.

    Attributes
    ----------
    model_dir : Path — folder with ``model.json`` and ``weights.safetensors``.
    heads : dict head → class names.
    heldout_accuracy : dict head → accuracy on held-out source images, plus ``mean``.
    train_images, epochs : int
    final_loss : float — mean weighted summed cross-entropy over the last epoch.
    seconds_render, seconds_train : float
    """

    model_dir: Path
    heads: Mapping[str, tuple[str, ...]]
    heldout_accuracy: Mapping[str, float]
    train_images: int
    epochs: int
    final_loss: float
    seconds_render: float
    seconds_train: float


def render_source_images(seed: int, size: int, count: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Source-task images and labels.

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
    """
    images, labels, _ = render_source_data(seed, size, count, split)
    return images, labels


def presence_concepts() -> tuple[str, ...]:
    """The concepts of the source task's presence outputs (shapes, colours, materials, scenes)."""
    return SHAPES + tuple(n for n, _ in COLORS) + MATERIALS + SCENES


def render_source_data(seed: int, size: int, count: int, split: str = "train"):
    """Like :func:`render_source_images`, plus ``presence`` (N, P) float32: 1 where concept
    ``presence_concepts()[p]`` is visible in the image."""
    heads = source_heads()
    index = {h: {n: i for i, n in enumerate(names)} for h, names in heads.items()}
    pindex = {n: i for i, n in enumerate(presence_concepts())}
    images = np.zeros((count, size, size, 3), np.uint8)
    labels = np.zeros((count, len(SOURCE_HEADS)), np.int64)
    presence = np.zeros((count, len(pindex)), np.float32)
    for i in range(count):
        sc = source_scene(seed, i, size, split)
        for c in sc.concepts:
            if c in pindex:
                presence[i, pindex[c]] = 1.0
        main = sc.main_object()
        spec = main.spec
        images[i] = jpeg_roundtrip(sc.image, JPEG_QUALITY)
        labels[i] = (
            index["shape"][spec.shape],
            index["color"][spec.color],
            index["material"][spec.material or "plain"],
            index["scene"][sc.spec.scene],
        )
    return images, labels, presence


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


def _to_input(images_u8, mean, std):
    """``(N, S, S, 3)`` uint8 → normalized ``(N, 3, S, S)`` float32 (channels-last memory)."""
    import torch

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def train_source_model(
    model_dir,
    *,
    seed: int = 0,
    size: int = 64,
    train_images: int = 6000,
    epochs: int = 7,
    heldout_images: int = 500,
    batch_size: int = 32,
    lr: float = 3e-3,
    progress: bool = True,
    head_weights: Mapping[str, float] | None = None,
    presence_weight: float = 1.0,
    presence_category_weights: Mapping[str, float] | None = None,
) -> SourceModel:
    """Train a ``ConceptNet`` (width 32) on the source task and save its model card.

    Uses two threads and a private torch RNG (the caller's thread count and RNG state are restored).

    Parameters
    ----------
    model_dir : path
        Where ``model.json`` and ``weights.safetensors`` go.
    seed, size : int
    train_images : int
        Distinct training images, reused each epoch with random horizontal flips.
    epochs : int
    heldout_images : int
        Images of an independent stream for the reported accuracy.
    batch_size : int
    lr : float
        Peak Adam learning rate of the one-cycle schedule.
    progress : bool
        Report progress on stderr.
    head_weights : dict head → weight, optional
        Weights of the main-object heads' cross-entropies (default ``HEAD_WEIGHTS``).
    presence_weight : float
        Weight of the multi-label presence loss (0 drops the presence outputs).
    presence_category_weights : dict category → weight, optional
        Per-concept BCE weights by category (default ``PRESENCE_WEIGHTS``).

    Returns
    -------
    SourceModel
    """
    import torch
    import torch.nn.functional as F

    from conceptrank.nn.models import save_model_card
    from conceptrank.nn.nets import ConceptNet

    heads = source_heads()
    hw = dict(HEAD_WEIGHTS if head_weights is None else head_weights)
    weights = [hw[h] for h in heads]
    sizes = [len(v) for v in heads.values()]
    bounds = np.cumsum([0] + sizes)
    n_presence = len(presence_concepts()) if presence_weight > 0 else 0
    num_classes = int(bounds[-1]) + n_presence
    pcw = dict(PRESENCE_WEIGHTS if presence_category_weights is None else presence_category_weights)
    pcat = [("shape",) * len(SHAPES), ("color",) * len(COLORS), ("material",) * len(MATERIALS), ("scene",) * len(SCENES)]
    p_w = torch.tensor([pcw[c] for grp in pcat for c in grp], dtype=torch.float32)
    model_dir = Path(model_dir)

    t0 = time.perf_counter()
    x_train, y_train, p_train = render_source_data(seed, size, train_images, "train")
    x_held, y_held, p_held = render_source_data(seed, size, heldout_images, "heldout")
    t_render = time.perf_counter() - t0
    if progress:
        print(f"  source task: rendered {train_images}+{heldout_images} images in {t_render:.1f} s",
              file=sys.stderr, flush=True)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t1 = time.perf_counter()
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            module = ConceptNet(num_classes=num_classes, **_ARCH)
            module = module.to(memory_format=torch.channels_last)  # ~2x faster convolutions on CPU
            opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=1e-5)
            steps_per_epoch = max(1, train_images // batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, total_steps=steps_per_epoch * epochs, pct_start=0.25
            )
            rng = np.random.default_rng([seed, 6])
            use_bf16 = _fast_bf16()
            y_all = torch.from_numpy(y_train)
            p_all = torch.from_numpy(p_train)
            final_loss = float("nan")
            module.train()
            for ep in range(epochs):
                perm = rng.permutation(train_images)
                flips = rng.random(train_images) < 0.5
                total, count = 0.0, 0
                for b in range(steps_per_epoch):
                    idx = np.sort(perm[b * batch_size : (b + 1) * batch_size])
                    xb = x_train[idx]
                    fl = flips[idx]
                    xb = np.where(fl[:, None, None, None], xb[:, :, ::-1], xb)
                    x = _to_input(np.ascontiguousarray(xb), mean, std)
                    y = y_all[idx]
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                        logits = module(x).float()
                    loss = sum(
                        weights[h] * F.cross_entropy(logits[:, bounds[h] : bounds[h + 1]], y[:, h])
                        for h in range(len(sizes))
                    )
                    if n_presence:
                        pl = logits[:, bounds[-1] :]
                        loss = loss + presence_weight * F.binary_cross_entropy_with_logits(
                            pl, p_all[idx], weight=p_w, reduction="sum") / len(idx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                final_loss = total / max(count, 1)
                if progress:
                    print(f"  source task: epoch {ep + 1}/{epochs} loss {final_loss:.3f} "
                          f"({time.perf_counter() - t1:.1f} s)", file=sys.stderr, flush=True)

            module = module.to(memory_format=torch.contiguous_format)
            module.eval()
            correct = np.zeros(len(sizes))
            pres_correct = 0
            pres_f1 = [0, 0]
            with torch.no_grad():
                for b in range(0, heldout_images, 256):
                    logits = module(_to_input(x_held[b : b + 256], mean, std))
                    for h in range(len(sizes)):
                        pred = logits[:, bounds[h] : bounds[h + 1]].argmax(1).numpy()
                        correct[h] += (pred == y_held[b : b + 256, h]).sum()
                    if n_presence:
                        pred = (logits[:, bounds[-1] :] > 0).numpy()
                        pres_correct += (pred == (p_held[b : b + 256] > 0)).all(1).sum()
                        pres_f1[0] += (pred & (p_held[b : b + 256] > 0)).sum()
                        pres_f1[1] += pred.sum() + (p_held[b : b + 256] > 0).sum()
                # Logits of the first two held-out images, so that a reloaded card can be checked.
                n_ref = min(2, heldout_images)
                ref = module(_to_input(x_held[:n_ref], mean, std)).numpy().astype(np.float64)
            t_train = time.perf_counter() - t1
    finally:
        torch.set_num_threads(old_threads)

    acc = {h: round(float(c / max(heldout_images, 1)), 4) for h, c in zip(heads, correct)}
    acc["mean"] = round(float(np.mean(list(acc.values()))), 4)
    if n_presence:
        acc["presence_f1"] = round(float(2 * pres_f1[0] / max(pres_f1[1], 1)), 4)
    save_model_card(
        model_dir,
        module,
        "conceptnet",
        num_classes,
        (size, size),
        IMAGENET_MEAN,
        IMAGENET_STD,
        arch_kwargs=dict(_ARCH),
        extra={
            "source_task": {
                "heads": {h: list(v) for h, v in heads.items()},
                "heldout_accuracy": acc,
                "train_images": train_images,
                "heldout_images": heldout_images,
                "epochs": epochs,
                "batch_size": batch_size,
                "loss_weights": hw,
                "presence": {"concepts": list(presence_concepts()) if n_presence else [], "weight": presence_weight},
                "bf16_autocast": use_bf16,
                "seed": seed,
                "reference": {
                    "split": "heldout",
                    "images": list(range(n_ref)),
                    "logits": ref.tolist(),
                },
            }
        },
    )
    if progress:
        print("  source task: held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()),
              file=sys.stderr, flush=True)
    return SourceModel(
        model_dir=model_dir,
        heads=heads,
        heldout_accuracy=acc,
        train_images=train_images,
        epochs=epochs,
        final_loss=final_loss,
        seconds_render=t_render,
        seconds_train=t_train,
    )
