"""Pictures and pages: overlays, candidate views, the HTML report."""

from __future__ import annotations

import numpy as np

from lunaseg.report import html_report, overlay_png, overlay_rgb


def test_overlay_rgb_book_colours():
    hu = np.full((2, 2), -1000.0)
    pred = np.array([[1, 1], [0, 0]], dtype=bool)
    label = np.array([[1, 0], [1, 0]], dtype=bool)
    rgb = overlay_rgb(hu, pred, label)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [0, 128, 0]  # true positive: green
    assert rgb[0, 1].tolist() == [128, 0, 0]  # false positive: red
    assert rgb[1, 0].tolist() == [128, 64, 0]  # false negative: orange
    assert rgb[1, 1].tolist() == [0, 0, 0]  # air, nothing predicted
    assert overlay_rgb(np.full((1, 1), 1000.0), *np.zeros((2, 1, 1), bool))[0, 0].tolist() == \
        [128, 128, 128]


def test_overlay_png_and_html_report(tmp_path):
    hu = np.full((32, 32), -800.0)
    mask = np.zeros((32, 32), dtype=bool)
    mask[10:14, 12:16] = True
    png = overlay_png(hu, mask, tmp_path / "o.png", marker_rc=(12, 14), title="t")
    assert png[:4] == b"\x89PNG" and (tmp_path / "o.png").read_bytes() == png
    page = html_report(tmp_path / "r.html", title="a <b>", scan_info={"uid": "1.2"},
                       settings={"threshold": 0.5}, candidates=[{"rank": 0, "p": 0.9}],
                       thumbnails=[png])
    assert "a &lt;b&gt;" in page and page.count("data:image/png;base64,") == 1
    assert (tmp_path / "r.html").read_text() == page
