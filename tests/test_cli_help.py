"""The command line explains itself: help for every option, plain metavars, --version, -m, --quiet."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from conceptrank import __version__
from conceptrank.cli import app

runner = CliRunner()
PLACEHOLDER = re.compile(r"<bool>|<list|<[a-z_]+(\[[^>]*\])?>|[{}]")


def _commands():
    group = typer.main.get_command(app)
    return group, sorted(group.commands.items())


def _params(cmd):
    return cmd.get_params(typer.Context(cmd, info_name=cmd.name))


def test_every_option_and_argument_has_help():
    group, commands = _commands()
    assert len(commands) >= 11
    missing = [f"conceptrank {p.name}" for p in _params(group) if not (p.help or "").strip()]
    for name, cmd in commands:
        assert (cmd.help or "").strip(), f"command {name} has no help"
        missing += [f"{name} {p.opts[0] if p.opts else p.name}" for p in _params(cmd) if not (p.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("args", [[]] + [[n] for n, _ in _commands()[1]])
def test_help_has_no_type_placeholders_or_braces(args):
    r = runner.invoke(app, args + ["--help"], terminal_width=120)
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output
    bad = PLACEHOLDER.findall(r.output)
    assert not bad, f"{args}: {bad} in\n{r.output}"


def test_explain_usage_names_its_argument():
    r = runner.invoke(app, ["explain", "--help"], terminal_width=120)
    assert re.search(r"explain \[OPTIONS\] IMAGE\.\.\.", r.output), r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"conceptrank {__version__}"


def test_python_dash_m_and_help_is_lazy():
    code = ("import runpy, sys; sys.argv = ['conceptrank', '--help']\n"
            "try:\n    runpy.run_module('conceptrank', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import in --help'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Commands" in p.stdout and "dissect" in p.stdout
    p = subprocess.run([sys.executable, "-m", "conceptrank", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"conceptrank {__version__}", p.stderr


def test_quiet_silences_progress(monkeypatch):
    from conceptrank import progress

    monkeypatch.setenv(progress.QUIET_ENV, "")  # recorded first: the variable is removed again afterwards
    r = runner.invoke(app, ["--quiet", "report", "--run", "/nonexistent/run"])
    assert r.exit_code == 2 and "run folder not found" in r.output
    assert progress.is_quiet()
    monkeypatch.setenv(progress.QUIET_ENV, "")
    runner.invoke(app, ["report", "--run", "/nonexistent/run"])
    assert not progress.is_quiet()


def test_torchvision_model_needs_weights():
    from conceptrank.nn.models import ModelError, load_model

    r = runner.invoke(app, ["layers", "--model", "resnet18"])
    assert r.exit_code == 2
    assert "needs weights (--weights)" in r.output and "'none' for random init" in r.output
    assert "Traceback" not in r.output
    with pytest.raises(ModelError, match="enum.*state_dict file.*'none'"):
        load_model("resnet18")
    with pytest.raises(ModelError, match="Did you mean: resnet152"):  # a bad name is still named first
        load_model("resnet15")
    r = runner.invoke(app, ["dissect", "--model", "resnet18", "--layer", "layer4", "--probe", "p", "--out", "o"])
    assert r.exit_code == 2 and "needs weights" in r.output


def test_layers_header_names_the_input_size():
    r = runner.invoke(app, ["layers", "--model", "resnet18", "--weights", "none", "--size", "64"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "resnet18 (weights: none), output shapes for one 1x3x64x64 input:"
    assert lines[1].split() == ["layer", "type", "output", "shape"]
    assert any(ln.split()[0] == "layer4" and ln.split()[-1] == "1x512x2x2" for ln in lines[2:])
    r = runner.invoke(app, ["layers", "--model", "resnet18", "--weights", "none"])
    assert "1x3x224x224 input (the model's input size" in r.output.splitlines()[0]


def test_missing_image_suggests_only_near_names():
    from conceptrank.errors import ConceptrankError
    from conceptrank.stages.explain import resolve_image

    images = [f"JPEGImages/{c}_{i:03d}.jpg" for c in ("fishing", "juggling") for i in range(1, 81)]
    with pytest.raises(ConceptrankError) as e:
        resolve_image("nothing_here.jpg", images)
    assert "did you mean" not in str(e.value) and "fishing" not in str(e.value)
    with pytest.raises(ConceptrankError, match=r"did you mean JPEGImages/juggling_001\.jpg"):
        resolve_image("jugling_001.jpg", images)
