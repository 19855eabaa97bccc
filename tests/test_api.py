"""The public API: every name in __all__ resolves, stage names are the stage functions."""

import subprocess
import sys


def test_stage_names_are_functions_whatever_was_imported():
    code = (
        "import conceptrank.pipeline, conceptrank.stages.dissect, conceptrank.stages.rank, conceptrank.stages.evaluate\n"
        "import conceptrank as cr\n"
        "from conceptrank import dissect_layers, extract_activations, rank_concepts, run_rank, evaluate_ranking, run_evaluate\n"
        "for f in (cr.dissect_layers, cr.extract_activations, cr.rank_concepts, cr.run_rank, cr.evaluate_ranking,\n"
        "          cr.run_evaluate, dissect_layers, extract_activations, rank_concepts, run_rank, evaluate_ranking,\n"
        "          run_evaluate):\n"
        "    assert callable(f) and not isinstance(f, type(cr)), f\n"
        "from conceptrank.stages.dissect import DissectConfig\n"
        "for n in cr.__all__:\n"
        "    getattr(cr, n)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_light():
    code = "import sys, conceptrank; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


PENDING_RENAMES: set[str] = set()


def test_no_function_is_named_like_its_module():
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "src" / "conceptrank"
    clashes = []
    for f in sorted(pkg.rglob("*.py")):
        name = f.stem
        module = ".".join(("conceptrank",) + f.relative_to(pkg).with_suffix("").parts)
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if name in names and module not in PENDING_RENAMES:
                clashes.append(f"{module}.{name}")
    assert not clashes, clashes
