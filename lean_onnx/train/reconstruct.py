"""Label-free layer-wise reconstruction of a pruned model to the original it was pruned from (the default start
of `finetune --teacher`, docs/finetune.md).

Statistics calibration (calibrate.py) moves each kept channel's mean and spread back to the original's. That
repairs the per-channel drift, not what was lost: a kept channel's pre-activation misses the terms of the
input channels that went, and only a change of the kernels on the kept inputs can take them over. The
classic remedy of channel pruning (He et al., "Channel pruning for accelerating very deep neural networks",
ICCV 2017; Luo et al., ThiNet, ICCV 2017) is a least-squares refit of each layer to the original's output,
which needs inputs but no labels. Here it is done for every conv of the pruned model, in topological order
within one forward pass, so that each conv is fitted to the inputs the pruned model really gives it (the
convs before it already refitted) and the errors do not add up layer after layer:

    for a conv with kept output channels O, weight W and bias b, X its input patches in the pruned model and
    Y the original's same conv output at the channels O, on the same inputs (every sample and position):

        [W b]  <-  argmin  || X W + b - Y ||^2  +  lam || [W b] - [W0 b0] ||^2 ,   lam = RIDGE x mean diag(X'X)

solved in closed form (float64 normal equations, per group for grouped and depthwise convs). The ridge term
pulls towards the pruned model's own weights W0, so a conv whose output is already the original's keeps its
weights, dead channels (an all-zero input) keep theirs, and a layer with fewer samples than unknowns does not
overfit the calibration inputs. The original's channels O of a conv output come from the kept-channel record
in the pruned model's metadata (rewrite/channel_map.py); a conv output the record does not name (a head conv
whose outputs are not pruned) is compared channel for channel when the two models give it the same shape.

Gemm (the classifier) is refit the same way, the samples being its rows. Exactly-zero kernels stay zero and
dead channels dead, as fine-tuning holds them: an output channel with pruned kernels is solved on its live
unknowns alone. Left as they are: ConvTranspose, 1-D and 3-D convs, weights that are not float parameters of
their own, and outputs the teacher does not compute with the same shape. The structure is not changed (a conv
without a bias is refit without one), so the model keeps its shapes and MACs. At prune time (`reconstruct`)
the refit values go back into the original's layout, so that the pruned model still equals the masked one.
Measured (docs/results.md): on the trained MobileNetV2 at half the MACs, top-1 agreement with the original on
new crops 0.000 pruned, 0.042 calibrated, 0.729 reconstructed, before any training; on YOLOv8n at half the
MACs, the output's mean relative error 0.137 pruned, 0.064 reconstructed.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import onnx

from ..errors import LeanOnnxError

#: ridge strength, relative to the mean squared input patch value (the mean diagonal of X'X)
RIDGE = 0.1
#: the ops refitted
FITTED = ("Conv", "Gemm")
#: samples per block of the normal equations' accumulation (bounds the memory of the patch matrices)
CHUNK = 8


def reconstruct_to_teacher(student: onnx.ModelProto, teacher: onnx.ModelProto, inputs: np.ndarray,
                           ridge: float = RIDGE, path: str = "<model>", teacher_path: str = "<teacher>",
                           kept: dict | None = None):
    """(reconstructed copy of `student`, info): every 2-D conv's kernels and bias refit to the `teacher`'s
    output (the original the student was pruned from) on `inputs` (an (N, ...) float array for the single
    input, N >= 2, all in one pass). `info`: the convs and Gemms refit (`convs`) and those left as they are
    (`left`: a form the fit does not take), the median relative squared error of their outputs to the
    teacher's before and after their refit, the seconds. Raises LeanOnnxError when the student has no
    kept-channel record or the teacher is not the model it refers to. `kept` ({tensor: (the teacher's channel
    count, kept indices)}): instead of the student's record (prune time: the plan's, relative to the pruner's
    input, where the record refers to the first original)."""
    import torch

    from ..rewrite.channel_map import required
    from .bridge import export_onnx, to_torch

    start = time.perf_counter()
    inputs = np.asarray(inputs, dtype=np.float32)
    if len(inputs) < 2:
        raise LeanOnnxError(f"{path}: reconstruction needs at least 2 inputs, got {len(inputs)}")
    kept = required(student, path) if kept is None else kept
    original, pruned = to_torch(teacher, teacher_path), to_torch(student, path)
    if len(pruned.input_names) != 1:
        raise LeanOnnxError(f"{path}: reconstruction takes models with one input")
    convs = {id(ctx): keys for ctx, keys, _ in pruned._nodes if ctx.op_type in FITTED}
    wanted = {outputs[0] for ctx, _, outputs in pruned._nodes if ctx.op_type in FITTED}
    reference = {}

    def collect(ctx, outputs, results):
        for name, value in zip(outputs, results):
            if name in wanted:
                if name in kept and value.shape[1] != kept[name][0]:
                    raise LeanOnnxError(f"{teacher_path}: {name!r} has {value.shape[1]} channels, the kept-channel "
                                        f"record of {path} says {kept[name][0]}: not the model it was pruned from")
                reference[name] = value
        return results

    x = torch.from_numpy(inputs)
    with torch.no_grad():
        original.node_hook = collect
        original(x)
    if not reference:
        raise LeanOnnxError(f"{path}: none of its convs' outputs is computed by the teacher {teacher_path}")
    values = {pruned.input_names[0]: x}
    errors, left = [], 0

    def refit(ctx, outputs, results):
        nonlocal left
        results = list(results)
        keys = convs.get(id(ctx))
        if keys is not None:
            fitted = _refit(pruned, ctx, keys, values, reference.pop(outputs[0], None), kept.get(outputs[0]),
                            results[0], ridge)
            if fitted is None:
                left += 1
            else:
                results[0] = fitted[0]
                errors.append(fitted[1:])
        values.update((name, value) for name, value in zip(outputs, results) if name)
        return results

    with torch.no_grad():
        pruned.node_hook = refit
        pruned(x)
    pruned.node_hook = None
    model = export_onnx(pruned, student)
    before, after = (np.array([e[i] for e in errors]) for i in (0, 1))
    info = {"method": "reconstruct", "samples": int(len(inputs)), "convs": len(errors), "left": left,
            "ridge": ridge, "error_before_median": float(np.median(before)) if errors else 0.0,
            "error_after_median": float(np.median(after)) if errors else 0.0,
            "seconds": time.perf_counter() - start}
    return model, info


def _refit(module, ctx, keys, values, target, record, output, ridge):
    """(new output, relative error before, after) of one conv after refitting its weight and bias in
    `module`, or None when it is left as it is."""
    import torch

    from .ops import OPS

    if target is None or len(keys) < 2 or keys[1] is None or keys[1][0] != "param" or keys[0][0] != "value":
        return None
    weight = getattr(module, keys[1][1])
    bias = getattr(module, keys[2][1]) if len(keys) > 2 and keys[2] is not None else None
    if ctx.op_type == "Gemm":
        return _refit_gemm(ctx, values[keys[0][1]], weight, bias, target, output, ridge)
    if weight.dim() != 4 or (bias is not None and not isinstance(bias, torch.nn.Parameter)):
        return None
    if record is not None:
        target = target[:, torch.from_numpy(record[1])]
    if target.shape != output.shape:
        return None
    before = _error(output, target)
    x = values[keys[0][1]]
    new_weight, new_bias = _solve(ctx, x, weight.detach(), None if bias is None else bias.detach(), target, ridge)
    weight.copy_(new_weight.to(weight.dtype))
    if bias is not None:
        bias.copy_(new_bias.to(bias.dtype))
    result = OPS["Conv"](ctx, x, weight, bias) if bias is not None else OPS["Conv"](ctx, x, weight)
    return result, before, _error(result, target)


def _error(output, target) -> float:
    """Mean squared difference relative to the target's variance (the `error_*_median` of the summary)."""
    return float(((output.double() - target.double()) ** 2).mean() / target.double().var().clamp_min(1e-30))


def _patches(ctx, x, weight):
    """(N, C_in x kh x kw, positions): the input patches each output position of the conv reads."""
    import torch

    from .ops.conv import _conv_geometry, _pad_input

    _, strides, dilations, pads = _conv_geometry(ctx, x, list(weight.shape[2:]))
    x, padding = _pad_input(x, pads, 0.0)
    return torch.nn.functional.unfold(x, weight.shape[2:], dilation=dilations, padding=padding, stride=strides)


def _solve(ctx, x, weight, bias, target, ridge):
    """(weight, bias) minimising the ridge objective of the module docstring, per group; zero kernels stay
    zero (`_live`)."""
    import torch

    groups = ctx.get("group", 1)
    c_out, c_in_g = weight.shape[:2]
    per_group, taps = c_out // groups, c_in_g * weight.shape[2] * weight.shape[3]
    size = taps + (bias is not None)
    gram = torch.zeros(groups, size, size, dtype=torch.float64)
    cross = torch.zeros(groups, size, per_group, dtype=torch.float64)
    for i in range(0, len(x), CHUNK):
        cols = _patches(ctx, x[i:i + CHUNK], weight).double()  # (n, groups x taps, positions)
        n, _, positions = cols.shape
        cols = cols.view(n, groups, taps, positions)
        if bias is not None:
            cols = torch.cat([cols, torch.ones(n, groups, 1, positions, dtype=cols.dtype)], 2)
        y = target[i:i + CHUNK].reshape(n, groups, per_group, positions).double()
        gram += torch.einsum("ngkl,ngjl->gkj", cols, cols)
        cross += torch.einsum("ngkl,ngol->gko", cols, y)
    start = weight.double().reshape(groups, per_group, taps).transpose(1, 2)  # (groups, taps, per_group)
    if bias is not None:
        start = torch.cat([start, bias.double().reshape(groups, 1, per_group)], 1)
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)
    rows = float(len(x) * positions)
    lam = (ridge * diagonal[:, :taps].mean(1)).clamp_min(1e-6 * rows)  # > 0 also for an all-zero input
    eye = torch.eye(size, dtype=torch.float64)
    system, rhs = gram + lam[:, None, None] * eye, cross + lam[:, None, None] * start
    solution = torch.linalg.solve(system, rhs)
    live = _live(weight, bias).reshape(groups, per_group, size)  # (groups, per_group, unknowns)
    for g, o in torch.nonzero(~live.all(-1)).tolist():  # outputs with pruned kernels: solved on their live ones
        keep = live[g, o]
        solution[g, :, o] = 0.0
        if keep.any():
            solution[g, keep, o] = torch.linalg.solve(system[g][keep][:, keep], rhs[g, keep, o])
    new_weight = solution[:, :taps].transpose(1, 2).reshape(weight.shape)
    new_bias = solution[:, taps].reshape(c_out) if bias is not None else None
    return new_weight, new_bias


def _live(weight, bias):
    """(C_out, unknowns) bool: the unknowns of each output channel that may move. A kernel that is exactly
    zero (pruned, DESIGN.md section 2) stays zero, and so does the bias of an output channel whose kernels and
    bias are all zero (a dead channel), as fine-tuning holds them (bridge.zero_kernel_masks)."""
    import torch

    c_out = weight.shape[0]
    alive = weight.flatten(2).ne(0).any(-1)  # (C_out, C_in / group)
    live = alive[:, :, None].expand(-1, -1, weight.shape[2] * weight.shape[3]).reshape(c_out, -1)
    if bias is not None:
        live = torch.cat([live, (alive.any(1) | bias.ne(0))[:, None]], 1)
    return live


def _refit_gemm(ctx, x, weight, bias, target, output, ridge):
    """Gemm (A x B + C, alpha = beta = 1, A not transposed, C a (M,) parameter or absent) refit like a 1x1
    conv: the samples are the rows."""
    import torch

    from .ops import OPS

    if (ctx.get("transA", 0) or ctx.get("alpha", 1.0) != 1.0 or ctx.get("beta", 1.0) != 1.0 or weight.dim() != 2
            or x.dim() != 2 or target.shape != output.shape
            or (bias is not None and (not isinstance(bias, torch.nn.Parameter) or bias.shape != output.shape[1:]))):
        return None
    before = _error(output, target)
    rows = x.double()
    if bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    w = weight.detach().double()
    start = w.T if ctx.get("transB", 0) else w  # (K, M)
    if bias is not None:
        start = torch.cat([start, bias.detach().double()[None]], 0)
    gram, cross = rows.T @ rows, rows.T @ target.double()
    lam = max(ridge * float(torch.diagonal(gram)[:w.shape[1] if ctx.get("transB", 0) else w.shape[0]].mean()),
              1e-6 * len(rows))
    solution = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), cross + lam * start)
    taps = len(solution) - (bias is not None)
    weight.copy_((solution[:taps].T if ctx.get("transB", 0) else solution[:taps]).to(weight.dtype))
    if bias is not None:
        bias.copy_(solution[taps].to(bias.dtype))
    result = OPS["Gemm"](ctx, x, weight, bias) if bias is not None else OPS["Gemm"](ctx, x, weight)
    return result, before, _error(result, target)


def reconstruct(pruner, result, inputs: np.ndarray, ridge: float = RIDGE):
    """(new PruneResult, info) at prune time (`--calibrate-data`, `--calibrate-method reconstruct`): `result`'s
    pruned model reconstructed to the original on `inputs`; the refit values are written back into the
    original's layout (where each pruned value came from: the rewrite run on index
    arrays, Pruner.slice_like) and both models are rewritten from them (rewrite/pruner.replace_initializers),
    so the pruned model still equals the masked one (DESIGN.md section 2), now the refit original with the
    pruned kernels zeroed. A weight the rewrite copied for several readers is refit in none of them."""
    from onnx import numpy_helper

    from ..rewrite.channel_map import kept_channels
    from ..rewrite.pruner import replace_initializers

    path = pruner.loaded.path
    kept = kept_channels(pruner.graph, result.plan, result.model.graph)  # relative to the pruner's input
    model, info = reconstruct_to_teacher(result.model, pruner.loaded.original, inputs, ridge, path, path, kept)
    before = {t.name: t for t in result.model.graph.initializer}
    deltas = {}
    for tensor in model.graph.initializer:
        new, old = numpy_helper.to_array(tensor), numpy_helper.to_array(before[tensor.name])
        if not np.array_equal(new, old):
            deltas[tensor.name] = new.astype(np.float64) - old.astype(np.float64)
    originals = _original_arrays(pruner, set(deltas) | {name.partition("__")[0] for name in deltas})
    source = {name: name if name in originals else name.partition("__")[0] for name in deltas}
    readers = Counter(source.values())
    shared = {s for s in readers if readers[s] > 1 or s not in originals
              or originals[s].dtype not in (np.float32, np.float64)}  # the index halves are exact in these
    deltas = {name: d for name, d in deltas.items() if source[name] not in shared}
    where = _positions(pruner, result, {source[name]: originals[source[name]].shape for name in deltas})
    arrays = {source[name]: originals[source[name]].astype(np.float64) for name in deltas}
    for name, delta in deltas.items():
        at = where[name]
        if (delta[at < 0] != 0).any():
            raise LeanOnnxError(f"{path}: {name!r}: a refit value has no place in the original (please report)")
        arrays[source[name]].reshape(-1)[at[at >= 0]] += delta[at >= 0]
    arrays = {name: value.astype(originals[name].dtype) for name, value in arrays.items()}
    rebuilt = replace_initializers(pruner, result, arrays) if arrays else result
    info["shared_left"] = len(shared)
    rebuilt.report["calibration"] = info
    return rebuilt, info


def _original_arrays(pruner, names) -> dict[str, np.ndarray]:
    """{name: array} of those of the original's initializers `names` whose values are in the model file."""
    from onnx import numpy_helper

    from ..io.external_data import is_stub
    from .calibrate import original_tensors

    tensors = original_tensors(pruner)
    return {name: numpy_helper.to_array(tensors[name]) for name in names if name in tensors
            and tensors[name].data_location != onnx.TensorProto.EXTERNAL and not is_stub(tensors[name])}


def _positions(pruner, result, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """{pruned initializer name: int64 array of its shape}: the flat index in the original's initializer each
    value was cut from, -1 where the rewrite made it (a zero kernel): the rewrite run on the indices, in two
    float32-exact halves."""
    halves = [pruner.slice_like(result, {name: ((np.arange(int(np.prod(shape))) // 4096 if high else
                                                 np.arange(int(np.prod(shape))) % 4096) + 1).reshape(shape)
                                         .astype(np.float32) for name, shape in shapes.items()})
              for high in (True, False)]
    return {name: np.where((high > 0) & (low > 0), (high.astype(np.int64) - 1) * 4096 + low.astype(np.int64) - 1, -1)
            for name, high in halves[0].items() for low in [halves[1][name]]}
