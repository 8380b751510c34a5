"""Synthetic LUNA16-format phantoms: determinism, on-disk layout, CSVs, anatomy sanity."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lunaseg.config import SynthConfig
from lunaseg.ct import load_ct
from lunaseg.errors import ConfigError, DataError
from lunaseg.luna import (ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, MALIGNANCY_COLUMNS,
                          outline_mask_path)
from lunaseg.synth import (CALCIFIED_MAX_MM, KIND_SHARES, MIN_DIAMETER_MM, NODULE_KINDS,
                           NODULE_LOCATIONS, PHANTOM_NODULE_COLUMNS, PHANTOM_NODULES_FILE,
                           SUBSOLID_MIN_MM, UID_PREFIX, kind_weights, luna16_diameter_mm,
                           make_phantom, synthesize_dataset)

from conftest import shared_path

SMALL = (24, 96, 96)


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SynthConfig, object]:
    """20 small scans over 3 subsets: enough for scans without nodules to appear."""
    config = SynthConfig(series=20, seed=5, shape_irc=SMALL, subsets=3)
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize_dataset(out, config, progress=False)
    return out, config, summary


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((40, 160, 160), rng=np.random.default_rng(11), n_nodules=4)


def _size_shares(diameters_mm) -> np.ndarray:
    counts = np.histogram(diameters_mm, bins=[0.0, 4.0, 6.0, 10.0, 20.0, np.inf])[0]
    return counts / counts.sum()


def test_nodule_diameters_follow_luna16():
    """Phantom nodules have the sizes of LUNA16's real annotated nodules, band by band."""
    path = shared_path("data", "luna16", "annotations.csv")
    with path.open(newline="") as f:
        real_mm = [float(row["diameter_mm"]) for row in csv.DictReader(f)]
    drawn_mm = [luna16_diameter_mm(q) for q in np.random.default_rng(0).random(20_000)]
    assert np.abs(_size_shares(drawn_mm) - _size_shares(real_mm)).max() < 0.02
    assert min(drawn_mm) >= MIN_DIAMETER_MM


def test_nodule_kinds_keep_their_shares_and_sizes():
    drawn_mm = [luna16_diameter_mm(q) for q in np.random.default_rng(1).random(20_000)]
    weights = np.array([kind_weights(d) for d in drawn_mm])
    assert weights.min() >= 0 and np.allclose(weights.sum(axis=1), 1.0)
    assert np.abs(weights.mean(axis=0) - KIND_SHARES).max() < 0.01
    subsolid = [NODULE_KINDS.index("part_solid"), NODULE_KINDS.index("ground_glass")]
    small = np.array(drawn_mm) < SUBSOLID_MIN_MM
    assert (weights[small][:, subsolid] == 0).all() and small.mean() > 0.3
    large = np.array(drawn_mm) > CALCIFIED_MAX_MM
    assert (weights[large][:, NODULE_KINDS.index("calcified")] == 0).all()


def test_same_seed_same_arrays_different_seed_differs():
    a = make_phantom(SMALL, rng=np.random.default_rng(3))
    b = make_phantom(SMALL, rng=np.random.default_rng(3))
    c = make_phantom(SMALL, rng=np.random.default_rng(4))
    assert a.hu.dtype == np.int16 and a.hu.shape == SMALL
    assert np.array_equal(a.hu, b.hu) and a.series_uid == b.series_uid
    assert a.geometry == b.geometry
    assert np.array_equal(a.lookalike_xyz, b.lookalike_xyz)
    assert [n.center_xyz.tolist() for n in a.nodules] == [n.center_xyz.tolist() for n in b.nodules]
    assert not np.array_equal(a.hu, c.hu) and a.series_uid != c.series_uid


def test_dataset_bytes_repeat_for_a_seed(dataset, tmp_path):
    """The same seed writes the same bytes, in one process or in a pool of two."""
    out, config, _ = dataset
    small = SynthConfig(series=3, seed=config.seed, shape_irc=SMALL, subsets=2, workers=1)
    first = tmp_path / "a"
    second = tmp_path / "b"
    synthesize_dataset(first, small, progress=False)
    synthesize_dataset(second, dataclasses.replace(small, workers=2), progress=False)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(second) for p in second.rglob("*")
                                     if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = tmp_path / "c"
    synthesize_dataset(other, SynthConfig(series=3, seed=config.seed + 1, shape_irc=SMALL,
                                          subsets=2), progress=False)
    assert (other / "annotations.csv").read_bytes() != (first / "annotations.csv").read_bytes()
    # A folder that already holds scans is not written into: the old scans would be left out
    # of the new CSVs, their nodules taken for clean lung.
    before = (first / "annotations.csv").read_bytes()
    with pytest.raises(DataError, match="already holds a dataset \\(3 scans\\)"):
        synthesize_dataset(first, dataclasses.replace(small, series=1), progress=False)
    assert (first / "annotations.csv").read_bytes() == before


def test_layout_subsets_and_mhd_pairs(dataset):
    out, config, summary = dataset
    assert len(summary.series_uids) == config.series == len(set(summary.series_uids))
    for k, uid in enumerate(summary.series_uids):
        assert uid.startswith(UID_PREFIX)
        mhd = out / f"subset{k % config.subsets}" / f"{uid}.mhd"
        assert mhd.exists() and mhd.with_suffix(".raw").exists()
    uid = summary.series_uids[1]
    ct = load_ct(out / "subset1" / f"{uid}.mhd")
    assert ct.hu.dtype == np.int16 and ct.hu.shape == SMALL
    assert np.allclose(ct.geometry.direction, np.eye(3))
    assert ct.hu.min() >= -1024  # no -2048/-3024 padding: outside is plain air
    expected = make_phantom(SMALL, rng=np.random.default_rng(
        np.random.SeedSequence(config.seed).spawn(config.series + 1)[1:][1]),
        with_nodules=True, max_nodules=config.max_nodules)
    assert expected.series_uid == uid
    assert ct.geometry.allclose(expected.geometry)


def test_csv_columns_exact(dataset):
    out, _, _ = dataset
    assert read_rows(out / "annotations.csv")[0] == list(ANNOTATION_COLUMNS)
    assert read_rows(out / "annotations_with_malignancy.csv")[0] == list(MALIGNANCY_COLUMNS)
    assert read_rows(out / "annotations_excluded.csv")[0] == list(ANNOTATION_COLUMNS)
    assert read_rows(out / "candidates.csv")[0] == list(CANDIDATE_COLUMNS)


def test_phantom_nodules_describe_every_annotation(dataset):
    out, _, _ = dataset
    columns, described = read_rows(out / PHANTOM_NODULES_FILE)
    assert tuple(columns) == PHANTOM_NODULE_COLUMNS
    _, annotations = read_rows(out / "annotations.csv")
    assert [{c: r[c] for c in ANNOTATION_COLUMNS} for r in described] == annotations
    assert {r["kind"] for r in described} <= set(NODULE_KINDS)
    assert {r["location"] for r in described} <= set(NODULE_LOCATIONS)
    assert {r["shape"] for r in described} <= {"round", "lobulated", "spiculated"}


def test_annotations_inside_volume_and_dense(dataset):
    out, config, summary = dataset
    _, rows = read_rows(out / "annotations.csv")
    assert rows
    paths = {p.name[:-4]: p for p in out.rglob("*.mhd")}
    cts = {}
    for row in rows:
        uid = row["seriesuid"]
        ct = cts.setdefault(uid, load_ct(paths[uid]))
        xyz = np.array([float(row[k]) for k in ("coordX", "coordY", "coordZ")])
        irc = ct.geometry.xyz_to_irc(xyz)
        assert np.all(irc >= 0) and np.all(irc < np.asarray(ct.hu.shape)), row
        assert ct.hu[tuple(irc)] > -700, row  # a nodule is denser than lung air
        assert 3.0 <= float(row["diameter_mm"]) <= 30.0
        # It sits in the lung: plenty of lung-air voxels within a few cm around it.
        lo = np.maximum(irc - [3, 15, 15], 0)
        around = ct.hu[lo[0]:irc[0] + 4, lo[1]:irc[1] + 16, lo[2]:irc[2] + 16]
        assert (around < -700).mean() > 0.15, row


def test_malignancy_columns(dataset):
    out, _, _ = dataset
    _, plain = read_rows(out / "annotations.csv")
    _, rows = read_rows(out / "annotations_with_malignancy.csv")
    assert len(rows) == len(plain)
    for row in rows:
        ratings = [int(v) for v in row["mal_details"].strip("[]").split(",")]
        assert all(1 <= v <= 5 for v in ratings)
        assert int(row["len_mal_details"]) == len(ratings)
        assert row["mal_bool"] == str(sum(v >= 4 for v in ratings) >= 2)
        radius = float(row["diameter_mm"]) / 2
        for axis in "XYZ":
            centre = float(row[f"coord{axis}"])
            assert float(row[f"bboxLow{axis}"]) == pytest.approx(centre - radius, abs=1e-5)
            assert float(row[f"bboxHigh{axis}"]) == pytest.approx(centre + radius, abs=1e-5)


def test_some_scans_have_no_nodules(dataset):
    out, config, summary = dataset
    _, rows = read_rows(out / "annotations.csv")
    with_nodules = {row["seriesuid"] for row in rows}
    empty = set(summary.series_uids) - with_nodules
    assert len(empty) >= round(config.no_nodule_fraction * config.series)
    assert len(with_nodules) >= config.series // 2


def test_excluded_nodules_are_tiny(dataset):
    out, _, summary = dataset
    _, rows = read_rows(out / "annotations_excluded.csv")
    assert rows and summary.n_excluded == len(rows)
    assert all(float(row["diameter_mm"]) < MIN_DIAMETER_MM for row in rows)


def test_candidates_hold_every_nodule_and_many_negatives(dataset):
    out, config, summary = dataset
    _, nodules = read_rows(out / "annotations.csv")
    _, rows = read_rows(out / "candidates.csv")
    positives = {(r["seriesuid"], r["coordX"], r["coordY"], r["coordZ"])
                 for r in rows if r["class"] == "1"}
    assert positives == {(r["seriesuid"], r["coordX"], r["coordY"], r["coordZ"])
                         for r in nodules}
    negatives = [r for r in rows if r["class"] == "0"]
    assert len(negatives) >= 20 * config.series
    uids = [r["seriesuid"] for r in rows]
    assert uids == sorted(uids)  # sorted by series, as LUNA16's file is


def test_nodule_records(phantom):
    assert phantom.nodules
    for nodule in phantom.nodules:
        assert nodule.kind in NODULE_KINDS and nodule.location in NODULE_LOCATIONS
        assert MIN_DIAMETER_MM <= nodule.diameter_mm <= 30
        irc = phantom.geometry.xyz_to_irc(nodule.center_xyz)
        assert phantom.hu[tuple(irc)] > -700
        if nodule.kind == "calcified":
            assert not nodule.is_malignant
    for nodule in phantom.excluded:
        assert nodule.diameter_mm < MIN_DIAMETER_MM
    assert phantom.lookalike_xyz.ndim == 2 and phantom.lookalike_xyz.shape[1] == 3
    assert len(phantom.lookalike_xyz) >= 30


def test_nodule_mask_is_the_annotated_nodules(phantom):
    mask = phantom.nodule_mask
    assert mask.shape == phantom.hu.shape and mask.dtype == bool
    labels, count = ndimage.label(mask)
    spacing_irc = phantom.geometry.spacing_xyz[::-1]
    voxel_mm3 = float(np.prod(spacing_irc))
    for nodule in phantom.nodules:
        irc = tuple(phantom.geometry.xyz_to_irc(nodule.center_xyz))
        assert mask[irc], nodule  # every annotated centre is inside the mask
        if nodule.shape == "round":
            # A round nodule's component holds about its sphere's volume.
            sphere_mm3 = np.pi / 6 * nodule.diameter_mm ** 3
            component_mm3 = (labels == labels[irc]).sum() * voxel_mm3
            assert 0.5 * sphere_mm3 < component_mm3 < 2.0 * sphere_mm3, nodule
    for nodule in phantom.excluded:  # tiny findings stay out: they are not annotated
        assert not mask[tuple(phantom.geometry.xyz_to_irc(nodule.center_xyz))]
    # Nothing else (no pleural bump, no vessel): every mask voxel is within reach of an
    # annotated nodule, its spicules included (up to 2.4 radii; a thin spicule's tip may
    # come out as a separate component at coarse voxels).
    mask_xyz = phantom.geometry.irc_to_xyz(np.argwhere(mask))
    reach_mm = np.stack([np.linalg.norm(mask_xyz - n.center_xyz, axis=1)
                         - 1.2 * n.diameter_mm for n in phantom.nodules]).min(axis=0)
    assert reach_mm.max() <= float(np.linalg.norm(spacing_irc))
    # Denser than lung (around -850 HU) even for ground glass (-520 to -330 HU before noise).
    assert np.percentile(phantom.hu[mask], 10) > -750


def test_annotated_nodules_are_seen_against_lung(phantom):
    """A reader can only annotate what stands out: lung surrounds most of every nodule."""
    labels, _ = ndimage.label(phantom.nodule_mask)
    for nodule in phantom.nodules:
        own = labels == labels[tuple(phantom.geometry.xyz_to_irc(nodule.center_xyz))]
        shell = ndimage.binary_dilation(own, iterations=2) & ~own
        assert (phantom.hu[shell] < -600).mean() > 0.3, nodule


def test_tubes_inside_is_distance_to_the_tapered_axis():
    from lunaseg.synth import _Tubes

    tube = _Tubes.polyline([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], [2.0, 1.0])
    points = np.array([[0.0, 1.9, 0.0], [0.0, 2.1, 0.0], [10.0, 0.0, 0.9], [10.0, 0.0, 1.1],
                       [-1.5, 0.0, 0.0], [-2.5, 0.0, 0.0], [5.0, 1.4, 0.0], [5.0, 1.6, 0.0]])
    assert tube.inside(points).tolist() == [True, False, True, False,
                                            True, False, True, False]
    assert not _Tubes.empty().inside(points).any()


def test_dataset_masks_open_with_the_scans_geometry(dataset):
    out, config, summary = dataset
    for k, uid in enumerate(summary.series_uids[:4]):
        ct = load_ct(out / f"subset{k % config.subsets}" / f"{uid}.mhd")
        mask = load_ct(outline_mask_path(out, uid), require_ct=False)
        assert mask.hu.shape == ct.hu.shape and mask.geometry.allclose(ct.geometry)
        rows = [r for r in read_rows(out / "annotations_with_malignancy.csv")[1]
                if r["seriesuid"] == uid]
        for row in rows:
            xyz = np.array([float(row[c]) for c in ("coordX", "coordY", "coordZ")])
            # The mask carries each nodule's class: 2 malignant, 1 benign.
            assert mask.hu[tuple(ct.geometry.xyz_to_irc(xyz))] == (
                2 if row["mal_bool"] == "True" else 1)
        assert (mask.hu > 0).any() == bool(rows)
        assert set(np.unique(mask.hu).tolist()) <= {0, 1, 2}


def test_tissue_statistics(phantom):
    hu = phantom.hu
    body = hu > -500
    lungish = np.zeros(hu.shape, bool)
    for i in range(hu.shape[0]):
        filled = ndimage.binary_fill_holes(ndimage.binary_closing(body[i], iterations=2))
        lungish[i] = ndimage.binary_erosion(filled & ~body[i], iterations=2)
    assert lungish.mean() > 0.05
    lung_values = hu[lungish | (ndimage.binary_dilation(lungish, iterations=1) & (hu > -500))]
    assert -900 < np.median(lung_values) < -800
    assert (hu > 300).sum() > 500  # ribs, spine, sternum
    assert (hu[:, :, :] > 300).any(axis=(1, 2)).all()
    # Vessel cross-sections: many separate dense blobs inside the lungs of every slice.
    counts = []
    for i in range(hu.shape[0]):
        filled = ndimage.binary_fill_holes(lungish[i])
        counts.append(ndimage.label(filled & (hu[i] > -500))[1])
    assert np.median(counts) >= 15
    # Air outside the body is air.
    assert np.median(hu[:, :3, :]) < -900


def test_small_shapes_show_a_whole_chest():
    tiny = make_phantom((16, 64, 64), rng=np.random.default_rng(0))
    middle = tiny.hu[8]
    upper = middle[8:28]  # above the scanner table, which curves up to the image edges
    assert (upper[:, 0] < -500).all() and (upper[:, -1] < -500).all()  # body inside FOV
    assert ((middle > -500).mean() > 0.25) and ((middle < -700).mean() > 0.4)


def test_explicit_spacing_and_no_nodules():
    p = make_phantom(SMALL, rng=np.random.default_rng(2), spacing_xyz=(2.0, 2.0, 2.5),
                     with_nodules=False)
    assert p.nodules == []
    assert np.allclose(p.geometry.spacing_xyz, (2.0, 2.0, 2.5))


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="shape_irc"):
        make_phantom((4, 10, 10), rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="rng"):
        make_phantom(SMALL, rng=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="series"):
        synthesize_dataset(tmp_path, SynthConfig(series=0), progress=False)
    with pytest.raises(ConfigError, match="workers"):
        synthesize_dataset(tmp_path, SynthConfig(series=1, workers=-1), progress=False)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        synthesize_dataset(tmp_path, SynthConfig(series=1, seed=-5), progress=False)


def _anatomy(seed: int, shape=(40, 160, 160), spacing_irc=(2.5, 2.2, 2.2)):
    from lunaseg.synth.anatomy import _Anatomy

    return _Anatomy(np.random.default_rng(seed), shape, spacing_irc)


def test_heart_lies_between_the_lungs():
    anat = _anatomy(3)
    z, y, x = anat.heart_c
    assert not anat.lung_at(z, y, x)  # the heart's centre is mediastinum
    right = anat.x_mid - np.linspace(0.3, 0.9, 12) * anat.a_cav
    left = anat.x_mid + np.linspace(0.3, 0.9, 12) * anat.a_cav
    assert anat.lung_at(z, y, right).any() and anat.lung_at(z, y, left).any()
    assert anat.heart_c[2] > anat.x_mid  # on the patient's left


def test_fat_lies_under_the_skin_and_muscle_under_the_fat():
    from lunaseg.synth.render import _TissueMaps

    anat = _anatomy(4)
    tissue = _TissueMaps(anat, np.random.default_rng(0))
    row = int(round(anat.cy / anat.spacing[1]))
    line = tissue.wall2d[row]  # left to right through the body's widest part
    first = int(np.argmax(line > -500))  # the skin
    inward = line[first + 1: first + 1 + int(40 * anat.scale / anat.spacing[2])]
    fat = np.isclose(inward, anat.fat_hu)
    assert fat[:2].all()  # fat right under the skin
    assert np.isclose(inward, anat.muscle_hu).any()  # then muscle
    assert np.argmax(np.isclose(inward, anat.muscle_hu)) > np.argmax(fat)


def test_vessel_trees_grow_from_the_hilum_without_gaps():
    from lunaseg.synth.anatomy import _CoarseLung, _lung_points
    from lunaseg.synth.tubes import _grow_tree

    anat = _anatomy(5)
    rng = np.random.default_rng(1)
    points = _lung_points(anat, 400, 0.0, rng)
    points = points[points[:, 2] > anat.x_mid]
    root = anat.hilum(1)
    tubes, forks = _grow_tree(root, points, 0.3, rng)
    assert len(forks) > 20
    ends = {tuple(p) for p in tubes.p1} | {tuple(root)}
    assert all(tuple(p) in ends for p in tubes.p0)  # every branch starts where another ends
    widest = np.argmax(tubes.r0)
    assert np.allclose(tubes.p0[widest], root)  # the trunk is the widest vessel
    assert _CoarseLung(anat).mask.any()


def test_scapulae_lie_on_the_back_ribs_in_the_upper_chest():
    from lunaseg.synth.render import _Bones, _TissueMaps

    anat = _anatomy(6, shape=(90, 160, 160), spacing_irc=(3.0, 2.2, 2.2))
    rng = np.random.default_rng(0)
    tissue = _TissueMaps(anat, rng)
    bones = _Bones(anat, tissue, rng)
    rows, cols = np.nonzero(bones.scapula)
    assert len(rows) > 20
    y_mm, x_mm = rows * anat.spacing[1], cols * anat.spacing[2]
    assert (y_mm > anat.cy_cav).all()  # behind the cavity's centre
    assert (x_mm < anat.x_mid).any() and (x_mm > anat.x_mid).any()  # one on each side
    assert (tissue.out_mm2d[bones.scapula] > anat.rib_depth).all()  # outside the ribs
    hu = np.zeros((2, 160, 160), np.float32)
    bones.paint(hu, np.array([anat.scap_z0 - 5.0, anat.scap_z0 + 5.0]))
    below, above = hu[0][bones.scapula], hu[1][bones.scapula]
    assert (below == 0).mean() > 0.9  # under its tip only a rib may cross the blade
    assert (above > 100).all() and (above > 800).mean() > 0.3  # marrow inside a cortex


def test_breasts_and_stomach_gas_where_a_patient_has_them():
    from lunaseg.synth.render import _TissueMaps

    anat = _anatomy(11, shape=(90, 160, 160), spacing_irc=(3.0, 2.2, 2.2))  # has both, and
    assert anat.z_base > 0  # the volume reaches below the diaphragm
    assert anat.breast_r > 0 and anat.stomach_gas_mm > 0
    tissue = _TissueMaps(anat, np.random.default_rng(0))
    y = np.arange(anat.shape[1])[:, None] * anat.spacing[1]
    x = np.arange(anat.shape[2])[None, :] * anat.spacing[2]
    outside_body = anat.q_body(y, x) >= 1.0
    added = outside_body & (tissue.wall2d > -500) & (y < anat.cy)
    assert added.sum() * anat.spacing[1] * anat.spacing[2] > 200  # mm^2 in front of the chest
    below = np.arange(anat.shape[0]) * anat.spacing[0]
    texture = np.zeros((12, 12, 12), np.float32)
    slab = tissue.tissue_slab(below, texture, 30.0)
    body = anat.q_body(y, x)[None] < 0.9
    under_dome = below[:, None, None] < tissue.dia2d[None]
    assert ((slab < -900) & body & under_dome).any()  # gas inside the abdomen


def test_phantom_statistics_near_real_ct(phantom):
    """ct_stats-style figures of a small phantom inside wide bounds around real CT's."""
    hu = phantom.hu
    body = np.zeros(hu.shape, bool)
    for i in range(hu.shape[0]):
        lab, n = ndimage.label(hu[i] > -500)
        sizes = np.bincount(lab.ravel())[1:]
        body[i] = ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))
    lungs = ndimage.binary_opening(body & (hu < -400), iterations=2)
    lungs = np.stack([ndimage.binary_fill_holes(s) for s in lungs])
    assert 0.08 < lungs.mean() < 0.26  # real 0.14-0.18
    assert 0.010 < (hu[lungs] > -500).mean() < 0.06  # real 0.017-0.037
    assert -900 < np.median(hu[lungs]) < -840  # real -880..-865
    bone = body & (hu >= 300)
    assert 350 < np.median(hu[bone]) < 650  # real 411-506
    soft = body & ~lungs & (hu > -200) & (hu < 200)
    assert -110 < np.median(hu[soft]) < 40  # real -74..3: fat and muscle both present
