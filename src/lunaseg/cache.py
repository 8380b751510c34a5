"""The prepcache: per-series arrays that training and validation read at memory speed.

Layout, one folder per series (``<cache>/<series_uid>/``)::

    hu.npy           (I, r, c) int16, the CT cropped in-plane to the body's bounding box
    mask.npy         (I, r, ceil(c/8)) uint8, the nodule mask, bit-packed along rows
    malignant.npy    (I, r, ceil(c/8)) uint8, its malignant voxels, bit-packed the same way
    chunks.npy       (N, *chunk_irc) int16, one training chunk centred on each nodule
    chunk_masks.npy  (N, *chunk_irc) uint8, the class mask under each chunk (0 background,
                     1 benign, 2 malignant: lunaseg.masks' classes)
    meta.json        geometry, crop, nodules, positive slices, checksums; written last

The class of a nodule voxel is benign or malignant (LUNA's ``mal_bool``), so one cache serves
1-class models (which see ``mask.npy``) and 3-class ones (which also read ``malignant.npy``).

Only rows and columns that hold nothing but air are cropped away, so nothing a model could
learn from is lost, and the cache stays smaller than the raw data.  Volumes are stored in the
canonical voxel order the models see.  A series folder is built under a temporary name and
renamed into place, so a killed run never leaves a half entry; an entry whose source, nodule
list or settings changed, or whose bytes no longer match their checksums, is rebuilt, others
are skipped, and the entry of a series no longer in the data folder is removed from that
folder's own cache (``DATA/cache``; a cache elsewhere may serve several data folders, so
there it is reported).  Readers check sizes and array headers when they open an entry
(:meth:`SeriesCache.check`), so a damaged file is one warning, not a crash mid-training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from lunaseg.config import CacheConfig, MaskConfig, check_at_least
from lunaseg.ct import load_ct
from lunaseg.errors import DataError
from lunaseg.geometry import Geometry
from lunaseg.inputs import context_stack
from lunaseg.luna import BENIGN, MALIGNANT, find_series, load_candidates, outline_mask_path
from lunaseg.masks import annotation_classes, body_box, classes_by_nearest, positive_slices
from lunaseg.progress import bar as progress_bar

__all__ = ["CacheEntryNodule", "SeriesCache", "Cache", "prepcache", "PrepcacheSummary",
           "pad_crop", "median_pixel_mm", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

# 3: class masks (malignant.npy; chunk masks hold classes).  Older entries are rebuilt by
# prepcache and refused, in one line, by readers.
FORMAT_VERSION = 3
_ARRAYS = ("hu.npy", "mask.npy", "malignant.npy", "chunks.npy", "chunk_masks.npy")
MAX_LOOKALIKES = 400  # per series: LUNA16's candidates.csv has ~600 per scan, mostly alike


@dataclass(frozen=True)
class CacheEntryNodule:
    """An annotated nodule as the cache records it (centre in full-volume voxels too)."""

    center_xyz: tuple[float, float, float]
    center_irc: tuple[int, int, int]
    diameter_mm: float
    is_malignant: bool


# ----------------------------------------------------------------------------- reading


def pad_crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int],
             fill: float | int) -> np.ndarray:
    """``volume[start : start + size]`` on every axis; outside the volume, axis 0 repeats its
    first/last slice and the other axes are filled with ``fill`` (padding, never shifting)."""
    # Plain integer arithmetic: this runs thousands of times a second, and NumPy calls on
    # three-element arrays would cost more than the copy itself.
    i0, r0, c0 = (int(v) for v in start)
    ni, nr, nc = (int(v) for v in size)
    si, sr, sc = volume.shape
    out = np.full((ni, nr, nc), fill, dtype=volume.dtype)
    r_low, r_high = max(r0, 0), min(r0 + nr, sr)
    c_low, c_high = max(c0, 0), min(c0 + nc, sc)
    if r_high <= r_low or c_high <= c_low:
        return out
    target = out[:, r_low - r0:r_high - r0, c_low - c0:c_high - c0]
    if 0 <= i0 and i0 + ni <= si:  # no slice repeats: one strided read
        target[...] = volume[i0:i0 + ni, r_low:r_high, c_low:c_high]
    else:
        index = [min(max(i, 0), si - 1) for i in range(i0, i0 + ni)]
        target[...] = volume[index, r_low:r_high, c_low:c_high]
    return out


class SeriesCache:
    """Read access to one cached series; arrays are memory-mapped, so opening is cheap."""

    def check(self) -> None:
        """DataError naming the file when an array is missing, truncated or not the array
        its meta.json describes (sizes and headers: cheap; checksums are prepcache's)."""
        for name in _ARRAYS:
            path = self.folder / name
            try:
                size = path.stat().st_size
            except OSError:
                raise DataError(f"{path}: missing from the cache; run prepcache") from None
            if size != self.meta["sizes"][name]:
                raise DataError(f"{path}: {size} bytes, the cache wrote "
                                f"{self.meta['sizes'][name]}; run prepcache to rebuild it")
            _open_npy(path)

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.series_uid: str = meta["series_uid"]
        self.geometry = Geometry.from_dict(meta["geometry"])
        self.shape_irc: tuple[int, int, int] = tuple(meta["shape_irc"])  # full volume
        self.crop_rc: tuple[int, int] = tuple(meta["crop_rc"])  # offset of hu[0, 0, 0]
        self.positive_indices = np.asarray(meta["positive_indices"], dtype=np.int64)
        self.lookalikes_irc = np.asarray(meta["lookalikes_irc"], dtype=np.int64).reshape(-1, 3)
        self.nodules = [CacheEntryNodule(tuple(n["center_xyz"]), tuple(n["center_irc"]),
                                         n["diameter_mm"], n["is_malignant"])
                        for n in meta["nodules"]]

    @cached_property
    def hu(self) -> np.ndarray:
        """(I, r, c) int16, cropped in-plane at ``crop_rc``."""
        # A plain ndarray view of the memory map: np.memmap's per-index Python overhead
        # would dominate small reads.
        return np.asarray(_open_npy(self.folder / "hu.npy", mmap=True))

    @cached_property
    def _packed_mask(self) -> np.ndarray:
        return np.asarray(_open_npy(self.folder / "mask.npy", mmap=True))

    @cached_property
    def _packed_malignant(self) -> np.ndarray:
        return np.asarray(_open_npy(self.folder / "malignant.npy", mmap=True))

    @cached_property
    def chunks(self) -> np.ndarray:
        """(N, I, R, C) int16 training chunks, one per nodule, in ``nodules`` order."""
        return _open_npy(self.folder / "chunks.npy", mmap=False)

    @cached_property
    def chunk_irc(self) -> tuple[int, ...]:
        """(I, R, C) of the training chunks, from the file's header alone."""
        return tuple(_open_npy(self.folder / "chunks.npy", mmap=True).shape[1:])

    @cached_property
    def chunk_masks(self) -> np.ndarray:
        """(N, I, R, C) uint8 class masks under the chunks (0 background, 1 benign,
        2 malignant); nonzero is the nodule mask."""
        return _open_npy(self.folder / "chunk_masks.npy", mmap=False)

    def mask_slice(self, index: int) -> np.ndarray:
        """(r, c) bool nodule mask of one slice (cropped like ``hu``)."""
        return np.unpackbits(self._packed_mask[index], axis=-1,
                             count=self.hu.shape[2]).view(bool)

    def mask(self) -> np.ndarray:
        """(I, r, c) bool nodule mask of the whole (cropped) volume."""
        return np.unpackbits(np.asarray(self._packed_mask), axis=-1,
                             count=self.hu.shape[2]).view(bool)

    def classes_slice(self, index: int) -> np.ndarray:
        """(r, c) uint8 class mask of one slice: 0 background, 1 benign, 2 malignant."""
        malignant = np.unpackbits(self._packed_malignant[index], axis=-1,
                                  count=self.hu.shape[2])
        return self.mask_slice(index).view(np.uint8) + malignant

    def classes(self) -> np.ndarray:
        """(I, r, c) uint8 class mask of the whole (cropped) volume."""
        malignant = np.unpackbits(np.asarray(self._packed_malignant), axis=-1,
                                  count=self.hu.shape[2])
        return self.mask().view(np.uint8) + malignant

    def context_stack(self, index: int, context_slices: int) -> np.ndarray:
        """(2*context+1, r, c) int16 slices around ``index``; edges repeat the end slices."""
        return context_stack(self.hu, [index], context_slices)[0]

    def chunk(self, center_irc: Sequence[int], size_irc: Sequence[int], *,
              fill_hu: int = -1000) -> tuple[np.ndarray, np.ndarray]:
        """(HU chunk, uint8 class-mask chunk) of ``size_irc`` centred on a full-volume voxel,
        padded at the edges (slices repeat, rows/columns get ``fill_hu`` and background)."""
        size = np.asarray(size_irc, dtype=np.int64)
        start = np.asarray(center_irc, dtype=np.int64) - size // 2
        start[1:] -= self.crop_rc
        hu = pad_crop(self.hu, start, size, fill_hu)
        classes = self._unpack_box(self._packed_mask, start, size)
        classes += self._unpack_box(self._packed_malignant, start, size)
        return hu, classes

    def _unpack_box(self, packed: np.ndarray, start: np.ndarray, size: np.ndarray
                    ) -> np.ndarray:
        """(size) uint8 bits of a bit-packed (I, r, ceil(c/8)) array in the box at ``start``
        (cropped coordinates), 0 outside it."""
        # Unpack only the bytes under the box: whole slices would cost 100x more.
        cols = self.hu.shape[2]
        col_low = min(max(int(start[2]), 0), cols)
        col_high = min(max(int(start[2] + size[2]), 0), cols)
        byte_low, byte_high = col_low // 8, -(-col_high // 8)
        packed = pad_crop(packed, (start[0], start[1], byte_low),
                          (size[0], size[1], max(byte_high - byte_low, 1)), 0)
        bits = np.unpackbits(packed, axis=-1)
        out = np.zeros(tuple(size), dtype=np.uint8)
        offset = col_low - 8 * byte_low
        width = col_high - col_low
        out[:, :, col_low - start[2]:col_low - start[2] + width] = bits[:, :, offset:offset + width]
        return out


def _open_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """An array of the cache (memory-mapped by default), or a DataError naming the file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: unreadable cache array ({error}); run prepcache to "
                        f"rebuild it") from None


def _entry_metas(folder: Path) -> list[Path]:
    """The meta.json of every entry, sorted; .tmp-/.old- folders (builds in flight) are not
    entries."""
    return [path for path in sorted(folder.glob("*/meta.json"))
            if not path.parent.name.startswith(".")]


class Cache:
    """A prepcache folder: ``cache[uid]`` opens one series, ``series_uids`` lists them."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no cache here; run `lunaseg prepcache` first")
        self._metas: dict[str, dict] = {}
        for meta_path in _entry_metas(self.folder):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                log.warning("%s: unreadable cache entry; run prepcache to rebuild it", meta_path)
                continue
            if meta.get("format") != FORMAT_VERSION:
                raise DataError(f"{meta_path}: cache format {meta.get('format')} is not this "
                                f"lunaseg's ({FORMAT_VERSION}); run `lunaseg prepcache` again")
            self._metas[meta["series_uid"]] = meta

    @property
    def series_uids(self) -> list[str]:
        return sorted(self._metas)

    def usable(self, series_uids: Sequence[str] | None = None) -> list[str]:
        """The series (default: all) whose entries pass :meth:`SeriesCache.check`; the others
        are named in one warning, so a damaged entry skips its series instead of ending a
        run hours in."""
        good, damaged = [], []
        for uid in self.series_uids if series_uids is None else series_uids:
            try:
                self[uid].check()
            except DataError as error:
                damaged.append(str(error))
                continue
            good.append(uid)
        if damaged:
            log.warning("%d damaged cache entr%s skipped (run prepcache to rebuild): %s",
                        len(damaged), "y" if len(damaged) == 1 else "ies", "; ".join(damaged))
        return good

    def __len__(self) -> int:
        return len(self._metas)

    def __contains__(self, series_uid: str) -> bool:
        return series_uid in self._metas

    def __getitem__(self, series_uid: str) -> SeriesCache:
        if series_uid not in self._metas:
            raise DataError(f"{self.folder}: series {series_uid} is not cached")
        return SeriesCache(self.folder / series_uid, self._metas[series_uid])


# ----------------------------------------------------------------------------- building


@dataclass
class _Job:
    series_uid: str
    source: Path
    nodules: list[tuple[tuple[float, float, float], float, bool]]
    lookalikes_xyz: list[tuple[float, float, float]]
    key: dict
    mask_config: MaskConfig
    chunk_irc: tuple[int, int, int]
    outline_mask: Path | None


@dataclass
class PrepcacheSummary:
    """What one prepcache run did."""

    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # series no longer in the data folder
    seconds: float = 0.0

    def line(self) -> str:
        """One line for people; failed series are named with their reasons (the first five)."""
        # "dropped" only when something was: the usual line stays as it always was.
        dropped = f", {len(self.dropped)} dropped" if self.dropped else ""
        text = (f"prepcache: {len(self.built)} built, {len(self.skipped)} up to date, "
                f"{len(self.failed)} failed{dropped} in {self.seconds:.1f} s")
        if self.failed:
            reasons = list(self.failed.values())
            text += "; failed: " + "; ".join(reasons[:5]) + (" ..." if len(reasons) > 5 else "")
        return text


def _source_signature(mhd: Path) -> list:
    """Size and mtime of the header and of every file it names (the .raw)."""
    files = [mhd]
    if mhd.suffix.lower() == ".mhd":
        for line in mhd.read_text(errors="replace").splitlines():
            if line.replace(" ", "").startswith("ElementDataFile="):
                name = line.split("=", 1)[1].strip()
                if name.upper() != "LOCAL":
                    files.append(mhd.parent / name)
    signature = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            raise DataError(f"{mhd}: data file {path.name} is missing") from None
        signature.append([path.name, stat.st_size, stat.st_mtime_ns])
    return signature


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def median_pixel_mm(cache: Cache, series_uids: Sequence[str]) -> float:
    """The median in-plane pixel spacing (mm) of cached ``series_uids``: the scale a model
    trained on them learns, which inference brings other scans to."""
    pixels = [float(np.mean(cache[uid].geometry.spacing_xyz[:2])) for uid in series_uids]
    return round(float(np.median(pixels)), 4)


def _load_outline_mask(path: Path, shape: tuple[int, ...], geometry: Geometry) -> np.ndarray:
    """(I, R, C) uint8 values of an outline mask: 0 background, 1 benign, 2 malignant (an
    older mask of 0/1 alone holds no class; the caller then takes it from the nodules)."""
    if not path.exists():
        raise DataError(f"{path}: no outline mask (`lunaseg import-lidc` and "
                        f"`lunaseg synth` write them; else use --masks heuristic)")
    outline = load_ct(path, require_ct=False)
    if outline.hu.shape != shape or not outline.geometry.allclose(geometry, atol=1e-3):
        raise DataError(f"{path}: outline mask does not match its CT's size or geometry")
    values = np.asarray(outline.hu)
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high > MALIGNANT:
        raise DataError(f"{path}: outline mask holds values {low}..{high}; expected 0 "
                        f"(background), {BENIGN} (benign nodule) or {MALIGNANT} (malignant)")
    return values.astype(np.uint8)


def _build_entry(job: _Job, cache_dir: Path) -> str:
    """Build one series entry under a temporary name, then rename it into place."""
    stored = load_ct(job.source, job.series_uid)
    # Cached in the canonical voxel order the models see (LUNA16's own; a no-op for it).
    ct, reorientation = stored.canonical()
    hu = ct.hu
    shape = hu.shape
    if job.outline_mask is not None:
        classes = reorientation.to_canonical(
            _load_outline_mask(job.outline_mask, stored.shape_irc, stored.geometry))
        if not (classes == MALIGNANT).any() and any(n[2] for n in job.nodules):
            # A 0/1 mask (older lunaseg, another tool) beside malignant annotations: each
            # voxel takes its nearest nodule's class.
            classes = classes_by_nearest(classes > 0, ct.geometry,
                                         [(n[0], n[2]) for n in job.nodules])
    else:
        classes = annotation_classes(hu, ct.geometry, job.nodules, job.mask_config)
    mask = classes > 0
    row0, row1, col0, col1 = body_box(hu)
    hu_crop = np.ascontiguousarray(hu[:, row0:row1, col0:col1])
    mask_crop = mask[:, row0:row1, col0:col1]
    tmp = cache_dir / f".tmp-{job.series_uid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "hu.npy", hu_crop)
        np.save(tmp / "mask.npy", np.packbits(mask_crop, axis=-1))
        np.save(tmp / "malignant.npy",
                np.packbits(classes[:, row0:row1, col0:col1] == MALIGNANT, axis=-1))
        nodules, chunks, chunk_masks = [], [], []
        size = np.asarray(job.chunk_irc)
        for center_xyz, diameter_mm, malignant in job.nodules:
            center_irc = ct.xyz_to_irc(np.asarray(center_xyz))
            if np.any(center_irc < 0) or np.any(center_irc >= shape):
                continue  # the nodule lies outside this (partial) volume
            start = center_irc - size // 2
            chunks.append(pad_crop(hu, start, size, -1000))
            chunk_masks.append(pad_crop(classes, start, size, 0))
            nodules.append({"center_xyz": [float(v) for v in center_xyz],
                            "center_irc": [int(v) for v in center_irc],
                            "diameter_mm": float(diameter_mm), "is_malignant": bool(malignant)})
        chunk_shape = (0, *job.chunk_irc)
        np.save(tmp / "chunks.npy",
                np.stack(chunks) if chunks else np.zeros(chunk_shape, np.int16))
        np.save(tmp / "chunk_masks.npy",
                np.stack(chunk_masks) if chunk_masks else np.zeros(chunk_shape, np.uint8))
        meta = {
            "format": FORMAT_VERSION,
            "series_uid": job.series_uid,
            "key": job.key,
            "geometry": ct.geometry.to_dict(),
            "shape_irc": list(shape),
            "crop_rc": [row0, col0],
            "positive_indices": positive_slices(mask).tolist(),
            "nodules": nodules,
            "lookalikes_irc": _lookalikes_irc(ct.geometry, shape, mask, job.lookalikes_xyz),
            "crc32": {name: _crc32(tmp / name) for name in _ARRAYS},
            "sizes": {name: (tmp / name).stat().st_size for name in _ARRAYS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _swap_into_place(tmp, cache_dir / job.series_uid)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return job.series_uid


def _lookalikes_irc(geometry: Geometry, shape: tuple[int, ...], mask: np.ndarray,
                    centers_xyz: list) -> list[list[int]]:
    """Voxels of non-nodule candidates (vessels and other look-alikes) off the nodule mask;
    training cuts its hard-negative crops around them."""
    if not centers_xyz:
        return []
    irc = geometry.xyz_to_irc(np.asarray(centers_xyz, dtype=np.float64))
    inside = np.all((irc >= 0) & (irc < np.asarray(shape)), axis=1)
    irc = irc[inside]
    irc = irc[~mask[irc[:, 0], irc[:, 1], irc[:, 2]]]
    return irc[:MAX_LOOKALIKES].tolist()


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _drop_vanished(cache_dir: Path, vanished: list[str]) -> list[str]:
    """Remove the entries of series no longer in the data folder from its own cache, so the
    cache lists what the data holds (training would otherwise still split and train on them)."""
    dropped = []
    for uid in vanished:
        folder = cache_dir / uid
        meta_path = folder / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        # Only what prepcache itself wrote: never a folder that merely has a meta.json.
        if not isinstance(meta, dict) or meta.get("series_uid") != folder.name:
            continue
        # Renamed away first, as _swap_into_place does: the entry leaves the listing in one
        # step, and a killed run leaves only an .old-* folder that the next run removes.
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.replace(folder, old)
        shutil.rmtree(old, ignore_errors=True)
        dropped.append(folder.name)
    return dropped


def _entry_state(folder: Path, key: dict) -> str:
    """'ok', 'stale' (source or settings changed) or 'corrupt' (a file missing, of another
    size or with other bytes than its checksum) for an existing entry."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return "missing" if not folder.exists() else "corrupt"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return "corrupt"
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        return "stale"
    for name in _ARRAYS:
        path = folder / name
        if not path.exists() or path.stat().st_size != meta["sizes"][name]:
            return "corrupt"
        if _crc32(path) != meta["crc32"][name]:
            return "corrupt"
    return "ok"


def _nodule_key(nodules: list) -> str:
    text = json.dumps(sorted([list(n[0]), n[1], n[2]] for n in nodules))
    return hashlib.sha1(text.encode()).hexdigest()


def prepcache(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
              config: CacheConfig | None = None, mask_config: MaskConfig | None = None,
              series: Sequence[str] | None = None,
              progress: bool = True) -> PrepcacheSummary:
    """Build or refresh the cache of every series under ``data_dir`` (default cache:
    ``<data_dir>/cache``); every existing entry's checksums are verified.

    A series that cannot be cached (a missing or truncated .raw, an unreadable file) is
    named in ``summary.failed`` with the reason; the others are still cached."""

    started = time.perf_counter()
    config = config or CacheConfig()
    mask_config = mask_config or MaskConfig()
    check_at_least(config, "workers", 0, " (0 = all CPUs)")
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    sources = find_series(data_dir)  # first: a wrong --data must not leave folders behind
    on_disk = set(sources)  # before ``series`` narrows it: every series the data holds
    if series is not None:
        missing = sorted(set(series) - set(sources))
        if missing:
            raise DataError(f"{data_dir}: series not found: {', '.join(missing)}")
        sources = {uid: sources[uid] for uid in series}
    if not sources:
        raise DataError(f"{data_dir}: no <series-uid>.mhd files found")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(cache_dir.glob(".tmp-*")) + list(cache_dir.glob(".old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    candidates = load_candidates(data_dir, series_on_disk=sources.keys())
    summary = PrepcacheSummary()
    vanished = [path.parent.name for path in _entry_metas(cache_dir)
                if path.parent.name not in on_disk]
    if vanished and cache_dir.resolve() == (data_dir / "cache").resolve():
        summary.dropped = _drop_vanished(cache_dir, vanished)
        if summary.dropped:
            log.info("dropped %d cache entries of series no longer in %s",
                     len(summary.dropped), data_dir)
    elif vanished:
        # A cache elsewhere may be shared by several data folders (one per LUNA16 subset,
        # say): what this folder lacks may be another's, so it is only reported.
        log.warning("%s holds %d series not in %s (first: %s); training uses every "
                    "cached series", cache_dir, len(vanished), data_dir, vanished[0])
    jobs = []
    for uid, source in sources.items():
        records = candidates.get(uid, [])
        nodules = [(c.center_xyz, c.diameter_mm, c.is_malignant)
                   for c in records if c.is_nodule and c.has_annotation]
        lookalikes = [c.center_xyz for c in records if not c.is_nodule]
        outline = (outline_mask_path(data_dir, uid) if config.masks == "outline" else None)
        try:
            key = {"source": _source_signature(source), "nodules": _nodule_key(nodules),
                   "lookalikes": _nodule_key([(xyz, 0.0, False) for xyz in lookalikes]),
                   "masks": config.masks, "mask_config": [mask_config.threshold_hu,
                                                          mask_config.min_radius_vox,
                                                          mask_config.bound_by_diameter],
                   "chunk_irc": list(config.chunk_irc)}
            if outline is not None and outline.exists():
                key["outline"] = _source_signature(outline)
        except DataError as error:  # one series' missing file never stops the others
            summary.failed[uid] = str(error)
            log.error("%s", error)
            continue
        state = _entry_state(cache_dir / uid, key)
        if state == "ok":
            summary.skipped.append(uid)
            continue
        if state == "corrupt":
            log.warning("%s: cache entry is damaged; rebuilding it", cache_dir / uid)
        jobs.append(_Job(uid, source, nodules, lookalikes, key, mask_config,
                         tuple(config.chunk_irc), outline))
    workers = config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs)))
    bar = progress_bar(total=len(jobs), enabled=progress, desc="prepcache", unit="series")
    if workers == 1:
        for job in jobs:
            _run_job(job, cache_dir, summary)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_build_entry, job, cache_dir): job for job in jobs}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    summary.built.append(future.result())
                except DataError as error:
                    summary.failed[job.series_uid] = str(error)
                    log.error("%s", error)
                bar.update()
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _run_job(job: _Job, cache_dir: Path, summary: PrepcacheSummary) -> None:
    try:
        summary.built.append(_build_entry(job, cache_dir))
    except DataError as error:
        summary.failed[job.series_uid] = str(error)
        log.error("%s", error)
