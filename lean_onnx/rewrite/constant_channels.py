"""Which channels are known constants in the masked model, tensor by tensor.

A channel with no kept incoming kernel outputs its conv bias everywhere: 0 in the masked model (DESIGN.md
section 2 zeroes the bias of dead channels), or the bias itself with `--fold-constants` (the reference's
masked network keeps biases). Ops that act on each value alone (activations), pools of a constant, and
routing ops keep a constant channel constant; anything that mixes positions or channels, or that we do
not know, makes it unknown. The values are used at linear heads (Flatten -> Gemm/MatMul): a constant
channel contributes a constant to the head's output, so its columns can be dropped, exactly, after
adding that constant to the Gemm bias (nothing to add when it is 0).

`channel_constants` returns, for every tensor that carries channels, a float64 array with the constant
value of each channel, or NaN where the channel is not a known constant.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import numpy_helper

from ..graph.channel_graph import ChannelGraph
from ..select.selection import Selection

_UNARY = {
    "Relu": lambda x, n: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, x * _attr(n, "alpha", 0.01)),
    "Elu": lambda x, n: np.where(x >= 0, x, _attr(n, "alpha", 1.0) * np.expm1(np.minimum(x, 0))),
    "Selu": lambda x, n: _attr(n, "gamma", 1.0507009873554805) * np.where(
        x > 0, x, _attr(n, "alpha", 1.6732632423543772) * np.expm1(np.minimum(x, 0))),
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda x, n: np.clip(_attr(n, "alpha", 0.2) * x + _attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0, 1),
    "Tanh": lambda x, n: np.tanh(x),
    "Softplus": lambda x, n: np.logaddexp(0.0, x),
    "Softsign": lambda x, n: x / (1.0 + np.abs(x)),
    "Abs": lambda x, n: np.abs(x),
    "Neg": lambda x, n: -x,
    "Identity": lambda x, n: x,
    "Dropout": lambda x, n: x,
    "Cast": lambda x, n: x,
    "Floor": lambda x, n: np.floor(x),
    "Ceil": lambda x, n: np.ceil(x),
    "Sign": lambda x, n: np.sign(x),
    "Erf": lambda x, n: np.vectorize(math.erf, otypes=[float])(x),
    "Gelu": lambda x, n: 0.5 * x * (1.0 + np.vectorize(math.erf, otypes=[float])(x / math.sqrt(2.0))),
    "Mish": lambda x, n: x * np.tanh(np.logaddexp(0.0, x)),
}
#: a constant stays the same constant (window ops over equal values; routing without arithmetic)
_SAME = {"MaxPool", "GlobalMaxPool", "GlobalAveragePool", "Upsample", "Squeeze", "Unsqueeze"}
#: linear in the values: 0 stays 0, other constants become unknown
_ZERO_ONLY = {"LpPool", "GlobalLpPool", "ReduceSum", "ReduceL2"}
_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
    "Min": np.minimum, "Pow": np.power, "Sum": np.add, "Mean": None, "PRelu": None,
}


def channel_constants(graph: ChannelGraph, selection: Selection, zero_dead: bool) -> dict[str, np.ndarray]:
    """Constant value (NaN: unknown) of every channel of every channel tensor in the masked model."""
    loaded = graph.loaded
    values: dict[str, np.ndarray] = {}
    layers = {layer.output: layer for layer in graph.layers}
    dead = ~selection.alive

    def get(name):
        if name in values:
            return values[name]
        nodes = graph.tensor_nodes.get(name)
        return None if nodes is None else np.full(len(nodes), np.nan)

    def init(name):
        proto = loaded.initializers.get(name)
        return None if proto is None else (proto if isinstance(proto, np.ndarray) else numpy_helper.to_array(proto))

    for node in loaded.graph.node:
        outs = [t for t in node.output if t in graph.tensor_nodes]
        if not outs:
            continue
        op = node.op_type
        first = get(node.input[0]) if node.input and node.input[0] else None
        with np.errstate(all="ignore"):
            if op in ("Conv", "ConvTranspose") and node.output[0] in layers:
                result = _conv_output(layers[node.output[0]], selection, node, init, zero_dead)
            elif op == "BatchNormalization":
                result = _batch_norm(node, first, init, dead[graph.tensor_nodes[node.output[0]]], zero_dead)
            elif op in _UNARY and first is not None:
                result = _UNARY[op](first, node)
            elif op == "Clip" and first is not None:
                result = _clip(node, first, init)
            elif op in _SAME and first is not None:
                result = first
            elif op in _ZERO_ONLY and first is not None:
                result = np.where(first == 0, 0.0, np.nan)
            elif op in ("AveragePool", "Pad", "Resize", "ReduceMean") and first is not None:
                result = _spatial(node, first, init)
            elif op in _BINARY:
                result = _binary(graph, node, get, init)
            else:  # routing ops (Concat, Split, Slice, channel shuffles): follow the channel nodes
                result = None
                if op in ("Concat", "Split", "Slice", "Transpose", "Reshape"):
                    for t in outs:
                        values[t] = _route(graph, node, t, get)
                    continue
            if result is None:
                continue
            result = np.asarray(result, np.float64)
            for t in outs:
                if result.shape == graph.tensor_nodes[t].shape:
                    values[t] = result
    for name, nodes in graph.tensor_nodes.items():
        if name not in values:
            values[name] = np.full(len(nodes), np.nan)
        else:
            values[name] = np.where(np.isfinite(values[name]), values[name], np.nan)
    return values


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else (a.i if a.type == a.INT else default)
    return default


def _conv_output(layer, selection: Selection, node, init, zero_dead: bool):
    """A row with no kept kernel outputs its bias (0 once the masked model zeroes it)."""
    if not layer.prunable:
        return np.full(layer.c_out, np.nan)
    empty = ~selection.layer_mask(layer).any(axis=1)
    bias = init(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    const = np.zeros(layer.c_out) if zero_dead or bias is None else np.asarray(bias, np.float64).ravel()
    return np.where(empty, const, np.nan)


def _batch_norm(node, x, init, dead_out, zero_dead: bool):
    if zero_dead:  # the masked model zeroes scale and shift of dead channels
        return np.where(dead_out, 0.0, np.nan)
    params = [init(t) for t in node.input[1:5]]
    if x is None or any(p is None for p in params):
        return None
    scale, bias, mean, var = (np.asarray(p, np.float64).ravel() for p in params)
    return scale * (x - mean) / np.sqrt(var + _attr(node, "epsilon", 1e-5)) + bias


def _clip(node, x, init):
    lo, hi = _attr(node, "min", -np.inf), _attr(node, "max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        value = init(node.input[1])
        lo = np.nan if value is None else float(np.asarray(value).ravel()[0])
    if len(node.input) > 2 and node.input[2]:
        value = init(node.input[2])
        hi = np.nan if value is None else float(np.asarray(value).ravel()[0])
    return np.minimum(np.maximum(x, lo), hi)


def _spatial(node, x, init):
    """AveragePool / Pad / Resize / ReduceMean over spatial axes: 0 stays 0 (all are linear with zero
    padding); a non-zero constant survives only where no padding value enters the window."""
    op = node.op_type
    keep_const = False
    if op == "ReduceMean":
        keep_const = True  # the handler only aliases ReduceMean over spatial axes
    elif op == "AveragePool":
        padded = any(a.name == "pads" and any(a.ints) for a in node.attribute) or \
            any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET", b"VALID") for a in node.attribute)
        keep_const = not padded or not _attr(node, "count_include_pad", 0)
    elif op == "Pad":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        pad_value = init(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        if mode != b"constant":
            keep_const = True
        elif pad_value is not None:
            pad_value = float(np.asarray(pad_value).ravel()[0]) if np.size(pad_value) else 0.0
            return np.where(x == pad_value, x, np.nan)
    elif op == "Resize":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        keep_const = mode in (b"nearest", b"linear")  # interpolation weights sum to 1
    return x if keep_const else np.where(x == 0, 0.0, np.nan)


def _binary(graph: ChannelGraph, node, get, init):
    """Elementwise ops with broadcasting, on per-channel values (channel tensors or constants that are
    the same at every position of a channel)."""
    out_nodes = graph.tensor_nodes[node.output[0]]
    width = len(out_nodes)
    out_rank = len(graph.loaded.shape(node.output[0]) or ()) or 4
    operands = []
    for name in node.input:
        if not name:
            continue
        value = get(name)
        if value is None:
            value = _per_channel(init(name), width, out_rank)
        if value is None or np.size(value) not in (1, width):
            value = np.full(width, np.nan)
        operands.append(np.broadcast_to(np.asarray(value, np.float64), (width,)))
    if not operands:
        return None
    op = node.op_type
    if op == "Mean":
        return np.mean(operands, axis=0)
    if op == "PRelu":
        x, slope = operands[0], operands[1] if len(operands) > 1 else np.nan
        return np.where(x >= 0, x, x * slope)
    result = operands[0]
    for other in operands[1:]:
        result = _BINARY[op](result, other)
    if op == "Mul":  # 0 times anything finite is 0
        result = np.where(np.any([o == 0 for o in operands], axis=0), 0.0, result)
    elif op == "Div":
        result = np.where(operands[0] == 0, 0.0, result)
    return result


def _per_channel(value, width: int, out_rank: int):
    """A constant operand as one value per channel, or None when it varies inside a channel."""
    if value is None:
        return None
    value = np.asarray(value, np.float64)
    if value.size == 1:
        return value.reshape(1)
    axis = 1 - (out_rank - value.ndim)
    if not 0 <= axis < value.ndim or value.shape[axis] != width or value.size != width:
        return None
    return value.ravel()


def _route(graph: ChannelGraph, node, out: str, get):
    """Channels that move without arithmetic: each output channel has the value its node has in the
    inputs (unknown when the inputs disagree, e.g. a spatial Concat of different constants)."""
    by_node: dict[int, float] = {}
    for name in node.input:
        nodes, value = graph.tensor_nodes.get(name), get(name)
        if nodes is None or value is None:
            continue
        for n, v in zip(nodes.tolist(), value.tolist()):
            if n in by_node and not (by_node[n] == v):
                v = np.nan
            by_node[n] = v
    return np.array([by_node.get(n, np.nan) for n in graph.tensor_nodes[out].tolist()], np.float64)
