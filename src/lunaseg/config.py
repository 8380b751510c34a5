"""Every default in one place: typed settings per stage, saved as JSON beside their outputs.

Each field carries its help text, so the command line takes its defaults and help from here
(:func:`describe`) instead of repeating them.  The book hard-codes 512, 7, 96, 64 and
relative paths; here each such number is a field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lunaseg.errors import ConfigError
from lunaseg.inputs import size_multiple

__all__ = [
    "MaskConfig", "SynthConfig", "CacheConfig", "DataConfig", "ModelConfig", "AugmentConfig",
    "TrainConfig", "SegmentConfig", "LidcConfig", "ClassifierConfig", "CropAugmentConfig",
    "ClassifierDataConfig", "ClassifierTrainConfig", "CLASSIFIER_TASKS", "LUNA16_MAX_MARKS",
    "describe",
    "check_at_least", "check_fraction", "to_dict", "from_dict", "save_json",
]

# LUNA16 scores at most this many marks per scan.
LUNA16_MAX_MARKS = 100


def _opt(default: Any, help: str, *, none: str = "none") -> Any:
    """A field with a default and its help text (shown by ``--help``); ``none`` says what a
    None value means."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults need default_factory")
    return field(default=default, metadata={"help": help, "none": none})


def describe(cls: type, name: str) -> str:
    """The help text of ``cls.<name>`` with its default, for ``--help`` (a flag that is off
    by default shows no default)."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    text = spec.metadata.get("help", name)
    default = getattr(cls(), name)
    if default is False or default == "":
        return text
    if default is None:
        default = spec.metadata.get("none", "none")
    elif isinstance(default, tuple):
        default = ",".join(map(str, default))
    elif isinstance(default, float):
        default = f"{default:g}"
    return f"{text} (default {default})"


@dataclass
class MaskConfig:
    """Ground-truth masks from annotation centres (the book's HU heuristic, edge-safe)."""

    threshold_hu: float = _opt(-700.0, "nodule tissue is denser than this, lung air is not")
    min_radius_vox: int = _opt(2, "the first radius tried on each axis")
    bound_by_diameter: bool = _opt(False, "cap the heuristic's box at the annotated diameter "
                                          "(the book ignores the diameter)")


@dataclass
class SynthConfig:
    """Synthetic LUNA16-format phantoms."""

    series: int = _opt(12, "number of scans")
    seed: int = _opt(0, "random seed; the same seed writes the same bytes")
    shape_irc: tuple[int, int, int] = _opt((128, 512, 512), "volume size I,R,C "
                                                            "(slices, rows, columns)")
    subsets: int = _opt(2, "subsetN folders the scans are spread over")
    max_nodules: int = _opt(6, "most nodules per scan")
    no_nodule_fraction: float = _opt(0.15, "share of scans with no nodule at all")
    negative_candidates_per_scan: int = _opt(60, "non-nodule rows per scan in candidates.csv")
    workers: int = _opt(0, "processes writing scans; 0 = all CPUs (the files do not change)")


@dataclass
class CacheConfig:
    """What prepcache stores: each CT once, cropped to the body, and a chunk per nodule."""

    chunk_irc: tuple[int, int, int] = _opt((7, 64, 64), "training chunk I,R,C cut around "
                                                        "each nodule (the book's: 7,96,96)")
    workers: int = _opt(0, "processes; 0 = all CPUs")
    masks: str = _opt("heuristic", "nodule masks: 'heuristic' (the book's, from annotation "
                                   "centres) or 'outline' (masks/<uid>.mha: LIDC reader "
                                   "outlines or the phantoms' true voxels)")


@dataclass
class DataConfig:
    """How training samples are cut from the cache, and how the series are split."""

    context_slices: int = _opt(3, "slices above and below each slice, as channels")
    min_hu: float = _opt(-1000.0, "HU window: lower clip")
    max_hu: float = _opt(1000.0, "HU window: upper clip")
    crop_px: int = _opt(48, "training crop size in pixels, cut at random from a chunk")
    val_stride: int = _opt(10, "every N-th series (sorted) validates")
    test_stride: int = _opt(0, "every N-th remaining series is held out for testing "
                               "(0 = no test split)")
    full_ct_validation: bool = _opt(False, "validate on every slice, not only those with a "
                                           "nodule")
    negative_crop_fraction: float = _opt(0.6, "share of training crops cut away from nodules "
                                              "(look-alikes, lung, body)")
    full_slice_fraction: float = _opt(0.2, "share of training steps on whole slices "
                                           "(chapter exercise 4)")
    hard_negative_fraction: float = _opt(0.5, "each epoch, re-cut this share of the negative "
                                              "crops where the model finds false positives")
    hard_negative_slices: int = _opt(64, "training slices searched for false positives per "
                                         "epoch")
    epoch_samples: int = _opt(0, "samples per epoch; 0 = one pass over the nodule chunks "
                                 "(with the negatives mixed in), at least 2048")

    @property
    def channels(self) -> int:
        return 2 * self.context_slices + 1


@dataclass
class ModelConfig:
    """U-Net hyper-parameters; the defaults are the book's (118,271 parameters)."""

    in_channels: int = 7
    n_classes: int = _opt(1, "output classes: 1 (nodule or not, sigmoid: the book's) or 3 "
                             "(background, benign, malignant, softmax: chapter exercise 3)")
    depth: int = 3
    wf: int = 4  # first layer has 2**wf filters
    padding: bool = True
    batch_norm: bool = True
    up_mode: str = "upconv"  # "upconv" or "upsample"

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (each level halves them)."""
        return size_multiple(self.depth)


@dataclass
class AugmentConfig:
    """Per-sample random affine + noise; zero or False turns an option off."""

    flip: bool = _opt(True, "random flips of each axis")
    offset: float = _opt(0.1, "random shift, as a fraction of the half-size")
    scale: float = _opt(0.1, "random scale 1 +- this per axis")
    rotate: bool = _opt(True, "random rotation")
    noise_hu: float = _opt(10.0, "Gaussian noise sigma in HU (input only)")

    @classmethod
    def book(cls) -> "AugmentConfig":
        """The book's ``--augmented`` settings."""
        return cls(flip=True, offset=0.03, scale=0.2, rotate=True, noise_hu=25.0)

    @classmethod
    def none(cls) -> "AugmentConfig":
        """No augmentation (the book without ``--augmented``)."""
        return cls(flip=False, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)


@dataclass
class TrainConfig:
    """A training run.  The defaults are lunaseg's recipe, the best measured (see
    docs/results.md): the book's U-Net and Dice loss, plus negative crops, whole slices, hard
    negatives re-cut each epoch at the model's own false positives, a cross-entropy term
    beside a light false-negative weight, and a cosine learning rate so the last epoch is a
    good one; :meth:`book` is the book's."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = _opt(24, "epochs in all")
    batch_size: int = _opt(32, "training samples per step")
    num_workers: int = _opt(0, "validation loader workers")
    lr: float = _opt(1e-3, "Adam learning rate")
    lr_schedule: str = _opt("cosine", "'constant' (book) or 'cosine': decays per step to "
                                      "lr * lr_final_fraction at the last epoch, which "
                                      "settles the weights so the last checkpoint is a "
                                      "good one")
    lr_final_fraction: float = _opt(0.02, "the cosine schedule's final share of lr")
    fn_weight: float = _opt(1.0, "weight of the false-negative Dice term (book: 8)")
    bce_weight: float = _opt(2.0, "weight of a pixel-wise cross-entropy term beside the Dice "
                                  "terms (book: none); it cuts false positives Dice barely "
                                  "penalises")
    class_weight: float = _opt(1.0, "3-class models: weight of the benign-vs-malignant "
                                    "cross-entropy on nodule pixels beside the nodule terms")
    validation_cadence: int = _opt(6, "validate at epoch 1, every N epochs and the last")
    best_by: str = _opt("candidates", "what makes checkpoint.best.pt best: 'candidates' "
                                      "(sensitivity within 20 false positives per scan, then "
                                      "CPM, on the validation scans) or 'pixels' (the book's "
                                      "pixel recall)")
    best_min_recall: float | None = _opt(None, "pick the best checkpoint by F1 among "
                                               "validations reaching this recall",
                                         none="by recall alone, as the book")
    seed: int = _opt(0, "random seed")
    amp: bool = _opt(False, "bf16 autocast (CUDA, or a CPU with bf16 units)")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...")
    comment: str = _opt("", "a note stored with the run")

    @classmethod
    def book(cls) -> "TrainConfig":
        """The book's chapter-13 run: nodule crops only, Dice + 8 x false-negative Dice, the
        book's augmentation, constant learning rate, 300,000 samples per epoch, 20 epochs,
        best by pixel recall (64-px crops of 96-px chunks: ``prepcache --chunk 7,96,96``)."""
        return cls(data=DataConfig(crop_px=64, negative_crop_fraction=0.0,
                                   full_slice_fraction=0.0, hard_negative_fraction=0.0,
                                   epoch_samples=300_000),
                   augment=AugmentConfig.book(), epochs=20, batch_size=16,
                   lr_schedule="constant", fn_weight=8.0, bce_weight=0.0,
                   validation_cadence=5, best_by="pixels")


@dataclass
class SegmentConfig:
    """Full-CT inference and candidate extraction; None means "the model's own" (its input
    spec, saved in its checkpoint, says)."""

    threshold: float = _opt(0.5, "probability above which a voxel is foreground")
    batch_size: int = _opt(0, "slices per forward pass; 0 = 4 on a CPU, 16 on a GPU")
    erosion_iterations: int = _opt(1, "binary erosion iterations before labelling")
    grouping: str | None = _opt(None, "'lunaseg' (keep what erosion erases, measure what was "
                                      "segmented) or 'book' (drop it, measure eroded cores)",
                                none="the model's")
    min_voxels: int = _opt(1, "drop components smaller than this")
    lung_mask: bool = _opt(True, "keep only candidates touching a lung mask computed from HU; "
                                 "the network then runs only around the lungs")
    resample: bool = _opt(True, "feed the network a scan's slices resampled to the pixel "
                                "spacing it was trained at, when they differ by more than 15 %")
    max_candidates: int = _opt(LUNA16_MAX_MARKS, "marks per scan in the submission CSV")
    overlays: int = _opt(100, "PNG views for the top N candidates of each scan (0 = none)")
    write_volumes: bool = _opt(True, "write probability.nii.gz and mask.nii.gz per scan")
    amp: bool = _opt(False, "bf16 autocast + channels_last (CUDA, or a CPU with bf16 units)")
    tta: int | None = _opt(None, "mirrored views of each slice: 1, 2 (+ left-right) or 4 "
                                 "(+ up-down)", none="the model's")
    tta_rule: str | None = _opt(None, "how views combine: 'consensus' (the lowest logit: "
                                      "foreground only where every view agrees) or 'mean'",
                                none="the model's")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...")


@dataclass
class ClassifierConfig:
    """Candidate classifier hyper-parameters; the defaults are the book's ``LunaModel``
    (222,220 parameters, input 32 x 48 x 48)."""

    in_channels: int = _opt(1, "input channels (one HU crop)")
    conv_channels: int = _opt(8, "filters of the first block; each further block doubles them")
    depth: int = _opt(4, "conv blocks, each halving every axis")
    crop_irc: tuple[int, int, int] = _opt((32, 48, 48), "input crop I,R,C centred on the "
                                                        "candidate; multiples of 2**depth")
    classes: tuple[str, ...] = _opt(("non-nodule", "nodule"), "what the outputs mean, in "
                                                              "order")

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class CropAugmentConfig:
    """Per-sample random 3D affine + noise of classifier crops; the defaults are the book's
    classifier ``--augmented`` settings (zero or False turns an option off)."""

    flip: bool = _opt(True, "random flip of each axis (index, row, col)")
    offset: float = _opt(0.1, "random shift on each axis, as a fraction of the crop's "
                              "half-size")
    scale: float = _opt(0.2, "random scale 1 +- this per axis")
    rotate: bool = _opt(True, "random rotation about the index (slice) axis")
    noise_hu: float = _opt(25.0, "Gaussian noise sigma in HU")

    @classmethod
    def off(cls) -> "CropAugmentConfig":
        """No augmentation at all."""
        return cls(flip=False, offset=0.0, scale=0.0, rotate=False, noise_hu=0.0)


@dataclass
class ClassifierDataConfig:
    """Which crops the classifier trains and validates on, and how they are balanced."""

    min_hu: float = _opt(-1000.0, "HU window: lower clip")
    max_hu: float = _opt(1000.0, "HU window: upper clip")
    val_stride: int = _opt(DataConfig().val_stride, "without a segmentation run's splits: "
                                                    "every N-th series (sorted) validates")
    test_stride: int = _opt(DataConfig().test_stride, "without a segmentation run's splits: "
                                                      "every N-th remaining series is held "
                                                      "out (0 = none)")
    negatives_per_positive: int = _opt(1, "balanced sampling: negatives per positive (book: "
                                          "1); 0 = every sample as often as any other")
    epoch_samples: int = _opt(0, "training samples per epoch (0 = each positive once, with "
                                 "its negatives)")
    lookalikes: bool = _opt(True, "use candidates.csv's non-nodule rows as negatives")
    segmentation_negatives: int = _opt(200, "per series, at most this many candidates of the "
                                            "segmentation model (highest score first) far from "
                                            "every nodule become negatives (needs --seg-model)")
    segmentation_tta: int = _opt(1, "mirrored views when segmenting for negatives (1, the "
                                    "fastest, gives a few more candidates: more negatives)")
    min_distance_diameters: float = _opt(1.0, "a segmentation candidate is a negative only "
                                              "when farther than this many diameters from "
                                              "every nodule and excluded finding")


CLASSIFIER_TASKS = ("nodule", "malignancy")


@dataclass
class ClassifierTrainConfig:
    """A classifier training run: nodule vs non-nodule, or benign vs malignant fine-tuning."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    augment: CropAugmentConfig = field(default_factory=CropAugmentConfig)
    task: str = _opt("nodule", "'nodule' (candidates: nodule or not) or 'malignancy' "
                               "(nodules: benign or malignant, fine-tuned from a nodule "
                               "classifier)")
    finetune_depth: int = _opt(1, "malignancy: layers retrained, counted from the output: "
                                  "1 = the head, 2 = the head and the last conv block")
    epochs: int = _opt(10, "epochs in all")
    batch_size: int = _opt(32, "training samples per step")
    optimizer: str = _opt("adam", "'adam' or 'sgd' (the book's, with momentum)")
    # Adam at 1e-3 turned the full-size net into a constant within ten steps (dead ReLUs);
    # 1e-4 learns at once, the book's SGD needs millions of samples (docs/classifier.md).
    lr: float = _opt(1e-4, "learning rate")
    momentum: float = _opt(0.99, "SGD momentum (the book's)")
    validation_cadence: int = _opt(1, "validate at epoch 1, every N epochs and the last")
    seed: int = _opt(0, "random seed")
    amp: bool = _opt(False, "bf16 autocast (CUDA, or a CPU with bf16 units)")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...")
    comment: str = _opt("", "a note stored with the run")


@dataclass
class LidcConfig:
    """Importing LIDC-IDRI DICOM and reader XML into the LUNA16 layout."""

    min_readers: int = _opt(3, "readers who must mark a nodule for it to count (LUNA16: 3)")
    subset: int = _opt(0, "subsetN folder the scans are written to")


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


# Settings older lunaseg versions saved that no longer exist (their files still load):
# the chunk size now lives in the cache alone.
_RETIRED = {"DataConfig": {"chunk_irc"}}


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config of type ``cls`` from ``to_dict`` output; unknown keys are an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k not in _RETIRED.get(cls.__name__, ())}
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
    """Write a config as indented JSON, atomically."""
    from lunaseg.files import write_text_atomic

    write_text_atomic(json.dumps(to_dict(config), indent=2) + "\n", path)
