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
    """{tensor: (kept original channel indices, which of them are alive, (weight or BN scale, bias or BN shift))}
    for every prunable conv with live channels whose statistics can be corrected; `base`: the graph the rewrite
    starts from (the original's structural copy)."""
    by_name = {(n.name or n.output[0]): n for n in base.node}
    producer = {o: n for n in base.node for o in n.output}
    readers: dict[str, int] = {}
    for node in base.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    targets = {}
    for layer in result.graph.layers:
        if not layer.prunable:
            continue
        keep = result.plan.keep(layer.output)
        kept = np.arange(layer.c_out) if keep is None else np.flatnonzero(keep)  # the pruned model's channels
        alive = ~result.plan.dead[layer.out_nodes[kept]]  # dead ones stay in the model, zeroed
        if not alive.any():
            continue
        if layer.bn_name is not None and layer.bn_name in by_name:
            bn = by_name[layer.bn_name]
            tensor, params = bn.output[0], (bn.input[1], bn.input[2])
        else:
            conv = producer[layer.output]
            if len(conv.input) < 3 or not conv.input[2]:
                continue  # no bias to carry the shift
            tensor, params = layer.output, (conv.input[1], conv.input[2])
        if all(readers.get(name) == 1 for name in params):  # a shared weight would change another reader
            targets[tensor] = (kept, alive, params)
    return targets


def _channel_stats(y):
    """Per-channel (axis 1) mean and standard deviation over every other axis, float64."""
    flat = y.detach().transpose(0, 1).reshape(y.shape[1], -1).double()
    return flat.mean(1), flat.std(1, unbiased=False)


def calibrate(pruner, result, inputs: np.ndarray, batch: int = 64):
    """(new PruneResult, info) with the statistics of `result`'s kept channels matched to the original's on
    `inputs` (an (N, ...) float array for the model's single input; at most `batch` of them are used, in one
    forward pass, so that the layer-by-layer correction sees one set of statistics)."""
    import torch

    from ..rewrite.pruner import replace_initializers
    from .bridge import to_torch

    start = time.perf_counter()
    inputs = np.asarray(inputs, dtype=np.float32)[:batch]
    if len(inputs) < 2:
        raise LeanOnnxError(f"{pruner.loaded.path}: calibration needs at least 2 inputs, got {len(inputs)}")
    base = pruner._base().graph  # one structural copy: names and (stubbed) initializers the rewrite starts from
    targets = _targets(base, result)
    original = to_torch(pruner.loaded.original, pruner.loaded.path)
    student = to_torch(result.model, pruner.loaded.path)
    if len(original.input_names) != 1:
        raise LeanOnnxError(f"{pruner.loaded.path}: calibration takes models with one input")
    reference = {}

    def collect(ctx, outputs, results):
        for name, value in zip(outputs, results):
            if name in targets:
                reference[name] = _channel_stats(value)
        return results

    corrections = {}

    def correct(ctx, outputs, results):
        results = list(results)
        for k, name in enumerate(outputs):
            if name not in targets or name not in reference:
                continue
            kept, alive, _ = targets[name]
            y = results[k]
            if y.shape[1] != kept.size:
                raise LeanOnnxError(f"{pruner.loaded.path}: {name!r}: {y.shape[1]} channels in the pruned model, "
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
    arrays = _corrected_initializers(pruner, base, targets, corrections)
    calibrated = replace_initializers(pruner, result, arrays)
    scales = np.concatenate([c[0][targets[n][1]] for n, c in corrections.items()]) if corrections else np.ones(0)
    info = {"samples": int(len(inputs)), "tensors": len(corrections), "channels": int(scales.size),
            "scale_median": float(np.median(scales)) if scales.size else 1.0,
            "scale_capped": int((scales >= MAX_SCALE).sum()),
            "seconds": time.perf_counter() - start}
    calibrated.report["calibration"] = info
    return calibrated, info


def _corrected_initializers(pruner, base: onnx.GraphProto, targets: dict, corrections: dict) -> dict[str, np.ndarray]:
    """{initializer name: corrected full-size array of the original} for every corrected weight/bias."""
    inits = {t.name: t for t in base.initializer}  # the names the rewrite starts from
    sources = source_tensors(pruner.loaded.original)  # large weights are stubs in the base: their values
    for name, tensor in inits.items():
        if is_stub(tensor) and name in sources:
            inits[name] = sources[name]
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
        kept, _, (mul, add) = targets[name]
        weight, bias = current(mul), current(add)
        if weight.shape[0] < kept.max() + 1 or bias.shape[0] < kept.max() + 1:
            raise LeanOnnxError(f"{pruner.loaded.path}: {mul!r}: unexpected shape for calibration")
        weight[kept] *= scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias[kept] = bias[kept] * scale + shift
    return {name: value.astype(dtypes[name]) for name, value in arrays.items()}
