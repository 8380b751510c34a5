#!/usr/bin/env python3
"""Render real chest-CT slices beside synthetic phantoms, so anyone can judge realism by eye.

Real scans come from ../shared/data (DICOM folders beside the repository, read with
lunaseg.ct.load_ct); they are skipped with a message when absent.  Phantoms are generated on
the fly from --seed.  Everything is shown in the same lung window (-1000..400 HU), and a few
numbers per scan (lung HU percentiles, dense share of lung, dense blobs per slice, noise) are
printed to compare beside the pictures.  The PNG goes to --out (outside the repository, or
docs/ for the README's figure).

    python scripts/compare_realism.py --out /tmp/realism.png --seed 3 --phantoms 3
    python scripts/compare_realism.py --montage /tmp/montage.png --shape 48,192,192
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = [REPO.parent / "shared" / "data" / name / "dicom"
                for name in ("lidc-idri-0001", "lidc-idri-0002", "tcia-c3n-00247")]
log = logging.getLogger("compare_realism")


def lung_numbers(hu: np.ndarray) -> dict[str, str]:
    """Crude per-scan numbers (same spirit as shared/tools/ct_stats.py) on the middle slices."""
    from scipy import ndimage

    mid = hu.shape[0] // 2
    block = hu[max(0, mid - 4): mid + 4]
    lungs = np.zeros(block.shape, bool)
    blobs = []
    for i, sl in enumerate(block):
        lab, n = ndimage.label(sl > -500)
        if not n:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        body = ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))
        lung = ndimage.binary_opening(body & (sl < -400), iterations=2)
        lungs[i] = ndimage.binary_fill_holes(lung)
        if lungs[i].sum() > 1000:
            blobs.append(ndimage.label(lungs[i] & (sl > -500))[1])
    values = block[lungs]
    if not values.size:
        return {"lung p5/50/95": "-", "dense share": "-", "blobs/slice": "-"}
    return {"lung p5/50/95": "/".join(f"{v:.0f}" for v in np.percentile(values, [5, 50, 95])),
            "dense share": f"{(values > -500).mean():.3f}",
            "blobs/slice": f"{np.median(blobs):.0f}" if blobs else "-"}


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants I,R,C integers, got {text!r}") from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"--shape wants three integers, got {text!r}")
    return shape  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "lunaseg_realism.png",
                        help="PNG to write (default: %(default)s)")
    parser.add_argument("--real", type=Path, nargs="*", default=DEFAULT_REAL,
                        help="real CT DICOM folders or image files (default: ../shared/data/...)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--phantoms", type=int, default=3, help="how many phantoms to draw")
    parser.add_argument("--shape", type=parse_shape, default=(64, 512, 512),
                        help="phantom shape I,R,C (default 64,512,512)")
    parser.add_argument("--montage", type=Path, default=None,
                        help="also write a montage of the phantoms with nodules circled here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for picture in (args.out, args.montage):
        # Only docs/ keeps pictures (the README's realism figure); the real slices in it are
        # TCIA data under CC BY 3.0, credited in the README.
        if picture and REPO in picture.resolve().parents and (
                picture.resolve().parent != REPO / "docs"):
            parser.error(f"write pictures to docs/ or outside the repository, not {picture}")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lunaseg.ct import load_ct
    from lunaseg.errors import LunasegError
    from lunaseg.synth import make_phantom

    panels: list[tuple[str, np.ndarray]] = []
    for path in args.real:
        if not path.exists():
            log.warning("skipping real scan %s: not present (real CT lives in ../shared)", path)
            continue
        try:
            ct = load_ct(path)
        except LunasegError as error:
            log.warning("skipping real scan %s: %s", path, error)
            continue
        panels.append((f"real {path.parent.name if path.name == 'dicom' else path.name}",
                       ct.hu))
    phantoms = []
    seeds = np.random.SeedSequence(args.seed).spawn(args.phantoms)
    for k, seed in enumerate(seeds):
        phantom = make_phantom(args.shape, rng=np.random.default_rng(seed))
        phantoms.append(phantom)
        panels.append((f"phantom {k} ({len(phantom.nodules)} nodules)", phantom.hu))
    print(f"{'scan':<34}" + "".join(f"{key:>22}" for key in lung_numbers(panels[0][1])))
    for name, hu in panels:
        print(f"{name:<34}" + "".join(f"{v:>22}" for v in lung_numbers(hu).values()))
    # Real scans on the top row, phantoms below, so each column compares one pair.
    n_real = len(panels) - len(phantoms)
    cols = max(n_real, len(phantoms), 1)
    rows = int(n_real > 0) + int(len(phantoms) > 0)
    fig = Figure(figsize=(4 * cols, 4.3 * rows))
    FigureCanvasAgg(fig)
    for k, (name, hu) in enumerate(panels):
        slot = k + 1 if k < n_real or not n_real else cols + k - n_real + 1
        ax = fig.add_subplot(rows, cols, slot)
        ax.imshow(hu[hu.shape[0] // 2], cmap="gray", vmin=-1000, vmax=400)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    log.info("wrote %s", args.out)
    if args.montage:
        from lunaseg.report import render_montage

        render_montage(phantoms, args.montage, title=f"phantoms, seed {args.seed}")
        log.info("wrote %s", args.montage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
