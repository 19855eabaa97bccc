"""The report in a real browser: headless Chromium opens report.html from file:// with no network.

Chromium is driven through its command line only (no extra Python packages): ``--dump-dom`` gives
the DOM after the page's scripts ran and ``--screenshot`` a PNG of the viewport. The page's own
script writes a self-check into ``<pre id="selfcheck">`` on load: uncaught errors, images that did
not decode, in-page anchors without a target, and whether the key elements are present and
visible. Console messages (which include uncaught exceptions) come from ``--enable-logging=stderr``.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import numpy as np
import pytest
from PIL import Image
from test_report import (
    CLASSES,
    EVIL_CONCEPT,
    local_refs,
    make_tiny_run,
    parse_html,
    with_class,
)

from conceptrank.report import write_report

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: install Debian's chromium (apt-get install chromium; .ci/run does)",
)

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
]


def run_chromium(url: str, profile: Path, screenshot: Path | None = None, size=(1280, 1800)) -> tuple[str, str]:
    """Load ``url``; returns (DOM after scripts ran, stderr log)."""
    args = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--dump-dom"]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    proc = subprocess.run(args + [url], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def console_lines(log: str) -> list[str]:
    """Console messages and uncaught exceptions that the page produced."""
    return [ln for ln in log.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


def selfcheck(dom: str) -> dict:
    m = re.search(r'<pre id="selfcheck"[^>]*>(.*?)</pre>', dom, re.S)
    assert m, "the page's self-check did not run (no #selfcheck in the DOM)"
    assert m.group(1).strip(), "the self-check is empty: the page's script did not finish"
    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    run = make_tiny_run(root)
    path = write_report(run)
    return run, path, root


@pytest.fixture(scope="module")
def loaded(report):
    run, path, root = report
    shot = root / "screenshot.png"
    dom, log = run_chromium(path.resolve().as_uri(), root / "profile", screenshot=shot)
    return dom, log, shot


def test_page_loads_without_errors(loaded):
    dom, log, _ = loaded
    assert console_lines(log) == []
    check = selfcheck(dom)
    assert check["errors"] == []


def test_key_elements_present_and_visible(loaded):
    check = selfcheck(loaded[0])
    for key in ("#overview", "#figures", "#units", "#classes", ".unit-card", ".class-section", ".image-panel"):
        el = check["elements"][key]
        assert el["present"] and el["visible"], (key, el)
    assert check["elements"][".unit-card"]["count"] == 10
    assert check["elements"][".class-section"]["count"] == len(CLASSES)
    assert check["filter"]["shown"] == {"units": 10, "classes": 3, "panels": 6}  # no filter: everything shown


def test_every_image_and_link_resolves(report, loaded):
    run = report[0]
    dom = loaded[0]
    check = selfcheck(dom)
    assert check["images"] > 40
    assert check["broken_images"] == []  # every <img> decoded (naturalWidth > 0)
    assert check["missing_anchors"] == []  # every href="#id" has its target
    refs = local_refs(parse_html(dom))
    assert refs
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc, f"non-relative link {ref}"
        assert (run / unquote(parts.path)).is_file(), f"broken link {ref}"


def test_names_render_as_text(loaded):
    dom = loaded[0]
    assert "<script>alert(1)" not in dom
    doc = parse_html(dom)
    text = " ".join(doc.text)
    assert EVIL_CONCEPT in text  # the browser kept it as text
    assert "b<i>&amp;" in text
    assert not any(tag == "i" for tag, _ in doc.elements)  # no markup was injected


def test_screenshot_is_not_blank(loaded):
    shot = loaded[2]
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape[0] >= 1000 and a.shape[1] >= 1000
    colours = np.unique(a[::2, ::2].reshape(-1, 3), axis=0)
    assert len(colours) > 100, "the screenshot is (nearly) one flat colour"
    assert a.std() > 10


def test_filters_from_the_url(report):
    """``?concept=…&class=…`` preselects the filters; non-matching cards and panels are hidden."""
    run, path, root = report
    url = path.resolve().as_uri() + "?concept=" + quote(EVIL_CONCEPT, safe="")
    dom, log = run_chromium(url, root / "profile-filter")
    assert console_lines(log) == []
    check = selfcheck(dom)
    assert check["errors"] == []
    assert check["filter"]["concept"] == EVIL_CONCEPT
    doc = parse_html(dom)
    cards = with_class(doc, "unit-card")
    shown = [c for c in cards if "hidden" not in c]
    assert shown and all(json.loads(c["data-concepts"]) == [EVIL_CONCEPT] for c in shown)
    assert check["filter"]["shown"]["units"] == len(shown) < len(cards)

    url = path.resolve().as_uri() + "?class=" + quote(CLASSES[1], safe="")
    check = selfcheck(run_chromium(url, root / "profile-filter2")[0])
    assert check["filter"]["class"] == CLASSES[1]
    assert check["filter"]["shown"]["classes"] == 1
    assert check["filter"]["shown"]["panels"] == 2


def test_report_opens_after_the_run_folder_moves(report, tmp_path):
    """Only relative paths: a copy of the run folder (report + figures) opens the same."""
    run = report[0]
    dst = tmp_path / "moved"
    dst.mkdir()
    shutil.copy2(run / "report.html", dst / "report.html")
    shutil.copytree(run / "figures", dst / "figures")
    check = selfcheck(run_chromium((dst / "report.html").as_uri(), tmp_path / "profile")[0])
    assert check["broken_images"] == [] and check["errors"] == []
