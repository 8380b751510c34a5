"""Pictures and pages for people: CT overlays, candidate views, dataset montages, FROC plots
and a self-contained HTML report per scan.

Rendering uses matplotlib's object API (``Figure`` + ``FigureCanvasAgg``) and never touches
pyplot, so it is thread-safe, needs no display and leaves no global figure state behind.
Colour composition happens in NumPy; matplotlib only lays out panels, titles and lines.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from lunaseg.errors import DataError
from lunaseg.files import write_atomic, write_bytes_atomic, write_text_atomic
from lunaseg.geometry import Geometry

if TYPE_CHECKING:
    from lunaseg.evaluate import FrocResult

__all__ = [
    "window_gray", "overlay_rgb", "class_overlay_rgb", "with_legend", "mask_overlay_rgb",
    "overlay_png", "candidate_png", "OVERLAY_LEGEND", "CLASS_OVERLAY_LEGEND",
    "CLASS_LEGEND_ITEMS",
    "html_report", "MontageScan", "render_montage", "scans_from_dataset", "plot_froc",
    "COLOR_FALSE_POSITIVE", "COLOR_FALSE_NEGATIVE", "COLOR_TRUE_POSITIVE",
]

log = logging.getLogger(__name__)

# Book colours for training images: false positives red, false negatives orange, hits green.
COLOR_FALSE_POSITIVE = (1.0, 0.0, 0.0)
COLOR_FALSE_NEGATIVE = (1.0, 0.5, 0.0)
COLOR_TRUE_POSITIVE = (0.0, 1.0, 0.0)
# 3-class images add: malignant pixels found as malignant blue (benign ones found as benign
# keep the green), and nodule pixels found with the wrong class yellow.
COLOR_MALIGNANT = (0.2, 0.45, 1.0)
COLOR_WRONG_CLASS = (1.0, 1.0, 0.0)
# Candidate overlays: the candidate itself in yellow, other candidates in cyan.
_COLOR_CANDIDATE = np.array([1.0, 0.85, 0.0])
_COLOR_OTHER = np.array([0.0, 0.8, 1.0])


def window_gray(hu: np.ndarray, window_hu: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """HU -> float32 grey levels in [0, 1] for the window (low, high)."""
    low, high = float(window_hu[0]), float(window_hu[1])
    if not high > low:
        raise ValueError(f"window_hu must be (low, high) with low < high, got {window_hu}")
    gray = (np.asarray(hu, dtype=np.float32) - low) / (high - low)
    return np.clip(gray, 0.0, 1.0)


def _check_same_shape(reference: np.ndarray, **arrays: np.ndarray) -> None:
    for name, array in arrays.items():
        if np.shape(array) != reference.shape:
            raise ValueError(f"{name} has shape {np.shape(array)}, expected {reference.shape}")


def overlay_rgb(hu_slice: np.ndarray, pred_bool: np.ndarray, label_bool: np.ndarray,
                *, window_hu: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Prediction vs label on a CT slice, as the training images show it.

    hu_slice : (H, W) HU; pred_bool, label_bool : (H, W) bool.
    Returns (H, W, 3) uint8: grey CT dimmed to half brightness, false positives red,
    false negatives orange, true positives green (each colour added at half strength so
    the anatomy stays visible under it).
    """
    hu_slice = np.asarray(hu_slice)
    if hu_slice.ndim != 2:
        raise ValueError(f"hu_slice must be 2D (H, W), got shape {hu_slice.shape}")
    pred = np.asarray(pred_bool, dtype=bool)
    label = np.asarray(label_bool, dtype=bool)
    _check_same_shape(hu_slice, pred_bool=pred, label_bool=label)
    rgb = np.repeat(window_gray(hu_slice, window_hu)[..., None] * 0.5, 3, axis=2)
    for where, color in ((pred & ~label, COLOR_FALSE_POSITIVE),
                         (~pred & label, COLOR_FALSE_NEGATIVE),
                         (pred & label, COLOR_TRUE_POSITIVE)):
        rgb[where] += 0.5 * np.asarray(color, dtype=np.float32)
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


OVERLAY_LEGEND = ("green: nodule pixels found (true positive), orange: nodule pixels "
                  "missed (false negative), red: pixels marked outside any nodule (false "
                  "positive)")


def class_overlay_rgb(hu_slice: np.ndarray, pred_classes: np.ndarray,
                      label_classes: np.ndarray, *,
                      window_hu: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """A 3-class prediction vs its label on a CT slice, as the training images show it.

    hu_slice : (H, W) HU; pred_classes, label_classes : (H, W) int classes (0 background,
    1 benign, 2 malignant).  Returns (H, W, 3) uint8 like :func:`overlay_rgb`: benign pixels
    found as benign green, malignant found as malignant blue, nodule pixels found with the
    other class yellow, missed nodule pixels orange, pixels marked outside any nodule red
    (:data:`CLASS_LEGEND_ITEMS`).  Drawn with the label as prediction it shows the classes.
    """
    hu_slice = np.asarray(hu_slice)
    if hu_slice.ndim != 2:
        raise ValueError(f"hu_slice must be 2D (H, W), got shape {hu_slice.shape}")
    pred = np.asarray(pred_classes).astype(np.int64)
    label = np.asarray(label_classes).astype(np.int64)
    _check_same_shape(hu_slice, pred_classes=pred, label_classes=label)
    rgb = np.repeat(window_gray(hu_slice, window_hu)[..., None] * 0.5, 3, axis=2)
    found = (pred > 0) & (label > 0)
    for where, color in (((pred > 0) & (label == 0), COLOR_FALSE_POSITIVE),
                         ((pred == 0) & (label > 0), COLOR_FALSE_NEGATIVE),
                         (found & (pred == 1) & (label == 1), COLOR_TRUE_POSITIVE),
                         (found & (pred == 2) & (label == 2), COLOR_MALIGNANT),
                         (found & (pred != label), COLOR_WRONG_CLASS)):
        rgb[where] += 0.5 * np.asarray(color, dtype=np.float32)
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


# What each colour of overlay_rgb and class_overlay_rgb means, in the legend strip.
OVERLAY_LEGEND_ITEMS = ((COLOR_TRUE_POSITIVE, "found"), (COLOR_FALSE_NEGATIVE, "missed"),
                        (COLOR_FALSE_POSITIVE, "false positive"))
CLASS_LEGEND_ITEMS = ((COLOR_TRUE_POSITIVE, "benign"), (COLOR_MALIGNANT, "malignant"),
                      (COLOR_WRONG_CLASS, "wrong class"), (COLOR_FALSE_NEGATIVE, "missed"),
                      (COLOR_FALSE_POSITIVE, "false positive"))
CLASS_OVERLAY_LEGEND = ("green: benign nodule pixels found as benign, blue: malignant nodule "
                        "pixels found as malignant, yellow: nodule pixels found but given the "
                        "other class, orange: nodule pixels missed (false negative), red: "
                        "pixels marked outside any nodule (false positive); the label images "
                        "show benign nodules green and malignant ones blue")


def with_legend(rgb: np.ndarray,
                items: Sequence[tuple[tuple[float, float, float], str]] | None = None
                ) -> np.ndarray:
    """An overlay with a strip beneath it naming its colours: ``items`` (colour, text)
    pairs, by default those of :func:`overlay_rgb`."""
    from PIL import Image, ImageDraw

    items = OVERLAY_LEGEND_ITEMS if items is None else items
    strip_px = 14
    canvas = Image.new("RGB", (max(rgb.shape[1], 110 * len(items)), rgb.shape[0] + strip_px),
                       "black")
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 2
    for color, text in items:
        fill = tuple(int(255 * c) for c in color)
        draw.rectangle((x, rgb.shape[0] + 3, x + 8, rgb.shape[0] + 11), fill=fill)
        draw.text((x + 11, rgb.shape[0] + 1), text, fill=(230, 230, 230))
        x += 16 + int(draw.textlength(text))
    return np.asarray(canvas)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask that touch the background (a one-pixel contour)."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def mask_overlay_rgb(hu_slice: np.ndarray, mask_slice: np.ndarray | None,
                     *, other_mask: np.ndarray | None = None,
                     window_hu: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """Grey CT with a tinted, outlined mask; (H, W, 3) float32 in [0, 1].

    ``mask_slice`` (the object of interest) is drawn yellow, ``other_mask`` (say, the other
    candidates) cyan.  The default window (-1000..400 HU) shows lung and soft tissue.
    """
    gray = window_gray(hu_slice, window_hu)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for mask, color in ((other_mask, _COLOR_OTHER), (mask_slice, _COLOR_CANDIDATE)):
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        _check_same_shape(gray, mask=mask)
        # A light tint inside keeps the texture visible; the outline marks the edge.
        rgb[mask] = 0.75 * rgb[mask] + 0.25 * color
        rgb[_outline(mask)] = color
    return rgb


def _resize_nearest(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, 3) image (voxels stay crisp squares)."""
    rows = np.minimum((np.arange(height) + 0.5) * rgb.shape[0] / height, rgb.shape[0] - 1)
    cols = np.minimum((np.arange(width) + 0.5) * rgb.shape[1] / width, rgb.shape[1] - 1)
    return rgb[rows.astype(np.intp)[:, None], cols.astype(np.intp)[None, :]]


def _draw_crosshair(rgb: np.ndarray, row: float, col: float, gap: int,
                    color=(1.0, 0.15, 0.15)) -> None:
    """One-pixel red lines through (row, col), leaving a gap around it (in place)."""
    height, width = rgb.shape[:2]
    r, c = int(round(row)), int(round(col))
    if 0 <= c < width:
        keep = np.abs(np.arange(height) - r) > gap
        rgb[keep, c] = 0.35 * rgb[keep, c] + 0.65 * np.asarray(color)
    if 0 <= r < height:
        keep = np.abs(np.arange(width) - c) > gap
        rgb[r, keep] = 0.35 * rgb[r, keep] + 0.65 * np.asarray(color)


def _panel(rgb: np.ndarray, height_px: int, aspect: float,
           marker_rc: Sequence[float] | None) -> np.ndarray:
    """Resize a view to ``height_px`` rows keeping its physical ``aspect`` (row/col mm).

    The crosshair is drawn after resizing, so it stays one pixel wide at any zoom.
    """
    width_px = max(int(round(height_px * rgb.shape[1] / (rgb.shape[0] * aspect))), 1)
    out = _resize_nearest(rgb, height_px, width_px)
    if marker_rc is not None:
        row = (float(marker_rc[0]) + 0.5) * height_px / rgb.shape[0] - 0.5
        col = (float(marker_rc[1]) + 0.5) * width_px / rgb.shape[1] - 0.5
        _draw_crosshair(out, row, col, gap=max(height_px // 12, 3))
    return out


def _render(panels: Sequence[tuple[np.ndarray, str]], title: str | None) -> bytes:
    """Panels side by side on black with captions and a title, as PNG bytes.

    The picture is composed in NumPy and placed with one ``figimage`` (no axes), which
    renders ~20x faster than a grid of matplotlib axes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    margin, caption_px = 4, 14
    title_px = 18 if title else 0
    height = max(p.shape[0] for p, _ in panels)
    width = sum(p.shape[1] for p, _ in panels) + margin * (len(panels) + 1)
    canvas = np.zeros((title_px + caption_px + height + margin, width, 3), dtype=np.float32)
    dpi = 100
    figure = Figure(figsize=(width / dpi, canvas.shape[0] / dpi), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    x = margin
    for picture, caption in panels:
        top = title_px + caption_px
        canvas[top:top + picture.shape[0], x:x + picture.shape[1]] = picture
        if caption:
            figure.text((x + 1) / width, 1.0 - (title_px + caption_px - 2) / canvas.shape[0],
                        caption, color="white", fontsize=8, va="bottom", ha="left")
        x += picture.shape[1] + margin
    figure.figimage(np.clip(canvas, 0.0, 1.0), xo=0, yo=0, origin="upper")
    if title:
        figure.text(0.5, 1.0 - 2 / canvas.shape[0], title, color="white", fontsize=9,
                    va="top", ha="center")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="black")
    return buffer.getvalue()


def overlay_png(hu_slice: np.ndarray, mask_slice: np.ndarray | None,
                path: str | os.PathLike | None = None, *,
                marker_rc: Sequence[float] | None = None, title: str | None = None,
                window_hu: tuple[float, float] = (-1000.0, 400.0), size_px: int = 384,
                aspect: float = 1.0) -> bytes:
    """One CT slice with a mask overlay and an optional crosshair, as PNG bytes.

    hu_slice : (H, W) HU; mask_slice : (H, W) bool or None; ``aspect`` = row spacing /
    column spacing.  The slice is drawn ``size_px`` pixels high.  Writes ``path``
    atomically when given.
    """
    rgb = mask_overlay_rgb(hu_slice, mask_slice, window_hu=window_hu)
    data = _render([(_panel(rgb, size_px, aspect, marker_rc), "")], title)
    if path is not None:
        write_bytes_atomic(data, path)
    return data


def _crop_box(center: int, half: int, size: int) -> tuple[int, int]:
    """[start, stop) of a window of 2*half+1 around ``center``, shifted to fit in [0, size)."""
    width = min(2 * half + 1, size)
    start = min(max(center - half, 0), size - width)
    return start, start + width


def candidate_png(hu: np.ndarray, labels: np.ndarray, label: int, center_irc: Sequence[float],
                  path: str | os.PathLike | None = None, *,
                  spacing_irc: Sequence[float] = (1.0, 1.0, 1.0), title: str | None = None,
                  zoom_mm: float = 40.0, height_px: int = 200,
                  window_hu: tuple[float, float] = (-1000.0, 400.0)) -> bytes:
    """Four views of one candidate as PNG bytes (and written to ``path`` when given).

    hu : (I, R, C) HU; labels : (I, R, C) int, candidate ``label`` and others (> 0).
    Panels: the full axial slice through the centre with a crosshair, then zoomed axial,
    coronal and sagittal views (``zoom_mm`` wide) with physical aspect ratios.  The
    candidate is outlined yellow, other candidates cyan.
    """
    if hu.shape != labels.shape:
        raise ValueError(f"labels has shape {labels.shape}, expected {hu.shape}")
    shape = hu.shape
    ci, cr, cc = (int(np.clip(np.rint(v), 0, n - 1)) for v, n in zip(center_irc, shape))
    sp_i, sp_r, sp_c = (float(s) for s in spacing_irc)
    i0, i1 = _crop_box(ci, max(int(round(zoom_mm / 2 / sp_i)), 1), shape[0])
    r0, r1 = _crop_box(cr, max(int(round(zoom_mm / 2 / sp_r)), 1), shape[1])
    c0, c1 = _crop_box(cc, max(int(round(zoom_mm / 2 / sp_c)), 1), shape[2])

    def view(index, rows, cols) -> np.ndarray:
        block_hu = hu[index, rows, cols]
        block_lab = labels[index, rows, cols]
        return mask_overlay_rgb(block_hu, block_lab == label,
                                other_mask=(block_lab > 0) & (block_lab != label),
                                window_hu=window_hu)

    panels = [
        (_panel(view(ci, slice(None), slice(None)), height_px, sp_r / sp_c, (cr, cc)),
         f"axial {ci}"),
        (_panel(view(ci, slice(r0, r1), slice(c0, c1)), height_px, sp_r / sp_c,
                (cr - r0, cc - c0)), "axial zoom"),
        (_panel(view(slice(i0, i1), cr, slice(c0, c1)), height_px, sp_i / sp_c,
                (ci - i0, cc - c0)), "coronal"),
        (_panel(view(slice(i0, i1), slice(r0, r1), cc), height_px, sp_i / sp_r,
                (ci - i0, cr - r0)), "sagittal"),
    ]
    data = _render(panels, title)
    if path is not None:
        write_bytes_atomic(data, path)
    return data


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;
max-width:1240px}
h1{font-size:1.3em;overflow-wrap:anywhere} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:middle}
th{background:#f0f0f0} td.text{text-align:left}
table.info td{text-align:left;overflow-wrap:anywhere;max-width:1000px}
tr.views td{text-align:left;border-top:none}
img.thumb{max-width:100%;height:auto;display:block}
.note{color:#666;font-size:0.85em}
"""
# What the candidate views show (candidate_png's colours).
VIEWS_LEGEND = ("Views: the whole axial slice through the candidate's centre (red cross), "
                "then axial, coronal and sagittal close-ups 40 mm wide. Yellow outline: the "
                "candidate; cyan: other candidates.")


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_cell(v) for v in value) + ")"
    return html.escape(str(value))


def html_report(path: str | os.PathLike | None, *, title: str,
                scan_info: Mapping[str, Any], settings: Mapping[str, Any],
                candidates: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                thumbnails: Sequence[bytes | None] | None = None, note: str = "",
                heading: str | None = None) -> str:
    """A single HTML page (no external assets, fits 1280 px wide) with scan info, settings
    and a candidate table.

    ``candidates`` are dicts (one row each; ``columns`` picks and orders the keys shown);
    ``thumbnails[k]`` holds PNG bytes for row k, shown in a row of its own beneath it and
    embedded as a base64 data URI.  ``heading`` titles the table (default: the count).
    Returns the page and writes it atomically to ``path`` when given.
    """
    if columns is None:
        columns = list(candidates[0].keys()) if candidates else []
    if thumbnails is not None and len(thumbnails) > len(candidates):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(candidates)} candidates")

    def info_table(items: Mapping[str, Any]) -> str:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>"
                       for k, v in items.items())
        return f'<table class="info">{rows}</table>'

    header = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in columns)
    body_rows = []
    for k, row in enumerate(candidates):
        cells = "".join(
            f'<td class="text">{_cell(row.get(c, ""))}</td>' if isinstance(row.get(c), str)
            else f"<td>{_cell(row.get(c, ''))}</td>" for c in columns)
        body_rows.append(f"<tr>{cells}</tr>")
        png = thumbnails[k] if thumbnails is not None and k < len(thumbnails) else None
        if png:
            encoded = base64.b64encode(png).decode("ascii")
            body_rows.append(f'<tr class="views"><td colspan="{len(columns)}"><img '
                             f'class="thumb" alt="candidate {k}" '
                             f'src="data:image/png;base64,{encoded}"></td></tr>')
    table = (f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body_rows)}"
             f"</tbody></table>") if candidates else "<p>No candidates.</p>"
    notes = [note] if note else []
    if thumbnails:
        notes.append(VIEWS_LEGEND)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<h2>Scan</h2>{info_table(scan_info)}"
        f"<h2>Settings</h2>{info_table(settings)}"
        f"<h2>{html.escape(heading or f'Candidates: {len(candidates)}')}</h2>"
        + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
        + f"{table}</body></html>\n"
    )
    if path is not None:
        write_text_atomic(page, path)
    return page


# --------------------------------------------------------------------------- montages


@dataclass(eq=False)
class MontageScan:
    """What one montage row needs: voxels, geometry and nodules as (center_xyz, diameter_mm)."""

    hu: np.ndarray  # (I, R, C)
    geometry: Geometry
    series_uid: str
    nodules: list[tuple[np.ndarray, float]]
    mask: np.ndarray | None = None  # (I, R, C) bool, outlined when given


def _as_scan(item, masks: Mapping[str, np.ndarray] | None) -> MontageScan:
    """Accept a MontageScan, a synth.Phantom or anything with hu/geometry/series_uid/nodules."""
    if isinstance(item, MontageScan):
        return item
    nodules = [(np.asarray(n.center_xyz, float), float(n.diameter_mm))
               for n in getattr(item, "nodules", [])]
    mask = masks.get(item.series_uid) if masks else None
    return MontageScan(item.hu, item.geometry, item.series_uid, nodules, mask)


def scans_from_dataset(root: str | os.PathLike, max_scans: int = 6) -> list[MontageScan]:
    """The first ``max_scans`` series (sorted by UID) of a LUNA16-layout folder with nodules."""
    from lunaseg.ct import load_ct
    from lunaseg.luna import find_series, read_nodules

    root = Path(root)
    series = find_series(root)
    if not series:
        raise DataError(f"{root}: no subset*/<uid>.mhd series found")
    annotation_file = root / "annotations.csv"
    by_uid: dict[str, list[tuple[np.ndarray, float]]] = {}
    if annotation_file.exists():
        for nodule in read_nodules(annotation_file):
            by_uid.setdefault(nodule.series_uid, []).append(
                (np.asarray(nodule.center_xyz, float), float(nodule.diameter_mm)))
    scans = []
    for uid in sorted(series)[:max_scans]:
        ct = load_ct(series[uid], uid)
        scans.append(MontageScan(ct.hu, ct.geometry, uid, by_uid.get(uid, [])))
    return scans


def _pick_slices(scan: MontageScan, count: int) -> list[int]:
    """Nodule centre slices first (most useful to look at), then evenly spaced fill-ins."""
    depth = scan.hu.shape[0]
    chosen: list[int] = []
    for center_xyz, _ in scan.nodules:
        index = int(scan.geometry.xyz_to_irc(center_xyz)[0])
        if 0 <= index < depth and index not in chosen:
            chosen.append(index)
    for index in np.linspace(0.2 * depth, 0.8 * depth, count).round().astype(int):
        if len(chosen) >= count:
            break
        if int(index) not in chosen:
            chosen.append(int(index))
    return sorted(chosen[:count])


def render_montage(scans_or_dir, out_png: str | os.PathLike, *, slices_per_scan: int = 4,
                   max_scans: int = 6, masks: Mapping[str, np.ndarray] | None = None,
                   window_hu: tuple[float, float] = (-1000.0, 400.0),
                   title: str | None = None) -> Path:
    """Write a PNG montage: one row per scan, nodules circled (green), masks outlined (red).

    Each scan gets one row of slices (the slices through its nodules first, then evenly
    spaced ones) in a lung window; every annotated nodule a slice cuts is circled at the size
    the slice cuts it.

    ``scans_or_dir``: a LUNA16-layout folder, or an iterable of ``MontageScan`` / phantoms
    (objects with ``hu``, ``geometry``, ``series_uid`` and ``nodules``).  ``masks`` maps a
    series UID to a (I, R, C) bool mask to outline.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    if isinstance(scans_or_dir, (str, os.PathLike)):
        scans = scans_from_dataset(scans_or_dir, max_scans)
    else:
        scans = [_as_scan(item, masks) for item in list(_take(scans_or_dir, max_scans))]
    if not scans:
        raise DataError("render_montage: no scans to draw")
    if masks:
        for scan in scans:
            scan.mask = masks.get(scan.series_uid, scan.mask)
    cols = max(1, slices_per_scan)
    fig = Figure(figsize=(3.2 * cols, 3.3 * len(scans)))
    FigureCanvasAgg(fig)
    for row, scan in enumerate(scans):
        spacing = scan.geometry.spacing_xyz
        for col, index in enumerate(_pick_slices(scan, cols)):
            ax = fig.add_subplot(len(scans), cols, row * cols + col + 1)
            ax.imshow(scan.hu[index], cmap="gray", vmin=window_hu[0], vmax=window_hu[1],
                      interpolation="nearest", aspect=spacing[1] / spacing[0])
            z_mm = scan.geometry.irc_to_xyz(np.array([index, 0.0, 0.0]))[2]
            for center_xyz, diameter in scan.nodules:
                dz = abs(center_xyz[2] - z_mm)
                radius_mm = diameter / 2
                if dz > radius_mm + spacing[2] / 2:
                    continue
                cut_mm = np.sqrt(max(radius_mm ** 2 - dz ** 2, (0.3 * radius_mm) ** 2))
                irc = scan.geometry.xyz_to_irc_float(center_xyz)
                # The circle is drawn a little outside the nodule so it does not hide it.
                ax.add_patch(Circle((irc[2], irc[1]), cut_mm / spacing[0] + 3, fill=False,
                                    color="lime", linewidth=0.8))
            if scan.mask is not None and scan.mask[index].any():
                edge = scan.mask[index] & ~ndimage.binary_erosion(scan.mask[index])
                rows_, cols_ = np.nonzero(edge)
                ax.plot(cols_, rows_, ",", color="red")
            ax.set_title(f"{scan.series_uid[-8:]}  i={index}", fontsize=7)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    from matplotlib.lines import Line2D

    keys = [Line2D([], [], marker="o", markersize=8, markerfacecolor="none",
                   markeredgecolor="lime", linestyle="none",
                   label="annotated nodule (circled where the slice cuts it)")]
    if any(scan.mask is not None for scan in scans):
        keys.append(Line2D([], [], color="red", label="nodule mask outline"))
    fig.legend(handles=keys, loc="lower center", ncol=len(keys), fontsize=8, frameon=False)
    # Leave the top strip to the title and the bottom one to the legend.
    fig.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    out = Path(out_png)
    write_bytes_atomic(buffer.getvalue(), out)
    log.info("montage of %d scans written to %s", len(scans), out)
    return out


def _take(items: Iterable, count: int) -> Iterable:
    for k, item in enumerate(items):
        if k >= count:
            return
        yield item


# --------------------------------------------------------------------------- FROC


def plot_froc(result: "FrocResult", path_png: str | os.PathLike, *,
              title: str | None = None, compare: "FrocResult | None" = None,
              compare_label: str = "candidate stage alone") -> Path:
    """Draw the FROC curve (log FP/scan, CI band, operating points, CPM in the legend) to a PNG,
    with ``compare`` (e.g. the candidate stage under a classifier) dashed beside it.

    Uses Figure + FigureCanvasAgg directly: no pyplot global state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path_png)
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    rates = np.array(result.fp_rates)
    left = min(0.125, float(rates.min())) / 1.5
    right = max(8.0, float(rates.max())) * 1.5
    if result.band_fps is not None:
        axes.fill_between(result.band_fps, result.band_lo, result.band_hi, color="tab:blue",
                          alpha=0.2, linewidth=0, label="95% CI (bootstrap)")
    # Clip the curve to the visible range, reading its ends the way sensitivities are read.
    inside = (result.fps_per_scan > left) & (result.fps_per_scan < right)
    edges = result.curve_at([left, right])
    fps = np.concatenate([[left], result.fps_per_scan[inside], [right]])
    sens = np.concatenate([[edges[0]], result.sensitivity[inside], [edges[1]]])
    label = f"CPM = {result.cpm:.3f}" if math.isfinite(result.cpm) else "CPM = n/a"
    if result.cpm_ci is not None:
        label += f" (95% CI {result.cpm_ci[0]:.3f}-{result.cpm_ci[1]:.3f})"
    axes.plot(fps, sens, color="tab:blue", linewidth=1.5, label=label,
              drawstyle="steps-post" if result.interpolation == "step" else "default")
    axes.plot(rates, [result.sensitivities_at[float(r)] for r in rates], "o",
              color="tab:blue", markersize=4)
    if compare is not None:
        keep = (compare.fps_per_scan > left) & (compare.fps_per_scan < right)
        ends = compare.curve_at([left, right])
        axes.plot(np.concatenate([[left], compare.fps_per_scan[keep], [right]]),
                  np.concatenate([[ends[0]], compare.sensitivity[keep], [ends[1]]]),
                  color="tab:gray", linestyle="--", linewidth=1.2,
                  label=f"{compare_label}: CPM = {compare.cpm:.3f}",
                  drawstyle="steps-post" if compare.interpolation == "step" else "default")
    axes.set_xscale("log")
    axes.set_xlim(left, right)
    axes.set_ylim(0.0, 1.02)
    axes.set_xticks(rates)
    axes.set_xticklabels([f"{r:g}" for r in rates])
    axes.set_xlabel("Average false positives per scan")
    axes.set_ylabel("Sensitivity")
    axes.grid(True, which="major", alpha=0.4)
    axes.set_title(title or f"FROC: {result.n_nodules} nodules in {result.n_scans} scans")
    axes.legend(loc="upper left")  # FROC curves rise to the right, so this corner is free
    figure.tight_layout()
    write_atomic(path, lambda handle: figure.savefig(handle, format="png"))
    return path
