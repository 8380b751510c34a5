"""Score a model on fresh phantom sets it never saw, one row per set and one for all together.

The candidate target (sensitivity at <= 20 false positives per scan) moves by a nodule or
two between sets of 24 scans, so the README's figures pool several sets: each set is made
with ``lunaseg synth --seed S`` (kept in ``--work`` and reused by later runs), segmented and
scored with ``lunaseg evaluate --data ... --split all``, then every set's candidates are
scored as one submission.

    python benchmarks/bench_heldout.py --model lunaseg-demo/run/checkpoint.pt \\
        --seeds 7 8 9 --shape 64,256,256 --work /tmp/heldout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lunaseg.config import SynthConfig
from lunaseg.errors import LunasegError
from lunaseg.evaluate import froc, load_findings, load_marks, write_result_json
from lunaseg.luna import EXCLUDED_FILE, find_series
from lunaseg.pipeline import DemoSettings, evaluate_model
from lunaseg.synth import synthesize_dataset


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
    parser.add_argument("--score", choices=["max", "mean"], default=None,
                        help="candidate score (default: the demo's)")
    args = parser.parse_args(argv)

    segment = DemoSettings().segment
    segment.overlays = 0
    if args.tta is not None:
        segment.tta = args.tta
    if args.score is not None:
        segment.score = args.score
    work, model = Path(args.work), Path(args.model)
    shape_irc = tuple(int(v) for v in args.shape.split(","))
    tag = f"{model.parent.name}_{model.stem}_tta{segment.tta}_{segment.score}"

    findings, excluded, marks, series, rows = {}, {}, {}, [], []
    for seed in args.seeds:
        data = work / f"seed{seed}_{'x'.join(map(str, shape_irc))}_{args.series}"
        if not (data / "annotations.csv").exists():
            synthesize_dataset(data, SynthConfig(series=args.series, seed=seed,
                                                 shape_irc=shape_irc))
        report = evaluate_model(data, model, work / f"{tag}_seed{seed}", split="all",
                                segment=segment)
        rows.append(_row(f"seed {seed}", report.froc))
        findings.update(load_findings(data / "annotations.csv"))
        if (data / EXCLUDED_FILE).exists():
            excluded.update(load_findings(data / EXCLUDED_FILE, excluded=True))
        marks.update(load_marks(report.out_dir / "segment" / "submission.csv"))
        series.extend(find_series(data))

    pooled = froc(findings, marks, excluded=excluded, series=series,
                  max_marks_per_scan=segment.max_candidates)
    write_result_json(pooled, work / f"{tag}_pooled.json")
    print(f"{model} on fresh phantoms {args.shape}, tta {segment.tta}, score {segment.score}, "
          f"lung mask {segment.lung_mask}")
    print("| set | scans | nodules | found | within 20 FP / scan | CPM (95% CI) | marks / scan |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(_row("all together", pooled))
    print(f"pooled result: {work / (tag + '_pooled.json')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, LunasegError) as error:  # a bad path or a half-written set: one line
        sys.exit(f"bench_heldout: {error}")
