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
import os
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


# -- screenshots of the parts a reader looks at ------------------------------------------------------
CHANCE_RGB = (217, 221, 226)  # figures.CHANCE_COLOR at alpha 0.7 over white


def _has_colour(img: Image.Image, rgb, tol: int = 6, min_pixels: int = 50) -> bool:
    a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum()) >= min_pixels


@pytest.fixture(scope="module")
def shots(report):
    """Full-page screenshot cropped to the overview, the first class section and the figures."""
    run, path, root = report
    full = root / "full.png"
    dom, log = run_chromium(path.resolve().as_uri(), root / "profile-shots", screenshot=full, size=(1400, 9000))
    check = selfcheck(dom)
    out = {}
    with Image.open(full) as im:
        for name, key in (("overview", "#overview"), ("class", ".class-section"), ("figures", "#figures")):
            b = check["boxes"][key]
            assert b["top"] + b["height"] <= im.height, f"{key} lies below the screenshot"
            out[name] = root / f"shot_{name}.png"
            im.crop((0, b["top"], im.width, b["top"] + b["height"])).save(out[name])
    dest = os.environ.get("CONCEPTRANK_SCREENSHOTS")  # to look at them: set it to a folder
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        for p in out.values():
            shutil.copy2(p, Path(dest) / p.name)
    return check, out


def test_new_elements_are_present_and_visible(shots):
    check, _ = shots
    el = check["elements"]
    assert el["#agreement td.lift"]["count"] == 2 and el["#agreement td.lift"]["visible"]
    assert el["#agreement td.pval"]["visible"]
    assert el[".badge.chance"]["count"] >= 1 and el[".badge.chance"]["visible"]  # 3L-3G is at chance
    assert el[".chip.planted"]["count"] >= 5 and el[".chip.planted"]["visible"]
    assert el[".fig img"]["count"] == 6


def test_screenshots_show_content_and_the_chance_band(shots, report):
    _, out = shots
    for name, p in out.items():
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"))
            assert a.shape[0] > 200, name
            assert a.std() > 10 and len(np.unique(a[::3, ::3].reshape(-1, 3), axis=0)) > 50, f"{name} is blank"
    run = report[0]
    with Image.open(run / "figures" / "agreement_3L-1G.png") as im:
        assert _has_colour(im, CHANCE_RGB), "no chance band in the per-class agreement figure"
    with Image.open(run / "figures" / "agreement_summary.png") as im:
        assert _has_colour(im, CHANCE_RGB), "no chance band in the summary figure"
    with Image.open(out["figures"]) as im:
        assert _has_colour(im, CHANCE_RGB, tol=10), "the chance band is not visible in the page"


def test_figures_are_shown_at_their_physical_size(report, loaded):
    """9 pt text stays ≥ 12 CSS px: each figure is displayed at (PNG px × 96 / dpi), not squeezed."""
    run = report[0]
    doc = parse_html(loaded[0])
    imgs = [a for tag, a in doc.elements if tag == "img" and a.get("src", "").startswith("figures/") and a.get("width")]
    assert len(imgs) == 6
    for a in imgs:
        with Image.open(run / unquote(a["src"])) as im:
            assert int(a["width"]) == round(im.width * 96 / 150)
