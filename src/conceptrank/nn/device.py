"""Devices and batched forward passes: one ``resolve_device``, one ``forward_in_chunks``, and a
context that lends a module to a device and restores the caller's device and train/eval mode."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from conceptrank.errors import ConceptrankError

__all__ = ["resolve_device", "module_device", "on_device", "forward_in_chunks"]

T = TypeVar("T")


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device.

    Raises
    ------
    ConceptrankError
        An unknown name, or CUDA requested where none is available.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec != "cpu" and spec != "cuda" and not spec.startswith("cuda:"):
        raise ConceptrankError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConceptrankError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConceptrankError(f"--device {spec} requested but CUDA is not available; use --device cpu")
    return dev


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (or buffer); CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The module in eval mode on ``device``; its device and train/eval mode are restored on exit."""
    home, was_training = module_device(module), module.training
    module.eval().to(device)
    try:
        yield module
    finally:
        module.to(home)
        module.train(was_training)


def forward_in_chunks(x: torch.Tensor, fn: Callable[[torch.Tensor], T], state: dict,
                      what: str = "forward pass") -> list[T]:
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
