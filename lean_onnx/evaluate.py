"""`lean-onnx eval MODEL --data DATA --metric M`: the quality of a model (original or pruned) on a split.

Every metric is accumulated over the whole split, never averaged over images or batches:
global-accuracy is correct pixels / all pixels, miou comes from one confusion matrix, psnr from the
split's mean squared error. That is how the LEAN paper reports them, and it makes the value
independent of `--batch`. `evaluate()` is the library entry point (fine-tuning and the paper
reproduction call it); the metric functions are plain numpy.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import onnx

from .bench import open_session, read_source
from .errors import LeanOnnxError

METRICS = ("top1", "global-accuracy", "miou", "psnr", "mse")
CLASS_METRICS = ("top1", "global-accuracy", "miou")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_BATCH = 8


# ------------------------------------------------------------------------------ metrics (numpy)


def top1(logits: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of items whose argmax over axis 1 equals the integer target."""
    return float(np.mean(_class_predictions(logits, targets) == targets))


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class.
    Target values outside [0, num_classes) (e.g. 255 = void) are left out."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    valid = (target >= 0) & (target < num_classes)
    index = target[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def global_accuracy(confusion: np.ndarray) -> float:
    """Correct pixels / all (non-void) pixels of the split."""
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def miou(confusion: np.ndarray) -> float:
    """Mean over the classes present (in target or prediction) of intersection / union."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    present = union > 0
    return float(np.mean(intersection[present] / union[present])) if present.any() else float("nan")


def mse(output: np.ndarray, target: np.ndarray) -> float:
    diff = np.asarray(output, np.float64) - np.asarray(target, np.float64)
    return float(np.mean(diff * diff))


def psnr(output: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """10 log10(data_range^2 / mse); inf when output == target."""
    return psnr_from_mse(mse(output, target), data_range)


def psnr_from_mse(mse_value: float, data_range: float = 1.0) -> float:
    return 10.0 * math.log10(data_range ** 2 / mse_value) if mse_value > 0 else float("inf")


def _class_predictions(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """argmax over axis 1, shaped like `targets` (trailing size-1 dims of the logits dropped)."""
    logits = np.asarray(logits)
    if logits.ndim < 2:
        raise LeanOnnxError(f"model output has shape {logits.shape}; class metrics need (N, classes, ...)")
    pred = logits.argmax(axis=1)
    if pred.size == targets.size and pred.shape != targets.shape and targets.ndim == 1:
        pred = pred.reshape(targets.shape)
    if pred.shape != targets.shape:
        raise LeanOnnxError(f"model output {logits.shape} gives predictions of shape {pred.shape}, but the "
                            f"targets have shape {targets.shape}")
    return pred


class Accumulator:
    """Streams batches of (model output, targets) into one split-level metric value."""

    def __init__(self, metric: str, data_range: float = 1.0):
        if metric not in METRICS:
            raise LeanOnnxError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
        self.metric, self.data_range = metric, data_range
        self.correct = self.items = 0
        self.confusion: np.ndarray | None = None
        self.squared_error, self.elements = 0.0, 0

    def update(self, output: np.ndarray, targets: np.ndarray) -> None:
        if self.metric == "top1":
            if targets.ndim != 1:
                raise LeanOnnxError(f"top1 needs one class label per item; targets have shape {targets.shape}")
            self.correct += int(np.sum(_class_predictions(output, targets) == targets))
            self.items += len(targets)
        elif self.metric in CLASS_METRICS:
            num_classes = output.shape[1] if output.ndim >= 2 else 0
            batch = confusion_matrix(_class_predictions(output, targets), targets, num_classes)
            self.confusion = batch if self.confusion is None else self.confusion + batch
        else:
            if output.shape != targets.shape:
                raise LeanOnnxError(f"{self.metric}: model output {output.shape} and targets {targets.shape} "
                                    "differ in shape")
            diff = output.astype(np.float64) - targets.astype(np.float64)
            self.squared_error += float(np.sum(diff * diff))
            self.elements += diff.size

    def value(self) -> float:
        if self.metric == "top1":
            return self.correct / self.items if self.items else float("nan")
        if self.metric == "global-accuracy":
            return global_accuracy(self.confusion) if self.confusion is not None else float("nan")
        if self.metric == "miou":
            return miou(self.confusion) if self.confusion is not None else float("nan")
        mse_value = self.squared_error / self.elements if self.elements else float("nan")
        return mse_value if self.metric == "mse" else psnr_from_mse(mse_value, self.data_range)


# ---------------------------------------------------------------------------------- evaluation


def evaluate(model, inputs: np.ndarray, targets: np.ndarray, metric: str, batch: int = DEFAULT_BATCH, *,
             provider: str = "auto", threads: int = 0, data_range: float = 1.0, progress=None) -> dict:
    """Run `model` (path, ModelProto or bytes) over `inputs` in batches along dim 0 and score its first
    output against `targets`. A model whose batch dim is fixed at k gets exactly k items per run (the
    last batch padded by repeating its final item; the padding is not scored). Returns {model, metric,
    value, count, provider, seconds, warnings}. `progress(done, total)` is called after each batch."""
    accumulator = Accumulator(metric, data_range)
    inputs, targets = np.asarray(inputs), _targets_for(metric, np.asarray(targets))
    if batch < 1:
        raise LeanOnnxError(f"--batch {batch}: expected a positive integer")
    if inputs.ndim < 1 or len(inputs) == 0 or len(inputs) != len(targets):
        raise LeanOnnxError(f"inputs {inputs.shape} and targets {targets.shape}: expected the same number "
                            "(> 0) of items along dim 0")
    source = read_source(model)
    name, dims, dtype = _single_input(source.proto, source.label)
    _check_item_shape(inputs, name, dims, source.label)
    fixed_batch = dims[0] if dims and isinstance(dims[0], int) else None
    step = fixed_batch or batch
    session = open_session(source, provider, threads)
    output_name = session.ort_session.get_outputs()[0].name
    start = time.perf_counter()
    for lo in range(0, len(inputs), step):
        chunk = inputs[lo:lo + step].astype(dtype, copy=False)
        real = len(chunk)
        if fixed_batch and real < fixed_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - real, axis=0)])
        try:
            output = session.ort_session.run([output_name], {name: chunk})[0][:real]
        except Exception as exc:
            raise LeanOnnxError(f"{source.label}: inference failed on items {lo}..{lo + real - 1} "
                                f"({str(exc).strip().splitlines()[0][:300]})") from None
        accumulator.update(output, targets[lo:lo + real])
        if progress:
            progress(lo + real, len(inputs))
    return {"model": source.label, "metric": metric, "value": accumulator.value(), "count": int(len(inputs)),
            "provider": session.provider, "seconds": time.perf_counter() - start, "warnings": session.warnings}


def _targets_for(metric: str, targets: np.ndarray) -> np.ndarray:
    """Class metrics need integer labels (floats holding whole numbers are accepted)."""
    if metric not in CLASS_METRICS or targets.dtype.kind in "iu":
        return targets
    if targets.dtype.kind == "f" and np.all(np.isfinite(targets)) and np.all(targets == np.round(targets)):
        return targets.astype(np.int64)
    raise LeanOnnxError(f"--metric {metric} needs integer class labels as targets; got dtype {targets.dtype}")


def _single_input(proto: onnx.ModelProto, label: str) -> tuple[str, list, np.dtype]:
    """The model's one data input: its name, dims (int when fixed, else None) and numpy dtype."""
    inits = {t.name for t in proto.graph.initializer}
    real = [i for i in proto.graph.input if i.name not in inits]
    if len(real) != 1:
        raise LeanOnnxError(f"{label}: eval needs a model with one input; it has {[i.name for i in real]}")
    tensor = real[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
    return real[0].name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))


def _check_item_shape(inputs: np.ndarray, name: str, dims: list, label: str) -> None:
    item = inputs.shape[1:]
    if dims and (len(item) != len(dims) - 1 or any(d is not None and d != s for d, s in zip(dims[1:], item))):
        model_shape = "x".join("?" if d is None else str(d) for d in dims)
        raise LeanOnnxError(f"{label}: data items have shape {'x'.join(map(str, item))} but input {name!r} "
                            f"is {model_shape}")


# ------------------------------------------------------------------------------------- data


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`inputs` (N, C, H, W) and `targets` (N,) labels, (N, H, W) label maps or images like the output."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("inputs", "targets") if k not in data.files]
            if missing:
                raise LeanOnnxError(f"{path}: no array named {' or '.join(map(repr, missing))} "
                                    f"(arrays: {', '.join(data.files) or 'none'})")
            return data["inputs"], data["targets"]
    except LeanOnnxError:
        raise
    except Exception as exc:
        raise LeanOnnxError(f"{path}: not a readable .npz file ({str(exc).strip().splitlines()[0][:200]})") from None


def load_image_folder(path: str, resize: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DATA/<class name>/*.png|jpg|jpeg; class index = position of the folder in sorted order; images as
    float32 in [0, 1], CHW (grayscale gets C = 1, an alpha channel is dropped), resized only on request."""
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    files = [(os.path.join(path, c, f), k) for k, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise LeanOnnxError(f"{path}: no images in class folders (expected {path}/<class>/*.png|jpg)")
    images = [_read_image(f, resize) for f, _ in files]
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise LeanOnnxError(f"{path}: images differ in shape ({', '.join(sorted(map(str, shapes)))[:200]}); "
                            "use --resize HxW")
    return np.stack(images), np.array([k for _, k in files], dtype=np.int64)


def _read_image(path: str, resize: tuple[int, int] | None) -> np.ndarray:
    try:
        from skimage import io, transform, util
    except ImportError:
        raise LeanOnnxError("image folders need scikit-image (pip install scikit-image)") from None
    try:
        image = util.img_as_float32(io.imread(path))
    except Exception as exc:
        raise LeanOnnxError(f"{path}: not a readable image ({str(exc).strip().splitlines()[0][:200]})") from None
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if resize:
        image = transform.resize(image, resize, order=1, anti_aliasing=True, preserve_range=True)
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def normalise(inputs: np.ndarray, mean: list[float] | None, std: list[float] | None) -> np.ndarray:
    """(x - mean[c]) / std[c] along axis 1; one value applies to every channel."""
    if mean is None and std is None:
        return inputs
    channels = inputs.shape[1] if inputs.ndim >= 2 else 1
    shape = (1, -1) + (1,) * max(inputs.ndim - 2, 0)
    values = []
    for flag, given, default in (("--mean", mean, 0.0), ("--std", std, 1.0)):
        given = given if given is not None else [default]
        if len(given) not in (1, channels):
            raise LeanOnnxError(f"{flag}: {len(given)} values for {channels} channels (give 1 or {channels})")
        values.append(np.asarray(given, np.float32).reshape(shape))
    if np.any(values[1] == 0):
        raise LeanOnnxError("--std: values must be non-zero")
    return ((inputs.astype(np.float32) - values[0]) / values[1]).astype(np.float32)


def load_data(path: str, resize=None, mean=None, std=None) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.exists(path):
        raise LeanOnnxError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        inputs, targets = load_image_folder(path, resize)
    else:
        inputs, targets = load_npz(path)
    return normalise(inputs, mean, std), targets


# ------------------------------------------------------------------------------------------ CLI

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
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only warnings and errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
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
