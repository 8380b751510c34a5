"""Samples cut from the cache: series splits, crop gathers, the training sampler, slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import add_sphere, tiny_volume
from lunaseg.cache import Cache, prepcache
from lunaseg.config import CacheConfig, DataConfig
from lunaseg.ct import write_image
from lunaseg.datasets import (CropBank, SeriesBatchSampler, SliceDataset, TrainingSampler,
                              check_data_config, load_splits, rank_share, split_series,
                              validation_items)
from lunaseg.errors import ConfigError, DataError
from lunaseg.geometry import Geometry
from lunaseg.inputs import SegmentationSpec, pad_to_multiple
from lunaseg.files import write_csv
from lunaseg.luna import ANNOTATION_COLUMNS, CANDIDATE_COLUMNS

CHUNK = (7, 48, 48)
SHAPE_IRC = (14, 62, 58)  # in-plane size not a multiple of 4: full slices need padding
CPU = torch.device("cpu")


def _write_phantoms(root: Path, centers: list[list[tuple[int, int, int]]], seed: int = 11) -> None:
    """One series per entry of ``centers`` (nodule centres, voxels), LUNA16 layout + CSVs."""
    rng = np.random.default_rng(seed)
    annotations, candidates = [], []
    geometry = Geometry.identity(spacing_xyz=(0.8, 0.8, 2.0))
    for k, series_centers in enumerate(centers):
        uid = f"1.2.840.99.{k + 1}"
        hu = tiny_volume(rng, SHAPE_IRC)
        for center in series_centers:
            add_sphere(hu, center, (2, 5, 5))
            xyz = geometry.irc_to_xyz(np.asarray(center, float))
            annotations.append([uid, *xyz.round(4), 8.0])
            candidates.append([uid, *xyz.round(4), 1])
        # A look-alike candidate (class 0) in the lung, away from the nodules.
        candidates.append([uid, *geometry.irc_to_xyz(np.array([7.0, 18, 40])).round(4), 0])
        write_image(hu, geometry, root / "subset0" / f"{uid}.mhd")
    write_csv(root / "annotations.csv", ANNOTATION_COLUMNS, annotations)
    write_csv(root / "candidates.csv", CANDIDATE_COLUMNS, candidates)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    """Five series, five nodules (one series has none), cached with 48-px chunks."""
    root = tmp_path_factory.mktemp("phantoms")
    _write_phantoms(root, [[(6, 30, 28)], [(4, 26, 24), (10, 36, 34)], [], [(8, 32, 30)],
                           [(7, 28, 33)]])
    summary = prepcache(root, root / "cache", config=CacheConfig(workers=1, chunk_irc=CHUNK),
                        progress=False)
    assert not summary.failed
    return Cache(root / "cache")


def _config(**changes) -> DataConfig:
    """Nodule crops only (no negatives, whole slices or hard negatives) unless changed."""
    return DataConfig(**{"crop_px": 32, "negative_crop_fraction": 0.0,
                         "full_slice_fraction": 0.0, "hard_negative_fraction": 0.0, **changes})


def _spec(config: DataConfig) -> SegmentationSpec:
    return SegmentationSpec(min_hu=config.min_hu, max_hu=config.max_hu,
                            context_slices=config.context_slices)


def _sampler(cache: Cache, uids, config: DataConfig, **options) -> TrainingSampler:
    return TrainingSampler(cache, uids, config, CPU, _spec(config), **options)


# ----------------------------------------------------------------------------- splits


def test_split_series_by_series_sorted_and_strided():
    uids = [f"uid{k:02d}" for k in range(25)]
    shuffled = list(np.random.default_rng(0).permutation(uids))
    splits = split_series(shuffled, DataConfig(val_stride=10))
    assert splits["val"] == ["uid00", "uid10", "uid20"]
    assert splits["test"] == []
    assert splits["train"] == [u for u in uids if u not in splits["val"]]
    assert split_series(list(reversed(uids)), DataConfig(val_stride=10)) == splits


def test_split_series_with_test_split_has_no_overlap():
    uids = [f"uid{k:02d}" for k in range(25)]
    splits = split_series(uids, DataConfig(val_stride=5, test_stride=3))
    rest = [u for k, u in enumerate(uids) if k % 5]
    assert splits["val"] == uids[::5]
    assert splits["test"] == rest[::3]
    assert splits["train"] == [u for u in rest if u not in splits["test"]]
    groups = [set(splits[name]) for name in ("train", "val", "test")]
    assert sum(len(g) for g in groups) == len(uids)
    assert set().union(*groups) == set(uids)
    with pytest.raises(ConfigError, match="val_stride"):
        split_series(uids, DataConfig(val_stride=1))


def test_pad_to_multiple_pads_bottom_right_only():
    array = np.arange(2 * 5 * 6).reshape(2, 5, 6)
    padded = pad_to_multiple(array, 4, -7)
    assert padded.shape == (2, 8, 8)
    np.testing.assert_array_equal(padded[:, :5, :6], array)
    assert (padded[:, 5:] == -7).all() and (padded[:, :, 6:] == -7).all()
    assert pad_to_multiple(padded, 4, 0) is padded


# ----------------------------------------------------------------------------- crops


def _bank(n: int = 5, channels: int = 3, size: int = 12) -> CropBank:
    hu = torch.arange(n * channels * size * size, dtype=torch.int32).reshape(
        n, channels, size, size).to(torch.int16)
    label = (hu[:, channels // 2] % 3) == 0  # a pattern that changes with every pixel
    return CropBank(hu, label)


def test_crop_bank_gathers_exact_windows():
    bank = _bank()
    index = torch.tensor([4, 0, 2, 2, 1, 3])
    hu, label = bank.crops(index, 8, torch.Generator().manual_seed(5))
    # The same generator seed draws the same offsets: (B, 2) in 0..size-crop.
    offsets = torch.randint(0, 12 - 8 + 1, (6, 2), generator=torch.Generator().manual_seed(5))
    assert hu.shape == (6, 3, 8, 8) and hu.dtype == torch.int16
    assert label.shape == (6, 1, 8, 8) and label.dtype == torch.bool
    assert len({tuple(o) for o in offsets.tolist()}) > 1  # offsets really vary
    source_hu, source_label = bank.hu.numpy(), bank.label.numpy()
    for b, (n, (row, col)) in enumerate(zip(index.tolist(), offsets.tolist())):
        np.testing.assert_array_equal(hu[b].numpy(), source_hu[n, :, row:row + 8, col:col + 8])
        np.testing.assert_array_equal(label[b, 0].numpy(),
                                      source_label[n, row:row + 8, col:col + 8])
    # Labels stay aligned with the input under the crop: same rule as the bank's labels.
    np.testing.assert_array_equal(label[:, 0].numpy(), (hu[:, 1] % 3 == 0).numpy())


def test_crop_bank_centred_crops_and_bad_size():
    bank = _bank()
    hu, label = bank.crops(torch.tensor([1, 3]), 8, torch.Generator(), random_offset=False)
    np.testing.assert_array_equal(hu.numpy(), bank.hu.numpy()[[1, 3], :, 2:10, 2:10])
    np.testing.assert_array_equal(label[:, 0].numpy(), bank.label.numpy()[[1, 3], 2:10, 2:10])
    with pytest.raises(ConfigError, match="crop_px 16"):
        bank.crops(torch.tensor([0]), 16, torch.Generator())
    with pytest.raises(ValueError, match="differ"):
        CropBank(bank.hu, bank.label[:3])


# ----------------------------------------------------------------------------- sampler


def test_sampler_batches_shapes_dtypes_and_clipping(cache):
    splits = split_series(cache.series_uids, _config())
    config = _config(min_hu=-900.0, max_hu=0.0, epoch_samples=40)
    sampler = _sampler(cache, splits["train"], config, seed=1)
    expected_chunks = sum(len(cache[uid].nodules) for uid in splits["train"])
    assert len(sampler.positives) == expected_chunks == 4
    assert sampler.steps_per_epoch(16) == 3
    batches = list(sampler.batches(1, 16))
    assert len(batches) == 3
    for input, label in batches:
        assert input.shape == (16, 7, 32, 32) and input.dtype == torch.float32
        assert label.shape == (16, 1, 32, 32) and label.dtype == torch.bool
        assert input.min() == -900 and input.max() == 0  # air and tissue are both clipped
        # 32 of 48 px around a 5-px-radius nodule: every crop holds nodule pixels.
        assert label.flatten(1).any(dim=1).all()


def test_sampler_mixes_in_negative_crops(cache):
    uids = split_series(cache.series_uids, _config())["train"]
    config = _config(negative_crop_fraction=0.5, epoch_samples=256)
    sampler = _sampler(cache, uids, config, seed=0)
    assert sampler.negatives is not None and len(sampler.negatives) >= 16
    # Negative chunks sit in the lungs, mostly away from nodules.
    negative_centres = sampler.negatives.label[:, 24, 24]
    assert negative_centres.float().mean() < 0.3
    labelled = torch.cat([label.flatten(1).sum(dim=1) for _, label in sampler.batches(1, 32)])
    assert labelled.shape == (256,)
    empty_share = (labelled == 0).float().mean().item()
    assert 0.25 < empty_share < 0.65  # about half negatives, most of them empty
    with pytest.raises(ConfigError, match="negative_crop_fraction"):
        _sampler(cache, uids, _config(negative_crop_fraction=1.0))


def test_sampler_full_slices_padded_to_multiple_of_four(cache):
    uids = split_series(cache.series_uids, _config())["train"]
    config = _config(full_slice_fraction=1.0, epoch_samples=64)
    sampler = _sampler(cache, uids, config, seed=3)
    rows, cols = cache[uids[0]].hu.shape[1:]
    assert (rows % 4, cols % 4) != (0, 0)  # the fixture really needs padding
    # 16 crops of 32 px are about 16384 / (62 * 58) ~ 5 whole slices.
    count = round(16 * 32 ** 2 / (rows * cols))
    for input, label in sampler.batches(1, 16):
        assert input.shape == (count, 7, rows + (-rows % 4), cols + (-cols % 4))
        assert label.shape == (count, 1, *input.shape[-2:]) and label.dtype == torch.bool
        assert (input[..., rows:, :] == config.min_hu).all()
        assert (input[..., :, cols:] == config.min_hu).all()
        assert not label[..., rows:, :].any() and not label[..., :, cols:].any()
        # Each slice's label is the cache mask of a slice of one series whose HU matches.
        for b in range(count):
            centre = input[b, 3, :rows, :cols].numpy()
            matches = [(uid, i) for uid in uids for i in range(cache[uid].hu.shape[0])
                       if np.array_equal(np.clip(cache[uid].hu[i], -1000, 1000), centre)]
            assert matches
            uid, index = matches[0]
            np.testing.assert_array_equal(label[b, 0, :rows, :cols].numpy(),
                                          cache[uid].mask_slice(index))


def test_hard_negatives_are_cut_at_the_models_false_positives(cache):
    uids = split_series(cache.series_uids, _config())["train"]
    config = _config(negative_crop_fraction=0.5, hard_negative_fraction=0.5,
                     hard_negative_slices=40, epoch_samples=64)
    sampler = _sampler(cache, uids, config, seed=2)
    static = sampler.negatives
    # A fake model that is wrong at one fixed pixel of every slice (cropped frame) and
    # right everywhere else.
    spot_rc = (20, 15)

    def predict(input: torch.Tensor) -> torch.Tensor:
        prob = torch.zeros((1, 1, *input.shape[-2:]))
        prob[0, 0, spot_rc[0], spot_rc[1]] = 0.9
        return prob

    mined = sampler.mine_hard_negatives(predict, epoch=2)
    assert mined == round(0.5 * len(static))
    assert len(sampler.negatives) == len(static)
    hard = sampler.negatives.hu[-mined:]
    # Each hard chunk is centred on the false-positive pixel of some training slice.
    half = CHUNK[1] // 2
    for chunk in hard.numpy():
        centre = chunk[CHUNK[0] // 2]
        assert any(
            np.array_equal(centre[half - 3:half + 4, half - 3:half + 4],
                           cache[uid].hu[i, spot_rc[0] - 3:spot_rc[0] + 4,
                                         spot_rc[1] - 3:spot_rc[1] + 4])
            for uid in uids for i in range(cache[uid].hu.shape[0]))
    # Deterministic per epoch; a model without false positives leaves the initial pool.
    again = _sampler(cache, uids, config, seed=2)
    again.mine_hard_negatives(predict, epoch=2)
    assert torch.equal(again.negatives.hu, sampler.negatives.hu)
    assert sampler.mine_hard_negatives(lambda x: torch.zeros((1, 1, *x.shape[-2:])), 3) == 0
    assert sampler.negatives is static
    with pytest.raises(ConfigError, match="hard_negative_fraction"):
        _sampler(cache, uids, _config(hard_negative_fraction=0.5))


def test_sampler_refuses_chunks_it_cannot_crop(cache):
    check_data_config(DataConfig())  # the defaults are fine
    uids = split_series(cache.series_uids, _config())["train"]
    # The cached chunks must have 2 * context_slices + 1 slices (crops and whole slices get
    # the same channels) and room for the crop; the error says how to prepcache.
    for config, message in ((_config(context_slices=4), "have 7 slices but 2 \\* "
                             "context_slices \\+ 1 = 9; prepcache with --chunk 9,48,48"),
                            (_config(crop_px=64), "crop_px 64 is larger than the cached "
                             "chunks \\(48 px\\); prepcache with --chunk 7,64,64")):
        with pytest.raises(DataError, match=message):
            _sampler(cache, uids, config)
    with pytest.raises(ConfigError, match="full_slice_fraction"):
        _sampler(cache, uids, _config(full_slice_fraction=2.0))


def test_saved_splits_are_reused_and_checked(tmp_path):
    uids = [f"uid{k:02d}" for k in range(12)]
    path = tmp_path / "splits.json"
    made = load_splits(path, uids, DataConfig(val_stride=3))
    assert made == split_series(uids, DataConfig(val_stride=3))
    path.write_text('{"train": ["uid01"], "val": ["uid00"], "test": []}')
    assert load_splits(path, uids, DataConfig())["val"] == ["uid00"]  # the saved one
    path.write_text('{"train": ["gone"], "val": ["uid00"], "test": []}')
    with pytest.raises(DataError, match="lists 1 series that are not here"):
        load_splits(path, uids, DataConfig())
    assert load_splits(path, uids, DataConfig(), strict=False)["train"] == ["gone"]
    path.write_text('["not", "splits"]')
    with pytest.raises(DataError, match="not a splits file"):
        load_splits(path, uids, DataConfig())


def _epoch(sampler: TrainingSampler, epoch: int = 1) -> list[torch.Tensor]:
    return [torch.cat([input.flatten(), label.flatten().float()])
            for input, label in sampler.batches(epoch, 8)]


def test_sampler_is_deterministic_per_seed_epoch_and_rank(cache):
    uids = split_series(cache.series_uids, _config())["train"]
    config = _config(negative_crop_fraction=0.25, full_slice_fraction=0.3, epoch_samples=48)
    first = _epoch(_sampler(cache, uids, config, seed=4))
    again = _epoch(_sampler(cache, uids, config, seed=4))
    assert len(first) == len(again) == 6
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    sampler = _sampler(cache, uids, config, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(first, _epoch(sampler, epoch=2)))
    other_seed = _epoch(_sampler(cache, uids, config, seed=5))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other_seed))
    rank0 = _epoch(_sampler(cache, uids, config, seed=4, rank=0, world_size=2))
    rank1 = _epoch(_sampler(cache, uids, config, seed=4, rank=1, world_size=2))
    assert len(rank0) == len(rank1) == 3  # 48 samples shared by 2 ranks of batch 8
    assert not any(a.shape == b.shape and torch.equal(a, b) for a, b in zip(rank0, rank1))


def test_steps_per_epoch_respects_world_size(cache):
    uids = split_series(cache.series_uids, _config())["train"]
    sampler = _sampler(cache, uids, _config(epoch_samples=100))
    assert sampler.samples_per_epoch == 100
    assert [sampler.steps_per_epoch(16)] == [7]
    sampler.world_size = 2
    assert sampler.steps_per_epoch(16) == 4
    sampler.world_size = 8
    assert sampler.steps_per_epoch(16) == 1
    # Without epoch_samples an epoch is one pass over the nodule chunks (plus negatives),
    # and no shorter than MIN_EPOCH_SAMPLES.
    from lunaseg.datasets import MIN_EPOCH_SAMPLES

    plain = _sampler(cache, uids, _config())
    assert len(plain.positives) == 4 and plain.samples_per_epoch == MIN_EPOCH_SAMPLES


# ----------------------------------------------------------------------------- validation


def test_validation_items_full_ct_and_positive_only(cache):
    uids = list(reversed(cache.series_uids))
    everything = validation_items(cache, uids, full_ct=True)
    assert everything == [(uid, i) for uid in cache.series_uids
                          for i in range(cache[uid].hu.shape[0])]
    positive = validation_items(cache, uids, full_ct=False)
    assert set(positive) < set(everything)
    assert positive == [(uid, int(i)) for uid in cache.series_uids
                        for i in cache[uid].positive_indices]
    for uid, index in positive:
        assert cache[uid].mask_slice(index).any()
    nodule_free = [uid for uid in cache.series_uids if not len(cache[uid].nodules)]
    assert nodule_free and not [item for item in positive if item[0] == nodule_free[0]]


def test_series_batch_sampler_never_mixes_series():
    items = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 5)]
    assert list(SeriesBatchSampler(items, 2)) == [[0, 1], [2], [3, 4], [5]]
    assert len(SeriesBatchSampler(items, 10)) == 3
    assert list(SeriesBatchSampler([], 4)) == []


def test_slice_dataset_matches_cache(cache):
    config = _config(min_hu=-950.0, max_hu=500.0)
    items = validation_items(cache, cache.series_uids, full_ct=True)
    dataset = SliceDataset(cache, items, _spec(config))
    sampler = SeriesBatchSampler(items, 5)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    seen = []
    for input, label, uids, indices in loader:
        assert len(set(uids)) == 1  # one series, one slice size per batch
        uid = uids[0]
        entry = cache[uid]
        rows, cols = entry.hu.shape[1:]
        assert input.shape[1:] == (7, rows + (-rows % 4), cols + (-cols % 4))
        assert input.dtype == torch.float32 and label.dtype == torch.bool
        for b, index in enumerate(indices.tolist()):
            stack = np.clip(entry.context_stack(index, 3), -950, 500)
            np.testing.assert_array_equal(input[b, :, :rows, :cols].numpy(), stack)
            assert (input[b, :, rows:] == -950).all() and (input[b, :, :, cols:] == -950).all()
            np.testing.assert_array_equal(label[b, 0, :rows, :cols].numpy(),
                                          entry.mask_slice(index))
            assert not label[b, 0, rows:].any() and not label[b, 0, :, cols:].any()
            seen.append((uid, index))
    assert seen == items


def test_rank_share_splits_whole_series():
    items = [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1)]
    shares = [rank_share(items, rank, 2) for rank in range(2)]
    assert shares == [[("a", 0), ("a", 1), ("c", 0), ("c", 1)], [("b", 0)]]
    assert rank_share(items, 0, 1) == items
    assert rank_share(items, 3, 4) == []


def test_crops_by_slicing_and_by_one_gather_agree():
    generator = torch.Generator().manual_seed(0)
    bank = CropBank(torch.randint(-1000, 1000, (20, 7, 40, 40), dtype=torch.int16),
                    torch.rand(20, 40, 40) > 0.7)
    index = torch.randint(0, 20, (9,), generator=generator)
    offset = torch.randint(0, 40 - 24 + 1, (9, 2), generator=generator)
    hu, label = bank._gather(index, offset, 24)
    for k, (n, (r, c)) in enumerate(zip(index.tolist(), offset.tolist())):
        assert torch.equal(hu[k], bank.hu[n, :, r:r + 24, c:c + 24])
        assert torch.equal(label[k, 0], bank.label[n, r:r + 24, c:c + 24])
    sliced = bank.crops(index, 24, torch.Generator().manual_seed(5))
    gathered_offsets = torch.randint(0, 17, (9, 2), generator=torch.Generator().manual_seed(5))
    gathered = bank._gather(index, gathered_offsets, 24)
    assert torch.equal(sliced[0], gathered[0]) and torch.equal(sliced[1], gathered[1])
