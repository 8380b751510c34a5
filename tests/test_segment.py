"""``segment``: one CT or many to candidates and the files people and scorers read."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SHARED, ClassStandIn, DenseStandIn, rotated_geometry, sphere_phantom
from lunaseg.config import SegmentConfig
from lunaseg.ct import CT, load_ct, write_image
from lunaseg.errors import ConfigError, DataError
from lunaseg.geometry import Geometry
from lunaseg.inputs import SegmentationSpec
from lunaseg.scans import find_scans
from lunaseg.segment import SUBMISSION_COLUMNS, segment_ct, segment_inputs

DICOM_SLAB = SHARED / "data" / "lidc-idri-0001" / "dicom"


class MarkerHU(nn.Module):
    """Probability 1 exactly where the centre slice is 100 HU; records the slices it saw."""

    spec = SegmentationSpec(tta=1)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return (x[:, 3:4] == 100).float()


def test_lung_mask_runs_the_network_only_around_the_lungs():
    # 1 mm voxels: body in every slice, lungs only in slices 40-49 (the chest of a scan that
    # also covers neck and abdomen), a 100 HU nodule in a lung and a 100 HU liver lesion.
    hu = np.full((100, 160, 160), -1000, dtype=np.int16)
    r, c = np.ogrid[:160, :160]
    hu[:, ((r - 80) / 72.0) ** 2 + ((c - 80) / 72.0) ** 2 <= 1] = 40
    for center_c in (62, 98):
        lung = ((r - 80) / 14.0) ** 2 + ((c - center_c) / 10.0) ** 2 <= 1
        hu[40:50][:, lung] = -850
    hu[44:47, 79:82, 61:64] = 100  # nodule in a lung
    hu[85:88, 79:82, 79:82] = 100  # liver lesion, far below the lungs
    ct = CT(hu, Geometry.identity(), "1.2.3")
    config = SegmentConfig(erosion_iterations=0, lung_mask=True)
    model = MarkerHU()
    result = segment_ct(model, ct, config, device="cpu")
    assert [c.center_irc for c in result.candidates] == [pytest.approx((45, 80, 62))]
    # The network saw the lungs' 10 slices and 20 mm beyond, not the liver; in-plane the
    # lungs (rows 61-99, cols 47-113 once grown 5 mm) plus 20 mm (rows 41-120, cols
    # 27-134), plus the model's reach of 24 px, started on its 4-px pooling grid: rows
    # 16-144 and cols 0-158, padded to 160.
    assert sum(shape[0] for shape in model.seen) == 10 + 2 * 20
    assert result.prob[85:88].max() == 0
    assert model.seen[0][-2:] == (128, 160)
    model.seen.clear()
    config.lung_mask = False
    result = segment_ct(model, ct, config, device="cpu")
    assert len(result.candidates) == 2 and sum(shape[0] for shape in model.seen) == 100
    assert model.seen[0][-2:] == (160, 160)  # the body and its margin: everything


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
def test_segment_inputs_keeps_geometry(tmp_path, suffix):
    import SimpleITK as sitk

    geometry = rotated_geometry()
    hu, _ = sphere_phantom()
    source = write_image(hu, geometry, tmp_path / f"phantom{suffix}")
    outputs = segment_inputs([source], DenseStandIn(), tmp_path / "out",
                             SegmentConfig(overlays=2, lung_mask=False), device="cpu", progress=False)
    assert [o.series_uid for o in outputs] == ["phantom"] and outputs[0].candidates == 1
    folder = tmp_path / "out" / "phantom"
    for name, dtype in (("mask.nii.gz", np.uint8), ("probability.nii.gz", np.float32)):
        image = sitk.ReadImage(str(folder / name))
        read_back = Geometry(np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()),
                             np.asarray(image.GetDirection()).reshape(3, 3))
        assert read_back.allclose(geometry, atol=1e-4), name
        assert sitk.GetArrayViewFromImage(image).dtype == dtype
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz")))
    assert mask.shape == hu.shape and int(mask.sum()) == int((hu > -500).sum())
    # The mask as .mha too, written with the CT's geometry.
    ct = load_ct(source)
    result = segment_ct(DenseStandIn(), ct, SegmentConfig(lung_mask=False), device="cpu")
    image = sitk.ReadImage(str(write_image(result.mask, ct.geometry, tmp_path / "m.mha")))
    assert Geometry(np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()),
                    np.asarray(image.GetDirection()).reshape(3, 3)).allclose(geometry)


def test_find_scans_luna_root_and_uid_filter(tmp_path):
    hu = np.full((4, 8, 8), -800, dtype=np.int16)
    for subset, uid in (("subset0", "1.2.3"), ("subset1", "1.2.4")):
        write_image(hu, Geometry.identity(), tmp_path / subset / f"{uid}.mhd")
    assert [s.uid for s in find_scans([tmp_path])] == ["1.2.3", "1.2.4"]
    assert [s.uid for s in find_scans([tmp_path], series_uids=["1.2.4", "9.9"])] == ["1.2.4"]
    with pytest.raises(DataError, match="no such file"):
        find_scans([tmp_path / "missing"])


def test_files_sharing_a_name_stay_separate_scans(tmp_path):
    hu = np.full((4, 16, 16), -800, dtype=np.int16)
    paths = [write_image(hu, Geometry.identity(), tmp_path / patient / "ct.nii.gz")
             for patient in ("p1", "p2")]
    assert [s.uid for s in find_scans(paths)] == ["p1_ct", "p2_ct"]
    assert [s.uid for s in find_scans([paths[0], paths[0]])] == ["ct"]  # one file, once
    outputs = segment_inputs(paths, DenseStandIn(), tmp_path / "seg",
                             SegmentConfig(overlays=0, write_volumes=False, lung_mask=False),
                             device="cpu", progress=False)
    assert [o.folder.name for o in outputs] == ["p1_ct", "p2_ct"]


@pytest.mark.skipif(not DICOM_SLAB.is_dir(), reason=f"real DICOM slab not found at {DICOM_SLAB}")
def test_segment_inputs_on_real_dicom_writes_everything(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from lunaseg import segment

    monkeypatch.setattr(segment, "REPORT_MAX_ROWS", 5)  # the report's table is capped
    config = SegmentConfig(overlays=3, max_candidates=10)
    outputs = segment_inputs([DICOM_SLAB], DenseStandIn(), tmp_path, config,
                             device="cpu", progress=False)
    assert len(outputs) == 1
    uid = outputs[0].series_uid
    folder = tmp_path / uid
    for name in ("probability.nii.gz", "mask.nii.gz", "candidates.csv", "candidates.json",
                 "report.html", "candidates/cand_000.png", "candidates/cand_002.png"):
        assert (folder / name).is_file(), name
    assert not (folder / "candidates" / "cand_003.png").exists()

    # Reference geometry straight from the DICOM files, independent of lunaseg.ct.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM_SLAB), uid))
    dicom = reader.Execute()
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    assert mask.GetSize() == dicom.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), dicom.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetSpacing(), dicom.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), dicom.GetDirection(), atol=1e-6)

    document = json.loads((folder / "candidates.json").read_text())
    assert document["series_uid"] == uid and document["candidates"] == \
        sorted(document["candidates"], key=lambda c: -c["probability"])
    with open(folder / "candidates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(document["candidates"]) == outputs[0].candidates
    with open(tmp_path / "submission.csv", newline="") as handle:
        submission = list(csv.reader(handle))
    assert tuple(submission[0]) == SUBMISSION_COLUMNS
    assert 1 <= len(submission) - 1 <= config.max_candidates
    assert all(row[0] == uid for row in submission[1:])
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert outputs[0].candidates > 5 and page.count("<tr><td>") == 5
    assert f"The table lists the first 5 of {outputs[0].candidates:,} candidates" in page
    assert "http://" not in page and "https://" not in page
    assert (folder / "candidates" / "cand_000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segment_inputs_skips_unreadable_scans(tmp_path, caplog):
    hu, _ = sphere_phantom(shape=(8, 24, 24), center_irc=(4, 12, 12), radius_mm=3.0)
    good = write_image(hu, Geometry.identity(), tmp_path / "in" / "good.mha")
    bad = tmp_path / "in" / "bad.mha"
    bad.write_bytes(b"not an image")
    config = SegmentConfig(overlays=0, write_volumes=False, lung_mask=False)
    with caplog.at_level("WARNING", logger="lunaseg.segment"):
        outputs = segment_inputs([good, bad], DenseStandIn(), tmp_path / "out", config,
                                 progress=False)
    assert [o.series_uid for o in outputs] == ["good"]
    assert "1 of 2 scans could not be read" in caplog.text
    assert not (tmp_path / "out" / "good" / "mask.nii.gz").exists()
    with pytest.raises(DataError, match="none of the 1 scans"):
        segment_inputs([bad], DenseStandIn(), tmp_path / "out2", config, progress=False)


def test_bad_segment_options_are_named():
    ct = CT(np.zeros((2, 8, 8), np.int16), Geometry.identity(), "s")
    for option, value in (("tta", 3), ("batch_size", -1), ("overlays", -2),
                          ("max_candidates", 0), ("threshold", 1.0)):
        with pytest.raises(ConfigError, match=option):
            segment_ct(DenseStandIn(), ct, SegmentConfig(**{option: value}), device="cpu")


def test_a_model_without_a_spec_needs_one():
    ct = CT(np.zeros((2, 8, 8), np.int16), Geometry.identity(), "s")

    class Bare(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x[:, :1])

    with pytest.raises(ConfigError, match="carries no input spec"):
        segment_ct(Bare(), ct, device="cpu")
    assert segment_ct(Bare(), ct, spec=SegmentationSpec(), device="cpu").candidates == []


def test_a_saturating_model_still_writes_distinct_scores(tmp_path):
    # A large final bias: p = 1.0 in float32 on every blob, but their logits differ.
    torch.manual_seed(0)
    from lunaseg.model import build_model

    model = build_model(spec=SegmentationSpec(tta=1))
    model.input_batchnorm.running_mean.fill_(-500.0)
    model.input_batchnorm.running_var.fill_(300.0 ** 2)
    with torch.no_grad():
        model.unet.last.bias.fill_(30.0)
    hu = np.full((6, 48, 48), -900, dtype=np.int16)
    for k, value in enumerate((-200, 0, 200, 400)):
        hu[2:4, 6 + 10 * k:10 + 10 * k, 20:24] = value
    ct = CT(hu, Geometry.identity(), "s")
    result = segment_ct(model, ct, SegmentConfig(lung_mask=False), device="cpu")
    assert len(result.candidates) >= 1
    assert all(c.max_probability == 1.0 for c in result.candidates)
    logits = [c.max_logit for c in result.candidates]
    assert logits == sorted(logits, reverse=True)
    segment_inputs([write_image(hu, Geometry.identity(), tmp_path / "s.mha")], model,
                   tmp_path / "out", SegmentConfig(lung_mask=False, overlays=0), device="cpu",
                   progress=False)
    with open(tmp_path / "out" / "submission.csv", newline="") as handle:
        written = [float(row["probability"]) for row in csv.DictReader(handle)]
    assert len(written) == len(set(written)) == len(result.candidates)
    assert written == sorted(written, reverse=True) and all(0 < p <= 1 for p in written)


@pytest.mark.slow
@pytest.mark.skipif(not DICOM_SLAB.is_dir(), reason=f"real DICOM slab not found at {DICOM_SLAB}")
def test_the_books_model_on_the_real_slab_ranks_the_nodule_first():
    from lunaseg.model import load_model

    model, _ = load_model(SHARED / "models" / "book-seg-2020-01-26.best.state")
    result = segment_ct(model, load_ct(DICOM_SLAB), SegmentConfig(overlays=0), device="cpu")
    luna16_xyz = np.array([56.208, 86.343, -115.868])  # annotations.csv, 23.35 mm
    first = result.candidates[0]
    assert np.linalg.norm(np.asarray(first.center_xyz) - luna16_xyz) < 2.0
    assert len(result.candidates) <= 30


@pytest.mark.parametrize("perm, flips", [((0, 1, 2), (False, False, True)),
                                         ((1, 0, 2), (True, False, False)),
                                         ((2, 0, 1), (False, True, True))])
def test_any_storage_orientation_gives_the_same_candidates(tmp_path, perm, flips):
    import SimpleITK as sitk

    from lunaseg.geometry import canonical_orientation

    hu, _ = sphere_phantom(shape=(20, 48, 44), center_irc=(8, 20, 18), radius_mm=4.0)
    hu[12:15, 30:36, 28:33] = 40  # a second, box-shaped blob
    geometry = Geometry(np.array([-50.0, 20.0, -300.0]), np.array([0.8, 0.7, 2.0]), np.eye(3))
    base = write_image(hu, geometry, tmp_path / "base.nii.gz")
    image = sitk.ReadImage(str(base))
    turned = tmp_path / "turned.nii.gz"
    sitk.WriteImage(sitk.Flip(sitk.PermuteAxes(image, list(perm)), list(flips)), str(turned))
    config = SegmentConfig(lung_mask=False, overlays=0)
    found = {}
    for path in (base, turned):
        # (Not an output folder named like the input: ITK's NIfTI reader, given x.nii.gz,
        # would open a folder x.nii instead.)
        name = path.name.split(".")[0]
        segment_inputs([path], DenseStandIn(), tmp_path / f"out_{name}", config, device="cpu",
                       progress=False)
        folder = tmp_path / f"out_{name}" / name
        with open(folder / "candidates.csv", newline="") as handle:
            found[path] = [np.array([float(r[k]) for k in ("coordX", "coordY", "coordZ")])
                           for r in csv.DictReader(handle)]
        # The mask is written on the input's own grid; in the canonical order it is one mask.
        written = sitk.ReadImage(str(folder / "mask.nii.gz"))
        stored = sitk.ReadImage(str(path))
        assert written.GetSize() == stored.GetSize()
        np.testing.assert_allclose(written.GetDirection(), stored.GetDirection(), atol=1e-9)
        mask = sitk.GetArrayFromImage(written)
        grid = Geometry(np.array(written.GetOrigin()), np.array(written.GetSpacing()),
                        np.array(written.GetDirection()).reshape(3, 3))
        found[path, "mask"] = canonical_orientation(grid, mask.shape)[0].to_canonical(mask)
    assert len(found[base]) == len(found[turned]) == 2
    for a, b in zip(found[base], found[turned]):
        np.testing.assert_allclose(a, b, atol=0.01)
    np.testing.assert_array_equal(found[base, "mask"], found[turned, "mask"])


def test_3_class_outputs_carry_the_classes(tmp_path):
    import SimpleITK as sitk

    hu = np.full((8, 40, 40), -800, dtype=np.int16)
    hu[3:5, 6:12, 6:12] = 500  # malignant to ClassStandIn
    hu[3:5, 24:30, 24:30] = 0  # benign
    source = write_image(hu, Geometry.identity(), tmp_path / "scan.mha")
    config = SegmentConfig(overlays=2, lung_mask=False, erosion_iterations=0)
    segment_inputs([source], ClassStandIn(), tmp_path / "out", config, device="cpu",
                   progress=False)
    folder = tmp_path / "out" / "scan"
    with open(folder / "candidates.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: float(row["row"]))
    assert len(rows) == 2
    dense, soft = rows
    assert float(dense["p_malignant"]) > 0.99 and float(soft["p_malignant"]) < 0.02
    assert all(float(row["p_nodule"]) == pytest.approx(float(row["mean_probability"]),
                                                       abs=2e-6) for row in rows)
    # The mask's candidate voxels carry their class: 2 malignant, 1 benign.
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz")))
    assert set(np.unique(mask[3:5, 6:12, 6:12]).tolist()) == {2}
    assert set(np.unique(mask[3:5, 24:30, 24:30]).tolist()) == {1}
    assert mask.sum() == 2 * 36 * 2 + 2 * 36
    p_malignant = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "p_malignant.nii.gz")))
    assert p_malignant[4, 8, 8] > 0.99 and p_malignant[4, 26, 26] < 0.02
    page = (folder / "report.html").read_text()
    assert "<th>p nodule</th><th>p malignant</th>" in page
    document = json.loads((folder / "candidates.json").read_text())
    assert {round(c["p_malignant"]) for c in document["candidates"]} == {0, 1}
    # Verdicts of the segmentation, not the classifier's: nothing claims a second stage ran.
    assert "classifier_seconds" not in document and "segmentation score" not in page


def test_1_class_outputs_leave_the_verdicts_empty(tmp_path):
    hu, _ = sphere_phantom()
    source = write_image(hu, Geometry.identity(), tmp_path / "scan.mha")
    segment_inputs([source], DenseStandIn(), tmp_path / "out",
                   SegmentConfig(overlays=0, lung_mask=False), device="cpu", progress=False)
    folder = tmp_path / "out" / "scan"
    with open(folder / "candidates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # A 1-class U-Net gives no verdicts (its mean_probability is in its own column); the
    # classifier fills them in lunaseg detect.
    assert rows and all(row["p_malignant"] == row["p_nodule"] == "" for row in rows)
    assert not (folder / "p_malignant.nii.gz").exists()
    page = (folder / "report.html").read_text()
    assert "p malignant" not in page and "p nodule" not in page
