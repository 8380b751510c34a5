"""Which phantom nodules a model finds, by size, location, kind and shape.

Joins the per-nodule results of ``lunaseg evaluate`` (``froc.json``) with what
``lunaseg synth`` wrote about each nodule (``phantom_nodules.csv``), and prints, per group,
nodules found by any candidate / found within the false-positive budget / all.

    python benchmarks/bench_breakdown.py --data lunaseg-demo/data \\
        --evaluation lunaseg-demo/evaluation
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from lunaseg.errors import DataError
from lunaseg.evaluate import DIAMETER_BANDS_MM, size_band_label
from lunaseg.files import csv_number, csv_rows
from lunaseg.synth import PHANTOM_NODULES_FILE


EDGES_MM = [0.0, *DIAMETER_BANDS_MM, math.inf]
BAND_ORDER = [size_band_label(low, high) for low, high in zip(EDGES_MM[:-1], EDGES_MM[1:])]


def _size_band(diameter_mm: float) -> str:
    index = max(k for k, edge in enumerate(EDGES_MM[:-1]) if edge <= diameter_mm)
    return BAND_ORDER[index]


def _key(series_uid: str, center_xyz) -> tuple:
    # CSV coordinates carry 6 decimals; froc.json holds the same numbers as floats.
    return series_uid, tuple(round(float(v), 4) for v in center_xyz)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path,
                        help=f"synthetic dataset folder (has {PHANTOM_NODULES_FILE})")
    parser.add_argument("--evaluation", required=True, type=Path,
                        help="output folder of `lunaseg evaluate` (has froc.json)")
    args = parser.parse_args(argv)
    try:
        return _report(args.data, args.evaluation)
    except (OSError, DataError) as error:
        print(f"bench_breakdown: {error}", file=sys.stderr)
        return 1


def _report(data: Path, evaluation: Path) -> int:
    result = json.loads((evaluation / "froc.json").read_text())
    outcome = {_key(nodule["series_uid"], nodule["center_xyz"]):
               (nodule["hit_any"], nodule["hit_at_budget"]) for nodule in result["nodules"]}
    path = data / PHANTOM_NODULES_FILE
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    unmatched = 0
    for line, row in csv_rows(path, required=("seriesuid", "coordX", "coordY", "coordZ",
                                              "diameter_mm", "kind", "location", "shape")):
        center = [csv_number(row, c, path, line) for c in ("coordX", "coordY", "coordZ")]
        found = outcome.get(_key(row["seriesuid"], center))
        if found is None:
            unmatched += 1  # a nodule of a scan outside the evaluated split
            continue
        diameter = csv_number(row, "diameter_mm", path, line)
        small = "< 4 mm" if diameter < 4.0 else ">= 4 mm"
        for group, value in (("size", _size_band(diameter)), ("location", row["location"]),
                             ("kind", row["kind"]), ("shape", row["shape"]),
                             ("location x size", f"{row['location']}, {small}")):
            tally = groups[group][value]
            tally[0] += 1
            tally[1] += found[0]
            tally[2] += found[1]
    if not groups:
        print(f"no nodule of {path} is in {evaluation / 'froc.json'}", file=sys.stderr)
        return 1
    budget = result["fp_budget"]
    print(f"{result['n_nodules']} nodules in {result['n_scans']} scans "
          f"({unmatched} in other scans skipped); found / found at <= {budget:g} FP per scan "
          f"/ all")
    for group, values in groups.items():
        print(f"\n{group}")
        # Size bands in size order; the other groups alphabetically.
        names = BAND_ORDER if group == "size" else sorted(values)
        for value in [name for name in names if name in values]:
            total, hits, hits_at_budget = values[value]
            print(f"  {value:34s} {hits:4d} {hits_at_budget:4d} {total:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
