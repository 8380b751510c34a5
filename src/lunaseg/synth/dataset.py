"""The dataset writer: ``synthesize_dataset`` writes phantoms in LUNA16's on-disk layout.

Scans, nodule masks, LUNA16's four CSVs and ``phantom_nodules.csv``; every scan has its own
random stream, so any number of worker processes writes the same bytes.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lunaseg.config import SynthConfig, check_at_least, check_fraction
from lunaseg.ct import write_image
from lunaseg.errors import DataError
from lunaseg.files import write_csv
from lunaseg.luna import (ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, MALIGNANCY_COLUMNS,
                          outline_mask_path)
from lunaseg.progress import bar as progress_bar
from lunaseg.synth.nodules import SynthNodule
from lunaseg.synth.phantom import _check_shape, make_phantom

log = logging.getLogger(__name__)

# Not a LUNA16 file: the annotation columns plus what each nodule is, for breakdowns of misses.
PHANTOM_NODULES_FILE = "phantom_nodules.csv"
# Bumped whenever the same seed starts giving different files (2: true nodule masks and
# phantom_nodules.csv added; 3: LUNA16's diameters; 4: the masks carry each nodule's class,
# the scans are unchanged; 5: the anatomy real CT's false positives come from -- smaller
# lungs, a wider heart and mediastinum, breasts, scapulae, stomach gas, uneven marrow,
# denser small vessels, smooth or sharp noise grain and streaks), so a saved dataset from an
# older generator is not reused.
PHANTOM_VERSION = 5
PHANTOM_NODULE_COLUMNS = ANNOTATION_COLUMNS + ("kind", "location", "shape")


@dataclass
class SynthSummary:
    """What ``synthesize_dataset`` wrote."""

    out_dir: Path
    series_uids: list[str]
    n_nodules: int
    n_excluded: int
    n_candidates: int
    seconds_per_scan: float


def _fmt(value: float) -> str:
    return f"{value:.6f}"


def _nodule_rows(uid: str, nodule: SynthNodule) -> tuple[list, list]:
    x, y, z = (float(v) for v in nodule.center_xyz)
    d = float(nodule.diameter_mm)
    radius = d / 2
    plain = [uid, _fmt(x), _fmt(y), _fmt(z), _fmt(d)]
    ratings = list(nodule.malignancy_ratings)
    detail = [*plain, "True" if nodule.is_malignant else "False", str(ratings),
              _fmt(x - radius), _fmt(y - radius), _fmt(z - radius),
              _fmt(x + radius), _fmt(y + radius), _fmt(z + radius), str(len(ratings))]
    return plain, detail


@dataclass(frozen=True)
class _ScanJob:
    """What one worker needs to build and write one scan."""

    seed: np.random.SeedSequence
    shape_irc: tuple[int, int, int]
    with_nodules: bool
    max_nodules: int
    negative_candidates: int
    out_dir: Path
    subset: str


@dataclass
class _ScanRows:
    """The CSV rows one scan contributes."""

    series_uid: str
    annotations: list
    detailed: list
    described: list
    excluded: list
    candidates: list


def _write_scan(job: _ScanJob) -> _ScanRows:
    """Build one phantom, write its image and class mask (1 benign, 2 malignant), return
    its CSV rows."""
    rng = np.random.default_rng(job.seed)
    phantom = make_phantom(job.shape_irc, rng=rng, with_nodules=job.with_nodules,
                           max_nodules=job.max_nodules)
    uid = phantom.series_uid
    write_image(phantom.hu, phantom.geometry, job.out_dir / job.subset / f"{uid}.mhd")
    write_image(phantom.nodule_classes, phantom.geometry,
                outline_mask_path(job.out_dir, uid), compress=True)
    rows = _ScanRows(uid, [], [], [], [], [])
    for nodule in phantom.nodules:
        plain, detail = _nodule_rows(uid, nodule)
        rows.annotations.append(plain)
        rows.detailed.append(detail)
        rows.described.append([*plain, nodule.kind, nodule.location, nodule.shape])
        rows.candidates.append([*plain[:4], 1])
    for nodule in phantom.excluded:
        rows.excluded.append(_nodule_rows(uid, nodule)[0])
    lookalike = phantom.lookalike_xyz
    count = min(len(lookalike), job.negative_candidates)
    pick = np.sort(rng.choice(len(lookalike), size=count, replace=False)) if count else []
    rows.candidates += [[uid, *(_fmt(v) for v in lookalike[i]), 0] for i in pick]
    log.debug("%s: %d nodules, %d excluded, %d candidates", uid, len(phantom.nodules),
              len(phantom.excluded), len(rows.candidates))
    return rows


def synthesize_dataset(out_dir, config: SynthConfig, *, progress: bool = True) -> SynthSummary:
    """Write ``config.series`` phantoms, their nodule masks, LUNA16's four CSVs and
    ``phantom_nodules.csv`` (what each annotated nodule is).

    Scan k goes to ``subset{k % config.subsets}``, its mask to ``masks/<uid>.mha``; the same
    config writes byte-identical files, whatever ``config.workers``.  The summary's
    ``seconds_per_scan`` is per process (wall time x workers / scans).
    """

    check_at_least(config, "series", 1)
    check_at_least(config, "subsets", 1)
    check_at_least(config, "workers", 0, " (0 = all CPUs)")
    check_at_least(config, "seed", 0)
    check_fraction(config, "no_nodule_fraction")
    shape = _check_shape(config.shape_irc)
    out_dir = Path(out_dir)
    # New scans beside old ones would leave the old ones out of the new CSVs, where training
    # would take their nodules for clean lung.
    existing = sorted(out_dir.glob("subset*/*.mhd"))
    if existing:
        raise DataError(f"{out_dir}: already holds a dataset ({len(existing)} scans); choose "
                        f"an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # One independent stream for the plan and one per scan: scan k is the same whatever the
    # number of scans after it.
    streams = np.random.SeedSequence(int(config.seed)).spawn(config.series + 1)
    plan_rng, children = np.random.default_rng(streams[0]), streams[1:]
    # Exactly round(fraction * series) scans without nodules, chosen at random.
    n_empty = int(round(config.no_nodule_fraction * config.series))
    empty = set(plan_rng.permutation(config.series)[:n_empty].tolist())
    jobs = [_ScanJob(children[k], shape, k not in empty, config.max_nodules,
                     int(config.negative_candidates_per_scan), out_dir,
                     f"subset{k % config.subsets}") for k in range(config.series)]
    workers = max(1, min(config.workers or os.cpu_count() or 1, config.series))
    started = time.perf_counter()
    scans: list[_ScanRows] = []
    bar = progress_bar(total=config.series, enabled=progress, desc="synth", unit="scan")
    if workers == 1:
        for job in jobs:
            scans.append(_write_scan(job))
            bar.update()
    else:
        # Each scan has its own random stream, so the pool writes the same bytes as one
        # process; results come back in scan order.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for scan in pool.map(_write_scan, jobs):
                scans.append(scan)
                bar.update()
    bar.close()
    annotations, detailed, described, excluded, candidates, uids = [], [], [], [], [], []
    for scan in scans:
        uids.append(scan.series_uid)
        annotations += scan.annotations
        detailed += scan.detailed
        described += scan.described
        excluded += scan.excluded
        candidates.append((scan.series_uid, scan.candidates))
    seconds = (time.perf_counter() - started) * workers / config.series
    candidates.sort(key=lambda item: item[0])  # LUNA's candidates.csv is sorted by series
    candidate_rows = [row for _, rows in candidates for row in rows]
    write_csv(out_dir / "annotations.csv", ANNOTATION_COLUMNS, annotations)
    write_csv(out_dir / "annotations_with_malignancy.csv", MALIGNANCY_COLUMNS, detailed)
    write_csv(out_dir / "annotations_excluded.csv", ANNOTATION_COLUMNS, excluded)
    write_csv(out_dir / "candidates.csv", CANDIDATE_COLUMNS, candidate_rows)
    write_csv(out_dir / PHANTOM_NODULES_FILE, PHANTOM_NODULE_COLUMNS, described)
    log.info("wrote %d synthetic scans (%d nodules, %d excluded) to %s in %.2f s per scan "
             "and process",
             config.series, len(annotations), len(excluded), out_dir, seconds)
    return SynthSummary(out_dir=out_dir, series_uids=uids, n_nodules=len(annotations),
                        n_excluded=len(excluded), n_candidates=len(candidate_rows),
                        seconds_per_scan=seconds)
