"""Full-CT inference, candidate extraction and the ``segment`` outputs (lunaseg.infer, report)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import toy_chest
from lunaseg.config import SegmentConfig
from lunaseg.ct import CT, load_ct, write_image
from lunaseg.errors import ConfigError, DataError
from lunaseg.geometry import Geometry
from lunaseg.masks import lung_mask
from lunaseg.infer import (
    SUBMISSION_COLUMNS, context_indices, context_stack, extract_candidates, find_scans,
    model_context_slices, predict_volume, segment_ct, segment_inputs,
)
from lunaseg.report import html_report, overlay_png, overlay_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"
DICOM_SLAB = SHARED / "data" / "lidc-idri-0001" / "dicom"


class DenseStandIn(nn.Module):
    """Deterministic "model": probability rises steeply above -500 HU on the centre slice."""

    in_channels = 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((x[:, 3:4] + 500.0) / 50.0)


class ChannelEcho(nn.Module):
    """Returns one input channel unchanged; refuses sizes a depth-3 U-Net cannot take."""

    def __init__(self, channel: int, in_channels: int = 7) -> None:
        super().__init__()
        self.channel = channel
        self.in_channels = in_channels
        self.depth = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.in_channels
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0, tuple(x.shape)
        return x[:, self.channel:self.channel + 1]


def rotated_geometry(spacing_xyz=(0.8, 0.7, 2.0)) -> Geometry:
    """30 degrees about z, z axis flipped, non-trivial origin and anisotropic spacing."""
    angle = math.radians(30.0)
    direction = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                          [math.sin(angle), math.cos(angle), 0.0],
                          [0.0, 0.0, -1.0]])
    return Geometry(np.array([-120.25, 35.5, 310.0]), np.array(spacing_xyz), direction)


def sphere_phantom(shape=(24, 70, 66), center_irc=(11, 33, 30), radius_mm=5.0,
                   spacing_xyz=(0.8, 0.7, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """-800 HU lung with a +40 HU ball (physical radius) -> (hu, ball mask)."""
    hu = np.full(shape, -800, dtype=np.int16)
    i, r, c = np.ogrid[: shape[0], : shape[1], : shape[2]]
    sx, sy, sz = spacing_xyz
    ball = (((i - center_irc[0]) * sz) ** 2 + ((r - center_irc[1]) * sy) ** 2
            + ((c - center_irc[2]) * sx) ** 2) <= radius_mm ** 2
    hu[ball] = 40
    return hu, ball


# --------------------------------------------------------------------------- stacks


def test_context_indices_repeat_edge_slices():
    index = context_indices(5, [0, 2, 4], 3)
    assert index.tolist() == [[0, 0, 0, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4, 4],
                              [1, 2, 3, 4, 4, 4, 4]]


def test_context_stack_clips_and_orders_channels():
    hu = np.arange(4, dtype=np.int16).reshape(4, 1, 1) * 900 - 1500  # -1500, -600, 300, 1200
    stack = context_stack(hu, [0, 3], context_slices=1)
    assert stack.dtype == np.float32 and stack.shape == (2, 3, 1, 1)
    assert stack[:, :, 0, 0].tolist() == [[-1000, -1000, -600], [300, 1000, 1000]]


@pytest.mark.parametrize("channel", [0, 3, 6])
def test_predict_volume_any_in_plane_size(channel):
    rng = np.random.default_rng(0)
    hu = rng.integers(-2000, 2000, size=(6, 13, 22)).astype(np.int16)  # 13, 22: not x4
    out = predict_volume(ChannelEcho(channel), hu, batch_size=4)
    assert out.shape == hu.shape and out.dtype == np.float32
    source = np.clip(np.arange(6) + channel - 3, 0, 5)  # slice each output row came from
    np.testing.assert_array_equal(out, np.clip(hu[source], -1000, 1000).astype(np.float32))


def test_predict_volume_with_real_unet_when_available():
    model_module = pytest.importorskip("lunaseg.model")
    model = model_module.build_model()
    hu = np.full((5, 30, 41), -700, dtype=np.int16)
    out = predict_volume(model, hu, batch_size=2)
    assert out.shape == hu.shape
    assert np.all((out >= 0) & (out <= 1))
    assert model_context_slices(model) == 3


class DiagonalShift(nn.Module):
    """Output pixel (r, c) = centre-slice input at (r - 1, c - 1): anything but mirror-symmetric."""

    in_channels = 7
    depth = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 3:4]
        out = torch.zeros_like(centre)
        out[..., 1:, 1:] = centre[..., :-1, :-1]
        return out


@pytest.mark.parametrize("tta", [2, 4])
def test_tta_averages_mirrored_views(tta):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1000, size=(3, 12, 16)).astype(np.float32)
    out = predict_volume(DiagonalShift(), hu, tta=tta, crop_to_body=False)
    # Mirroring left-right, shifting, mirroring back shifts the other way: each view reads
    # one diagonal neighbour.  Compare inside the one-pixel frame the shifts leave empty.
    up_left, up_right = hu[:, :-2, :-2], hu[:, :-2, 2:]
    down_left, down_right = hu[:, 2:, :-2], hu[:, 2:, 2:]
    expected = (up_left + up_right) / 2 if tta == 2 else \
        (up_left + up_right + down_left + down_right) / 4
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], expected, rtol=1e-6, atol=1e-3)


def test_tta_makes_a_real_unet_mirror_equivariant():
    model_module = pytest.importorskip("lunaseg.model")
    torch.manual_seed(0)
    model = model_module.build_model()
    hu = np.random.default_rng(2).integers(-1000, 400, size=(7, 32, 40)).astype(np.int16)
    mirrored = np.ascontiguousarray(hu[:, :, ::-1])
    plain = predict_volume(model, hu, crop_to_body=False)
    plain_mirrored = predict_volume(model, mirrored, crop_to_body=False)[:, :, ::-1]
    assert np.abs(plain - plain_mirrored).max() > 1e-3  # one view depends on the side
    both = predict_volume(model, hu, tta=2, crop_to_body=False)
    both_mirrored = predict_volume(model, mirrored, tta=2, crop_to_body=False)[:, :, ::-1]
    np.testing.assert_allclose(both, both_mirrored, atol=1e-5)


def test_tta_must_be_one_two_or_four():
    with pytest.raises(ConfigError, match="tta"):
        predict_volume(DiagonalShift(), np.zeros((2, 8, 8), np.float32), tta=3)


# --------------------------------------------------------------------------- candidates


def test_sphere_gives_one_candidate_at_the_right_place():
    geometry = rotated_geometry()
    center = (11, 33, 30)
    hu, ball = sphere_phantom(center_irc=center)
    prob = predict_volume(DenseStandIn(), hu)
    candidates = extract_candidates(prob, hu, geometry, SegmentConfig(), series_uid="s1")
    assert len(candidates) == 1
    cand = candidates[0]
    expected_xyz = geometry.irc_to_xyz(np.array(center, dtype=float))
    half_voxel = 0.5 * float(np.min(geometry.spacing_xyz))
    assert np.linalg.norm(np.asarray(cand.center_xyz) - expected_xyz) <= half_voxel
    np.testing.assert_allclose(cand.center_irc, center, atol=0.5)
    # Sizes are measured on the segmented voxels, not on the eroded core.
    assert cand.voxels == int(ball.sum())
    assert cand.diameter_mm == pytest.approx(10.0, rel=0.1)
    assert cand.slice_span == (int(np.flatnonzero(ball.any(axis=(1, 2)))[0]),
                               int(np.flatnonzero(ball.any(axis=(1, 2)))[-1]))
    assert cand.max_probability > 0.99 and cand.series_uid == "s1"
    assert not cand.uneroded


def test_erosion_keeps_a_two_voxel_nodule_unless_told_otherwise():
    hu = np.full((6, 16, 16), -800, dtype=np.int16)
    hu[2, 7, 7:9] = 40
    prob = predict_volume(DenseStandIn(), hu)
    geometry = Geometry.identity((0.7, 0.7, 2.5))
    kept = extract_candidates(prob, hu, geometry, SegmentConfig(erosion_iterations=1))
    assert len(kept) == 1 and kept[0].voxels == 2 and kept[0].uneroded
    assert kept[0].center_irc == pytest.approx((2.0, 7.0, 7.5))
    book = extract_candidates(prob, hu, geometry,
                              SegmentConfig(erosion_iterations=1, keep_vanished=False))
    assert book == []


def test_erosion_splits_touching_blobs_and_grows_them_back():
    hu = np.full((9, 30, 40), -800, dtype=np.int16)
    hu[2:7, 5:12, 5:12] = 40  # two cubes joined by a one-voxel-thick bridge
    hu[2:7, 5:12, 20:27] = 40
    hu[4, 8, 12:20] = 40
    prob = predict_volume(DenseStandIn(), hu)
    geometry = Geometry.identity()
    merged = extract_candidates(prob, hu, geometry, SegmentConfig(erosion_iterations=0))
    split = extract_candidates(prob, hu, geometry, SegmentConfig(erosion_iterations=1))
    assert len(merged) == 1 and len(split) == 2
    assert sum(c.voxels for c in split) == merged[0].voxels  # every voxel assigned once
    assert sorted(round(c.center_irc[2]) for c in split) == [8, 23]


def test_connectivity_option():
    prob = np.zeros((3, 5, 5), dtype=np.float32)
    prob[1, 1, 1] = prob[1, 2, 2] = 0.9  # diagonal neighbours
    hu = np.zeros(prob.shape, dtype=np.int16)
    config = SegmentConfig(erosion_iterations=0)
    assert len(extract_candidates(prob, hu, Geometry.identity(), config)) == 2
    config.connectivity = 26
    assert len(extract_candidates(prob, hu, Geometry.identity(), config)) == 1


def test_candidates_sorted_and_min_voxels():
    prob = np.zeros((4, 20, 20), dtype=np.float32)
    prob[1, 2:4, 2:4] = 0.6
    prob[2, 10:13, 10:13] = 0.95
    prob[1, 16, 16] = 0.8
    hu = np.zeros(prob.shape, dtype=np.int16)
    config = SegmentConfig(erosion_iterations=0)
    ranked = extract_candidates(prob, hu, Geometry.identity(), config)
    assert [c.max_probability for c in ranked] == pytest.approx([0.95, 0.8, 0.6])
    assert [c.rank for c in ranked] == [0, 1, 2]
    config.min_voxels = 2
    assert [c.voxels for c in extract_candidates(prob, hu, Geometry.identity(), config)] == [9, 4]


def test_score_ranks_by_mean_or_max_probability():
    prob = np.zeros((3, 20, 20), dtype=np.float32)
    prob[1, 2:6, 2:6] = 0.6  # a large, uncertain blob with one saturated voxel
    prob[1, 3, 3] = 1.0
    prob[1, 12:14, 12:14] = 0.9  # a small, confident blob
    hu = np.zeros(prob.shape, dtype=np.int16)
    config = SegmentConfig(erosion_iterations=0, score="mean")
    by_mean = extract_candidates(prob, hu, Geometry.identity(), config)
    assert [c.probability for c in by_mean] == pytest.approx([0.9, (15 * 0.6 + 1) / 16])
    assert by_mean[1].max_probability == 1.0
    config.score = "max"
    by_max = extract_candidates(prob, hu, Geometry.identity(), config)
    assert [c.probability for c in by_max] == pytest.approx([1.0, 0.9])
    assert by_max[0].voxels == 16


def test_center_weighting_by_probability_ignores_a_dense_neighbour():
    # A confident blob next to a barely-segmented dense bone: HU weighting pulls the centre
    # towards the bone, probability weighting stays on the blob.
    prob = np.zeros((1, 5, 20), dtype=np.float32)
    hu = np.zeros(prob.shape, dtype=np.int16)
    prob[0, 2, 4:10] = 0.99
    prob[0, 2, 10:13] = 0.51
    hu[0, 2, 10:13] = 1000
    config = SegmentConfig(erosion_iterations=0)
    (by_p,) = extract_candidates(prob, hu, Geometry.identity(), config)
    config.center_weighting = "hu"
    (by_hu,) = extract_candidates(prob, hu, Geometry.identity(), config)
    expected = (6.5 * 0.99 * 6 + 11 * 0.51 * 3) / (0.99 * 6 + 0.51 * 3)
    assert by_p.center_irc[2] == pytest.approx(expected, abs=1e-4)
    assert by_hu.center_irc[2] > by_p.center_irc[2] + 1


def test_lung_mask_drops_components_outside_the_lungs():
    shape = (5, 64, 64)
    hu = toy_chest(shape)
    hu[2, 30:33, 17:20] = 30  # nodule inside the left lung
    lung = lung_mask(hu, dilation_mm=2.0)
    assert lung[2, 31, 18] and lung[2, 32, 46]  # the nodule is a filled hole
    assert not lung[2, 2, 2] and not lung[2, 5, 32]  # room air, chest wall
    prob = np.zeros(shape, dtype=np.float32)
    prob[2, 30:33, 17:20] = 0.9  # the nodule
    prob[2, 6:8, 31:33] = 0.9  # in the chest wall, far from the lungs
    config = SegmentConfig(erosion_iterations=0, lung_mask=True)
    found = extract_candidates(prob, hu, Geometry.identity(), config)
    assert len(found) == 1 and found[0].center_irc == pytest.approx((2, 31, 18))
    config.lung_mask = False
    assert len(extract_candidates(prob, hu, Geometry.identity(), config)) == 2


class MarkerHU(nn.Module):
    """Probability 1 exactly where the centre slice is 100 HU; records the slices it saw."""

    in_channels = 7

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
    # lungs (29 x 57 px, grown 5 mm) plus 20 mm, padded to multiples of 4.
    assert len(model.seen) == 10 + 2 * 20 and result.prob[85:88].max() == 0
    assert model.seen[0][-2:] == (80, 108)
    model.seen.clear()
    config.lung_mask = False
    result = segment_ct(model, ct, config, device="cpu")
    assert len(result.candidates) == 2 and len(model.seen) == 100
    assert model.seen[0][-2:] == (160, 160)  # the body and its margin: everything


@pytest.mark.parametrize("option, value", [("connectivity", 8), ("threshold", 1.5),
                                           ("center_weighting", "mass"), ("min_voxels", 0),
                                           ("score", "median"), ("tta", 3)])
def test_bad_segment_options_are_named(option, value):
    config = SegmentConfig(**{option: value})
    prob = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match=option):
        extract_candidates(prob, prob.astype(np.int16), Geometry.identity(), config)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
def test_segment_inputs_keeps_geometry(tmp_path, suffix):
    import SimpleITK as sitk

    geometry = rotated_geometry()
    hu, _ = sphere_phantom()
    source = write_image(hu, geometry, tmp_path / f"phantom{suffix}")
    outputs = segment_inputs([source], DenseStandIn(), tmp_path / "out",
                             SegmentConfig(overlays=2), device="cpu", progress=False)
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
    result = segment_ct(DenseStandIn(), ct, SegmentConfig(), device="cpu")
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
                             SegmentConfig(overlays=0, write_volumes=False), device="cpu",
                             progress=False)
    assert [o.folder.name for o in outputs] == ["p1_ct", "p2_ct"]


@pytest.mark.skipif(not DICOM_SLAB.is_dir(), reason=f"real DICOM slab not found at {DICOM_SLAB}")
def test_segment_inputs_on_real_dicom_writes_everything(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from lunaseg import infer

    monkeypatch.setattr(infer, "REPORT_MAX_ROWS", 5)  # the report's table is capped
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


# --------------------------------------------------------------------------- report


def test_overlay_rgb_book_colours():
    hu = np.full((2, 2), -1000.0)
    pred = np.array([[1, 1], [0, 0]], dtype=bool)
    label = np.array([[1, 0], [1, 0]], dtype=bool)
    rgb = overlay_rgb(hu, pred, label)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [0, 128, 0]  # true positive: green
    assert rgb[0, 1].tolist() == [128, 0, 0]  # false positive: red
    assert rgb[1, 0].tolist() == [128, 64, 0]  # false negative: orange
    assert rgb[1, 1].tolist() == [0, 0, 0]  # air, nothing predicted
    assert overlay_rgb(np.full((1, 1), 1000.0), *np.zeros((2, 1, 1), bool))[0, 0].tolist() == \
        [128, 128, 128]


def test_overlay_png_and_html_report(tmp_path):
    hu = np.full((32, 32), -800.0)
    mask = np.zeros((32, 32), dtype=bool)
    mask[10:14, 12:16] = True
    png = overlay_png(hu, mask, tmp_path / "o.png", marker_rc=(12, 14), title="t")
    assert png[:4] == b"\x89PNG" and (tmp_path / "o.png").read_bytes() == png
    page = html_report(tmp_path / "r.html", title="a <b>", scan_info={"uid": "1.2"},
                       settings={"threshold": 0.5}, candidates=[{"rank": 0, "p": 0.9}],
                       thumbnails=[png])
    assert "a &lt;b&gt;" in page and page.count("data:image/png;base64,") == 1
    assert (tmp_path / "r.html").read_text() == page


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tta", [1, 4])
def test_predict_volume_cuda_bf16_matches_cpu(tta):
    model_module = pytest.importorskip("lunaseg.model")
    torch.manual_seed(0)
    model = model_module.build_model()
    # Input statistics of a lung CT, so the random network's output is not saturated.
    model.input_batchnorm.running_mean.fill_(-500.0)
    model.input_batchnorm.running_var.fill_(400.0 ** 2)
    hu, _ = sphere_phantom(shape=(9, 50, 45))
    on_cpu = predict_volume(model, hu, device="cpu", tta=tta)
    on_gpu = predict_volume(model, hu, device="cuda", amp=True, batch_size=4, tta=tta)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == hu.shape
    np.testing.assert_allclose(on_gpu, on_cpu, atol=0.05)


def test_segment_inputs_skips_unreadable_scans(tmp_path, caplog):
    hu, _ = sphere_phantom(shape=(8, 24, 24), center_irc=(4, 12, 12), radius_mm=3.0)
    good = write_image(hu, Geometry.identity(), tmp_path / "in" / "good.mha")
    bad = tmp_path / "in" / "bad.mha"
    bad.write_bytes(b"not an image")
    config = SegmentConfig(overlays=0, write_volumes=False)
    with caplog.at_level("WARNING", logger="lunaseg.infer"):
        outputs = segment_inputs([good, bad], DenseStandIn(), tmp_path / "out", config,
                                 progress=False)
    assert [o.series_uid for o in outputs] == ["good"]
    assert "1 of 2 scans could not be read" in caplog.text
    assert not (tmp_path / "out" / "good" / "mask.nii.gz").exists()
    with pytest.raises(DataError, match="none of the 1 scans"):
        segment_inputs([bad], DenseStandIn(), tmp_path / "out2", config, progress=False)
