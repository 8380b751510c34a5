"""Running a segmentation model over a whole CT: context stacks, mirrored views, batching.

Every slice is fed with its context slices from the whole volume, as the model's
:class:`SegmentationSpec` says, on the device in batches; the output is a logit per voxel
(the network's score before the sigmoid, which does not saturate: the book's model gives
p = 1.0 in float32 to hundreds of blobs, but their logits differ).  The network runs only
where it can matter, the in-plane box holding the body or, with a lung mask, the box around
the lungs; each box is grown by the model's reach and aligned to its pooling grid in the
full slice's frame, so inside it the output equals what the network gives on whole slices.

A 3-class model (background, benign, malignant) gives two volumes: the logit of p(nodule) =
1 - p(background), which everything downstream (threshold, views, candidates) reads as it
reads a 1-class model's logit, and the logit of p(malignant | nodule); their sigmoids
multiply to the softmax's p(malignant).  Mirrored views combine the nodule logit by the
spec's rule and the malignancy logit by its mean.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

from lunaseg.config import SegmentConfig
from lunaseg.ct import CT
from lunaseg.errors import ConfigError
from lunaseg.inputs import (TTA_RULES, SegmentationSpec, carried_spec, context_indices,
                            resample_pixel_mm, resize_slices)
from lunaseg.losses import malignancy_logit, nodule_logit
from lunaseg.masks import body_box, bounding_box, resolve_lung_mask
from lunaseg.progress import bar as progress_bar
from lunaseg.runtime import autocast, resolve_device, whole_slice_batch

__all__ = ["TTA_FLIPS", "TTA_RULES", "OUTSIDE_LOGIT", "check_tta", "model_logits",
           "head_logits", "combine_views", "network_box", "predict_logits", "predict_classes",
           "predict_views", "predict_ct", "resolve_spec", "sigmoid", "LUNG_REGION_MARGIN_MM"]

log = logging.getLogger(__name__)

# Mirror views for test-time augmentation, as tensor dims to flip (H = -2, W = -1).
TTA_FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((),),
    2: ((), (-1,)),
    4: ((), (-1,), (-2,), (-2, -1)),
}


# The logit given to voxels the network did not look at (sigmoid: 0 in float32).
OUTSIDE_LOGIT = -100.0

# How far beyond the (already grown) lung mask the network still runs: components may
# stretch this far out of it and keep their full extent, and the chest wall around a pleural
# nodule stays in view.
LUNG_REGION_MARGIN_MM = 20.0


def check_tta(tta: int, rule: str = "mean") -> None:
    if tta not in TTA_FLIPS:
        raise ConfigError(f"segment.tta must be one of {', '.join(map(str, TTA_FLIPS))}, "
                          f"got {tta}")
    if rule not in TTA_RULES:
        raise ConfigError(f"segment.tta_rule must be one of {', '.join(TTA_RULES)}, "
                          f"got {rule!r}")


def resolve_spec(model: nn.Module, spec: SegmentationSpec | None) -> SegmentationSpec:
    """``spec``, else the one the model carries (lunaseg's U-Net has it from its checkpoint)."""
    return carried_spec(model, spec, SegmentationSpec)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities of logits, in the logits' float type."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits)))


def model_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's logits: ``model.logits(batch)`` when it has that method (lunaseg's U-Net),
    else its forward output, which is then taken to be logits."""
    logits = getattr(model, "logits", None)
    return logits(batch) if callable(logits) else model(batch)


def head_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) float32 scores of a batch: K = 1, the nodule logit, for a 1-class model;
    K = 2, the nodule logit and the malignancy logit, for a 3-class one."""
    logits = model_logits(model, batch).float()
    if logits.dim() != 4 or logits.shape[1] not in (1, 3):
        raise ValueError(f"model output has shape {tuple(logits.shape)}; expected (N, 1, H, W) "
                         f"or (N, 3, H, W) logits")
    if logits.shape[1] == 1:
        return logits
    return torch.cat([nodule_logit(logits), malignancy_logit(logits)], dim=1)


def _views(model: nn.Module, batch: torch.Tensor, tta: int) -> torch.Tensor:
    """(views, N, K, H, W) float32: :func:`head_logits` over the ``tta`` mirror views of
    ``batch``, each flipped back."""
    return torch.stack([(head_logits(model, batch.flip(dims)).flip(dims) if dims
                         else head_logits(model, batch)) for dims in TTA_FLIPS[tta]])


def combine_views(views, rule: str):
    """One logit per voxel from per-view logits on axis 0 (tensor or array): their lowest
    ("consensus") or their mean ("mean"), in float32."""
    if isinstance(views, torch.Tensor):
        return views.amin(dim=0) if rule == "consensus" else views.mean(dim=0)
    return (np.min(views, axis=0) if rule == "consensus" else
            np.mean(views, axis=0, dtype=np.float32))


def _scaled_slice(part: slice, size: int, new_size: int) -> slice:
    """``part`` of an axis of ``size`` pixels, on the same axis resized to ``new_size``
    (grown to whole pixels)."""
    start, stop, _ = part.indices(size)
    return slice(int(np.floor(start * new_size / size)),
                 min(new_size, int(np.ceil(stop * new_size / size))))


def network_box(box: tuple[int, int, int, int], shape_rc: tuple[int, int],
                spec: SegmentationSpec) -> tuple[int, int, int, int]:
    """The in-plane box (row0, row1, col0, col1) the network must see so that its output in
    ``box`` equals its output on whole slices: grown by ``spec.reach_px`` and started on a
    multiple of ``spec.size_multiple`` (the pooling grid of the whole slice)."""
    out = []
    for (low, high), size in zip(((box[0], box[1]), (box[2], box[3])), shape_rc):
        start = max(low - spec.reach_px, 0) // spec.size_multiple * spec.size_multiple
        out += [start, min(high + spec.reach_px, size)]
    return out[0], out[1], out[2], out[3]


def predict_logits(model: nn.Module, hu: np.ndarray, spec: SegmentationSpec, *,
                   region: tuple[slice, slice, slice] | None = None, crop_to_body: bool = True,
                   tta: int = 1, tta_rule: str = "mean", batch_size: int = 0,
                   device: str | torch.device = "cpu", amp: bool = False,
                   progress: bool = False, spacing_rc: Sequence[float] | None = None
                   ) -> np.ndarray:
    """Logit of "nodule" for every voxel of a (I, R, C) HU volume, float32.

    See :func:`predict_views` for the arguments; the views are combined by ``tta_rule``.
    A 3-class model gives its logit of p(nodule) (:func:`lunaseg.losses.nodule_logit`).
    """
    check_tta(tta, tta_rule)
    return _run(model, hu, spec, region=region, crop_to_body=crop_to_body, tta=tta,
                tta_rule=tta_rule, batch_size=batch_size, device=device, amp=amp,
                progress=progress, spacing_rc=spacing_rc)[0]


def predict_classes(model: nn.Module, hu: np.ndarray, spec: SegmentationSpec, *,
                    region: tuple[slice, slice, slice] | None = None,
                    crop_to_body: bool = True, tta: int = 1, tta_rule: str = "mean",
                    batch_size: int = 0, device: str | torch.device = "cpu",
                    amp: bool = False, progress: bool = False,
                    spacing_rc: Sequence[float] | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """(nodule logits, malignancy logits) of a (I, R, C) volume, float32 each, from one
    pass: the second is the logit of p(malignant | nodule) of a 3-class model (views
    averaged), None for a 1-class one.  Arguments as :func:`predict_logits`."""
    check_tta(tta, tta_rule)
    return _run(model, hu, spec, region=region, crop_to_body=crop_to_body, tta=tta,
                tta_rule=tta_rule, batch_size=batch_size, device=device, amp=amp,
                progress=progress, with_malignancy=True, spacing_rc=spacing_rc)


def predict_views(model: nn.Module, hu: np.ndarray, spec: SegmentationSpec, *,
                  region: tuple[slice, slice, slice] | None = None, crop_to_body: bool = True,
                  tta: int = 4, batch_size: int = 0, device: str | torch.device = "cpu",
                  amp: bool = False, progress: bool = False,
                  spacing_rc: Sequence[float] | None = None) -> np.ndarray:
    """(views, I, R, C) float32 logits of each of ``tta`` mirror views, each flipped back
    (for comparing ways of combining them; :func:`predict_logits` combines as it goes).

    The network runs on the slices and in-plane box of ``region`` (default: every slice,
    and the box holding the body with ``crop_to_body``, see :func:`lunaseg.masks.body_box`)
    and gives :data:`OUTSIDE_LOGIT` elsewhere.  Each slice gets ``spec.context_slices``
    slices on each side from the whole volume (the first or last slice repeats beyond it),
    HU clipped to the spec's window; slices are padded with ``spec.min_hu`` (air) up to the
    spec's size multiple.  ``amp`` turns on bf16 autocast on CUDA; ``batch_size`` 0 picks
    one for the device.  The model is moved to ``device`` (channels_last) and run in eval
    mode (its mode is restored).  A 3-class model's views are of its nodule logit.  With
    the scan's in-plane ``spacing_rc`` (mm) and a spec that carries its training pixels, the
    network sees the slices resampled to those pixels where :func:`resample_pixel_mm` says
    so, and its output comes back on the scan's own grid.
    """
    check_tta(tta)
    return _run(model, hu, spec, region=region, crop_to_body=crop_to_body, tta=tta,
                tta_rule=None, batch_size=batch_size, device=device, amp=amp,
                progress=progress, spacing_rc=spacing_rc)[0]


def _run(model: nn.Module, hu: np.ndarray, spec: SegmentationSpec, *,
         region: tuple[slice, slice, slice] | None, crop_to_body: bool, tta: int,
         tta_rule: str | None, batch_size: int, device: str | torch.device, amp: bool,
         progress: bool, with_malignancy: bool = False,
         spacing_rc: Sequence[float] | None = None
         ) -> tuple[np.ndarray, np.ndarray | None]:
    """The loop of :func:`predict_logits`, :func:`predict_classes` and :func:`predict_views`
    (``tta_rule`` None: keep every view): (nodule logits, malignancy logits or None; the
    latter only ``with_malignancy`` and for a 3-class model)."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (I, R, C) array, got shape {hu.shape}")
    pixel_mm = resample_pixel_mm(spec, spacing_rc)
    if pixel_mm is not None:
        size_rc = tuple(max(1, int(round(n * float(mm) / pixel_mm)))
                        for n, mm in zip(hu.shape[1:], spacing_rc))
        small = resize_slices(hu, size_rc)
        if small.dtype != hu.dtype and hu.dtype.kind in "iu":
            small = np.rint(small).astype(hu.dtype)
        if region is not None:
            region = (region[0], *(_scaled_slice(part, n, m) for part, n, m in
                                   zip(region[1:], hu.shape[1:], size_rc)))
        outputs = _run(model, small, spec, region=region, crop_to_body=crop_to_body, tta=tta,
                       tta_rule=tta_rule, batch_size=batch_size, device=device, amp=amp,
                       progress=progress, with_malignancy=with_malignancy)
        return tuple(None if out is None else resize_slices(out, hu.shape[1:])
                     for out in outputs)  # type: ignore[return-value]
    spec.check()
    device = resolve_device(device)
    batch_size = whole_slice_batch(device, batch_size)
    n_slices, height, width = hu.shape
    if region is None:
        rows = body_box(hu) if crop_to_body else (0, height, 0, width)
        region = (slice(0, n_slices), slice(rows[0], rows[1]), slice(rows[2], rows[3]))
    slices = np.arange(n_slices)[region[0]]
    inner = tuple(int(v) for v in (*region[1].indices(height)[:2],
                                   *region[2].indices(width)[:2]))
    row0, row1, col0, col1 = network_box(inner, (height, width), spec)
    views = 1 if tta_rule is not None else tta
    logits = np.full((views, *hu.shape), OUTSIDE_LOGIT, dtype=np.float32)
    # Where the network does not look, p(malignant | nodule) is left at an even 0.5: the
    # nodule logit there already says "no nodule".
    malignancy = (np.zeros(hu.shape, dtype=np.float32)
                  if with_malignancy and _n_classes(model) == 3 else None)
    if slices.size == 0 or inner[1] <= inner[0] or inner[3] <= inner[2]:
        return (logits[0] if tta_rule is not None else logits), malignancy

    # Clip once.  Integer HU bounds fit int16 exactly, which halves host memory and the
    # upload to a GPU; each batch becomes float32 on the device.
    min_hu, max_hu = spec.min_hu, spec.max_hu
    box = hu[:, row0:row1, col0:col1]
    if hu.dtype.kind in "iu" and float(min_hu).is_integer() and float(max_hu).is_integer() \
            and -32768 <= min_hu and max_hu <= 32767:
        volume = np.clip(box, int(min_hu), int(max_hu)).astype(np.int16)
    else:
        volume = np.clip(box, min_hu, max_hu).astype(np.float32)
    pad_h, pad_w = -volume.shape[1] % spec.size_multiple, -volume.shape[2] % spec.size_multiple
    if pad_h or pad_w:
        volume = np.pad(volume, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=min_hu)
    volume_t = torch.from_numpy(np.ascontiguousarray(volume)).to(device)
    index_t = torch.from_numpy(context_indices(n_slices, slices, spec.context_slices)).to(device)
    # What of the network's output lands in ``logits``: the inner box, in box coordinates.
    keep_r = slice(inner[0] - row0, inner[1] - row0)
    keep_c = slice(inner[2] - col0, inner[3] - col0)
    out_t = torch.empty((views, slices.size, inner[1] - inner[0], inner[3] - inner[2]),
                        dtype=torch.float32, device=device)
    malignancy_t = (torch.empty(out_t.shape[1:], dtype=torch.float32, device=device)
                    if malignancy is not None else None)

    was_training = model.training
    model.to(device)
    model.eval()
    model.to(memory_format=torch.channels_last)  # suits cuDNN and oneDNN alike

    try:
        with torch.inference_mode(), autocast(device, amp):
            bar = progress_bar(total=slices.size, enabled=progress, unit="slice",
                               leave=False, desc="inference")
            for start in range(0, slices.size, batch_size):
                stacks = index_t[start:start + batch_size]
                batch = volume_t.index_select(0, stacks.reshape(-1))
                batch = batch.view(stacks.shape[0], spec.channels, *volume.shape[1:]).float()
                batch = batch.contiguous(memory_format=torch.channels_last)
                output = _views(model, batch, tta)
                if output.ndim != 5 or output.shape[1] != stacks.shape[0] \
                        or output.shape[-2:] != batch.shape[-2:]:
                    raise ValueError(f"model output has shape {tuple(output.shape[1:])}; "
                                     f"expected ({stacks.shape[0]}, 1, {volume.shape[1]}, "
                                     f"{volume.shape[2]})")
                done = slice(start, start + stacks.shape[0])
                if malignancy_t is not None:
                    malignancy_t[done] = output[:, :, 1, keep_r, keep_c].mean(dim=0)
                nodule = output[:, :, 0]
                if tta_rule is not None:
                    nodule = combine_views(nodule, tta_rule)[None]
                out_t[:, done] = nodule[:, :, keep_r, keep_c]
                bar.update(stacks.shape[0])
            bar.close()
    finally:
        model.train(was_training)
    logits[:, slices, inner[0]:inner[1], inner[2]:inner[3]] = out_t.cpu().numpy()
    if malignancy is not None:
        malignancy[slices, inner[0]:inner[1], inner[2]:inner[3]] = malignancy_t.cpu().numpy()
    return (logits[0] if tta_rule is not None else logits), malignancy


def _n_classes(model: nn.Module) -> int:
    """A model's output classes: its config's (lunaseg's U-Net), else 1 (a stand-in that
    gives one logit)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "n_classes", 1))


def lung_region(lung_mask: np.ndarray, spacing_irc: Sequence[float],
                margin_mm: float = LUNG_REGION_MARGIN_MM) -> tuple[slice, ...] | None:
    """The box around a lung mask, grown ``margin_mm`` on every axis; None when it is empty."""
    margin = np.ceil(margin_mm / np.asarray(spacing_irc, dtype=float)).astype(int)
    return bounding_box(lung_mask, margin)


def predict_ct(model: nn.Module, ct: CT, config: SegmentConfig | None = None, *,
               spec: SegmentationSpec | None = None,
               device: str | torch.device | None = None, progress: bool = False,
               lung_mask: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Logits of one CT with ``config``'s views, batch and device (views and their rule: the
    spec's where ``config`` leaves them None).

    ``spec`` None takes the model's own (:func:`resolve_spec`).  With a lung mask
    (``lung_mask``, or computed when ``config.lung_mask``) only candidates touching it are
    kept, so the network runs only on the box around it grown :data:`LUNG_REGION_MARGIN_MM`
    (not on neck, abdomen or chest wall).  Returns (nodule logits, the lung mask or None,
    the malignancy logits of a 3-class model or None).
    """
    config = config or SegmentConfig()
    spec = resolve_spec(model, spec)
    device = resolve_device(config.device if device is None else device)
    spacing_irc = ct.geometry.spacing_xyz[::-1]
    lung_mask = resolve_lung_mask(lung_mask, ct.hu, spacing_irc, config.lung_mask)
    region = None
    if lung_mask is not None:
        region = lung_region(lung_mask, spacing_irc)
        if region is None:
            log.warning("%s: no lung found, so the lung mask keeps no candidate",
                        ct.series_uid)
            malignancy = (np.zeros(ct.hu.shape, dtype=np.float32)
                          if _n_classes(model) == 3 else None)
            return (np.full(ct.hu.shape, OUTSIDE_LOGIT, dtype=np.float32), lung_mask,
                    malignancy)
    tta = spec.tta if config.tta is None else config.tta
    tta_rule = config.tta_rule or spec.tta_rule
    logits, malignancy = predict_classes(model, ct.hu, spec, region=region, tta=tta,
                                         tta_rule=tta_rule, batch_size=config.batch_size,
                                         device=device, amp=config.amp, progress=progress,
                                         spacing_rc=spacing_irc[1:] if config.resample
                                         else None)
    return logits, lung_mask, malignancy
