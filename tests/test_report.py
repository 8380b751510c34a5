"""Pictures and pages: overlays, candidate views, the HTML report."""

from __future__ import annotations

import html

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


def test_report_names_hits_and_keeps_views_in_their_own_rows(tmp_path):
    from lunaseg.report import VIEWS_LEGEND

    png = overlay_png(np.full((16, 16), -800.0), None)
    rows = [{"rank": 0, "annotated_nodule": "yes: 8.0 mm, 0.5 mm away"},
            {"rank": 1, "annotated_nodule": ""}]
    page = html_report(None, title="t", scan_info={}, settings={}, candidates=rows,
                       columns=["rank", "annotated_nodule"], thumbnails=[png, png],
                       heading="Candidates: 2, best first (the submission keeps the first 2)")
    assert "yes: 8.0 mm, 0.5 mm away" in page and "<th>annotated nodule</th>" in page
    assert page.count('<tr class="views"><td colspan="2">') == 2  # beneath, not beside
    assert "max-width:1240px" in page and html.escape(VIEWS_LEGEND) in page
    assert "Candidates: 2, best first" in page


def test_montage_and_overlays_carry_legends(tmp_path):
    from PIL import Image

    from lunaseg.geometry import Geometry
    from lunaseg.report import MontageScan, render_montage, with_legend

    hu = np.full((8, 64, 64), -800, dtype=np.int16)
    scan = MontageScan(hu, Geometry.identity(), "1.2.3", [(np.array([32.0, 32.0, 4.0]), 6.0)])
    path = render_montage([scan], tmp_path / "m.png", slices_per_scan=2)
    with Image.open(path) as image:
        assert image.size[0] > 100
    rgb = overlay_rgb(np.zeros((20, 20)), np.zeros((20, 20), bool), np.zeros((20, 20), bool))
    legend = with_legend(rgb)
    assert legend.shape[0] == 34 and legend.shape[1] >= 300
    assert (legend[20:, :, 1] > 200).any()  # the green key


def test_class_overlay_colours_and_legend():
    from lunaseg.report import CLASS_LEGEND_ITEMS, class_overlay_rgb, with_legend

    hu = np.full((2, 4), -1000.0)
    # label: benign benign malignant malignant / background x4
    label = np.array([[1, 1, 2, 2], [0, 0, 0, 0]])
    pred = np.array([[1, 2, 2, 0], [0, 1, 2, 0]])
    rgb = class_overlay_rgb(hu, pred, label)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[0, 0].tolist() == [0, 128, 0]  # benign found as benign: green
    assert rgb[0, 1].tolist() == [128, 128, 0]  # benign called malignant: yellow
    assert rgb[0, 2].tolist() == [26, 57, 128]  # malignant found as malignant: blue
    assert rgb[0, 3].tolist() == [128, 64, 0]  # missed: orange
    assert rgb[1, 1].tolist() == rgb[1, 2].tolist() == [128, 0, 0]  # false positives: red
    assert rgb[1, 0].tolist() == [0, 0, 0]
    # The label drawn as its own prediction shows each class in its colour.
    shown = class_overlay_rgb(hu, label, label)
    assert shown[0, 0].tolist() == [0, 128, 0] and shown[0, 3].tolist() == [26, 57, 128]
    legend = with_legend(np.zeros((20, 20, 3), np.uint8), CLASS_LEGEND_ITEMS)
    assert legend.shape[0] == 34 and legend.shape[1] >= 110 * len(CLASS_LEGEND_ITEMS)
    assert ((legend[20:, :, 2] > 200) & (legend[20:, :, 0] < 100)).any()  # the blue key
