"""SliceConcat: a Concat of one tensor and slices of it (symmetric/reflect padding) with a written-out backward."""

from __future__ import annotations

import onnx
import torch

from .context import NodeContext
from .shape import _slice_axis


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
