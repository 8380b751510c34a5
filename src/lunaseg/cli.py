"""The ``lunaseg`` command: a thin layer over the Python API.

This is the only module that reads argv, sets up logging and chooses exit codes.  Library
errors (:class:`lunaseg.errors.LunasegError`) become one line on stderr and exit status 2;
``--debug`` shows the traceback instead.  Option defaults and help texts come from the
config dataclasses (:func:`lunaseg.config.describe`).  Heavy modules are imported inside
each command so ``lunaseg --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from lunaseg import __version__
from lunaseg.config import (AugmentConfig, CacheConfig, ClassifierConfig, ClassifierDataConfig,
                            ClassifierTrainConfig, CropAugmentConfig, DataConfig, LidcConfig,
                            MaskConfig, ModelConfig, SegmentConfig, SynthConfig, TrainConfig,
                            describe)
from lunaseg.errors import ConfigError, LunasegError

log = logging.getLogger("lunaseg")


def _ints(text: str, count: int, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name}: expected {count} comma-separated integers, got {text!r}")
    if len(values) != count or min(values) <= 0:
        raise ConfigError(f"{name}: expected {count} positive integers, got {text!r}")
    return values


def _option(parser, flag: str, cls: type, name: str, **kwargs: Any) -> None:
    """An option whose default and help come from the field ``cls.<name>``."""
    default = getattr(cls(), name)
    if isinstance(default, bool) or "action" in kwargs:
        kwargs.setdefault("action", "store_true")
    elif isinstance(default, tuple):
        kwargs.setdefault("default", ",".join(map(str, default)))
    else:
        kwargs.setdefault("type", type(default) if default is not None else float)
        kwargs.setdefault("default", default)
    parser.add_argument(flag, help=describe(cls, name), **kwargs)


# ----------------------------------------------------------------------------- commands


def _cmd_synth(args: argparse.Namespace) -> int:
    from lunaseg.synth import synthesize_dataset

    config = SynthConfig(series=args.series, seed=args.seed, subsets=args.subsets,
                         shape_irc=_ints(args.shape, 3, "--shape"), workers=args.workers)
    summary = synthesize_dataset(args.out, config, progress=not args.quiet)
    print(f"synth: {len(summary.series_uids)} series, {summary.n_nodules} nodules in {args.out} "
          f"({summary.seconds_per_scan:.2f} s per scan and process); true nodule masks in "
          f"{Path(args.out) / 'masks'}")
    return 0


def _cmd_prepcache(args: argparse.Namespace) -> int:
    from lunaseg.cache import prepcache

    config = CacheConfig(chunk_irc=_ints(args.chunk, 3, "--chunk"), workers=args.workers,
                         masks=args.masks)
    summary = prepcache(args.data, args.cache, config=config,
                        mask_config=MaskConfig(bound_by_diameter=args.bound_by_diameter),
                        progress=not args.quiet)
    print(summary.line())
    return 1 if summary.failed else 0


# train options that set a field of TrainConfig (or of its data part): flag -> field.
_TRAIN_FIELDS = {"epochs": "epochs", "batch_size": "batch_size", "num_workers": "num_workers",
                 "lr": "lr", "lr_schedule": "lr_schedule", "fn_weight": "fn_weight",
                 "bce_weight": "bce_weight", "class_weight": "class_weight",
                 "validation_cadence": "validation_cadence",
                 "best_min_recall": "best_min_recall", "best_by": "best_by", "seed": "seed",
                 "amp": "amp", "device": "device", "comment": "comment"}
_DATA_FIELDS = {"negative_crops": "negative_crop_fraction",
                "mix_full_slices": "full_slice_fraction",
                "hard_negatives": "hard_negative_fraction", "epoch_samples": "epoch_samples",
                "val_stride": "val_stride", "test_stride": "test_stride",
                "full_ct": "full_ct_validation", "crop": "crop_px"}
_MODEL_FIELDS = {"classes": "n_classes"}


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The preset's settings with every option given on the command line applied."""
    from dataclasses import replace

    config = TrainConfig.book() if args.preset == "book" else TrainConfig()
    given = {name: getattr(args, flag) for flag, name in _TRAIN_FIELDS.items()
             if getattr(args, flag) is not None}
    data = {name: getattr(args, flag) for flag, name in _DATA_FIELDS.items()
            if getattr(args, flag) is not None}
    model = {name: getattr(args, flag) for flag, name in _MODEL_FIELDS.items()
             if getattr(args, flag) is not None}
    augment = config.augment
    flags = [name for name in ("flip", "offset", "scale", "rotate", "noise")
             if getattr(args, f"augment_{name}")]
    if args.no_augment or args.augmented or flags:
        # --augmented: the book's set; each --augment-X switches that one on at the book's
        # setting (the others off); --no-augment: none.
        book = AugmentConfig.book()
        augment = book if args.augmented else AugmentConfig.none()
        for name in flags:
            field = "noise_hu" if name == "noise" else name
            setattr(augment, field, getattr(book, field))
    return replace(config, data=replace(config.data, **data),
                   model=replace(config.model, **model), augment=augment, **given)


def _cmd_train(args: argparse.Namespace) -> int:
    from lunaseg.train import train

    cache = args.cache or Path(args.data) / "cache"
    out = args.out
    if out is None:
        out = Path(args.resume).parent if args.resume else Path("runs") / "seg"
    result = train(_train_config(args), cache, out, tb_dir=args.tb_dir,
                   resume=args.resume, compile_model=args.compile, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, from rank 0
        _print_train_result(result)
    return 130 if result.interrupted else 0


def _print_train_result(result) -> None:
    from lunaseg import layout

    if result.best:
        print(f"best validation (epoch {result.best['epoch']}): recall "
              f"{result.best['pr/recall']:.3f}, precision {result.best['pr/precision']:.3f}, "
              f"F1 {result.best['pr/f1_score']:.3f}")
    print(f"checkpoints: {result.checkpoint}"
          + (f", {result.best_checkpoint}" if result.best_checkpoint else ""))
    print(f"tensorboard: tensorboard --logdir {result.tb_dir}")
    print(f"overlays:    {result.out_dir / layout.OVERLAYS_DIR}")


def _classifier_config(args: argparse.Namespace) -> ClassifierTrainConfig:
    if args.no_augment:
        augment = CropAugmentConfig.off()
    else:
        augment = CropAugmentConfig(flip=args.aug_flip, offset=args.aug_offset,
                                    scale=args.aug_scale, rotate=args.aug_rotate,
                                    noise_hu=args.aug_noise)
    model = ClassifierConfig(conv_channels=args.conv_channels, depth=args.depth,
                             crop_irc=_ints(args.crop, 3, "--crop"))
    data = ClassifierDataConfig(val_stride=args.val_stride, test_stride=args.test_stride,
                                negatives_per_positive=args.negatives_per_positive,
                                epoch_samples=args.epoch_samples, lookalikes=args.lookalikes,
                                segmentation_negatives=args.segmentation_negatives,
                                segmentation_tta=args.segmentation_tta,
                                min_distance_diameters=args.min_distance_diameters)
    return ClassifierTrainConfig(model=model, data=data, augment=augment,
                                 task="malignancy" if args.malignancy else "nodule",
                                 finetune_depth=args.finetune_depth, epochs=args.epochs,
                                 batch_size=args.batch_size, optimizer=args.optimizer,
                                 lr=args.lr, momentum=args.momentum,
                                 validation_cadence=args.validation_cadence, seed=args.seed,
                                 amp=args.amp, device=args.device, comment=args.comment)


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from lunaseg.train_classifier import train_classifier

    if args.malignancy and args.init_from is None and args.resume is None:
        raise ConfigError("--malignancy fine-tunes a nodule classifier: give --from CKPT")
    if args.init_from is not None and not args.malignancy:
        raise ConfigError("--from CKPT is for --malignancy fine-tuning")
    cache = args.cache or Path(args.data) / "cache"
    out = args.out
    if out is None:
        out = Path(args.resume).parent if args.resume else Path("runs") / (
            "malignancy" if args.malignancy else "cls")
    result = train_classifier(_classifier_config(args), cache, out, data_dir=args.data,
                              seg_model=args.seg_model, seg_run=args.seg_run,
                              init_from=args.init_from, resume=args.resume, tb_dir=args.tb_dir,
                              progress=not args.quiet)
    if result.best:
        b = result.best
        print(f"best validation (epoch {b['epoch']}): AUC {b['auc']:.3f}, correct "
              f"{b['correct/all']:.1f}% (positives {b['correct/pos']:.1f}%, negatives "
              f"{b['correct/neg']:.1f}%)")
    print(f"checkpoints: {result.checkpoint}"
          + (f", {result.best_checkpoint}" if result.best_checkpoint else ""))
    print(f"tensorboard: tensorboard --logdir {result.tb_dir}")
    return 130 if result.interrupted else 0


def _series(entries: Sequence[str] | None) -> list[str] | None:
    """``--series`` values: UIDs, or files listing them."""
    from lunaseg.luna import expand_series

    return None if entries is None else expand_series(entries)


def _segment_config(args: argparse.Namespace) -> SegmentConfig:
    return SegmentConfig(threshold=args.threshold, batch_size=args.batch_size,
                         erosion_iterations=args.erosion, min_voxels=args.min_voxels,
                         grouping=args.grouping, lung_mask=not args.no_lung_mask,
                         resample=not args.native_pixels,
                         overlays=args.overlays, write_volumes=not args.no_volumes,
                         amp=args.amp, tta=args.tta, tta_rule=args.tta_rule,
                         device=args.device)


def _cmd_segment(args: argparse.Namespace) -> int:
    from lunaseg import layout
    from lunaseg.segment import segment_inputs

    outputs = segment_inputs(args.inputs, args.model, args.out, _segment_config(args),
                             series_uids=_series(args.series), require_ct=not args.force,
                             overwrite=args.overwrite, progress=not args.quiet)
    for output in outputs:
        print(f"{output.series_uid}: {output.candidates} candidates -> {output.folder}")
    print(f"submission: {Path(args.out) / layout.SUBMISSION_FILE}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from lunaseg import layout
    from lunaseg.detect import detect_inputs

    outputs = detect_inputs(args.inputs, args.seg_model, args.cls_model, args.out,
                            _segment_config(args), malignancy=args.mal_model,
                            rank_by=args.rank_by,
                            series_uids=_series(args.series), require_ct=not args.force,
                            overwrite=args.overwrite, progress=not args.quiet)
    for output in outputs:
        line = (f"{output.series_uid}: {output.candidates} candidates, {output.nodules} "
                f"called nodules -> {output.folder}")
        if output.top is not None:
            x, y, z = output.top.center_xyz
            line += (f"\n  best: p(nodule) {output.top.p_nodule:.3f}"
                     + (f", p(malignant) {output.top.p_malignant:.3f}"
                        if output.top.p_malignant is not None else "")
                     + f", {output.top.diameter_mm:.1f} mm at xyz ({x:.1f}, {y:.1f}, {z:.1f})")
        print(line)
    print(f"submission: {Path(args.out) / layout.SUBMISSION_FILE}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lunaseg import pipeline

    if (args.classifier or args.malignancy) and (args.data is None or args.model is None):
        raise ConfigError("--classifier and --malignancy judge the candidates of --data DIR "
                          "--model CKPT")
    if args.malignancy and not args.classifier:
        raise ConfigError("--malignancy needs --classifier")
    if args.data is not None and args.candidates is not None:
        if args.model is not None:
            raise ConfigError("--model segments a --data folder; a --candidates CSV is "
                              "scored as it is")
        # A candidate list for a dataset on disk: its annotations, excluded findings and
        # every scan it holds (LUNA16 scores each one, with marks or without).
        from lunaseg.luna import EXCLUDED_FILE, annotation_file, find_series

        data = Path(args.data)
        annotations = args.annotations or annotation_file(data)
        if annotations is None:
            raise ConfigError(f"{data}: no annotations CSV; pass --annotations")
        excluded = args.excluded or (data / EXCLUDED_FILE if (data / EXCLUDED_FILE).exists()
                                     else None)
        series = _series(args.series) or sorted(find_series(data))
        report = pipeline.score_files(annotations, args.candidates, args.out,
                                      excluded=excluded, series=series,
                                      fp_budget=args.fp_budget)
        report.scans_from = "the series list" if args.series else f"{data}"
    elif args.data is not None:
        if args.model is None:
            raise ConfigError("evaluate --data needs --model CKPT (or --candidates CSV)")
        report = pipeline.evaluate_model(args.data, args.model, args.out,
                                         split=args.split,
                                         segment=_segment_config(args),
                                         fp_budget=args.fp_budget,
                                         series_uids=_series(args.series),
                                         require_ct=not args.force,
                                         progress=not args.quiet,
                                         classifier=args.classifier,
                                         malignancy=args.malignancy, rank_by=args.rank_by)
    else:
        if args.annotations is None or args.candidates is None:
            raise ConfigError("evaluate needs --annotations CSV and --candidates CSV "
                              "(or --data DIR --model CKPT)")
        if args.model is not None:
            raise ConfigError("--model segments a --data folder; a --candidates CSV is "
                              "scored as it is")
        from lunaseg.config import to_dict

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

    config = LidcConfig(min_readers=args.min_readers, subset=args.subset)
    summary = import_lidc(args.sources, args.out, config, progress=not args.quiet)
    print(f"import-lidc: {len(summary.imported)} scans, {summary.nodules} nodules into "
          f"{args.out}; {len(summary.failures)} failed")  # each failure was logged
    return 1 if summary.failures and not summary.imported else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lunaseg import pipeline

    settings = pipeline.DemoSettings.quick_check() if args.quick else pipeline.DemoSettings()
    if args.series is not None:
        settings.synth.series = args.series
    if args.shape is not None:
        settings.synth.shape_irc = _ints(args.shape, 3, "--shape")
    if args.budget_minutes is not None:
        settings.budget_minutes = args.budget_minutes
    if args.epochs is not None:  # the epochs asked for, not the budget's
        settings.train.epochs = args.epochs
        settings.budget_minutes = 0.0
    settings.cache.masks = args.masks
    if args.no_amp:
        for stage in (settings.train, settings.classifier, settings.malignancy):
            stage.amp = False
    if args.tta is not None:
        settings.segment.tta = args.tta
    settings.train.model.n_classes = args.classes
    out = args.out
    if out is None and args.classes != 1:  # never replace the 1-class demo's folder
        out = "lunaseg-demo-quick-3class" if args.quick else "lunaseg-demo-3class"
    result = pipeline.run_demo(out, settings=settings, progress=not args.quiet)
    print(result)
    return 0


# ----------------------------------------------------------------------------- parser


def _add_segment_options(parser: argparse.ArgumentParser) -> None:
    from lunaseg.inputs import GROUPINGS, TTA_RULES

    group = parser.add_argument_group("candidate extraction")
    _option(group, "--threshold", SegmentConfig, "threshold")
    _option(group, "--erosion", SegmentConfig, "erosion_iterations")
    _option(group, "--min-voxels", SegmentConfig, "min_voxels")
    _option(group, "--grouping", SegmentConfig, "grouping", type=str, choices=GROUPINGS)
    group.add_argument("--no-lung-mask", action="store_true",
                       help="keep candidates anywhere, not only those touching the lungs "
                            "(for an input that is not a whole chest)")
    group.add_argument("--native-pixels", action="store_true",
                       help="feed the network the scan's own pixels even where they differ "
                            "from those it was trained at (default: resample to them)")
    _option(group, "--tta", SegmentConfig, "tta", type=int, choices=(1, 2, 4))
    _option(group, "--tta-rule", SegmentConfig, "tta_rule", type=str, choices=TTA_RULES)
    out = parser.add_argument_group("outputs and speed")
    _option(out, "--overlays", SegmentConfig, "overlays")
    out.add_argument("--no-volumes", action="store_true",
                     help="skip probability.nii.gz and mask.nii.gz")
    _option(out, "--batch-size", SegmentConfig, "batch_size")
    _option(out, "--amp", SegmentConfig, "amp")
    _option(out, "--device", SegmentConfig, "device")
    out.add_argument("--force", action="store_true",
                     help="read inputs that do not look like CT (another DICOM modality, no "
                          "voxel of air)")


def _add_rank_by(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank-by", choices=("classifier", "combined"), default="classifier",
                        help="order of the judged candidates: the classifier's p(nodule), or "
                             "the sum of its log-odds and the candidate score (default "
                             "classifier)")


def _add_train_options(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--preset", choices=("lunaseg", "book"), default="lunaseg",
                    help="the settings every option below starts from: lunaseg's recipe "
                         "(the defaults shown) or the book's chapter-13 run (default lunaseg)")
    # Defaults are None here so that an option not given keeps the preset's value.
    for flag, name in _TRAIN_FIELDS.items():
        kwargs: dict[str, Any] = {"default": None}
        if name == "lr_schedule":
            kwargs["choices"] = ("constant", "cosine")
        if name == "best_by":
            kwargs["choices"] = ("candidates", "pixels")
        if name == "best_min_recall":
            kwargs["metavar"] = "RECALL"
        if name == "amp":
            kwargs["action"] = "store_true"
        _option(tr, "--" + flag.replace("_", "-"), TrainConfig, name, **kwargs)
    for flag, name in _DATA_FIELDS.items():
        kwargs = {"default": None}
        if name == "full_ct_validation":
            kwargs["action"] = "store_true"
        if name.endswith("fraction"):
            kwargs["metavar"] = "FRACTION"
        _option(tr, "--" + flag.replace("_", "-"), DataConfig, name, **kwargs)
    _option(tr, "--classes", ModelConfig, "n_classes", default=None, choices=(1, 3))
    augment = tr.add_argument_group("augmentation (default: lunaseg's: "
                                    + ", ".join(f"{f.name} {getattr(AugmentConfig(), f.name)}"
                                                for f in dataclasses.fields(AugmentConfig))
                                    + ")")
    augment.add_argument("--augmented", action="store_true",
                         help="the book's set: flips, offset 0.03, scale 0.2, rotation, noise "
                              "25 HU")
    for name, field_name in (("flip", "flip"), ("offset", "offset"), ("scale", "scale"),
                             ("rotate", "rotate"), ("noise", "noise_hu")):
        augment.add_argument(f"--augment-{name}", action="store_true",
                             help=f"{describe(AugmentConfig, field_name).split(' (default')[0]}"
                                  f", at the book's setting (with the others off)")
    augment.add_argument("--no-augment", action="store_true", help="no augmentation")


def build_parser() -> argparse.ArgumentParser:
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
    demo.add_argument("--out", default=None,
                      help="output folder (default ./lunaseg-demo; --quick: "
                           "./lunaseg-demo-quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a much smaller run (about a minute) to check the installation")
    demo.add_argument("--series", type=int, default=None,
                      help="number of phantoms (default 96; --quick: 6)")
    demo.add_argument("--shape", default=None,
                      help="phantom size I,R,C (default 64,256,256, --quick: 32,128,128; "
                           "64,512,512 has real CT's 0.8 mm pixels and takes about three "
                           "times as long)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="U-Net training epochs (default 30; --quick: 2); given, "
                           "--budget-minutes is off")
    demo.add_argument("--budget-minutes", type=float, default=None,
                      help="about how long the demo may take: on a machine slower than the "
                           "recipe's reference, a calibration of a few seconds scales every "
                           "training stage's epochs down to fit, at most by half (default 0: "
                           "the full recipe however long it takes)")
    demo.add_argument("--masks", choices=("heuristic", "outline"), default="heuristic",
                      help="train on the book's HU-heuristic masks (default) or on the "
                           "phantoms' true nodule voxels")
    demo.add_argument("--tta", type=int, choices=(1, 2, 4), default=None,
                      help="mirrored views averaged when segmenting (default 4)")
    demo.add_argument("--no-amp", action="store_true",
                      help="train in float32 (by default every training stage runs in bf16 "
                           "autocast where the device has bf16 units; segmenting is float32)")
    demo.add_argument("--classes", type=int, choices=(1, 3), default=1,
                      help="1: nodule or not (default); 3: background, benign, malignant "
                           "(chapter exercise 3), into ./lunaseg-demo-3class unless --out")
    demo.set_defaults(func=_cmd_demo)

    synth = commands.add_parser("synth", help="write a synthetic LUNA16-layout dataset")
    synth.add_argument("--out", required=True, help="dataset folder to create")
    _option(synth, "--series", SynthConfig, "series")
    _option(synth, "--seed", SynthConfig, "seed")
    _option(synth, "--shape", SynthConfig, "shape_irc")
    _option(synth, "--subsets", SynthConfig, "subsets")
    _option(synth, "--workers", SynthConfig, "workers")
    synth.set_defaults(func=_cmd_synth)

    prep = commands.add_parser("prepcache", help="cache what training and validation read "
                                                 "(and verify what is cached)")
    prep.add_argument("--data", required=True, help="LUNA16-layout folder (subset*/<uid>.mhd)")
    prep.add_argument("--cache", help="cache folder (default DATA/cache)")
    _option(prep, "--workers", CacheConfig, "workers")
    _option(prep, "--masks", CacheConfig, "masks", choices=("heuristic", "outline"))
    _option(prep, "--bound-by-diameter", MaskConfig, "bound_by_diameter")
    _option(prep, "--chunk", CacheConfig, "chunk_irc")
    prep.set_defaults(func=_cmd_prepcache)

    tr = commands.add_parser("train", help="train the U-Net (torchrun for several GPUs)")
    tr.add_argument("--data", required=True, help="dataset folder (its cache is DATA/cache)")
    tr.add_argument("--cache", help="cache folder (default DATA/cache)")
    tr.add_argument("--out", help="run folder: checkpoints, overlays, logs (default runs/seg; "
                               "with --resume, the checkpoint's folder)")
    tr.add_argument("--tb-dir", help="TensorBoard folder (default OUT/tensorboard)")
    tr.add_argument("--resume", help="checkpoint to continue from, with the run's own "
                                     "settings (only --epochs, --device and --out apply)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    _add_train_options(tr)
    tr.set_defaults(func=_cmd_train)

    tc = commands.add_parser("train-classifier", help="train the candidate classifier (nodule "
                                                      "or not), or fine-tune it for malignancy")
    tc.add_argument("--data", required=True, help="dataset folder (its cache is DATA/cache)")
    tc.add_argument("--cache", help="cache folder (default DATA/cache)")
    tc.add_argument("--out", help="run folder (default runs/cls, runs/malignancy; with "
                                  "--resume, the checkpoint's folder)")
    tc.add_argument("--tb-dir", help="TensorBoard folder (default OUT/tensorboard)")
    tc.add_argument("--seg-model", help="U-Net checkpoint whose candidates far from nodules "
                                        "become negatives (computed once, kept in OUT)")
    tc.add_argument("--seg-run", help="segmentation run folder whose splits.json to use "
                                      "(default: the --seg-model's folder, if it has one)")
    tc.add_argument("--malignancy", action="store_true",
                    help="fine-tune a nodule classifier (--from) into benign vs malignant")
    tc.add_argument("--from", dest="init_from", metavar="CKPT",
                    help="the nodule classifier --malignancy starts from")
    _option(tc, "--finetune-depth", ClassifierTrainConfig, "finetune_depth", choices=(1, 2))
    tc.add_argument("--resume", help="checkpoint to continue from, with the run's own settings "
                                     "(only --epochs and --device apply)")
    _option(tc, "--epochs", ClassifierTrainConfig, "epochs")
    _option(tc, "--batch-size", ClassifierTrainConfig, "batch_size")
    _option(tc, "--optimizer", ClassifierTrainConfig, "optimizer", choices=("adam", "sgd"))
    _option(tc, "--lr", ClassifierTrainConfig, "lr")
    _option(tc, "--momentum", ClassifierTrainConfig, "momentum")
    _option(tc, "--validation-cadence", ClassifierTrainConfig, "validation_cadence")
    data = tc.add_argument_group("samples")
    _option(data, "--negatives-per-positive", ClassifierDataConfig, "negatives_per_positive")
    _option(data, "--epoch-samples", ClassifierDataConfig, "epoch_samples")
    _option(data, "--lookalikes", ClassifierDataConfig, "lookalikes",
            action=argparse.BooleanOptionalAction, default=ClassifierDataConfig().lookalikes)
    _option(data, "--segmentation-negatives", ClassifierDataConfig, "segmentation_negatives")
    _option(data, "--segmentation-tta", ClassifierDataConfig, "segmentation_tta", type=int,
            choices=(1, 2, 4))
    _option(data, "--min-distance-diameters", ClassifierDataConfig, "min_distance_diameters")
    _option(data, "--val-stride", ClassifierDataConfig, "val_stride")
    _option(data, "--test-stride", ClassifierDataConfig, "test_stride")
    net = tc.add_argument_group("model (a new nodule classifier)")
    _option(net, "--crop", ClassifierConfig, "crop_irc")
    _option(net, "--conv-channels", ClassifierConfig, "conv_channels")
    _option(net, "--depth", ClassifierConfig, "depth")
    aug = tc.add_argument_group("augmentation (per sample, on the training device)")
    aug.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    for flag, name in (("--aug-flip", "flip"), ("--aug-rotate", "rotate")):
        _option(aug, flag, CropAugmentConfig, name, action=argparse.BooleanOptionalAction,
                default=getattr(CropAugmentConfig(), name))
    _option(aug, "--aug-offset", CropAugmentConfig, "offset")
    _option(aug, "--aug-scale", CropAugmentConfig, "scale")
    _option(aug, "--aug-noise", CropAugmentConfig, "noise_hu")
    _option(tc, "--comment", ClassifierTrainConfig, "comment")
    _option(tc, "--seed", ClassifierTrainConfig, "seed")
    _option(tc, "--amp", ClassifierTrainConfig, "amp")
    _option(tc, "--device", ClassifierTrainConfig, "device")
    tc.set_defaults(func=_cmd_train_classifier)

    seg = commands.add_parser("segment", help="nodule candidates, masks and a report per CT")
    seg.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image file (.mhd .mha .nii .nii.gz .nrrd), DICOM folder or LUNA16 root")
    seg.add_argument("--model", required=True, help="checkpoint (lunaseg's or the book's)")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace an earlier segment run in --out (refused otherwise)")
    seg.add_argument("--series", nargs="*", help="only these series of a LUNA16 root: UIDs, or "
                     "files listing them (one per line, as LUNA16's seriesuids.csv); put it "
                     "after the INPUTs")
    _add_segment_options(seg)
    seg.set_defaults(func=_cmd_segment)

    det = commands.add_parser("detect", help="the whole CAD: candidates judged by the nodule "
                              "classifier (and malignancy), a ranked list and a report per CT")
    det.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image file (.mhd .mha .nii .nii.gz .nrrd), DICOM folder or LUNA16 root")
    det.add_argument("--seg-model", required=True, help="segmentation checkpoint (lunaseg's "
                     "or the book's)")
    det.add_argument("--cls-model", required=True, help="nodule classifier checkpoint "
                     "(lunaseg's train-classifier, or the book's)")
    det.add_argument("--mal-model", help="malignancy checkpoint (train-classifier --malignancy)")
    _add_rank_by(det)
    det.add_argument("--out", required=True, help="output folder")
    det.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run in --out (refused otherwise)")
    det.add_argument("--series", nargs="*", help="only these series of a LUNA16 root (UIDs or "
                     "files listing them); put it after the INPUTs")
    _add_segment_options(det)
    det.set_defaults(func=_cmd_detect)

    from lunaseg.evaluate import CANDIDATE_FP_BUDGET

    ev = commands.add_parser("evaluate", help="LUNA16 FROC / CPM of candidate lists")
    ev.add_argument("--annotations", help="annotations.csv")
    ev.add_argument("--excluded", help="annotations_excluded.csv (irrelevant findings)")
    ev.add_argument("--candidates", help="submission CSV: seriesuid,coordX,coordY,coordZ,"
                                         "probability")
    ev.add_argument("--series", nargs="*", help="evaluate only these series: UIDs, or files "
                    "listing them (one per line, as LUNA16's seriesuids.csv)")
    ev.add_argument("--data", help="dataset folder: segment a split, then score it")
    ev.add_argument("--model", help="checkpoint for --data")
    ev.add_argument("--classifier", help="nodule classifier for --data: score the whole CAD "
                    "(and the candidate stage alone beside it)")
    ev.add_argument("--malignancy", help="malignancy model for --data --classifier")
    _add_rank_by(ev)
    ev.add_argument("--split", choices=("val", "test", "train", "all"), default="val",
                    help="the split of --data to segment (default val)")
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
    _option(lidc, "--min-readers", LidcConfig, "min_readers")
    _option(lidc, "--subset", LidcConfig, "subset")
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
    except (RuntimeError, ValueError) as error:
        # The last line of defence: what a library below (ITK, NumPy) raised without a
        # file to name reaches the user as one line too; --debug shows where.
        if args.debug:
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        print(f"lunaseg {args.command}: error: {lines[-1] if lines else type(error).__name__} "
              f"(rerun with --debug for the details)", file=sys.stderr)
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
