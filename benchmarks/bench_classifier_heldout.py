"""Score trained classifiers on every series of a prepcached dataset none of them saw.

Not a test.  The nodule classifier is scored on the set's nodules against its look-alikes
and (with ``--seg-model``) the U-Net's candidates far from every finding, exactly the
samples ``lunaseg train-classifier`` validates on; a malignancy model on its nodules,
benign against malignant.  Prints AUC and the book's correct-% figures.  Usage::

    python benchmarks/bench_classifier_heldout.py --data DIR --model RUN/checkpoint.best.pt \\
        [--seg-model SEGRUN/checkpoint.pt] [--malignancy-model MRUN/checkpoint.best.pt]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lunaseg.cache import Cache
from lunaseg.classifier import load_classifier
from lunaseg.config import ClassifierDataConfig
from lunaseg.classifier_data import (avoided_findings, lookalike_samples, nodule_samples,
                                     segmentation_candidates, segmentation_negatives)
from lunaseg.train_classifier import evaluate_classifier


def _report(name: str, metrics: dict, seconds: float) -> None:
    print(f"{name}: AUC {metrics['auc']:.3f}; correct {metrics['correct/all']:.1f}% "
          f"(positives {metrics['correct/pos']:.1f}% of {metrics['count/tp'] + metrics['count/fn']}"
          f", negatives {metrics['correct/neg']:.1f}% of "
          f"{metrics['count/tn'] + metrics['count/fp']}); precision {metrics['pr/precision']:.3f}"
          f", recall {metrics['pr/recall']:.3f}; {metrics['samples'] / seconds:.0f} crops/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder with DATA/cache")
    parser.add_argument("--model", help="nodule classifier checkpoint")
    parser.add_argument("--seg-model", help="U-Net whose candidates are negatives too")
    parser.add_argument("--malignancy-model", help="malignancy classifier checkpoint")
    parser.add_argument("--work", help="folder for the candidates JSON (default: temporary)")
    args = parser.parse_args()
    cache = Cache(Path(args.data) / "cache")
    uids = cache.series_uids
    data = ClassifierDataConfig()
    print(f"{args.data}: {len(uids)} series, "
          f"{sum(len(cache[u].nodules) for u in uids)} nodules")
    if args.model:
        model, _ = load_classifier(args.model)
        samples = nodule_samples(cache, uids) + lookalike_samples(cache, uids)
        if args.seg_model:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(args.work or tmp) / "segmentation_candidates.json"
                found = segmentation_candidates(args.seg_model, cache, uids, path)
            samples += segmentation_negatives(found, avoided_findings(cache, uids, args.data),
                                              data)
        entries = {uid: cache[uid] for uid in uids}
        start = time.perf_counter()
        metrics = evaluate_classifier(model, entries, samples, progress=True).compute()
        _report("nodule vs non-nodule", metrics, time.perf_counter() - start)
    if args.malignancy_model:
        model, _ = load_classifier(args.malignancy_model)
        samples = nodule_samples(cache, uids, "malignancy")
        entries = {uid: cache[uid] for uid in uids}
        start = time.perf_counter()
        metrics = evaluate_classifier(model, entries, samples).compute()
        _report("malignant vs benign", metrics, time.perf_counter() - start)


if __name__ == "__main__":
    main()
