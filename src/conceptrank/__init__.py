"""conceptrank: explain what a CNN has learned with ranked, human-readable concepts.

The public API is imported lazily so that ``import conceptrank`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models",
    "LoadedModel": "models",
    "list_layers": "models",
    "record_layers": "hooks",
    "BrodenDataset": "data.broden",
    "read_tally": "tally",
    "UnitLabels": "tally",
    "generate_world": "data.synthetic",
    "dissect": "dissect",
    "DissectConfig": "dissect",
    "DissectResult": "dissect",
    "extract": "extract",
    "ExtractConfig": "extract",
    "ExtractResult": "extract",
    "rank": "rank",
    "RankConfig": "rank",
    "RankResult": "rank",
    "evaluate": "evaluate",
    "EvaluateConfig": "evaluate",
    "EvaluateResult": "evaluate",
    "write_report": "report",
    "run_explain": "explain",
    "run_pipeline": "pipeline",
    "RunConfig": "pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# Stage modules whose name is also the stage function they export (``conceptrank.dissect`` is the
# function, ``conceptrank.dissect``'s module is ``sys.modules["conceptrank.dissect"]``).
_SAME_NAME = {"dissect", "extract", "rank", "evaluate"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # The import system binds a loaded submodule to its package attribute; for the stage
        # modules keep the function there, so `conceptrank.dissect(...)` works whatever was imported.
        if name in _SAME_NAME and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'conceptrank' has no attribute {name!r}")
