"""The book's two trained models as a two-stage CAD on one real scan: candidates, then the
classifier, with their times and where the known nodule ends up.

Not a test.  The book's chapter-13 U-Net segments the scan (``lunaseg.segment.segment_ct``,
default settings), the book's chapter-11 classifier scores every candidate in batches
(``lunaseg.classify.classify_candidates``), and the candidate nearest a given nodule centre
is looked up in both rankings.  Defaults: the LIDC-IDRI-0001 DICOM slab in ``../shared``
and its 23.4 mm nodule at LUNA16 xyz (56.208, 86.343, -115.868).  Usage::

    python benchmarks/bench_book_cad.py
    python benchmarks/bench_book_cad.py --scan DIR_OR_FILE --nodule-xyz X,Y,Z --threads 1
    python benchmarks/bench_book_cad.py --scan ../shared/data/tcia-c3n-00247/dicom --nodule-xyz ''
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from lunaseg.classifier import load_classifier
from lunaseg.classify import classify_candidates
from lunaseg.config import SegmentConfig
from lunaseg.ct import load_ct
from lunaseg.model import load_model
from lunaseg.segment import segment_ct

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("LUNASEG_SHARED", SHARED))
    parser.add_argument("--scan", default=str(shared / "data" / "lidc-idri-0001" / "dicom"))
    parser.add_argument("--seg-model",
                        default=str(shared / "models" / "book-seg-2020-01-26.best.state"))
    parser.add_argument("--cls-model",
                        default=str(shared / "models" / "book-cls-2020-02-06.best.state"))
    parser.add_argument("--nodule-xyz", default="56.208,86.343,-115.868",
                        help="the known nodule's centre ('' for a scan without one)")
    parser.add_argument("--nodule-diameter-mm", type=float, default=23.4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="crops per forward pass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nodule_xyz = (np.array([float(v) for v in args.nodule_xyz.split(",")])
                  if args.nodule_xyz else None)

    ct = load_ct(args.scan)
    unet, _ = load_model(args.seg_model, device=args.device)
    classifier, _ = load_classifier(args.cls_model, device=args.device)
    print(f"scan {args.scan}: {ct.shape_irc} voxels, spacing xyz "
          f"{np.round(ct.spacing_xyz, 3).tolist()} mm; torch {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")

    result = segment_ct(unet, ct, SegmentConfig(device=args.device))
    candidates = result.candidates
    # Warm-up on a few candidates (first-call allocations), then the timed pass over all.
    classify_candidates(classifier, ct, candidates[:4], device=args.device)
    start = time.perf_counter()
    p_nodule = classify_candidates(classifier, ct, candidates, device=args.device,
                                   batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(f"candidates: {len(candidates)} in {result.seconds:.2f} s (U-Net + grouping); "
          f"classifier: {seconds:.2f} s ({len(candidates) / max(seconds, 1e-9):.0f} "
          f"candidates/s, {seconds / max(result.seconds, 1e-9):.2f}x the candidate stage)")
    print(f"p(nodule) > 0.5: {int((p_nodule > 0.5).sum())} of {len(candidates)}")
    if not candidates or nodule_xyz is None:
        return
    distances = np.array([np.linalg.norm(np.asarray(c.center_xyz) - nodule_xyz)
                          for c in candidates])
    nearest = int(distances.argmin())
    order = np.argsort(-p_nodule, kind="stable")
    rank_cls = int(np.flatnonzero(order == nearest)[0]) + 1
    hit = distances[nearest] < args.nodule_diameter_mm / 2
    print(f"nodule at {nodule_xyz.tolist()}: nearest candidate #{nearest + 1} of the "
          f"segmentation ranking, {distances[nearest]:.1f} mm away "
          f"({'inside' if hit else 'outside'} its radius), segmentation score "
          f"{candidates[nearest].probability:.3f}, diameter {candidates[nearest].diameter_mm:.1f}"
          f" mm; p(nodule) {p_nodule[nearest]:.4f}, rank {rank_cls} by p(nodule)")
    top = order[:5]
    print("top 5 by p(nodule): " + "; ".join(
        f"p {p_nodule[k]:.3f} at {distances[k]:.0f} mm from the nodule" for k in top))


if __name__ == "__main__":
    main()
