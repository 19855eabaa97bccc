"""The package's layers: imports (lazy ones included) go one way, down, and never form a cycle.

    errors, progress  <  core  <  io  <  nn  <  engines  <  stages  <  synthetic, testing
                      <  report, fetch  <  pipeline  <  cli, __main__

A module may import its own layer or any layer below it; the root ``conceptrank/__init__.py`` (the
lazy public API) is the one exception.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "conceptrank"
LAYERS = [
    {"errors", "progress"},
    {"core"},
    {"io"},
    {"nn"},
    {"engines"},
    {"stages"},
    {"synthetic", "testing"},
    {"report", "fetch"},
    {"pipeline"},
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py; add its package there")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                base = ".".join(base)
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module and t != "conceptrank" and not t.startswith(module + "."):
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, f, set(mods)) for m, f in mods.items()}


def test_every_module_is_in_a_layer():
    for m in _graph():
        if m != "conceptrank":
            _layer(m)


def test_no_import_goes_up_a_layer():
    upward = [f"{m} imports {t}" for m, ts in _graph().items() if m != "conceptrank"
              for t in sorted(ts) if _layer(t) > _layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("bad", ["up", "cycle"])
def test_the_checks_catch_what_they_should(tmp_path, bad, monkeypatch):
    root = tmp_path / "conceptrank"
    (root / "core").mkdir(parents=True)
    (root / "stages").mkdir()
    for p in (root / "__init__.py", root / "core" / "__init__.py", root / "stages" / "__init__.py"):
        p.write_text("")
    if bad == "up":
        (root / "core" / "a.py").write_text("def f():\n    from conceptrank.stages import b\n")
        (root / "stages" / "b.py").write_text("")
        monkeypatch.setattr(__import__(__name__), "PKG", root)
        with pytest.raises(AssertionError, match="core.a imports conceptrank.stages.b"):
            test_no_import_goes_up_a_layer()
    else:
        (root / "core" / "a.py").write_text("from . import b\n")
        (root / "core" / "b.py").write_text("from .a import f\n")
        monkeypatch.setattr(__import__(__name__), "PKG", root)
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
