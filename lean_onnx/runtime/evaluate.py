"""`lean-onnx eval MODEL --data DATA --metric M`: the quality of a model (original or pruned) on a split.

Every metric is accumulated over the whole split, never averaged over images or batches:
global-accuracy is correct pixels / all pixels, miou comes from one confusion matrix, psnr from the
split's mean squared error. That is how the LEAN paper reports them, and it makes the value
independent of `--batch`. `evaluate()` is the library entry point (fine-tuning and the paper
reproduction call it); the metric functions are plain numpy.
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx

from ..errors import LeanOnnxError
from .bench import open_session, read_source

METRICS = ("top1", "global-accuracy", "miou", "psnr", "mse")
CLASS_METRICS = ("top1", "global-accuracy", "miou")
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
