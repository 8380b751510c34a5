"""Running a candidate classifier over a CT: one crop per candidate, batched forward passes.

Crops are cut as the model's :class:`ClassifierSpec` says (its crop, its HU window) around
each candidate's voxel, padded where the crop leaves the volume (slices repeat, rows and
columns are air), exactly as training cuts them from the prepcache.  A scan's candidates
go through the network together, a batch at a time: no per-candidate forward passes.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lunaseg.cache import pad_crop
from lunaseg.ct import CT
from lunaseg.inputs import ClassifierSpec, carried_spec, resample_pixel_mm, resize_slices
from lunaseg.progress import bar as progress_bar
from lunaseg.runtime import autocast, crop_batch, resolve_device

__all__ = ["candidate_centers_irc", "cut_crops", "cut_scaled_crops", "crops_to_input",
           "classify_crops", "crop_logits", "log_odds", "candidate_crops",
           "candidate_log_odds", "classify_candidates",
           "resolve_classifier_spec", "FILL_HU"]

log = logging.getLogger(__name__)

# What rows and columns beyond the volume hold: air (the cache pads its chunks the same way).
FILL_HU = -1000


def resolve_classifier_spec(model: nn.Module, spec: ClassifierSpec | None) -> ClassifierSpec:
    """``spec``, else the one the model carries (lunaseg's classifier has its checkpoint's)."""
    return carried_spec(model, spec, ClassifierSpec, "classifier input spec")


def candidate_centers_irc(candidates: Sequence[Any] | np.ndarray) -> np.ndarray:
    """(N, 3) int64 voxels of candidates: objects with ``center_irc`` (segmentation
    candidates, continuous) or an (N, 3) array; rounded to the nearest voxel."""
    if isinstance(candidates, np.ndarray) or (len(candidates) and not hasattr(candidates[0],
                                                                            "center_irc")):
        centers = np.asarray(candidates, dtype=np.float64).reshape(-1, 3)
    else:
        centers = np.asarray([c.center_irc for c in candidates], dtype=np.float64).reshape(-1, 3)
    return np.rint(centers).astype(np.int64)


def cut_crops(hu: np.ndarray, centers_irc: np.ndarray, size_irc: Sequence[int],
              fill_hu: int = FILL_HU) -> np.ndarray:
    """(N, *size_irc) crops of a (I, R, C) volume in its dtype, each starting at
    ``center - size // 2`` (the centre voxel sits at ``size // 2``)."""
    size = tuple(int(n) for n in size_irc)
    half = np.asarray(size, dtype=np.int64) // 2
    out = np.empty((len(centers_irc), *size), dtype=hu.dtype)
    for k, center in enumerate(np.asarray(centers_irc, dtype=np.int64).reshape(-1, 3)):
        out[k] = pad_crop(hu, center - half, size, fill_hu)
    return out


def crops_to_input(crops: torch.Tensor, spec: ClassifierSpec) -> torch.Tensor:
    """(N, I, R, C) HU crops (any dtype) -> (N, 1, I, R, C) float32 clipped to the spec."""
    return crops.float().clamp_(spec.min_hu, spec.max_hu).unsqueeze(1)


def classify_crops(model: nn.Module, crops: np.ndarray | torch.Tensor, *,
                   spec: ClassifierSpec | None = None, batch_size: int = 0,
                   device: str | torch.device | None = None, amp: bool = False,
                   progress: bool = False) -> np.ndarray:
    """Class probabilities (N, n_classes) float32 of HU crops (N, *crop_irc).

    The model runs in eval mode on ``device`` (default: where its weights are), in batches
    of ``batch_size`` crops (0: the device's default); its previous mode is restored.
    """
    logits = crop_logits(model, crops, spec=spec, batch_size=batch_size, device=device,
                         amp=amp, progress=progress)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def log_odds(logits: np.ndarray) -> np.ndarray:
    """(N,) float64 log-odds of the last class against the others, from (N, n_classes)
    logits: unlike a float32 softmax, it keeps confident answers apart."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    others = logits[:, :-1]
    top = others.max(axis=1)
    return logits[:, -1] - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def crop_logits(model: nn.Module, crops: np.ndarray | torch.Tensor, *,
                spec: ClassifierSpec | None = None, batch_size: int = 0,
                device: str | torch.device | None = None, amp: bool = False,
                progress: bool = False) -> np.ndarray:
    """Class logits (N, n_classes) float32 of HU crops; arguments as :func:`classify_crops`."""
    spec = resolve_classifier_spec(model, spec)
    if tuple(crops.shape[1:]) != tuple(spec.crop_irc):
        raise ValueError(f"crops must be (N, {', '.join(map(str, spec.crop_irc))}), got "
                         f"{tuple(crops.shape)}")
    if device is None:
        device = next(model.parameters()).device
    device = resolve_device(device)
    step = crop_batch(device, batch_size)
    crops_t = torch.as_tensor(crops)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.inference_mode():
            for start in progress_bar(range(0, len(crops_t), step), enabled=progress,
                                      desc="classify", unit="batch", leave=False):
                batch = crops_to_input(crops_t[start:start + step].to(device), spec)
                with autocast(device, amp):
                    logits = model(batch)
                outputs.append(logits.float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        n_classes = getattr(getattr(model, "config", None), "n_classes", 2)
        return np.zeros((0, n_classes), dtype=np.float32)
    return torch.cat(outputs).numpy()


def candidate_crops(ct: CT, candidates: Sequence[Any], spec: ClassifierSpec,
                    resample: bool = True) -> np.ndarray:
    """(N, *crop_irc) crops for candidates found on ``ct``, as a model of ``spec`` sees them.

    They are cut from the scan in the spec's voxel order (the canonical one every cache
    entry has), whatever order ``ct`` is stored in: each candidate's patient position
    finds its voxel there; with ``resample`` they cover the millimetres of the model's
    training (:func:`cut_scaled_crops`), else the spec's voxels at the scan's own pixels.
    """
    if len(candidates) == 0:
        return np.zeros((0, *spec.crop_irc), dtype=np.float32)
    canonical, _ = ct.canonical()
    centers = np.asarray([canonical.xyz_to_irc_float(np.asarray(c.center_xyz))
                          for c in candidates])
    return cut_scaled_crops(canonical.hu, np.rint(centers).astype(np.int64), spec,
                            canonical.geometry.spacing_xyz[1::-1] if resample else None)


def candidate_log_odds(model: nn.Module, ct: CT, candidates: Sequence[Any], *,
                       spec: ClassifierSpec | None = None, batch_size: int = 0,
                       device: str | torch.device | None = None, amp: bool = False,
                       resample: bool = True, crops: np.ndarray | None = None) -> np.ndarray:
    """(N,) float64 log-odds of the model's last class for candidates found on ``ct``.

    ``crops``: the candidates' :func:`candidate_crops` for this model's spec, when another
    model of the same spec has them already (a malignancy model beside its classifier);
    else they are cut here.
    """
    spec = resolve_classifier_spec(model, spec)
    if len(candidates) == 0:
        return np.zeros(0, dtype=np.float64)
    if crops is None:
        crops = candidate_crops(ct, candidates, spec, resample)
    return log_odds(crop_logits(model, crops, spec=spec, batch_size=batch_size,
                                device=device, amp=amp))


def cut_scaled_crops(hu: np.ndarray, centers_irc: np.ndarray, spec: ClassifierSpec,
                     spacing_rc: Sequence[float] | None) -> np.ndarray:
    """The spec's crops around ``centers_irc``, covering the millimetres they covered in
    training: on a scan whose pixels differ from the spec's ``pixel_mm`` (beyond the
    tolerance of :func:`lunaseg.inputs.resample_pixel_mm`) they are cut wider or narrower
    and resized to the spec's size."""
    pixel_mm = resample_pixel_mm(spec, spacing_rc)
    if pixel_mm is None:
        return cut_crops(hu, centers_irc, spec.crop_irc)
    size = (spec.crop_irc[0], *(max(1, int(round(n * pixel_mm / float(mm))))
                                for n, mm in zip(spec.crop_irc[1:], spacing_rc)))
    return resize_slices(cut_crops(hu, centers_irc, size), spec.crop_irc[1:])


def classify_candidates(model: nn.Module, ct: CT, candidates: Sequence[Any] | np.ndarray, *,
                        spec: ClassifierSpec | None = None, batch_size: int = 0,
                        device: str | torch.device | None = None, amp: bool = False,
                        progress: bool = False) -> np.ndarray:
    """(N,) float32 probability of the model's last class (``nodule``, or ``malignant`` for
    a malignancy model) for each candidate of one CT.

    ``candidates``: :class:`lunaseg.candidates.Candidate` objects (or anything with a
    ``center_irc``) or an (N, 3) array of (index, row, col) voxels of ``ct``.  The crops are
    cut from ``ct.hu`` in its array order (:func:`cut_scaled_crops`); other arguments:
    :func:`classify_crops`.
    """
    spec = resolve_classifier_spec(model, spec)
    centers = candidate_centers_irc(candidates)
    crops = cut_scaled_crops(ct.hu, centers, spec, ct.geometry.spacing_xyz[1::-1])
    return classify_crops(model, crops, spec=spec, batch_size=batch_size, device=device,
                          amp=amp, progress=progress)[:, -1].copy()
