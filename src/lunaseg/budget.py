"""How long the demo's recipe takes on this machine, and how to trim it to a time budget.

The project's 2-core machines differ by 2-3x in training speed (bf16 units or not, CPU
generation).  A few seconds' calibration of the U-Net's training step, against the same
calibration on a machine where the recipe was timed, estimates the demo's duration; with a
budget, the training stages on a slower machine run proportionally fewer epochs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from lunaseg.config import TrainConfig
from lunaseg.losses import segmentation_loss
from lunaseg.model import build_model
from lunaseg.runtime import autocast

__all__ = ["DemoTimings", "REFERENCE", "unet_training_rate", "estimated_s", "epoch_factor",
           "scaled_epochs"]


@dataclass(frozen=True)
class DemoTimings:
    """One measured run of the demo's full recipe: the calibration rate of its machine and
    where its seconds went, split into what scales with the training epochs and what not."""

    samples_per_s: float  # unet_training_rate on that machine, in the recipe's precision
    epoch_s: float  # U-Net, classifier and malignancy training
    fixed_s: float  # phantoms, cache, the classifier's negatives, detect and evaluate
    machine: str


# The demo's recipe timed on the slowest of the project's 2-core machines (float32, no bf16
# units); the split and its measurement: docs/results.md, "The demo's time".
REFERENCE = DemoTimings(samples_per_s=160.0, epoch_s=1085.0, fixed_s=380.0,
                        machine="2-core AMD EPYC, AVX2, float32")


def unet_training_rate(config: TrainConfig, device: torch.device, *, windows: int = 3,
                       steps: int = 2, warmup: int = 3) -> float:
    """Training samples/s of ``config``'s U-Net on ``device`` (forward, loss, backward, Adam
    step on random crops of the run's size and precision), the fastest of ``windows``
    windows of ``steps`` steps after ``warmup`` (a busy neighbour slows single windows):
    a few seconds on a CPU."""
    torch_state = torch.random.get_rng_state()  # leave the caller's random stream alone
    try:
        generator = torch.Generator().manual_seed(0)
        model = build_model(config.model).to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        shape = (config.batch_size, config.model.in_channels, config.data.crop_px,
                 config.data.crop_px)
        input = torch.randn(shape, generator=generator).to(device)
        input = input.contiguous(memory_format=torch.channels_last)
        label = (torch.rand((shape[0], 1, *shape[2:]), generator=generator) > 0.9).to(device)

        def run(n: int) -> float:
            started = time.perf_counter()
            for _ in range(n):
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, config.amp):
                    pred = model(input)
                loss = segmentation_loss(pred.float(), label, config.fn_weight,
                                         bce_weight=config.bce_weight)
                loss.backward()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started

        run(warmup)
        best_s = min(run(steps) for _ in range(max(1, windows)))
        return steps * config.batch_size / max(best_s, 1e-9)
    finally:
        torch.random.set_rng_state(torch_state)


def estimated_s(samples_per_s: float, reference: DemoTimings = REFERENCE) -> float:
    """The recipe's estimated seconds on a machine whose calibration gives
    ``samples_per_s`` (NaN without a usable rate)."""
    if samples_per_s <= 0 or reference.samples_per_s <= 0:
        return math.nan
    return (reference.fixed_s + reference.epoch_s) * reference.samples_per_s / samples_per_s


def epoch_factor(samples_per_s: float, budget_s: float,
                 reference: DemoTimings = REFERENCE) -> float:
    """The share of the recipe's epochs that fits ``budget_s`` on a machine whose
    calibration runs at ``samples_per_s``: 1 where the whole recipe fits, else what is
    left of the budget after the fixed work, over the epochs' estimated time."""
    if budget_s <= 0 or samples_per_s <= 0 or reference.samples_per_s <= 0:
        return 1.0
    slowdown = reference.samples_per_s / samples_per_s
    fixed_s, epoch_s = reference.fixed_s * slowdown, reference.epoch_s * slowdown
    if fixed_s + epoch_s <= budget_s:
        return 1.0
    return max(0.0, budget_s - fixed_s) / epoch_s


def scaled_epochs(epochs: int, factor: float, minimum: int) -> int:
    """``epochs`` scaled by ``factor``, never below ``minimum`` (nor above ``epochs``)."""
    return min(epochs, max(minimum, int(math.floor(epochs * factor + 0.5))))
