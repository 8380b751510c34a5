"""The candidate classifier: a small 3D conv net over one crop per candidate, and its files.

The default is the book's chapter-11 ``LunaModel``: BatchNorm over the input, four blocks of
(3x3x3 conv -> ReLU) x 2 -> 2x2x2 max-pool with 8, 16, 32 and 64 filters, one linear layer
to two classes (non-nodule, nodule): 222,220 parameters for a 32 x 48 x 48 crop.  Module
names equal the book's, so its ``state_dict`` keys load with ``strict=True``.  The same
network fine-tuned on nodules alone tells benign from malignant (chapter 14).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lunaseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, unwrap
from lunaseg.config import ClassifierConfig, from_dict, to_dict
from lunaseg.errors import CheckpointError, ConfigError
from lunaseg.inputs import ClassifierSpec
from lunaseg.runtime import in_float32

__all__ = ["ConvBlock3d", "NoduleClassifier", "build_classifier", "load_classifier",
           "save_classifier", "check_classifier_config", "infer_classifier_config",
           "classifier_spec", "default_classifier_spec", "finetune_layers", "init_layer",
           "shares_trunk", "SharedTrunk", "MODEL_KIND"]

log = logging.getLogger(__name__)

MODEL_KIND = "classifier"


def check_classifier_config(config: ClassifierConfig) -> None:
    """ConfigError naming the first setting that cannot build a network."""
    for name, minimum in (("in_channels", 1), ("conv_channels", 1), ("depth", 1)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"classifier.{name} must be an integer >= {minimum}, got {value!r}")
    if len(config.classes) < 2:
        raise ConfigError(f"classifier.classes needs at least two names, got {config.classes}")
    crop = tuple(config.crop_irc)
    step = 2 ** config.depth
    if len(crop) != 3 or any(not isinstance(n, int) or n < step or n % step for n in crop):
        # MaxPool3d floors: another size would silently drop the crop's last voxels.
        raise ConfigError(f"classifier.crop_irc must be 3 multiples of 2**depth = {step}, "
                          f"got {crop}")


def _feature_shape(config: ClassifierConfig) -> tuple[int, int, int, int]:
    """(channels, I, R, C) of the last block's output for the configured crop."""
    step = 2 ** config.depth
    channels = config.conv_channels * 2 ** (config.depth - 1)
    return (channels, *(n // step for n in config.crop_irc))


class ConvBlock3d(nn.Module):
    """(3x3x3 conv -> ReLU) x 2 -> 2x2x2 max-pool; ``conv1`` / ``conv2`` are the book's names."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


class NoduleClassifier(nn.Module):
    """BatchNorm over the input -> ``block1..blockN`` -> flatten -> ``head_linear``.

    ``forward`` returns logits (N, n_classes); :meth:`probabilities` their softmax.  The input
    BatchNorm learns the HU scaling, so crops need only the HU clip of ``spec``
    (:class:`ClassifierSpec`), which travels with the weights in every checkpoint.
    """

    def __init__(self, config: ClassifierConfig | None = None,
                 spec: ClassifierSpec | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ClassifierConfig()
        c = self.config
        check_classifier_config(c)
        self.spec = spec if spec is not None else default_classifier_spec(c)
        if tuple(self.spec.crop_irc) != tuple(c.crop_irc):
            raise ConfigError(f"input spec crop {tuple(self.spec.crop_irc)} differs from "
                              f"classifier.crop_irc {tuple(c.crop_irc)}")
        self.tail_batchnorm = nn.BatchNorm3d(c.in_channels)
        channels = c.in_channels
        for level in range(1, c.depth + 1):
            width = c.conv_channels * 2 ** (level - 1)
            self.add_module(f"block{level}", ConvBlock3d(channels, width))
            channels = width
        self.feature_shape = _feature_shape(c)
        self.head_linear = nn.Linear(math.prod(self.feature_shape), c.n_classes)
        self._init_weights()
        # Channels-last conv weights: oneDNN trains this net 2x faster on a CPU (measured at
        # batch 32); loading a state_dict keeps the layout, and the results are the same.
        self.to(memory_format=torch.channels_last_3d)

    @property
    def blocks(self) -> list[ConvBlock3d]:
        return [getattr(self, f"block{level}") for level in range(1, self.config.depth + 1)]

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                init_layer(module)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads, (N, prod(feature_shape)), of crops as :meth:`forward`'s."""
        if tuple(x.shape[2:]) != tuple(self.config.crop_irc):
            raise ValueError(f"input crops must be {tuple(self.config.crop_irc)}, got "
                             f"{tuple(x.shape[2:])}")
        x = self.tail_batchnorm(x)
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes) of :meth:`features`, in float32 even under autocast."""
        return in_float32(self.head_linear, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes) of crops (N, in_channels, *crop_irc), HU already clipped."""
        return self.head(self.features(x))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes (N, n_classes), in ``config.classes`` order."""
        return torch.softmax(self.forward(x), dim=1)


def shares_trunk(first: nn.Module, second: nn.Module) -> bool:
    """Whether two classifiers compute the same features: every weight and buffer but the
    heads' equal, as in a malignancy model fine-tuned from ``first`` at depth 1."""
    if not (isinstance(first, NoduleClassifier) and isinstance(second, NoduleClassifier)):
        return False
    if first.spec != second.spec:
        return False
    a, b = ({k: v for k, v in m.state_dict().items() if not k.startswith("head_linear.")}
            for m in (first, second))
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class SharedTrunk(nn.Module):
    """Two classifiers of one trunk (:func:`shares_trunk`) as one network: the features
    once, then both heads, their logits side by side (first's classes, then second's)."""

    def __init__(self, first: NoduleClassifier, second: NoduleClassifier) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.spec = first.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.first.features(x)
        return torch.cat([self.first.head(features), self.second.head(features)], dim=1)


def init_layer(module: nn.Conv3d | nn.Linear) -> None:
    """The book's initialisation: Kaiming-normal weights (fan_out, ReLU); the bias drawn as
    the book called ``normal_(bias, -b, b)`` with b = 1/sqrt(fan_out), i.e. mean -b and
    standard deviation b."""
    nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        _, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1 / math.sqrt(fan_out)
        nn.init.normal_(module.bias, -bound, bound)


def default_classifier_spec(config: ClassifierConfig) -> ClassifierSpec:
    """The book's input for this network: HU in [-1000, 1000], the configured crop."""
    return ClassifierSpec(crop_irc=tuple(config.crop_irc))


def build_classifier(config: ClassifierConfig | None = None,
                     spec: ClassifierSpec | None = None) -> NoduleClassifier:
    """A freshly initialised classifier (default: the book's ``LunaModel``)."""
    return NoduleClassifier(config, spec)


def finetune_layers(model: NoduleClassifier, depth: int) -> list[str]:
    """Names of the top-level layers retrained when fine-tuning ``depth`` layers from the
    output (1 = ``head_linear``, 2 = it and the last block, ...): the book's
    ``--finetune-depth``."""
    layers = ["tail_batchnorm", *(f"block{k}" for k in range(1, model.config.depth + 1)),
              "head_linear"]
    if not 1 <= depth <= len(layers) - 1:
        raise ConfigError(f"finetune_depth must be in 1..{len(layers) - 1} for a classifier "
                          f"of depth {model.config.depth}, got {depth}")
    return layers[-depth:]


def infer_classifier_config(state: Mapping[str, torch.Tensor]) -> ClassifierConfig:
    """The :class:`ClassifierConfig` of a ``state`` without stored settings (the book's file).

    Widths, depth and classes come from the weights; the crop from the head's input size,
    which the book's 32 x 48 x 48 matches (any other crop of an unlabelled file is refused).
    """
    if "input_batchnorm.weight" in state or any(key.startswith("unet.") for key in state):
        raise CheckpointError("holds a segmentation U-Net, not a classifier")
    try:
        first = state["block1.conv1.weight"]
        levels = {int(m.group(1)) for key in state if (m := re.match(r"block(\d+)\.", key))}
        head = state["head_linear.weight"]
        config = ClassifierConfig(in_channels=int(first.shape[1]),
                                  conv_channels=int(first.shape[0]), depth=max(levels))
        if head.shape[0] != config.n_classes:
            config.classes = tuple(f"class{k}" for k in range(head.shape[0]))
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"model_state does not look like a lunaseg/book classifier "
                              f"(missing {error})") from None
    flat = math.prod(_feature_shape(config))
    if head.shape[1] != flat:
        raise CheckpointError(f"head takes {head.shape[1]} features; the crop "
                              f"{config.crop_irc} would give {flat}, and the file does not "
                              f"say its crop")
    return config


def classifier_spec(checkpoint: Checkpoint, config: ClassifierConfig) -> ClassifierSpec:
    """The input spec a checkpoint's classifier was trained with (the book's: the default)."""
    if checkpoint.spec is None:
        return default_classifier_spec(config)
    try:
        spec = ClassifierSpec.from_dict(checkpoint.spec)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{checkpoint.path}: bad input_spec: {error}") from None
    if tuple(spec.crop_irc) != tuple(config.crop_irc):
        raise CheckpointError(f"{checkpoint.path}: input_spec crop {spec.crop_irc} does not fit "
                              f"the model's {tuple(config.crop_irc)}")
    return spec


def _classifier_config(checkpoint: Checkpoint) -> ClassifierConfig:
    if checkpoint.model_kind not in (None, MODEL_KIND):
        raise CheckpointError(f"{checkpoint.path}: holds a {checkpoint.model_kind} model, "
                              f"not a classifier")
    if checkpoint.model_config is not None:
        try:
            config = from_dict(ClassifierConfig, checkpoint.model_config)
            check_classifier_config(config)
            return config
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"{checkpoint.path}: bad model_config: {error}") from None
    try:
        return infer_classifier_config(checkpoint.model_state)
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path}: {error}") from None


def load_classifier(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[NoduleClassifier, Checkpoint]:
    """A :class:`NoduleClassifier` with the weights and input spec from ``path`` (lunaseg's or
    the book's file), in eval mode on ``device``, and what the file held."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    config = _classifier_config(checkpoint)
    model = build_classifier(config, classifier_spec(checkpoint, config))
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: weights do not fit the classifier: {detail[:200]}") \
            from None
    model.to(device)
    model.eval()
    log.info("loaded %s classifier %s (epoch %s, sha1 %s)", checkpoint.format, path,
             checkpoint.epoch, checkpoint.sha1)
    return model, checkpoint


def save_classifier(path: str | Path, model: nn.Module, **fields: Any) -> str:
    """Save a classifier with its settings and input spec (``fields``: see
    :func:`lunaseg.checkpoint.save_checkpoint`); returns the file's SHA1."""
    bare = unwrap(model)
    if not isinstance(bare, NoduleClassifier):
        raise TypeError(f"save_classifier needs a NoduleClassifier, got {type(bare).__name__}")
    return save_checkpoint(path, model=bare, model_kind=MODEL_KIND,
                           model_config=to_dict(bare.config), spec=bare.spec.to_dict(),
                           **fields)
