"""Import LIDC-IDRI scans (a DICOM series plus its reader XML) into the LUNA16 layout.

Each scan becomes ``subset{N}/<series-uid>.mhd`` (int16 HU, geometry from the DICOM), rows in
``annotations.csv``, ``annotations_with_malignancy.csv`` and ``annotations_excluded.csv``,
and a uint8 reader-outline mask at ``masks/<series-uid>.mha`` whose values are the nodules'
classes (1 benign, 2 malignant: ``lunaseg.masks``).

Conventions (the LIDC XML leaves these open; each is a decision, kept in one place):

* Edge-map points are pixel centres (x = column, y = row) on the slice named by the roi's
  ``imageSOP_UID``; when no file has that UID the roi's ``imageZposition`` is matched against
  the slice positions.  A roi whose slice lies outside the scanned slab is skipped with a note
  (a partial download can cut a nodule); one whose z lies inside the slab but matches no slice
  is an error.
* A reader's outline region on a slice is every pixel whose centre lies inside the polygon
  through the edge points, without the edge pixels: LIDC readers were told to draw the outline
  just outside the nodule (an outline with no interior pixel keeps its edge pixels).
  ``inclusion=FALSE`` rois cut holes, edge pixels included (that outline lies in the hole).
* Readers' marks of one nodule are grouped when their outline regions share a voxel or their
  centres lie closer than the larger of the two radii.  A nodule is accepted when at least
  ``min_readers`` readers outlined it (LUNA16 used 3 of 4).  Per reader, the largest of its
  marks in a group represents it (a reader may split a nodule in two).
* Centre = mean over readers of the centroid of each reader's outline region.  Diameter =
  mean over readers of the equivalent diameter (of the circle with the same area) of the
  reader's widest slice; on LIDC-IDRI-0001 this gives 23.9 mm against LUNA16's 23.35 mm.
  Bounding box = the extent of the 50 % consensus region (voxel centres), as in the book's
  ``annotations_with_malignancy.csv``.
* Malignancy: ``mal_details`` lists each reader's rating (readers without one are left out);
  ``mal_bool`` is True when at least two ratings are >= 4, as in the book's CSV.
* Excluded findings: outlined nodules with fewer than ``min_readers`` readers (size from the
  outlines), and single-point marks (nodules < 3 mm and non-nodules) grouped across readers
  within ``POINT_GROUP_MM``, written with ``diameter_mm = -1`` (size unknown; the LUNA16
  evaluation kit gives such findings a default size).  Point marks that fall inside an
  outlined nodule are dropped: that nodule's row already covers them.
* The outline mask keeps, for every accepted nodule, the voxels inside the outlines of at least
  half of the readers who outlined it (the usual 50 % consensus), labelled with the nodule's
  class (malignant when its ``mal_bool`` is True); where two nodules' consensus regions
  overlap, malignant wins.
* Re-importing a series replaces that series' rows in the CSVs and leaves other rows alone.
"""

from __future__ import annotations

import csv
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lunaseg import ct as ct_io
from lunaseg import luna
from lunaseg.config import LidcConfig
from lunaseg.errors import ConfigError, DataError
from lunaseg.files import write_csv
from lunaseg.geometry import Geometry
from lunaseg.progress import bar as progress_bar

__all__ = [
    "Roi", "ReaderMark", "ReaderSession", "LidcXml", "ConsensusNodule", "ExcludedFinding",
    "ScanAnnotations", "ImportedScan", "ImportSummary", "parse_lidc_xml", "find_lidc_xml",
    "annotate_scan", "outline_mask", "import_lidc", "NAMESPACE", "POINT_GROUP_MM",
    "EXCLUDED_COLUMNS",
]

log = logging.getLogger(__name__)

NAMESPACE = "http://www.nih.gov"
_NS = {"n": NAMESPACE}
POINT_GROUP_MM = 5.0  # single-point marks of different readers closer than this are one finding
UNKNOWN_DIAMETER_MM = -1.0  # LUNA16's value for excluded findings without a size
EXCLUDED_COLUMNS = luna.ANNOTATION_COLUMNS
_SOP_UID_TAG = "0008|0018"
_HEAD_BYTES = 4096  # enough of a file's start to see its root element


# --------------------------------------------------------------------------------------
# XML model and parser


@dataclass(frozen=True)
class Roi:
    """One outline (or one point) on one slice, in the slice's pixel coordinates."""

    z_mm: float  # imageZposition: the slice's position along the patient axis
    sop_uid: str  # imageSOP_UID: the DICOM file (slice) it was drawn on
    inclusion: bool  # False: the outline encloses a hole of the nodule
    points_xy: np.ndarray  # (N, 2) int64 pixel (x = column, y = row)


@dataclass(frozen=True)
class ReaderMark:
    """One reader's mark: an outlined nodule (>= 3 mm), a small nodule or a non-nodule."""

    kind: str  # "nodule", "small" or "non-nodule"
    mark_id: str
    rois: tuple[Roi, ...]
    malignancy: int | None = None  # 1-5; only outlined nodules are rated


@dataclass(frozen=True)
class ReaderSession:
    """All marks of one radiologist's reading."""

    reader_id: str
    marks: tuple[ReaderMark, ...]


@dataclass(frozen=True)
class LidcXml:
    """The parts of an LIDC ``LidcReadMessage`` file that the import uses."""

    path: Path
    series_uid: str
    sessions: tuple[ReaderSession, ...]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(element: ET.Element, name: str, path: Path, what: str) -> str:
    child = element.find(f"n:{name}", _NS)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{path}: {what} has no <{name}>")
    return child.text.strip()


def _number(text: str, path: Path, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}: {what} is not a number: {text!r}") from None
    if not np.isfinite(value):
        raise DataError(f"{path}: {what} is not finite: {text!r}")
    return value


def _points(element: ET.Element, tag: str, path: Path, what: str) -> np.ndarray:
    points = []
    for point in element.findall(f"n:{tag}", _NS):
        x = _number(_text(point, "xCoord", path, what), path, f"{what} xCoord")
        y = _number(_text(point, "yCoord", path, what), path, f"{what} yCoord")
        points.append((round(x), round(y)))
    if not points:
        raise DataError(f"{path}: {what} has no <{tag}> points")
    return np.asarray(points, dtype=np.int64).reshape(-1, 2)


def _roi(element: ET.Element, path: Path, what: str) -> Roi:
    z_mm = _number(_text(element, "imageZposition", path, what), path, f"{what} imageZposition")
    sop_uid = _text(element, "imageSOP_UID", path, what)
    inclusion_text = element.findtext("n:inclusion", default="TRUE", namespaces=_NS).strip()
    if inclusion_text.upper() not in ("TRUE", "FALSE"):
        raise DataError(f"{path}: {what} inclusion must be TRUE or FALSE, got {inclusion_text!r}")
    return Roi(z_mm, sop_uid, inclusion_text.upper() == "TRUE",
               _points(element, "edgeMap", path, what))


def _nodule(element: ET.Element, path: Path, session: int) -> ReaderMark:
    mark_id = element.findtext("n:noduleID", default="?", namespaces=_NS).strip()
    what = f"reading session {session} nodule {mark_id!r}"
    rois = tuple(_roi(roi, path, f"{what} roi") for roi in element.findall("n:roi", _NS))
    if not rois:
        raise DataError(f"{path}: {what} has no <roi>")
    malignancy = None
    rating = element.findtext("n:characteristics/n:malignancy", default="", namespaces=_NS)
    if rating.strip():
        value = _number(rating, path, f"{what} malignancy")
        if value not in (1, 2, 3, 4, 5):
            raise DataError(f"{path}: {what} malignancy must be 1-5, got {rating.strip()!r}")
        malignancy = int(value)
    # Nodules < 3 mm are marked with one point on one slice and carry no outline; everything
    # with a real outline on some slice is a nodule >= 3 mm.
    is_point = all(len(roi.points_xy) == 1 for roi in rois) and len(rois) == 1
    return ReaderMark("small" if is_point else "nodule", mark_id, rois, malignancy)


def _non_nodule(element: ET.Element, path: Path, session: int) -> ReaderMark:
    mark_id = element.findtext("n:nonNoduleID", default="?", namespaces=_NS).strip()
    what = f"reading session {session} non-nodule {mark_id!r}"
    z_mm = _number(_text(element, "imageZposition", path, what), path, f"{what} imageZposition")
    sop_uid = _text(element, "imageSOP_UID", path, what)
    roi = Roi(z_mm, sop_uid, True, _points(element, "locus", path, what))
    return ReaderMark("non-nodule", mark_id, (roi,))


def parse_lidc_xml(path: str | os.PathLike) -> LidcXml:
    """Read the reading sessions of one LIDC XML file (raises DataError naming the file)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise DataError(f"{path}: malformed XML ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    if _local(root.tag) != "LidcReadMessage":
        raise DataError(f"{path}: not an LIDC reader file (root element <{_local(root.tag)}>, "
                        "expected <LidcReadMessage>)")
    series_uid = ""
    header = root.find("n:ResponseHeader", _NS)
    if header is not None:
        # The tag's case differs between LIDC XML versions.
        for child in header:
            if _local(child.tag).lower() == "seriesinstanceuid" and child.text:
                series_uid = child.text.strip()
    if not series_uid:
        raise DataError(f"{path}: no <SeriesInstanceUid> in <ResponseHeader>")
    sessions = []
    for number, element in enumerate(root.findall("n:readingSession", _NS), start=1):
        reader_id = element.findtext("n:servicingRadiologistID", default="",
                                     namespaces=_NS).strip() or f"session {number}"
        marks = [_nodule(n, path, number) for n in element.findall("n:unblindedReadNodule", _NS)]
        marks += [_non_nodule(n, path, number) for n in element.findall("n:nonNodule", _NS)]
        sessions.append(ReaderSession(reader_id, tuple(marks)))
    return LidcXml(path, series_uid, tuple(sessions))


def _is_lidc_xml(path: Path) -> bool:
    """Cheap check on the file's start, so a tree with other XML files can be walked."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return False
    return b"<LidcReadMessage" in head or b":LidcReadMessage" in head


def find_lidc_xml(source: str | os.PathLike) -> list[Path]:
    """LIDC reader XML files in ``source`` (a file, a scan folder or a tree), sorted."""
    source = Path(source)
    if source.is_file():
        return [source] if _is_lidc_xml(source) else []
    found = []
    for folder, _, names in os.walk(source):
        for name in names:
            if name.lower().endswith(".xml") and _is_lidc_xml(Path(folder) / name):
                found.append(Path(folder) / name)
    return sorted(found)


# --------------------------------------------------------------------------------------
# Slices: which volume index a roi was drawn on


class _Slices:
    """Maps a roi to a slice index of the loaded CT, by SOP instance UID or by z."""

    def __init__(self, geometry: Geometry, shape_irc: tuple[int, int, int],
                 sop_to_index: dict[str, int]) -> None:
        self.geometry = geometry
        self.shape_irc = shape_irc
        self.sop_to_index = sop_to_index
        # imageZposition is the z of the slice's first pixel (ImagePositionPatient), which
        # moves by this much per slice index.
        self.z_step = float(geometry.direction[2, 2] * geometry.spacing_xyz[2])
        self.z0 = float(geometry.origin_xyz[2])

    def index_of(self, roi: Roi, xml_path: Path) -> int | None:
        """The roi's slice index, None when it lies outside the slab; DataError if missing."""
        index = self.sop_to_index.get(roi.sop_uid)
        if index is not None:
            return index
        count = self.shape_irc[0]
        if abs(self.z_step) < 1e-6:
            raise DataError(f"{xml_path}: slice {roi.sop_uid} is not in the DICOM folder and "
                            "the slices are not stacked along z, so its z cannot be matched")
        position = (roi.z_mm - self.z0) / self.z_step
        nearest = int(round(position))
        if 0 <= nearest < count and abs(position - nearest) <= 0.25:
            return nearest  # a re-anonymised copy may carry other SOP UIDs; z still matches
        if position < -0.5 or position > count - 0.5:
            return None
        raise DataError(f"{xml_path}: slice at z {roi.z_mm:g} mm (SOP {roi.sop_uid}) lies inside "
                        "the scan but is missing from the DICOM folder")


def _sitk():
    import SimpleITK as sitk  # imported lazily so `lunaseg --help` stays instant

    return sitk


def _read_sop_uids(files: Sequence[str], geometry: Geometry, folder: Path) -> dict[str, int]:
    """SOP instance UID -> slice index, the index taken from each file's own position."""
    sitk = _sitk()
    mapping: dict[str, int] = {}
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise DataError(f"{name}: cannot read DICOM header") from None
        if not reader.HasMetaDataKey(_SOP_UID_TAG):
            continue
        index = int(round(geometry.xyz_to_irc_float(np.asarray(reader.GetOrigin()))[0]))
        mapping[reader.GetMetaData(_SOP_UID_TAG).strip().rstrip("\x00")] = index
    if not mapping:
        log.warning("%s: no slice has a SOP instance UID; matching outlines by z only", folder)
    return mapping


def _find_series_folder(xml_path: Path, series_uid: str) -> tuple[Path, tuple[str, ...]]:
    """The folder next to or below the XML that holds the DICOM series ``series_uid``."""
    sitk = _sitk()
    for folder, dirs, names in os.walk(xml_path.parent):
        dirs.sort()
        if not any(not name.lower().endswith(".xml") for name in names):
            continue
        if series_uid in (sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ()):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)
            return Path(folder), tuple(files)
    raise DataError(f"{xml_path}: DICOM series {series_uid} not found in {xml_path.parent} "
                    "or its subfolders")


# --------------------------------------------------------------------------------------
# Outlines -> voxels


def _fill_outline(points_xy: np.ndarray, shape_rc: tuple[int, int], *,
                  with_edge: bool) -> np.ndarray:
    """Boolean (R, C) slice: pixel centres inside the polygon through the points.

    LIDC readers were told to draw the outline just outside the nodule, so the edge pixels
    belong to the nodule only with ``with_edge`` (used for holes, whose outline lies in the
    hole) or when the polygon has no interior pixel at all (a tiny outline must not vanish).
    """
    from matplotlib.path import Path as Polygon  # imported here: only the import needs it

    rows, cols = shape_rc
    filled = np.zeros(shape_rc, dtype=bool)
    x, y = points_xy[:, 0], points_xy[:, 1]
    if len(points_xy) >= 3:
        c0, c1 = max(int(x.min()), 0), min(int(x.max()), cols - 1)
        r0, r1 = max(int(y.min()), 0), min(int(y.max()), rows - 1)
        if c0 <= c1 and r0 <= r1:
            rr, cc = np.mgrid[r0:r1 + 1, c0:c1 + 1]
            inside = Polygon(points_xy.astype(np.float64)).contains_points(
                np.column_stack([cc.ravel(), rr.ravel()]).astype(np.float64))
            filled[r0:r1 + 1, c0:c1 + 1] = inside.reshape(rr.shape)
    on_image = (x >= 0) & (x < cols) & (y >= 0) & (y < rows)
    edge = np.zeros(shape_rc, dtype=bool)
    edge[y[on_image], x[on_image]] = True
    if with_edge:
        return filled | edge
    interior = filled & ~edge
    return interior if interior.any() else edge


@dataclass(frozen=True)
class _Outline:
    """One reader's outlined nodule, resolved to voxels of the loaded CT."""

    reader: int  # index of the reading session
    mark: ReaderMark
    voxels: np.ndarray  # (N,) int64 sorted linear voxel indices of the filled region
    points_irc: np.ndarray  # (M, 3) float64 outline points (inclusion rois) in voxel space
    centroid_xyz: np.ndarray
    diameter_mm: float


def _resolve_outline(mark: ReaderMark, reader: int, slices: _Slices,
                     xml_path: Path) -> tuple[_Outline | None, int]:
    """The mark's region in the loaded CT (None if nothing of it is there), rois skipped."""
    shape = slices.shape_irc
    by_slice: dict[int, list[Roi]] = {}
    skipped = 0
    for roi in mark.rois:
        index = slices.index_of(roi, xml_path)
        if index is None:
            skipped += 1
            continue
        by_slice.setdefault(index, []).append(roi)
    if skipped:
        log.info("%s: reader %d nodule %r: %d of %d outline(s) lie outside the scanned slab "
                 "and were skipped", xml_path, reader + 1, mark.mark_id, skipped, len(mark.rois))
    voxels, points = [], []
    largest_area = 0
    for index, rois in sorted(by_slice.items()):
        region = np.zeros(shape[1:], dtype=bool)
        for roi in sorted(rois, key=lambda r: not r.inclusion):  # holes after the outlines
            filled = _fill_outline(roi.points_xy, shape[1:], with_edge=not roi.inclusion)
            if roi.inclusion:
                region |= filled
                points.append(np.column_stack([np.full(len(roi.points_xy), index),
                                               roi.points_xy[:, 1], roi.points_xy[:, 0]]))
            else:
                region &= ~filled
        voxels.append(np.flatnonzero(region) + index * shape[1] * shape[2])
        largest_area = max(largest_area, int(region.sum()))
    if not voxels or not points:
        return None, skipped
    voxels_all = np.unique(np.concatenate(voxels))
    if voxels_all.size == 0:
        return None, skipped
    irc = np.column_stack(np.unravel_index(voxels_all, shape)).astype(np.float64)
    centroid_xyz = slices.geometry.irc_to_xyz(irc.mean(axis=0))
    # Equivalent diameter of the widest slice: robust to a slab that cuts the nodule, unlike
    # a volume-based size, and less sensitive to spiculated edges than the longest chord.
    pixel_mm2 = float(slices.geometry.spacing_xyz[0] * slices.geometry.spacing_xyz[1])
    diameter_mm = 2.0 * np.sqrt(largest_area * pixel_mm2 / np.pi)
    outline = _Outline(reader, mark, voxels_all, np.concatenate(points).astype(np.float64),
                       centroid_xyz, float(diameter_mm))
    return outline, skipped


# --------------------------------------------------------------------------------------
# Grouping readers' marks into nodules


@dataclass(frozen=True)
class ConsensusNodule:
    """A nodule outlined by several readers (accepted or not), in patient mm."""

    center_xyz: tuple[float, float, float]
    diameter_mm: float
    bbox_low_xyz: tuple[float, float, float]
    bbox_high_xyz: tuple[float, float, float]
    malignancy: tuple[int, ...]  # one rating per reader who gave one
    readers: int

    @property
    def is_malignant(self) -> bool:
        """The book's rule: at least two readers rated malignancy 4 or 5."""
        return sum(rating >= 4 for rating in self.malignancy) >= 2


@dataclass(frozen=True)
class ExcludedFinding:
    """An irrelevant finding (LUNA16 sense): diameter -1 when its size is unknown."""

    center_xyz: tuple[float, float, float]
    diameter_mm: float
    reason: str  # "few readers", "small nodule" or "non-nodule"


@dataclass
class ScanAnnotations:
    """Everything the import derives from one scan's XML."""

    nodules: list[ConsensusNodule] = field(default_factory=list)
    excluded: list[ExcludedFinding] = field(default_factory=list)
    # (I, R, C) uint8: 50 % outline consensus of the accepted nodules, each voxel with its
    # nodule's class (1 benign, 2 malignant), 0 elsewhere
    classes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.uint8))
    skipped_rois: int = 0

    @property
    def mask(self) -> np.ndarray:
        """(I, R, C) bool: the accepted nodules' consensus voxels, whatever their class."""
        return self.classes > 0


def _group(outlines: list[_Outline]) -> list[list[_Outline]]:
    """Link marks of different readers that overlap or lie close; connected sets are nodules."""
    parent = list(range(len(outlines)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(outlines):
        for j in range(i + 1, len(outlines)):
            b = outlines[j]
            if a.reader == b.reader:
                continue  # one reader's separate marks are separate nodules to that reader
            close = (np.linalg.norm(a.centroid_xyz - b.centroid_xyz)
                     < max(a.diameter_mm, b.diameter_mm) / 2)
            if close or np.intersect1d(a.voxels, b.voxels, assume_unique=True).size:
                parent[root(j)] = root(i)
    groups: dict[int, list[_Outline]] = {}
    for i, outline in enumerate(outlines):
        groups.setdefault(root(i), []).append(outline)
    return list(groups.values())


def _per_reader(group: list[_Outline]) -> dict[int, list[_Outline]]:
    readers: dict[int, list[_Outline]] = {}
    for outline in group:
        readers.setdefault(outline.reader, []).append(outline)
    return readers


def _summarise(group: list[_Outline], geometry: Geometry,
               shape_irc: tuple[int, int, int]) -> tuple[ConsensusNodule, np.ndarray]:
    """The group's nodule row and its 50 % consensus voxels (linear indices)."""
    readers = _per_reader(group)
    # The reader's largest mark stands for that reader (a nodule split in two by one reader
    # must not count twice).
    chosen = [max(marks, key=lambda o: o.voxels.size) for _, marks in sorted(readers.items())]
    center = np.mean([o.centroid_xyz for o in chosen], axis=0)
    diameter = float(np.mean([o.diameter_mm for o in chosen]))
    consensus = _consensus_voxels(group)
    if consensus.size:
        # Like the book's CSV: the box of the consensus region, in voxel-centre mm.
        irc = np.column_stack(np.unravel_index(consensus, shape_irc))
        points_xyz = geometry.irc_to_xyz(irc)
    else:  # readers that touch but share no majority voxel: the box of all outlines
        points_xyz = geometry.irc_to_xyz(np.concatenate([o.points_irc for o in group]))
    ratings = tuple(o.mark.malignancy for o in chosen if o.mark.malignancy is not None)
    nodule = ConsensusNodule(_triple(center), diameter, _triple(points_xyz.min(axis=0)),
                             _triple(points_xyz.max(axis=0)), ratings, len(readers))
    return nodule, consensus


def _triple(values: Iterable[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _consensus_voxels(group: list[_Outline]) -> np.ndarray:
    """Linear indices of voxels inside the outlines of at least half of the group's readers."""
    readers = _per_reader(group)
    votes = np.concatenate([np.unique(np.concatenate([o.voxels for o in marks]))
                            for marks in readers.values()])
    voxels, counts = np.unique(votes, return_counts=True)
    return voxels[2 * counts >= len(readers)]


def _point_findings(points: list[tuple[int, str, np.ndarray]],
                    outlined: list[ConsensusNodule]) -> list[ExcludedFinding]:
    """Group single-point marks of different readers; drop those inside outlined nodules."""
    kept = []
    for reader, kind, xyz in points:
        inside = any(np.linalg.norm(xyz - np.asarray(n.center_xyz)) <= n.diameter_mm / 2
                     for n in outlined)
        if not inside:
            kept.append((reader, kind, xyz))
    groups: list[list[tuple[int, str, np.ndarray]]] = []
    for mark in kept:
        # Greedy: join the first group within reach that this reader has not marked yet.
        for group in groups:
            centre = np.mean([m[2] for m in group], axis=0)
            if (np.linalg.norm(mark[2] - centre) < POINT_GROUP_MM
                    and all(m[0] != mark[0] for m in group)):
                group.append(mark)
                break
        else:
            groups.append([mark])
    findings = []
    for group in groups:
        kinds = {m[1] for m in group}
        reason = "small nodule" if "small" in kinds else "non-nodule"
        findings.append(ExcludedFinding(_triple(np.mean([m[2] for m in group], axis=0)),
                                        UNKNOWN_DIAMETER_MM, reason))
    return findings


def annotate_scan(reading: LidcXml, geometry: Geometry, shape_irc: tuple[int, int, int],
                  sop_to_index: dict[str, int], *, min_readers: int = 3) -> ScanAnnotations:
    """Consensus nodules, excluded findings and the outline mask of one scan.

    ``sop_to_index`` maps the SOP instance UIDs of the loaded slices to their index in the
    (I, R, C) volume described by ``geometry`` and ``shape_irc``.
    """
    slices = _Slices(geometry, shape_irc, sop_to_index)
    outlines: list[_Outline] = []
    points: list[tuple[int, str, np.ndarray]] = []
    skipped = 0
    for reader, session in enumerate(reading.sessions):
        for mark in session.marks:
            if mark.kind == "nodule":
                outline, outside = _resolve_outline(mark, reader, slices, reading.path)
                skipped += outside
                if outline is not None:
                    outlines.append(outline)
                continue
            roi = mark.rois[0]
            index = slices.index_of(roi, reading.path)
            if index is None:
                skipped += 1
                continue
            x, y = roi.points_xy[0]
            points.append((reader, mark.kind, geometry.irc_to_xyz(np.array([index, y, x]))))
    classes = np.zeros(shape_irc, dtype=np.uint8)
    result = ScanAnnotations(classes=classes, skipped_rois=skipped)
    outlined = []
    for group in _group(outlines):
        nodule, consensus = _summarise(group, geometry, shape_irc)
        outlined.append(nodule)
        if nodule.readers >= min_readers:
            result.nodules.append(nodule)
            flat = classes.reshape(-1)
            flat[consensus] = np.maximum(flat[consensus], luna.nodule_class(nodule.is_malignant))
        else:
            result.excluded.append(ExcludedFinding(nodule.center_xyz, nodule.diameter_mm,
                                                   "few readers"))
    result.excluded += _point_findings(points, outlined)
    # A stable order (z, y, x) keeps the CSVs identical between runs.
    result.nodules.sort(key=lambda n: n.center_xyz[::-1])
    result.excluded.sort(key=lambda n: n.center_xyz[::-1])
    return result


def outline_mask(reading: LidcXml | str | os.PathLike, geometry: Geometry,
                 shape_irc: tuple[int, int, int], sop_to_index: dict[str, int] | None = None,
                 *, min_readers: int = 3) -> np.ndarray:
    """Boolean (I, R, C) mask: 50 % reader consensus of every nodule with >= min_readers.

    Without ``sop_to_index`` outlines are placed by their z position alone.
    """
    if not isinstance(reading, LidcXml):
        reading = parse_lidc_xml(reading)
    return annotate_scan(reading, geometry, shape_irc, sop_to_index or {},
                         min_readers=min_readers).mask


# --------------------------------------------------------------------------------------
# Import: CT + CSVs + masks


@dataclass(frozen=True)
class ImportedScan:
    """One scan written by ``import_lidc``."""

    series_uid: str
    xml_path: Path
    ct_path: Path
    mask_path: Path
    nodules: int
    excluded: int
    skipped_rois: int


@dataclass
class ImportSummary:
    """What ``import_lidc`` did: scans written and scans that failed (path, one-line reason)."""

    out_dir: Path
    scans: list[ImportedScan] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def imported(self) -> list[str]:
        return [scan.series_uid for scan in self.scans]

    @property
    def nodules(self) -> int:
        return sum(scan.nodules for scan in self.scans)


_CSV_FILES = {
    "annotations.csv": luna.ANNOTATION_COLUMNS,
    "annotations_with_malignancy.csv": luna.MALIGNANCY_COLUMNS,
    "annotations_excluded.csv": EXCLUDED_COLUMNS,
}


def _number_text(value: float) -> str:
    return repr(round(float(value), 4))


def _rows(uid: str, annotations: ScanAnnotations) -> dict[str, list[list[str]]]:
    plain, malignancy, excluded = [], [], []
    for nodule in annotations.nodules:
        base = [uid, *map(_number_text, nodule.center_xyz), _number_text(nodule.diameter_mm)]
        plain.append(base)
        malignancy.append(base + [
            str(nodule.is_malignant), "[" + ", ".join(map(str, nodule.malignancy)) + "]",
            *map(_number_text, nodule.bbox_low_xyz), *map(_number_text, nodule.bbox_high_xyz),
            str(len(nodule.malignancy))])
    for finding in annotations.excluded:
        excluded.append([uid, *map(_number_text, finding.center_xyz),
                         _number_text(finding.diameter_mm)])
    return {"annotations.csv": plain, "annotations_with_malignancy.csv": malignancy,
            "annotations_excluded.csv": excluded}


def _read_table(path: Path, columns: Sequence[str]) -> list[list[str]]:
    if not path.exists():
        return []
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, csv.Error) as error:
        raise DataError(f"{path}: cannot read the existing CSV ({error})") from None
    if not rows:
        return []
    if tuple(rows[0]) != tuple(columns):
        raise DataError(f"{path}: existing file has columns {','.join(rows[0])}; expected "
                        f"{','.join(columns)} (import into another --out folder)")
    return [row for row in rows[1:] if row]


class _Tables:
    """The three CSVs of ``out_dir``, rewritten (atomically) after every imported scan."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows = {name: _read_table(out_dir / name, columns)
                     for name, columns in _CSV_FILES.items()}

    def replace(self, uid: str, new_rows: dict[str, list[list[str]]]) -> None:
        for name, columns in _CSV_FILES.items():
            kept = [row for row in self.rows[name] if row[0] != uid]
            # Sorted by series (stable within a series), so re-runs give identical files.
            self.rows[name] = sorted(kept + new_rows[name], key=lambda row: row[0])
            write_csv(self.out_dir / name, columns, self.rows[name])


def _remove_other_copies(out_dir: Path, uid: str, keep: Path) -> None:
    """A series re-imported into another subset must not stay behind in the old one."""
    for header in out_dir.glob(f"subset*/{uid}.mhd"):
        if header.resolve() != keep.resolve():
            log.info("%s: series re-imported into %s; removing the old copy", header, keep.parent)
            header.with_suffix(".raw").unlink(missing_ok=True)
            header.with_suffix(".zraw").unlink(missing_ok=True)
            header.unlink(missing_ok=True)


def _import_scan(xml_path: Path, out_dir: Path, subset: int,
                 min_readers: int) -> tuple[ImportedScan, ScanAnnotations]:
    reading = parse_lidc_xml(xml_path)
    folder, files = _find_series_folder(xml_path, reading.series_uid)
    ct = ct_io.load_ct(folder, reading.series_uid)
    sop_to_index = _read_sop_uids(files, ct.geometry, folder)
    # Parse everything before writing anything, so a bad XML leaves no half-imported scan.
    annotations = annotate_scan(reading, ct.geometry, ct.shape_irc, sop_to_index,
                                min_readers=min_readers)
    ct_path = out_dir / f"subset{subset}" / f"{reading.series_uid}.mhd"
    ct_io.write_image(ct.hu, ct.geometry, ct_path)
    _remove_other_copies(out_dir, reading.series_uid, ct_path)
    mask_path = luna.outline_mask_path(out_dir, reading.series_uid)
    ct_io.write_image(annotations.classes, ct.geometry, mask_path, compress=True)
    scan = ImportedScan(reading.series_uid, xml_path, ct_path, mask_path,
                        len(annotations.nodules), len(annotations.excluded),
                        annotations.skipped_rois)
    return scan, annotations


def import_lidc(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                config: LidcConfig | None = None, *, progress: bool = True) -> ImportSummary:
    """Import LIDC-IDRI scans into ``out_dir`` in the LUNA16 layout.

    Each source is a scan folder (the XML next to or above its DICOM series), an XML file, or
    a tree of scan folders.  A scan that cannot be imported is logged and listed in
    ``ImportSummary.failures``; the others still import.
    """
    config = config or LidcConfig()
    min_readers, subset = config.min_readers, config.subset
    if isinstance(min_readers, bool) or not isinstance(min_readers, int) or min_readers < 1:
        raise ConfigError(f"min_readers must be a positive integer, got {min_readers!r}")
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 0:
        raise ConfigError(f"subset must be a non-negative integer, got {subset!r}")
    out_dir = Path(out_dir)
    paths = [Path(source) for source in sources]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise DataError(f"no such file or folder: {', '.join(missing)}")
    summary = ImportSummary(out_dir)
    xml_files: list[Path] = []
    seen: set[Path] = set()  # the same file reached through two sources is imported once
    for path in paths:
        found = find_lidc_xml(path)
        if not found:
            message = f"{path}: no LIDC reader XML (<LidcReadMessage>) found"
            log.error("%s", message)
            summary.failures.append((path, message))
        for xml_path in found:
            if xml_path.resolve() not in seen:
                seen.add(xml_path.resolve())
                xml_files.append(xml_path)
    tables = _Tables(out_dir)
    done: dict[str, Path] = {}
    for xml_path in progress_bar(xml_files, enabled=progress, desc="import LIDC", unit="scan"):
        try:
            scan, annotations = _import_scan(xml_path, out_dir, subset, min_readers)
        except DataError as error:
            log.error("skipped scan: %s", error)
            summary.failures.append((xml_path, str(error)))
            continue
        if scan.series_uid in done:
            log.warning("%s: series %s was also imported from %s in this run; the later one "
                        "wins", xml_path, scan.series_uid, done[scan.series_uid])
            summary.scans = [s for s in summary.scans if s.series_uid != scan.series_uid]
        done[scan.series_uid] = xml_path
        tables.replace(scan.series_uid, _rows(scan.series_uid, annotations))
        summary.scans.append(scan)
        log.info("%s: %d nodule(s), %d excluded finding(s)%s", scan.series_uid, scan.nodules,
                 scan.excluded, f", {scan.skipped_rois} roi(s) outside the slab skipped"
                 if scan.skipped_rois else "")
    log.info("imported %d scan(s) into %s; %d failed", len(summary.scans), out_dir,
             len(summary.failures))
    return summary
