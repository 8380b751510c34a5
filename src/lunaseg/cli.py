"""The ``lunaseg`` command: a thin layer over the Python API.

This is the only module that reads argv, sets up logging and chooses exit codes.  Library
errors (:class:`lunaseg.errors.LunasegError`) become one line on stderr and exit status 2;
``--debug`` shows the traceback instead.  Heavy modules are imported inside each command
so ``lunaseg --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from lunaseg import __version__
from lunaseg.errors import ConfigError, LunasegError
from lunaseg.evaluate import CANDIDATE_FP_BUDGET

log = logging.getLogger("lunaseg")


def _ints(text: str, count: int, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name}: expected {count} comma-separated integers, got {text!r}")
    if len(values) != count or min(values) <= 0:
        raise ConfigError(f"{name}: expected {count} positive integers, got {text!r}")
    return values


# ----------------------------------------------------------------------------- commands


def _cmd_synth(args: argparse.Namespace) -> int:
    from lunaseg.config import SynthConfig
    from lunaseg.synth import synthesize_dataset

    config = SynthConfig(series=args.series, seed=args.seed, subsets=args.subsets,
                         shape_irc=_ints(args.shape, 3, "--shape"), workers=args.workers)
    summary = synthesize_dataset(args.out, config, progress=not args.quiet)
    print(f"synth: {len(summary.series_uids)} series, {summary.n_nodules} nodules in {args.out} "
          f"({summary.seconds_per_scan:.2f} s per scan and process); true nodule masks in "
          f"{Path(args.out) / 'masks'}")
    return 0


def _cache_config(args: argparse.Namespace):
    from lunaseg.config import CacheConfig

    return CacheConfig(chunk_irc=_ints(args.chunk, 3, "--chunk"), workers=args.workers,
                       masks=args.masks)


def _cmd_prepcache(args: argparse.Namespace) -> int:
    from lunaseg.cache import prepcache
    from lunaseg.config import MaskConfig

    config = _cache_config(args)
    summary = prepcache(args.data, args.cache, config=config,
                        mask_config=MaskConfig(bound_by_diameter=args.bound_by_diameter),
                        check=args.check, progress=not args.quiet)
    print(summary.line())
    return 1 if summary.failed else 0


def _train_config(args: argparse.Namespace):
    from lunaseg.config import AugmentConfig, DataConfig, TrainConfig

    book = AugmentConfig.book()
    augment = AugmentConfig.book() if args.augmented else AugmentConfig()
    # Each --augment-X switches on that one augmentation at the book's setting.
    for flag, name in (("augment_flip", "flip"), ("augment_offset", "offset"),
                       ("augment_scale", "scale"), ("augment_rotate", "rotate"),
                       ("augment_noise", "noise_hu")):
        if getattr(args, flag):
            setattr(augment, name, getattr(book, name))
    data = DataConfig(val_stride=args.val_stride, test_stride=args.test_stride,
                      crop_px=args.crop, chunk_irc=_ints(args.chunk, 3, "--chunk"),
                      full_ct_validation=args.full_ct,
                      negative_crop_fraction=args.negative_crops,
                      full_slice_fraction=args.mix_full_slices,
                      hard_negative_fraction=args.hard_negatives,
                      epoch_samples=args.epoch_samples)
    epochs = args.epochs if args.epochs is not None else TrainConfig().epochs
    return TrainConfig(data=data, augment=augment, epochs=epochs,
                       batch_size=args.batch_size, num_workers=args.num_workers, lr=args.lr,
                       lr_schedule=args.lr_schedule,
                       fn_weight=args.fn_weight, bce_weight=args.bce_weight,
                       validation_cadence=args.validation_cadence,
                       best_min_recall=args.best_min_recall,
                       seed=args.seed, amp=args.amp, device=args.device, comment=args.comment)


def _flat(data: dict, prefix: str = "") -> dict:
    """A nested config dict as {"data.crop_px": 64, ...}, tuples as lists (as in JSON)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _resume_settings(args: argparse.Namespace, config):
    """For ``train --resume``: the run's own epoch count unless --epochs is given, its own
    folder unless --out is, and a warning for settings asked for that the run's override."""
    from dataclasses import replace

    from lunaseg.config import to_dict
    from lunaseg.model import load_checkpoint

    saved = load_checkpoint(args.resume).config
    if saved is None:
        return config, args.out or "runs/seg"  # not resumable; train() says why
    asked = _flat(to_dict(config))
    default = _flat(to_dict(_train_config(build_parser().parse_args(
        ["train", "--data", args.data]))))
    run = _flat(saved)
    ignored = [f"{key} {asked[key]} (the run's: {run[key]})" for key in asked
               if key not in ("epochs", "device") and key in run
               and asked[key] != default[key] and asked[key] != run[key]]
    if ignored:
        log.warning("--resume continues the run with its own settings; ignoring %s",
                    ", ".join(ignored))
    if args.epochs is None and "epochs" in saved:
        config = replace(config, epochs=int(saved["epochs"]))
    return config, args.out if args.out is not None else Path(args.resume).parent


def _cmd_train(args: argparse.Namespace) -> int:
    from lunaseg.train import train

    cache = args.cache or Path(args.data) / "cache"
    config, out = _train_config(args), args.out or "runs/seg"
    if args.resume:
        config, out = _resume_settings(args, config)
    result = train(config, cache, out, tb_dir=args.tb_dir,
                   resume=args.resume, compile_model=args.compile, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, from rank 0
        _print_train_result(result)
    return 130 if result.interrupted else 0


def _print_train_result(result) -> None:
    if result.best:
        print(f"best validation (epoch {result.best['epoch']}): recall "
              f"{result.best['pr/recall']:.3f}, precision {result.best['pr/precision']:.3f}, "
              f"F1 {result.best['pr/f1_score']:.3f}")
    print(f"checkpoints: {result.checkpoint}"
          + (f", {result.best_checkpoint}" if result.best_checkpoint else ""))
    print(f"tensorboard: tensorboard --logdir {result.tb_dir}")
    print(f"overlays:    {result.out_dir / 'overlays'}")


def _series(entries: Sequence[str] | None) -> list[str] | None:
    """``--series`` values: UIDs, or files listing them."""
    from lunaseg.luna import expand_series

    return None if entries is None else expand_series(entries)


def _segment_config(args: argparse.Namespace):
    from lunaseg.config import SegmentConfig

    return SegmentConfig(threshold=args.threshold, batch_size=args.batch_size,
                         erosion_iterations=args.erosion, min_voxels=args.min_voxels,
                         lung_mask=args.lung_mask, connectivity=args.connectivity,
                         score=args.score, center_weighting=args.center_weighting,
                         keep_vanished=not args.drop_vanished, overlays=args.overlays,
                         write_volumes=not args.no_volumes, amp=args.amp, tta=args.tta,
                         device=args.device)


def _cmd_segment(args: argparse.Namespace) -> int:
    from lunaseg.infer import segment_inputs

    outputs = segment_inputs(args.inputs, args.model, args.out, _segment_config(args),
                             series_uids=_series(args.series), progress=not args.quiet)
    for output in outputs:
        print(f"{output.series_uid}: {output.candidates} candidates -> {output.folder}")
    print(f"submission: {Path(args.out) / 'submission.csv'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lunaseg import pipeline

    if args.data is not None:
        if args.model is None:
            raise ConfigError("evaluate --data needs --model CKPT")
        report = pipeline.evaluate_model(args.data, args.model, args.out,
                                         split=args.split,
                                         segment=_segment_config(args),
                                         fp_budget=args.fp_budget,
                                         series_uids=_series(args.series),
                                         progress=not args.quiet)
    else:
        if args.annotations is None or args.candidates is None:
            raise ConfigError("evaluate needs --annotations CSV and --candidates CSV "
                              "(or --data DIR --model CKPT)")
        if args.model is not None:
            raise ConfigError("--model segments a --data folder; a --candidates CSV is "
                              "scored as it is")
        from lunaseg.config import SegmentConfig, to_dict

        asked, default = to_dict(_segment_config(args)), to_dict(SegmentConfig())
        changed = sorted(k for k in asked if k != "device" and asked[k] != default[k])
        if changed:
            log.warning("segmentation options do not apply to a --candidates CSV; ignoring "
                        "%s", ", ".join(changed))
        report = pipeline.score_files(args.annotations, args.candidates, args.out,
                                      excluded=args.excluded, series=_series(args.series),
                                      fp_budget=args.fp_budget)
    print(report)
    return 0


def _cmd_import_lidc(args: argparse.Namespace) -> int:
    from lunaseg.lidc import import_lidc

    summary = import_lidc(args.sources, args.out, min_readers=args.min_readers,
                          subset=args.subset, progress=not args.quiet)
    print(f"import-lidc: {len(summary.imported)} scans, {summary.nodules} nodules into "
          f"{args.out}; {len(summary.failures)} failed")  # each failure was logged
    return 1 if summary.failures and not summary.imported else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lunaseg import pipeline

    settings = pipeline.DemoSettings.quick() if args.quick else pipeline.DemoSettings()
    if args.series is not None:
        settings.synth.series = args.series
    if args.shape is not None:
        settings.synth.shape_irc = _ints(args.shape, 3, "--shape")
    if args.epochs is not None:
        settings.train.epochs = args.epochs
    settings.cache.masks = args.masks
    if args.tta is not None:
        settings.segment.tta = args.tta
    result = pipeline.run_demo(args.out, settings=settings, progress=not args.quiet)
    print(result)
    return 0


# ----------------------------------------------------------------------------- parser


def _add_segment_options(parser: argparse.ArgumentParser) -> None:
    from lunaseg.config import SegmentConfig

    seg = SegmentConfig()
    group = parser.add_argument_group("candidate extraction")
    group.add_argument("--threshold", type=float, default=seg.threshold,
                       help=f"probability above which a voxel is foreground "
                            f"(default {seg.threshold})")
    group.add_argument("--erosion", type=int, default=seg.erosion_iterations,
                       help="binary erosion iterations before labelling; components that "
                            "would vanish are kept (default 1)")
    group.add_argument("--min-voxels", type=int, default=seg.min_voxels,
                       help="drop components smaller than this (default 1)")
    group.add_argument("--drop-vanished", action="store_true",
                       help="drop components erosion erases entirely (the book's behaviour)")
    group.add_argument("--connectivity", type=int, choices=(6, 26), default=seg.connectivity,
                       help="3D neighbourhood of connected components (default 6)")
    group.add_argument("--lung-mask", action="store_true",
                       help="keep only candidates touching a lung mask computed from HU "
                            "(the network then runs only around the lungs)")
    group.add_argument("--score", choices=("mean", "max"), default=seg.score,
                       help="ranking score: mean or max (book) probability of a component "
                            f"(default {seg.score})")
    group.add_argument("--center-weighting", choices=("probability", "hu", "uniform"),
                       default=seg.center_weighting,
                       help="weights of the centre of mass (book: hu; default "
                            f"{seg.center_weighting})")
    group.add_argument("--tta", type=int, choices=(1, 2, 4), default=seg.tta,
                       help="average the model over 1, 2 (+ left-right) or 4 (+ up-down) "
                            "mirrored views of each slice: fewer false positives for up to "
                            f"4x the network time (default {seg.tta})")
    out = parser.add_argument_group("outputs and speed")
    out.add_argument("--overlays", type=int, default=seg.overlays,
                     help="PNG views for the top N candidates of each scan (default 100)")
    out.add_argument("--no-volumes", action="store_true",
                     help="skip probability.nii.gz and mask.nii.gz")
    out.add_argument("--batch-size", type=int, default=seg.batch_size,
                     help="slices per forward pass (default 0: 1 on CPU, 16 on a GPU)")
    out.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last (CUDA)")
    out.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def build_parser() -> argparse.ArgumentParser:
    from lunaseg.config import DataConfig, SynthConfig, TrainConfig

    train, data, synth_defaults = TrainConfig(), DataConfig(), SynthConfig()
    parser = argparse.ArgumentParser(
        prog="lunaseg", description="Lung-nodule candidate segmentation on chest CT "
                                    "(LUNA16 / LIDC-IDRI).")
    parser.add_argument("--version", action="version", version=f"lunaseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars, warnings and errors only")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the main job on built-in synthetic data: synth -> "
                                            "prepcache -> train -> validate -> segment")
    demo.add_argument("--out", default="lunaseg-demo", help="output folder (default ./lunaseg-demo)")
    demo.add_argument("--quick", action="store_true",
                      help="a much smaller run (about a minute) to check the installation")
    demo.add_argument("--series", type=int, default=None,
                      help="number of phantoms (default 96; --quick: 6)")
    demo.add_argument("--shape", default=None,
                      help="phantom size I,R,C (default 64,256,256, --quick: 32,128,128; "
                           "64,512,512 has real CT's 0.8 mm pixels and takes about three "
                           "times as long)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="training epochs (default 24; --quick: 2)")
    demo.add_argument("--masks", choices=("heuristic", "outline"), default="heuristic",
                      help="train on the book's HU-heuristic masks (default) or on the "
                           "phantoms' true nodule voxels")
    demo.add_argument("--tta", type=int, choices=(1, 2, 4), default=None,
                      help="mirrored views averaged when segmenting (default 4)")
    demo.set_defaults(func=_cmd_demo)

    synth = commands.add_parser("synth", help="write a synthetic LUNA16-layout dataset")
    synth.add_argument("--out", required=True, help="dataset folder to create")
    synth.add_argument("--series", type=int, default=synth_defaults.series,
                       help=f"number of scans (default {synth_defaults.series})")
    synth.add_argument("--seed", type=int, default=synth_defaults.seed, help="random seed")
    synth.add_argument("--shape", default=",".join(map(str, synth_defaults.shape_irc)),
                       help="volume size as I,R,C = slices,rows,cols (default 128,512,512)")
    synth.add_argument("--subsets", type=int, default=synth_defaults.subsets,
                       help="subsetN folders")
    synth.add_argument("--workers", type=int, default=synth_defaults.workers,
                       help="processes (default: all CPUs; the files are the same)")
    synth.set_defaults(func=_cmd_synth)

    prep = commands.add_parser("prepcache", help="cache what training and validation read")
    prep.add_argument("--data", required=True, help="LUNA16-layout folder (subset*/<uid>.mhd)")
    prep.add_argument("--cache", help="cache folder (default DATA/cache)")
    prep.add_argument("--workers", type=int, default=0, help="processes (default: all CPUs)")
    prep.add_argument("--check", action="store_true",
                      help="verify every entry's checksums and rebuild damaged ones")
    prep.add_argument("--masks", choices=("heuristic", "outline"), default="heuristic",
                      help="nodule masks from the book's HU heuristic, or from masks/<uid>.mha "
                           "(LIDC reader outlines, or the true voxels of synthetic phantoms)")
    prep.add_argument("--bound-by-diameter", action="store_true",
                      help="cap the heuristic's box at the annotated diameter")
    prep.add_argument("--chunk", default=",".join(map(str, data.chunk_irc)),
                      help="training chunk I,R,C (default %(default)s)")
    prep.set_defaults(func=_cmd_prepcache)

    tr = commands.add_parser("train", help="train the U-Net (torchrun for several GPUs)")
    tr.add_argument("--data", required=True, help="dataset folder (its cache is DATA/cache)")
    tr.add_argument("--cache", help="cache folder (default DATA/cache)")
    tr.add_argument("--out", help="run folder: checkpoints, overlays, logs (default runs/seg; "
                               "with --resume, the checkpoint's folder)")
    tr.add_argument("--tb-dir", help="TensorBoard folder (default OUT/tensorboard)")
    tr.add_argument("--epochs", type=int, default=None,
                    help=f"epochs in all (default {train.epochs}; with --resume, the run's own)")
    tr.add_argument("--batch-size", type=int, default=train.batch_size,
                    help=f"training samples per step (default {train.batch_size})")
    tr.add_argument("--num-workers", type=int, default=train.num_workers,
                    help="validation loader workers")
    tr.add_argument("--lr", type=float, default=train.lr, help="Adam learning rate")
    tr.add_argument("--lr-schedule", choices=("constant", "cosine"), default=train.lr_schedule,
                    help="constant (book) or cosine decay over the run")
    tr.add_argument("--fn-weight", type=float, default=train.fn_weight,
                    help=f"weight of the false-negative Dice term (default {train.fn_weight:g})")
    tr.add_argument("--bce-weight", type=float, default=train.bce_weight,
                    help="add pixel-wise cross-entropy with this weight (default 0, as the "
                         "book); it cuts false positives Dice barely penalises")
    tr.add_argument("--validation-cadence", type=int, default=train.validation_cadence,
                    help="validate at epoch 1, every N epochs and the last (default "
                         f"{train.validation_cadence})")
    tr.add_argument("--best-min-recall", type=float, default=None, metavar="RECALL",
                    help="pick the best checkpoint by F1 among validations reaching this "
                         "recall (default: by recall alone, as the book)")
    tr.add_argument("--augmented", action="store_true", help="all of the book's augmentations")
    for name, what in (("flip", "random flips"), ("offset", "random shifts"),
                       ("scale", "random scaling"), ("rotate", "random rotation"),
                       ("noise", "Gaussian noise of 25 HU")):
        tr.add_argument(f"--augment-{name}", action="store_true", help=what)
    tr.add_argument("--negative-crops", type=float, default=0.0, metavar="FRACTION",
                    help="share of training crops cut around look-alikes away from nodules")
    tr.add_argument("--mix-full-slices", type=float, default=0.0, metavar="FRACTION",
                    help="share of training steps on whole slices (chapter exercise 4)")
    tr.add_argument("--hard-negatives", type=float, default=0.0, metavar="FRACTION",
                    help="each epoch, re-cut this share of the negative crops where the model "
                         "currently finds false positives (needs --negative-crops)")
    tr.add_argument("--epoch-samples", type=int, default=0,
                    help="samples per epoch (default: one pass over the nodule chunks)")
    tr.add_argument("--val-stride", type=int, default=data.val_stride,
                    help=f"every N-th series validates (default {data.val_stride})")
    tr.add_argument("--test-stride", type=int, default=data.test_stride,
                    help="every N-th remaining series is held out for testing (0 = none)")
    tr.add_argument("--full-ct", action="store_true", help="validate on every slice")
    tr.add_argument("--crop", type=int, default=data.crop_px, help="training crop size in pixels")
    tr.add_argument("--chunk", default=",".join(map(str, data.chunk_irc)),
                    help="cached chunk size I,R,C")
    tr.add_argument("--comment", default="", help="a note stored with the run")
    tr.add_argument("--resume", help="checkpoint to continue from, with the run's own "
                                     "settings (only --epochs, --device and --out apply)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--amp", action="store_true", help="bf16 autocast")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    tr.set_defaults(func=_cmd_train)

    seg = commands.add_parser("segment", help="nodule candidates, masks and a report per CT")
    seg.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image file (.mhd .mha .nii .nii.gz .nrrd), DICOM folder or LUNA16 root")
    seg.add_argument("--model", required=True, help="checkpoint (lunaseg's or the book's)")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--series", nargs="*", help="only these series of a LUNA16 root: UIDs, or "
                     "files listing them (one per line, as LUNA16's seriesuids.csv); put it "
                     "after the INPUTs")
    _add_segment_options(seg)
    seg.set_defaults(func=_cmd_segment)

    ev = commands.add_parser("evaluate", help="LUNA16 FROC / CPM of candidate lists")
    ev.add_argument("--annotations", help="annotations.csv")
    ev.add_argument("--excluded", help="annotations_excluded.csv (irrelevant findings)")
    ev.add_argument("--candidates", help="submission CSV: seriesuid,coordX,coordY,coordZ,"
                                         "probability")
    ev.add_argument("--series", nargs="*", help="evaluate only these series: UIDs, or files "
                    "listing them (one per line, as LUNA16's seriesuids.csv)")
    ev.add_argument("--data", help="dataset folder: segment a split, then score it")
    ev.add_argument("--model", help="checkpoint for --data")
    ev.add_argument("--split", choices=("val", "test", "train", "all"), default="val")
    ev.add_argument("--out", default="evaluation", help="folder for JSON, FROC plot, CSVs")
    ev.add_argument("--fp-budget", type=float, default=CANDIDATE_FP_BUDGET,
                    help="also report sensitivity at this many false-positive candidates per "
                         f"scan (default {CANDIDATE_FP_BUDGET:g})")
    _add_segment_options(ev)
    ev.set_defaults(func=_cmd_evaluate)

    lidc = commands.add_parser("import-lidc", help="LIDC-IDRI DICOM + XML -> LUNA16 layout")
    lidc.add_argument("sources", nargs="+", metavar="SRC",
                      help="scan folder with a DICOM series and its XML, or a tree of them")
    lidc.add_argument("--out", required=True, help="dataset folder to write or extend")
    lidc.add_argument("--min-readers", type=int, default=3,
                      help="readers needed to accept a nodule (default 3, as LUNA16)")
    lidc.add_argument("--subset", type=int, default=0, help="write into subsetN (default 0)")
    lidc.set_defaults(func=_cmd_import_lidc)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("lunaseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LunasegError as error:
        if args.debug:
            raise
        print(f"lunaseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # A path that cannot be written or read (an --out that is a file, a full disk):
        # one line naming it, like the library's own errors.
        if args.debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"lunaseg {args.command}: error: {where}{error.strerror or error}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lunaseg {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
