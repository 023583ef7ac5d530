"""Element-wise ops, reductions, softmax and Gemm in torch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .shape import _axes


def _reduce(fn):
    def op(ctx, x, axes=None):
        axes = _axes(ctx, axes, 13 if ctx.op_type == "ReduceSum" else 18)
        if not axes:
            if ctx.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=[a % x.dim() for a in axes], keepdim=bool(ctx.get("keepdims", 1)))
    return op


def _softmax(fn):
    def op(ctx, x):
        axis = ctx.get("axis", -1 if ctx.opset >= 13 else 1) % x.dim()
        if ctx.opset >= 13:
            return fn(x, axis)
        return fn(x.reshape(int(np.prod(x.shape[:axis])), -1), 1).reshape(x.shape)  # old: 2-D coercion
    return op


def _gemm(ctx, a, b, c=None):
    a = a.t() if ctx.get("transA", 0) else a
    b = b.t() if ctx.get("transB", 0) else b
    y = ctx.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + ctx.get("beta", 1.0) * c


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


def _gelu(ctx, x):
    return nn.functional.gelu(x, approximate=ctx.get("approximate", "none"))


def _elementwise(fn):
    return lambda ctx, *args: fn(*args)


def _variadic(fn):
    def op(ctx, *args):
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out
    return op
