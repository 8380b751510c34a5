"""Measure each candidate-extraction option on probability volumes already computed.

Not a test.  ``lunaseg evaluate --data DIR --model CKPT --out EVAL`` (or ``lunaseg demo``)
leaves ``EVAL/segment/<series>/probability.nii.gz`` for every scan of a split.  This script
re-runs only the cheap part, probabilities -> candidates, once per option set, and scores
each candidate list against the dataset's annotations the LUNA16 way: candidates per scan,
candidate-stage sensitivity, sensitivity at <= 20 false positives per scan, and CPM.

    python benchmarks/bench_candidates.py --data lunaseg-demo/data \\
        --evaluation lunaseg-demo/evaluation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lunaseg.config import SegmentConfig
from lunaseg.ct import load_ct
from lunaseg.candidates import extract_candidates
from lunaseg.evaluate import CANDIDATE_FP_BUDGET, Mark, froc, load_findings
from lunaseg.luna import EXCLUDED_FILE, annotation_file, find_series

# (label, changes from the defaults): each row changes one thing, so its effect shows alone.
VARIANTS: list[tuple[str, dict]] = [
    ("defaults", {}),
    ("book: max score, HU-weighted centre, erosion drops small", dict(
        score="max", center_weighting="hu", keep_vanished=False)),
    ("score = mean probability", dict(score="mean")),
    ("centre weighted by HU", dict(center_weighting="hu")),
    ("no erosion", dict(erosion_iterations=0)),
    ("erosion x2", dict(erosion_iterations=2)),
    ("erosion drops what it erases (book)", dict(keep_vanished=False)),
    ("min 5 voxels", dict(min_voxels=5)),
    ("min 20 voxels", dict(min_voxels=20)),
    ("lung mask", dict(lung_mask=True)),
    ("26-connectivity", dict(connectivity=26)),
    ("threshold 0.3", dict(threshold=0.3)),
    ("threshold 0.8", dict(threshold=0.8)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder (annotations, images)")
    parser.add_argument("--evaluation", required=True,
                        help="output folder of `lunaseg evaluate --data` (has segment/)")
    args = parser.parse_args()
    data, evaluation = Path(args.data), Path(args.evaluation)

    annotations = load_findings(annotation_file(data))
    excluded = (load_findings(data / EXCLUDED_FILE, excluded=True)
                if (data / EXCLUDED_FILE).exists() else None)
    images = find_series(data)
    scans = []
    for folder in sorted(p for p in (evaluation / "segment").iterdir() if p.is_dir()):
        if folder.name not in images:
            continue
        ct = load_ct(images[folder.name])
        prob = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "probability.nii.gz")))
        scans.append((folder.name, ct, prob))
    print(f"{len(scans)} scans, {sum(len(annotations.get(u, [])) for u, _, _ in scans)} "
          f"nodules, from {evaluation / 'segment'}")
    settings = evaluation / "segment" / "segment_config.json"
    if settings.exists() and json.loads(settings.read_text()).get("lung_mask"):
        # predict_ct ran the network only around the lungs: the rows without the lung mask
        # cannot show what lies beyond that box.
        print("note: segmented with --lung-mask, so probabilities are 0 beyond the box around "
              "the lungs; for the other rows, evaluate without it")

    budget = f"sens@{CANDIDATE_FP_BUDGET:g}FP"
    print(f"{'option':58s} {'cands/scan':>10s} {'cand sens':>9s} {budget:>11s} {'CPM':>6s} "
          f"{'s/scan':>6s}")
    for label, changes in VARIANTS:
        config = dataclasses.replace(SegmentConfig(), **changes)
        marks, counts = {}, []
        started = time.perf_counter()
        for uid, ct, prob in scans:
            candidates = extract_candidates(prob, ct.hu, ct.geometry, config, series_uid=uid)
            counts.append(len(candidates))
            # Scored like a submission: the top max_candidates marks (segment writes those).
            marks[uid] = [Mark(np.asarray(c.center_xyz), c.probability)
                          for c in candidates[:config.max_candidates]]
        seconds = (time.perf_counter() - started) / max(len(scans), 1)
        result = froc(annotations, marks, excluded=excluded, series=[u for u, _, _ in scans],
                      max_marks_per_scan=config.max_candidates, bootstrap=0)
        print(f"{label:58s} {np.mean(counts):10.1f} {result.candidate_sensitivity:9.3f} "
              f"{result.sensitivity_at_budget:11.3f} {result.cpm:6.3f} {seconds:6.2f}")


if __name__ == "__main__":
    main()
