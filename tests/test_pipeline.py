"""The demo end to end (its quick size): every stage runs and leaves what it promises."""

from __future__ import annotations

import csv
import json

import pytest
import SimpleITK as sitk

from lunaseg.pipeline import run_demo


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    result = run_demo(tmp_path / "demo", quick=True, progress=False)
    # Both stages: the U-Net, then the classifier and its malignancy fine-tuning (detect).
    assert set(result.seconds) == {"synth", "prepcache", "train", "classifiers",
                                   "detect+evaluate"}
    assert result.train.epochs_done == 2 and result.train.checkpoint.is_file()
    # Both second-stage models sit beside the U-Net, and the scans were judged by them.
    assert (result.run_dir / "classifier" / "checkpoint.pt").is_file()
    assert (result.run_dir / "malignancy" / "checkpoint.pt").is_file()
    assert result.montage is not None and result.montage.stat().st_size > 10_000
    evaluation = result.evaluation
    assert evaluation is not None
    froc = json.loads((evaluation.out_dir / "froc.json").read_text())
    assert froc["n_scans"] == 2 and froc["n_nodules"] == evaluation.froc.n_nodules > 0
    assert (evaluation.out_dir / "froc.png").stat().st_size > 10_000
    # Every held-out scan got its volumes (aligned with the input) and a report.
    segment = evaluation.out_dir / "segment"
    folders = [p for p in segment.iterdir() if p.is_dir()]
    assert len(folders) == 2
    for folder in folders:
        assert (folder / "report.html").is_file()
        with open(folder / "candidates.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(0 <= float(r["p_nodule"]) <= 1 and 0 <= float(r["p_malignant"]) <= 1
                            for r in rows)
        source = next((result.data_dir).rglob(f"{folder.name}.mhd"))
        mask, image = (sitk.ReadImage(str(folder / "mask.nii.gz")),
                       sitk.ReadImage(str(source)))
        assert mask.GetSize() == image.GetSize()
        assert mask.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-4)
        assert mask.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-3)
    text = str(result)
    assert "on 2 validation scans" in text and "CPM of the candidate stage alone" in text
    assert evaluation.candidates_alone is not None and evaluation.ranked_by == "combined"
    counts = sum(band["nodules"] for band in froc["by_size"])
    assert counts == froc["n_nodules"] and "by diameter (found / at <= 20 FP" in text
    # The phantoms come with their true nodule voxels and what each nodule is.
    assert len(list((result.data_dir / "masks").glob("*.mha"))) == 6
    assert (result.data_dir / "phantom_nodules.csv").is_file()


def test_demo_data_is_reused_only_from_the_same_generator(tmp_path):
    from lunaseg.config import SynthConfig
    from lunaseg.pipeline import _synth_if_needed

    data = tmp_path / "data"
    config = SynthConfig(series=1, seed=4, shape_irc=(16, 64, 64), subsets=1)
    _synth_if_needed(data, config, progress=False)
    scan = next(data.glob("subset0/*.raw"))
    stamp = scan.stat().st_mtime_ns
    _synth_if_needed(data, config, progress=False)
    assert scan.stat().st_mtime_ns == stamp  # same config and generator: reused
    marker = data / "synth_config.json"
    old = json.loads(marker.read_text())
    del old["phantom_version"]  # what an older lunaseg wrote
    marker.write_text(json.dumps(old, sort_keys=True))
    (data / "stale.txt").write_text("from an older run")
    _synth_if_needed(data, config, progress=False)
    assert not (data / "stale.txt").exists() and scan.is_file()  # made again


@pytest.mark.parametrize("name", ["data", "run"])
def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path, name):
    from lunaseg.errors import DataError

    own = tmp_path / "project" / name / "my_scans.txt"
    own.parent.mkdir(parents=True)
    own.write_text("a user's own files")
    with pytest.raises(DataError, match=f"{name}: exists and was not made by lunaseg demo"):
        run_demo(tmp_path / "project", quick=True, progress=False)
    assert own.read_text() == "a user's own files"
    assert not (tmp_path / "project" / ".lunaseg-demo").exists()
