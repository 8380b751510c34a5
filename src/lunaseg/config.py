"""Every default in one place: typed configs per stage, saved as JSON next to their outputs.

The book hard-codes 512, 7, 96, 64 and relative paths; here each such number is a field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lunaseg.errors import ConfigError

__all__ = [
    "MaskConfig", "SynthConfig", "CacheConfig", "DataConfig", "ModelConfig", "AugmentConfig",
    "TrainConfig", "SegmentConfig", "check_at_least", "check_fraction", "to_dict", "from_dict",
    "save_json",
]


@dataclass
class MaskConfig:
    """Ground-truth masks from annotation centres (SPEC §4)."""

    threshold_hu: float = -700.0  # nodule tissue is denser than this; lung air is not
    min_radius_vox: int = 2  # the book's first radius tried on each axis
    bound_by_diameter: bool = False  # the book ignores the diameter; True caps the box by it


@dataclass
class SynthConfig:
    """Synthetic LUNA16-format phantoms."""

    series: int = 12
    seed: int = 0
    shape_irc: tuple[int, int, int] = (128, 512, 512)
    subsets: int = 2
    max_nodules: int = 6
    no_nodule_fraction: float = 0.15  # share of scans with no nodule at all
    negative_candidates_per_scan: int = 60  # non-nodule rows in candidates.csv
    workers: int = 0  # processes writing scans; 0 = all CPUs (the files do not change)


@dataclass
class CacheConfig:
    """What prepcache stores (SPEC §5)."""

    chunk_irc: tuple[int, int, int] = (7, 96, 96)  # training chunk around each nodule
    workers: int = 0  # 0 = all CPUs
    masks: str = "heuristic"  # "heuristic" or "outline" (LIDC imports and phantoms)


@dataclass
class DataConfig:
    """How samples are cut from the cache (SPEC §6)."""

    context_slices: int = 3  # slices above and below the centre slice: 2*3+1 = 7 channels
    min_hu: float = -1000.0
    max_hu: float = 1000.0
    chunk_irc: tuple[int, int, int] = (7, 96, 96)
    crop_px: int = 64  # random crop of a chunk that training sees
    val_stride: int = 10  # every 10th series (sorted) validates
    test_stride: int = 0  # 0 = no test split; else every n-th of the remaining series
    full_ct_validation: bool = False  # validate on every slice, not just positive ones
    negative_crop_fraction: float = 0.0  # share of training crops cut from lung far from nodules
    full_slice_fraction: float = 0.0  # share of training samples that are whole slices
    # Each epoch, this share of the negative pool is re-cut at the model's own false
    # positives, found on ``hard_negative_slices`` random training slices (0 = off).
    hard_negative_fraction: float = 0.0
    hard_negative_slices: int = 64
    epoch_samples: int = 0  # 0 = one pass over the positive chunks per epoch

    @property
    def channels(self) -> int:
        return 2 * self.context_slices + 1


@dataclass
class ModelConfig:
    """U-Net hyper-parameters (SPEC §7); the defaults give 118,271 parameters."""

    in_channels: int = 7
    n_classes: int = 1
    depth: int = 3
    wf: int = 4  # first layer has 2**wf filters
    padding: bool = True
    batch_norm: bool = True
    up_mode: str = "upconv"  # "upconv" or "upsample"

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (each level halves them)."""
        return 2 ** (self.depth - 1)


@dataclass
class AugmentConfig:
    """Per-sample random affine + noise (SPEC §8); zero or False turns an option off."""

    flip: bool = False
    offset: float = 0.0  # fraction of the half-size, uniform +-
    scale: float = 0.0  # 1 +- scale per axis
    rotate: bool = False
    noise_hu: float = 0.0  # Gaussian sigma in HU, input only

    @classmethod
    def book(cls) -> "AugmentConfig":
        """The book's ``--augmented`` settings."""
        return cls(flip=True, offset=0.03, scale=0.2, rotate=True, noise_hu=25.0)


@dataclass
class TrainConfig:
    """Training run (SPEC §9)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 1
    batch_size: int = 16
    num_workers: int = 0
    lr: float = 1e-3
    # "constant" (book) or "cosine": decays per step to lr * lr_final_fraction at the last
    # epoch, which settles the weights so the last checkpoint is a good one, not a lucky one.
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.02
    fn_weight: float = 8.0
    bce_weight: float = 0.0  # pixel-wise cross-entropy added to the Dice terms (book: none)
    validation_cadence: int = 5
    best_min_recall: float | None = None  # None: best = top recall (book); else top F1 above it
    seed: int = 0
    amp: bool = False
    device: str = "auto"
    comment: str = ""


@dataclass
class SegmentConfig:
    """Full-CT inference and candidate extraction (SPEC §11)."""

    threshold: float = 0.5  # voxels with probability > threshold are foreground (book: 0.5)
    batch_size: int = 0  # slices per forward pass; 0 = 1 on CPU, 16 on a GPU
    erosion_iterations: int = 1
    keep_vanished: bool = True  # components erosion would erase stay, un-eroded (book: dropped)
    connectivity: int = 6  # 6 (faces; book / scipy default) or 26 (faces, edges, corners)
    # Centre of mass weights: "probability" (the model's confidence), "hu" (book: clipped
    # HU + 1001, which a dense neighbour such as the pleura pulls off the nodule), "uniform".
    center_weighting: str = "probability"
    score: str = "max"  # ranking score: "max" (book) or "mean" probability of the component
    min_voxels: int = 1
    # Keep only components touching a lung mask computed from HU; the network then runs
    # only on the box around it (see lunaseg.infer.predict_ct).
    lung_mask: bool = False
    max_candidates: int = 100  # LUNA16 scores at most 100 marks per scan
    overlays: int = 100  # PNG overlays for the top-N candidates of each scan (0 = none)
    write_volumes: bool = True  # probability.nii.gz and mask.nii.gz per scan
    amp: bool = False  # bf16 autocast + channels_last (CUDA only)
    # Test-time augmentation: average the model over 1 (off), 2 (+ left-right mirror) or
    # 4 (+ up-down mirrors) views of each slice.  4 views halve the candidates per scan at
    # about the same sensitivity, for up to 4x the network time (see the README).
    tta: int = 1
    device: str = "auto"


def check_at_least(config: Any, name: str, minimum: int | float, note: str = "") -> None:
    """ConfigError unless ``config.<name> >= minimum`` (``note`` explains the value)."""
    value = getattr(config, name)
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}{note}, got {value}")


def check_fraction(config: Any, name: str) -> None:
    """ConfigError unless ``config.<name>`` is in [0, 1] (None, an unset option, passes)."""
    value = getattr(config, name)
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")


def to_dict(config: Any) -> dict:
    """A dataclass config (nested ones too) as plain JSON-friendly data."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config of type ``cls`` from ``to_dict`` output; unknown keys are an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name) if dataclasses.is_dataclass(cls) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")
