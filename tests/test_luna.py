"""The LUNA16 layout and CSVs, on the real annotation files and on partial downloads."""

from __future__ import annotations

import logging

import pytest

from conftest import shared_path
from lunaseg.errors import DataError
from lunaseg.files import write_csv
from lunaseg.luna import (CANDIDATE_COLUMNS, expand_series, find_series, load_candidates,
                          read_candidates, read_nodules, read_series_list)

LIDC_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def test_real_annotation_files():
    plain = read_nodules(shared_path("data", "luna16", "annotations.csv"))
    rich = read_nodules(shared_path("data", "luna16", "annotations_with_malignancy.csv"))
    assert len(plain) == 1186 and len(rich) == 1182
    assert all(n.is_malignant is None for n in plain)
    assert {n.is_malignant for n in rich} == {True, False}
    assert len({n.series_uid for n in plain}) == 601
    first = [n for n in plain if n.series_uid == LIDC_0001]
    assert len(first) == 1
    assert first[0].center_xyz == pytest.approx((56.208, 86.343, -115.868), abs=1e-3)
    assert first[0].diameter_mm == pytest.approx(23.35, abs=0.01)


def test_partial_download_skips_with_one_warning(caplog):
    path = shared_path("data", "luna16", "annotations_with_malignancy.csv")
    with caplog.at_level(logging.WARNING):
        kept = read_nodules(path, available={LIDC_0001})
    assert len(kept) == 1 and kept[0].is_malignant is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not on disk" in warnings[0].getMessage()


def test_find_series_any_depth_and_candidates(tiny_luna, caplog):
    series = find_series(tiny_luna)
    assert len(series) == 3
    assert {p.parent.name for p in series.values()} == {"subset0", "subset1"}
    records = load_candidates(tiny_luna)
    assert sum(len(v) for v in records.values()) == 4 + 3  # 4 nodules + 3 non-nodules
    nodules = [c for v in records.values() for c in v if c.is_nodule]
    assert all(c.has_annotation and c.diameter_mm == 8.0 for c in nodules)
    # A series absent from disk: its rows are skipped and counted once.
    missing = next(iter(series.values()))
    missing.unlink()
    with caplog.at_level(logging.WARNING):
        records = load_candidates(tiny_luna)
    assert len(records) == 2
    assert any("1 of its series are not on disk" in r.getMessage() for r in caplog.records)


def test_candidate_rows_and_bad_csv(tmp_path):
    path = write_csv(tmp_path / "candidates.csv", CANDIDATE_COLUMNS,
                     [["a", 1, 2, 3, 1], ["a", 4, 5, 6, 0]])
    rows = read_candidates(path)
    assert rows[0].is_nodule and not rows[1].is_nodule and rows[1].center_xyz == (4.0, 5.0, 6.0)
    bad = tmp_path / "annotations.csv"
    bad.write_text("seriesuid,coordX,coordY\n1,2,3\n")
    with pytest.raises(DataError, match=r"annotations.csv: missing column\(s\) coordZ"):
        read_nodules(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1,2,x,4,5\n")
    with pytest.raises(DataError, match="line 2: coordY is not a number"):
        read_nodules(bad)
    with pytest.raises(DataError, match="data folder not found"):
        find_series(tmp_path / "absent")


def test_series_lists(tmp_path):
    plain = tmp_path / "seriesuids.csv"
    plain.write_text("1.2.3\n\n4.5.6\n1.2.3\n")
    assert read_series_list(plain) == ["1.2.3", "4.5.6"]
    headed = tmp_path / "headed.csv"
    headed.write_text("seriesuid,subset\n7.8,0\n9.1,1\n")
    assert read_series_list(headed) == ["7.8", "9.1"]
    assert expand_series(["9.9", str(plain), "4.5.6"]) == ["9.9", "1.2.3", "4.5.6"]
    empty = tmp_path / "empty.txt"
    empty.write_text("seriesuid\n")
    with pytest.raises(DataError, match="empty.txt: lists no series UIDs"):
        read_series_list(empty)
    with pytest.raises(DataError, match="no such series list file"):
        expand_series([str(tmp_path / "missing.csv")])
