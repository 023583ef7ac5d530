"""Label-free statistics calibration of a pruned model (`--calibrate-data`, docs/finetune.md).

Removing channels shifts the statistics of every later layer: a kept channel's pre-activation loses the
inputs that went, its mean and spread move, and in a trained network whose BatchNormalization was fitted
to the old statistics, the shift compounds layer after layer until the output is unrelated to the
original's (top-1 agreement 0 on MobileNetV2 at half the MACs, for every pruner). Re-estimating the
normalisation statistics of the pruned network ("adaptive BN", Li et al., EagleEye, ECCV 2020) repairs
most of that without labels or training. On a deployed ONNX model BatchNormalization is usually folded into
the conv, so the same is done on the conv's output: for every kept channel c of every prunable conv (at
its BatchNormalization's output where one follows it unfolded), with m, s its mean and standard deviation
over the calibration inputs (batch and space) in the pruned model, and m0, s0 the same channel's in the
original on the same inputs,

    y_c  ->  (y_c - m) * s0 / s + m0        i.e. kernel and bias (or BN scale and shift) scaled by s0 / s,
                                            and m0 - m * s0 / s added to the bias (shift)

layer by layer in topological order within one forward pass (each conv sees the corrected outputs of the
convs before it). Channels without a kept input (dead: the masked model defines them as zero) and channels
that are (nearly) constant on the data are left as they are; the scale is capped at MAX_SCALE.

The corrected values are written into the *original's* weights at the kept channels' positions, and the
pruned and the masked model are both rewritten from them with the same selection and plan, so the pruned
model still equals the masked model (DESIGN.md section 2): the masked model is then the calibrated original
with the pruned kernels zeroed.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import LeanOnnxError
from ..io.external_data import is_stub, source_tensors

#: a channel whose standard deviation in the pruned model is below this fraction of the original's is
#: treated as constant (not scaled)
MIN_RELATIVE_STD = 1e-3
#: the largest factor a channel's spread is scaled by
MAX_SCALE = 10.0


def _targets(base: onnx.GraphProto, result) -> dict[str, tuple]:
    """{tensor: (kept original channel indices, which of them are alive, (weight or BN scale, bias or BN shift),
    the weight's output-channel axis)} for every prunable conv with live channels whose statistics can be
    corrected; `base`: the graph the rewrite starts from (the original's structural copy)."""
    found = {}
    for layer in result.graph.layers:
        if not layer.prunable:
            continue
        keep = result.plan.keep(layer.output)
        kept = np.arange(layer.c_out) if keep is None else np.flatnonzero(keep)  # the pruned model's channels
        alive = ~result.plan.dead[layer.out_nodes[kept]]  # dead ones stay in the model, zeroed
        if alive.any():
            found[layer.output] = (kept, alive)
    return _correctable(base, found, {layer.output: layer.bn_name for layer in result.graph.layers})


def _correctable(graph: onnx.GraphProto, found: dict, bn_names: dict | None = None) -> dict[str, tuple]:
    """`found` ({conv output: (kept, alive)}) with what carries each one's correction in `graph`: its
    BatchNormalization's scale and shift where one follows unfolded (`bn_names` {conv output: BN node name},
    else the conv output's only reader when that is a BatchNormalization), else the conv's weight and bias;
    left out: convs without a bias, grouped ConvTranspose, and parameters another node reads too."""
    by_name = {(n.name or n.output[0]): n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    targets = {}
    for output, (kept, alive) in found.items():
        conv = producer.get(output)
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose"):
            continue
        bn = by_name.get(bn_names.get(output)) if bn_names is not None else None
        only = readers.get(output, [])
        if bn_names is None and len(only) == 1 and only[0].op_type == "BatchNormalization":
            bn = only[0]
        axis = 0
        if bn is not None:
            tensor, params = bn.output[0], (bn.input[1], bn.input[2])
        elif len(conv.input) < 3 or not conv.input[2]:
            continue  # no bias to carry the shift
        else:
            group = next((a.i for a in conv.attribute if a.name == "group"), 1)
            if conv.op_type == "ConvTranspose" and group != 1:
                continue  # its output channels are split over the weight's first two axes
            tensor, params, axis = output, (conv.input[1], conv.input[2]), int(conv.op_type == "ConvTranspose")
        if all(len(readers.get(name, [])) == 1 for name in params):  # a shared weight would change another reader
            targets[tensor] = (kept, alive, params, axis)
    return targets


def _channel_stats(y):
    """Per-channel (axis 1) mean and standard deviation over every other axis, float64."""
    flat = y.detach().transpose(0, 1).reshape(y.shape[1], -1).double()
    return flat.mean(1), flat.std(1, unbiased=False)


def calibrate(pruner, result, inputs: np.ndarray, batch: int = 64):
    """(new PruneResult, info) with the statistics of `result`'s kept channels matched to the original's on
    `inputs` (an (N, ...) float array for the model's single input; at most `batch` of them are used, in one
    forward pass, so that the layer-by-layer correction sees one set of statistics)."""
    from ..rewrite.pruner import replace_initializers

    start = time.perf_counter()
    inputs = _inputs(inputs, batch, pruner.loaded.path)
    base = pruner._base().graph  # one structural copy: names and (stubbed) initializers the rewrite starts from
    targets = _targets(base, result)
    corrections = _match(pruner.loaded.original, result.model, targets, inputs, pruner.loaded.path)
    arrays = _corrected_initializers(pruner, base, targets, corrections)
    calibrated = replace_initializers(pruner, result, arrays)
    info = _info(inputs, targets, corrections, start)
    calibrated.report["calibration"] = info
    return calibrated, info


def calibrate_to_teacher(student: onnx.ModelProto, teacher: onnx.ModelProto, inputs: np.ndarray, batch: int = 64,
                         path: str = "<model>", teacher_path: str = "<teacher>"):
    """(calibrated copy of `student`, info): as `calibrate`, for a pruned model on its own, its channels
    matched to the `teacher`'s (the original it was pruned from) through the kept-channel record in its
    metadata (rewrite/channel_map.py). `finetune --teacher` does this before training. Raises LeanOnnxError
    when the student has no record or the teacher's channels are not those the record refers to."""
    from ..rewrite.channel_map import required

    start = time.perf_counter()
    inputs = _inputs(inputs, batch, path)
    kept = required(student, path)
    counts = {name: count for name, (count, _) in kept.items()}
    targets = _correctable(student.graph, {name: (indices, np.ones(indices.size, dtype=bool))
                                           for name, (_, indices) in kept.items()})
    corrections = _match(teacher, student, targets, inputs, path, counts, teacher_path)
    if not corrections:
        raise LeanOnnxError(f"{path}: none of its recorded channels is computed by the teacher {teacher_path}")
    model = copy.deepcopy(student)
    inits = {t.name: t for t in model.graph.initializer}
    for name, (scale, shift) in corrections.items():
        _, _, (mul, add), axis = targets[name]
        for name in (mul, add):
            if name not in inits or inits[name].data_location == onnx.TensorProto.EXTERNAL:
                raise LeanOnnxError(f"{path}: {name!r}: calibration needs the weight in the model file (not a "
                                    "constant computed at run time or stored as external data)")
        weight, bias = numpy_helper.to_array(inits[mul]), numpy_helper.to_array(inits[add])
        shape = [1] * weight.ndim
        shape[axis] = -1
        new_weight = weight.astype(np.float64) * scale.reshape(shape)
        new_bias = bias.astype(np.float64) * scale + shift
        inits[mul].CopyFrom(numpy_helper.from_array(new_weight.astype(weight.dtype), mul))
        inits[add].CopyFrom(numpy_helper.from_array(new_bias.astype(bias.dtype), add))
    return model, _info(inputs, targets, corrections, start)


def _inputs(inputs, batch: int, path: str) -> np.ndarray:
    inputs = np.asarray(inputs, dtype=np.float32)[:batch]
    if len(inputs) < 2:
        raise LeanOnnxError(f"{path}: calibration needs at least 2 inputs, got {len(inputs)}")
    return inputs


def _info(inputs, targets: dict, corrections: dict, start: float) -> dict:
    scales = np.concatenate([c[0][targets[n][1]] for n, c in corrections.items()]) if corrections else np.ones(0)
    return {"method": "statistics", "samples": int(len(inputs)), "tensors": len(corrections),
            "channels": int(scales.size),
            "scale_median": float(np.median(scales)) if scales.size else 1.0,
            "scale_capped": int((scales >= MAX_SCALE).sum()),
            "seconds": time.perf_counter() - start}


def _match(reference_model, student_model, targets: dict, inputs: np.ndarray, path: str, counts: dict | None = None,
           reference_path: str = "<original>") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (scale, shift) per student channel}: one forward pass of the reference model collects every
    target tensor's channel statistics, then one of the student corrects its targets' outputs in topological
    order (each later layer sees the corrected ones). `counts` {tensor: channels}: what the reference must
    have (a model that differs is refused by name)."""
    import torch

    from .bridge import to_torch

    original = to_torch(reference_model, reference_path)
    student = to_torch(student_model, path)
    if len(original.input_names) != 1:
        raise LeanOnnxError(f"{path}: calibration takes models with one input")
    reference = {}

    def collect(ctx, outputs, results):
        for name, value in zip(outputs, results):
            if name in targets:
                if counts is not None and value.shape[1] != counts.get(name, value.shape[1]):
                    raise LeanOnnxError(f"{reference_path}: {name!r} has {value.shape[1]} channels, the kept-channel "
                                        f"record of {path} says {counts[name]}: not the model it was pruned from")
                reference[name] = _channel_stats(value)
        return results

    corrections = {}

    def correct(ctx, outputs, results):
        results = list(results)
        for k, name in enumerate(outputs):
            if name not in targets or name not in reference:
                continue
            kept, alive, _, _ = targets[name]
            y = results[k]
            if y.shape[1] != kept.size:
                raise LeanOnnxError(f"{path}: {name!r}: {y.shape[1]} channels in the pruned model, "
                                    f"{kept.size} kept in the plan")
            m, s = _channel_stats(y)
            m0, s0 = (v[torch.from_numpy(kept)] for v in reference[name])
            usable = (s > MIN_RELATIVE_STD * s0) & torch.from_numpy(alive)
            scale = torch.where(usable, (s0 / s.clamp_min(1e-30)).clamp(max=MAX_SCALE), torch.ones_like(s))
            shift = torch.where(usable, m0 - m * scale, torch.zeros_like(m))
            shape = (1, -1) + (1,) * (y.dim() - 2)
            results[k] = y * scale.to(y.dtype).view(shape) + shift.to(y.dtype).view(shape)
            corrections[name] = (scale.numpy(), shift.numpy())
        return results

    with torch.no_grad():
        x = torch.from_numpy(inputs)
        original.node_hook = collect
        original(x)
        student.node_hook = correct
        student(x)
    return corrections


def original_tensors(pruner, base: onnx.GraphProto | None = None) -> dict[str, onnx.TensorProto]:
    """{initializer name: tensor} of the graph the rewrite starts from (`base`, or a fresh one), the large
    weights that are stubs there taken from their source (they may still be stored as external data)."""
    inits = {t.name: t for t in (base if base is not None else pruner._base().graph).initializer}
    sources = source_tensors(pruner.loaded.original)
    for name, tensor in inits.items():
        if is_stub(tensor) and name in sources:
            inits[name] = sources[name]
    return inits


def _corrected_initializers(pruner, base: onnx.GraphProto, targets: dict, corrections: dict) -> dict[str, np.ndarray]:
    """{initializer name: corrected full-size array of the original} for every corrected weight/bias."""
    inits = original_tensors(pruner, base)
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}

    def current(name):
        if name not in arrays:
            if name not in inits or inits[name].data_location == onnx.TensorProto.EXTERNAL:
                raise LeanOnnxError(f"{pruner.loaded.path}: {name!r}: calibration needs the weight in the model "
                                    "file (not a constant computed at run time or stored as external data)")
            value = numpy_helper.to_array(inits[name])
            arrays[name], dtypes[name] = value.astype(np.float64), value.dtype
        return arrays[name]

    for name, (scale, shift) in corrections.items():
        kept, _, (mul, add), axis = targets[name]
        weight, bias = current(mul), current(add)
        if weight.shape[axis] < kept.max() + 1 or bias.shape[0] < kept.max() + 1:
            raise LeanOnnxError(f"{pruner.loaded.path}: {mul!r}: unexpected shape for calibration")
        view = np.moveaxis(weight, axis, 0)  # the output channels first (axis 1 of a ConvTranspose's weight)
        view[kept] *= scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias[kept] = bias[kept] * scale + shift
    return {name: value.astype(dtypes[name]) for name, value in arrays.items()}
