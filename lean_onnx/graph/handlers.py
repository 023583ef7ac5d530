"""Channel-flow rules: one small handler per ONNX op type (DESIGN.md sections 3-4).

A handler reads the channel nodes of its inputs from the GraphBuilder and sets those of its outputs:
it *aliases* them (ops that do not mix channels), creates new nodes with edges (convs, per-channel
scales, residual sums), marks them as read by a head (Flatten/Gemm/Softmax over channels), or freezes
them (unknown ops). An op type missing from `registry.HANDLERS` is frozen with a reason, never a crash.
This module has the convolution, normalisation, pooling and arithmetic rules; `routing.py` the ones
that route or reshape channels.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..errors import LeanOnnxError
from .builder import GraphBuilder
from .channel_graph import ConvLayer, FrozenPart, node_name

#: Ops that let a BatchNormalization be folded into the conv in front of them (no channel mixing).
FOLD_THROUGH = {"Relu", "Identity", "Dropout", "Cast"}


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def const(b: GraphBuilder, node, index: int):
    """The constant value of input `index` (None if absent or computed at run time)."""
    if index >= len(node.input) or not node.input[index]:
        return None
    return b.loaded.initializers.get(node.input[index])


def rank(b: GraphBuilder, tensor: str) -> int | None:
    shape = b.loaded.shape(tensor)
    return None if shape is None else len(shape)


def spatial(b: GraphBuilder, tensor: str) -> tuple[int, int] | None:
    shape = b.loaded.shape(tensor)
    if not shape or len(shape) < 3 or any(d is None for d in shape[2:]):
        return None
    dims = tuple(shape[2:])
    return (1, dims[0]) if len(dims) == 1 else (dims[0], dims[1])


def pair(values, default, n=2):
    values = tuple(values) if values else (default,) * n
    return (1,) * (2 - len(values)) + values if len(values) < 2 else values[:2]


# -- the simple categories -------------------------------------------------------------------

def same_channels(node, b: GraphBuilder) -> None:
    """Relu, MaxPool, Resize, ...: output channel c is input channel c (an alias, weight 1)."""
    nodes = b.nodes(node.input[0])
    if nodes is not None:
        b.set_nodes(node.output[0], nodes)


def head(node, b: GraphBuilder, tensors=None) -> None:
    """Softmax/ReduceMax over channels...: reads its channels (they stay), outputs no channel nodes."""
    b.terminal([t for t in node.input if t] if tensors is None else tensors)


def linear_head(node, b: GraphBuilder) -> None:
    """Flatten (axis 1) / Reshape to rank 2 / Gemm / MatMul: a linear head reads the channels; the plan
    may later drop the columns of channels that are constant there."""
    if node.input and node.input[0] in b.tensor_nodes:
        b.linear_head(node, node.input[0])
    head(node, b, [t for t in node.input[1:] if t])


def unknown(node, b: GraphBuilder, reason: str | None = None) -> None:
    """Freeze the channels around an op lean-onnx has no rule for (never a crash, never a wrong model)."""
    inputs = [t for t in node.input if t and b.nodes(t) is not None]
    if not inputs:
        return  # shape arithmetic on constants: no channels involved
    b.terminal(inputs)
    outputs = [t for t in node.output if t and b.nodes(t) is not None]
    freeze(b, node, inputs + outputs, reason or f"no channel-flow rule for {node.op_type}")


def freeze(b: GraphBuilder, node, tensors, reason: str) -> None:
    """Keep the channel count of `tensors` (their kernels stay prunable) and say why."""
    tensors = [t for t in tensors if b.tensor_nodes.get(t) is not None]
    for t in tensors:
        b.frozen_nodes.append(b.tensor_nodes[t])
    if tensors:
        b.frozen.append(FrozenPart(node_name(node), node.op_type, reason, tensors,
                                   sum(len(b.tensor_nodes[t]) for t in tensors)))


def channel_scale(node, b: GraphBuilder, scale, reason: str) -> None:
    """A per-channel factor (unfolded BN, AveragePool, Mul by a constant): new nodes, skippable edges."""
    nodes = b.nodes(node.input[0])
    if nodes is None:
        return
    scale = np.broadcast_to(np.asarray(scale, np.float64), (len(nodes),))
    out = b.new_nodes(len(nodes), nodes[:, None], scale[:, None], skippable=True)
    b.set_nodes(node.output[0], out)
    b.couple(reason, node, [node.input[0], node.output[0]], nodes, out)


# -- convolutions ----------------------------------------------------------------------------

def conv(node, b: GraphBuilder) -> None:
    transposed = node.op_type == "ConvTranspose"
    x, w_name = node.input[0], node.input[1]
    in_nodes = b.nodes(x)
    weight = const(b, node, 1)
    bias_name = node.input[2] if len(node.input) > 2 else ""
    if weight is None:
        return unknown(node, b, "weight is computed at run time")
    if bias_name and bias_name not in b.loaded.initializers:
        return unknown(node, b, "bias is computed at run time")
    if weight.ndim not in (3, 4):
        return unknown(node, b, f"{weight.ndim - 2}-D convolution: no operator-norm rule")
    group = int(attr(node, "group", 1))
    c_in, c_out = (weight.shape[0], weight.shape[1] * group) if transposed else (weight.shape[1] * group, weight.shape[0])
    _check_conv_channels(node, b, c_in, c_out, group)
    if in_nodes is None:  # produced by something without a channel rule: fresh, frozen input channels
        in_nodes = b.new_sources(c_in)
        b.set_nodes(x, in_nodes)
    if len(in_nodes) != c_in:
        return unknown(node, b, f"input has {len(in_nodes)} channels, weight expects {c_in}")
    stride = pair(attr(node, "strides"), 1)
    dilation = pair(attr(node, "dilations"), 1)
    c_in_g, c_out_g = c_in // group, c_out // group
    base = (np.arange(c_out) // c_out_g) * c_in_g
    src = in_nodes[base[:, None] + np.arange(c_in_g)[None, :]]
    excluded = b.excluded_by(node, w_name)
    edge_start, index = b.num_edges, len(b.layers)
    out_nodes = b.new_nodes(c_out, src, 1.0, skippable=excluded is not None, layer=index)
    layer = ConvLayer(index, node_name(node), node.op_type, w_name, x, node.output[0], c_in, c_out, group,
                      tuple(weight.shape[2:]), stride, dilation, _grid(b, x, stride, transposed),
                      in_nodes, out_nodes, edge_start)
    if excluded is not None:
        layer.prunable = False
        layer.frozen_reason = f"--exclude {excluded!r}"
        b.frozen.append(FrozenPart(layer.name, node.op_type, layer.frozen_reason + ": kernels kept as they are",
                                   [w_name], c_out))
    folded = _foldable_bn(b, node.output[0])
    if folded is not None:
        layer.bn_name, layer.bn_scale = node_name(folded[0]), folded[1]
        b.folded_bn.add(folded[0].output[0])
    b.layers.append(layer)
    b.set_nodes(node.output[0], out_nodes)
    if c_in_g == 1 and group == c_in:
        b.couple("depthwise conv: input and output channels", node, [x, node.output[0]],
                 in_nodes[np.arange(c_out) // c_out_g], out_nodes)
    elif group > 1:
        b.couple(f"grouped conv (group={group}): channels leave each group in equal numbers", node,
                 [x, node.output[0]])
        freeze(b, node, [x, node.output[0]], f"grouped conv (group={group}): removing channels would unbalance "
                                             "the groups")


def _check_conv_channels(node, b: GraphBuilder, c_in: int, c_out: int, group: int) -> None:
    """A conv whose weight does not fit its input's channels or its group is an invalid model (onnx.checker
    does not see it, ONNX Runtime refuses it): exit 2, not a frozen layer in a model nobody can run."""
    shape = b.loaded.shape(node.input[0])
    channels = shape[1] if shape and len(shape) > 1 else None
    if group < 1 or c_in % group or c_out % group or (channels is not None and channels != c_in):
        raise LeanOnnxError(f"{b.loaded.path}: node {node_name(node)!r} ({node.op_type}): invalid model: the weight "
                            f"{node.input[1]!r} fits {c_in} input channels in {group} group(s), the input has "
                            f"{channels if channels is not None else 'unknown'}")


def _grid(b: GraphBuilder, x: str, stride, transposed: bool) -> tuple[int, int]:
    """Grid of the periodic operator: --norm-grid N, or the layer's real input size (`auto`)."""
    if b.norm_grid:
        return (b.norm_grid, b.norm_grid)
    size = spatial(b, x) or (16, 16)
    if transposed:  # the adjoint of a strided conv acting on the (larger) output grid
        size = (size[0] * stride[0], size[1] * stride[1])
    return size


def _foldable_bn(b: GraphBuilder, tensor: str):
    """A BatchNormalization fed only by this conv (directly or through FOLD_THROUGH ops), and its scale."""
    outputs = {o.name for o in b.loaded.graph.output}
    for _ in range(8):
        consumers = b.loaded.consumers.get(tensor, [])
        if len(consumers) != 1 or tensor in outputs:
            return None
        node = consumers[0]
        if node.op_type == "BatchNormalization" and node.input[0] == tensor:
            scale = _bn_scale(b, node)
            return None if scale is None else (node, scale)
        if node.op_type not in FOLD_THROUGH:
            return None
        tensor = node.output[0]
    return None


def _bn_scale(b: GraphBuilder, node):
    params = [const(b, node, k) for k in (1, 4)]
    if any(p is None for p in params):
        return None
    gamma, var = (p.astype(np.float64).ravel() for p in params)
    return np.abs(gamma) / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))


def batch_norm(node, b: GraphBuilder) -> None:
    if node.output[0] in b.folded_bn:
        return same_channels(node, b)
    scale = _bn_scale(b, node)
    if scale is None:
        return unknown(node, b, "BatchNormalization parameters are computed at run time")
    channel_scale(node, b, scale, "BatchNormalization: per-channel")


# -- pooling ---------------------------------------------------------------------------------

def average_pool(node, b: GraphBuilder) -> None:
    kernel = pair(attr(node, "kernel_shape"), 1)
    stride = pair(attr(node, "strides"), 1)
    channel_scale(node, b, average_pool_norm(kernel, stride), "AveragePool: per-channel")


def average_pool_norm(kernel_shape, stride) -> float:
    """Operator norm of a 2-D AveragePool seen as a per-channel strided convolution (lean-spec 2.2).

    Its kernel is the constant 1/(kh*kw) >= 0, so every polyphase component's transfer function peaks at
    the zero frequency, where it is the component's tap count / (kh*kw): the norm is
    sqrt(sum_r n_r^2) / (kh*kw) on any grid, and it factorises over the two axes. 2x2 stride 2: 0.5;
    3x3 stride 2: 5/9. `tests/test_norms.py` checks it against `select.norms.kernel_operator_norms`."""
    squares, taps = 1, 1
    for k, s in zip(kernel_shape, stride):
        squares *= int(np.sum(np.bincount(np.arange(k) % s, minlength=s) ** 2))
        taps *= k
    return float(np.sqrt(squares)) / taps


def global_average_pool(node, b: GraphBuilder) -> None:
    size = spatial(b, node.input[0])
    scale = 1.0 / np.sqrt(size[0] * size[1]) if size else 1.0
    channel_scale(node, b, scale, "GlobalAveragePool: per-channel")


def reduce_mean(node, b: GraphBuilder) -> None:
    axes = _axes(b, node, rank(b, node.input[0]))
    if not axes or 0 in axes or 1 in axes or (not attr(node, "keepdims", 1) and 0 in axes):
        return head(node, b)
    shape = b.loaded.shape(node.input[0])
    extent = np.prod([shape[a] or 1 for a in axes]) if shape else 1
    channel_scale(node, b, 1.0 / np.sqrt(extent), "ReduceMean over spatial axes: per-channel")


def _axes(b: GraphBuilder, node, r):
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1:
        value = const(b, node, 1)
        axes = None if value is None else value.ravel().tolist()
    if axes is None or r is None:
        return None
    return sorted(int(a) % r for a in axes)


def reduce_other(node, b: GraphBuilder) -> None:
    """ReduceMax/ArgMax & co: over the channel axis they mix channels (a head), else an alias."""
    r = rank(b, node.input[0])
    axes = _axes(b, node, r)
    if node.op_type in ("ArgMax", "ArgMin") and r:
        axes = [int(attr(node, "axis", 0)) % r]
    if axes is None or 0 in axes or 1 in axes:
        return head(node, b)
    same_channels(node, b)


def softmax(node, b: GraphBuilder) -> None:
    r = rank(b, node.input[0]) or 4
    opset = max((o.version for o in b.loaded.model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    axis = int(attr(node, "axis", -1 if opset >= 13 else 1)) % r
    if axis <= 1:
        return head(node, b)
    same_channels(node, b)


# -- elementwise arithmetic ------------------------------------------------------------------

def elementwise(node, b: GraphBuilder) -> None:
    """Add/Sub/Mul/Div/Sum/Max/Min/Mean with broadcasting.

    1. Only constants: no channels.  2. One channel tensor and constants: Mul/Div by a constant is a
    per-channel scale, anything else an alias.  3. Several channel tensors that are the same channels
    (x * sigmoid(x)): an alias.  4. Otherwise a per-channel sum node with skippable weight-1 edges from
    every operand (residual additions, squeeze-excite gates); the operands are coupled.
    """
    out = node.output[0]
    out_rank = rank(b, out)
    tensors, consts = [], []
    for k, name in enumerate(node.input):
        nodes = b.nodes(name) if name else None
        if nodes is not None:
            tensors.append((name, nodes))
        elif name:
            value = const(b, node, k)
            if value is None and _channel_extent(b, name, out_rank) > 1:
                return unknown(node, b, f"operand {name!r} is computed at run time and varies per channel")
            consts.append((k, value))
    if not tensors:
        return
    if len(tensors) == 1:
        name, nodes = tensors[0]
        scalable = node.op_type in ("Mul", "Div") and consts and consts[0][1] is not None
        if scalable and not (node.op_type == "Div" and consts[0][0] == 0):
            scale = _const_scale(consts[0][1], len(nodes), out_rank, divide=node.op_type == "Div")
            if scale is not None:
                return channel_scale(_first_input_is(node, name), b, scale, f"{node.op_type} by a constant: per-channel")
        return b.set_nodes(out, nodes)
    width = max(len(n) for _, n in tensors)
    if all(len(n) == width and np.array_equal(n, tensors[0][1]) for _, n in tensors):
        return b.set_nodes(out, tensors[0][1])
    if any(len(n) not in (1, width) for _, n in tensors):
        return unknown(node, b, "operands have different channel counts")
    src = np.stack([np.broadcast_to(n, (width,)) for _, n in tensors], axis=1)
    sums = b.new_nodes(width, src, 1.0, skippable=True)
    b.set_nodes(out, sums)
    b.couple(f"{node.op_type} operands", node, [t for t, _ in tensors] + [out], src, sums[:, None])


class _Renamed:
    """A view of `node` whose first input is `name` (for Mul/Div with the constant first)."""

    def __init__(self, node, name):
        self.name, self.op_type, self.output = node.name, node.op_type, node.output
        self.input = [name] + [t for t in node.input if t != name]


def _first_input_is(node, name):
    return node if node.input[0] == name else _Renamed(node, name)


def _channel_extent(b: GraphBuilder, name: str, out_rank) -> int:
    shape = b.loaded.shape(name)
    if shape is None or out_rank is None:
        return 2  # unknown: assume it could vary per channel
    axis = 1 - (out_rank - len(shape))
    return 1 if axis < 0 or axis >= len(shape) else (shape[axis] or 2)


def _const_scale(value: np.ndarray, channels: int, out_rank, divide: bool):
    """Per-channel gain of multiplying (dividing) by a constant: max |c| (1 / min |c|) per channel."""
    value = np.abs(np.asarray(value, np.float64))
    axis = 1 - ((out_rank or value.ndim) - value.ndim)
    if 0 <= axis < value.ndim and value.shape[axis] == channels and channels > 1:
        value = np.moveaxis(value, axis, 0).reshape(channels, -1)
        per_channel = value.min(axis=1) if divide else value.max(axis=1)
    else:
        per_channel = np.full(channels, value.min() if divide else value.max())
    if divide:
        if np.any(per_channel == 0):
            return None
        per_channel = 1.0 / per_channel
    return per_channel
