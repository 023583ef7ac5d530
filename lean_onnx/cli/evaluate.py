"""`lean-onnx eval MODEL --data DATA --metric M`: task metrics over a whole split (runtime/evaluate.py)."""

from __future__ import annotations

import json
import math
import os
import sys

from ..errors import LeanOnnxError
from ..runtime.evaluate import DEFAULT_BATCH, METRICS
from .options import common_args

DATA_HELP = """\
DATA is either
  an .npz file with arrays `inputs` (N, C, H, W) and `targets`: (N,) integer class labels for top1,
  (N, H, W) integer label maps for global-accuracy/miou, or arrays shaped like the model output for
  psnr/mse; inputs are used as stored (then --mean/--std if given);
or a folder DATA/<class name>/*.png|jpg|jpeg (top1 only): the class index is the folder's position in
  sorted name order; images are read as float32 in [0, 1] and laid out CHW (grayscale: C = 1, alpha
  dropped), resized only with --resize, then normalised with --mean/--std if given.
Metrics are computed over the whole split: top1 = argmax over axis 1 of the first output == label;
global-accuracy = correct pixels / all pixels; miou = mean over the classes present (in target or
prediction) of intersection / union from one confusion matrix (target values outside [0, classes),
e.g. 255, are ignored by both); mse = mean squared error; psnr = 10 log10(data_range^2 / mse)."""


def register(sub) -> None:
    import argparse

    p = sub.add_parser("eval", help="score a model on a data split (top1, global-accuracy, miou, psnr, mse)",
                       description="Run MODEL over DATA and print one metric value.", epilog=DATA_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=".onnx file (one input; its first output is scored)")
    p.add_argument("--data", required=True, metavar="DATA", help=".npz file or image folder (see below)")
    p.add_argument("--metric", required=True, choices=METRICS, help="what to compute (see below)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N",
                   help=f"items per run (default {DEFAULT_BATCH}); a model with a fixed batch dim uses that")
    p.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto = CUDA when the session really gets it, else CPU (default)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="intra-op threads (default 0 = ONNX Runtime's choice)")
    p.add_argument("--data-range", type=float, default=1.0, metavar="R",
                   help="peak-to-peak range of the targets for psnr (default 1.0: images in [0, 1])")
    p.add_argument("--resize", metavar="HxW", help="image folders only: resize every image to H x W")
    p.add_argument("--mean", metavar="M[,M...]", help="subtract per channel (one value or one per channel)")
    p.add_argument("--std", metavar="S[,S...]", help="then divide per channel (one value or one per channel)")
    common_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..runtime.datasets import load_data
    from ..runtime.evaluate import evaluate

    resize = _parse_resize(args.resize)
    if resize and not os.path.isdir(args.data):
        raise LeanOnnxError(f"--resize applies to image folders only; {args.data} is not a folder")
    if os.path.isdir(args.data) and args.metric != "top1":
        raise LeanOnnxError(f"{args.data}: an image folder gives one class label per image: only --metric top1")
    inputs, targets = load_data(args.data, resize, _floats("--mean", args.mean), _floats("--std", args.std))
    show = not args.quiet and sys.stderr.isatty()
    result = evaluate(args.model, inputs, targets, args.metric, args.batch, provider=args.provider,
                      threads=args.threads, data_range=args.data_range, progress=_progress if show else None)
    if show:
        print(file=sys.stderr)
    for w in result.pop("warnings"):
        print(f"[W] {w}", file=sys.stderr)
    result["data"] = args.data
    if args.json:
        value = result["value"]
        print(json.dumps({**result, "value": value if math.isfinite(value) else str(value)}, indent=1))
    else:
        _print_table(result)
    return 0


def _progress(done: int, total: int) -> None:
    print(f"\r[I] eval {done}/{total} items ({100 * done // total} %)", end="", file=sys.stderr, flush=True)


def _print_table(result: dict) -> None:
    rows = (("model", result["model"]), ("data", f"{result['data']} ({result['count']} items)"),
            (result["metric"], f"{result['value']:.6g}"), ("provider", result["provider"]),
            ("seconds", f"{result['seconds']:.3f}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def _parse_resize(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    parts = spec.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise LeanOnnxError(f"--resize {spec!r}: expected HxW with positive integers, e.g. 224x224")
    return int(parts[0]), int(parts[1])


def _floats(flag: str, spec: str | None) -> list[float] | None:
    if spec is None:
        return None
    try:
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise LeanOnnxError(f"{flag} {spec!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None
