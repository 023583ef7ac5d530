"""Ops that route, pad, resize or reshape tensors (Slice, Pad, Resize, Split, Reshape, Gather, Shape, Constant...)."""

from __future__ import annotations

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from .context import _ints, _unsupported


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


def _reshape(ctx, x, shape):
    shape = _ints(shape)
    if not ctx.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _gather(ctx, x, index):
    axis = ctx.get("axis", 0) % x.dim()
    index = index.long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = x.index_select(axis, index.reshape(-1))
    return picked.reshape(tuple(x.shape[:axis]) + tuple(index.shape) + tuple(x.shape[axis + 1:]))


def _flatten(ctx, x):
    axis = ctx.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _shape(ctx, x):
    dims = list(x.shape)[ctx.get("start", 0):ctx.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


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
