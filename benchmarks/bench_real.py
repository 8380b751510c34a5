"""Candidates on the real CT in ../shared: what a model finds, where, and how many marks.

Not a test.  For each model (default: the book's LUNA16-trained U-Net in ../shared/models)
and each real scan (the LIDC-IDRI-0001 and -0002 slabs, imported with ``import-lidc`` so the
readers' outlines are at hand, and the full TCIA C3N-00247 chest CT, which has no labels):

* ``segment`` defaults: exactly what ``lunaseg segment SCAN --model CKPT`` finds;
* grouping and views one change at a time, from the network's four mirror views computed
  once per scan and combined here the way :mod:`lunaseg.predict` combines them.

Per labelled scan: candidates, the rank of the best candidate hitting the nodule (LUNA16's
rule: centre closer than half the diameter), its distance to the nodule's centre and the
Dice of its voxels with the readers' outline mask.  LIDC-IDRI-0001's nodule is LUNA16's
annotation; LIDC-IDRI-0002 is not in LUNA16, so its nodule is the readers' consensus (two of
them outlined it inside the slab, which cuts it).

    python benchmarks/bench_real.py                                  # the book's model
    python benchmarks/bench_real.py --model lunaseg-demo/run/checkpoint.pt --model book
    python benchmarks/bench_real.py --shared /path/to/shared --variants none
    python benchmarks/bench_real.py --model CKPT --amp --variants none  # bf16, one view
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lunaseg.candidates import label_candidates
from lunaseg.config import LidcConfig, SegmentConfig
from lunaseg.ct import CT, load_ct
from lunaseg.errors import LunasegError
from lunaseg.lidc import import_lidc
from lunaseg.luna import annotation_file, find_series, outline_mask_path, read_nodules
from lunaseg.masks import lung_mask
from lunaseg.model import load_model
from lunaseg.predict import combine_views, predict_views
from lunaseg.segment import segment_ct

SHARED = Path(__file__).resolve().parents[2] / "shared"
BOOK_MODEL = "models/book-seg-2020-01-26.best.state"
LIDC_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


@dataclass
class Scan:
    name: str
    ct: CT
    nodule: tuple[np.ndarray, float] | None  # centre xyz, diameter mm
    outline: np.ndarray | None  # the readers' consensus mask


def load_scans(shared: Path, work: Path) -> list[Scan]:
    """The two LIDC slabs (imported, with outlines) and the C3N chest CT."""
    import_lidc([shared / "data" / "lidc-idri-0001", shared / "data" / "lidc-idri-0002"],
                work, LidcConfig(min_readers=2), progress=False)
    luna = {n.series_uid: n for n in read_nodules(shared / "data" / "luna16" /
                                                  "annotations.csv")}
    imported = {n.series_uid: n for n in read_nodules(annotation_file(work))}
    scans = []
    for uid, path in sorted(find_series(work).items()):
        nodule = luna.get(uid) or imported.get(uid)
        outline = load_ct(outline_mask_path(work, uid), require_ct=False).hu > 0
        name = "LIDC-0001" if uid == LIDC_0001 else "LIDC-0002"
        scans.append(Scan(name, load_ct(path, uid), None if nodule is None else
                          (np.asarray(nodule.center_xyz), nodule.diameter_mm), outline))
    c3n = load_ct(shared / "data" / "tcia-c3n-00247" / "dicom")
    scans.append(Scan("C3N-00247", c3n, None, None))
    return sorted(scans, key=lambda s: s.name)


def score(scan: Scan, candidates, labels) -> dict:
    """Count, and the nodule's rank / distance / Dice when the scan is labelled."""
    row = {"count": len(candidates)}
    if scan.nodule is None:
        return row
    center, diameter = scan.nodule
    for candidate in candidates:
        distance = float(np.linalg.norm(np.asarray(candidate.center_xyz) - center))
        if distance < diameter / 2:
            mask = labels == candidate.rank + 1
            overlap = 2 * np.logical_and(mask, scan.outline).sum()
            row.update(rank=candidate.rank + 1, distance=distance,
                       dice=float(overlap / max(mask.sum() + scan.outline.sum(), 1)))
            break
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED,
                        help="the folder with data/ and models/ (default ../shared)")
    parser.add_argument("--model", action="append",
                        help="checkpoint to measure, or 'book' (default: book); repeatable")
    parser.add_argument("--variants", choices=("all", "none"), default="all",
                        help="also grouping and views one change at a time (default all)")
    parser.add_argument("--amp", action="store_true",
                        help="also segment with one view, in bf16 autocast (a CPU with bf16 "
                             "units), and both: what precision and views cost and change")
    args = parser.parse_args(argv)
    if not (args.shared / "data").is_dir():
        sys.exit(f"bench_real: {args.shared}/data not found (pass --shared)")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory(prefix="lunaseg-real-") as tmp:
        scans = load_scans(args.shared, Path(tmp))
        for model_name in args.model or ["book"]:
            path = args.shared / BOOK_MODEL if model_name == "book" else Path(model_name)
            model, _ = load_model(path)
            print(f"\n{path} (grouping {model.spec.grouping}, {model.spec.tta} views)")
            header = " | ".join(f"{s.name}: cands / rank / mm / Dice" if s.nodule is not None
                                else f"{s.name}: cands" for s in scans)
            print(f"| setting | {header} | s |")
            print("|" + " --- |" * (len(scans) + 2))
            settings = [("`segment` defaults", SegmentConfig(overlays=0))]
            if model.spec.pixel_mm is not None:  # what resampling to its pixels changes
                settings.append(("`segment --native-pixels`",
                                 SegmentConfig(overlays=0, resample=False)))
            if args.amp:
                settings += [("`segment --tta 1`", SegmentConfig(overlays=0, tta=1)),
                             ("`segment --amp` (bf16)", SegmentConfig(overlays=0, amp=True)),
                             ("`segment --amp --tta 1`",
                              SegmentConfig(overlays=0, amp=True, tta=1))]
            for label, config in settings:
                started = time.perf_counter()
                rows = []
                for scan in scans:
                    result = segment_ct(model, scan.ct, config, device="cpu")
                    rows.append(_mark(scan, score(scan, result.candidates, result.labels)))
                seconds = (time.perf_counter() - started) / len(scans)
                print(f"| {label} | {' | '.join(map(_cell, rows))} | {seconds:.1f} |")
            if args.variants == "none":
                continue
            # Every view once per scan (on the body box, as segment runs without a lung
            # mask); inside the lungs' box that is what segment computes with one.
            cached = [(scan, predict_views(model, scan.ct.hu, model.spec, tta=4,
                                           spacing_rc=scan.ct.geometry.spacing_xyz[1::-1]),
                       lung_mask(scan.ct.hu, spacing_irc=scan.ct.geometry.spacing_xyz[::-1]))
                      for scan in scans]
            for grouping in ("lunaseg", "book"):
                for label, combine in (("1 view", lambda v: v[0]),
                                       ("4 views, consensus",
                                        lambda v: combine_views(v, "consensus")),
                                       ("4 views, mean", lambda v: combine_views(v, "mean"))):
                    for lung in (True, False):
                        config = replace(SegmentConfig(), grouping=grouping, lung_mask=lung)
                        rows = []
                        for scan, logits, lungs in cached:
                            candidates, labels = label_candidates(
                                combine(logits), scan.ct.hu, scan.ct.geometry, config,
                                lung_mask=lungs if lung else None)
                            rows.append(_mark(scan, score(scan, candidates, labels)))
                        name = f"{grouping}, {label}, " + ("lung mask" if lung else "no mask")
                        print(f"| {name} | {' | '.join(map(_cell, rows))} | |")
    return 0


def _mark(scan: Scan, row: dict) -> dict:
    row["labelled"] = scan.nodule is not None
    return row


def _cell(row: dict) -> str:
    if "rank" in row:
        return f"{row['count']} / {row['rank']} / {row['distance']:.2f} / {row['dice']:.2f}"
    return f"{row['count']} / missed" if row["labelled"] else f"{row['count']}"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, LunasegError) as error:
        sys.exit(f"bench_real: {error}")
