"""The command line, in-process through ``main(argv)``: one test per command, on one tiny
dataset and training run made once for the module."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import class_luna, shared_path
from lunaseg.checkpoint import load_checkpoint
from lunaseg.cli import main

@pytest.fixture(scope="module")
def run_folders(tmp_path_factory) -> dict[str, Path]:
    """synth -> prepcache -> train through the CLI, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    data, run = root / "data", root / "run"
    assert main(["-q", "synth", "--out", str(data), "--series", "6", "--seed", "3",
                 "--shape", "24,96,96"]) == 0
    assert main(["-q", "prepcache", "--data", str(data), "--chunk", "7,32,32",
                 "--workers", "1"]) == 0
    assert main(["-q", "train", "--data", str(data), "--out", str(run), "--epochs", "2",
                 "--crop", "24", "--val-stride", "3", "--epoch-samples", "64",
                 "--negative-crops", "0.3", "--bce-weight", "0.5", "--device", "cpu"]) == 0
    return {"root": root, "data": data, "run": run}


def test_synth(tmp_path, capsys):
    assert main(["-q", "synth", "--out", str(tmp_path / "d"), "--series", "2", "--seed", "1",
                 "--shape", "16,64,64"]) == 0
    assert "synth: 2 series" in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("subset*/*.mhd"))) == 2
    assert (tmp_path / "d" / "annotations_with_malignancy.csv").is_file()


@pytest.mark.slow
def test_prepcache_is_incremental(run_folders, capsys):
    capsys.readouterr()
    assert main(["-q", "prepcache", "--data", str(run_folders["data"]), "--chunk",
                 "7,32,32"]) == 0
    assert "0 built, 6 up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_train_writes_its_run(run_folders):
    run = run_folders["run"]
    assert (run / "checkpoint.pt").is_file() and (run / "checkpoint.best.pt").is_file()
    assert json.loads((run / "splits.json").read_text())["val"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_segment(run_folders, tmp_path):
    seg = tmp_path / "seg"
    assert main(["-q", "segment", str(run_folders["data"]), "--model",
                 str(run_folders["run"] / "checkpoint.best.pt"), "--out", str(seg),
                 "--overlays", "2", "--tta", "2", "--native-pixels", "--device", "cpu"]) == 0
    saved = json.loads((seg / "segment_config.json").read_text())
    assert saved["tta"] == 2 and saved["resample"] is False
    with open(seg / "submission.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and set(rows[0]) == {"seriesuid", "coordX", "coordY", "coordZ", "probability"}
    series_folder = next(p for p in seg.iterdir() if p.is_dir())
    mask = sitk.ReadImage(str(series_folder / "mask.nii.gz"))
    assert mask.GetSize()[::-1] == (24, 96, 96)
    assert (series_folder / "report.html").read_text().startswith("<!DOCTYPE html>")


@pytest.fixture(scope="module")
def submission(run_folders) -> Path:
    seg = run_folders["root"] / "seg"
    assert main(["-q", "segment", str(run_folders["data"]), "--model",
                 str(run_folders["run"] / "checkpoint.pt"), "--out", str(seg),
                 "--overlays", "0", "--no-volumes", "--device", "cpu"]) == 0
    return seg / "submission.csv"


@pytest.mark.slow
def test_evaluate_a_submission(run_folders, submission, tmp_path, capsys):
    data = run_folders["data"]
    assert main(["-q", "evaluate", "--annotations", str(data / "annotations.csv"),
                 "--excluded", str(data / "annotations_excluded.csv"),
                 "--candidates", str(submission), "--out", str(tmp_path / "eval")]) == 0
    assert "CPM" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "froc.json").read_text())["n_scans"] >= 1
    assert (tmp_path / "eval" / "froc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_evaluate_series_lists(run_folders, submission, tmp_path, capsys):
    data = run_folders["data"]
    # --series also takes a file in the format of LUNA16's seriesuids.csv.
    with open(submission, newline="") as handle:
        uids = sorted({row["seriesuid"] for row in csv.DictReader(handle)})[:2]
    (tmp_path / "seriesuids.csv").write_text("\n".join(uids) + "\n")
    assert main(["-q", "evaluate", "--annotations", str(data / "annotations.csv"),
                 "--candidates", str(submission), "--series", str(tmp_path / "seriesuids.csv"),
                 "--out", str(tmp_path / "eval2")]) == 0
    assert json.loads((tmp_path / "eval2" / "froc.json").read_text())["n_scans"] == 2
    # A UID in no file is scored as a clean scan, and pointed out (it may be a typo).
    capsys.readouterr()
    assert main(["-q", "evaluate", "--annotations", str(data / "annotations.csv"),
                 "--candidates", str(submission), "--series", *uids, "1.2.3.typo",
                 "--out", str(tmp_path / "eval2b")]) == 0
    assert json.loads((tmp_path / "eval2b" / "froc.json").read_text())["n_scans"] == 3
    assert ("1 of the 3 series listed appear in no annotation, excluded finding or candidate "
            "(first: 1.2.3.typo)") in capsys.readouterr().err
    # Segmentation options cannot change a finished candidate list: said, not silently dropped.
    assert main(["-q", "evaluate", "--annotations", str(data / "annotations.csv"),
                 "--candidates", str(submission), "--threshold", "0.9",
                 "--tta", "4", "--out", str(tmp_path / "eval2c")]) == 0
    assert "do not apply to a --candidates CSV; ignoring threshold, tta" in \
        capsys.readouterr().err
    # ... and --series narrows what `evaluate --data` segments.
    assert main(["-q", "evaluate", "--data", str(data), "--model",
                 str(run_folders["run"] / "checkpoint.pt"), "--split", "all", "--series",
                 str(tmp_path / "seriesuids.csv"), "--overlays", "0",
                 "--out", str(tmp_path / "eval3")]) == 0
    assert sorted(p.name for p in (tmp_path / "eval3" / "segment").iterdir()
                  if p.is_dir()) == uids


@pytest.mark.slow
def test_evaluate_a_model_copied_out_of_its_run(run_folders, tmp_path):
    # The checkpoint carries the run's split (--val-stride 3 above, not the default 10).
    run = run_folders["run"]
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "model.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    assert main(["-q", "evaluate", "--data", str(run_folders["data"]), "--model",
                 str(tmp_path / "alone" / "model.pt"), "--overlays", "0", "--no-volumes",
                 "--threshold", "0.999999", "--out", str(tmp_path / "eval4")]) == 0
    val = json.loads((run / "splits.json").read_text())["val"]
    assert sorted(p.name for p in (tmp_path / "eval4" / "segment").iterdir()
                  if p.is_dir()) == sorted(val)
    # Without volumes (--no-volumes) misses are listed without a cause instead of failing.
    misses = json.loads((tmp_path / "eval4" / "misses.json").read_text())
    assert misses and all("--no-volumes" in m["reason"] for m in misses)


@pytest.mark.slow
def test_train_resume_keeps_the_runs_settings(run_folders, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, run = run_folders["data"], tmp_path / "run"
    common = ["-q", "train", "--data", str(data), "--crop", "24", "--val-stride", "2",
              "--epoch-samples", "16", "--device", "cpu"]
    # One epoch first (not the recipe's 24), so that the resumed run has an epoch to add.
    assert main([*common, "--out", str(run), "--epochs", "1"]) == 0
    assert main([*common, "--out", str(run), "--epochs", "2",
                 "--resume", str(run / "checkpoint.pt")]) == 0
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    # Resumed again without --epochs or --out: the run's own 2 epochs and folder, and a
    # changed training option is named as ignored.
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--lr", "0.5", "--device", "cpu",
                 "--resume", str(run / "checkpoint.pt")]) == 0
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert json.loads((run / "config.json").read_text())["lr"] == 0.001
    assert not (tmp_path / "runs").exists()
    warned = capsys.readouterr().err
    assert "ignoring lr 0.5 (the run's: 0.001)" in warned and "crop" not in warned


@pytest.mark.slow
def test_train_3_classes_and_resume(tmp_path, capsys):
    data = class_luna(tmp_path / "data", series=6)
    assert main(["-q", "prepcache", "--data", str(data), "--chunk", "7,32,32",
                 "--workers", "1"]) == 0
    run = tmp_path / "run"
    common = ["-q", "train", "--data", str(data), "--crop", "24", "--val-stride", "3",
              "--epoch-samples", "16", "--device", "cpu", "--out", str(run)]
    assert main([*common, "--classes", "3", "--epochs", "1"]) == 0
    # Resumed without --classes: the run's own 3 classes carry on.
    assert main([*common, "--epochs", "2", "--resume", str(run / "checkpoint.pt")]) == 0
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint.epoch == 2 and checkpoint.model_config["n_classes"] == 3
    assert json.loads((run / "config.json").read_text())["model"]["n_classes"] == 3
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [record["epoch"] for record in history] == [1, 2]
    assert "pr_benign/recall" in history[-1]["val"] and "confusion/accuracy" in history[-1]["val"]
    capsys.readouterr()
    # The 3-class model segments through the CLI: p(nodule) and p(malignant) per candidate.
    seg = tmp_path / "seg"
    assert main(["-q", "segment", str(data), "--model", str(run / "checkpoint.pt"), "--out",
                 str(seg), "--overlays", "0", "--tta", "1", "--device", "cpu"]) == 0
    with open(next(seg.glob("*/candidates.csv")), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(0 <= float(r[key]) <= 1 for r in rows for key in ("p_nodule",
                                                                          "p_malignant"))


def test_classes_option_reaches_the_model_config():
    from lunaseg.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--classes", "3",
                                      "--class-weight", "0.5"])
    config = _train_config(args)
    assert config.model.n_classes == 3 and config.class_weight == 0.5
    assert _train_config(build_parser().parse_args(["train", "--data", "d"])).model.n_classes == 1
    with pytest.raises(SystemExit):  # argparse refuses a class count the model cannot have
        build_parser().parse_args(["train", "--data", "d", "--classes", "2"])


def test_import_lidc(tmp_path, capsys):
    scan = shared_path("data", "lidc-idri-0001")
    assert main(["-q", "import-lidc", str(scan), "--out", str(tmp_path / "lidc")]) == 0
    assert f"1 scans, 1 nodules into {tmp_path / 'lidc'}; 0 failed" in capsys.readouterr().out
    with open(tmp_path / "lidc" / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and abs(float(rows[0]["diameter_mm"]) - 23.85) < 0.1


@pytest.mark.parametrize("argv, message", [
    (["prepcache", "--data", "/nonexistent/luna"], "data folder not found"),
    (["segment", "/nonexistent.mhd", "--model", "x.pt", "--out", "o"], "no such file"),
    (["synth", "--out", "o", "--shape", "1,2"], "--shape: expected 3"),
    (["evaluate", "--annotations", "a.csv"], "needs --annotations CSV and --candidates"),
    (["evaluate", "--annotations", "a.csv", "--candidates", "c.csv", "--series", "uids.csv"],
     "uids.csv: no such series list file"),
    (["evaluate", "--annotations", "a.csv", "--candidates", "c.csv", "--model", "m.pt"],
     "--model segments a --data folder"),
    (["train-classifier", "--data", "/nonexistent/luna"], "no cache here"),
    (["train-classifier", "--data", "d", "--malignancy"], "give --from CKPT"),
    (["train-classifier", "--data", "d", "--from", "c.pt"], "--from CKPT is for --malignancy"),
    (["train-classifier", "--data", "d", "--crop", "30,48,48"],
     "classifier.crop_irc must be 3 multiples of 2**depth = 16"),
    (["train-classifier", "--data", "d", "--aug-scale", "1.5"],
     "classifier augment.scale must be in [0, 1)"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-q", *argv]) == 2
    assert not list(tmp_path.iterdir())  # a failed command leaves nothing behind
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    assert main(["-q", "synth", "--out", str(taken / "data"), "--series", "1",
                 "--shape", "16,64,64"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(taken) in err and "\n" not in err and "Traceback" not in err


def test_help_texts_come_from_the_configs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Adam learning rate (default 0.001)" in text
    assert "weight of the false-negative Dice term (book: 8) (default 1)" in text
    with pytest.raises(SystemExit):
        main(["train-classifier", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "learning rate (default 0.0001)" in text
    assert "balanced sampling: negatives per positive (book: 1)" in text


@pytest.mark.slow
def test_evaluate_a_submission_for_a_dataset_scores_all_its_scans(run_folders, submission,
                                                                  tmp_path, capsys):
    data = run_folders["data"]
    # Drop one scan's marks: LUNA16 still counts that scan (it has the dataset's list).
    with open(submission, newline="") as handle:
        rows = list(csv.DictReader(handle))
    first = rows[0]["seriesuid"]
    partial = tmp_path / "partial.csv"
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if row["seriesuid"] != first)
    assert main(["-q", "evaluate", "--data", str(data), "--candidates", str(partial),
                 "--out", str(tmp_path / "e1")]) == 0
    assert f"scans 6 (from {data})" in capsys.readouterr().out
    # With only the two CSVs, the scan without marks is named in a warning.
    assert main(["-q", "evaluate", "--annotations", str(data / "annotations.csv"),
                 "--candidates", str(partial), "--out", str(tmp_path / "e2")]) == 0
    captured = capsys.readouterr()
    assert "from the annotations and candidates" in captured.out
    with open(data / "annotations.csv", newline="") as handle:
        annotated = {row["seriesuid"] for row in csv.DictReader(handle)}
    if first in annotated:
        assert "annotated scans have no candidates at all" in captured.err


def test_train_presets_and_given_options():
    from lunaseg.cli import _train_config, build_parser
    from lunaseg.config import AugmentConfig, TrainConfig

    def config(*argv):
        return _train_config(build_parser().parse_args(["train", "--data", "d", *argv]))

    assert config() == TrainConfig()
    assert config("--preset", "book") == TrainConfig.book()
    changed = config("--preset", "book", "--epochs", "3", "--crop", "32", "--no-augment")
    assert (changed.epochs, changed.data.crop_px) == (3, 32)
    assert changed.augment == AugmentConfig.none() and changed.fn_weight == 8.0
    flips = config("--augment-flip")
    assert flips.augment == AugmentConfig(flip=True, offset=0.0, scale=0.0, rotate=False,
                                          noise_hu=0.0)


def test_demo_classes_option_trains_3_classes_into_its_own_folder(monkeypatch, capsys):
    from lunaseg import pipeline

    calls = []

    def fake_run_demo(out, *, settings, progress):
        calls.append((out, settings))
        return "demo summary"

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    assert main(["-q", "demo", "--classes", "3"]) == 0
    assert main(["-q", "demo", "--classes", "3", "--quick"]) == 0
    assert main(["-q", "demo"]) == 0
    (out3, three), (quick3, quick), (out1, one) = calls
    assert three.train.model.n_classes == quick.train.model.n_classes == 3 and quick.quick
    # The 3-class run never replaces the 1-class demo's folder; the 1-class demo is as it was.
    assert (out3, quick3) == ("lunaseg-demo-3class", "lunaseg-demo-quick-3class")
    assert out1 is None and one.train.model.n_classes == 1
    assert one.train == pipeline.DemoSettings().train


def test_demo_trains_in_bf16_autocast_unless_no_amp(monkeypatch):
    from lunaseg import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_demo",
                        lambda out, *, settings, progress: calls.append(settings) or "summary")
    assert main(["-q", "demo"]) == 0
    assert main(["-q", "demo", "--no-amp"]) == 0
    default, fp32 = calls
    stages = ("train", "classifier", "malignancy")
    assert all(getattr(default, stage).amp for stage in stages)
    assert not any(getattr(fp32, stage).amp for stage in stages)
    # Segmenting, which scores the demo, is float32 either way.
    assert not default.segment.amp and not fp32.segment.amp


def test_demo_budget_options(monkeypatch):
    from lunaseg import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_demo",
                        lambda out, *, settings, progress: calls.append(settings) or "summary")
    assert main(["-q", "demo"]) == 0
    assert main(["-q", "demo", "--budget-minutes", "30"]) == 0
    assert main(["-q", "demo", "--epochs", "7"]) == 0
    assert main(["-q", "demo", "--quick"]) == 0
    default, longer, explicit, quick = calls
    assert default.budget_minutes == 0 and longer.budget_minutes == 30
    # Epochs asked for are run as asked: the budget does not scale them.
    assert explicit.train.epochs == 7 and explicit.budget_minutes == 0
    assert quick.budget_minutes == 0
