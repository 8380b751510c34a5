"""Names of the files and folders lunaseg writes, in one place: the stages that write them
and the stages that read them back (evaluation, the demo, resumed runs) share these."""

from __future__ import annotations

# A training run folder.
LAST_CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint.best.pt"
RUN_CONFIG_FILE = "config.json"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
OVERLAYS_DIR = "overlays"
# The demo's second-stage runs, inside its U-Net run folder.
CLASSIFIER_RUN_DIR = "classifier"
MALIGNANCY_RUN_DIR = "malignancy"
# A classifier run folder also keeps the segmentation model's candidates it trains against.
SEGMENTATION_CANDIDATES_FILE = "segmentation_candidates.json"

# A segment output folder, and one folder per scan inside it.
SUBMISSION_FILE = "submission.csv"
SEGMENT_CONFIG_FILE = "segment_config.json"
PROBABILITY_FILE = "probability.nii.gz"
MASK_FILE = "mask.nii.gz"
MALIGNANT_FILE = "p_malignant.nii.gz"  # 3-class models only
CANDIDATES_CSV = "candidates.csv"
CANDIDATES_JSON = "candidates.json"
CANDIDATE_VIEWS_DIR = "candidates"
REPORT_FILE = "report.html"

# An evaluation folder.
SEGMENT_DIR = "segment"
FROC_JSON = "froc.json"
FROC_PNG = "froc.png"
MISSES_JSON = "misses.json"
