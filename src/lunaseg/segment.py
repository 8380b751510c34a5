"""``lunaseg segment``: one CT, or many, to probabilities, candidates and the files a person
or a scorer reads (volumes with the input's geometry, candidate tables, views, an HTML
report per scan, a LUNA16 submission).

A 3-class model's outputs add its classes: each candidate's p(nodule) and p(malignant |
nodule) in the ``p_nodule`` and ``p_malignant`` columns of candidates.csv, candidates.json
and the report (the columns ``lunaseg detect`` fills with the classifier's verdicts, which
replace the U-Net's), a p(malignant) volume, and a mask whose candidate voxels carry their
class (1 benign, 2 malignant: the likelier of the two at that voxel)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lunaseg import layout
from lunaseg.candidates import (NODULE_THRESHOLD, Candidate, check_extraction,
                                label_candidates)
from lunaseg.config import SegmentConfig, to_dict
from lunaseg.ct import CT, write_image
from lunaseg.errors import ConfigError, DataError
from lunaseg.geometry import Reorientation
from lunaseg.evaluate import Finding, load_findings
from lunaseg.files import write_csv, write_text_atomic
from lunaseg.inputs import SegmentationSpec
from lunaseg.luna import annotation_file
from lunaseg.predict import check_tta, predict_ct, resolve_spec, sigmoid
from lunaseg.progress import bar as progress_bar
from lunaseg.report import candidate_png, html_report
from lunaseg.runtime import resolve_device
from lunaseg.scans import ScanSource, find_scans

__all__ = ["SegmentResult", "ScanOutput", "segment_ct", "segment_inputs", "check_segment_config",
           "SUBMISSION_COLUMNS", "CANDIDATE_CSV_COLUMNS", "REPORT_MAX_ROWS"]

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
CANDIDATE_CSV_COLUMNS = (
    "rank", "seriesuid", "coordX", "coordY", "coordZ", "probability", "max_logit",
    "mean_logit", "max_probability", "mean_probability", "diameter_mm", "volume_mm3",
    "voxels", "index", "row", "col", "first_slice", "last_slice", "mean_hu", "uneroded",
    # The verdicts on each candidate (empty where no model gave one): a 3-class U-Net's, or
    # the classifier's in lunaseg detect; appended, so earlier columns keep their places.
    "p_nodule", "p_malignant",
)
# The HTML report's table stops here: a model that marks most of the lung (untrained, or
# given a kind of scan it never saw) would otherwise make a page of hundreds of megabytes.
REPORT_MAX_ROWS = 1000


def check_segment_config(config: SegmentConfig) -> None:
    """ConfigError naming the first segment setting that cannot work."""
    check_extraction(config)
    if config.max_candidates < 1:
        raise ConfigError(f"segment.max_candidates must be >= 1, got {config.max_candidates}")
    if config.batch_size < 0:
        raise ConfigError(f"segment.batch_size must be >= 0 (0 = auto), got "
                          f"{config.batch_size}")
    if config.overlays < 0:
        raise ConfigError(f"segment.overlays must be >= 0, got {config.overlays}")
    check_tta(1 if config.tta is None else config.tta, config.tta_rule or "mean")


@dataclass(eq=False)
class SegmentResult:
    """Output of :func:`segment_ct` for one scan."""

    logits: np.ndarray  # (I, R, C) float32 network scores (see lunaseg.predict)
    labels: np.ndarray  # (I, R, C) int32: 0 background, k + 1 = candidates[k]
    candidates: list[Candidate]
    seconds: float  # inference + candidate extraction
    spec: SegmentationSpec  # what the model was given
    settings: SegmentConfig  # with the model's choices filled in for its None fields
    device: str = "cpu"
    classify_seconds: float = 0.0  # the second stage's share of ``seconds`` (lunaseg.detect)
    # (I, R, C) float32 logits of p(malignant | nodule) of a 3-class model, else None
    malignancy_logits: np.ndarray | None = None

    @property
    def prob(self) -> np.ndarray:
        """(I, R, C) float32 probabilities of "nodule"."""
        return sigmoid(self.logits).astype(np.float32, copy=False)

    @property
    def malignant_prob(self) -> np.ndarray | None:
        """(I, R, C) float32 p(malignant) of a 3-class model (None for a 1-class one)."""
        if self.malignancy_logits is None:
            return None
        return (sigmoid(self.logits) * sigmoid(self.malignancy_logits)).astype(np.float32,
                                                                               copy=False)

    @property
    def mask(self) -> np.ndarray:
        """(I, R, C) uint8: 1 on every candidate's voxels; for a 3-class model each voxel's
        class instead (1 benign, 2 malignant)."""
        mask = (self.labels > 0).astype(np.uint8)
        if self.malignancy_logits is not None:
            mask += (mask > 0) & (self.malignancy_logits > 0)
        return mask


def resolved_config(config: SegmentConfig, spec: SegmentationSpec) -> SegmentConfig:
    """``config`` with its None fields (the model's choice) taken from ``spec``."""
    return replace(config, tta=spec.tta if config.tta is None else config.tta,
                   tta_rule=config.tta_rule or spec.tta_rule,
                   grouping=config.grouping or spec.grouping)


def segment_ct(model: nn.Module, ct: CT, config: SegmentConfig | None = None, *,
               spec: SegmentationSpec | None = None,
               device: str | torch.device | None = None, progress: bool = False,
               lung_mask: np.ndarray | None = None) -> SegmentResult:
    """Probabilities, candidate label map and candidates for one CT.

    ``spec`` None uses the model's own input spec (lunaseg's U-Net carries the one of its
    checkpoint); ``device`` None uses ``config.device`` ("auto": CUDA when available).
    """
    config = config or SegmentConfig()
    check_segment_config(config)
    spec = resolve_spec(model, spec)
    config = resolved_config(config, spec)
    device = resolve_device(config.device if device is None else device)
    start = time.perf_counter()
    # The network sees every scan in one voxel order, however it is stored; what comes out
    # is mapped back onto the input's own grid.
    canonical, reorientation = ct.canonical()
    if lung_mask is not None:
        lung_mask = reorientation.to_canonical(np.asarray(lung_mask, dtype=bool))
    logits, lung_mask, malignancy = predict_ct(model, canonical, config, spec=spec,
                                               device=device, progress=progress,
                                               lung_mask=lung_mask)
    candidates, labels = label_candidates(logits, canonical.hu, canonical.geometry, config,
                                          lung_mask=lung_mask, series_uid=ct.series_uid,
                                          malignancy_logits=malignancy)
    if not reorientation.is_identity:
        logits, labels = reorientation.from_canonical(logits), reorientation.from_canonical(labels)
        if malignancy is not None:
            malignancy = reorientation.from_canonical(malignancy)
        candidates = [_in_input_grid(c, reorientation) for c in candidates]
    return SegmentResult(logits, labels, candidates, time.perf_counter() - start, spec,
                         config, device=str(device), malignancy_logits=malignancy)


def _in_input_grid(candidate: Candidate, reorientation: Reorientation) -> Candidate:
    """A candidate found on the canonical grid, with its voxel coordinates on the input's."""
    center = reorientation.irc_from_canonical(np.asarray(candidate.center_irc))
    corners = reorientation.irc_from_canonical(np.asarray([candidate.bbox_irc[:3],
                                                           candidate.bbox_irc[3:]]))
    low, high = corners.min(axis=0).astype(int), corners.max(axis=0).astype(int)
    return replace(candidate, center_irc=tuple(float(v) for v in center),
                   bbox_irc=tuple(int(v) for v in (*low, *high)),
                   slice_span=(int(low[0]), int(high[0])))




@dataclass(frozen=True)
class ScanOutput:
    """What :func:`segment_inputs` wrote for one scan."""

    series_uid: str
    source: Path
    folder: Path
    candidates: int
    seconds: float  # reading + inference + candidates + writing
    nodules: int | None = None  # candidates with p(nodule) >= NODULE_THRESHOLD (detect only)
    top: Candidate | None = None  # the best candidate


def _folder_annotations(inputs: Sequence[str | os.PathLike]
                        ) -> dict[str, list[Finding]] | None:
    """The nodules of the annotations CSVs in the input folders (LUNA16 roots), if any."""
    found: dict[str, list[Finding]] | None = None
    for item in inputs:
        path = annotation_file(item) if Path(item).is_dir() else None
        if path is not None:
            found = {**(found or {}), **load_findings(path)}
    return found


def _claim_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier run, or (``overwrite``) remove that run's files:
    its submission, settings and the series folders it wrote (each has candidates.json)."""
    earlier = [out_dir / name for name in (layout.SUBMISSION_FILE, layout.SEGMENT_CONFIG_FILE)
               if (out_dir / name).exists()]
    if not earlier:
        return
    if not overwrite:
        raise DataError(f"{out_dir}: holds an earlier segment run ({earlier[0].name}); choose "
                        f"another --out, or pass --overwrite to replace it")
    for folder in out_dir.iterdir():
        if folder.is_dir() and (folder / layout.CANDIDATES_JSON).is_file():
            shutil.rmtree(folder)
    for path in earlier:
        path.unlink()


def _safe_name(uid: str) -> str:
    """A folder name for a series UID (UIDs are digits and dots; file stems may not be)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uid).strip(".")
    return cleaned or "scan"


def _score(value: float) -> str:
    """A score as the shortest text that reads back as the same float64 (up to 17 digits):
    the ranking survives the CSV."""
    return repr(float(value))


def _candidate_row(candidate: Candidate) -> list:
    x, y, z = candidate.center_xyz
    i, r, c = candidate.center_irc
    return [candidate.rank, candidate.series_uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}",
            _score(candidate.probability), f"{candidate.max_logit:.4f}",
            f"{candidate.mean_logit:.4f}", f"{candidate.max_probability:.6f}",
            f"{candidate.mean_probability:.6f}",
            f"{candidate.diameter_mm:.3f}", f"{candidate.volume_mm3:.3f}", candidate.voxels,
            f"{i:.3f}", f"{r:.3f}", f"{c:.3f}", candidate.slice_span[0],
            candidate.slice_span[1], f"{candidate.mean_hu:.1f}", int(candidate.uneroded),
            _optional(candidate.p_nodule), _optional(candidate.p_malignant)]


def _optional(p: float | None) -> str:
    return "" if p is None else f"{p:.6f}"


def _verdict_columns(candidates: Sequence[Candidate]) -> list[str]:
    """The report's columns of verdicts the candidates carry: p_nodule, then p_malignant
    when a malignancy model (or a 3-class U-Net) gave one."""
    if not candidates or candidates[0].p_nodule is None:
        return []
    return ["p_nodule"] + (["p_malignant"] if candidates[0].p_malignant is not None else [])


def _write_scan(ct: CT, source: ScanSource, result: SegmentResult, folder: Path,
                config: SegmentConfig, settings: dict[str, Any],
                nodules: Sequence[Finding] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if config.write_volumes:
        write_image(result.prob.astype(np.float32, copy=False), ct.geometry,
                    folder / layout.PROBABILITY_FILE, compress=True)
        write_image(result.mask, ct.geometry, folder / layout.MASK_FILE, compress=True)
        malignant = result.malignant_prob
        if malignant is not None:
            write_image(malignant, ct.geometry, folder / layout.MALIGNANT_FILE, compress=True)
    write_csv(folder / layout.CANDIDATES_CSV, CANDIDATE_CSV_COLUMNS,
              (_candidate_row(c) for c in result.candidates))
    scan_info = {
        "series_uid": ct.series_uid,
        "source": str(source.path),
        "shape_irc": list(ct.shape_irc),
        **ct.geometry.to_dict(),
        "hu_range": [int(ct.hu.min()), int(ct.hu.max())] if ct.hu.size else [],
        "seconds": round(result.seconds, 3),
        "device": result.device,
        "candidates": len(result.candidates),
    }
    judged = bool(result.candidates) and result.candidates[0].judged
    if judged:
        scan_info["classifier_seconds"] = round(result.classify_seconds, 3)
        scan_info[f"p_nodule >= {NODULE_THRESHOLD}"] = sum(
            c.p_nodule >= NODULE_THRESHOLD for c in result.candidates)
    document = {**scan_info, "settings": settings,
                "candidates": [c.to_dict() for c in result.candidates]}
    write_text_atomic(json.dumps(document, indent=1) + "\n", folder / layout.CANDIDATES_JSON)

    # Overlays for the best ``config.overlays`` candidates; stale ones from a previous run
    # with more candidates are removed so the folder matches candidates.csv.
    png_folder = folder / layout.CANDIDATE_VIEWS_DIR
    shown = result.candidates[: config.overlays]
    wanted = {f"cand_{c.rank:03d}.png" for c in shown}
    if png_folder.is_dir():
        for old in png_folder.glob("cand_*.png"):
            if old.name not in wanted:
                old.unlink()
    spacing_irc = ct.geometry.spacing_xyz[::-1]
    thumbnails = []
    for candidate in shown:
        verdict = "" if candidate.p_nodule is None else f"p(nodule)={candidate.p_nodule:.3f}  "
        if candidate.p_malignant is not None:
            verdict += f"p(malignant)={candidate.p_malignant:.3f}  "
        # A judged candidate's p is the classifier's, which its p(nodule) already says.
        score = "" if candidate.judged else f"p={candidate.probability:.3f}  "
        title = (f"#{candidate.rank}  {score}{verdict}"
                 f"d={candidate.diameter_mm:.1f} mm  xyz=({candidate.center_xyz[0]:.1f}, "
                 f"{candidate.center_xyz[1]:.1f}, {candidate.center_xyz[2]:.1f})")
        thumbnails.append(candidate_png(ct.hu, result.labels, candidate.rank + 1,
                                        candidate.center_irc,
                                        png_folder / f"cand_{candidate.rank:03d}.png",
                                        spacing_irc=spacing_irc, title=title))
    columns = ["rank", "probability", "diameter_mm", "voxels", "center_xyz", "center_irc",
               "slice_span", "mean_hu"]
    verdicts = _verdict_columns(result.candidates)
    if judged:
        columns[1:2] = verdicts + ["segmentation_score"]
    elif verdicts:
        # A 3-class U-Net's two questions beside its score: is it a nodule, is it malignant.
        columns[2:2] = verdicts
    if nodules is not None:
        columns.insert(2, "annotated_nodule")
    rows = []
    for candidate in result.candidates[:REPORT_MAX_ROWS]:
        row = candidate.to_dict()
        row["segmentation_score"] = candidate.score
        row["center_xyz"] = [round(v, 1) for v in candidate.center_xyz]
        row["center_irc"] = [round(v, 1) for v in candidate.center_irc]
        if nodules is not None:
            row["annotated_nodule"] = _hit_text(candidate, nodules)
        rows.append(row)
    notes = []
    if len(result.candidates) > len(rows):
        notes.append(f"The table lists the first {len(rows):,} of {len(result.candidates):,} "
                     "candidates; candidates.csv holds them all.")
    if len(result.candidates) > len(shown):
        notes.append(f"Views are shown for the first {len(shown)} (--overlays).")
    if nodules is not None:
        notes.append(f"{len(nodules)} annotated nodule(s) in this scan; a candidate hits one "
                     f"when its centre lies within the nodule's radius (LUNA16's rule).")
    kept = min(len(result.candidates), config.max_candidates)
    heading = (f"Candidates: {len(result.candidates):,}, best first (the submission keeps the "
               f"first {kept})")
    html_report(folder / layout.REPORT_FILE, title=f"lunaseg candidates: {ct.series_uid}",
                scan_info=scan_info, settings=settings, candidates=rows, columns=columns,
                thumbnails=thumbnails, note=" ".join(notes), heading=heading)


def _hit_text(candidate: Candidate, nodules: Sequence[Finding]) -> str:
    """Which annotated nodule a candidate hits, in words ("" when none)."""
    center = np.asarray(candidate.center_xyz)
    for nodule in nodules:
        distance = float(np.linalg.norm(center - nodule.center_xyz))
        if distance < nodule.diameter_mm / 2:
            return f"yes: {nodule.diameter_mm:.1f} mm, {distance:.1f} mm away"
    return ""


def segment_inputs(inputs: Sequence[str | os.PathLike], model: nn.Module | str | os.PathLike,
                   out_dir: str | os.PathLike, config: SegmentConfig | None = None, *,
                   spec: SegmentationSpec | None = None,
                   series_uids: Iterable[str] | None = None,
                   device: str | torch.device | None = None, require_ct: bool = True,
                   overwrite: bool = False,
                   annotations: Mapping[str, Sequence[Finding]] | None = None,
                   progress: bool = True,
                   stage_two: Callable[[CT, SegmentResult], SegmentResult] | None = None,
                   stage_two_models: Mapping[str, str | None] | None = None
                   ) -> list[ScanOutput]:
    """Segment every scan in ``inputs`` and write the results under ``out_dir``.

    ``inputs``: image files, DICOM series folders or LUNA16 roots (see :func:`find_scans`).
    ``model``: a checkpoint path (read with ``lunaseg.model.load_model``) or a module.
    Per scan ``out_dir/<uid>/`` gets probability.nii.gz (float32) and mask.nii.gz (uint8)
    with the scan's geometry, candidates.csv, candidates.json, candidates/cand_NNN.png and
    report.html; ``out_dir/submission.csv`` holds the LUNA16 marks (at most
    ``config.max_candidates`` per scan), rewritten after every scan so an interrupted run
    keeps what it finished.  A scan that cannot be read is skipped with a warning (all
    unreadable: DataError).  An ``out_dir`` holding an earlier run is refused unless
    ``overwrite``, which first removes what that run wrote (and nothing else).
    ``require_ct`` refuses inputs that are not CT (see :func:`lunaseg.ct.load_ct`).  With
    ``annotations`` (nodules per series; default: the annotations CSV of an input folder
    that has one) each report says which candidates hit an annotated nodule.
    ``stage_two`` (see :func:`lunaseg.detect.detect_inputs`) re-judges each scan's result
    before it is written; ``stage_two_models`` names its models in the settings.
    """
    config = config or SegmentConfig()
    check_segment_config(config)
    device = resolve_device(config.device if device is None else device)
    out_dir = Path(out_dir)
    _claim_output(out_dir, overwrite)
    sources = find_scans(inputs, series_uids)
    if not sources:
        raise DataError("no scans to segment in " + ", ".join(str(p) for p in inputs))
    if annotations is None:
        annotations = _folder_annotations(inputs)
    model_path = None
    if not isinstance(model, nn.Module):
        from lunaseg.model import load_model

        model_path = Path(model)
        model, _checkpoint = load_model(model_path, device=device)
    spec = resolve_spec(model, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**to_dict(resolved_config(config, spec)),
                "model": str(model_path) if model_path else type(model).__name__,
                "device": str(device), "input_spec": spec.to_dict(),
                **(stage_two_models or {})}
    write_text_atomic(json.dumps(settings, indent=2) + "\n", out_dir / layout.SEGMENT_CONFIG_FILE)
    log.info("segmenting %d scan(s) on %s into %s", len(sources), device, out_dir)

    submission: list[list] = []
    skipped: list[str] = []
    outputs: list[ScanOutput] = []
    for source in progress_bar(sources, enabled=progress, unit="scan", desc="segment"):
        start = time.perf_counter()
        try:
            ct = source.load(require_ct=require_ct)
        except DataError as error:
            # One unreadable scan must not end a run over hundreds; it is counted and named.
            log.warning("skipped: %s", error)
            skipped.append(source.uid)
            continue
        result = segment_ct(model, ct, config, spec=spec, device=device, progress=progress)
        if stage_two is not None:
            result = stage_two(ct, result)
        folder = out_dir / _safe_name(ct.series_uid)
        nodules = None if annotations is None else annotations.get(ct.series_uid, [])
        _write_scan(ct, source, result, folder, config, settings, nodules)
        for candidate in result.candidates[: config.max_candidates]:
            x, y, z = candidate.center_xyz
            submission.append([ct.series_uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}",
                               _score(candidate.probability)])
        write_csv(out_dir / layout.SUBMISSION_FILE, SUBMISSION_COLUMNS, submission)
        seconds = time.perf_counter() - start
        if stage_two is None:
            log.info("%s: %d candidates, %.1f s (inference + candidates %.1f s)",
                     ct.series_uid, len(result.candidates), seconds, result.seconds)
        else:
            log.info("%s: %d candidates, %d with p(nodule) >= %g, %.1f s (candidates %.1f s, "
                     "classifier %.1f s)", ct.series_uid, len(result.candidates),
                     sum(c.p_nodule >= NODULE_THRESHOLD for c in result.candidates),
                     NODULE_THRESHOLD, time.perf_counter() - start,
                     result.seconds - result.classify_seconds, result.classify_seconds)
        if len(result.candidates) > 10 * REPORT_MAX_ROWS:
            log.warning("%s: %d candidates; is the model trained for scans like this one?",
                        ct.series_uid, len(result.candidates))
        nodules = (None if stage_two is None else
                   sum(c.p_nodule >= NODULE_THRESHOLD for c in result.candidates))
        outputs.append(ScanOutput(ct.series_uid, source.path, folder, len(result.candidates),
                                  seconds, nodules,
                                  result.candidates[0] if result.candidates else None))
    if skipped:
        log.warning("%d of %d scans could not be read and were skipped: %s%s", len(skipped),
                    len(sources), ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
        if not outputs:
            raise DataError(f"none of the {len(sources)} scans could be read (see the warnings)")
    return outputs
