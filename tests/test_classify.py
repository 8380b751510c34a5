"""Classifying a CT's candidates: crops as training cuts them, batched forward passes."""

from __future__ import annotations

import numpy as np
import torch

from conftest import shared_path
from lunaseg.candidates import Candidate
from lunaseg.classifier import build_classifier, load_classifier
from lunaseg.classify import (candidate_centers_irc, classify_candidates, classify_crops,
                              crops_to_input, cut_crops)
from lunaseg.config import ClassifierConfig
from lunaseg.ct import CT, load_ct
from lunaseg.geometry import Geometry
from lunaseg.inputs import ClassifierSpec

TINY = ClassifierConfig(conv_channels=4, depth=2, crop_irc=(8, 16, 16))


def _candidate(center_irc) -> Candidate:
    return Candidate(series_uid="1.2.3", rank=0, center_irc=tuple(float(v) for v in center_irc),
                     center_xyz=(0.0, 0.0, 0.0), diameter_mm=5.0, volume_mm3=65.0, voxels=10,
                     score=2.0, max_logit=2.0, mean_logit=1.0, max_probability=0.9,
                     mean_probability=0.7, mean_hu=20.0, slice_span=(0, 1),
                     bbox_irc=(0, 0, 0, 1, 1, 1), uneroded=False)


def test_crops_are_centred_and_padded_like_the_cache():
    hu = np.arange(6 * 10 * 12, dtype=np.int16).reshape(6, 10, 12)
    crops = cut_crops(hu, np.array([[3, 5, 6], [0, 0, 0]]), (4, 4, 4))
    assert np.array_equal(crops[0], hu[1:5, 3:7, 4:8])
    assert crops[0][2, 2, 2] == hu[3, 5, 6]
    # Beyond the volume: slices repeat, rows and columns are air.
    assert np.array_equal(crops[1][0], crops[1][2]) and crops[1][3, 0, 0] == -1000
    assert crops[1][2, 2, 2] == hu[0, 0, 0]
    assert np.array_equal(candidate_centers_irc([_candidate((2.6, 4.4, 5.5))]), [[3, 4, 6]])
    assert np.array_equal(candidate_centers_irc(np.array([[1.2, 2.0, 3.7]])), [[1, 2, 4]])


def test_candidates_go_through_in_batches_with_the_same_result():
    torch.manual_seed(0)
    model = build_classifier(TINY, ClassifierSpec(min_hu=-1000, max_hu=400,
                                                  crop_irc=(8, 16, 16)))
    rng = np.random.default_rng(1)
    ct = CT(rng.integers(-1000, 1500, (20, 40, 40)).astype(np.int16), Geometry.identity(), "x")
    centers = rng.integers(0, 40, (13, 3))
    centers[:, 0] %= 20
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    p = classify_candidates(model, ct, [_candidate(c) for c in centers], batch_size=5)
    assert calls == [5, 5, 3] and p.shape == (13,) and p.dtype == np.float32
    # One crop at a time gives the same probabilities (eval mode: no batch statistics).
    crops = cut_crops(ct.hu, centers, (8, 16, 16))
    model.eval()
    with torch.no_grad():
        single = [model.probabilities(crops_to_input(torch.from_numpy(crops[k:k + 1]),
                                                     model.spec))[0, 1] for k in range(13)]
    np.testing.assert_allclose(p, torch.stack(single).numpy(), rtol=1e-5, atol=1e-6)
    # The HU window is the model's: values above max_hu do not reach the network.
    model.train()
    clipped = classify_crops(model, np.minimum(crops, 400), batch_size=64)[:, 1]
    np.testing.assert_allclose(p, clipped, rtol=1e-5, atol=1e-6)
    assert model.training  # its mode is restored
    assert classify_candidates(model, ct, []).shape == (0,)


def test_book_classifier_finds_the_lidc_nodule_in_its_crop():
    """The book's classifier on the real LIDC-IDRI-0001 slab: its 23.4 mm nodule (LUNA16
    xyz 56.208, 86.343, -115.868) is a nodule, the lung 40 mm beside it is not."""
    model, _ = load_classifier(shared_path("models", "book-cls-2020-02-06.best.state"))
    ct = load_ct(shared_path("data", "lidc-idri-0001", "dicom"))
    nodule = ct.xyz_to_irc(np.array([56.208, 86.343, -115.868]))
    beside = ct.xyz_to_irc(np.array([56.208 - 40.0, 86.343, -115.868]))
    p = classify_candidates(model, ct, np.stack([nodule, beside]))
    assert p[0] > 0.9 and p[1] < 0.5


def test_crops_cover_the_millimetres_of_training_at_other_pixels():
    """A 12 mm disc fills the same share of a crop at 0.7 mm pixels as at the spec's 1.4."""
    from lunaseg.classify import cut_scaled_crops

    spec = ClassifierSpec(crop_irc=(4, 16, 16), pixel_mm=1.4)

    def disc_scan(pixel_mm: float) -> np.ndarray:
        n = int(round(60 * 1.4 / pixel_mm))
        yy, xx = np.mgrid[:n, :n] * pixel_mm
        disc = (yy - n * pixel_mm / 2) ** 2 + (xx - n * pixel_mm / 2) ** 2 < 6.0 ** 2
        return np.where(disc[None], 40, -900).repeat(8, axis=0).astype(np.int16)

    coarse, fine = disc_scan(1.4), disc_scan(0.7)
    crop_coarse = cut_scaled_crops(coarse, np.array([[4, 30, 30]]), spec, (1.4, 1.4))
    crop_fine = cut_scaled_crops(fine, np.array([[4, 60, 60]]), spec, (0.7, 0.7))
    assert crop_coarse.shape == crop_fine.shape == (1, 4, 16, 16)
    share_coarse = (crop_coarse[0, 2] > -430).mean()
    share_fine = (crop_fine[0, 2] > -430).mean()
    assert abs(share_fine - share_coarse) < 0.05 and 0.18 < share_coarse < 0.28  # pi 36 / 22.4^2
    unscaled = cut_scaled_crops(fine, np.array([[4, 60, 60]]), ClassifierSpec(crop_irc=(4, 16, 16)),
                                (0.7, 0.7))
    assert (unscaled[0, 2] > -430).mean() > 0.8  # without pixel_mm: the disc nearly fills it
