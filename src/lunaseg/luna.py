"""The LUNA16 layout: ``<uid>.mhd`` files under a root, and its annotation / candidate CSVs.

Users often hold only some of the ten subsets, so every reader here works on a partial
download: rows for series that are not on disk are dropped and counted in one warning.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from lunaseg.errors import DataError
from lunaseg.files import csv_number, csv_rows

__all__ = [
    "Nodule", "SubmissionMark", "CandidateRow", "CandidateInfo", "find_series", "read_nodules",
    "read_marks", "read_candidates", "load_candidates", "outline_mask_path",
    "read_series_list", "expand_series", "annotation_file",
    "ANNOTATION_COLUMNS", "MALIGNANCY_COLUMNS", "CANDIDATE_COLUMNS", "SUBMISSION_COLUMNS",
    "ANNOTATION_FILES", "CANDIDATE_FILES", "EXCLUDED_FILE", "UNKNOWN_DIAMETER_MM",
    "UNKNOWN_DIAMETER_SCORED_MM", "BACKGROUND", "BENIGN", "MALIGNANT", "CLASS_NAMES",
    "nodule_class",
]

log = logging.getLogger(__name__)

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
MALIGNANCY_COLUMNS = ANNOTATION_COLUMNS + (
    "mal_bool", "mal_details", "bboxLowX", "bboxLowY", "bboxLowZ",
    "bboxHighX", "bboxHighY", "bboxHighZ", "len_mal_details")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
# LUNA16's "size unknown" diameter (excluded findings without a measured size), and the
# diameter the official scoring script gives such findings.
UNKNOWN_DIAMETER_MM = -1.0
UNKNOWN_DIAMETER_SCORED_MM = 10.0

# Files tried, best first: the de-duplicated list with malignancy beats the plain one.
ANNOTATION_FILES = ("annotations_with_malignancy.csv", "annotations.csv")
CANDIDATE_FILES = ("candidates_V2.csv", "candidates.csv")
EXCLUDED_FILE = "annotations_excluded.csv"

# Voxel values of an outline mask (masks/<uid>.mha) and of every class mask lunaseg makes
# (chapter exercise 3): a 1-class model sees only "nodule", BENIGN or MALIGNANT alike.
BACKGROUND, BENIGN, MALIGNANT = 0, 1, 2
CLASS_NAMES = ("background", "benign", "malignant")


def nodule_class(is_malignant: bool | None) -> int:
    """A nodule's class-mask value: MALIGNANT when ``mal_bool`` says so, else BENIGN (a
    nodule without a malignancy rating counts as benign, as ``mal_bool`` False does)."""
    return MALIGNANT if is_malignant else BENIGN


@dataclass(frozen=True)
class Nodule:
    """One annotated nodule (or excluded finding) in patient coordinates."""

    series_uid: str
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    is_malignant: bool | None = None  # None when the CSV has no malignancy column


class SubmissionMark(NamedTuple):
    """One row of a LUNA16 submission: a CAD mark with its score."""

    series_uid: str
    center_xyz: tuple[float, float, float]
    probability: float


class CandidateRow(NamedTuple):
    """One row of candidates.csv."""

    series_uid: str
    center_xyz: tuple[float, float, float]
    is_nodule: bool


@dataclass(frozen=True)
class CandidateInfo:
    """One candidate location; ``is_nodule`` ones have an annotation match when possible."""

    is_nodule: bool
    has_annotation: bool
    is_malignant: bool
    diameter_mm: float
    series_uid: str
    center_xyz: tuple[float, float, float]


def outline_mask_path(root: str | os.PathLike, series_uid: str) -> Path:
    """Where an imported dataset keeps the reader-outline mask of a series."""
    return Path(root) / "masks" / f"{series_uid}.mha"


def find_series(root: str | os.PathLike) -> dict[str, Path]:
    """Map series UID -> ``.mhd`` path for every ``<uid>.mhd`` below ``root`` (any depth)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.mhd")):
        if path.parent.name == "masks" or path.name.startswith("."):
            continue
        uid = path.name[: -len(".mhd")]
        if uid in found:
            log.warning("%s: series %s also at %s; using the first", path, uid, found[uid])
            continue
        found[uid] = path
    return found


def _xyz(row: dict[str, str], path: Path, line: int) -> tuple[float, float, float]:
    return (csv_number(row, "coordX", path, line), csv_number(row, "coordY", path, line),
            csv_number(row, "coordZ", path, line))


def _keep_on_disk(items: list, available: Iterable[str] | None, what: str, path: Path) -> list:
    if available is None:
        return items
    available = set(available)
    kept = [item for item in items if item.series_uid in available]
    dropped = {item.series_uid for item in items} - available
    if dropped:
        log.warning("%s: %d of its series are not on disk; skipped %d %s",
                    path, len(dropped), len(items) - len(kept), what)
    return kept


def read_nodules(path: str | os.PathLike, *, excluded: bool = False,
                 available: Iterable[str] | None = None) -> list[Nodule]:
    """Nodules from annotations.csv or annotations_with_malignancy.csv, or the findings of
    annotations_excluded.csv (``excluded=True``).

    Diameters follow the LUNA16 kit: a negative diameter means "size unknown" (scored as
    :data:`UNKNOWN_DIAMETER_SCORED_MM`) and is kept as it is here; an excluded finding with
    an empty diameter is unknown too.  Nodules of unknown or zero size get one warning with
    their lines.  ``available`` (series UIDs on disk) drops the other rows with one warning.
    Every problem with a row is one :class:`DataError` naming the file and line.
    """
    path = Path(path)
    rows = list(csv_rows(path, ANNOTATION_COLUMNS))
    has_malignancy = bool(rows) and "mal_bool" in rows[0][1]
    nodules, odd_lines = [], []
    for line, row in rows:
        if None in row or any(value is None for value in row.values()):
            raise DataError(f"{path}: line {line}: the row has "
                            f"{'more' if None in row else 'fewer'} columns than the header")
        uid = row["seriesuid"].strip()
        if not uid:
            raise DataError(f"{path}: line {line}: empty seriesuid")
        malignant = None
        if has_malignancy:
            flag = row["mal_bool"].strip().lower()
            if flag not in ("true", "false", "1", "0"):
                raise DataError(f"{path}: line {line}: mal_bool is not True/False: "
                                f"{row['mal_bool']!r}")
            malignant = flag in ("true", "1")
        if excluded and not row["diameter_mm"].strip():
            diameter = UNKNOWN_DIAMETER_MM
        else:
            diameter = csv_number(row, "diameter_mm", path, line)
        if not excluded and diameter <= 0:
            odd_lines.append(line)
        nodules.append(Nodule(uid, _xyz(row, path, line), diameter, malignant))
    if odd_lines:
        log.warning("%s: %d nodule(s) of unknown or zero size (line %s); a negative diameter "
                    "is scored as %g mm, as LUNA16 does", path, len(odd_lines),
                    ", ".join(map(str, odd_lines[:5])) + (" ..." if len(odd_lines) > 5 else ""),
                    UNKNOWN_DIAMETER_SCORED_MM)
    return _keep_on_disk(nodules, available, "annotations", path)


def read_marks(path: str | os.PathLike) -> list[SubmissionMark]:
    """The marks of a LUNA16 submission CSV (``seriesuid,coordX,coordY,coordZ,probability``).

    candidates.csv (with ``class`` instead of ``probability``) is not a submission and is
    refused; a probability must be a finite number.
    """
    path = Path(path)
    marks = []
    for line, row in csv_rows(path, SUBMISSION_COLUMNS):
        uid = (row.get("seriesuid") or "").strip()
        if not uid:
            raise DataError(f"{path}: line {line}: empty seriesuid")
        marks.append(SubmissionMark(uid, _xyz(row, path, line),
                                    csv_number(row, "probability", path, line)))
    return marks


def read_candidates(path: str | os.PathLike, *,
                    available: Iterable[str] | None = None) -> list[CandidateRow]:
    """Rows of candidates.csv / candidates_V2.csv."""
    path = Path(path)
    out = []
    for line, row in csv_rows(path, CANDIDATE_COLUMNS):
        label = row["class"].strip()
        if label not in ("0", "1"):
            raise DataError(f"{path}: line {line}: class must be 0 or 1, got {label!r}")
        out.append(CandidateRow(row["seriesuid"], _xyz(row, path, line), label == "1"))
    return _keep_on_disk(out, available, "candidates", path)


def read_series_list(path: str | os.PathLike) -> list[str]:
    """Series UIDs listed in a file, one per line (LUNA16's ``seriesuids.csv``) or in the
    first column of a CSV, with or without a ``seriesuid`` header; blank lines are skipped."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and row[0].strip()]
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a series list ({error})") from None
    uids = [row[0].strip() for row in rows]
    if uids and uids[0].lower() == "seriesuid":
        uids = uids[1:]
    if not uids:
        raise DataError(f"{path}: lists no series UIDs")
    return list(dict.fromkeys(uids))  # first occurrence order, duplicates once


def expand_series(entries: Iterable[str]) -> list[str]:
    """Series UIDs from command-line entries, each a UID or a file listing UIDs.

    A DICOM UID is digits and dots, so an entry that names a file (or looks like a path)
    is read with :func:`read_series_list`; one that looks like a path but is missing is an
    error rather than a UID that silently matches nothing.
    """
    uids: list[str] = []
    for entry in entries:
        if Path(entry).is_file():
            uids.extend(read_series_list(entry))
        elif os.sep in entry or "/" in entry or Path(entry).suffix.lower() in (".csv", ".txt"):
            raise DataError(f"{entry}: no such series list file")
        else:
            uids.append(entry)
    return list(dict.fromkeys(uids))


def annotation_file(root: str | os.PathLike) -> Path | None:
    """The annotation CSV of a LUNA16 root: annotations_with_malignancy.csv (de-duplicated,
    with malignancy) when present, else annotations.csv; None when there is neither."""
    root = Path(root)
    return next((root / name for name in ANNOTATION_FILES if (root / name).exists()), None)


def _match_annotation(center_xyz: np.ndarray, nodules: list[Nodule]) -> Nodule | None:
    """The annotation whose centre lies within a quarter diameter on every axis (book rule)."""
    for nodule in nodules:
        delta = np.abs(center_xyz - np.asarray(nodule.center_xyz))
        if np.all(delta <= nodule.diameter_mm / 4):
            return nodule
    return None


def load_candidates(root: str | os.PathLike, *,
                    series_on_disk: Iterable[str] | None = None) -> dict[str, list[CandidateInfo]]:
    """Candidate records grouped by series, from the CSVs found in ``root``.

    Annotated nodules come first (every one of them, with diameter and malignancy), then the
    non-nodule rows of candidates.csv.  Candidate nodules that match no annotation keep
    diameter 0 (the book's convention).  Series not on disk are skipped with one warning.
    """
    root = Path(root)
    if series_on_disk is None:
        series_on_disk = find_series(root).keys()
    series_on_disk = set(series_on_disk)
    annotations = annotation_file(root)
    if annotations is not None:
        log.info("%s: nodules from %s", root, annotations.name)
    nodules = [] if annotations is None else read_nodules(annotations, available=series_on_disk)
    by_series: dict[str, list[CandidateInfo]] = defaultdict(list)
    nodules_by_series: dict[str, list[Nodule]] = defaultdict(list)
    for nodule in nodules:
        nodules_by_series[nodule.series_uid].append(nodule)
        by_series[nodule.series_uid].append(CandidateInfo(
            True, True, bool(nodule.is_malignant), nodule.diameter_mm, nodule.series_uid,
            nodule.center_xyz))
    candidate_file = next((root / n for n in CANDIDATE_FILES if (root / n).exists()), None)
    if candidate_file is not None:
        for uid, center_xyz, is_nodule in read_candidates(candidate_file,
                                                          available=series_on_disk):
            if not is_nodule:
                by_series[uid].append(CandidateInfo(False, False, False, 0.0, uid, center_xyz))
            elif _match_annotation(np.asarray(center_xyz), nodules_by_series[uid]) is None:
                by_series[uid].append(CandidateInfo(True, False, False, 0.0, uid, center_xyz))
    if annotations is None and candidate_file is None:
        log.warning("%s: no annotations or candidates CSV found", root)
    return dict(by_series)
