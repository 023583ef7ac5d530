"""`lean-onnx finetune IN OUT --data train.npz`: fine-tune in torch, pruned kernels held at zero;
`--teacher ORIGINAL.onnx --data photos/`: recover by distillation from the original, no labels needed
(train/finetune.py, train/distill.py and train/images.py do the work; torch is imported only when the
command runs)."""

from __future__ import annotations

import argparse
import json
import os
import time

from ..errors import LeanOnnxError
from ..train.finetune import LOSSES
from ..train.images import IMAGENET_MEAN, IMAGENET_STD
from .messages import info, warn
from .options import add_calibrate_method, calibration_line, check_distill_options

MAX_SKIPPED_LINES = 20  # one [W] line per skipped file up to this many, then one line for the rest


def register(sub) -> None:
    """Add `finetune` to the lean-onnx subcommands."""
    p = sub.add_parser("finetune", help="fine-tune IN on data (Adam, cross-entropy/MSE) and write OUT; "
                                        "pruned kernels stay zero")
    p.add_argument("model", metavar="IN", help="input .onnx file (never modified)")
    p.add_argument("output", metavar="OUT", help="fine-tuned .onnx file (written atomically; same interface)")
    p.add_argument("--data", required=True, metavar="NPZ|DIR",
                   help="training data: .npz with inputs and targets (targets optional with --teacher), or a "
                        "folder of images (jpg/jpeg/png/bmp, searched recursively; needs --teacher)")
    p.add_argument("--val-data", metavar="NPZ|DIR", help="validation data, evaluated on full inputs after each "
                                                         "epoch (an image folder: resized and centre-cropped)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data (default 3, as the "
                                                         "paper's schedule per pruning step)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3; 1e-4 with --teacher: "
                                                          "a trained network recovers; 5e-5 after the default "
                                                          "reconstruction, docs/finetune.md)")
    p.add_argument("--batch", type=int, default=5, help="batch size (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of the shuffles/crops (default 0)")
    p.add_argument("--crop", type=int, default=0, metavar="PIXELS",
                   help="train on random PIXELS x PIXELS crops (dense targets; 0 = full inputs, the default)")
    p.add_argument("--loss", choices=LOSSES, default="auto",
                   help="ce: cross-entropy on logits (integer targets), mse: float targets; auto (default) "
                        "picks by the targets' dtype")
    d = p.add_argument_group("distillation (label-free recovery from the original model)")
    d.add_argument("--teacher", metavar="ORIGINAL.onnx",
                   help="learn this model's outputs (the model IN was pruned from: same input and output names); "
                        "it is never changed")
    d.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature of the KL loss on (N, classes) outputs (default 1: on a trained "
                        "MobileNetV2 at half the MACs it recovered the original's top-1 faster than 2 or 4, "
                        "docs/finetune.md; T > 1 softens the teacher, the loss is scaled by T^2). Other outputs "
                        "use a scale-normalised MSE")
    d.add_argument("--alpha", type=float, metavar="A",
                   help="with targets in the data: A * labelled loss + (1 - A) * distillation (default 0: "
                        "distillation only); needs --teacher")
    d.add_argument("--detector-loss", choices=("split", "whole"), default="split",
                   help="an output that joins boxes and sigmoid class scores (YOLOv8's Concat(boxes, "
                        "Sigmoid(classes))): split (default) distils the scores by a Bernoulli KL and the boxes "
                        "weighted by the teacher's scores (docs/finetune.md); whole: one scale-normalised MSE")
    d.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="with --teacher, before training: bring IN back towards the teacher on the first "
                        "--calibrate-samples training inputs, as --calibrate-method says (IN's kept-channel record, "
                        "written by lean-onnx when it pruned, docs/finetune.md; default on; skipped with a [W] "
                        "line when IN has no record)")
    add_calibrate_method(d, "the teacher's")
    d.add_argument("--calibrate-samples", type=int, default=64, metavar="N",
                   help="training inputs used for --calibrate, in one batch (default 64)")
    g = p.add_argument_group("image folders (--data / --val-data DIR)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random resized crops (area 0.25..1, aspect 3/4..4/3) and horizontal flips of the training "
                        "images (default: on for an image folder); --no-augment: resize and centre crop as for "
                        "validation")
    g.add_argument("--input-size", metavar="H,W",
                   help="the images' size (default: the model input's static height and width)")
    g.add_argument("--mean", metavar="R,G,B", help="subtracted from pixels in 0..1, RGB order (default ImageNet's "
                                                   + ",".join(map(str, IMAGENET_MEAN)) + ")")
    g.add_argument("--std", metavar="R,G,B", help="then divided by, RGB order (default ImageNet's "
                                                  + ",".join(map(str, IMAGENET_STD)) + ")")
    g.add_argument("--channel-order", choices=("rgb", "bgr"),
                   help="channel order the model expects (default rgb); the layout (NCHW or NHWC) is read from "
                        "the input shape, 1-channel models get grayscale")
    g.add_argument("--samples-per-epoch", type=int, metavar="N",
                   help="training crops per epoch (default: the number of images), so a few photos can give many "
                        "crops")
    p.add_argument("--train-zero-kernels", action="store_true",
                   help="let exactly-zero kernels train (default: they are pruned and stay zero)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when torch sees a GPU, else CPU), "
                                                    "cpu, cuda or cuda:N")
    p.add_argument("--report", metavar="PATH", help="write per-epoch metrics as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="no extra detail yet (every lean-onnx command takes -v)")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from ..graph.load import read_model
    from ..io.save import save_model_atomic
    from ..train.distributed import World, process_group
    from ..train.finetune import finetune, resolve_device

    lr_given = args.lr is not None
    check_distill_options(args)
    _check_args(args)
    model = read_model(args.model)
    teacher = _read_teacher(args, model)
    train = _load(args.data, "--data", model, args, training=True)
    val = _load(args.val_data, "--val-data", model, args, training=False) if args.val_data else None
    try:
        import torch
    except ImportError:
        raise LeanOnnxError("torch is required for finetune (pip install 'lean-onnx[train]')") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    say = info  # silent with -q, and on every rank but 0 under torchrun (cli/main.py)
    for flag, data in (("--data", train), ("--val-data", val)):
        if data is not None and not isinstance(data, dict):
            say(_describe(flag, data))
    samples = len(train["inputs"]) if isinstance(train, dict) else len(train)
    calibration = None
    if teacher is not None and args.calibrate:
        model, calibration = _calibrate(model, teacher, train, args, say)
        if calibration is not None and calibration["method"] == "reconstruct" and not lr_given:
            from ..train.distill import RECONSTRUCTED_LR

            args.lr = RECONSTRUCTED_LR
    say(f"fine-tuning {args.model} on {samples} samples for {args.epochs} epoch(s)")
    started = time.perf_counter()
    with process_group(World.from_env(), resolve_device(args.device)) as (world, device):
        trained, history = finetune(model, train, val, epochs=args.epochs, lr=args.lr, batch=args.batch,
                                    seed=args.seed, crop=args.crop or None, loss=args.loss,
                                    keep_zero_kernels=not args.train_zero_kernels, progress=say, path=args.model,
                                    device=device, teacher=teacher, teacher_path=args.teacher,
                                    temperature=args.temperature, alpha=args.alpha, world=world,
                                    split_scores=args.detector_loss == "split")
    if not world.main:  # the other ranks hold the same model; rank 0 writes it
        return 0
    save_model_atomic(trained, args.output)
    say(f"wrote {args.output}")
    if args.report:
        settings = {k: getattr(args, k) for k in ("epochs", "lr", "batch", "seed", "crop", "loss",
                                                  "train_zero_kernels", "device", "teacher", "detector_loss")}
        settings.update(_distill_settings(args, train, val, samples))
        settings.update(world_size=world.size, backend=world.backend, device_used=device,
                        calibrate=bool(teacher is not None and args.calibrate),
                        calibrate_method=args.calibrate_method)
        report = {"schema_version": 1, "command": "finetune", "input": args.model, "output": args.output,
                  "data": args.data, "val_data": args.val_data, "settings": settings,
                  "skipped": {flag: [{"file": name, "reason": why} for name, why in data.skipped]
                              for flag, data in (("data", train), ("val_data", val))
                              if data is not None and not isinstance(data, dict)},
                  "calibration": calibration, "epochs": history, "seconds": time.perf_counter() - started}
        save_model_atomic((json.dumps(report, indent=1) + "\n").encode(), args.report)
    return 0


def _calibrate(model, teacher, train, args, say):
    """(IN brought towards the teacher on the first training inputs, its summary), or (IN, None) with a [W]
    line when that cannot be done (train/reconstruct.py `reconstruct_to_teacher`, train/calibrate.py
    `calibrate_to_teacher`)."""
    import numpy as np

    from ..train.calibrate import calibrate_to_teacher
    from ..train.reconstruct import reconstruct_to_teacher

    if isinstance(train, dict):
        inputs = train["inputs"][:args.calibrate_samples]
    else:  # an image folder: the first crops of the first epoch, as training would draw them
        rng = np.random.default_rng(args.seed)
        inputs = train.batch(train.order(rng)[:args.calibrate_samples], rng)[0]
    try:
        if args.calibrate_method == "reconstruct":
            model, summary = reconstruct_to_teacher(model, teacher, inputs, path=args.model, teacher_path=args.teacher)
        else:
            model, summary = calibrate_to_teacher(model, teacher, inputs, len(inputs), args.model, args.teacher)
    except LeanOnnxError as exc:
        warn(f"not calibrated: {exc}")
        return model, None
    say(calibration_line(summary, "the teacher's", "training inputs"))
    return model, summary


def _read_teacher(args, model):
    """The --teacher model, checked against IN's interface; None without --teacher."""
    from ..graph.load import read_model
    from ..train.distill import check_interface

    if not args.teacher:
        return None
    try:
        teacher = read_model(args.teacher)
    except LeanOnnxError as exc:
        raise LeanOnnxError(f"--teacher {exc}") from None
    check_interface(model, teacher, args.model, args.teacher)
    return teacher


def _load(path: str, flag: str, model, args, training: bool):
    """An .npz (a dict of arrays) or an image folder (images.ImageFolder); skipped files are [W] lines."""
    from ..train.finetune import load_data
    from ..train.images import load_image_folder

    if not os.path.isdir(path):
        if training and (args.augment or args.samples_per_epoch is not None):
            raise LeanOnnxError(f"{path}: --augment and --samples-per-epoch apply to an image folder as --data "
                                "(.npz data: --crop)")
        return load_data(path, flag, need_targets=not args.teacher or bool(args.alpha))
    if not args.teacher:
        raise LeanOnnxError(f"{path}: {flag} is an image folder: photos carry no labels, so training on them needs "
                            "--teacher ORIGINAL.onnx (distillation)")
    if args.alpha:
        raise LeanOnnxError(f"{path}: {flag} is an image folder, which has no targets for --alpha {args.alpha:g}")
    folder = load_image_folder(path, model, args.model, flag, input_size=args.size, mean=args.mean_values,
                               std=args.std_values, channel_order=args.channel_order or "rgb",
                               augment=training and args.augment is not False,
                               samples_per_epoch=args.samples_per_epoch if training else None)
    for name, why in folder.skipped[:MAX_SKIPPED_LINES]:  # [W] lines: rank 0's only under torchrun
        warn(f"{os.path.join(path, name)}: {why}; skipped")
    if len(folder.skipped) > MAX_SKIPPED_LINES:
        warn(f"{path}: {len(folder.skipped) - MAX_SKIPPED_LINES} more files skipped (see --report)")
    return folder


def _describe(flag: str, folder) -> str:
    colour = folder.channel_order if folder.channels == 3 else "gray"
    line = (f"{flag} {folder.folder}: {len(folder.images)} images ({len(folder.skipped)} skipped) as "
            f"{folder.size[0]}x{folder.size[1]} {folder.layout} {colour}")
    if flag == "--data":
        line += f", {len(folder)} {'augmented ' if folder.augment else ''}samples per epoch"
    return line


def _distill_settings(args, train, val, samples: int) -> dict:
    """The report's distillation and image settings (None where they do not apply)."""
    folder = next((d for d in (train, val) if d is not None and not isinstance(d, dict)), None)
    return {"temperature": args.temperature if args.teacher else None,
            "alpha": (args.alpha or 0.0) if args.teacher else None,
            "augment": train.augment if not isinstance(train, dict) else None,
            "input_size": list(folder.size) if folder else None,
            "layout": folder.layout if folder else None,
            "mean": [float(m) for m in folder.mean] if folder else None,
            "std": [float(s) for s in folder.std] if folder else None,
            "channel_order": (folder.channel_order if folder.channels == 3 else "gray") if folder else None,
            "samples_per_epoch": samples}


def _check_args(args) -> None:
    """Refuse before any work (training can take hours): bad numbers, OUT equal to IN or to the teacher,
    no output folder, image options without an image folder."""
    from ..train.images import check_normalisation, parse_floats, parse_size

    if args.epochs < 0 or args.batch < 1 or args.lr <= 0 or args.crop < 0:
        raise LeanOnnxError("--epochs must be >= 0, --batch >= 1, --lr > 0 and --crop >= 0")
    if args.calibrate_samples < 2:
        raise LeanOnnxError(f"--calibrate-samples {args.calibrate_samples}: expected at least 2")
    if args.samples_per_epoch is not None and args.samples_per_epoch < 1:
        raise LeanOnnxError(f"--samples-per-epoch {args.samples_per_epoch}: expected a positive integer")
    args.size = parse_size(args.input_size) if args.input_size is not None else None
    args.mean_values = parse_floats("--mean", args.mean) if args.mean is not None else IMAGENET_MEAN
    args.std_values = parse_floats("--std", args.std) if args.std is not None else IMAGENET_STD
    check_normalisation(args.mean_values, args.std_values)
    image_flags = [flag for flag, value in (("--input-size", args.input_size), ("--mean", args.mean),
                                            ("--std", args.std), ("--channel-order", args.channel_order))
                   if value is not None]
    if image_flags and not any(path and os.path.isdir(path) for path in (args.data, args.val_data)):
        raise LeanOnnxError(f"{' and '.join(image_flags)} appl{'ies' if len(image_flags) == 1 else 'y'} to image "
                            "folders; --data and --val-data are not folders")
    for flag, path in (("OUT", args.output), ("--report", args.report)):
        if not path:
            continue
        for what, source in (("the input file", args.model), ("the --teacher file", args.teacher)):
            if source and os.path.realpath(path) == os.path.realpath(source):
                raise LeanOnnxError(f"{path}: {flag} is {what}; lean-onnx never overwrites its input")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise LeanOnnxError(f"{path}: output folder {folder} does not exist or is not writable")
