"""Torch implementations of the ONNX ops the fine-tuning bridge (`bridge.py`) executes.

`OPS[op_type](ctx, *inputs)` computes one node: `ctx` is the node's `NodeContext` (attributes with
strings decoded, the model's opset, the module's training flag), `inputs` are torch tensors in the
node's input order (None for an omitted optional input). The list of ops and their limits is in
docs/finetune.md.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .errors import LeanOnnxError

__all__ = ["NodeContext", "SliceConcat", "OPS", "conv_taps_first"]
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


class NodeContext:
    """A node's attributes (strings decoded), the model's opset and the module's training flag."""

    def __init__(self, node: onnx.NodeProto, opset: int):
        self.op_type, self.name, self.opset = node.op_type, node.name or node.output[0], opset
        self.n_outputs = len(node.output)
        self.training = False
        self.attrs = {}
        for a in node.attribute:
            value = onnx.helper.get_attribute_value(a)
            self.attrs[a.name] = value.decode() if isinstance(value, bytes) else value

    run = None  # set by fused nodes (SliceConcat): computes the node instead of OPS[op_type]

    def get(self, name: str, default=None):
        return self.attrs.get(name, default)


class SliceConcat(NodeContext):
    """A Concat whose inputs are one tensor x and slices of x along the concat axis (chains of constant
    Slice nodes): symmetric or reflect padding as torch exports it (MS-D: Slice, a flipping Slice,
    Concat). The forward is the same slices and torch.cat; the backward is written out: x's gradient
    starts as a copy of the part of the output gradient that is x itself, and each slice's gradient is
    index-added into it. Autograd would fill a zero tensor of x's size for every Slice and add them all
    up: the same sum in another order (bit-identical when every element of x appears at most twice, as
    in padding narrower than half the input). `chains[i]`: the (start, end, axis, step) slices from x
    to the concat's input i, in order ([] for x itself). Where the axes differ at run time (negative
    axes of another rank) it runs the slices and torch.cat under plain autograd."""

    def __init__(self, node: onnx.NodeProto, opset: int, chains: list[list[tuple[int, int, int, int]]]):
        super().__init__(node, opset)
        self.chains = chains
        self._index: dict = {}
        self.run = self._run

    def _run(self, ctx, x):
        axis = self.get("axis") % x.dim()
        if not all(s[2] % x.dim() == axis for chain in self.chains for s in chain):
            return torch.cat([_chain(x, chain) for chain in self.chains], axis)
        key = (x.shape[axis], x.device)
        if key not in self._index:
            whole = torch.arange(x.shape[axis], device=x.device)
            self._index[key] = [None if not chain else _chain(whole, chain, 0) for chain in self.chains]
        return _SliceConcatFn.apply(x, axis, self.chains, self._index[key])


class _SliceConcatFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, chains, index):
        ctx.axis, ctx.index, ctx.length = axis, index, x.shape[axis]
        return torch.cat([_chain(x, chain, axis) for chain in chains], axis)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.split([ctx.length if i is None else len(i) for i in ctx.index], ctx.axis)
        whole = [p for p, i in zip(parts, ctx.index) if i is None]
        if whole:  # a fresh tensor: grad's parts are views of a tensor autograd may still use
            result = whole[0].clone(memory_format=torch.contiguous_format)
        else:
            result = grad.new_zeros(grad.shape[:ctx.axis] + (ctx.length,) + grad.shape[ctx.axis + 1:])
        for p, i in zip(parts, ctx.index):
            if i is not None:
                result.index_add_(ctx.axis, i, p)
        for p in whole[1:]:
            result += p
        return result, None, None, None


def _chain(x, chain, axis=None):
    for start, end, a, step in chain:
        x = _slice_axis(x, a % x.dim() if axis is None else axis, start, end, step)
    return x


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _unsupported(ctx: NodeContext, what: str):
    raise LeanOnnxError(f"node {ctx.name!r} ({ctx.op_type}): {what} is not supported by the fine-tuning bridge")


def _auto_pads(ctx, spatial, kernel, strides) -> list[int]:
    """ONNX pads [begin..., end...] from `pads` or `auto_pad` (SAME_UPPER/SAME_LOWER/VALID)."""
    mode, nd = ctx.get("auto_pad", "NOTSET"), len(spatial)
    if mode in ("NOTSET", ""):
        return list(ctx.get("pads", [0] * 2 * nd))
    if mode == "VALID":
        return [0] * 2 * nd
    total = [max(0, (-(-n // s) - 1) * s + k - n) for n, k, s in zip(spatial, kernel, strides)]
    small = [t // 2 for t in total]
    big = [t - t // 2 for t in total]
    return small + big if mode == "SAME_UPPER" else big + small


def _pad_input(x, pads, value: float, limit=None):
    """(x, symmetric torch padding): explicit F.pad when pads are asymmetric or exceed `limit`."""
    nd = len(pads) // 2
    begin, end = pads[:nd], pads[nd:]
    if begin == end and (limit is None or all(p <= m for p, m in zip(begin, limit))):
        return x, begin
    torch_pads = [p for i in reversed(range(nd)) for p in (begin[i], end[i])]
    return nn.functional.pad(x, torch_pads, value=value), [0] * nd


def _conv_geometry(ctx, x, kernel_shape):
    nd = len(kernel_shape)
    strides, dil = ctx.get("strides", [1] * nd), ctx.get("dilations", [1] * nd)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dil)]
    return nd, list(strides), list(dil), _auto_pads(ctx, list(x.shape[2:]), effective, strides)


def _conv(ctx, x, w, b=None):
    nd, strides, dil, pads = _conv_geometry(ctx, x, list(w.shape[2:]))
    if nd == 2 and ctx.get("group", 1) == 1 and strides == [1, 1] and x.device.type == "cpu" and _taps_first_pays(w):
        zero_pad = [pads[1], pads[3], pads[0], pads[2]]
        return conv_taps_first(x, w, b, dil, (lambda t: nn.functional.pad(t, zero_pad)) if any(pads) else None)
    x, padding = _pad_input(x, pads, 0.0)
    fn = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[nd - 1]
    return fn(x, w, b, strides, padding, dil, ctx.get("group", 1))


def _taps_first_pays(w) -> bool:
    """Narrow outputs from wider inputs (MS-D: one output channel): there torch's CPU convolution spends
    most of its time on the k*k shifted reads of every input channel. Measured on one core (forward plus
    backward, batch 5, 64-128 pixels, 3x3, docs/benchmarks.md): 2-4x faster for one output channel, faster
    for up to 4 when the inputs are at least 12 times as many, slower beyond. CPU only: on a GPU the
    library convolution is used (the measurement was a CPU one)."""
    c_out, c_in = w.shape[:2]
    return w.shape[2] * w.shape[3] > 1 and (c_out == 1 or (c_out <= 4 and c_in >= 12 * c_out))


def conv_taps_first(x, w, b, dil, pad=None):
    """2-D convolution (group 1, stride 1) as a 1x1 convolution into the kh*kw taps of each output
    channel, `pad` of those few channels, then the sum of the kh*kw shifted windows. Any padding that
    maps each channel the same way (zero, reflect, symmetric) commutes with mixing channels, so this is
    conv2d of `pad(x)` up to rounding. Used by the bridge's Conv (zero padding) and MSD.forward_taps."""
    c_out, c_in, kh, kw = w.shape
    taps = nn.functional.conv2d(x, w.permute(0, 2, 3, 1).reshape(c_out * kh * kw, c_in, 1, 1))
    if pad is not None:
        taps = pad(taps)
    n, _, height, width = taps.shape
    out_h, out_w = height - dil[0] * (kh - 1), width - dil[1] * (kw - 1)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"kernel {kh}x{kw} with dilations {dil} is larger than the padded input")
    windows = [(slice(i * dil[0], i * dil[0] + out_h), slice(j * dil[1], j * dil[1] + out_w))
               for i in range(kh) for j in range(kw)]
    out = _WindowSum.apply(taps.view(n, c_out, kh * kw, height, width), windows)
    return out if b is None else out + b.view(1, c_out, 1, 1)


class _WindowSum(torch.autograd.Function):
    """sum over t of taps[:, :, t, window_t]. Autograd's own backward of those k*k slices fills a zero
    tensor of the whole taps' size per tap and adds the k*k of them (81 taps-sized writes for 3x3); this
    one writes each tap's window once into one zero tensor. Each gradient element has exactly one
    non-zero contribution, so both give the same bits (tests/test_bridge.py)."""

    @staticmethod
    def forward(ctx, taps, windows):
        ctx.shape, ctx.windows = taps.shape, windows
        out = taps[:, :, 0, windows[0][0], windows[0][1]].clone()  # a new tensor, not a view of taps
        for t in range(1, len(windows)):
            out = out + taps[:, :, t, windows[t][0], windows[t][1]]
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_taps = grad.new_zeros(ctx.shape)
        for t, (rows, cols) in enumerate(ctx.windows):
            grad_taps[:, :, t, rows, cols] = grad
        return grad_taps, None


def _conv_transpose(ctx, x, w, b=None):
    nd = w.dim() - 2
    strides, dil = list(ctx.get("strides", [1] * nd)), list(ctx.get("dilations", [1] * nd))
    out_pad = list(ctx.get("output_padding", [0] * nd))
    full = [s * (n - 1) + op + (k - 1) * d + 1
            for n, s, op, k, d in zip(x.shape[2:], strides, out_pad, w.shape[2:], dil)]
    mode = ctx.get("auto_pad", "NOTSET")
    if "output_shape" in ctx.attrs or mode in ("SAME_UPPER", "SAME_LOWER"):
        target = ctx.get("output_shape", [n * s for n, s in zip(x.shape[2:], strides)])[-nd:]
        total = [f - t for f, t in zip(full, target)]
        small, big = [t // 2 for t in total], [t - t // 2 for t in total]
        pads = small + big if mode == "SAME_UPPER" else big + small
    else:
        pads = [0] * 2 * nd if mode == "VALID" else list(ctx.get("pads", [0] * 2 * nd))
    fn = (nn.functional.conv_transpose1d, nn.functional.conv_transpose2d, nn.functional.conv_transpose3d)[nd - 1]
    y = fn(x, w, None, strides, 0, out_pad, ctx.get("group", 1), dil)
    # crop by the pads; negative pads (an output_shape beyond the full size) extend with zeros
    y = nn.functional.pad(y, [-p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])])
    return y if b is None else y + b.reshape((1, -1) + (1,) * nd)


def _pool(ctx, x, kind: str):
    kernel = list(ctx.get("kernel_shape"))
    nd, strides, dil, pads = _conv_geometry(ctx, x, kernel)
    ceil = bool(ctx.get("ceil_mode", 0))
    sizes = _pool_output_sizes(list(x.shape[2:]), kernel, strides, dil, pads, ceil)
    if kind == "max":
        if ctx.n_outputs > 1:
            _unsupported(ctx, "the Indices output")
        xp, padding = _pad_input(x, pads, float("-inf"), [k // 2 for k in kernel])
        fn = (nn.functional.max_pool1d, nn.functional.max_pool2d, nn.functional.max_pool3d)[nd - 1]
        return _crop_to(fn(xp, kernel, strides, padding, dil, ceil), sizes)
    if any(d != 1 for d in dil):
        _unsupported(ctx, "AveragePool with dilations")
    fn = (nn.functional.avg_pool1d, nn.functional.avg_pool2d, nn.functional.avg_pool3d)[nd - 1]
    include_pad = bool(ctx.get("count_include_pad", 0))
    xp, padding = _pad_input(x, pads, 0.0, [k // 2 for k in kernel])
    if padding == [0] * nd and any(pads) and not include_pad:  # explicit pads: divide by the real count
        ones = _pad_input(torch.ones_like(x[:1, :1]), pads, 0.0, [-1] * nd)[0]
        return _crop_to(fn(xp, kernel, strides, 0, ceil) / fn(ones, kernel, strides, 0, ceil), sizes)
    return _crop_to(fn(xp, kernel, strides, padding, ceil, include_pad), sizes)


def _pool_output_sizes(spatial, kernel, strides, dil, pads, ceil: bool) -> list[int]:
    """ONNX Runtime's pooled sizes: with ceil_mode, a last window starting in the end padding is dropped
    (torch drops it too, but measures against the explicitly padded input)."""
    nd, sizes = len(spatial), []
    for i, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dil)):
        span = n + pads[i] + pads[nd + i] - ((k - 1) * d + 1)
        out = (-(-span // s) if ceil else span // s) + 1
        if ceil and (out - 1) * s >= n + pads[i]:
            out -= 1
        sizes.append(out)
    return sizes


def _crop_to(y, sizes):
    return y[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]


def _batch_norm(ctx, x, scale, bias, mean, var):
    if ctx.get("training_mode", 0):
        _unsupported(ctx, "training_mode=1")
    return nn.functional.batch_norm(x, mean, var, scale, bias, False, 0.0, ctx.get("epsilon", 1e-5))


def _slice(ctx, x, starts=None, ends=None, axes=None, steps=None):
    if ctx.opset < 10:
        starts, ends, axes = ctx.get("starts"), ctx.get("ends"), ctx.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return x


def _slice_axis(x, axis: int, start: int, end: int, step: int):
    """ONNX Slice on one axis: negative bounds count from the end; clamped as the spec says."""
    n = x.shape[axis]
    start, end = start + n if start < 0 else start, end + n if end < 0 else end
    if step > 0:
        return x[(slice(None),) * axis + (slice(min(max(start, 0), n), min(max(end, 0), n), step),)]
    start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    if step == -1:  # the flips of symmetric padding (MS-D): a narrow view, flipped
        return x.narrow(axis, end + 1, max(start - end, 0)).flip(axis)
    return x.index_select(axis, torch.arange(start, end, step, device=x.device))


def _pad(ctx, x, pads=None, value=None, axes=None):
    mode = ctx.get("mode", "constant")
    if ctx.opset < 11:
        pads, value = ctx.get("pads"), ctx.get("value", 0.0)
    pads, nd = _ints(pads), x.dim()
    axes = [a % nd for a in _ints(axes)] if axes is not None else list(range(nd))
    full = [0] * 2 * nd
    for k, a in enumerate(axes):
        full[a], full[nd + a] = pads[k], pads[len(axes) + k]
    if mode == "constant":
        fill = float(value) if value is not None and (not isinstance(value, torch.Tensor) or value.numel()) else 0.0
        return nn.functional.pad(x, [p for a in reversed(range(nd)) for p in (full[a], full[nd + a])], value=fill)
    for a in range(nd):
        if full[a] or full[nd + a]:
            x = x.index_select(a, _border_index(x.shape[a], full[a], full[nd + a], mode, ctx).to(x.device))
    return x


def _border_index(n: int, begin: int, end: int, mode: str, ctx):
    i = torch.arange(-begin, n + end)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i % n
    if mode == "reflect":
        period = 2 * (n - 1)
        i = (i % period) if period else torch.zeros_like(i)
        return torch.where(i >= n, period - i, i)
    _unsupported(ctx, f"Pad mode {mode!r}")


def _resize(ctx, x, roi=None, scales=None, sizes=None):
    if ctx.op_type == "Upsample" or ctx.opset < 11:  # (X, scales) or the scales attribute
        scales = roi if roi is not None else torch.tensor(ctx.get("scales"))
        mode_default = "asymmetric"
    else:
        mode_default = "half_pixel"
    if ctx.get("antialias", 0) or ctx.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        _unsupported(ctx, "antialias / keep_aspect_ratio_policy")
    coord = ctx.get("coordinate_transformation_mode", mode_default)
    mode = {"bilinear": "linear", "trilinear": "linear"}.get(ctx.get("mode", "nearest"), ctx.get("mode", "nearest"))
    if mode not in ("nearest", "linear") or coord == "tf_crop_and_resize":
        _unsupported(ctx, f"Resize mode {mode!r} / {coord!r}")
    axes = list(ctx.get("axes", range(x.dim())))
    for k, axis in enumerate(axes):
        n = x.shape[axis]
        if sizes is not None and sizes.numel():
            out = int(sizes[k]); scale = out / n
        else:
            scale = float(scales[k]); out = int(np.floor(n * scale))
        if out != n or scale != 1.0:
            x = _resize_axis(ctx, x, axis, out, scale, coord, mode)
    return x


def _resize_axis(ctx, x, axis: int, out: int, scale: float, coord: str, mode: str):
    n, r = x.shape[axis], np.arange(out, dtype=np.float64)
    if coord == "align_corners":
        pos = r * (n - 1) / (out - 1) if out > 1 else np.zeros(out)
    elif coord == "asymmetric":
        pos = r / scale
    elif coord == "pytorch_half_pixel":
        pos = (r + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    elif coord == "half_pixel_symmetric":
        pos = n / 2 * (1 - out / (scale * n)) + (r + 0.5) / scale - 0.5
    else:
        pos = (r + 0.5) / scale - 0.5
    if mode == "nearest":
        rule = ctx.get("nearest_mode", "round_prefer_floor" if ctx.opset >= 11 else "floor")
        frac_half = np.isclose(pos - np.floor(pos), 0.5)
        index = {"floor": np.floor(pos), "ceil": np.ceil(pos),
                 "round_prefer_ceil": np.where(frac_half, np.ceil(pos), np.round(pos)),
                 }.get(rule, np.where(frac_half, np.floor(pos), np.round(pos)))
        return x.index_select(axis, torch.from_numpy(np.clip(index, 0, n - 1).astype(np.int64)).to(x.device))
    pos = np.clip(pos, 0, n - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * x.dim()
    shape[axis] = out
    weight = torch.from_numpy((pos - low).astype(np.float32)).reshape(shape).to(device=x.device, dtype=x.dtype)
    a = x.index_select(axis, torch.from_numpy(low).to(x.device))
    b = x.index_select(axis, torch.from_numpy(high).to(x.device))
    return a + (b - a) * weight


def _axes(ctx, axes, slot_opset: int):
    """Reduce/Squeeze/Unsqueeze axes: an attribute before `slot_opset`, an input from then on."""
    if ctx.opset < slot_opset:
        return ctx.get("axes")
    return _ints(axes) if axes is not None else None


def _reduce(fn):
    def op(ctx, x, axes=None):
        axes = _axes(ctx, axes, 13 if ctx.op_type == "ReduceSum" else 18)
        if not axes:
            if ctx.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=[a % x.dim() for a in axes], keepdim=bool(ctx.get("keepdims", 1)))
    return op


def _unsqueeze(ctx, x, axes=None):
    axes = _axes(ctx, axes, 13)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(ctx, x, axes=None):
    axes = _axes(ctx, axes, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _split(ctx, x, split=None):
    axis = ctx.get("axis", 0) % x.dim()
    sizes = _ints(split) if split is not None else ctx.get("split")
    if not sizes:
        parts = ctx.get("num_outputs", ctx.n_outputs)
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - k * chunk) for k in range(parts)]
    return torch.split(x, list(sizes), axis)


def _softmax(fn):
    def op(ctx, x):
        axis = ctx.get("axis", -1 if ctx.opset >= 13 else 1) % x.dim()
        if ctx.opset >= 13:
            return fn(x, axis)
        return fn(x.reshape(int(np.prod(x.shape[:axis])), -1), 1).reshape(x.shape)  # old: 2-D coercion
    return op


def _reshape(ctx, x, shape):
    shape = _ints(shape)
    if not ctx.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _gemm(ctx, a, b, c=None):
    a = a.t() if ctx.get("transA", 0) else a
    b = b.t() if ctx.get("transB", 0) else b
    y = ctx.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + ctx.get("beta", 1.0) * c


def _gather(ctx, x, index):
    axis = ctx.get("axis", 0) % x.dim()
    index = index.long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = x.index_select(axis, index.reshape(-1))
    return picked.reshape(tuple(x.shape[:axis]) + tuple(index.shape) + tuple(x.shape[axis + 1:]))


def _clip(ctx, x, low=None, high=None):
    if ctx.opset < 11:
        low, high = ctx.get("min"), ctx.get("max")
    low = float(low) if low is not None else None
    high = float(high) if high is not None else None
    return x if low is None and high is None else torch.clamp(x, low, high)


def _div(ctx, a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _dropout(ctx, x, ratio=None, training_mode=None):
    p = ctx.get("ratio", 0.5) if ctx.opset < 12 else (float(ratio) if ratio is not None else 0.5)
    y = nn.functional.dropout(x, p, ctx.training) if p > 0 else x
    return (y, y.ne(0) if ctx.training else torch.ones_like(x, dtype=torch.bool))[:ctx.n_outputs]


def constant_value(ctx) -> np.ndarray | None:
    """A Constant node's value (None for the forms the bridge does not support)."""
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if name in ctx.attrs:
            value = ctx.attrs[name]
            return np.array(numpy_helper.to_array(value) if name == "value" else np.array(
                value, np.float32 if "float" in name else np.int64))
    return None


def _constant(ctx):
    value = constant_value(ctx)
    if value is None:
        _unsupported(ctx, "this Constant form")
    return torch.from_numpy(value)


def _shape(ctx, x):
    dims = list(x.shape)[ctx.get("start", 0):ctx.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _gelu(ctx, x):
    return nn.functional.gelu(x, approximate=ctx.get("approximate", "none"))


def _flatten(ctx, x):
    axis = ctx.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _elementwise(fn):
    return lambda ctx, *args: fn(*args)


def _variadic(fn):
    def op(ctx, *args):
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out
    return op


OPS = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "BatchNormalization": _batch_norm,
    "InstanceNormalization": lambda ctx, x, s, b: nn.functional.instance_norm(
        x, weight=s, bias=b, eps=ctx.get("epsilon", 1e-5)),
    "MaxPool": lambda ctx, x: _pool(ctx, x, "max"), "AveragePool": lambda ctx, x: _pool(ctx, x, "avg"),
    "GlobalAveragePool": lambda ctx, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda ctx, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Relu": _elementwise(torch.relu), "Sigmoid": _elementwise(torch.sigmoid), "Tanh": _elementwise(torch.tanh),
    "LeakyRelu": lambda ctx, x: nn.functional.leaky_relu(x, ctx.get("alpha", 0.01)),
    "Elu": lambda ctx, x: nn.functional.elu(x, ctx.get("alpha", 1.0)),
    "Selu": lambda ctx, x: ctx.get("gamma", 1.05070102214813232421875) * torch.where(
        x > 0, x, ctx.get("alpha", 1.67326319217681884765625) * (torch.exp(x) - 1)),
    "HardSigmoid": lambda ctx, x: torch.clamp(ctx.get("alpha", 0.2) * x + ctx.get("beta", 0.5), 0, 1),
    "HardSwish": lambda ctx, x: x * torch.clamp(x / 6 + 0.5, 0, 1),
    "Softplus": _elementwise(nn.functional.softplus), "Gelu": _gelu,
    "Mish": lambda ctx, x: x * torch.tanh(nn.functional.softplus(x)),
    "PRelu": lambda ctx, x, slope: torch.where(x < 0, x * slope, x),
    "Clip": _clip, "Add": _elementwise(torch.add), "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul), "Div": _div, "Pow": _elementwise(torch.pow),
    "Neg": _elementwise(torch.neg), "Abs": _elementwise(torch.abs), "Sqrt": _elementwise(torch.sqrt),
    "Exp": _elementwise(torch.exp), "Log": _elementwise(torch.log), "Erf": _elementwise(torch.erf),
    "Reciprocal": _elementwise(torch.reciprocal), "Floor": _elementwise(torch.floor),
    "Ceil": _elementwise(torch.ceil), "Sum": _variadic(torch.add), "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum), "Mean": lambda ctx, *xs: _variadic(torch.add)(ctx, *xs) / len(xs),
    "Equal": _elementwise(torch.eq), "Less": _elementwise(torch.lt), "Greater": _elementwise(torch.gt),
    "Not": _elementwise(torch.logical_not), "Where": _elementwise(torch.where),
    "Concat": lambda ctx, *xs: torch.cat(xs, ctx.get("axis")), "Split": _split, "Slice": _slice,
    "Pad": _pad, "Resize": _resize, "Upsample": _resize,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "Flatten": _flatten, "Reshape": _reshape, "Gemm": _gemm, "MatMul": _elementwise(torch.matmul),
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "ArgMax": lambda ctx, x: torch.argmax(x, ctx.get("axis", 0), bool(ctx.get("keepdims", 1))),
    "Identity": lambda ctx, x: x, "Dropout": _dropout,
    "Transpose": lambda ctx, x: x.permute(ctx.get("perm", list(reversed(range(x.dim()))))),
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Shape": _shape, "Gather": _gather,
    "Size": lambda ctx, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Constant": _constant, "Cast": lambda ctx, x: x.to(_DTYPES[ctx.get("to")]),
    "Expand": lambda ctx, x, shape: x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))),
    "Tile": lambda ctx, x, reps: x.repeat(_ints(reps)),
    "ConstantOfShape": lambda ctx, shape, _=None: torch.from_numpy(np.full(
        _ints(shape), numpy_helper.to_array(ctx.attrs["value"]).reshape(-1)[0] if "value" in ctx.attrs
        else np.float32(0))),
    "Range": lambda ctx, a, b, d: torch.arange(a.item(), b.item(), d.item(), dtype=a.dtype),
}
