"""Record layer outputs with forward hooks that are always removed."""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterator, Sequence

from torch import nn

from conceptrank.errors import UnknownLayerError

__all__ = ["UnknownLayerError", "resolve_layer", "record_layers", "layer_names"]


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


@contextlib.contextmanager
def record_layers(model: nn.Module, names: Sequence[str]) -> Iterator[dict]:
    """Record the outputs of the named layers during forward passes.

    Yields a dict that after each forward pass maps each layer name to its output tensor
    ``(B, U, h, w)`` (detached copy). The hooks are removed on exit, also when an exception escapes.
    """
    modules = [resolve_layer(model, n) for n in names]
    store: dict = {}
    handles = []
    try:
        for name, module in zip(names, modules):
            def hook(_m, _inp, out, name=name):
                if isinstance(out, (tuple, list)):
                    out = out[0]
                # clone: a later in-place op (ReLU(inplace=True), `out += identity`) would
                # otherwise change the recorded values
                store[name] = out.detach().clone()
            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
