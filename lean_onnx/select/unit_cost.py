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
"""

from __future__ import annotations

import numpy as np

from ..graph.channel_graph import ChannelGraph
from ..graph.cost import layer_macs

#: MAC-equivalents per activation element read or written by a conv (the fit in the module docstring)
KAPPA = 9.0


def unit_costs(graph: ChannelGraph, unit: np.ndarray, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(macs, time) per channel unit: the MACs that go when the unit goes (each kernel once: a depthwise
    conv's input and output channel are one unit and share their kernel), and the same plus KAPPA per
    activation element its channels carry into and out of every conv that reads or writes them."""
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
    return macs, time
