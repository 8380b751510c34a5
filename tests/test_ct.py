"""Reading and writing CT volumes in every format users have, with exact geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_path
from lunaseg.ct import load_ct, read_geometry, write_image
from lunaseg.errors import DataError
from lunaseg.geometry import Geometry

ROTATED = Geometry(np.array([-120.5, 33.25, -310.0]), np.array([0.7, 0.65, 1.25]),
                   np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))


@pytest.mark.parametrize("suffix", [".mhd", ".mha", ".nii.gz", ".nrrd"])
def test_write_then_load_round_trip(tmp_path, suffix):
    hu = np.random.default_rng(0).integers(-1000, 1500, (6, 9, 11)).astype(np.int16)
    path = write_image(hu, ROTATED, tmp_path / f"1.2.3.4{suffix}")
    ct = load_ct(path)
    np.testing.assert_array_equal(ct.hu, hu)
    assert ct.hu.dtype == np.int16
    assert ct.geometry.allclose(ROTATED, atol=1e-4)
    assert ct.series_uid == "1.2.3.4"
    geometry, shape = read_geometry(path)
    assert shape == (6, 9, 11) and geometry.allclose(ROTATED, atol=1e-4)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temp folder


def test_mhd_keeps_luna_layout(tmp_path):
    write_image(np.zeros((2, 3, 4), np.int16), Geometry.identity(), tmp_path / "uid.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uid.mhd", "uid.raw"]


def test_float_input_is_rounded_and_clipped(tmp_path):
    path = tmp_path / "f.nii.gz"
    values = np.array([[[-4000.4, 10.6], [40000.0, -0.4]]], dtype=np.float32)
    image = sitk.GetImageFromArray(values)
    sitk.WriteImage(image, str(path))
    np.testing.assert_array_equal(load_ct(path).hu, [[[-4000, 11], [32767, 0]]])


def test_dicom_series_is_ordered_by_geometry():
    folder = shared_path("data", "lidc-idri-0001", "dicom")
    ct = load_ct(folder)
    assert ct.hu.shape == (16, 512, 512)
    assert ct.series_uid.endswith("179049373636438705059720603192")
    np.testing.assert_allclose(ct.spacing_xyz, [0.703125, 0.703125, 2.5], atol=1e-6)
    # Slice k sits at the z its own DICOM header gives, whatever the file names say.
    z_of_slice = ct.irc_to_xyz(np.stack([np.arange(16), np.zeros(16), np.zeros(16)], 1))[:, 2]
    assert np.all(np.diff(z_of_slice) > 0)
    assert z_of_slice[0] == pytest.approx(-132.5) and z_of_slice[-1] == pytest.approx(-95.0)
    reader = sitk.ImageFileReader()
    for path in sorted(folder.iterdir())[:4]:
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        z = reader.GetOrigin()[2]
        k = int(round((z - z_of_slice[0]) / 2.5))
        single = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]
        np.testing.assert_array_equal(ct.hu[k], single)
    assert -1100 < np.median(ct.hu) < 100  # Hounsfield units, rescale applied


def test_several_series_in_one_folder(tmp_path):
    for name in ("lidc-idri-0001", "lidc-idri-0002"):
        for path in shared_path("data", name, "dicom").iterdir():
            shutil.copy(path, tmp_path / f"{name}-{path.name}")
    with pytest.raises(DataError, match="holds 2 DICOM series"):
        load_ct(tmp_path)
    ct = load_ct(tmp_path, "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192")
    assert ct.hu.shape[0] == 16
    with pytest.raises(DataError, match="no DICOM series 9.9"):
        load_ct(tmp_path, "9.9")


def test_missing_slice_is_refused(tmp_path):
    files = sorted(shared_path("data", "lidc-idri-0001", "dicom").iterdir())
    reader = sitk.ImageFileReader()
    by_z = {}
    for path in files:
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        by_z[reader.GetOrigin()[2]] = path
    for k, z in enumerate(sorted(by_z)):
        if k != 5:
            shutil.copy(by_z[z], tmp_path / by_z[z].name)
    with pytest.raises(DataError, match="unevenly spaced"):
        load_ct(tmp_path)


@pytest.mark.parametrize("content, name, message", [
    (b"not an image", "broken.mhd", "not a MetaImage header"),
    (b"garbage", "broken.mha", "cannot read image"),
    (b"", "empty.nii.gz", "cannot read image"),
    (b"x", "notes.txt", "not a CT image"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        load_ct(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_raw_is_refused(tmp_path):
    path = write_image(np.zeros((4, 8, 8), np.int16), Geometry.identity(), tmp_path / "t.mhd")
    raw = tmp_path / "t.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match="t.raw is truncated"):
        load_ct(path)
    raw.unlink()
    with pytest.raises(DataError, match="t.raw is missing"):
        load_ct(path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_ct(tmp_path / "nope.mhd")
    with pytest.raises(DataError, match="no DICOM series"):
        load_ct(tmp_path)


def _write_dicom_series(folder: Path, modality: str, hu: np.ndarray) -> None:
    """A DICOM series of ``modality`` with the slices of ``hu`` (SimpleITK's writer)."""
    folder.mkdir(parents=True)
    series_uid = "1.2.826.0.1.3680043.2.1125.99." + str(abs(hash(modality)) % 10 ** 8)
    for k, plane in enumerate(hu):
        image = sitk.GetImageFromArray(plane[None].astype(np.int16))
        image.SetSpacing((0.7, 0.7, 2.5))
        image.SetOrigin((-100.0, -100.0, 2.5 * k))
        for tag, value in (("0008|0060", modality), ("0020|000e", series_uid),
                           ("0020|0013", str(k + 1)),
                           ("0020|0032", f"-100\\-100\\{2.5 * k}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0008|0018", f"{series_uid}.{k + 1}")):
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k}.dcm"))
        writer.Execute(image)


def test_a_dicom_series_of_another_modality_is_refused(tmp_path):
    hu = np.full((3, 16, 16), -1000, dtype=np.int16)
    _write_dicom_series(tmp_path / "ct", "CT", hu)
    assert load_ct(tmp_path / "ct").shape_irc == (3, 16, 16)
    _write_dicom_series(tmp_path / "mr", "MR", hu + 1000)
    with pytest.raises(DataError, match=r"mr: series .* is MR modality, not CT; pass --force"):
        load_ct(tmp_path / "mr")
    assert load_ct(tmp_path / "mr", require_ct=False).shape_irc == (3, 16, 16)


def test_voxels_without_air_are_not_taken_for_ct(tmp_path):
    path = write_image(np.full((3, 8, 8), 200, np.int16), Geometry.identity(), tmp_path / "a.mha")
    with pytest.raises(DataError, match="a.mha: does not look like a CT in Hounsfield units"):
        load_ct(path)
    assert load_ct(path, require_ct=False).hu.min() == 200


def test_non_finite_voxels_become_air_with_a_warning(tmp_path, caplog):
    volume = np.full((3, 8, 8), -900.0, np.float32)
    volume[0, 0, :3] = [np.nan, np.inf, -np.inf]
    path = write_image(volume, Geometry.identity(), tmp_path / "f.mha")
    with caplog.at_level("WARNING", logger="lunaseg.ct"):
        ct = load_ct(path)
    assert ct.hu[0, 0, :4].tolist() == [-1024, -1024, -1024, -900]
    assert "3 voxels are NaN or infinite" in caplog.text


def test_a_write_the_disk_truncated_is_an_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_image(np.zeros((4, 8, 8), np.float32), Geometry.identity(), tmp_path / "p.nii.gz")
    before = path.read_bytes()
    real_write = sitk.WriteImage

    def truncating_write(image, name, *args):  # what ITK did on a full disk: no error
        real_write(image, name, *args)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", truncating_write)
    with pytest.raises(DataError, match=r"p\.nii\.gz: the image written does not read back"):
        write_image(np.ones((4, 8, 8), np.float32), Geometry.identity(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.nii.gz"]
