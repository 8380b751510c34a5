"""Running a segmentation model over a whole CT: context stacks, mirrored views, batching.

Every slice is fed with its context slices, as the model's :class:`SegmentationSpec` says,
on the device in batches; the output is a probability per voxel.  The network runs only
where it can matter: the in-plane box holding the body (a third to a half of a 512 x 512
slice is air outside it) or, with a lung mask, the box around the lungs.
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
from lunaseg.inputs import SegmentationSpec, context_indices
from lunaseg.masks import body_box, bounding_box, resolve_lung_mask
from lunaseg.runtime import autocast, resolve_device, whole_slice_batch

__all__ = ["TTA_FLIPS", "check_tta", "predict_volume", "predict_ct", "resolve_spec",
           "LUNG_REGION_MARGIN_MM"]

log = logging.getLogger(__name__)

# Mirror views for test-time augmentation, as tensor dims to flip (H = -2, W = -1).
TTA_FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((),),
    2: ((), (-1,)),
    4: ((), (-1,), (-2,), (-2, -1)),
}

# How far beyond the (already grown) lung mask the network still runs: components may
# stretch this far out of it and keep their full extent, and the chest wall around a pleural
# nodule stays in view.
LUNG_REGION_MARGIN_MM = 20.0


def check_tta(tta: int) -> None:
    if tta not in TTA_FLIPS:
        raise ConfigError(f"segment.tta must be one of {', '.join(map(str, TTA_FLIPS))}, "
                          f"got {tta}")


def resolve_spec(model: nn.Module, spec: SegmentationSpec | None) -> SegmentationSpec:
    """``spec``, else the one the model carries (lunaseg's U-Net has it from its checkpoint)."""
    if spec is not None:
        return spec
    carried = getattr(model, "spec", None)
    if not isinstance(carried, SegmentationSpec):
        raise ConfigError(f"{type(model).__name__} carries no input spec; pass spec=")
    return carried


def _forward_views(model: nn.Module, batch: torch.Tensor, tta: int) -> torch.Tensor:
    """The model's output averaged over the ``tta`` mirror views of ``batch``."""
    if tta == 1:
        return model(batch)
    total = None
    for dims in TTA_FLIPS[tta]:
        output = (model(batch.flip(dims)).flip(dims) if dims else model(batch)).float()
        total = output if total is None else total + output  # summed in float32, not bf16
    return total / tta


def predict_volume(model: nn.Module, hu: np.ndarray, spec: SegmentationSpec, *,
                   batch_size: int = 0, device: str | torch.device = "cpu",
                   amp: bool = False, progress: bool = False, crop_to_body: bool = True,
                   tta: int = 1) -> np.ndarray:
    """Probability of "nodule" for every voxel of a (I, R, C) HU volume.

    ``crop_to_body`` runs the model only on the in-plane box that holds the body (see
    :func:`lunaseg.masks.body_box`) and reports probability 0 outside.  Other arguments:
    :func:`_predict`.
    """
    if not crop_to_body or np.asarray(hu).ndim != 3:
        return _predict(model, hu, spec, batch_size=batch_size, device=device, amp=amp,
                        progress=progress, tta=tta)
    row0, row1, col0, col1 = body_box(hu)
    prob = np.zeros(hu.shape, dtype=np.float32)
    prob[:, row0:row1, col0:col1] = _predict(
        model, hu[:, row0:row1, col0:col1], spec, batch_size=batch_size, device=device,
        amp=amp, progress=progress, tta=tta)
    return prob


def _predict(model: nn.Module, hu: np.ndarray, spec: SegmentationSpec, *, batch_size: int,
             device: str | torch.device, amp: bool, progress: bool,
             tta: int = 1) -> np.ndarray:
    """Probability of "nodule" for every voxel of a (I, R, C) HU volume.

    Every slice is fed with ``spec.context_slices`` slices on each side, HU clipped to the
    spec's window.  Any in-plane size works: the slices are padded with ``spec.min_hu``
    (air) up to the spec's size multiple and the output is cropped back.  ``amp`` turns on
    bf16 autocast on CUDA (ignored on CPU); ``batch_size`` 0 picks one for the device;
    ``tta`` averages 1, 2 or 4 mirror views (:data:`TTA_FLIPS`).  The model is moved to
    ``device`` (channels_last) and run in eval mode (its previous mode is restored).
    Returns (I, R, C) float32 in [0, 1].
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (I, R, C) array, got shape {hu.shape}")
    check_tta(tta)
    spec.check()
    device = resolve_device(device)
    batch_size = whole_slice_batch(device, batch_size)
    min_hu, max_hu = spec.min_hu, spec.max_hu
    channels = spec.channels
    n_slices, height, width = hu.shape
    multiple = spec.size_multiple
    pad_h, pad_w = (-height) % multiple, (-width) % multiple

    # Clip once for the whole volume.  Integer HU bounds fit int16 exactly, which halves
    # host memory and the upload to a GPU; each batch becomes float32 on the device.
    if hu.dtype.kind in "iu" and float(min_hu).is_integer() and float(max_hu).is_integer() \
            and -32768 <= min_hu and max_hu <= 32767:
        volume = np.clip(hu, int(min_hu), int(max_hu)).astype(np.int16, copy=False)
    else:
        volume = np.clip(hu, min_hu, max_hu).astype(np.float32, copy=False)
    if pad_h or pad_w:
        volume = np.pad(volume, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=min_hu)
    volume_t = torch.from_numpy(np.ascontiguousarray(volume)).to(device)
    index_t = torch.from_numpy(context_indices(n_slices, np.arange(n_slices),
                                               spec.context_slices)).to(device)

    prob = np.empty(hu.shape, dtype=np.float32)
    # On CPU the model writes straight into the result; on a GPU the result stays there
    # until the end (one transfer, no per-batch synchronisation).
    prob_t = torch.from_numpy(prob) if device.type == "cpu" else \
        torch.empty(hu.shape, dtype=torch.float32, device=device)

    was_training = model.training
    model.to(device)
    model.eval()
    # channels_last suits cuDNN and oneDNN alike.
    model.to(memory_format=torch.channels_last)
    from tqdm import tqdm

    try:
        with torch.inference_mode(), autocast(device, amp):
            bar = tqdm(total=n_slices, unit="slice", disable=not progress, leave=False,
                       desc="inference")
            for start in range(0, n_slices, batch_size):
                rows = index_t[start:start + batch_size]
                batch = volume_t.index_select(0, rows.reshape(-1))
                batch = batch.view(rows.shape[0], channels, height + pad_h, width + pad_w)
                batch = batch.float()
                batch = batch.contiguous(memory_format=torch.channels_last)
                output = _forward_views(model, batch, tta)
                if output.ndim != 4 or output.shape[0] != rows.shape[0] \
                        or output.shape[-2:] != batch.shape[-2:]:
                    raise ValueError(f"model output has shape {tuple(output.shape)}; expected "
                                     f"({rows.shape[0]}, 1, {height + pad_h}, {width + pad_w})")
                prob_t[start:start + rows.shape[0]] = output[:, 0, :height, :width].float()
                bar.update(rows.shape[0])
            bar.close()
    finally:
        model.train(was_training)
    if device.type != "cpu":
        prob = prob_t.cpu().numpy()
    return prob


def lung_region(lung_mask: np.ndarray, spacing_irc: Sequence[float],
                margin_mm: float = LUNG_REGION_MARGIN_MM) -> tuple[slice, ...] | None:
    """The box around a lung mask, grown ``margin_mm`` on every axis; None when it is empty."""
    margin = np.ceil(margin_mm / np.asarray(spacing_irc, dtype=float)).astype(int)
    return bounding_box(lung_mask, margin)


def predict_ct(model: nn.Module, ct: CT, config: SegmentConfig | None = None, *,
               spec: SegmentationSpec | None = None,
               device: str | torch.device | None = None, progress: bool = False,
               lung_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probability volume of one CT with ``config``'s views, batch and device.

    ``spec`` None takes the model's own (:func:`resolve_spec`).  With a lung mask
    (``lung_mask``, or computed when ``config.lung_mask``) only candidates touching it are
    kept, so the network runs only on the box around it grown :data:`LUNG_REGION_MARGIN_MM`
    (not on neck, abdomen or chest wall) and the probability is 0 elsewhere.  Returns
    (probability, the lung mask or None).
    """
    config = config or SegmentConfig()
    spec = resolve_spec(model, spec)
    device = resolve_device(config.device if device is None else device)
    spacing_irc = ct.geometry.spacing_xyz[::-1]
    lung_mask = resolve_lung_mask(lung_mask, ct.hu, spacing_irc, config.lung_mask)
    region = lung_region(lung_mask, spacing_irc) if lung_mask is not None else None
    if lung_mask is not None and region is None:
        log.warning("%s: no lung found, so the lung mask keeps no candidate", ct.series_uid)
    box = region if region is not None else (slice(None),) * 3
    prob = np.zeros(ct.hu.shape, dtype=np.float32)
    prob[box] = predict_volume(model, ct.hu[box], spec, batch_size=config.batch_size,
                               device=device, amp=config.amp, progress=progress,
                               tta=config.tta)
    return prob, lung_mask
