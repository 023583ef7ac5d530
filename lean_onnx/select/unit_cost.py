"""What a channel unit costs: its MACs and its estimated time, for allocating a budget where the time goes.

ONNX Runtime's time per layer is not its MAC count. Profiled per node on this project's CPU (ORT 1.32,
2 threads, batch 1; trained MobileNetV2, PP-LCNet and YOLOv8n, 151 convs, docs/budgets.md), a conv's time
is fitted to within a median 11 % by

    time ~ MACs + KAPPA * (input elements + output elements)

with KAPPA about 9 MAC-equivalents per activation element (`python tools/fit_conv_cost.py`; 8.7 again in a
second run on a loaded machine, where every time was twice as long): dense convs on small feature maps are
compute-bound (11-13 us per million MACs), depthwise convs and thin convs on large maps are memory-bound
(35-80 us per million MACs), and the element-wise ops behind a conv (activations, residual sums) scale with
its output elements too. The costs are per channel unit, summed over every conv that writes or reads one
of its channels, at full width (a first-order marginal: removing one channel of a layer whose other
channels all stay). select/budget.py ranks units by log-value - TIME_WEIGHT x log(time / MACs).

The fit above is of the conv nodes alone, with what ORT fuses into them (BatchNormalization, one activation,
a residual Add). An element-wise op ORT runs on its own, like the four ops of an exported hard-swish
`x * Clip(x + 3, 0, 6) / 6` (Add, Clip, Mul, Div, with NCHWc reorders around them) or the Concat and Split
of a YOLO block, passes over its output once more: each such node adds KAPPA_EW per element of its output
to the units of its channels (`standalone_elementwise`; the fit of KAPPA_EW: `tools/fit_conv_cost.py`).
On the trained PP-PicoDet, where those ops and their reorders are over half the profiled time, this is
what the time per MAC was missing (docs/budgets.md).
"""

from __future__ import annotations

import numpy as np

from ..graph.channel_graph import ChannelGraph
from ..graph.cost import layer_macs

#: MAC-equivalents per activation element read or written by a conv (the fit in the module docstring)
KAPPA = 9.0
#: MAC-equivalents per output element of an element-wise node that ORT runs on its own
KAPPA_EW = 30.0
#: ops that pass once over their output's elements (element-wise, and the copies of routing and pooling)
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Clip", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Elu", "Selu", "Softplus", "Erf", "Exp", "Sqrt", "Pow", "Neg", "Abs", "Max", "Min", "Sum", "Mish",
    "BatchNormalization", "Concat", "Split", "Slice", "Resize", "Upsample", "Pad", "MaxPool", "AveragePool"})
#: ops ORT fuses into the conv (or BatchNormalization) before them when they are its output's only reader
FUSED_AFTER_CONV = frozenset({"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid",
                              "Add"})


def standalone_elementwise(graph: ChannelGraph) -> list[str]:
    """Outputs of the element-wise nodes that ORT runs on their own, whose channels the graph tracks: every
    ELEMENTWISE node except one fused into the conv before it (a FUSED_AFTER_CONV op, or a Mul/Add/Sub/Div
    by a constant, reading a conv's or fused node's output that has no other reader) and a (Hard)Sigmoid
    read only by a Mul of its own input (ORT runs x * sigmoid(x) as one op)."""
    loaded = graph.loaded
    consumers = loaded.consumers
    convs = {layer.output for layer in graph.layers}

    def constant(name: str) -> bool:
        return name in loaded.initializers or not name

    def fused(node) -> bool:
        data = [t for t in node.input if not constant(t)]
        if node.op_type not in FUSED_AFTER_CONV and not (node.op_type in ("Mul", "Add", "Sub", "Div")
                                                         and len(data) == 1):
            return False
        return any(len(consumers.get(t, ())) == 1 and (t in convs or t in fused_outputs) for t in data)

    fused_outputs, out = set(), []
    for node in loaded.graph.node:
        if node.op_type not in ELEMENTWISE or not node.output:
            continue
        if fused(node):
            fused_outputs.add(node.output[0])
            continue
        readers = consumers.get(node.output[0], ())
        if (node.op_type in ("Sigmoid", "HardSigmoid") and len(readers) == 1 and readers[0].op_type == "Mul"
                and node.input[0] in readers[0].input):
            continue
        out += [t for t in node.output if t in graph.tensor_nodes]
    return out


def unit_costs(graph: ChannelGraph, unit: np.ndarray, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(macs, time) per channel unit: the MACs that go when the unit goes (each kernel once: a depthwise
    conv's input and output channel are one unit and share their kernel), and the same plus KAPPA per
    activation element its channels carry into and out of every conv that reads or writes them, and KAPPA_EW
    per element of every standalone element-wise node's output they are in."""
    macs = np.zeros(num_units)
    time = np.zeros(num_units)
    loaded = graph.loaded
    for layer in graph.layers:
        total = layer_macs(layer, loaded)
        if not total:
            continue
        per_kernel = total / layer.num_kernels
        per_out = per_kernel * layer.c_in_g                 # one output channel: all its kernels
        per_in = per_kernel * (layer.c_out // layer.group)  # one input channel: its kernels in its group
        out_shape, in_shape = loaded.shape(layer.output), loaded.shape(layer.input)
        out_elems = float(np.prod(out_shape)) / layer.c_out if out_shape and None not in out_shape else 0.0
        in_elems = float(np.prod(in_shape)) / layer.c_in if in_shape and None not in in_shape else 0.0
        out_units, in_units = unit[layer.out_nodes], unit[layer.in_nodes]
        in_macs = np.full(in_units.size, per_in)
        if layer.c_in_g == 1 and layer.c_out == layer.c_in:  # depthwise: kernel j reads input j only
            in_macs[in_units == out_units] = 0.0
        np.add.at(macs, out_units, per_out)
        np.add.at(macs, in_units, in_macs)
        np.add.at(time, out_units, per_out + KAPPA * out_elems)
        np.add.at(time, in_units, in_macs + KAPPA * in_elems)
    for tensor in standalone_elementwise(graph):
        nodes, shape = graph.tensor_nodes[tensor], loaded.shape(tensor)
        if len(nodes) and shape and None not in shape:
            np.add.at(time, unit[nodes], KAPPA_EW * float(np.prod(shape)) / len(nodes))
    return macs, time
