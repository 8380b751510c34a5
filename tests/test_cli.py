"""The command line end to end, in-process: synth -> prepcache -> train -> segment -> evaluate."""

from __future__ import annotations

import csv
import json

import pytest
import SimpleITK as sitk

from lunaseg.cli import main

from conftest import shared_path


def test_pipeline_through_the_cli(tmp_path, capsys):
    data, run, seg = tmp_path / "data", tmp_path / "run", tmp_path / "seg"
    assert main(["-q", "synth", "--out", str(data), "--series", "6", "--seed", "3",
                 "--shape", "24,96,96"]) == 0
    assert main(["-q", "prepcache", "--data", str(data), "--chunk", "7,32,32",
                 "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["-q", "prepcache", "--data", str(data), "--chunk", "7,32,32"]) == 0
    assert "0 built, 6 up to date" in capsys.readouterr().out
    assert main(["-q", "train", "--data", str(data), "--out", str(run), "--epochs", "2",
                 "--chunk", "7,32,32", "--crop", "24", "--val-stride", "3",
                 "--epoch-samples", "64", "--negative-crops", "0.3", "--bce-weight", "0.5",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "best validation" in out and (run / "checkpoint.best.pt").is_file()
    assert json.loads((run / "splits.json").read_text())["val"]

    assert main(["-q", "segment", str(data), "--model", str(run / "checkpoint.best.pt"),
                 "--out", str(seg), "--overlays", "2", "--tta", "2", "--device", "cpu"]) == 0
    assert json.loads((seg / "segment_config.json").read_text())["tta"] == 2
    with open(seg / "submission.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and set(rows[0]) == {"seriesuid", "coordX", "coordY", "coordZ", "probability"}
    series_folder = next(p for p in seg.iterdir() if p.is_dir())
    mask = sitk.ReadImage(str(series_folder / "mask.nii.gz"))
    assert mask.GetSize()[::-1] == (24, 96, 96)
    assert (series_folder / "report.html").read_text().startswith("<!DOCTYPE html>")

    assert main(["-q", "evaluate", "--annotations", str(data / "annotations.csv"),
                 "--excluded", str(data / "annotations_excluded.csv"),
                 "--candidates", str(seg / "submission.csv"),
                 "--out", str(tmp_path / "eval")]) == 0
    assert "CPM" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "froc.json").read_text())["n_scans"] >= 1
    assert (tmp_path / "eval" / "froc.png").read_bytes()[:4] == b"\x89PNG"

    # --series also takes a file in the format of LUNA16's seriesuids.csv.
    uids = sorted(p.name for p in seg.iterdir() if p.is_dir())[:2]
    (tmp_path / "seriesuids.csv").write_text("\n".join(uids) + "\n")
    assert main(["-q", "evaluate", "--annotations", str(data / "annotations.csv"),
                 "--candidates", str(seg / "submission.csv"),
                 "--series", str(tmp_path / "seriesuids.csv"),
                 "--out", str(tmp_path / "eval2")]) == 0
    assert json.loads((tmp_path / "eval2" / "froc.json").read_text())["n_scans"] == 2
    # ... and narrows what `evaluate --data` segments.
    assert main(["-q", "evaluate", "--data", str(data), "--model", str(run / "checkpoint.pt"),
                 "--split", "all", "--series", str(tmp_path / "seriesuids.csv"),
                 "--overlays", "0", "--out", str(tmp_path / "eval3")]) == 0
    assert sorted(p.name for p in (tmp_path / "eval3" / "segment").iterdir()
                  if p.is_dir()) == uids


@pytest.mark.parametrize("argv, message", [
    (["prepcache", "--data", "/nonexistent/luna"], "data folder not found"),
    (["segment", "/nonexistent.mhd", "--model", "x.pt", "--out", "o"], "no such file"),
    (["synth", "--out", "o", "--shape", "1,2"], "--shape: expected 3"),
    (["evaluate", "--annotations", "a.csv"], "needs --annotations CSV and --candidates"),
    (["evaluate", "--annotations", "a.csv", "--candidates", "c.csv", "--series", "uids.csv"],
     "uids.csv: no such series list file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-q", *argv]) == 2
    assert not list(tmp_path.iterdir())  # a failed command leaves nothing behind
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_import_lidc_through_the_cli(tmp_path, capsys):
    scan = shared_path("data", "lidc-idri-0001")
    assert main(["-q", "import-lidc", str(scan), "--out", str(tmp_path / "lidc")]) == 0
    assert f"1 scans, 1 nodules into {tmp_path / 'lidc'}; 0 failed" in capsys.readouterr().out
    with open(tmp_path / "lidc" / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and abs(float(rows[0]["diameter_mm"]) - 23.85) < 0.1
