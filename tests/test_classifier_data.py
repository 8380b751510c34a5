"""The classifier's samples: nodules, look-alikes, segmentation negatives, balancing, crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lunaseg.segment
from conftest import DenseStandIn, spheres_and_tubes
from lunaseg.cache import Cache, prepcache
from lunaseg.classifier_data import (CropSample, CropSampler, avoided_findings, cut_samples,
                                     lookalike_samples, nodule_samples, segmentation_candidates,
                                     segmentation_negatives, series_ct)
from lunaseg.classify import cut_crops
from lunaseg.config import CacheConfig, ClassifierDataConfig
from lunaseg.errors import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = spheres_and_tubes(tmp_path_factory.mktemp("st"), series=4)
    summary = prepcache(root, root / "cache", config=CacheConfig(workers=1, chunk_irc=(7, 32, 32)),
                        progress=False)
    assert not summary.failed
    return root


@pytest.fixture(scope="module")
def cache(data_dir) -> Cache:
    return Cache(data_dir / "cache")


def test_nodules_and_lookalikes_come_from_the_cache(cache):
    uids = cache.series_uids[:2]
    nodules = nodule_samples(cache, uids)
    assert len(nodules) == sum(len(cache[u].nodules) for u in uids) and nodules
    assert all(s.label and s.source == "nodule" for s in nodules)
    malignancy = nodule_samples(cache, uids, "malignancy")
    assert [s.label for s in malignancy] == [n.is_malignant for u in uids for n in cache[u].nodules]
    lookalikes = lookalike_samples(cache, uids)
    assert len(lookalikes) == 8 and not any(s.label for s in lookalikes)
    # A look-alike sits on a tube: dense at its centre, like a nodule.
    crops = cut_samples({u: cache[u] for u in uids}, lookalikes + nodules, (8, 16, 16))
    assert crops.shape == (16 + len(nodules) - 8, 8, 16, 16) and crops.dtype == np.int16
    assert np.all(crops[:, 4, 8, 8] > -300)


def test_cut_samples_centres_like_classify(cache):
    entry = cache[cache.series_uids[0]]
    center = tuple(int(v) for v in entry.nodules[0].center_irc)
    crop = cut_samples({entry.series_uid: entry}, [CropSample(entry.series_uid, center, True,
                                                              "nodule")], (7, 10, 12))[0]
    full = series_ct(entry).hu  # the cached volume; crop_rc is 0 for these phantoms
    row0, col0 = entry.crop_rc
    expected = cut_crops(full, np.array([[center[0], center[1] - row0, center[2] - col0]]),
                         (7, 10, 12))[0]
    assert np.array_equal(crop, expected)
    assert crop[3, 5, 6] == full[center[0], center[1] - row0, center[2] - col0]


def test_series_ct_places_the_cropped_volume_where_it_lies(cache):
    entry = cache[cache.series_uids[1]]
    ct = series_ct(entry)
    nodule = entry.nodules[0]
    local = np.asarray(nodule.center_irc, float) - np.array([0, *entry.crop_rc])
    np.testing.assert_allclose(ct.irc_to_xyz(local), entry.geometry.irc_to_xyz(
        np.asarray(nodule.center_irc, float)), atol=1e-6)


def test_segmentation_candidates_are_computed_once_and_filtered(cache, data_dir, tmp_path,
                                                                monkeypatch):
    uids = cache.series_uids[:2]
    path = tmp_path / "seg.json"
    found = segmentation_candidates(DenseStandIn(), cache, uids, path, progress=False)
    assert set(found) == set(uids) and all(found[u] for u in uids)
    stored = json.loads(path.read_text())
    assert stored["model_key"] == "module:DenseStandIn" and set(stored["series"]) == set(uids)

    def fail(*args, **kwargs):
        raise AssertionError("segmented again")

    monkeypatch.setattr(lunaseg.segment, "segment_ct", fail)
    assert segmentation_candidates(DenseStandIn(), cache, uids, path, progress=False) == found

    config = ClassifierDataConfig(segmentation_negatives=1000, min_distance_diameters=1.0)
    findings = avoided_findings(cache, uids, data_dir)
    negatives = segmentation_negatives(found, findings, config)
    assert negatives and all(not s.label and s.source == "segmentation" for s in negatives)
    total = sum(len(rows) for rows in found.values())
    assert len(negatives) < total  # the spheres' own blobs were dropped
    for sample in negatives:
        entry = cache[sample.series_uid]
        xyz = entry.geometry.irc_to_xyz(np.asarray(sample.center_irc, float))
        for nodule in entry.nodules:
            assert np.linalg.norm(xyz - np.asarray(nodule.center_xyz)) > nodule.diameter_mm - 1.0
    capped = segmentation_negatives(found, findings, ClassifierDataConfig(segmentation_negatives=1))
    assert len(capped) == len(uids)


def test_balanced_epochs_alternate_and_replay(cache):
    uids = cache.series_uids
    positives = nodule_samples(cache, uids)
    negatives = lookalike_samples(cache, uids)
    sampler = CropSampler(cache, positives, negatives, ClassifierDataConfig(), (8, 16, 16), seed=3)
    assert sampler.samples_per_epoch == 2 * len(positives)
    epoch = sampler.epoch(1)
    assert [s.label for s in epoch] == [k % 2 == 0 for k in range(len(epoch))]
    assert {s for s in epoch if s.label} == set(positives)  # each positive once
    assert sampler.epoch(1) == epoch and sampler.epoch(2) != epoch
    two = CropSampler(cache, positives, negatives,
                      ClassifierDataConfig(negatives_per_positive=2, epoch_samples=30), (8, 16, 16))
    assert sum(s.label for s in two.epoch(1)) == 10
    crops, labels, part = next(two.batches(1, 7))
    assert crops.shape == (7, 8, 16, 16) and labels.tolist() == [s.label for s in part]
    with pytest.raises(DataError, match="no negative"):
        CropSampler(cache, positives, [], ClassifierDataConfig(), (8, 16, 16))
