"""conceptrank: explain what a CNN has learned with ranked, human-readable concepts.

The public API is imported lazily so that ``import conceptrank`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib

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
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'conceptrank' has no attribute {name!r}")
