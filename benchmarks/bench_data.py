"""Data-layer benchmark (not a test): synth speed, prepcache vs plain SimpleITK reads, warm
cache read rates and cache size.

    .venv/bin/python benchmarks/bench_data.py --series 6 --shape 128,512,512

Targets (issue 2): prepcache <= 3x the time SimpleITK alone needs to read the same .mhd files;
>= 5,000 random 7x96x96 chunks/s and >= 300 7x512x512 context stacks/s on one core from a warm
cache; cache size <= 1x the raw data.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _one_core() -> None:
    """Pin this process (and torch / BLAS threads) to one core, as the targets are per core."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--shape", default="128,512,512", help="I,R,C of each phantom")
    parser.add_argument("--workers", type=int, default=0, help="prepcache processes (0 = all)")
    parser.add_argument("--reads", type=int, default=20000, help="random chunk reads to time")
    parser.add_argument("--stacks", type=int, default=1500, help="context stacks to time")
    parser.add_argument("--keep", help="keep the dataset in this folder")
    args = parser.parse_args()

    import SimpleITK as sitk

    from lunaseg.cache import Cache, prepcache
    from lunaseg.config import CacheConfig, SynthConfig
    from lunaseg.luna import find_series
    from lunaseg.synth import synthesize_dataset

    shape = tuple(int(v) for v in args.shape.split(","))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lunaseg-bench-"))
    data_dir = root / "data"
    try:
        rows = []
        # Synthesis on one core: one worker process (the target is per core).
        shutil.rmtree(data_dir, ignore_errors=True)  # a --keep folder from an earlier run
        started = time.perf_counter()
        synthesize_dataset(data_dir, SynthConfig(series=args.series, seed=1, shape_irc=shape,
                                                 workers=1), progress=False)
        synth_s = (time.perf_counter() - started) / args.series
        rows.append(("synth seconds per scan", f"{synth_s:.2f}", "<= 3 s"))

        sources = find_series(data_dir)
        # Page-cache the files first so both timings below read from memory alike.
        for path in sources.values():
            sitk.ReadImage(str(path))
        sitk_times, prep_times = [], []
        cache_dir = root / "cache"
        for _ in range(3):  # medians of three: single timings of ~1 s are noisy
            started = time.perf_counter()
            for path in sources.values():
                sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            sitk_times.append(time.perf_counter() - started)
            shutil.rmtree(cache_dir, ignore_errors=True)
            started = time.perf_counter()
            summary = prepcache(data_dir, cache_dir, config=CacheConfig(workers=args.workers),
                                progress=False)
            prep_times.append(time.perf_counter() - started)
        sitk_s, prep_s = float(np.median(sitk_times)), float(np.median(prep_times))
        workers = args.workers or os.cpu_count()
        rows.append(("SimpleITK read, all scans (s)", f"{sitk_s:.2f}", ""))
        rows.append((f"prepcache, all scans, {workers} workers (s)", f"{prep_s:.2f}", ""))
        rows.append(("prepcache / SimpleITK read", f"{prep_s / sitk_s:.2f}x", "<= 3x"))
        started = time.perf_counter()
        prepcache(data_dir, cache_dir, progress=False)
        rows.append(("prepcache re-run, nothing changed (s)",
                     f"{time.perf_counter() - started:.2f}", ""))
        assert not summary.failed, summary.failed

        raw_bytes = sum(_folder_bytes(p.parent, p.stem + ".*") for p in sources.values())
        cache_bytes = _folder_bytes(cache_dir)
        rows.append(("cache size / raw size", f"{cache_bytes / raw_bytes:.2f}x", "<= 1x"))

        _one_core()
        import torch

        torch.set_num_threads(1)
        cache = Cache(cache_dir)
        entries = [cache[uid] for uid in cache.series_uids]
        rng = np.random.default_rng(0)
        # Touch everything once: "warm cache" means the OS has the files in memory.
        for entry in entries:
            np.asarray(entry.hu).sum()
            entry.mask()
        size = (7, 96, 96)

        # (a) stored nodule chunks, the training path (read into RAM once per series).
        stored = [(e, k) for e in entries for k in range(len(e.chunks))]
        picks = rng.integers(len(stored), size=args.reads)
        started = time.perf_counter()
        for k in picks:
            entry, n = stored[k]
            chunk = entry.chunks[n].copy()  # a copy, as a batch would hold it
            label = entry.chunk_masks[n, 3].copy()
        stored_rate = args.reads / (time.perf_counter() - started)
        rows.append(("stored nodule chunks 7x96x96 per s, 1 core", f"{stored_rate:,.0f}",
                     ">= 5,000"))

        # (b) arbitrary chunks anywhere in the volume, through the memory map.
        centers = [(entries[k], np.array([rng.integers(n) for n in entries[k].shape_irc]))
                   for k in rng.integers(len(entries), size=args.reads)]
        started = time.perf_counter()
        for entry, center in centers:
            chunk, label = entry.chunk(center, size)
        random_rate = args.reads / (time.perf_counter() - started)
        rows.append(("random 7x96x96 chunks (HU + mask) per s, 1 core", f"{random_rate:,.0f}",
                     ">= 5,000"))

        picks = [(entries[k], int(rng.integers(entries[k].hu.shape[0])))
                 for k in rng.integers(len(entries), size=args.stacks)]
        started = time.perf_counter()
        for entry, index in picks:
            stack = entry.context_stack(index, 3)
            label = entry.mask_slice(index)
        stack_rate = args.stacks / (time.perf_counter() - started)
        h, w = entries[0].hu.shape[1:]
        rows.append((f"7x{h}x{w} context stacks (+ label) per s, 1 core",
                     f"{stack_rate:,.0f}", ">= 300"))

        print(f"\nlunaseg data benchmark: {args.series} phantoms of {shape[0]}x{shape[1]}x"
              f"{shape[2]}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")
        width = max(len(r[0]) for r in rows)
        print(f"{'measure'.ljust(width)}  {'value':>10}  target")
        for name, value, target in rows:
            print(f"{name.ljust(width)}  {value:>10}  {target}")
        del chunk, label, stack
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
