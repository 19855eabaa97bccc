"""The public API: every name in __all__ resolves, stage names are the stage functions."""

import subprocess
import sys


def test_stage_names_are_functions_whatever_was_imported():
    code = (
        "import conceptrank.pipeline, conceptrank.stages.dissect, conceptrank.stages.rank\n"
        "import conceptrank as cr\n"
        "from conceptrank import dissect_layers, extract_activations, rank, evaluate\n"
        "for f in (cr.dissect_layers, cr.extract_activations, cr.rank, cr.evaluate, dissect_layers, extract_activations, rank, evaluate):\n"
        "    assert callable(f) and not isinstance(f, type(cr)), f\n"
        "from conceptrank.stages.dissect import DissectConfig\n"
        "for n in cr.__all__:\n"
        "    getattr(cr, n)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_light():
    code = "import sys, conceptrank; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
