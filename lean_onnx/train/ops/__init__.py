"""Torch implementations of the ONNX ops the fine-tuning bridge (`bridge.py`) executes, by op family.

`OPS[op_type](ctx, *inputs)` computes one node: `ctx` is the node's `NodeContext` (attributes with
strings decoded, the model's opset, the module's training flag), `inputs` are torch tensors in the
node's input order (None for an omitted optional input). The list of ops and their limits is in
docs/finetune.md. A new op: its function in the family's module, its entry in `OPS` below.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from .context import _DTYPES, NodeContext, _ints
from .conv import _batch_norm, _conv, _conv_transpose, _pool, conv_taps_first
from .elementwise import _clip, _div, _dropout, _elementwise, _gelu, _gemm, _reduce, _softmax, _variadic
from .shape import (
                    _constant,
                    _flatten,
                    _gather,
                    _pad,
                    _reshape,
                    _resize,
                    _shape,
                    _slice,
                    _split,
                    _squeeze,
                    _unsqueeze,
                    constant_value,
)
from .slice_concat import SliceConcat

__all__ = ["NodeContext", "SliceConcat", "OPS", "conv_taps_first", "constant_value"]

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
