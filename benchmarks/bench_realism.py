"""How close the phantoms are to real CT, by ../shared/tools/ct_stats.py's statistics.

Not a test.  Computes every ct_stats statistic on the three real scans in ../shared and on
fresh phantoms of the current generator, then says for each statistic the real range
(smallest to largest of the real scans) and how many phantoms fall inside it.  Percentile
statistics (p5/p50/p95) count as three statistics.

    python benchmarks/bench_realism.py                     # 8 phantoms, seeds 0..7
    python benchmarks/bench_realism.py --phantoms 16 --first-seed 100
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from lunaseg.synth import PHANTOM_VERSION, make_phantom

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = ("lidc-idri-0001", "lidc-idri-0002", "tcia-c3n-00247")
SKIP = {"body fraction"}  # reported, but a field-of-view choice rather than anatomy


def load_ct_stats(shared: Path):
    """The shared tool as a module (it is a script, not a package)."""
    path = shared / "tools" / "ct_stats.py"
    spec = importlib.util.spec_from_file_location("ct_stats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers(row: dict[str, str]) -> dict[str, float]:
    """Each statistic as floats; 'a/b/c' percentiles split into three named ones."""
    out = {}
    for key, text in row.items():
        parts = text.split("/")
        if "p5/50/95" in key and len(parts) == 3:
            stem = key.replace(" p5/50/95", "")
            for name, value in zip(("p5", "p50", "p95"), parts):
                out[f"{stem} {name}"] = float(value)
        elif text not in ("-", ""):
            out[key] = float(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--phantoms", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--shape", default="128,512,512", help="phantom I,R,C")
    args = parser.parse_args(argv)
    if not (args.shared / "tools" / "ct_stats.py").is_file():
        print(f"bench_realism: {args.shared} has no tools/ct_stats.py", file=sys.stderr)
        return 2
    tool = load_ct_stats(args.shared)
    shape = tuple(int(v) for v in args.shape.split(","))
    real = {}
    for name in REAL:
        hu, _ = tool.read(str(args.shared / "data" / name / "dicom"))
        real[name] = numbers(tool.stats(hu))
    phantoms = {}
    seconds = []
    for seed in range(args.first_seed, args.first_seed + args.phantoms):
        start = time.perf_counter()
        phantom = make_phantom(shape, rng=np.random.default_rng(seed))
        seconds.append(time.perf_counter() - start)
        phantoms[f"seed {seed}"] = numbers(tool.stats(phantom.hu))
    print(f"generator {PHANTOM_VERSION}, {args.phantoms} phantoms of {args.shape}, "
          f"{np.mean(seconds):.2f} s each to make (one process)")
    keys = [k for k in next(iter(real.values())) if k not in SKIP]
    width = max(len(k) for k in keys)
    print(f"{'statistic':<{width}}  {'real range':>16}  {'phantoms inside':>15}  "
          f"{'phantom median':>14}  phantoms")
    inside_all = 0
    for key in keys:
        values = [r[key] for r in real.values() if key in r]
        lo, hi = min(values), max(values)
        ph = [p[key] for p in phantoms.values() if key in p]
        inside = sum(lo <= v <= hi for v in ph)
        inside_all += inside == len(ph)
        print(f"{key:<{width}}  {lo:>7.3g}..{hi:<7.3g}  {inside:>7d} of {len(ph):<4d}  "
              f"{np.median(ph):>14.3g}  " + " ".join(f"{v:.3g}" for v in ph))
    print(f"statistics with every phantom inside the real range: {inside_all} of {len(keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
