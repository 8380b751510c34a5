"""``detect``: candidates judged by the classifier, re-ranked, written with both verdicts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SHARED, ClassStandIn
from lunaseg.cli import main
from lunaseg.config import ClassifierConfig, SegmentConfig
from lunaseg.ct import CT
from lunaseg.detect import kept, load_stage_two, rank_by_classifier
from lunaseg.errors import ConfigError
from lunaseg.geometry import Geometry
from lunaseg.inputs import ClassifierSpec, SegmentationSpec
from lunaseg.segment import segment_ct

DICOM_SLAB = SHARED / "data" / "lidc-idri-0001" / "dicom"
MODELS = SHARED / "models"


class Bright(nn.Module):
    """Segmentation stand-in: logit +5 where the centre slice is above -200 HU."""

    spec = SegmentationSpec(tta=1, grouping="lunaseg")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, 3:4] > -200, 5.0, -5.0)


class MeanHU(nn.Module):
    """Classifier stand-in: its nodule logit is the crop's centre HU / 100, so brighter
    candidates are called nodules more surely; the "other" logit is 0."""

    spec = ClassifierSpec(crop_irc=(4, 8, 8))
    config = ClassifierConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 0, 2, 4, 4] / 100.0
        return torch.stack([torch.zeros_like(centre), centre], dim=1)


def three_blobs() -> CT:
    """Three bright boxes; the candidate stage ranks them by size (mean logit ties, so by
    its own order), the stand-in classifier by brightness."""
    hu = np.full((12, 40, 40), -800, dtype=np.int16)
    hu[4:8, 4:10, 4:10] = 0      # large, dull
    hu[4:8, 20:24, 20:24] = 300  # middle
    hu[4:8, 30:33, 5:8] = 600    # small, brightest
    return CT(hu, Geometry.identity(spacing_xyz=(1.0, 1.0, 1.0)), "1.2.3")


def test_the_classifier_reranks_and_the_labels_follow():
    ct = three_blobs()
    config = SegmentConfig(lung_mask=False, overlays=0, erosion_iterations=0)
    result = segment_ct(Bright(), ct, config, device="cpu")
    assert len(result.candidates) == 3
    judged = rank_by_classifier(ct, result, MeanHU())
    assert [round(c.mean_hu) for c in judged.candidates] == [600, 300, 0]
    assert [c.rank for c in judged.candidates] == [0, 1, 2]
    assert judged.candidates[0].p_nodule == pytest.approx(1 / (1 + np.exp(-6.0)), abs=1e-6)
    # Label k + 1 is still candidates[k], now in the classifier's order.
    for candidate in judged.candidates:
        i, r, c = np.rint(candidate.center_irc).astype(int)
        assert judged.labels[i, r, c] == candidate.rank + 1
    # The submission's probability is the classifier's, strictly in its order.
    scores = [c.probability for c in judged.candidates]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3
    assert kept(judged.candidates) == 3 and kept(judged.candidates, 0.99) == 1


def test_the_classifier_replaces_a_3_class_u_nets_verdicts():
    ct = three_blobs()
    config = SegmentConfig(lung_mask=False, overlays=0, erosion_iterations=0)
    result = segment_ct(ClassStandIn(), ct, config, device="cpu")
    by_hu = {round(c.mean_hu): c for c in result.candidates}
    assert sorted(by_hu) == [0, 300, 600]
    # The U-Net's own verdicts: all three are nodules, the two denser than 200 HU malignant.
    assert all(c.p_nodule > 0.99 and not c.judged for c in result.candidates)
    assert by_hu[0].p_malignant < 0.05 and min(by_hu[300].p_malignant,
                                               by_hu[600].p_malignant) > 0.85
    judged = rank_by_classifier(ct, result, MeanHU())
    for candidate in judged.candidates:
        # p(nodule) is the classifier's now; without a malignancy model the U-Net's
        # p(malignant | nodule) stays.
        assert candidate.judged
        assert candidate.p_nodule == pytest.approx(1 / (1 + np.exp(-candidate.mean_hu / 100)),
                                                   abs=1e-3)
        assert candidate.p_malignant == by_hu[round(candidate.mean_hu)].p_malignant
    malignancy = MeanHU()
    malignancy.config = ClassifierConfig(classes=("benign", "malignant"))
    both = rank_by_classifier(ct, result, MeanHU(), malignancy)
    for candidate in both.candidates:
        assert candidate.p_malignant == pytest.approx(candidate.p_nodule, abs=1e-9)


def test_a_malignancy_model_of_the_classifiers_spec_reuses_its_crops(monkeypatch):
    from lunaseg import detect

    ct = three_blobs()
    config = SegmentConfig(lung_mask=False, overlays=0, erosion_iterations=0)
    result = segment_ct(Bright(), ct, config, device="cpu")
    cut = []
    real_cut = detect.candidate_crops

    def counting_cut(*args, **kwargs):
        cut.append(args[2])
        return real_cut(*args, **kwargs)

    monkeypatch.setattr(detect, "candidate_crops", counting_cut)
    malignancy = MeanHU()
    malignancy.config = ClassifierConfig(classes=("benign", "malignant"))
    both = rank_by_classifier(ct, result, MeanHU(), malignancy)
    assert cut == [MeanHU.spec]  # one cut for both models
    assert [c.p_malignant for c in both.candidates] == [c.p_nodule for c in both.candidates]
    # Another spec gets crops of its own (the classifier's would not fit its input); its
    # stand-in reads another voxel of them, so its verdicts differ.
    other = MeanHU()
    other.spec = ClassifierSpec(crop_irc=(4, 12, 12))
    other.config = malignancy.config
    apart = rank_by_classifier(ct, result, MeanHU(), other)
    assert cut == [MeanHU.spec, MeanHU.spec]
    assert [c.p_malignant for c in apart.candidates] != [c.p_nodule for c in apart.candidates]


def test_a_classifier_for_another_question_is_refused():
    model = MeanHU()
    model.config = ClassifierConfig(classes=("benign", "malignant"))
    with pytest.raises(ConfigError, match="expected 'nodule'"):
        load_stage_two(model)


@pytest.mark.slow
@pytest.mark.skipif(not DICOM_SLAB.is_dir() or not (MODELS / "book-cls-2020-02-06.best.state")
                    .is_file(), reason=f"real DICOM slab or book models not in {SHARED}")
def test_detect_with_the_books_models_on_the_real_slab(tmp_path, capsys):
    out = tmp_path / "detect"
    assert main(["-q", "detect", str(DICOM_SLAB), "--seg-model",
                 str(MODELS / "book-seg-2020-01-26.best.state"), "--cls-model",
                 str(MODELS / "book-cls-2020-02-06.best.state"), "--out", str(out),
                 "--overlays", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "called nodules" in printed and "best: p(nodule)" in printed
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1
    folder = folders[0]
    for name in ("probability.nii.gz", "mask.nii.gz", "candidates.csv", "candidates.json",
                 "report.html", "candidates/cand_000.png", "candidates/cand_001.png"):
        assert (folder / name).is_file(), name
    with open(folder / "candidates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    p_nodule = [float(row["p_nodule"]) for row in rows]
    assert p_nodule == sorted(p_nodule, reverse=True)
    # The readers' 23 mm nodule (LUNA16 annotations.csv) comes first.
    first = np.array([float(rows[0][k]) for k in ("coordX", "coordY", "coordZ")])
    assert np.linalg.norm(first - [56.208, 86.343, -115.868]) < 5.0 and p_nodule[0] > 0.5
    assert sum(p >= 0.5 for p in p_nodule) <= 5
    document = json.loads((folder / "candidates.json").read_text())
    assert document["candidates"][0]["p_nodule"] == pytest.approx(p_nodule[0], abs=1e-6)
    assert "p_nodule" in (folder / "report.html").read_text()
    with open(out / "submission.csv", newline="") as handle:
        submission = list(csv.DictReader(handle))
    written = [float(row["probability"]) for row in submission]
    assert written == sorted(written, reverse=True) and 0.5 < written[0] <= 1.0


def test_the_combined_ranking_adds_the_candidate_score():
    ct = three_blobs()
    config = SegmentConfig(lung_mask=False, overlays=0, erosion_iterations=0)
    result = segment_ct(Bright(), ct, config, device="cpu")
    judged = rank_by_classifier(ct, result, MeanHU(), rank_by="combined")
    for candidate in judged.candidates:
        assert candidate.rank_log_odds == pytest.approx(candidate.score
                                                        + candidate.nodule_log_odds)
    values = [c.rank_log_odds for c in judged.candidates]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ConfigError, match="rank_by"):
        rank_by_classifier(ct, result, MeanHU(), rank_by="vote")


def test_evaluate_refuses_a_classifier_without_a_model_to_judge(capsys):
    assert main(["evaluate", "--annotations", "a.csv", "--candidates", "c.csv",
                 "--classifier", "cls.pt"]) != 0
    assert "--classifier and --malignancy judge the candidates" in capsys.readouterr().err
