"""End-to-end runs over the stages: score candidate files, evaluate a model on a split, and
the built-in demo (synth -> prepcache -> train -> validate -> segment -> evaluate)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lunaseg import layout
from lunaseg.candidates import score_probability
from lunaseg.config import (CacheConfig, ClassifierConfig, ClassifierDataConfig,
                            ClassifierTrainConfig, DataConfig, MaskConfig, SegmentConfig,
                            SynthConfig, TrainConfig, check_fraction, from_dict, to_dict)
from lunaseg.errors import ConfigError, DataError
from lunaseg.evaluate import (CANDIDATE_FP_BUDGET, Finding, Mark, froc, load_findings,
                              load_marks, match_marks, write_result_json)
from lunaseg.files import write_json_atomic
from lunaseg.report import plot_froc

__all__ = ["EvaluationReport", "score_files", "evaluate_model", "DemoSettings", "run_demo"]

log = logging.getLogger(__name__)

NEVER_SEGMENTED_P = 0.05  # a nodule whose best voxel stays below this was not seen at all


@dataclass
class EvaluationReport:
    """FROC summary plus per-nodule misses; ``str()`` is the text the CLI prints."""

    out_dir: Path
    froc: object  # lunaseg.evaluate.FrocResult
    misses: list[dict] = field(default_factory=list)
    seconds_per_scan: float | None = None
    scans_from: str = "the split"  # where the list of scans scored came from
    candidates_alone: object | None = None  # the FrocResult of the candidate stage (detect)
    classifier_seconds_per_scan: float | None = None
    ranking_cpms: dict[str, float] = field(default_factory=dict)  # CPM per detect ranking
    ranked_by: str | None = None  # the ranking of the submission scored above

    def __str__(self) -> str:
        r = self.froc
        lines = [f"scans {r.n_scans} (from {self.scans_from}), nodules {r.n_nodules}, "
                 f"candidates per scan {r.candidates_per_scan:.1f}",
                 f"candidate sensitivity {r.candidate_sensitivity:.3f}; at <= {r.fp_budget:g} "
                 f"false positives per scan {r.sensitivity_at_budget:.3f}",
                 f"CPM {r.cpm:.3f}" + (f" (95% CI {r.cpm_ci[0]:.3f}-{r.cpm_ci[1]:.3f})"
                                       if r.cpm_ci else ""),
                 "sensitivity at FP/scan: " + ", ".join(
                     f"{rate:g}: {value:.3f}" for rate, value in r.sensitivities_at.items())]
        if r.nodules:
            lines.append(_by_size_line(r))
        if self.candidates_alone is not None:
            c = self.candidates_alone
            lines.append(f"candidate stage alone: CPM {c.cpm:.3f}"
                         + (f" (95% CI {c.cpm_ci[0]:.3f}-{c.cpm_ci[1]:.3f})" if c.cpm_ci else "")
                         + f", at 1 FP per scan {c.sensitivities_at.get(1.0, float('nan')):.3f}"
                         f"; end to end (above, ranked by {self.ranked_by}): CPM {r.cpm:.3f}, "
                         f"at 1 FP per scan {r.sensitivities_at.get(1.0, float('nan')):.3f}")
            lines.append("CPM by ranking of the same candidates: " + ", ".join(
                f"{name} {cpm:.3f}" for name, cpm in self.ranking_cpms.items()))
        if self.classifier_seconds_per_scan is not None:
            lines.append(f"classifier seconds per scan: {self.classifier_seconds_per_scan:.2f}")
        if self.seconds_per_scan is not None:
            lines.append(f"seconds per scan (read -> candidates -> files): "
                         f"{self.seconds_per_scan:.2f}")
        for miss in self.misses:
            # A nodule the classifier rejects is still among the marks, low in the ranking.
            what = "rejected" if miss.get("stage") == "classifier" else "missed"
            lines.append(f"{what}: {miss['series_uid']} at ({miss['center_xyz'][0]:.1f}, "
                         f"{miss['center_xyz'][1]:.1f}, {miss['center_xyz'][2]:.1f}), "
                         f"{miss['diameter_mm']:.1f} mm: {miss['reason']}")
        lines.append(f"results: {self.out_dir / layout.FROC_JSON}, "
                     f"{self.out_dir / layout.FROC_PNG}")
        return "\n".join(lines)


def _by_size_line(result) -> str:
    """One line of per-diameter counts: where a detector's misses are."""
    return (f"by diameter (found / at <= {result.fp_budget:g} FP per scan / nodules): "
            + "; ".join(f"{b.label} {b.found}/{b.found_at_budget}/{b.nodules}"
                        for b in result.by_size()))


def _write_outputs(result, out_dir: Path, misses: list[dict], title: str,
                   compare=None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_result_json(result, out_dir / layout.FROC_JSON)
    plot_froc(result, out_dir / layout.FROC_PNG, title=title, compare=compare)
    write_json_atomic(misses, out_dir / layout.MISSES_JSON)


def score_files(annotations: str | os.PathLike, candidates: str | os.PathLike,
                out_dir: str | os.PathLike, *, excluded: str | os.PathLike | None = None,
                series: Sequence[str] | None = None,
                fp_budget: float = CANDIDATE_FP_BUDGET) -> EvaluationReport:
    """LUNA16 FROC/CPM of a submission CSV against an annotations CSV.

    The scans scored are ``series`` (a dataset's list, as LUNA16's seriesuids.csv); without
    it, every scan with a nodule or a candidate, and what that leaves out is pointed out.
    """
    findings, marks = load_findings(annotations), load_marks(candidates)
    excluded_findings = load_findings(excluded, excluded=True) if excluded else {}
    scores = np.array([m.probability for group in marks.values() for m in group])
    outside = int(np.count_nonzero((scores < 0) | (scores > 1))) if scores.size else 0
    if outside:
        log.warning("%s: %d of %d probabilities lie outside [0, 1]; only their order is "
                    "scored", candidates, outside, scores.size)
    if series is not None:
        # A listed scan with nothing in any file is a clean scan to LUNA16, but it is also
        # what a mistyped UID looks like, and each one lowers the false positives per scan.
        unknown = sorted(set(series) - set(findings) - set(marks) - set(excluded_findings))
        if unknown:
            log.warning("%d of the %d series listed appear in no annotation, excluded finding "
                        "or candidate (first: %s); each counts as a scan with nothing in it",
                        len(unknown), len(set(series)), unknown[0])
        scans_from = "the series list"
    else:
        silent = sorted(set(findings) - set(marks))
        unannotated = sorted(set(marks) - set(findings))
        if silent:
            log.warning("%d annotated scans have no candidates at all (first: %s); they are "
                        "scored as scans the CAD found nothing in", len(silent), silent[0])
        if unannotated:
            log.warning("%d scans have candidates but no annotated nodule (first: %s); they "
                        "are scored as scans without nodules", len(unannotated), unannotated[0])
        if silent or unannotated:
            log.warning("without --series (or --data) the scans scored are those named in "
                        "either file; give the dataset's own list to score it the LUNA16 way")
        scans_from = "the annotations and candidates"
    result = froc(findings, marks, excluded=excluded_findings, series=series,
                  fp_budget=fp_budget)
    misses = [{"series_uid": n.series_uid, "center_xyz": list(n.center_xyz),
               "diameter_mm": n.diameter_mm,
               "reason": _cut_reason(result) if n.hit_any else "no mark"}
              for n in result.nodules if not n.hit]
    report = EvaluationReport(Path(out_dir), result, misses, scans_from=scans_from)
    _write_outputs(result, report.out_dir, misses, Path(candidates).name)
    return report


def _cut_reason(result) -> str:
    return f"found, but ranked below the {result.max_marks_per_scan}-marks-per-scan limit"


def _split_series(data_dir: Path, model_path: Path, split: str, available: list[str]
                  ) -> list[str]:
    """The run's saved split (splits.json beside the checkpoint), else the split its
    training settings make (beside or inside the checkpoint), else the default split."""
    from lunaseg.checkpoint import load_checkpoint
    from lunaseg.datasets import load_splits

    if split == "all":
        return sorted(available)
    config_file = model_path.parent / layout.RUN_CONFIG_FILE
    try:
        saved = (json.loads(config_file.read_text()) if config_file.exists()
                 else load_checkpoint(model_path).config)
    except ValueError as error:
        raise DataError(f"{config_file}: not a run's settings ({error})") from None
    if saved is None and not (model_path.parent / layout.SPLITS_FILE).exists():
        log.warning("%s: no splits.json or training settings beside or inside the "
                    "checkpoint; using the default split", model_path)
    config = DataConfig() if saved is None else from_dict(TrainConfig, saved).data
    splits = load_splits(model_path.parent / layout.SPLITS_FILE, available, config,
                         strict=False)
    chosen = [uid for uid in splits.get(split, []) if uid in set(available)]
    if not chosen:
        raise DataError(f"{data_dir}: the {split} split holds no series on disk")
    return chosen


def _sphere_box(geometry, shape: tuple[int, ...], center_xyz, diameter_mm: float):
    """(box slices, boolean sphere within the box) of a nodule, in voxels."""
    center_irc = geometry.xyz_to_irc_float(np.asarray(center_xyz))
    radius_vox = diameter_mm / 2 / geometry.spacing_xyz[::-1]
    low = np.maximum(np.floor(center_irc - radius_vox), 0).astype(int)
    high = np.minimum(np.ceil(center_irc + radius_vox) + 1, shape).astype(int)
    if np.any(high <= low):
        return None, None
    index = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)],
                                 indexing="ij"), -1).reshape(-1, 3)
    distance_mm = np.linalg.norm(geometry.irc_to_xyz(index) - np.asarray(center_xyz), axis=1)
    inside = (distance_mm <= diameter_mm / 2).reshape(tuple(high - low))
    return tuple(slice(a, b) for a, b in zip(low, high)), inside


@dataclass
class _ScanVolumes:
    """What `lunaseg segment` wrote for one scan, read back once to explain its misses."""

    geometry: object  # lunaseg.geometry.Geometry
    prob: np.ndarray
    mask: np.ndarray
    candidates: list[dict]

    @classmethod
    def read(cls, folder: Path) -> "_ScanVolumes":
        import SimpleITK as sitk

        from lunaseg.ct import read_geometry

        geometry, _ = read_geometry(folder / layout.PROBABILITY_FILE)
        arrays = []
        for name in (layout.PROBABILITY_FILE, layout.MASK_FILE):
            try:
                arrays.append(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name))))
            except RuntimeError as error:
                raise DataError(f"{folder / name}: unreadable ({str(error).strip()[-120:]})") \
                    from None
        try:
            candidates = json.loads((folder / layout.CANDIDATES_JSON).read_text())["candidates"]
        except (OSError, ValueError, KeyError) as error:
            raise DataError(f"{folder / layout.CANDIDATES_JSON}: unreadable ({error})") from None
        return cls(geometry, arrays[0], arrays[1], candidates)


def _below(p: float, threshold: float) -> str:
    """``p`` (< threshold) with enough decimals not to print as the threshold itself."""
    digits = 2
    while digits < 6 and round(p, digits) >= threshold:
        digits += 1
    return f"{p:.{digits}f}"


def _why_missed(nodule, scan: _ScanVolumes, threshold: float, max_marks: int) -> str:
    """Sort a miss into: ranked below the mark cap, merged with a neighbour, removed after
    thresholding, below threshold, or never segmented."""
    center = np.asarray(nodule.center_xyz)
    # candidates.json lists every candidate, the submission only the top ones: a hit among
    # the rest was found but ranked out (matched by the scorer's own rule).
    marks = [Mark(c["center_xyz"], c["probability"]) for c in scan.candidates]
    hitting = np.flatnonzero(match_marks([Finding(center, nodule.diameter_mm)], marks).hits[:, 0])
    if hitting.size:
        best = scan.candidates[hitting[0]]
        return (f"found, but ranked {hitting[0] + 1} (p {best['probability']:.3f}), below the "
                f"{max_marks}-marks-per-scan limit")
    box, inside = _sphere_box(scan.geometry, scan.prob.shape, nodule.center_xyz,
                              nodule.diameter_mm)
    if box is None or not inside.any():
        return "outside the scanned volume"
    best_p = float(scan.prob[box][inside].max())
    if (scan.mask[box][inside] > 0).any():
        nearest = min((float(np.linalg.norm(np.asarray(c["center_xyz"]) - center))
                       for c in scan.candidates), default=float("nan"))
        return (f"merged with a neighbour: its voxels are segmented but the nearest "
                f"component centre lies {nearest:.1f} mm away (radius "
                f"{nodule.diameter_mm / 2:.1f} mm)")
    if best_p > threshold:
        return f"segmented (max p {best_p:.2f}) but removed by erosion, size or lung mask"
    if best_p >= NEVER_SEGMENTED_P:
        return f"below threshold (max p {_below(best_p, threshold)} <= {threshold:g})"
    return f"never segmented (max p {best_p:.3f})"


# Beside froc.json when a classifier is scored: the candidate stage's own FROC.
CANDIDATE_STAGE_FROC_JSON = "froc_candidates.json"


def _read_candidates(folder: Path) -> dict:
    """A scan's candidates.json: its ``candidates`` and, after detect, ``classifier_seconds``."""
    try:
        document = json.loads((folder / layout.CANDIDATES_JSON).read_text())
        if not isinstance(document, dict) or "candidates" not in document:
            raise ValueError("no candidates list")
        return document
    except (OSError, ValueError) as error:
        raise DataError(f"{folder / layout.CANDIDATES_JSON}: unreadable ({error})") from None


def _rejected(findings, judged: dict[str, list[dict]], series: Sequence[str]) -> list[dict]:
    """Nodules a candidate hits but the classifier puts below p(nodule) NODULE_THRESHOLD."""
    from lunaseg.candidates import NODULE_THRESHOLD

    out = []
    for uid in series:
        candidates = judged.get(uid, [])
        if not candidates:
            continue
        marks = [Mark(c["center_xyz"], c["probability"]) for c in candidates]
        for nodule in findings.get(uid, []):
            hitting = np.flatnonzero(match_marks([nodule], marks).hits[:, 0])
            if hitting.size == 0:
                continue
            best = candidates[hitting[0]]
            if best["p_nodule"] < NODULE_THRESHOLD:
                out.append({"series_uid": uid, "center_xyz": list(nodule.center_xyz),
                            "diameter_mm": nodule.diameter_mm, "stage": "classifier",
                            "reason": f"a candidate (rank {hitting[0] + 1}) but rejected by "
                                      f"the classifier (p(nodule) {best['p_nodule']:.3f})"})
    return out


def evaluate_model(data_dir: str | os.PathLike, model_path: str | os.PathLike,
                   out_dir: str | os.PathLike, *, split: str = "val",
                   segment: SegmentConfig | None = None,
                   fp_budget: float = CANDIDATE_FP_BUDGET,
                   series_uids: Sequence[str] | None = None, require_ct: bool = True,
                   progress: bool = True, classifier: str | os.PathLike | None = None,
                   malignancy: str | os.PathLike | None = None,
                   rank_by: str = "classifier") -> EvaluationReport:
    """Segment every scan of a split and score it the LUNA16 way, explaining every miss.

    ``series_uids`` narrows the split to those scans (``split="all"``: any on disk).  With
    a ``classifier`` the whole CAD is scored (:func:`lunaseg.detect.detect_inputs`), and
    the same candidates ranked by the segmentation alone and by each ranking of
    :data:`lunaseg.detect.RANKINGS` beside it; a nodule the candidate stage found but the
    classifier puts below p(nodule) 0.5 is listed as rejected by it.
    """
    from lunaseg.luna import EXCLUDED_FILE, annotation_file, find_series
    from lunaseg.segment import segment_inputs

    data_dir, model_path, out_dir = Path(data_dir), Path(model_path), Path(out_dir)
    segment = segment or SegmentConfig()
    available = sorted(find_series(data_dir))
    series = _split_series(data_dir, model_path, split, available)
    if series_uids is not None:
        wanted = set(series_uids)
        series = [uid for uid in series if uid in wanted]
        if not series:
            raise DataError(f"{data_dir}: none of the {len(wanted)} series asked for is in "
                            f"the {split} split on disk")
    annotations = annotation_file(data_dir)
    if annotations is None:
        raise DataError(f"{data_dir}: no annotations.csv to score against")
    log.info("scoring against %s", annotations)
    segment_dir = out_dir / layout.SEGMENT_DIR
    # The evaluation's own segment folder: a rerun replaces it.
    if classifier is None:
        outputs = segment_inputs([data_dir], model_path, segment_dir, segment,
                                 series_uids=series, overwrite=True, require_ct=require_ct,
                                 progress=progress)
    else:
        from lunaseg.detect import detect_inputs

        outputs = detect_inputs([data_dir], model_path, classifier, segment_dir, segment,
                                malignancy=malignancy, rank_by=rank_by, series_uids=series,
                                overwrite=True,
                                require_ct=require_ct, progress=progress)
    excluded_file = data_dir / EXCLUDED_FILE
    findings = load_findings(annotations)
    excluded = (load_findings(excluded_file, excluded=True) if excluded_file.exists()
                else None)
    result = froc(findings, load_marks(segment_dir / layout.SUBMISSION_FILE),
                  excluded=excluded, series=series, max_marks_per_scan=segment.max_candidates,
                  fp_budget=fp_budget)
    folders = {o.series_uid: o.folder for o in outputs}
    misses, scans = [], {}
    alone, rankings, classifier_seconds = None, {}, None
    if classifier is not None:
        from lunaseg.detect import RANKINGS, ranking_log_odds

        documents = {o.series_uid: _read_candidates(o.folder) for o in outputs}
        judged = {uid: document["candidates"] for uid, document in documents.items()}
        if documents:
            classifier_seconds = float(np.mean([d.get("classifier_seconds", 0.0)
                                                for d in documents.values()]))

        def reranked(key) -> object:
            marks = {uid: [Mark(c["center_xyz"], score_probability(key(c)))
                           for c in sorted(cands, key=lambda c: -key(c))]
                     for uid, cands in judged.items()}
            return froc(findings, marks, excluded=excluded, series=series,
                        max_marks_per_scan=segment.max_candidates, fp_budget=fp_budget)

        alone = reranked(lambda c: c["score"])
        rankings = {name: reranked(lambda c, name=name: ranking_log_odds(
            c["score"], c["nodule_log_odds"], name)).cpm for name in RANKINGS}
        misses += _rejected(findings, judged, series)
    for nodule in result.nodules:
        if nodule.hit:
            continue
        if nodule.hit_any:
            reason = _cut_reason(result)
        elif not segment.write_volumes:
            reason = "not found (run without --no-volumes to see why)"
        else:
            if nodule.series_uid not in scans:  # read each scan's volumes once
                scans[nodule.series_uid] = _ScanVolumes.read(folders[nodule.series_uid])
            reason = _why_missed(nodule, scans[nodule.series_uid], segment.threshold,
                                 segment.max_candidates)
        misses.append({"series_uid": nodule.series_uid, "center_xyz": list(nodule.center_xyz),
                       "diameter_mm": nodule.diameter_mm, "stage": "candidates",
                       "reason": reason})
    seconds = float(np.mean([o.seconds for o in outputs])) if outputs else None
    report = EvaluationReport(out_dir, result, misses, seconds, candidates_alone=alone,
                              classifier_seconds_per_scan=classifier_seconds,
                              ranking_cpms=rankings, ranked_by=rank_by)
    if alone is not None:
        write_result_json(alone, out_dir / CANDIDATE_STAGE_FROC_JSON)
    title = f"{model_path.name}{' + classifier' if classifier else ''} on the {split} split"
    _write_outputs(result, out_dir, misses, title, compare=alone)
    return report


# ----------------------------------------------------------------------------- the demo


@dataclass
class DemoSettings:
    """What ``lunaseg demo`` runs: sized to finish in minutes on a 2-core CPU."""

    synth: SynthConfig = field(default_factory=lambda: SynthConfig(
        series=96, seed=2026, shape_irc=(64, 256, 256), subsets=2))
    # The book's heuristic masks (the phantoms' true voxels found no more nodules).
    masks: MaskConfig = field(default_factory=MaskConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # lunaseg train's defaults, with a sixth of the phantoms for validation, an epoch of
    # 2,048 samples and 30 epochs.  Every training stage runs in bf16 autocast where the
    # device has bf16 units (a no-op elsewhere): 1.8x the U-Net's step on this project's
    # CPUs, spent on 30 epochs instead of 24 and on the second stage (docs/results.md).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        data=DataConfig(val_stride=6, epoch_samples=2048), epochs=30, device="auto",
        amp=True))
    # segment's defaults (the model's views and grouping, the lung mask), fewer pictures.
    segment: SegmentConfig = field(default_factory=lambda: SegmentConfig(overlays=10))
    # The second stage on the U-Net's splits: the nodule classifier (the book's design and
    # augmentation, on 16 x 32 x 32 crops) against look-alikes and the U-Net's own
    # candidates, then its malignancy fine-tuning (head and last block).  The smaller crop
    # makes a step 4.5x cheaper, and the classifier needs its 1,000 steps: after 300 steps of
    # the book's 32 x 48 x 48 crop its validation AUC was 0.66, now 0.91 (docs/classifier.md).
    # The demo ranks by the classifier's evidence added to the candidate stage's
    # ("combined"), and prints every ranking's CPM.
    classifier: ClassifierTrainConfig = field(default_factory=lambda: ClassifierTrainConfig(
        model=ClassifierConfig(crop_irc=(16, 32, 32)),
        data=ClassifierDataConfig(segmentation_negatives=50), epochs=100,
        validation_cadence=10, device="auto", amp=True))
    malignancy: ClassifierTrainConfig = field(default_factory=lambda: ClassifierTrainConfig(
        task="malignancy", finetune_depth=2, epochs=30, validation_cadence=10, device="auto",
        amp=True))
    second_stage: bool = True
    rank_by: str = "combined"  # how detect orders the judged candidates (lunaseg.detect)
    quick: bool = False  # a check that every stage runs, not a model to use
    # About how long the demo may take (0: no limit, the default, since fewer epochs make
    # much weaker models: docs/results.md).  With a budget, on a machine slower than the
    # recipe's reference (lunaseg.budget) every training stage runs proportionally fewer
    # epochs, but never fewer than min_epoch_share of them.
    budget_minutes: float = 0.0
    min_epoch_share: float = 0.5

    @classmethod
    def quick_check(cls) -> "DemoSettings":
        """A minute-long run that checks the installation end to end (it learns little)."""
        settings = cls(quick=True)
        settings.synth.series = 6
        settings.synth.shape_irc = (32, 128, 128)
        settings.train.data.val_stride = 3
        settings.train.data.epoch_samples = 256
        settings.train.epochs = 2
        settings.train.validation_cadence = 1
        settings.train.data.hard_negative_slices = 8
        settings.segment.tta = 1
        for stage in (settings.classifier, settings.malignancy):
            stage.epochs, stage.validation_cadence = 1, 1
        return settings

    def fit_to_machine(self, samples_per_s: float) -> tuple["DemoSettings", str]:
        """These settings with the epochs that fit :attr:`budget_minutes` on a machine whose
        U-Net calibration (:func:`lunaseg.budget.unet_training_rate`) gives ``samples_per_s``,
        and a line saying how long the recipe should take and what was chosen."""
        from lunaseg.budget import REFERENCE, epoch_factor, estimated_s, scaled_epochs

        estimate = (f"this machine trains the U-Net at {samples_per_s:.0f} samples/s "
                f"({REFERENCE.samples_per_s:.0f} on the recipe's reference, "
                f"{REFERENCE.machine}): the demo should take about "
                f"{estimated_s(samples_per_s) / 60:.0f} minutes")
        if self.budget_minutes <= 0:
            return self, f"{estimate} (--budget-minutes N trims the training epochs to fit N)"
        factor = epoch_factor(samples_per_s, self.budget_minutes * 60)
        if factor >= 1:
            return self, f"{estimate}, within the {self.budget_minutes:g}-minute budget"
        fitted = copy.deepcopy(self)
        stages = (fitted.train, fitted.classifier, fitted.malignancy)
        for stage in stages:
            stage.epochs = scaled_epochs(stage.epochs, factor,
                                         math.ceil(stage.epochs * self.min_epoch_share))
        u, c, m = (stage.epochs for stage in stages)
        return fitted, (f"{estimate}; to stay near the {self.budget_minutes:g}-minute budget it "
                        f"trains {u} U-Net, {c} classifier and {m} malignancy epochs (the "
                        f"recipe's {self.train.epochs}, {self.classifier.epochs} and "
                        f"{self.malignancy.epochs}), which gives weaker models")


@dataclass
class DemoResult:
    """Where the demo left everything, and how well the model did."""

    out_dir: Path
    data_dir: Path
    run_dir: Path
    train: object  # lunaseg.train.TrainResult
    evaluation: EvaluationReport | None
    montage: Path | None
    seconds: dict[str, float]
    settings: DemoSettings = field(default_factory=DemoSettings)
    evaluated: Path | None = None  # the checkpoint scored
    classifier: object | None = None  # lunaseg.train_classifier.ClassifierTrainResult
    malignancy: object | None = None
    budget: str = ""  # the time estimate and what a budget chose (DemoSettings.fit_to_machine)

    def __str__(self) -> str:
        lines = [f"lunaseg demo finished in {sum(self.seconds.values()):.0f} s ("
                 + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) + ")"]
        if self.budget:
            lines.append(self.budget)
        last = next((h for h in reversed(self.train.history) if "val" in h), None)
        if last:
            val = last["val"]
            lines.append(f"validation (pixels on slices with nodules, epoch {last['epoch']}): "
                         f"recall {val['pr/recall']:.3f}, precision {val['pr/precision']:.3f}, "
                         f"F1 {val['pr/f1_score']:.3f}")
            if "pr_malignant/recall" in val:
                lines.append(f"classes (same pixels): recall benign "
                             f"{val['pr_benign/recall']:.3f}, malignant "
                             f"{val['pr_malignant/recall']:.3f}; found nodule pixels called "
                             f"right: benign {val['confusion/benign_as_benign']:.3f}, malignant "
                             f"{val['confusion/malignant_as_malignant']:.3f}")
        if self.train.best:
            from lunaseg.train import best_reason

            lines.append(f"best checkpoint: {best_reason(self.train.best, self.settings.train)}")
        alone = self.evaluation.candidates_alone if self.evaluation is not None else None
        if self.evaluation is not None:
            # With a second stage the evaluation ranks by it; the candidate stage's own
            # figures are those of its ranking alone.
            r = alone if alone is not None else self.evaluation.froc
            lines.append(f"candidates of {self.evaluated.name if self.evaluated else 'the model'} "
                         f"on {r.n_scans} validation scans ({r.n_nodules} nodules): "
                         f"sensitivity {r.candidate_sensitivity:.3f} with "
                         f"{r.candidates_per_scan:.1f} candidates per scan, "
                         f"{r.sensitivity_at_budget:.3f} at <= {r.fp_budget:g} false positives "
                         f"per scan; CPM {r.cpm:.3f}")
            if r.nodules:
                lines.append(_by_size_line(r))
        for name, stage in (("nodule classifier", self.classifier),
                            ("malignancy model", self.malignancy)):
            if stage is not None and stage.best:
                lines.append(f"{name}: validation AUC {stage.best['auc']:.3f} (epoch "
                             f"{stage.best['epoch']}), {stage.best_checkpoint}")
        if alone is not None:
            r = self.evaluation.froc
            lines.append(f"CPM of the candidate stage alone {alone.cpm:.3f} (at 1 FP per scan "
                         f"{alone.sensitivities_at[1.0]:.3f}); end to end, ranked by "
                         f"{self.evaluation.ranked_by}, {r.cpm:.3f} "
                         f"({r.sensitivities_at[1.0]:.3f}), {r.sensitivity_at_budget:.3f} at "
                         f"<= {r.fp_budget:g} false positives per scan")
        lines += [f"data:        {self.data_dir}",
                  f"checkpoints: {self.train.checkpoint}"
                  + (f", {self.train.best_checkpoint}" if self.train.best_checkpoint else ""),
                  f"tensorboard: tensorboard --logdir {self.train.tb_dir}",
                  f"overlays:    {self.run_dir / layout.OVERLAYS_DIR}"]
        if self.montage is not None:
            lines.append(f"montage:     {self.montage}")
        if self.evaluation is not None:
            lines.append(f"FROC:        {self.evaluation.out_dir / layout.FROC_PNG}")
            lines.append(f"reports:     {self.evaluation.out_dir / layout.SEGMENT_DIR}/"
                         f"<series>/{layout.REPORT_FILE}")
        if self.settings.quick:
            lines.append("(--quick checks that every stage runs: its model trains for a "
                         "minute on six tiny phantoms and learns little, so its figures are "
                         "not meant to be good; run `lunaseg demo` for a model)")
        return "\n".join(lines)


DEMO_MARKER = ".lunaseg-demo"


def _claim_demo_folder(out_dir: Path) -> None:
    """Make sure the demo may replace ``out_dir/data`` and ``out_dir/run``: they must be its
    own (the folder carries :data:`DEMO_MARKER`, or its data/ was written by the demo) or
    absent.  A user's own data or run folder of those names is never deleted."""
    marker = out_dir / DEMO_MARKER
    if not marker.exists() and not (out_dir / "data" / "synth_config.json").exists():
        for name in ("data", "run"):
            if (out_dir / name).exists():
                raise DataError(f"{out_dir / name}: exists and was not made by lunaseg demo, "
                                f"which would replace it; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by lunaseg demo: data/ and run/ are replaced on each run\n")


def _synth_if_needed(data_dir: Path, config: SynthConfig, progress: bool) -> None:
    """Synthesize unless the folder already holds this exact configuration's output."""
    from lunaseg.synth import PHANTOM_VERSION, synthesize_dataset

    marker = data_dir / "synth_config.json"
    # A folder from an older phantom generator is made again, not reused; the number of
    # worker processes does not change the files.
    fields = {key: value for key, value in to_dict(config).items() if key != "workers"}
    wanted = json.dumps({**fields, "phantom_version": PHANTOM_VERSION}, sort_keys=True)
    if marker.exists() and marker.read_text() == wanted:
        log.info("%s already holds this synthetic dataset; reusing it", data_dir)
        return
    if data_dir.exists():
        shutil.rmtree(data_dir)
    synthesize_dataset(data_dir, config, progress=progress)
    marker.write_text(wanted)


def _demo_montage(data_dir: Path, out_png: Path) -> Path:
    """Phantom slices with the cached training masks outlined (what the model learns from)."""
    from lunaseg.cache import Cache
    from lunaseg.report import render_montage, scans_from_dataset

    cache = Cache(data_dir / "cache")
    scans = scans_from_dataset(data_dir, max_scans=6)
    for scan in scans:
        entry = cache[scan.series_uid]
        row0, col0 = entry.crop_rc
        rows, cols = entry.hu.shape[1:]
        scan.mask = np.zeros(scan.hu.shape, dtype=bool)
        scan.mask[:, row0:row0 + rows, col0:col0 + cols] = entry.mask()
    return render_montage(scans, out_png, title="synthetic phantoms: nodule masks in red")


def run_demo(out_dir: str | os.PathLike | None = None, *, quick: bool = False,
             settings: DemoSettings | None = None, progress: bool = True) -> DemoResult:
    """The main job on built-in data: synthetic LUNA16-format phantoms -> prepcache ->
    training with validation -> candidates on the validation scans, scored the LUNA16 way."""
    from lunaseg.cache import prepcache
    from lunaseg.train import check_train_config, train

    settings = settings or (DemoSettings.quick_check() if quick else DemoSettings())
    if out_dir is None:  # a quick check never replaces the full demo's folder
        out_dir = "lunaseg-demo-quick" if settings.quick else "lunaseg-demo"
    check_train_config(settings.train)  # a bad setting fails now, not after the phantoms
    budget_line = ""
    if not (settings.budget_minutes >= 0 and math.isfinite(settings.budget_minutes)):
        raise ConfigError(f"budget_minutes must be a number >= 0 (0 = no budget), got "
                          f"{settings.budget_minutes}")
    check_fraction(settings, "min_epoch_share")
    if not settings.quick:  # a few seconds, to say how long the demo should take
        from lunaseg.budget import unet_training_rate
        from lunaseg.runtime import resolve_device

        rate = unet_training_rate(settings.train, resolve_device(settings.train.device))
        settings, budget_line = settings.fit_to_machine(rate)
        log.info("%s", budget_line)
    out_dir = Path(out_dir)
    data_dir, run_dir = out_dir / "data", out_dir / "run"
    seconds: dict[str, float] = {}
    _claim_demo_folder(out_dir)

    started = time.perf_counter()
    _synth_if_needed(data_dir, settings.synth, progress)
    seconds["synth"] = time.perf_counter() - started

    started = time.perf_counter()
    summary = prepcache(data_dir, data_dir / "cache", config=settings.cache,
                        mask_config=settings.masks, progress=progress)
    log.info("%s", summary.line())
    seconds["prepcache"] = time.perf_counter() - started

    montage = _demo_montage(data_dir, out_dir / "montage.png")

    started = time.perf_counter()
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo run starts fresh; use `lunaseg train` to resume
    result = train(settings.train, data_dir / "cache", run_dir, progress=progress)
    seconds["train"] = time.perf_counter() - started
    model_path = result.best_checkpoint or run_dir / layout.LAST_CHECKPOINT

    stages: dict[str, object] = {}
    if settings.second_stage and model_path.exists() and not result.interrupted:
        from lunaseg.train_classifier import train_classifier

        started = time.perf_counter()
        stages["classifier"] = train_classifier(
            settings.classifier, data_dir / "cache", run_dir / layout.CLASSIFIER_RUN_DIR,
            data_dir=data_dir, seg_model=model_path, seg_run=run_dir, progress=progress)
        nodule = stages["classifier"].best_checkpoint or stages["classifier"].checkpoint
        stages["malignancy"] = train_classifier(
            settings.malignancy, data_dir / "cache", run_dir / layout.MALIGNANCY_RUN_DIR,
            data_dir=data_dir, seg_run=run_dir, init_from=nodule, progress=progress)
        seconds["classifiers"] = time.perf_counter() - started

    # The checkpoint a user should use: the best validation's (chosen on candidates), which
    # makes these validation figures a little optimistic; benchmarks/bench_heldout.py scores
    # fresh phantoms.
    evaluation = None
    if model_path.exists() and not result.interrupted:
        started = time.perf_counter()
        best = {name: stage.best_checkpoint or stage.checkpoint
                for name, stage in stages.items()}
        evaluation = evaluate_model(data_dir, model_path, out_dir / "evaluation", split="val",
                                    segment=settings.segment, progress=progress,
                                    classifier=best.get("classifier"),
                                    malignancy=best.get("malignancy"),
                                    rank_by=settings.rank_by)
        seconds["detect+evaluate" if stages else "segment+evaluate"] = \
            time.perf_counter() - started
    return DemoResult(out_dir, data_dir, run_dir, result, evaluation, montage, seconds,
                      settings, model_path, stages.get("classifier"), stages.get("malignancy"),
                      budget_line)
