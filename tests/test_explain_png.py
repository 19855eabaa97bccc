"""The explain figure: signed overlays in the report's style, one symmetric scale per group of panels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conceptrank.stages.explain import _render_png, _signed_overlay


def test_signed_overlay_colours_follow_sign_and_magnitude():
    rgb = np.full((4, 4, 3), 200, np.uint8)
    m = np.array([[1.0, -1.0, 0.0, 0.5]] * 4)
    out = _signed_overlay(rgb, m, lim=1.0)
    assert out.shape == (4, 4, 3) and out.min() >= 0 and out.max() <= 1
    r, b = out[0, 0], out[0, 1]
    assert r[0] > r[2] + 0.2 and b[2] > b[0] + 0.2  # + is red, − is blue
    base = 0.45 + 0.5 * 200 / 255
    np.testing.assert_allclose(out[0, 2], base)  # 0 leaves the grey image
    dist = np.linalg.norm(out[0] - base, axis=1)
    assert dist[0] > dist[3] > 0.05  # half the value, a weaker overlay


def _blue_pixels(path, box):
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h, w = a.shape[:2]
    x0, x1, y0, y1 = (int(box[0] * w), int(box[1] * w), int(box[2] * h), int(box[3] * h))
    p = a[y0:y1, x0:x1]
    return int(((p[..., 2] - p[..., 0]) > 60).sum())


def test_against_panels_get_their_own_scale(tmp_path):
    """An against-map 100× weaker than the for-map is invisible on a shared scale and clear on its own."""
    img = np.full((32, 32, 3), 128, np.uint8)
    strong = np.zeros((32, 32))
    strong[8:24, 8:24] = 1.0
    weak = np.zeros((32, 32))
    weak[8:24, 8:24] = -0.01
    panels = [("a +1.00", strong), ("b -0.01", weak)]
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    _render_png(one, img, "t", panels, true_class="x", predicted="y", n_for=None)
    _render_png(two, img, "t", panels, true_class="x", predicted="y", n_for=1)
    for p in (one, two):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top = (0.7, 1.0, 0.1, 0.7)  # the last panel, above the colour bars
    assert _blue_pixels(one, top) < 20
    assert _blue_pixels(two, top) > 200
