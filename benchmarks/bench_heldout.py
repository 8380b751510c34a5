"""Score a model on fresh phantom sets it never saw, one row per set and one for all together.

The candidate target (sensitivity at <= 20 false positives per scan) moves by a nodule or
two between sets of 24 scans, so the README's figures pool several sets: each set is made
with ``lunaseg synth --seed S`` (kept in ``--work`` and reused by later runs), segmented and
scored with ``lunaseg evaluate --data ... --split all``, then every set's candidates are
scored as one submission.

With ``--classifier`` (and ``--malignancy``) the whole CAD is scored the same way (``lunaseg
evaluate --classifier``), pooled end to end and for the candidate stage alone, with the
nodules the classifier rejects.

With ``--variants`` the network runs once per scan (all four mirror views kept, on the body
box) and each grouping x view rule x lung mask is scored from those logits, pooled over the
sets: one network pass for every variant.

Malignancy (chapter exercise 3b), whoever judged it: the malignancy model with
``--malignancy``, else a 3-class U-Net (``train --classes 3``), as both fill the candidates'
``p_malignant``.  For each annotated nodule with a ``mal_bool`` that a submission mark hits,
the p(malignant | nodule) of the mark the FROC scores it by (its best-ranked hit) is rated
against ``mal_bool`` as a ROC AUC with a bootstrap interval over nodules, alone and times
that mark's p(nodule); the nodules and their scores go to ``WORK/<tag>_malignancy.csv``, so
two malignancy models can be compared nodule by nodule.

    python benchmarks/bench_heldout.py --model lunaseg-demo/run/checkpoint.pt \\
        --seeds 7 8 9 --shape 64,256,256 --work /tmp/heldout
    python benchmarks/bench_heldout.py --model ... --work /tmp/heldout --variants
    python benchmarks/bench_heldout.py --model lunaseg-demo/run/checkpoint.best.pt \\
        --classifier lunaseg-demo/run/classifier/checkpoint.best.pt \\
        --malignancy lunaseg-demo/run/malignancy/checkpoint.best.pt --work /tmp/heldout
    python benchmarks/bench_heldout.py --model lunaseg-demo-3class/run/checkpoint.best.pt \\
        --work /tmp/heldout
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from lunaseg.candidates import extract_candidates, score_probability
from lunaseg.config import SynthConfig
from lunaseg.ct import load_ct
from lunaseg.errors import LunasegError
from lunaseg.evaluate import (Finding, Mark, found_nodule_scores, froc, load_findings,
                              load_marks, write_result_json)
from lunaseg.files import write_csv
from lunaseg.luna import EXCLUDED_FILE, annotation_file, find_series, read_nodules
from lunaseg.masks import lung_mask
from lunaseg.model import load_model
from lunaseg.pipeline import DemoSettings, evaluate_model
from lunaseg.predict import combine_views, predict_views
from lunaseg.roc import roc_auc, roc_auc_interval
from lunaseg.synth import synthesize_dataset

VARIANTS = [(grouping, rule, lung) for grouping in ("lunaseg", "book")
            for rule in ("consensus", "mean", "one view") for lung in (True, False)]


def _row(name: str, result) -> str:
    low, high = result.cpm_ci or (float("nan"), float("nan"))
    found = sum(n.hit for n in result.nodules)
    return (f"| {name} | {result.n_scans} | {result.n_nodules} | "
            f"{result.candidate_sensitivity:.3f} ({found}) | "
            f"{result.sensitivity_at_budget:.3f} | {result.cpm:.3f} ({low:.3f}-{high:.3f}) | "
            f"{result.marks_per_scan:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint to score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9],
                        help="one fresh set per seed (default 7 8 9)")
    parser.add_argument("--series", type=int, default=24, help="scans per set (default 24)")
    parser.add_argument("--shape", default="64,256,256",
                        help="phantom size I,R,C: the size the model was trained at "
                             "(default 64,256,256, the demo's)")
    parser.add_argument("--work", required=True,
                        help="folder for the sets (reused when present) and the evaluations")
    parser.add_argument("--tta", type=int, default=None,
                        help="mirrored views (default: the demo's segment settings)")
    parser.add_argument("--variants", action="store_true",
                        help="score every grouping, view rule and lung mask setting from one "
                             "network pass per scan, instead of the segment defaults")
    parser.add_argument("--classifier", help="a nodule classifier: score the whole CAD")
    parser.add_argument("--malignancy", help="a malignancy model (with --classifier)")
    parser.add_argument("--rank-by", default=DemoSettings().rank_by,
                        help="detect's ranking (default: the demo's)")
    args = parser.parse_args(argv)

    segment = DemoSettings().segment
    segment.overlays = 0
    if args.tta is not None:
        segment.tta = args.tta
    work, model = Path(args.work), Path(args.model)
    shape_irc = tuple(int(v) for v in args.shape.split(","))
    sets = []
    for seed in args.seeds:
        data = work / f"seed{seed}_{'x'.join(map(str, shape_irc))}_{args.series}"
        if not (data / "annotations.csv").exists():
            synthesize_dataset(data, SynthConfig(series=args.series, seed=seed,
                                                 shape_irc=shape_irc))
        sets.append((seed, data))
    if args.variants:
        return _variants(model, sets, segment)
    tag = f"{model.parent.name}_{model.stem}_tta{segment.tta}"
    if args.classifier:
        tag += f"_cad_{args.rank_by}"

    findings, excluded, marks, series, rows, rated = {}, {}, {}, [], [], []
    alone, rejected = {}, 0
    for seed, data in sets:
        report = evaluate_model(data, model, work / f"{tag}_seed{seed}", split="all",
                                segment=segment, classifier=args.classifier,
                                malignancy=args.malignancy, rank_by=args.rank_by)
        rows.append(_row(f"seed {seed}", report.froc))
        if args.classifier:
            rejected += sum(m.get("stage") == "classifier" for m in report.misses)
            alone.update(_candidate_stage_marks(report.out_dir / "segment"))
        findings.update(load_findings(data / "annotations.csv"))
        if (data / EXCLUDED_FILE).exists():
            excluded.update(load_findings(data / EXCLUDED_FILE, excluded=True))
        marks.update(load_marks(report.out_dir / "segment" / "submission.csv"))
        series.extend(find_series(data))
        rated += _malignancy_of_found(data, report.out_dir / "segment", segment.max_candidates)

    pooled = froc(findings, marks, excluded=excluded, series=series,
                  max_marks_per_scan=segment.max_candidates)
    write_result_json(pooled, work / f"{tag}_pooled.json")
    print(f"{model} on fresh phantoms {args.shape}, segment settings: tta {segment.tta} "
          f"(None: the model's), lung mask {segment.lung_mask}")
    print("| set | scans | nodules | found | within 20 FP / scan | CPM (95% CI) | marks / scan |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(_row("all together", pooled))
    if args.classifier:
        first = froc(findings, alone, excluded=excluded, series=series,
                     max_marks_per_scan=segment.max_candidates)
        print(_row("candidate stage alone, all together", first))
        print(f"sensitivity at 1 FP per scan: end to end {pooled.sensitivities_at[1.0]:.3f}, "
              f"candidates alone {first.sensitivities_at[1.0]:.3f}; at 8: "
              f"{pooled.sensitivities_at[8.0]:.3f} and {first.sensitivities_at[8.0]:.3f}")
        print(f"nodules a candidate hits but the classifier puts below p(nodule) 0.5: "
              f"{rejected}")
    print(f"pooled result: {work / (tag + '_pooled.json')}")
    if rated:
        source = "the malignancy model" if args.malignancy else "the 3-class U-Net"
        _print_malignancy(rated, work / f"{tag}_malignancy.csv", source)
    return 0


def _candidate_stage_marks(segment_dir: Path) -> dict[str, list[Mark]]:
    """The candidate stage's own marks per scan (ranked by its score, not the classifier's),
    from the candidates.json files of one set that detect judged."""
    alone = {}
    for document_path in sorted(segment_dir.glob("*/candidates.json")):
        document = json.loads(document_path.read_text())
        alone[document["series_uid"]] = [
            Mark(c["center_xyz"], score_probability(c["score"]))
            for c in sorted(document["candidates"], key=lambda c: -c["score"])]
    return alone


MALIGNANCY_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "mal_bool",
                      "p_nodule", "p_malignant")


def _malignancy_of_found(data: Path, segment_dir: Path, max_marks: int) -> list[list]:
    """One row per annotated nodule with a malignancy label that a submission mark hits
    (``MALIGNANCY_COLUMNS``), with the p(nodule) and p(malignant | nodule) of the mark the
    FROC scores it by: the classifier's when detect ran one, else a 3-class U-Net's;
    nothing when the candidates carry no p(malignant)."""
    source = annotation_file(data)
    if source is None:
        return []
    by_series: dict[str, list] = {}
    for nodule in read_nodules(source):
        if nodule.is_malignant is not None:
            by_series.setdefault(nodule.series_uid, []).append(nodule)
    rows = []
    for document_path in sorted(segment_dir.glob("*/candidates.json")):
        document = json.loads(document_path.read_text())
        candidates = document["candidates"][:max_marks]  # best first: the submission's marks
        if not candidates or candidates[0].get("p_malignant") is None:
            continue
        nodules = by_series.get(document["series_uid"], [])
        marks = [Mark(c["center_xyz"], c["probability"]) for c in candidates]
        findings = [Finding(n.center_xyz, n.diameter_mm) for n in nodules]
        p_nodule, p_malignant = (found_nodule_scores(findings, marks,
                                                     [c[key] for c in candidates])
                                 for key in ("p_nodule", "p_malignant"))
        for nodule, nodule_p, malignant_p in zip(nodules, p_nodule, p_malignant):
            if malignant_p is not None:
                rows.append([nodule.series_uid, *nodule.center_xyz, nodule.diameter_mm,
                             bool(nodule.is_malignant), nodule_p, malignant_p])
    return rows


def _print_malignancy(rows: list[list], path: Path, source: str) -> None:
    """The malignancy AUCs of the found nodules (``source`` gave the scores), and their
    table: p(malignant | nodule) alone and times p(nodule), the softmax's p(malignant) for a
    3-class U-Net."""
    write_csv(path, MALIGNANCY_COLUMNS, rows)
    labels = [row[5] for row in rows]
    print(f"malignancy by {source} on the {len(rows)} nodules found ({sum(labels)} "
          f"malignant), ROC AUC (95% CI, nodules bootstrapped):")
    conditional = [row[7] for row in rows]
    joint = [row[6] * row[7] for row in rows]
    for name, scores in (("p(malignant | nodule)", conditional),
                         ("p(nodule) x p(malignant | nodule)", joint)):
        interval = roc_auc_interval(labels, scores)
        ci = f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else ""
        print(f"  {name}: {roc_auc(labels, scores):.3f}{ci}")
    print(f"found nodules and their scores: {path}")


def _variants(model_path: Path, sets: list, segment) -> int:
    """Every variant of VARIANTS scored on all sets pooled, from one network pass per scan."""
    model, _ = load_model(model_path)
    findings, excluded, series = {}, {}, []
    marks: dict = {variant: {} for variant in VARIANTS}
    for seed, data in sets:
        findings.update(load_findings(data / "annotations.csv"))
        if (data / EXCLUDED_FILE).exists():
            excluded.update(load_findings(data / EXCLUDED_FILE, excluded=True))
        for uid, path in sorted(find_series(data).items()):
            ct = load_ct(path, uid)
            views = predict_views(model, ct.hu, model.spec, tta=4, device=segment.device,
                                  spacing_rc=ct.geometry.spacing_xyz[1::-1])
            lungs = lung_mask(ct.hu, spacing_irc=ct.geometry.spacing_xyz[::-1])
            combined = {"consensus": combine_views(views, "consensus"),
                        "mean": combine_views(views, "mean"), "one view": views[0]}
            for variant in VARIANTS:
                grouping, rule, lung = variant
                config = replace(segment, grouping=grouping, lung_mask=lung)
                found = extract_candidates(combined[rule], ct.hu, ct.geometry, config,
                                           lung_mask=lungs if lung else None)
                marks[variant][uid] = [Mark(np.asarray(c.center_xyz), c.probability)
                                       for c in found[:segment.max_candidates]]
            series.append(uid)
    print(f"{model_path} on fresh phantoms, {len(series)} scans, seeds "
          f"{' '.join(str(seed) for seed, _ in sets)}; model spec: grouping "
          f"{model.spec.grouping}, {model.spec.tta} views")
    print("| grouping | views | lung mask | scans | nodules | found | within 20 FP / scan | "
          "CPM (95% CI) | marks / scan |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant in VARIANTS:
        result = froc(findings, marks[variant], excluded=excluded, series=series,
                      max_marks_per_scan=segment.max_candidates)
        grouping, rule, lung = variant
        print(_row(f"{grouping} | {rule} | {'yes' if lung else 'no'}", result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, LunasegError) as error:  # a bad path or a half-written set: one line
        sys.exit(f"bench_heldout: {error}")
