"""Benchmark classifier training throughput in samples/s: where the augmentation runs.

Not a test.  Phantoms (``lunaseg.synth``, or ``--data`` with a prepcache) give the
training samples: the cached nodules against the cached look-alikes, one to one.  Every mode
trains the same model (the book's ``LunaModel``, 32 x 48 x 48 crops) with the same
augmentation settings (the book's: flips, offset 0.1, scale 0.2, rotation about the index
axis, 25 HU noise) and Adam:

* ``model``: forward, backward and step on one fixed batch: the ceiling.
* ``device``: lunaseg's way.  :class:`~lunaseg.classifier_data.CropSampler` cuts each
  batch's source crops (large enough that no rotation pulls in padding) from the memory-
  mapped cache, they go to the device as int16, and
  :class:`~lunaseg.augment.CropAugmentation` resamples the whole batch in one
  ``grid_sample``, a transform per sample.
* ``device-plain``: the same, but cutting only 32 x 48 x 48 (edges repeat where a rotation
  reaches beyond the crop): the transfer and resampling cost of the margin.
* ``loader-wN``: the book's way.  A ``Dataset`` cuts and augments one sample at a time on
  the CPU (the same module and settings, one sample per call, a generator seeded by the
  sample's index so the draw does not depend on which worker runs it) and a ``DataLoader``
  with N worker processes batches them.

Warm-up steps are not timed; the modes take turns, window by window, so a neighbour's load
on a shared machine falls on all of them alike; each row is the median of its windows.  ``aug ms``
is the augmentation's share of a step (measured on its own), ``MB/step`` what crosses from
host to device.  Usage::

    python benchmarks/bench_classifier.py                    # CPU or GPU, batch 32 and 64
    python benchmarks/bench_classifier.py --batch-sizes 32 --modes model,device,loader-w0
    python benchmarks/bench_classifier.py --data DIR          # an existing prepcached set
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lunaseg.augment import CropAugmentation
from lunaseg.cache import Cache, prepcache
from lunaseg.classifier import build_classifier
from lunaseg.classifier_data import (CropSample, CropSampler, cut_samples, lookalike_samples,
                                     nodule_samples)
from lunaseg.classify import crops_to_input
from lunaseg.config import CacheConfig, ClassifierDataConfig, CropAugmentConfig, SynthConfig
from lunaseg.inputs import ClassifierSpec
from lunaseg.runtime import resolve_device

Batch = tuple[torch.Tensor, torch.Tensor]
CROP = (32, 48, 48)
SPEC = ClassifierSpec(crop_irc=CROP)


def _samples(cache: Cache) -> tuple[list[CropSample], list[CropSample]]:
    uids = cache.series_uids
    return nodule_samples(cache, uids), lookalike_samples(cache, uids)


class _AugmentedCrops(Dataset):
    """The book's pipeline: one sample cut and augmented per ``__getitem__`` on the CPU."""

    def __init__(self, cache: Cache, samples: list[CropSample], config: CropAugmentConfig,
                 seed: int) -> None:
        self.cache_dir = cache.folder
        self.samples = samples
        self.augment = CropAugmentation(config, CROP, seed=seed)
        self.seed = seed
        self._entries: dict | None = None  # opened in each worker: memory maps do not pickle

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._entries is None:
            cache = Cache(self.cache_dir)
            self._entries = {uid: cache[uid] for uid in cache.series_uids}
        sample = self.samples[k]
        crop = cut_samples(self._entries, [sample], self.augment.source_irc)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        theta = self.augment.draw_transforms(1, generator=generator)
        input = crops_to_input(torch.from_numpy(crop), SPEC)
        out = self.augment.apply_crop_affine(input, theta, CROP)
        out = self.augment.add_noise(out, generator=generator)
        return out[0], torch.tensor(sample.label)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # two workers with two threads each would fight over 2 cores


def _device_batches(sampler: CropSampler, augment: CropAugmentation, device: torch.device,
                    batch_size: int) -> Iterator[Batch]:
    epoch = 1
    while True:
        for crops, labels, _ in sampler.batches(epoch, batch_size):
            hu = torch.from_numpy(crops).to(device, non_blocking=True)
            input, _ = augment(crops_to_input(hu, SPEC))
            yield input, torch.from_numpy(labels).to(device)
        epoch += 1


def _loader_batches(dataset: _AugmentedCrops, order: list[int], workers: int,
                    device: torch.device, batch_size: int) -> Iterator[Batch]:
    subset = torch.utils.data.Subset(dataset, order)
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers,
                        persistent_workers=workers > 0, worker_init_fn=_one_thread,
                        pin_memory=device.type == "cuda", drop_last=True)
    while True:
        for input, label in loader:
            yield input.to(device, non_blocking=True), label.to(device, non_blocking=True)


def _stepper(batches: Iterator[Batch], model: torch.nn.Module, device: torch.device
             ) -> Callable[[int], float]:
    """A function running ``n`` training steps and returning their seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            input, label = next(batches)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(input), label.long()).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def _aug_ms(augment: CropAugmentation, source: torch.Tensor, per_sample: bool,
            device: torch.device) -> float:
    """Milliseconds to augment one batch of source crops, batched or one sample at a time."""
    def run() -> None:
        if per_sample:
            for k in range(source.shape[0]):
                augment(source[k:k + 1])
        else:
            augment(source)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    start = time.perf_counter()
    for _ in range(3):
        run()
    return (time.perf_counter() - start) / 3 * 1000


def _make_phantoms(root: Path, series: int, shape: tuple[int, int, int]) -> Path:
    from lunaseg.synth import synthesize_dataset

    synthesize_dataset(root, SynthConfig(series=series, seed=11, shape_irc=shape), progress=False)
    prepcache(root, root / "cache", config=CacheConfig(chunk_irc=(7, 64, 64)), progress=False)
    return root / "cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset folder with a prepcache (default: phantoms)")
    parser.add_argument("--series", type=int, default=6, help="phantoms to make (default 6)")
    parser.add_argument("--batch-sizes", default="32,64")
    parser.add_argument("--modes", default="model,device,device-plain,loader-w0,loader-w2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = (Path(args.data) / "cache" if args.data
                     else _make_phantoms(Path(tmp) / "phantoms", args.series, (64, 256, 256)))
        cache = Cache(cache_dir)
        positives, negatives = _samples(cache)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
              f"{len(cache)} series, {len(positives)} nodules, {len(negatives)} look-alikes; "
              f"load average {os.getloadavg()[0]:.1f}")
        config = CropAugmentConfig()
        data = ClassifierDataConfig(epoch_samples=100_000)
        print(f"{'mode':<14}{'batch':>6}{'samples/s':>11}{'aug ms':>9}{'MB/step':>9}  source")
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            rows = []
            for mode in args.modes.split(","):
                torch.manual_seed(0)
                model = build_classifier().to(device)
                augment = CropAugmentation(config, CROP, seed=0)
                source = CROP if mode in ("model", "device-plain") else augment.source_irc
                sampler = CropSampler(cache, positives, negatives, data, source, seed=0)
                crops, _, _ = next(sampler.batches(1, batch_size))
                megabytes = crops.nbytes / 1e6
                probe = crops_to_input(torch.from_numpy(crops).to(device), SPEC)
                aug_ms = float("nan")
                if mode == "model":
                    input = probe  # the model's speed does not depend on the voxels
                    label = torch.arange(batch_size, device=device) % 2
                    batches: Iterator[Batch] = iter(lambda: (input, label), None)
                    megabytes = 0.0
                elif mode.startswith("device"):
                    batches = _device_batches(sampler, augment, device, batch_size)
                    aug_ms = _aug_ms(augment, probe, False, device)
                elif mode.startswith("loader-w"):
                    workers = int(mode[len("loader-w"):])
                    index = {s: k for k, s in enumerate(positives + negatives)}
                    order = [index[s] for s in sampler.epoch(1)]
                    dataset = _AugmentedCrops(cache, positives + negatives, config, seed=0)
                    batches = _loader_batches(dataset, order, workers, device, batch_size)
                    aug_ms = _aug_ms(augment, probe.cpu(), True, torch.device("cpu"))
                    megabytes = batch_size * np.prod(CROP) * 4 / 1e6  # float32 crops
                else:
                    raise SystemExit(f"unknown mode {mode!r}")
                run = _stepper(batches, model, device)
                run(args.warmup)
                rows.append((mode, run, aug_ms, megabytes, source, []))
            for _ in range(args.windows):
                for mode, run, _, _, _, rates in rows:
                    rates.append(args.steps * batch_size / run(args.steps))
            for mode, _, aug_ms, megabytes, source, rates in rows:
                print(f"{mode:<14}{batch_size:>6}{statistics.median(rates):>11.1f}{aug_ms:>9.0f}"
                      f"{megabytes:>9.1f}  {'x'.join(map(str, source))}", flush=True)
            del rows

if __name__ == "__main__":
    main()
