"""Benchmark training throughput in samples/s: data from the cache, augmentation, forward,
backward and optimizer step, for 7x64x64 crops at several batch sizes.

Not a test.  Synthetic phantoms (``lunaseg.synth``) are written to a temporary folder and
cached with ``prepcache`` (7x96x96 chunks), then each mode trains the default U-Net:

* ``lunaseg``: :class:`~lunaseg.datasets.TrainingSampler` (every chunk held in one tensor
  on the training device, a batch of random 64x64 crops cut with one gather) ->
  :class:`~lunaseg.augment.SegmentationAugmentation` with the book's settings (a transform
  per sample) -> U-Net -> Dice + 8 x false-negative Dice -> Adam, plus the per-step pixel
  counts training keeps.  ``--amp`` (bf16 autocast), ``--channels-last`` and ``--compile``
  switch on the options a training run can use.
* ``model``: the same step on one random batch already on the device: no data and no
  augmentation, the limit the pipeline can reach with this model and these kernels.
* ``baseline`` (with ``--amp`` or ``--compile``): ``model`` in eager float32, the reference
  the faster model step is measured against in the same run.
* ``book`` (``--book``): the book's pipeline, rewritten here: a ``DataLoader`` whose worker
  processes cut each sample (random 64x64 crop of a 96x96 chunk read from the cache) on the
  CPU, one augmentation transform shared by the whole batch (offset ignored, as in the
  book), fp32.  The book also gunzips every chunk from its disk cache; reading it from the
  page cache here favours the book.

Warm-up steps are not timed; each batch size reports the median of a few timed windows.
Usage::

    python benchmarks/bench_train.py                          # best device, batch 16..1024
    python benchmarks/bench_train.py --device cpu --batch-sizes 16,64 --book
    python benchmarks/bench_train.py --amp --channels-last    # bf16 autocast (CPU or CUDA)
    python benchmarks/bench_train.py --compile                # torch.compile the model
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lunaseg.augment import SegmentationAugmentation, apply_affine
from lunaseg.cache import Cache, prepcache
from lunaseg.config import AugmentConfig, CacheConfig, DataConfig, TrainConfig
from lunaseg.datasets import TrainingSampler
from lunaseg.losses import segmentation_loss
from lunaseg.metrics import SegmentationMetrics, pixel_counts
from lunaseg.inputs import SegmentationSpec
from lunaseg.model import build_model
from lunaseg.runtime import resolve_device

Batch = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- data


def _fallback_phantoms(root: Path, series: int, shape: tuple[int, int, int], seed: int) -> None:
    """Body, two lungs and a few dense balls per series, LUNA16 layout (if synth is missing)."""
    from lunaseg.ct import write_image
    from lunaseg.geometry import Geometry
    from lunaseg.files import write_csv
    from lunaseg.luna import ANNOTATION_COLUMNS, CANDIDATE_COLUMNS

    rng = np.random.default_rng(seed)
    geometry = Geometry.identity(spacing_xyz=(0.7, 0.7, 2.5))
    n_slices, rows, cols = shape
    i, r, c = np.ogrid[:n_slices, :rows, :cols]
    annotations, candidates = [], []
    for k in range(series):
        uid = f"1.2.826.0.1.3680043.8.498.{9000 + k}"
        hu = np.full(shape, -1000.0, dtype=np.float32)
        body = ((r - rows / 2) / (0.42 * rows)) ** 2 + ((c - cols / 2) / (0.46 * cols)) ** 2
        hu[:, (body <= 1)[0]] = 40
        for side in (-1, 1):
            lung = ((r - rows / 2) / (0.3 * rows)) ** 2 + \
                ((c - cols / 2 - side * 0.2 * cols) / (0.14 * cols)) ** 2
            hu[:, (lung <= 1)[0]] = -850
        for _ in range(3):
            center = np.array([rng.integers(4, n_slices - 4),
                               rng.integers(0.35 * rows, 0.65 * rows),
                               cols / 2 + rng.choice([-1, 1]) * 0.2 * cols]).round()
            radius_mm = rng.uniform(3, 8)
            ball = (((i - center[0]) * 2.5) ** 2 + ((r - center[1]) * 0.7) ** 2
                    + ((c - center[2]) * 0.7) ** 2) <= radius_mm ** 2
            hu[ball] = 50
            xyz = geometry.irc_to_xyz(center)
            annotations.append([uid, *xyz.round(3), 2 * radius_mm])
            candidates.append([uid, *xyz.round(3), 1])
        hu += rng.normal(0, 20, shape).astype(np.float32)
        write_image(hu.astype(np.int16), geometry, root / "subset0" / f"{uid}.mhd")
    write_csv(root / "annotations.csv", ANNOTATION_COLUMNS, annotations)
    write_csv(root / "candidates.csv", CANDIDATE_COLUMNS, candidates)


def build_cache(root: Path, series: int, shape: tuple[int, int, int], seed: int) -> Path:
    """Synthetic LUNA16-layout data under ``root`` and its prepcache; returns the cache folder."""
    try:
        from lunaseg.config import SynthConfig
        from lunaseg.synth import synthesize_dataset
    except ImportError:
        _fallback_phantoms(root, series, shape, seed)
    else:
        synthesize_dataset(root, SynthConfig(series=series, seed=seed, shape_irc=shape,
                                             no_nodule_fraction=0.0), progress=False)
    summary = prepcache(root, root / "cache", config=CacheConfig(chunk_irc=(7, 96, 96)),
                        progress=False)
    if summary.failed or not summary.built:
        raise SystemExit(f"prepcache failed: {summary.failed}")
    return root / "cache"


class BookCropDataset(Dataset):
    """The book's training dataset: one random 64x64 crop of a 96x96 nodule chunk per item,
    cut in a worker process; epoch length decoupled from the number of chunks."""

    def __init__(self, cache_dir: Path, series_uids: list[str], crop_px: int, length: int):
        self.cache_dir = Path(cache_dir)
        self.crop_px = crop_px
        self.length = length
        cache = Cache(cache_dir)
        self.items = [(uid, k) for uid in series_uids for k in range(len(cache[uid].nodules))]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        uid, k = self.items[index % len(self.items)]
        folder = self.cache_dir / uid
        # Read one chunk per sample, as the book reads one cached chunk per candidate.
        chunk = np.array(np.load(folder / "chunks.npy", mmap_mode="r")[k])
        mask = np.array(np.load(folder / "chunk_masks.npy", mmap_mode="r")[k]) > 0  # classes
        span = chunk.shape[-1] - self.crop_px
        row, col = np.random.randint(0, span + 1, size=2)
        ct = torch.from_numpy(chunk[:, row:row + self.crop_px, col:col + self.crop_px]
                              .astype(np.float32)).clamp_(-1000, 1000)
        label = torch.from_numpy(mask[mask.shape[0] // 2, row:row + self.crop_px,
                                      col:col + self.crop_px][None].copy())
        return ct, label


def model_only_batches(device: torch.device, batch_size: int, crop_px: int) -> Iterator[Batch]:
    """The same random batch over and over: no data, no augmentation, the model's own limit."""
    generator = torch.Generator().manual_seed(0)
    input = (torch.rand(batch_size, 7, crop_px, crop_px, generator=generator) * 2000 - 1000)
    label = torch.rand(batch_size, 1, crop_px, crop_px, generator=generator) > 0.97
    input, label = input.to(device), label.to(device)
    while True:
        yield input, label


def lunaseg_batches(cache_dir: Path, data: DataConfig, device: torch.device, batch_size: int,
                    augment: SegmentationAugmentation) -> Iterator[Batch]:
    cache = Cache(cache_dir)
    sampler = TrainingSampler(cache, cache.series_uids, data, device, SegmentationSpec(),
                              seed=0)
    epoch = 1
    while True:  # endless: the caller stops after its timed steps
        for input, label in sampler.batches(epoch, batch_size):
            yield augment(input, label)
        epoch += 1


def book_batches(cache_dir: Path, data: DataConfig, device: torch.device, batch_size: int,
                 augment: SegmentationAugmentation, workers: int) -> Iterator[Batch]:
    cache = Cache(cache_dir)
    dataset = BookCropDataset(cache_dir, cache.series_uids, data.crop_px, 1 << 30)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None)
    for input, label in loader:
        input = input.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        # One transform for the whole batch; the book's offset never reached affine_grid.
        theta = augment.draw_transforms(1, device)
        theta[:, :, 2] = 0
        input, label = apply_affine(input, label, theta.expand(input.shape[0], -1, -1))
        yield augment.add_noise(input), label


# ----------------------------------------------------------------------------- timing


def make_step(model: torch.nn.Module, device: torch.device, *, amp: bool, channels_last: bool,
              fn_weight: float) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimizer step as ``lunaseg.train`` takes it (loss, backward, Adam, pixel counts)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    metrics = SegmentationMetrics(device)

    def step(input: torch.Tensor, label: torch.Tensor) -> None:
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(input)
        pred = pred.float()
        loss = segmentation_loss(pred, label, fn_weight, reduction="none")
        loss.mean().backward()
        optimizer.step()
        metrics.update(loss.detach(), pixel_counts(pred.detach(), label))

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(step: Callable, batches: Iterator[Batch], device: torch.device, *,
                  warmup: int, steps: int, windows: int) -> tuple[list[float], float]:
    """samples/s of each timed window of ``steps`` steps, after ``warmup`` untimed steps,
    and the seconds those took (with ``--compile``, mostly compiling)."""
    started = time.perf_counter()
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    warmup_s = time.perf_counter() - started
    rates = []
    for _ in range(windows):
        started = time.perf_counter()
        samples = 0
        for _ in range(steps):
            input, label = next(batches)
            step(input, label)
            samples += input.shape[0]
        _sync(device)
        rates.append(samples / (time.perf_counter() - started))
    return rates, warmup_s


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} " \
           f"threads of {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-sizes", default="16,64,256,1024",
                        help="comma-separated batch sizes")
    parser.add_argument("--window-samples", type=int, default=1024,
                        help="samples per timed window (at least --min-steps steps)")
    parser.add_argument("--min-steps", type=int, default=2, help="fewest steps per window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows (median kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per batch size")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs "
                        "and weights")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--book", action="store_true", help="also time the book's pipeline")
    parser.add_argument("--no-model-only", action="store_true",
                        help="skip the model-only rate (random tensors already on the device: "
                             "forward, backward and Adam step alone)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top operations for lunaseg's pipeline at "
                             "the first batch size")
    parser.add_argument("--book-only", action="store_true", help="time only the book's pipeline")
    parser.add_argument("--book-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers for --book (the book: 8)")
    parser.add_argument("--no-augment", action="store_true", help="skip augmentation")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--series", type=int, default=6, help="synthetic series to cache")
    parser.add_argument("--shape", default="48,256,256", help="I,R,C of each phantom")
    parser.add_argument("--cache", type=Path, help="use this prepcache (7x96x96 chunks) "
                        "instead of building one")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    augment_config = AugmentConfig.none() if args.no_augment else AugmentConfig.book()
    train_config = TrainConfig(augment=augment_config)
    # Nodule crops only, as the book: every sample is a 7x64x64 crop.
    data = DataConfig(crop_px=64, negative_crop_fraction=0.0, full_slice_fraction=0.0,
                      hard_negative_fraction=0.0)
    modes = [] if args.book_only else ["lunaseg"]
    if not args.no_model_only and not args.book_only:
        modes.insert(0, "model")
        if args.amp or args.compile:
            modes.insert(0, "baseline")
    if args.book or args.book_only:
        modes.append("book")

    rows = []
    with tempfile.TemporaryDirectory(prefix="lunaseg-bench-") as tmp:
        if args.cache is not None:
            cache_dir = args.cache
        else:
            shape = tuple(int(v) for v in args.shape.split(","))
            started = time.perf_counter()
            cache_dir = build_cache(Path(tmp), args.series, shape, seed=0)
            print(f"synthetic data: {args.series} series {shape}, "
                  f"{sum(len(Cache(cache_dir)[u].nodules) for u in Cache(cache_dir).series_uids)}"
                  f" nodule chunks ({time.perf_counter() - started:.1f} s)")
        for mode in modes:
            for batch_size in batch_sizes:
                torch.manual_seed(0)
                model = build_model(train_config.model).to(device).train()
                if args.channels_last:
                    model = model.to(memory_format=torch.channels_last)
                ours = mode != "book"  # the book ran fp32, contiguous, eager
                faster = mode in ("lunaseg", "model")  # baseline: eager float32
                run_model = torch.compile(model) if args.compile and faster else model
                augment = SegmentationAugmentation(augment_config, seed=0)
                step = make_step(run_model, device, amp=args.amp and faster,
                                 channels_last=args.channels_last and ours,
                                 fn_weight=train_config.fn_weight)
                if mode in ("model", "baseline"):
                    batches = model_only_batches(device, batch_size, data.crop_px)
                elif mode == "lunaseg":
                    batches = lunaseg_batches(cache_dir, data, device, batch_size, augment)
                    if args.profile and batch_size == batch_sizes[0]:
                        _profile(step, batches, device)
                else:
                    batches = book_batches(cache_dir, data, device, batch_size, augment,
                                           args.book_workers)
                steps = max(args.min_steps, -(-args.window_samples // batch_size))
                rates, warmup_s = time_training(step, batches, device, warmup=args.warmup,
                                                steps=steps, windows=args.windows)
                batches.close()
                rows.append((mode, batch_size, steps, rates))
                print(f"  {mode} batch {batch_size}: "
                      f"{', '.join(f'{r:.0f}' for r in rates)} samples/s "
                      f"({args.warmup} warm-up steps {warmup_s:.1f} s)", flush=True)

    options = [name for name, on in (("bf16 autocast", args.amp),
                                     ("channels_last", args.channels_last),
                                     ("compiled", args.compile),
                                     ("no augmentation", args.no_augment)) if on]
    print(f"\ntraining 7x64x64 crops on {_device_label(device)}, torch {torch.__version__}"
          + (f"; lunaseg with {', '.join(options)}" if options else "")
          + (f"; book: {args.book_workers} workers, fp32" if "book" in modes else ""))
    if hasattr(os, "getloadavg"):
        print(f"load average before the table: {os.getloadavg()[0]:.2f}")
    header = f"{'mode':<8} {'batch':>6} {'steps/win':>9} {'samples/s':>10} {'min':>8} " \
             f"{'max':>8} {'ms/step':>9}"
    print(header)
    print("-" * len(header))
    median = {}
    for mode, batch_size, steps, rates in rows:
        rate = statistics.median(rates)
        median[mode, batch_size] = rate
        print(f"{mode:<8} {batch_size:6d} {steps:9d} {rate:10.1f} {min(rates):8.1f} "
              f"{max(rates):8.1f} {1000 * batch_size / rate:9.1f}")
    for batch_size in batch_sizes:
        if ("lunaseg", batch_size) in median and ("model", batch_size) in median:
            print(f"batch {batch_size}: lunaseg's pipeline runs at "
                  f"{median['lunaseg', batch_size] / median['model', batch_size]:.2f}x the "
                  f"model-only rate")
        if ("model", batch_size) in median and ("baseline", batch_size) in median:
            print(f"batch {batch_size}: the model step runs at "
                  f"{median['model', batch_size] / median['baseline', batch_size]:.2f}x eager "
                  f"float32")
        if ("lunaseg", batch_size) in median and ("book", batch_size) in median:
            print(f"speed-up at batch {batch_size} (lunaseg / book): "
                  f"{median['lunaseg', batch_size] / median['book', batch_size]:.2f}x")
    return 0


def _profile(step: Callable, batches: Iterator[Batch], device: torch.device) -> None:
    """Where a few steps of the pipeline spend their time, by operation (and data time)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    for _ in range(2):
        step(*next(batches))
    with profile(activities=activities) as prof:
        for _ in range(5):
            with record_function("data + augmentation"):
                input, label = next(batches)
            with record_function("model step"):
                step(input, label)
        _sync(device)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    raise SystemExit(main())
