"""The prepcache: exact contents, incremental, atomic, self-repairing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BENIGN_HU, MALIGNANT_HU, class_luna

from lunaseg.cache import Cache, pad_crop, prepcache
from lunaseg.config import CacheConfig, SynthConfig
from lunaseg.ct import load_ct, write_image
from lunaseg.errors import ConfigError, DataError
from lunaseg.luna import find_series, outline_mask_path, read_nodules
from lunaseg.masks import annotation_classes, annotation_mask
from lunaseg.synth import synthesize_dataset

SERIAL = CacheConfig(workers=1, chunk_irc=(7, 32, 32))


def test_cache_holds_what_training_reads(tiny_luna, tmp_path):
    summary = prepcache(tiny_luna, tmp_path / "cache", config=SERIAL, progress=False)
    assert len(summary.built) == 3 and not summary.failed
    cache = Cache(tmp_path / "cache")
    assert cache.series_uids == sorted(find_series(tiny_luna))
    for uid, path in find_series(tiny_luna).items():
        ct = load_ct(path)
        entry = cache[uid]
        row0, col0 = entry.crop_rc
        rows, cols = entry.hu.shape[1:]
        # The crop drops only air: every voxel outside it is below -500 HU.
        outside = np.ones(ct.hu.shape[1:], bool)
        outside[row0:row0 + rows, col0:col0 + cols] = False
        assert (ct.hu[:, outside] < -500).all()
        np.testing.assert_array_equal(entry.hu, ct.hu[:, row0:row0 + rows, col0:col0 + cols])
        assert entry.geometry.allclose(ct.geometry) and entry.shape_irc == ct.hu.shape
        mask = annotation_mask(ct.hu, ct.geometry,
                               [(n.center_xyz, n.diameter_mm) for n in entry.nodules])
        np.testing.assert_array_equal(entry.mask(), mask[:, row0:row0 + rows, col0:col0 + cols])
        np.testing.assert_array_equal(entry.positive_indices,
                                      np.flatnonzero(mask.any(axis=(1, 2))))
        for k, nodule in enumerate(entry.nodules):
            i, r, c = nodule.center_irc
            chunk, chunk_mask = entry.chunk(nodule.center_irc, (7, 32, 32))
            np.testing.assert_array_equal(entry.chunks[k], chunk)
            np.testing.assert_array_equal(entry.chunk_masks[k], chunk_mask)
            assert chunk[3, 16, 16] == ct.hu[i, r, c] and chunk_mask[3, 16, 16]
        stack = entry.context_stack(0, 3)  # first slice: context repeats slice 0
        assert stack.shape == (7, rows, cols)
        for channel, index in enumerate([0, 0, 0, 0, 1, 2, 3]):
            np.testing.assert_array_equal(stack[channel], entry.hu[index])


def test_phantom_masks_replace_the_heuristic(tmp_path):
    data = tmp_path / "synth"
    synthesize_dataset(data, SynthConfig(series=3, seed=1, shape_irc=(24, 96, 96),
                                         no_nodule_fraction=0.0), progress=False)
    config = CacheConfig(workers=1, chunk_irc=(7, 32, 32), masks="outline")
    prepcache(data, tmp_path / "cache", config=config, progress=False)
    cache = Cache(tmp_path / "cache")
    assert sum(len(cache[uid].nodules) for uid in cache.series_uids) > 0
    for uid in find_series(data):
        entry = cache[uid]
        truth = load_ct(outline_mask_path(data, uid), require_ct=False).hu > 0
        row0, col0 = entry.crop_rc
        rows, cols = entry.hu.shape[1:]
        np.testing.assert_array_equal(entry.mask(), truth[:, row0:row0 + rows, col0:col0 + cols])
        for k in range(len(entry.nodules)):
            assert entry.chunk_masks[k][3, 16, 16]  # the centre of each nodule is in its mask


def _check_classes(entry, benign_hu: float, malignant_hu: float) -> None:
    """One benign and one malignant nodule: the class mask says which is which, its union is
    the nodule mask, and slices, chunks and cached chunks agree with it."""
    classes = entry.classes()
    assert classes.dtype == np.uint8 and set(np.unique(classes).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(classes > 0, entry.mask())
    assert (entry.hu[classes == 1] == benign_hu).mean() > 0.9
    assert (entry.hu[classes == 2] == malignant_hu).mean() > 0.9
    for index in (int(i) for i in entry.positive_indices):
        np.testing.assert_array_equal(entry.classes_slice(index), classes[index])
    row0, col0 = entry.crop_rc
    for k, nodule in enumerate(entry.nodules):
        want = 2 if nodule.is_malignant else 1
        i, r, c = nodule.center_irc
        assert classes[i, r - row0, c - col0] == want
        _, chunk = entry.chunk(nodule.center_irc, (7, 32, 32))
        assert chunk.dtype == np.uint8
        np.testing.assert_array_equal(entry.chunk_masks[k], chunk)
        assert chunk[3, 16, 16] == want


@pytest.mark.parametrize("masks", ["heuristic", "outline"])
def test_class_masks_of_a_phantom_with_one_benign_and_one_malignant_nodule(tmp_path, masks):
    data = class_luna(tmp_path / "data", series=1, outline_masks=True)
    config = CacheConfig(workers=1, chunk_irc=(7, 32, 32), masks=masks)
    assert not prepcache(data, config=config, progress=False).failed
    entry = Cache(data / "cache")[find_series(data).popitem()[0]]
    assert sorted(n.is_malignant for n in entry.nodules) == [False, True]
    _check_classes(entry, BENIGN_HU, MALIGNANT_HU)
    ct = load_ct(next(iter(find_series(data).values())))
    row0, col0 = entry.crop_rc
    rows, cols = entry.hu.shape[1:]
    if masks == "outline":  # the mask file's own values
        truth = load_ct(outline_mask_path(data, entry.series_uid), require_ct=False).hu
    else:  # the book's heuristic, each nodule's voxels with its class
        nodules = read_nodules(data / "annotations_with_malignancy.csv")
        truth = annotation_classes(ct.hu, ct.geometry,
                                   [(n.center_xyz, n.diameter_mm, n.is_malignant)
                                    for n in nodules])
        np.testing.assert_array_equal(truth > 0, annotation_mask(
            ct.hu, ct.geometry, [(n.center_xyz, n.diameter_mm) for n in nodules]))
    np.testing.assert_array_equal(entry.classes(),
                                  truth[:, row0:row0 + rows, col0:col0 + cols])


def test_an_outline_mask_without_classes_takes_them_from_the_nearest_nodule(tmp_path):
    # A 0/1 mask, as lunaseg wrote before class masks and other tools write.
    data = class_luna(tmp_path / "data", series=1, outline_masks=True)
    mask_path = next((data / "masks").glob("*.mha"))
    mask = load_ct(mask_path, require_ct=False)
    write_image((mask.hu > 0).astype(np.uint8), mask.geometry, mask_path, compress=True)
    config = CacheConfig(workers=1, chunk_irc=(7, 32, 32), masks="outline")
    assert not prepcache(data, config=config, progress=False).failed
    entry = Cache(data / "cache")[mask_path.name[:-len(".mha")]]
    _check_classes(entry, BENIGN_HU, MALIGNANT_HU)


def test_an_outline_mask_with_other_values_is_named(tmp_path):
    data = class_luna(tmp_path / "data", series=1, outline_masks=True)
    mask_path = next((data / "masks").glob("*.mha"))
    mask = load_ct(mask_path, require_ct=False)
    write_image((mask.hu > 0).astype(np.uint8) * 255, mask.geometry, mask_path, compress=True)
    config = CacheConfig(workers=1, chunk_irc=(7, 32, 32), masks="outline")
    summary = prepcache(data, config=config, progress=False)
    (reason,) = summary.failed.values()
    assert str(mask_path) in reason and "values 0..255" in reason and "\n" not in reason


def test_chunks_anywhere_match_the_full_arrays(tiny_luna, tmp_path):
    prepcache(tiny_luna, tmp_path / "cache", config=SERIAL, progress=False)
    cache = Cache(tmp_path / "cache")
    entry = cache[cache.series_uids[1]]
    full_mask = entry.mask()
    assert full_mask.any()
    i, r, c = entry.nodules[0].center_irc
    row0, col0 = entry.crop_rc
    rows, cols = entry.hu.shape[1:]
    # Centred on a nodule, at every corner and edge (partly outside), and wholly outside.
    centers = [(i, r, c), (0, row0, col0), (19, row0 + rows - 1, col0 + cols - 1),
               (10, row0 + 3, col0 + cols // 2 + 5), (5, row0 + rows + 40, col0)]
    for center in centers:
        for size in [(7, 32, 32), (3, 13, 9)]:
            hu, mask = entry.chunk(center, size)
            start = np.asarray(center) - np.asarray(size) // 2 - np.array([0, row0, col0])
            np.testing.assert_array_equal(hu, pad_crop(entry.hu, start, size, -1000))
            np.testing.assert_array_equal(mask, pad_crop(full_mask, start, size, False))


def test_incremental_and_corruption_repair(tiny_luna, tmp_path):
    cache_dir = tmp_path / "cache"
    prepcache(tiny_luna, cache_dir, config=SERIAL, progress=False)
    again = prepcache(tiny_luna, cache_dir, config=SERIAL, progress=False)
    assert len(again.skipped) == 3 and not again.built
    uids = sorted(find_series(tiny_luna))
    # A truncated array and a flipped byte (same size) are both noticed and rebuilt.
    hu_file = cache_dir / uids[0] / "hu.npy"
    hu_file.write_bytes(hu_file.read_bytes()[:-10])
    chunks_file = cache_dir / uids[1] / "hu.npy"
    data = bytearray(chunks_file.read_bytes())
    data[-3] ^= 0xFF
    chunks_file.write_bytes(bytes(data))
    # Readers notice the truncated one when they open it: one warning, the series skipped.
    assert Cache(cache_dir).usable() == uids[1:]
    with pytest.raises(DataError, match=r"hu\.npy: \d+ bytes, the cache wrote \d+"):
        Cache(cache_dir)[uids[0]].check()
    repaired = prepcache(tiny_luna, cache_dir, config=SERIAL, progress=False)
    assert sorted(repaired.built) == uids[:2] and len(repaired.skipped) == 1
    assert Cache(cache_dir).usable() == uids
    # A changed source file or nodule list rebuilds just that entry.
    source = find_series(tiny_luna)[uids[2]]
    source.write_text(source.read_text())  # new mtime
    assert prepcache(tiny_luna, cache_dir, config=SERIAL, progress=False).built == [uids[2]]
    # A half-written entry from a killed run is cleaned up and never listed.
    (cache_dir / f".tmp-{uids[0]}-999").mkdir()
    prepcache(tiny_luna, cache_dir, config=SERIAL, progress=False)
    assert not list(cache_dir.glob(".tmp-*"))
    meta = json.loads((cache_dir / uids[0] / "meta.json").read_text())
    assert meta["series_uid"] == uids[0]


def test_series_gone_from_the_data_folder_leave_the_cache(tiny_luna, tmp_path, caplog):
    cache_dir = tiny_luna / "cache"  # the data folder's own cache
    prepcache(tiny_luna, config=SERIAL, progress=False)
    prepcache(tiny_luna, tmp_path / "shared", config=SERIAL, progress=False)
    sources = find_series(tiny_luna)
    gone = sorted(sources)[1]
    sources[gone].unlink()
    sources[gone].with_suffix(".raw").unlink()
    # A cache elsewhere may serve other data folders too: the entry stays, with a warning.
    with caplog.at_level("WARNING", logger="lunaseg"):
        shared = prepcache(tiny_luna, tmp_path / "shared", config=SERIAL, progress=False)
    assert not shared.dropped and gone in Cache(tmp_path / "shared").series_uids
    assert f"holds 1 series not in {tiny_luna}" in caplog.text
    summary = prepcache(tiny_luna, config=SERIAL, progress=False)
    assert summary.dropped == [gone] and len(summary.skipped) == 2 and not summary.built
    assert "1 dropped" in summary.line()
    assert Cache(cache_dir).series_uids == sorted(set(sources) - {gone})
    assert not (cache_dir / gone).exists() and not list(cache_dir.glob(".old-*"))
    # A folder prepcache did not write is not its to remove, even with a meta.json in it.
    (cache_dir / "notes").mkdir()
    (cache_dir / "notes" / "meta.json").write_text("{}")
    again = prepcache(tiny_luna, config=SERIAL, progress=False)
    assert not again.dropped and (cache_dir / "notes" / "meta.json").exists()


def test_negative_workers_are_refused_before_any_folder(tiny_luna, tmp_path):
    config = CacheConfig(workers=-1, chunk_irc=(7, 32, 32))
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        prepcache(tiny_luna, tmp_path / "cache", config=config, progress=False)
    assert not (tmp_path / "cache").exists()


def test_parallel_build_matches_serial(tiny_luna, tmp_path):
    prepcache(tiny_luna, tmp_path / "a", config=SERIAL, progress=False)
    parallel = CacheConfig(workers=2, chunk_irc=(7, 32, 32))
    prepcache(tiny_luna, tmp_path / "b", config=parallel, progress=False)
    a, b = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    for uid in a.series_uids:
        np.testing.assert_array_equal(a[uid].hu, b[uid].hu)
        np.testing.assert_array_equal(a[uid].chunks, b[uid].chunks)


def test_bad_source_is_reported_and_others_build(tiny_luna, tmp_path):
    uid, path = next(iter(find_series(tiny_luna).items()))
    path.with_suffix(".raw").write_bytes(b"\0" * 10)
    summary = prepcache(tiny_luna, tmp_path / "cache", config=SERIAL, progress=False)
    assert list(summary.failed) == [uid] and len(summary.built) == 2
    assert str(path) in summary.failed[uid]
    with pytest.raises(DataError, match="no <series-uid>.mhd"):
        prepcache(tmp_path / "cache", tmp_path / "c2", config=SERIAL, progress=False)


def test_old_cache_format_is_refused(tiny_luna, tmp_path):
    prepcache(tiny_luna, tmp_path / "cache", config=SERIAL, progress=False)
    meta_path = next((tmp_path / "cache").glob("*/meta.json"))
    meta = json.loads(meta_path.read_text())
    meta["format"] = 2  # the last format before class masks
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"cache format 2 is not this lunaseg's \(3\); run "
                                        r"`lunaseg prepcache` again") as error:
        Cache(tmp_path / "cache")
    assert "\n" not in str(error.value) and str(meta_path) in str(error.value)
    rebuilt = prepcache(tiny_luna, tmp_path / "cache", config=SERIAL, progress=False)
    assert rebuilt.built == [meta["series_uid"]]


def test_pad_crop_pads_instead_of_shifting():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    out = pad_crop(volume, (-2, -1, 4), (3, 3, 4), fill=-1)
    assert out.shape == (3, 3, 4)
    np.testing.assert_array_equal(out[:, 0], -1)  # row -1 is outside: filled
    np.testing.assert_array_equal(out[:, :, 2:], -1)  # columns 6, 7 are outside
    np.testing.assert_array_equal(out[0, 1:, :2], volume[0, :2, 4:])  # slice -2 repeats slice 0
    np.testing.assert_array_equal(out[2, 1:, :2], volume[0, :2, 4:])


def test_one_missing_raw_never_stops_the_other_series(tiny_luna, tmp_path):
    uids = sorted(find_series(tiny_luna))
    find_series(tiny_luna)[uids[1]].with_suffix(".raw").unlink()
    summary = prepcache(tiny_luna, tmp_path / "cache", config=SERIAL, progress=False)
    assert sorted(summary.built) == [uids[0], uids[2]]
    assert list(summary.failed) == [uids[1]] and "raw is missing" in summary.failed[uids[1]]
    assert "1 failed" in summary.line() and "raw is missing" in summary.line()
