"""The README's Python example names only things that exist (running it takes minutes: see README)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import conceptrank as cr

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_example_parses_and_uses_public_names():
    code = _example()
    tree = ast.parse(code)
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "cr"}
    assert {"load_model", "run_dissect", "run_pipeline", "RunConfig"} <= used
    assert all(hasattr(cr, name) for name in used), sorted(n for n in used if not hasattr(cr, n))
    fields = {f.name for f in dataclasses.fields(cr.RunConfig)}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "RunConfig"]
    assert calls and all(k.arg in fields for c in calls for k in c.keywords)
    assert any(k.arg == "tally" for c in calls for k in c.keywords), "the pipeline must reuse the dissection"
    assert "shared/spec" not in README.read_text(encoding="utf-8")
