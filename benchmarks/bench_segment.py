"""Benchmark ``lunaseg segment``: seconds per CT and per slice, against the book's approach.

Not a test.  A synthetic CT (default 128 x 512 x 512) is written as a LUNA16-style .mhd in
a temporary folder; each mode is timed from reading that file to the candidate list.

* ``lunaseg``: ``load_ct`` -> ``segment_ct`` (one clipped volume, stacks gathered with
  an index array, ``inference_mode``; bf16 autocast + channels_last on CUDA; with
  ``--lung-mask`` the lung mask first, then only its box; candidates).  ``tta N``: N
  mirrored views per slice, combined by the model's rule.
* ``book`` (``--book``): the book's way, rewritten here: a Dataset that reads the CT in
  each worker process and builds every 7-channel stack slice by slice, a DataLoader with
  batch 4 and 4 workers, ``no_grad``, results copied back per slice, then threshold 0.5,
  one erosion, labels and an HU-weighted centre of mass per component.

The model is the default U-Net with random weights (timing only; its output is not
meaningful) unless ``--model`` names a checkpoint, and ``--input`` takes a real CT instead of
the synthetic one.  Usage::

    python benchmarks/bench_segment.py                # lunaseg on the best device
    python benchmarks/bench_segment.py --book         # also the book's approach
    python benchmarks/bench_segment.py --slices 32 --device cpu --book
    python benchmarks/bench_segment.py --compile      # torch.compile the model (CUDA)
    python benchmarks/bench_segment.py --tta 1,4      # also with 4 mirrored views per slice
    python benchmarks/bench_segment.py --amp --device cpu  # bf16 on a CPU with bf16 units
    python benchmarks/bench_segment.py --lung-mask    # only around the lungs (--lung-mask)
    python benchmarks/bench_segment.py --model CKPT --input CT --tta 1,4 --device cpu
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from lunaseg.config import SegmentConfig
from lunaseg.ct import load_ct, read_geometry, write_image
from lunaseg.geometry import Geometry
from lunaseg.inputs import SegmentationSpec
from lunaseg.model import build_model, load_model
from lunaseg.predict import TTA_FLIPS, predict_logits
from lunaseg.runtime import resolve_device
from lunaseg.segment import segment_ct


SPEC = SegmentationSpec()  # the default U-Net's input (a compiled model hides its spec)


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Body ellipse, two lungs with noise, a few dense balls: int16 HU."""
    rng = np.random.default_rng(seed)
    n_slices, rows, cols = shape
    hu = np.full(shape, -1000, dtype=np.int16)
    r, c = np.ogrid[:rows, :cols]
    body = ((r - rows / 2) / (0.42 * rows)) ** 2 + ((c - cols / 2) / (0.46 * cols)) ** 2 <= 1
    hu[:, body] = 40
    for side in (-1, 1):
        lung = ((r - rows / 2) / (0.3 * rows)) ** 2 + \
               ((c - cols / 2 - side * 0.2 * cols) / (0.14 * cols)) ** 2 <= 1
        hu[:, lung] = -850
    hu += rng.normal(0, 20, size=shape).astype(np.int16)
    i, r3, c3 = np.ogrid[:n_slices, :rows, :cols]
    for _ in range(6):
        ci = rng.integers(0, n_slices)
        cr = rng.integers(int(0.3 * rows), int(0.7 * rows))
        cc = int(cols / 2 + rng.choice([-1, 1]) * 0.2 * cols)
        radius = rng.uniform(2, 6)
        ball = ((i - ci) * 2.5) ** 2 + ((r3 - cr) * 0.7) ** 2 + ((c3 - cc) * 0.7) ** 2 \
            <= radius ** 2
        hu[ball] = 60
    return hu


# --------------------------------------------------------------------------- book approach


@functools.lru_cache(maxsize=1)
def _book_read_hu(path: str) -> np.ndarray:
    """Each worker process reads the CT once (the book's per-process lru_cache of getCt)."""
    return load_ct(path).hu


class BookSliceDataset(Dataset):
    """Full-CT slices with context, built channel by channel as the book does."""

    def __init__(self, path: Path, context_slices: int = 3) -> None:
        self.path = str(path)
        _geometry, shape = read_geometry(path)  # header only, as the book's size cache
        self.n_slices, self.rows, self.cols = shape
        self.context_slices = context_slices

    def __len__(self) -> int:
        return self.n_slices

    def __getitem__(self, index: int):
        hu = _book_read_hu(self.path)
        stack = torch.zeros((2 * self.context_slices + 1, self.rows, self.cols))
        for channel, offset in enumerate(range(-self.context_slices, self.context_slices + 1)):
            source = min(max(index + offset, 0), self.n_slices - 1)
            stack[channel] = torch.from_numpy(hu[source].astype(np.float32))
        stack.clamp_(-1000.0, 1000.0)
        return stack, index


def book_segment(model, path: Path, device: torch.device, batch_size: int, workers: int):
    """The book's loop: DataLoader -> model -> per-slice copy -> threshold/erode/label/centre."""
    timings = {}
    start = time.perf_counter()
    ct = load_ct(path)  # the main process needs the CT for HU-weighted centres
    timings["read"] = time.perf_counter() - start
    dataset = BookSliceDataset(path)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    prob = np.zeros(ct.hu.shape, dtype=np.float32)
    # The book's model is in the default memory format (lunaseg's run made it channels_last).
    model.to(device, memory_format=torch.contiguous_format).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch, indices in loader:
            output = model(batch.to(device))
            for k, slice_index in enumerate(indices.tolist()):
                prob[slice_index] = output[k, 0].cpu().numpy()
    timings["infer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = prob > 0.5
    eroded = ndimage.binary_erosion(mask, iterations=1)
    labels, count = ndimage.label(eroded)
    centres_irc = ndimage.center_of_mass(np.clip(ct.hu, -1000, 1000) + 1001, labels=labels,
                                         index=np.arange(1, count + 1)) if count else []
    centres_xyz = [ct.geometry.irc_to_xyz(np.asarray(c)) for c in centres_irc]
    timings["extract"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    return timings, len(centres_xyz)


# --------------------------------------------------------------------------- lunaseg


def lunaseg_segment(model, path: Path, device: torch.device, config: SegmentConfig,
                    spec: SegmentationSpec):
    """``lunaseg segment``'s path for one file, timed: read, segment_ct (network and
    candidates), total."""
    timings = {}
    start = time.perf_counter()
    ct = load_ct(path)
    timings["read"] = time.perf_counter() - start
    t0 = time.perf_counter()
    result = segment_ct(model, ct, config, spec=spec, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timings["infer"] = time.perf_counter() - t0
    timings["extract"] = 0.0  # inside segment_ct
    timings["total"] = time.perf_counter() - start
    return timings, result.candidates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=128, help="slices in the synthetic CT")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=SegmentConfig().batch_size)
    parser.add_argument("--no-amp", action="store_true", help="no bf16/channels_last on CUDA")
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast on a CPU with bf16 units too (CUDA has it unless "
                             "--no-amp)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--book", action="store_true", help="also time the book's approach")
    parser.add_argument("--book-batch-size", type=int, default=4)
    parser.add_argument("--book-workers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per mode (best kept)")
    parser.add_argument("--tta", default="1",
                        help="mirrored views per slice to time, comma-separated (1, 2, 4)")
    parser.add_argument("--lung-mask", action="store_true",
                        help="lunaseg with --lung-mask (the network runs around the lungs)")
    parser.add_argument("--model", type=Path, help="a checkpoint instead of random weights")
    parser.add_argument("--input", type=Path,
                        help="a CT file (.mhd, .nii.gz ...) instead of the synthetic one")
    args = parser.parse_args(argv)
    try:
        views = [int(v) for v in args.tta.split(",")]
    except ValueError:
        parser.error(f"--tta: expected integers like 1,4, got {args.tta!r}")
    if not views or any(v not in TTA_FLIPS for v in views):
        parser.error(f"--tta: each value must be one of {', '.join(map(str, TTA_FLIPS))}, "
                     f"got {args.tta!r}")
    # The book's 4 workers exceed the CPUs of small machines; that is what is measured.
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.model is not None:
        model, _ = load_model(args.model)
    else:
        model = build_model()
    model.eval()
    spec = getattr(model, "spec", SPEC)
    amp = (device.type == "cuda" or args.amp) and not args.no_amp
    config = SegmentConfig(batch_size=args.batch_size, lung_mask=args.lung_mask, amp=amp,
                           overlays=0, write_volumes=False)
    run_model = torch.compile(model) if args.compile else model

    rows = []
    with tempfile.TemporaryDirectory(prefix="lunaseg-bench-") as tmp:
        if args.input is not None:
            path = args.input
            shape = tuple(load_ct(path).hu.shape)
        else:
            shape = (args.slices, args.size, args.size)
            path = Path(tmp) / "1.2.826.0.1.3680043.8.498.1.mhd"
            geometry = Geometry(np.array([-180.0, -180.0, -320.0]),
                                np.array([0.7, 0.7, 2.5]), np.eye(3))
            write_image(synthetic_ct(shape), geometry, path)
        # Warm-up (kernel selection, compilation) on a small volume, untimed.
        predict_logits(run_model, synthetic_ct((4, *shape[1:])), spec, device=device,
                       batch_size=args.batch_size, amp=config.amp)
        suffix = "+lung" if args.lung_mask else ""
        modes = []
        for v in views:
            name = ("lunaseg" if v == 1 else f"tta {v}") + suffix
            modes.append((name, functools.partial(lunaseg_segment, run_model, path, device,
                                                  replace(config, tta=v), spec)))
        if args.book:
            modes.append(("book", lambda: book_segment(model, path, device,
                                                       args.book_batch_size,
                                                       args.book_workers)))
        for name, run in modes:
            best = None
            for _ in range(max(args.repeat, 1)):
                timings, found = run()
                if best is None or timings["total"] < best[0]["total"]:
                    best = (timings, found)
            rows.append((name, *best))

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    extra = []
    if device.type == "cpu":
        extra.append(f"{torch.get_num_threads()} threads")
    if config.amp:
        extra.append("bf16+channels_last")
    if args.compile:
        extra.append("compiled")
    print(f"CT {shape[0]}x{shape[1]}x{shape[2]} on {label}"
          + (f" ({', '.join(extra)})" if extra else "")
          + f"; lunaseg batch {args.batch_size}"
          + (f"; book batch {args.book_batch_size}, {args.book_workers} workers"
             if args.book else ""))
    header = f"{'mode':<18} {'read s':>7} {'infer s':>8} {'extract s':>9} {'total s':>8} " \
             f"{'s/slice':>8} {'cands':>6}"
    print(header)
    print("-" * len(header))
    for name, timings, found in rows:
        count = found if isinstance(found, int) else len(found)
        print(f"{name:<18} {timings['read']:7.2f} {timings['infer']:8.2f} "
              f"{timings['extract']:9.2f} {timings['total']:8.2f} "
              f"{timings['infer'] / shape[0]:8.4f} {count:6d}")
    by_name = {name: (timings, found) for name, timings, found in rows}
    one = by_name.get("lunaseg" + suffix)
    for name, (timings, found) in by_name.items():
        if one is not None and name.startswith("tta"):
            print(f"{name}: {timings['total'] / one[0]['total']:.2f}x the one-view time")
    book = by_name.get("book", (None,))[0]
    if book is not None:
        for name, (timings, _) in by_name.items():
            if name != "book" and not math.isclose(timings["total"], 0.0):
                print(f"speed-up (book total / {name} total): "
                      f"{book['total'] / timings['total']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
