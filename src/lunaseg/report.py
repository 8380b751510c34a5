"""Pictures and pages for people: CT overlays (PNG, RGB arrays) and a self-contained HTML report.

Rendering uses matplotlib's object API (``Figure`` + ``FigureCanvasAgg``) and never touches
pyplot, so it is thread-safe, needs no display and leaves no global figure state behind.
All colour composition happens in NumPy; matplotlib only lays out panels, titles and lines.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from lunaseg.files import write_bytes_atomic, write_text_atomic

__all__ = [
    "window_gray", "overlay_rgb", "mask_overlay_rgb", "overlay_png", "candidate_png",
    "html_report",
    "COLOR_FALSE_POSITIVE", "COLOR_FALSE_NEGATIVE", "COLOR_TRUE_POSITIVE",
]

# Book colours for training images: false positives red, false negatives orange, hits green.
COLOR_FALSE_POSITIVE = (1.0, 0.0, 0.0)
COLOR_FALSE_NEGATIVE = (1.0, 0.5, 0.0)
COLOR_TRUE_POSITIVE = (0.0, 1.0, 0.0)
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
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:middle}
th{background:#f0f0f0} td.text{text-align:left}
table.info td{text-align:left}
img.thumb{height:150px;display:block}
.note{color:#666;font-size:0.85em}
"""


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
                thumbnails: Sequence[bytes | None] | None = None, note: str = "") -> str:
    """A single HTML page (no external assets) with scan info, settings and a candidate table.

    ``candidates`` are dicts (one row each; ``columns`` picks and orders the keys shown);
    ``thumbnails[k]`` holds PNG bytes for row k, embedded as base64 data URIs.
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

    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    if thumbnails is not None:
        header += "<th>views</th>"
    body_rows = []
    for k, row in enumerate(candidates):
        cells = "".join(
            f'<td class="text">{_cell(row.get(c, ""))}</td>' if isinstance(row.get(c), str)
            else f"<td>{_cell(row.get(c, ''))}</td>" for c in columns)
        if thumbnails is not None:
            png = thumbnails[k] if k < len(thumbnails) else None
            if png:
                encoded = base64.b64encode(png).decode("ascii")
                cells += f'<td><img class="thumb" alt="candidate {k}" ' \
                         f'src="data:image/png;base64,{encoded}"></td>'
            else:
                cells += "<td></td>"
        body_rows.append(f"<tr>{cells}</tr>")
    table = (f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body_rows)}"
             f"</tbody></table>") if candidates else "<p>No candidates.</p>"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<h2>Scan</h2>{info_table(scan_info)}"
        f"<h2>Settings</h2>{info_table(settings)}"
        f"<h2>Candidates ({len(candidates)})</h2>"
        + (f'<p class="note">{html.escape(note)}</p>' if note else "")
        + f"{table}</body></html>\n"
    )
    if path is not None:
        write_text_atomic(page, path)
    return page
