"""conceptrank: explain what a CNN has learned with ranked, human-readable concepts.

The public API is imported lazily so that ``import conceptrank`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "nn.models",
    "LoadedModel": "nn.models",
    "list_layers": "nn.models",
    "record_layers": "nn.hooks",
    "BrodenDataset": "io.broden",
    "read_tally": "io.tally_csv",
    "UnitLabels": "io.tally_csv",
    "generate_world": "synthetic.world",
    "dissect_layers": "stages.dissect",
    "DissectConfig": "stages.dissect",
    "DissectResult": "stages.dissect",
    "LayerDissection": "stages.dissect",
    "run_dissect": "stages.dissect",
    "extract_activations": "stages.extract",
    "Activations": "io.activations",
    "run_extract": "stages.extract",
    "ExtractConfig": "stages.extract",
    "ExtractResult": "stages.extract",
    "rank_concepts": "stages.rank",
    "run_rank": "stages.rank",
    "RankConfig": "stages.rank",
    "RankResult": "stages.rank",
    "load_activations": "io.activations",
    "evaluate_ranking": "stages.evaluate",
    "run_evaluate": "stages.evaluate",
    "load_evaluation_inputs": "stages.evaluate",
    "EvaluateConfig": "stages.evaluate",
    "EvaluateResult": "stages.evaluate",
    "EvaluationInputs": "stages.evaluate",
    "Ranking": "io.rankings",
    "read_ranking": "io.rankings",
    "write_report": "report",
    "explain_vector": "stages.explain",
    "run_explain": "stages.explain",
    "run_pipeline": "pipeline",
    "RunConfig": "pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'conceptrank' has no attribute {name!r}")
