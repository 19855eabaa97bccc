"""Record layer outputs with forward hooks that are always removed, and that cannot lie: a layer
module that runs more than once per forward pass (torchvision's ``Bottleneck.relu`` runs three
times) or returns something other than a tensor is an error, not a silently kept last value."""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from conceptrank.errors import ConceptrankError, UnknownLayerError

__all__ = ["UnknownLayerError", "resolve_layer", "record_layers", "layer_names"]

Calls = Literal["once", "all"]


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule with dotted name ``name``; raises UnknownLayerError listing valid names."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    valid = layer_names(model)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    shown = ", ".join(valid[:60]) + (" …" if len(valid) > 60 else "")
    raise UnknownLayerError(f"unknown layer {name!r}.{hint} Valid layers: {shown}")


def _as_tensor(name: str, out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    kind = type(out).__name__
    raise ConceptrankError(
        f"layer {name!r} returns a {kind}, not a tensor; hook the submodule that produces the feature "
        "maps you mean (see `conceptrank layers`)"
    )


@contextlib.contextmanager
def record_layers(model: nn.Module, names: Sequence[str], calls: Calls = "once") -> Iterator[dict]:
    """Record the outputs of the named layers during forward passes of ``model``.

    Parameters
    ----------
    model : the root module; every call of it starts a new forward pass.
    names : dotted layer names.
    calls : ``"once"`` (default): a layer that runs a second time within one forward pass raises
        :class:`ConceptrankError` (a module reused inside a block, e.g. torchvision's
        ``Bottleneck.relu``, would otherwise keep only its last output); ``"all"``: record every
        call, in order, as a list.

    Yields a dict that after each forward pass maps each layer name to its output tensor
    ``(B, U, h, w)`` (a detached copy), or to the list of them with ``calls="all"``. A layer output
    that is not a tensor (a tuple, a dict) raises. The hooks are removed on exit, also when an
    exception escapes.
    """
    if calls not in ("once", "all"):
        raise ValueError(f"calls must be 'once' or 'all', got {calls!r}")
    modules = [resolve_layer(model, n) for n in names]
    store: dict = {}
    seen: dict[str, int] = {}
    handles = [model.register_forward_pre_hook(lambda _m, _inp: seen.clear())]
    try:
        for name, module in zip(names, modules):
            def hook(_m, _inp, out, name=name):
                # clone: a later in-place op (ReLU(inplace=True), `out += identity`) would
                # otherwise change the recorded values
                value = _as_tensor(name, out).detach().clone()
                seen[name] = seen.get(name, 0) + 1
                if calls == "all":
                    if seen[name] == 1:
                        store[name] = []
                    store[name].append(value)
                    return
                if seen[name] > 1:
                    raise ConceptrankError(
                        f"layer {name!r} ({type(_m).__name__}) runs {seen[name]} times in one forward pass, so "
                        "its output is ambiguous; hook a module that runs once (e.g. the block itself, or "
                        "'layer4.2' instead of 'layer4.2.relu')"
                    )
                store[name] = value
            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[int, ...] | str]]:
    """Run ``model(x)`` once and return, per submodule that ran, the shape of each call's output
    (a type name for outputs that are not tensors), in call order."""
    shapes: dict[str, list] = {}
    handles = []
    try:
        for name, module in model.named_modules():
            if not name:
                continue

            def hook(_m, _inp, out, name=name):
                shapes.setdefault(name, []).append(
                    tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__)
            handles.append(module.register_forward_hook(hook))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes
