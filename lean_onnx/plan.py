"""Which channels leave the model: liveness, coupling and per-consumer pruning (DESIGN.md section 2).

A channel may go only when that is exact. Here a channel goes when it is **unused** (no kept kernel,
head, graph output or frozen op reads it, `select.backward_used`) and not frozen, and only together with
every channel it is **coupled** to (residual operands and their sum, depthwise in/out, per-channel
scales). Channels that stay but have no kept incoming kernel are **dead**: the masked model defines
them as zero (conv bias and BatchNormalization scale/shift zeroed), and the pruned model does the same.

**Per-consumer pruning.** A channel-axis Concat whose output reaches exactly one conv (through ops that
keep channel positions: activations, spatial Slice/Concat/Pad...) is private to that conv, so its inputs
whose every kernel in that conv is pruned can be dropped from the Concat, although their producers stay
for other readers. In MS-D, where each layer has its own Concat of all earlier outputs, this is what
makes the pruned model small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .graph import ChannelGraph
from .selection import Selection

#: ops whose output channel c depends only on input channel c at the same position (for Concat regions)
POSITIONAL = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Dropout", "Identity", "Cast", "MaxPool", "LpPool", "Abs",
    "Neg", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Resize", "Upsample", "Pad",
    "Slice", "Concat", "AveragePool",
}


@dataclass
class Plan:
    """Channel keep masks per tensor (original channel order) and the Concat inputs to drop."""

    node_keep: np.ndarray
    dead: np.ndarray
    tensor_keep: dict[str, np.ndarray]
    concat_drop: dict[str, list[int]] = field(default_factory=dict)
    private: dict[str, np.ndarray] = field(default_factory=dict)  # Concat-region channels their conv reads

    def keep(self, tensor: str) -> np.ndarray | None:
        return self.tensor_keep.get(tensor)


def make_plan(graph: ChannelGraph, selection: Selection, round_channels: int = 1) -> Plan:
    """Keep masks for every channel tensor; see the module docstring for the rules.

    `round_channels` N > 1 keeps a few removable channels more so that every conv's output channel
    count is a multiple of N (or unchanged): ONNX Runtime's blocked conv kernels (and TensorRT's tensor
    cores) want multiples of 8 or 16, and an odd count can make a pruned model slower than the original.
    """
    must_stay = graph.is_frozen | selection.used
    while True:  # every round keeps at least one more channel, so this ends
        node_keep = _couple(graph, must_stay)
        tensor_keep = {t: node_keep[nodes] for t, nodes in graph.tensor_nodes.items()}
        plan = Plan(node_keep, ~selection.alive, tensor_keep)
        _private_concats(graph, selection, plan)
        more = _starved_inputs(graph, plan) or (_round_up(graph, plan, round_channels) if round_channels > 1 else [])
        if not more:
            return plan
        assert not must_stay[more].all(), "channel plan did not progress"
        must_stay[more] = True


def _round_up(graph: ChannelGraph, plan: Plan, multiple: int) -> list[int]:
    """Removed channels to keep so that each conv output count becomes a multiple of `multiple`."""
    more = []
    for layer in graph.layers:
        keep = plan.tensor_keep[layer.output]
        kept = int(keep.sum())
        if 0 < kept < len(keep) and kept % multiple:
            missing = min(multiple - kept % multiple, len(keep) - kept)
            more += layer.out_nodes[np.flatnonzero(~keep)[:missing]].tolist()
    return more


def _starved_inputs(graph: ChannelGraph, plan: Plan) -> list[int]:
    """A node that stays needs at least one channel in every channel input (Concat: in one of them);
    for each that has none, the first channel allowed there is kept (it reads zeros)."""
    starved = []

    def first_node(tensor):
        allowed = np.flatnonzero(plan.private.get(tensor, np.ones(len(graph.tensor_nodes[tensor]), bool)))
        return int(graph.tensor_nodes[tensor][allowed[0] if allowed.size else 0])

    for node in graph.loaded.graph.node:
        outs = [plan.keep(t) for t in node.output if t]
        if outs and all(k is not None and not k.any() for k in outs):
            continue  # the node goes
        ins = [t for t in node.input if plan.keep(t) is not None]
        empty = [t for t in ins if not plan.keep(t).any()]
        if node.op_type == "Concat":
            empty = empty[:1] if len(empty) == len(ins) else []
        elif node.op_type == "Split":
            empty += [t for t in node.output if plan.keep(t) is not None and not plan.keep(t).any()]
        starved += [first_node(t) for t in empty]
    return starved


def _couple(graph: ChannelGraph, node_keep: np.ndarray) -> np.ndarray:
    """A coupled group of channels stays if any one of them has to stay."""
    pairs = graph.coupling_pairs
    if not len(pairs):
        return node_keep
    n = graph.num_nodes
    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(adj, directed=False)
    group_keep = np.zeros(label.max() + 1, dtype=bool)
    np.logical_or.at(group_keep, label, node_keep)
    return group_keep[label]


def _private_concats(graph: ChannelGraph, selection: Selection, plan: Plan) -> None:
    loaded = graph.loaded
    layer_of_input = {}
    for layer in graph.layers:
        if layer.group == 1 and layer.op == "Conv":
            layer_of_input.setdefault(layer.input, []).append(layer)
    outputs = {o.name for o in loaded.graph.output}
    for node in loaded.graph.node:
        if node.op_type != "Concat" or node.output[0] not in graph.tensor_nodes:
            continue
        if len(graph.tensor_nodes[node.output[0]]) != sum(len(graph.tensor_nodes.get(t, ())) for t in node.input):
            continue  # not a channel-axis concat of tracked inputs
        region, conv_index = _region(loaded, node.output[0], layer_of_input, outputs, graph.tensor_nodes)
        if conv_index is None:
            continue
        conv = graph.layers[conv_index]
        read = selection.layer_mask(conv).any(axis=0)
        offsets = np.cumsum([0] + [len(graph.tensor_nodes[t]) for t in node.input])
        drop = [k for k in range(len(node.input)) if not read[offsets[k]:offsets[k + 1]].any()]
        if len(drop) == len(node.input):
            drop = drop[1:]  # a Concat needs an input; the conv reads zeros from it
        if not drop:
            continue
        private = np.ones(offsets[-1], dtype=bool)
        for k in drop:
            private[offsets[k]:offsets[k + 1]] = False
        for tensor in region:
            plan.tensor_keep[tensor] = plan.tensor_keep[tensor] & private
            plan.private[tensor] = private
        plan.concat_drop[node.output[0]] = drop


def _region(loaded, start: str, layer_of_input, outputs, tracked):
    """Tensors reachable from `start` through POSITIONAL ops, and the single conv they all end in."""
    region, stack, convs, visited = {start}, [start], set(), []
    while stack:
        tensor = stack.pop()
        if tensor in outputs:
            return region, None
        for node in loaded.consumers.get(tensor, []):
            layers = [layer for layer in layer_of_input.get(tensor, []) if layer.output == node.output[0]]
            if layers and node.input[0] == tensor and tensor not in node.input[1:]:
                convs.add(layers[0].index)
                continue
            if node.op_type not in POSITIONAL or (node.input[0] != tensor and node.op_type != "Concat"):
                return region, None
            if node.op_type in ("Slice", "Concat", "Pad") and not _spatial_only(loaded, node):
                return region, None
            visited.append(node)
            for out in node.output:
                if out not in region:
                    region.add(out)
                    stack.append(out)
    # every channel-carrying input of the ops inside must come from the region (same channel positions)
    if len(convs) != 1 or any(t in tracked and t not in region for node in visited for t in node.input):
        return region, None
    return region, convs.pop()


def _spatial_only(loaded, node) -> bool:
    """Slice/Concat/Pad that never touch the channel axis and whose inputs are all in the region."""
    shape_in, shape_out = loaded.shape(node.input[0]), loaded.shape(node.output[0])
    if not shape_in or not shape_out or len(shape_in) < 2 or shape_in[1] != shape_out[1]:
        return False
    if node.op_type == "Concat":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(shape_out)
        return axis >= 2
    return True
