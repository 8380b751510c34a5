"""Montages of CT slices with nodule annotations: a quick look at phantoms or a dataset.

Each scan gets one row of slices (the slices through its nodules first, then evenly spaced
ones), shown in a lung window; every annotated nodule cut by a slice is circled at the size
the slice cuts it, and an optional mask is outlined.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage

from lunaseg.errors import DataError
from lunaseg.files import write_bytes_atomic
from lunaseg.geometry import Geometry

__all__ = ["MontageScan", "render_montage", "scans_from_dataset"]

log = logging.getLogger(__name__)


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
    # Leave the top strip to the title so it does not cover the first row's labels.
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
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
