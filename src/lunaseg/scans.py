"""Scans to process: image files, DICOM series folders and LUNA16 roots, expanded into one
:class:`ScanSource` per series with a unique UID."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from lunaseg.ct import CT, dicom_series_in, is_image_file, load_ct, series_uid_from_path
from lunaseg.errors import DataError
from lunaseg.luna import find_series

__all__ = ["ScanSource", "find_scans"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanSource:
    """One scan to segment: a file, or a DICOM folder plus the series to read from it."""

    path: Path
    series_uid: str | None = None  # DICOM: the series in the folder; LUNA16: the file's UID
    kind: str = "file"  # "file", "dicom" or "luna"

    @property
    def uid(self) -> str:
        return self.series_uid or series_uid_from_path(self.path)

    def load(self, *, require_ct: bool = True) -> CT:
        """Read the scan (DataError naming the file when it cannot be read, or when it is
        not CT and ``require_ct``)."""
        ct = load_ct(self.path, self.series_uid if self.kind == "dicom" else None,
                     require_ct=require_ct)
        if self.kind == "file":
            ct.series_uid = self.uid  # its stem, or folder_stem where stems repeat
        return ct


def _dicom_folders(root: Path) -> list[Path]:
    """Folders below ``root`` (itself included) that hold DICOM series, sorted."""
    found = []
    for folder, _dirs, files in os.walk(root):
        if any(not name.startswith(".") for name in files) and dicom_series_in(folder):
            found.append(Path(folder))
    return sorted(found)


def find_scans(inputs: Sequence[str | os.PathLike],
               series_uids: Iterable[str] | None = None) -> list[ScanSource]:
    """Expand image files, DICOM series folders and LUNA16 roots into scans.

    A folder with ``<uid>.mhd`` files below it is a LUNA16 root; otherwise every folder
    below it that holds DICOM files contributes its series.  ``series_uids`` restricts the
    result (a requested UID that is not found is a warning).
    """
    sources: list[ScanSource] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_file():
            if not is_image_file(path):
                raise DataError(f"{path}: not a CT image (expected a DICOM folder, a LUNA16 "
                                "folder or an .mhd/.mha/.nii/.nii.gz/.nrrd file)")
            sources.append(ScanSource(path))
            continue
        luna = find_series(path)
        if luna:
            sources.extend(ScanSource(p, uid, "luna") for uid, p in sorted(luna.items()))
            continue
        folders = _dicom_folders(path)
        if not folders:
            raise DataError(f"{path}: holds no .mhd files and no DICOM series")
        for folder in folders:
            sources.extend(ScanSource(folder, uid, "dicom")
                           for uid in sorted(dicom_series_in(folder)))
    if series_uids is not None:
        wanted = list(dict.fromkeys(series_uids))
        present = {source.uid for source in sources}
        missing = [uid for uid in wanted if uid not in present]
        if missing:
            log.warning("%d requested series not found in the inputs: %s%s", len(missing),
                        ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
        wanted_set = set(wanted)
        sources = [source for source in sources if source.uid in wanted_set]
    # Image files are named by their stem; files that share one (ct.nii.gz in each patient's
    # folder) are told apart by their folder's name instead of being taken for one scan.
    stems: dict[str, set[Path]] = {}
    for source in sources:
        if source.kind == "file":
            stems.setdefault(source.uid, set()).add(source.path.resolve())
    sources = [ScanSource(source.path, f"{source.path.parent.name}_{source.uid}", "file")
               if source.kind == "file" and len(stems[source.uid]) > 1 else source
               for source in sources]
    unique: dict[str, ScanSource] = {}
    for source in sources:
        if source.uid in unique:
            log.warning("series %s appears twice (%s, %s); using the first", source.uid,
                        unique[source.uid].path, source.path)
            continue
        unique[source.uid] = source
    return list(unique.values())
