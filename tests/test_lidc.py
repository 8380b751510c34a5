"""LIDC-IDRI import: XML parsing, reader consensus, and the import of the real scans in ../shared."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED as SHARED_ROOT
from lunaseg import ct as ct_io
from lunaseg import lidc, luna
from lunaseg.config import LidcConfig
from lunaseg.errors import ConfigError, DataError
from lunaseg.geometry import Geometry

SHARED = SHARED_ROOT / "data"
SCAN_0001 = SHARED / "lidc-idri-0001"
SCAN_0002 = SHARED / "lidc-idri-0002"
UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
UID_0002 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"
LUNA_CENTER_0001 = np.array([56.208, 86.343, -115.868])
LUNA_DIAMETER_0001 = 23.35

needs_shared = pytest.mark.skipif(
    not (SCAN_0001.is_dir() and SCAN_0002.is_dir()),
    reason=f"real LIDC-IDRI scans not found at {SHARED} (the ../shared folder is absent)")


# ---------------------------------------------------------------------------------------
# Hand-made XML: 4 readers on a small synthetic geometry, no DICOM needed


def _edge(points: list[tuple[int, int]]) -> str:
    return "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                   for x, y in points)


def _square(x0: int, y0: int, size: int) -> list[tuple[int, int]]:
    """The edge pixels of a square, walked around its border (as LIDC outlines are)."""
    x1, y1 = x0 + size, y0 + size
    top = [(x, y0) for x in range(x0, x1)]
    right = [(x1, y) for y in range(y0, y1)]
    bottom = [(x, y1) for x in range(x1, x0, -1)]
    left = [(x0, y) for y in range(y1, y0, -1)]
    return top + right + bottom + left


def _roi(z: float, sop: str, points: list[tuple[int, int]], inclusion: bool = True) -> str:
    return (f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
            f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{_edge(points)}</roi>")


def _nodule(mark_id: str, rois: str, malignancy: int | None) -> str:
    rating = ("" if malignancy is None else
              f"<characteristics><malignancy>{malignancy}</malignancy></characteristics>")
    return f"<unblindedReadNodule><noduleID>{mark_id}</noduleID>{rating}{rois}</unblindedReadNodule>"


def _xml(sessions: list[str], series_uid: str = "9.9.9") -> str:
    body = "".join(f"<readingSession><servicingRadiologistID>r{i}</servicingRadiologistID>"
                   f"{content}</readingSession>" for i, content in enumerate(sessions))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader>'
            f"<SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>"
            f"{body}</LidcReadMessage>")


# 6 slices of 40x40 pixels, 1 mm pixels, 2 mm slices, slice k at z = 10 + 2k.
SMALL_GEOMETRY = Geometry(np.array([0.0, 0.0, 10.0]), np.array([1.0, 1.0, 2.0]), np.eye(3))
SMALL_SHAPE = (6, 40, 40)
SMALL_SOPS = {f"sop{k}": k for k in range(6)}


def _nodule_rois(x0: int, y0: int, size: int, slices: range, hole: bool = False) -> str:
    rois = "".join(_roi(10 + 2 * k, f"sop{k}", _square(x0, y0, size)) for k in slices)
    if hole:
        rois += _roi(10 + 2 * slices[0], f"sop{slices[0]}", _square(x0 + 3, y0 + 3, 3),
                     inclusion=False)
    return rois


@pytest.fixture
def small_xml(tmp_path: Path) -> Path:
    point = "<unblindedReadNodule><noduleID>s</noduleID>" + _roi(14, "sop2", [(30, 30)]) + \
        "</unblindedReadNodule>"
    non_nodule = ("<nonNodule><nonNoduleID>n</nonNoduleID><imageZposition>14</imageZposition>"
                  "<imageSOP_UID>sop2</imageSOP_UID><locus><xCoord>31</xCoord>"
                  "<yCoord>30</yCoord></locus></nonNodule>")
    far_away = _roi(300, "elsewhere", [(5, 5)])  # a point far outside the slab: ignored
    sessions = [
        _nodule("a", _nodule_rois(5, 5, 10, range(1, 4), hole=True), 5) + point,
        _nodule("b", _nodule_rois(6, 6, 10, range(1, 4)), 4) + non_nodule,
        _nodule("c", _nodule_rois(4, 5, 12, range(2, 5)), 2)
        + "<unblindedReadNodule><noduleID>f</noduleID>" + far_away + "</unblindedReadNodule>",
        # the fourth reader only marks a different, lonely nodule
        _nodule("d", _nodule_rois(25, 5, 8, range(0, 2)), 3),
    ]
    path = tmp_path / "reading.xml"
    path.write_text(_xml(sessions))
    return path


def test_parse_reads_sessions_kinds_and_ratings(small_xml: Path) -> None:
    reading = lidc.parse_lidc_xml(small_xml)
    assert reading.series_uid == "9.9.9"
    assert [s.reader_id for s in reading.sessions] == ["r0", "r1", "r2", "r3"]
    kinds = [[m.kind for m in s.marks] for s in reading.sessions]
    assert kinds == [["nodule", "small"], ["nodule", "non-nodule"], ["nodule", "small"],
                     ["nodule"]]
    first = reading.sessions[0].marks[0]
    assert first.malignancy == 5
    assert [roi.inclusion for roi in first.rois] == [True, True, True, False]
    assert first.rois[0].points_xy.shape[1] == 2


def test_consensus_groups_readers_and_excludes_the_rest(small_xml: Path) -> None:
    reading = lidc.parse_lidc_xml(small_xml)
    result = lidc.annotate_scan(reading, SMALL_GEOMETRY, SMALL_SHAPE, SMALL_SOPS)
    assert len(result.nodules) == 1
    nodule = result.nodules[0]
    assert nodule.readers == 3
    assert nodule.malignancy == (5, 4, 2)
    assert nodule.is_malignant  # two ratings >= 4
    # Centre near the middle of the three squares (x, y ~ 10.5..11, z = slice 2 or so).
    assert np.allclose(nodule.center_xyz[:2], (10.8, 11.0), atol=1.0)
    assert 14.0 <= nodule.center_xyz[2] <= 16.0
    # Squares of 10 and 12 pixels: interiors of 9x9 and 11x11 pixels.
    expected = np.mean([2 * np.sqrt(81 / np.pi)] * 2 + [2 * np.sqrt(121 / np.pi)])
    assert nodule.diameter_mm == pytest.approx(expected, rel=0.01)
    reasons = sorted(f.reason for f in result.excluded)
    # lonely nodule (1 reader) + the grouped small-nodule / non-nodule points at (30, 30)
    assert reasons == ["few readers", "small nodule"]
    lonely = next(f for f in result.excluded if f.reason == "few readers")
    assert lonely.diameter_mm > 0
    point = next(f for f in result.excluded if f.reason == "small nodule")
    assert point.diameter_mm == -1.0
    assert point.center_xyz == pytest.approx((30.5, 30.0, 14.0))


def test_mask_keeps_majority_voxels_and_cuts_holes(small_xml: Path) -> None:
    reading = lidc.parse_lidc_xml(small_xml)
    mask = lidc.outline_mask(reading, SMALL_GEOMETRY, SMALL_SHAPE, SMALL_SOPS)
    assert mask.shape == SMALL_SHAPE and mask.dtype == bool
    # slice 1: readers a and b (2 of 3) -> kept; slice 4: only reader c -> not kept
    assert mask[1].any() and not mask[4].any() and not mask[0].any()
    assert mask[2, 11, 11]
    assert not mask[2, 5, 5]  # reader a's edge pixel: outlines lie outside the nodule
    # the hole of reader a on slice 1 removes its votes there: only b votes (1 of 3)
    assert not mask[1, 9, 9]
    assert mask[1, 12, 12]
    # the lonely nodule has one reader: not in the mask
    assert not mask[:, :, 26:33].any()
    # min_readers=1 accepts the lonely nodule too
    loose = lidc.outline_mask(reading, SMALL_GEOMETRY, SMALL_SHAPE, SMALL_SOPS, min_readers=1)
    assert loose[0, 8, 28]
    # The class mask: ratings 5, 4, 2 make the big nodule malignant, the lonely one's 3 benign.
    scan = lidc.annotate_scan(reading, SMALL_GEOMETRY, SMALL_SHAPE, SMALL_SOPS, min_readers=1)
    assert scan.classes.dtype == np.uint8 and np.array_equal(scan.classes > 0, loose)
    assert scan.classes[2, 11, 11] == luna.MALIGNANT and scan.classes[0, 8, 28] == luna.BENIGN


def test_z_position_places_outlines_when_sop_uids_differ(small_xml: Path) -> None:
    reading = lidc.parse_lidc_xml(small_xml)
    by_sop = lidc.outline_mask(reading, SMALL_GEOMETRY, SMALL_SHAPE, SMALL_SOPS)
    by_z = lidc.outline_mask(reading, SMALL_GEOMETRY, SMALL_SHAPE, {})
    assert np.array_equal(by_sop, by_z)


def test_slice_inside_the_slab_but_missing_is_an_error(tmp_path: Path) -> None:
    # z = 13 lies between slices 1 (z 12) and 2 (z 14): no slice there although inside the scan
    path = tmp_path / "gap.xml"
    path.write_text(_xml([_nodule("a", _roi(13, "unknown", _square(5, 5, 6)), 3)]))
    with pytest.raises(DataError, match=r"gap\.xml: slice at z 13 mm .* missing"):
        lidc.annotate_scan(lidc.parse_lidc_xml(path), SMALL_GEOMETRY, SMALL_SHAPE, SMALL_SOPS)


@pytest.mark.parametrize("content, problem", [
    ("<LidcReadMessage xmlns='http://www.nih.gov'><ResponseHeader>", "malformed XML"),
    ("<?xml version='1.0'?><Other/>", "not an LIDC reader file"),
    (_xml(["<unblindedReadNodule><noduleID>a</noduleID></unblindedReadNodule>"]), "no <roi>"),
    (_xml([_nodule("a", _roi(12, "sop1", _square(5, 5, 6)), 9)]), "malignancy must be 1-5"),
    (_xml([_nodule("a", _roi(12, "sop1", _square(5, 5, 6)), 3)]).replace("<xCoord>5<",
                                                                        "<xCoord>five<"),
     "xCoord is not a number"),
])
def test_bad_xml_gives_one_line_data_error(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(DataError, match="bad.xml") as info:
        lidc.parse_lidc_xml(path)
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def test_import_checks_its_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_readers"):
        lidc.import_lidc([tmp_path], tmp_path / "out", LidcConfig(min_readers=0))
    with pytest.raises(ConfigError, match="subset"):
        lidc.import_lidc([tmp_path], tmp_path / "out", LidcConfig(subset=-1))
    with pytest.raises(DataError, match="no such file"):
        lidc.import_lidc([tmp_path / "nowhere"], tmp_path / "out")


def test_source_without_xml_is_a_listed_failure(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    summary = lidc.import_lidc([tmp_path / "empty"], tmp_path / "out", progress=False)
    assert summary.scans == []
    assert len(summary.failures) == 1 and "no LIDC reader XML" in summary.failures[0][1]


# ---------------------------------------------------------------------------------------
# The real scans (../shared/data)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, lidc.ImportSummary]:
    if not (SCAN_0001.is_dir() and SCAN_0002.is_dir()):
        pytest.skip(f"real LIDC-IDRI scans not found at {SHARED} (the ../shared folder is absent)")
    out = tmp_path_factory.mktemp("lidc-import")
    summary = lidc.import_lidc([SCAN_0001, SCAN_0002], out, progress=False)
    return out, summary


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@needs_shared
def test_0001_gives_the_luna16_nodule(imported: tuple[Path, lidc.ImportSummary]) -> None:
    out, summary = imported
    assert summary.failures == []
    assert sorted(summary.imported) == sorted([UID_0001, UID_0002])
    nodules = [n for n in luna.read_nodules(out / "annotations.csv") if n.series_uid == UID_0001]
    assert len(nodules) == 1
    center = np.asarray(nodules[0].center_xyz)
    assert np.linalg.norm(center - LUNA_CENTER_0001) < 2.0
    assert nodules[0].diameter_mm == pytest.approx(LUNA_DIAMETER_0001, rel=0.15)
    rows = [r for r in _csv_rows(out / "annotations_with_malignancy.csv")
            if r["seriesuid"] == UID_0001]
    assert len(rows) == 1
    row = rows[0]
    assert tuple(row) == luna.MALIGNANCY_COLUMNS
    assert row["mal_bool"] == "True"
    assert sorted(int(v) for v in row["mal_details"].strip("[]").split(",")) == [4, 5, 5, 5]
    assert row["len_mal_details"] == "4"
    low = np.array([float(row[f"bboxLow{a}"]) for a in "XYZ"])
    high = np.array([float(row[f"bboxHigh{a}"]) for a in "XYZ"])
    assert np.all(low < center) and np.all(center < high)


@needs_shared
def test_written_ct_matches_the_dicom_series(imported: tuple[Path, lidc.ImportSummary]) -> None:
    out, _ = imported
    mhd = out / "subset0" / f"{UID_0001}.mhd"
    assert mhd.exists() and mhd.with_suffix(".raw").exists()
    written = ct_io.load_ct(mhd)
    original = ct_io.load_ct(SCAN_0001 / "dicom", UID_0001)
    assert written.series_uid == UID_0001
    assert written.geometry.allclose(original.geometry, atol=1e-4)
    assert written.hu.dtype == np.int16
    assert np.array_equal(written.hu, original.hu)
    assert luna.find_series(out) == {UID_0001: mhd, UID_0002: out / "subset0" / f"{UID_0002}.mhd"}


@needs_shared
def test_outline_mask_holds_the_nodule_centre(imported: tuple[Path, lidc.ImportSummary]) -> None:
    import SimpleITK as sitk

    out, _ = imported
    path = luna.outline_mask_path(out, UID_0001)
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkUInt8
    geometry, shape = ct_io.read_geometry(path)
    ct_geometry, ct_shape = ct_io.read_geometry(out / "subset0" / f"{UID_0001}.mhd")
    assert shape == ct_shape and geometry.allclose(ct_geometry, atol=1e-4)
    mask = sitk.GetArrayFromImage(image)
    # The readers rated this nodule malignant (mal_bool True): its voxels carry class 2.
    (nodule,) = luna.read_nodules(out / "annotations_with_malignancy.csv",
                                  available=[UID_0001])
    assert nodule.is_malignant
    assert set(np.unique(mask).tolist()) == {0, luna.MALIGNANT}
    assert mask[tuple(geometry.xyz_to_irc(LUNA_CENTER_0001))] == luna.MALIGNANT
    # a 23 mm nodule: thousands of voxels, not the whole slab
    assert 2_000 < (mask > 0).sum() < 20_000


@needs_shared
def test_0002_imports_although_its_nodule_leaves_the_slab(
        imported: tuple[Path, lidc.ImportSummary], tmp_path: Path) -> None:
    _, summary = imported
    scan = next(s for s in summary.scans if s.series_uid == UID_0002)
    assert scan.skipped_rois > 0  # outlines on slices that are not in the folder
    # Two readers outlined the large nodule: excluded at 3 readers, accepted at 2.
    assert scan.nodules == 0 and scan.excluded >= 1
    loose = lidc.import_lidc([SCAN_0002], tmp_path, LidcConfig(min_readers=2), progress=False)
    assert loose.failures == [] and loose.scans[0].nodules == 1
    nodule = luna.read_nodules(tmp_path / "annotations.csv")[0]
    geometry, shape = ct_io.read_geometry(tmp_path / "subset0" / f"{UID_0002}.mhd")
    index = geometry.xyz_to_irc_float(np.asarray(nodule.center_xyz))[0]
    assert -0.5 <= index <= shape[0] - 0.5  # the centre of the part inside the slab
    mask = ct_io.load_ct(luna.outline_mask_path(tmp_path, UID_0002), require_ct=False).hu
    assert mask.any()


@needs_shared
def test_reimport_is_idempotent_and_keeps_other_series(
        imported: tuple[Path, lidc.ImportSummary], tmp_path: Path) -> None:
    out, _ = imported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    names = ("annotations.csv", "annotations_with_malignancy.csv", "annotations_excluded.csv")
    before = {name: (copy / name).read_text() for name in names}
    summary = lidc.import_lidc([SCAN_0001], copy, progress=False)
    assert summary.imported == [UID_0001]
    assert {name: (copy / name).read_text() for name in names} == before
    # into another subset: the old copy goes, rows stay single
    lidc.import_lidc([SCAN_0001], copy, LidcConfig(subset=3), progress=False)
    assert luna.find_series(copy)[UID_0001] == copy / "subset3" / f"{UID_0001}.mhd"
    assert not (copy / "subset0" / f"{UID_0001}.raw").exists()
    assert {name: (copy / name).read_text() for name in names} == before


@needs_shared
def test_malformed_xml_fails_alone(tmp_path: Path) -> None:
    broken = tmp_path / "broken-0001"
    (broken / "dicom").mkdir(parents=True)
    for dicom in (SCAN_0001 / "dicom").iterdir():
        (broken / "dicom" / dicom.name).symlink_to(dicom)
    text = (SCAN_0001 / "069.xml").read_text()
    (broken / "069.xml").write_text(text[: len(text) // 2])  # cut off mid-way
    with pytest.raises(DataError, match=r"069\.xml: malformed XML"):
        lidc.parse_lidc_xml(broken / "069.xml")
    out = tmp_path / "out"
    summary = lidc.import_lidc([broken, SCAN_0002], out, progress=False)
    assert summary.imported == [UID_0002]
    assert len(summary.failures) == 1
    path, message = summary.failures[0]
    assert path == broken / "069.xml" and str(broken / "069.xml") in message
    assert "\n" not in message
    assert not (out / "subset0" / f"{UID_0001}.mhd").exists()
    assert {r["seriesuid"] for r in _csv_rows(out / "annotations_excluded.csv")} == {UID_0002}
