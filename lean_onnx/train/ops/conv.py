"""Convolutions, pooling and BatchNormalization in torch, with ONNX's padding rules (auto_pad, asymmetric pads,
ceil_mode as ONNX Runtime computes it)."""

from __future__ import annotations

import torch
from torch import nn

from .context import _unsupported


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
