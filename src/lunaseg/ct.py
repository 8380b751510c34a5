"""CT volumes: Hounsfield voxels plus geometry, read and written with SimpleITK.

``load_ct`` reads MetaImage (.mhd/.mha), NIfTI (.nii/.nii.gz), NRRD files and DICOM series
folders (slices ordered by their geometry, never by file name), and refuses what is not CT
(a DICOM series of another modality; voxels with no air in them) unless told otherwise.
``write_image`` writes any voxel array with a CT's geometry so masks open aligned in 3D
Slicer or ITK-SNAP; what it wrote is read back before it takes the file's name (ITK's
writers do not always notice a full disk).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lunaseg.errors import DataError
from lunaseg.geometry import Geometry, Reorientation, canonical_orientation

__all__ = ["CT", "load_ct", "check_is_ct", "write_image", "read_geometry", "dicom_series_in",
           "series_uid_from_path", "IMAGE_SUFFIXES", "is_image_file"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd", ".nhdr")
# A chest CT holds air (room air, the lungs, the trachea) near -1000 HU; a volume with no
# voxel below this is not one (an MR series, a mask, a scan stored without HU rescaling).
AIR_CHECK_HU = -300
# What non-finite voxels of a float image become: air.
NON_FINITE_HU = -1024


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` names a single-file image format ``load_ct`` reads."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


@dataclass(eq=False)
class CT:
    """One CT scan: ``hu`` is a (I, R, C) int16 array in Hounsfield units."""

    hu: np.ndarray
    geometry: Geometry
    series_uid: str

    @property
    def shape_irc(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    @property
    def origin_xyz(self) -> np.ndarray:
        return self.geometry.origin_xyz

    @property
    def spacing_xyz(self) -> np.ndarray:
        return self.geometry.spacing_xyz

    @property
    def direction(self) -> np.ndarray:
        return self.geometry.direction

    def xyz_to_irc_float(self, xyz: np.ndarray) -> np.ndarray:
        return self.geometry.xyz_to_irc_float(xyz)

    def xyz_to_irc(self, xyz: np.ndarray) -> np.ndarray:
        return self.geometry.xyz_to_irc(xyz)

    def irc_to_xyz(self, irc: np.ndarray) -> np.ndarray:
        return self.geometry.irc_to_xyz(irc)

    def canonical(self) -> tuple["CT", Reorientation]:
        """This scan in the canonical voxel order every model sees (see
        :func:`lunaseg.geometry.canonical_orientation`), and how to map arrays back; the same
        object when it is stored that way already (as LUNA16 stores every scan)."""
        reorientation, geometry = canonical_orientation(self.geometry, self.shape_irc)
        if reorientation.is_identity:
            return self, reorientation
        return CT(reorientation.to_canonical(self.hu), geometry, self.series_uid), reorientation


def _sitk():
    import SimpleITK as sitk  # imported lazily so `lunaseg --help` stays instant

    return sitk


def _geometry_of(image) -> Geometry:
    return Geometry(np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()),
                    np.asarray(image.GetDirection()).reshape(3, 3))


def _to_hu(image, path: Path) -> np.ndarray:
    if image.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected one value per voxel, got "
                        f"{image.GetNumberOfComponentsPerPixel()}")
    array = _sitk().GetArrayFromImage(image)  # (I, R, C)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            log.warning("%s: %d voxels are NaN or infinite; read as %d HU (air)", path,
                        int(bad.sum()), NON_FINITE_HU)
            array = np.where(bad, NON_FINITE_HU, array)
    if array.dtype != np.int16:
        # Clip before casting so float or wide-integer inputs cannot wrap around.
        array = np.clip(np.rint(array) if array.dtype.kind == "f" else array,
                        -32768, 32767).astype(np.int16)
    return array


def check_is_ct(ct: CT, source: str | os.PathLike) -> None:
    """DataError unless the voxels look like a CT in Hounsfield units (some air in them)."""
    if ct.hu.size and int(ct.hu.min()) > AIR_CHECK_HU:
        raise DataError(f"{source}: does not look like a CT in Hounsfield units (no voxel "
                        f"below {AIR_CHECK_HU} HU, where air and lung are); pass --force to "
                        f"read it anyway")


def read_geometry(path: str | os.PathLike) -> tuple[Geometry, tuple[int, int, int]]:
    """Geometry and (I, R, C) shape from an image file's header, without reading voxels."""
    sitk = _sitk()
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read image header ({_first_line(error)})") from None
    size_cri = reader.GetSize()
    geometry = Geometry(np.asarray(reader.GetOrigin()), np.asarray(reader.GetSpacing()),
                        np.asarray(reader.GetDirection()).reshape(3, 3))
    return geometry, (int(size_cri[2]), int(size_cri[1]), int(size_cri[0]))


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with a source-file location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__


_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
               "MET_UINT": 4, "MET_LONG": 8, "MET_ULONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_mhd(path: Path) -> None:
    """Name the real problem with a MetaImage pair (ITK only says 'cannot be read')."""
    header = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    data_name = header.get("ElementDataFile")
    if data_name is None:
        raise DataError(f"{path}: not a MetaImage header (no ElementDataFile line)")
    if data_name.upper() == "LOCAL" or header.get("CompressedData", "False").lower() == "true":
        return
    data_path = path.parent / data_name
    if not data_path.exists():
        raise DataError(f"{path}: its data file {data_name} is missing")
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
        needed = int(np.prod(dims)) * _META_BYTES[header.get("ElementType", "")]
    except (ValueError, KeyError):
        return  # let ITK judge unusual headers
    size = data_path.stat().st_size
    if size < needed:
        raise DataError(f"{path}: data file {data_name} is truncated ({size} bytes, the "
                        f"header needs {needed})")


def _load_file(path: Path, series_uid: str | None, require_ct: bool) -> CT:
    sitk = _sitk()
    if path.name.lower().endswith(".mhd"):
        _check_mhd(path)
    if path.name.lower().endswith(".nii.gz") and path.with_suffix("").is_dir():
        # ITK's NIfTI reader tries x.nii before x.nii.gz and reads a folder as zeros.
        raise DataError(f"{path}: the folder {path.with_suffix('')} beside it hides it from "
                        f"ITK's NIfTI reader; rename that folder")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read image ({_first_line(error)})") from None
    uid = series_uid or series_uid_from_path(path)
    ct = CT(_to_hu(image, path), _geometry_of(image), uid)
    if require_ct:
        check_is_ct(ct, path)
    return ct


def series_uid_from_path(path: str | os.PathLike) -> str:
    """The series UID an image file stands for: its name without the image suffix
    (LUNA16 names each file after its series)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def dicom_series_in(folder: str | os.PathLike) -> list[str]:
    """Series instance UIDs of the DICOM series directly inside ``folder``."""
    sitk = _sitk()
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def _load_dicom(folder: Path, series_uid: str | None, require_ct: bool) -> CT:
    sitk = _sitk()
    uids = dicom_series_in(folder)
    if not uids:
        raise DataError(f"{folder}: no DICOM series found in this folder")
    if series_uid is None:
        if len(uids) > 1:
            raise DataError(f"{folder}: holds {len(uids)} DICOM series; pick one with a series "
                            f"UID: {', '.join(sorted(uids))}")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise DataError(f"{folder}: no DICOM series {series_uid}; found {', '.join(sorted(uids))}")
    # GDCM sorts the files by ImagePositionPatient along the slice normal, not by name.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    if len(files) < 2:
        raise DataError(f"{folder}: series {series_uid} has {len(files)} slice(s); need >= 2")
    if require_ct:
        modality = _dicom_tag(files[0], "0008|0060")
        if modality is not None and modality.strip().upper() != "CT":
            raise DataError(f"{folder}: series {series_uid} is {modality.strip() or 'of no'} "
                            f"modality, not CT; pass --force to read it anyway")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DataError(f"{folder}: cannot read DICOM series {series_uid} "
                        f"({_first_line(error)})") from None
    _check_slice_spacing(folder, files)
    # ITK applies RescaleSlope/Intercept, so voxels are already Hounsfield units.
    ct = CT(_to_hu(image, folder), _geometry_of(image), series_uid)
    if require_ct:
        check_is_ct(ct, folder)
    return ct


def _dicom_tag(path: str, tag: str) -> str | None:
    """One tag of a DICOM file's header (None when the file does not have it)."""
    reader = _sitk().ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"{path}: cannot read DICOM header ({_first_line(error)})") from None
    return reader.GetMetaData(tag) if reader.HasMetaDataKey(tag) else None


def _check_slice_spacing(folder: Path, files: tuple[str, ...]) -> None:
    """Refuse series with missing or duplicated slices (uneven steps along the normal)."""
    sitk = _sitk()
    positions = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise DataError(f"{name}: cannot read DICOM header ({_first_line(error)})") from None
        positions.append(np.asarray(reader.GetOrigin()))
    steps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
    if steps.size and (steps.min() < 1e-3 or steps.max() - steps.min() > 0.01 * steps.max() + 1e-3):
        raise DataError(f"{folder}: slices are unevenly spaced ({steps.min():.3f} to "
                        f"{steps.max():.3f} mm apart): a slice is missing or duplicated")


def load_ct(path: str | os.PathLike, series_uid: str | None = None, *,
            require_ct: bool = True) -> CT:
    """Read a CT from an image file or a DICOM series folder.

    ``series_uid`` picks one series from a folder holding several; for files it only sets
    the returned ``CT.series_uid`` (default: the file name without its suffix).  With
    ``require_ct`` a DICOM series of another modality, or voxels without any air, are a
    DataError; float voxels that are NaN or infinite become air, with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_dicom(path, series_uid, require_ct)
    if not is_image_file(path):
        raise DataError(f"{path}: not a CT image (expected a DICOM folder or one of "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    return _load_file(path, series_uid, require_ct)


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                *, compress: bool = False) -> Path:
    """Write a (I, R, C) array with ``geometry`` to ``path`` atomically (format from suffix).

    The image is written into a temporary folder beside ``path``, read back and checked
    (size and voxels: ITK's NIfTI writer leaves a truncated file on a full disk without an
    error), flushed to disk and only then renamed to ``path``; a failure is a DataError
    naming the file, and an earlier file at ``path`` stays as it was.  For .mhd the pixel
    data goes to a sibling .raw file, as LUNA16 stores it (the header, which names the data,
    is moved in last).
    """
    sitk = _sitk()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array)
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in geometry.origin_xyz))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing_xyz))
    image.SetDirection(tuple(float(v) for v in geometry.direction.reshape(-1)))
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    name = f"{path.name[: -len('.mhd')]}.mhd" if suffix == ".mhd" else f"image{suffix}"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        tmp_path = Path(tmp) / name
        try:
            sitk.WriteImage(image, str(tmp_path), compress)
        except RuntimeError as error:
            raise DataError(f"{path}: cannot write image ({_first_line(error)})") from None
        _check_written(tmp_path, array, path)
        for written in Path(tmp).iterdir():
            _fsync(written)
        if suffix == ".mhd":
            for data_file in Path(tmp).iterdir():
                if data_file != tmp_path:
                    os.replace(data_file, path.parent / data_file.name)
        os.replace(tmp_path, path)
    return path


def _check_written(tmp_path: Path, array: np.ndarray, path: Path) -> None:
    """DataError naming ``path`` unless ``tmp_path`` reads back as ``array``."""
    try:
        image = _sitk().ReadImage(str(tmp_path))
    except RuntimeError as error:
        raise DataError(f"{path}: the image written does not read back ({_first_line(error)}; "
                        f"a full disk?)") from None
    back = _sitk().GetArrayViewFromImage(image)  # a view: ``image`` must outlive it
    if back.shape != array.shape or not np.array_equal(back, array,
                                                       equal_nan=array.dtype.kind == "f"):
        raise DataError(f"{path}: the image written does not read back as written (a full "
                        f"disk?)")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
