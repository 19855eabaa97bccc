"""The public API: every name in __all__ resolves, stage names are the stage functions."""

import subprocess
import sys


def test_stage_names_are_functions_whatever_was_imported():
    code = (
        "import conceptrank.pipeline, conceptrank.stages.dissect, conceptrank.stages.rank\n"
        "import conceptrank as cr\n"
        "from conceptrank import dissect_layers, extract_activations, rank_concepts, run_rank, evaluate\n"
        "for f in (cr.dissect_layers, cr.extract_activations, cr.rank_concepts, cr.run_rank, cr.evaluate,\n"
        "          dissect_layers, extract_activations, rank_concepts, run_rank, evaluate):\n"
        "    assert callable(f) and not isinstance(f, type(cr)), f\n"
        "from conceptrank.stages.dissect import DissectConfig\n"
        "for n in cr.__all__:\n"
        "    getattr(cr, n)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_light():
    code = "import sys, conceptrank; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_public_function_is_named_like_its_module():
    import importlib

    import conceptrank as cr

    for name, where in cr._EXPORTS.items():
        mod = importlib.import_module(f"conceptrank.{where}")
        assert name != where.rsplit(".", 1)[-1] or not callable(getattr(mod, name)) or name in ("dissect", "extract", "evaluate"), name
