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
from functools import cache

import numpy as np

from ..graph.channel_graph import ChannelGraph, HeadRead
from ..graph.heads import head_layout
from ..select.selection import Selection
from .bypass import Bypass, bypassed_sums, components_without, cut_sums, used_without
from .constant_channels import channel_constants

#: ops whose output channel c depends only on input channel c at the same position (for Concat regions)
POSITIONAL = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Dropout", "Identity", "Cast", "MaxPool", "LpPool", "Abs",
    "Neg", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Resize", "Upsample", "Pad",
    "Slice", "Concat", "AveragePool",
}


@dataclass
class HeadSlice:
    """A linear head whose input columns follow the channels of `read.tensor`: `gemm` (node output name)
    is the Gemm/MatMul, `per_channel` columns per channel (H*W after Flatten), `values` the constant of
    each channel (NaN: not constant), `droppable` the channels whose columns may go."""

    read: HeadRead
    gemm: str
    per_channel: int
    values: np.ndarray
    droppable: np.ndarray


@dataclass
class Plan:
    """Channel keep masks per tensor (original channel order) and the Concat inputs to drop."""

    node_keep: np.ndarray
    dead: np.ndarray
    tensor_keep: dict[str, np.ndarray]
    concat_drop: dict[str, list[int]] = field(default_factory=dict)
    private: dict[str, np.ndarray] = field(default_factory=dict)  # Concat-region channels their conv reads
    zero_dead: bool = True  # False with --fold-constants: dead channels keep their bias (a constant)
    heads: list[HeadSlice] = field(default_factory=list)  # linear heads that can lose input columns
    gathers: dict[str, np.ndarray] = field(default_factory=dict)  # conv output -> input channels it reads
    bypass: dict[str, Bypass] = field(default_factory=dict)  # sum output -> (operand kept, constant operand, bias)

    def keep(self, tensor: str) -> np.ndarray | None:
        return self.tensor_keep.get(tensor)


def make_plan(graph: ChannelGraph, selection: Selection, round_channels: int = 1,
              fold_constants: bool = False, gather_below: float = 0.0) -> Plan:
    """Keep masks for every channel tensor; see the module docstring for the rules.

    `round_channels` N > 1 keeps a few removable channels more so that every channel count a conv sees
    (its input and output, and the Concat inputs and Split outputs around it) is a multiple of N (or
    unchanged): ONNX Runtime's blocked conv kernels (and TensorRT's tensor
    cores) want multiples of 8 or 16, and an odd count can make a pruned model slower than the original.
    `gather_below` F > 0: a conv whose kept kernels read at most F of the channels its (shared) input
    keeps reads them through a channel Gather and gets a narrower weight (see `_gathers`).
    """
    constants = cache(lambda: channel_constants(graph, selection, zero_dead=not fold_constants))
    heads = _linear_heads(graph, selection, fold_constants, constants)
    terminal, cut, components = graph.is_terminal, None, graph.coupling_components
    if any(h.droppable.any() for h in heads):  # constant channels read only by linear heads are unused
        terminal = graph.is_hard_terminal.copy()
        for h in heads:
            terminal[graph.tensor_nodes[h.read.tensor][~h.droppable]] = True
    bypass = bypassed_sums(graph, selection, constants)
    if bypass:  # a sum with a constant operand no longer reads it (bypass.py)
        cut, pairs_cut = cut_sums(graph, bypass)
        components = components_without(graph, pairs_cut)
    used = selection.used if terminal is graph.is_terminal and cut is None else \
        used_without(graph, selection, terminal, cut)
    must_stay = graph.is_frozen | used
    while True:  # every round keeps at least one more channel, so this ends
        node_keep = _couple(components, must_stay)
        tensor_keep = {t: node_keep[nodes] for t, nodes in graph.tensor_nodes.items()}
        plan = Plan(node_keep, ~selection.alive, tensor_keep, zero_dead=not fold_constants, heads=heads,
                    bypass=bypass)
        _private_concats(graph, selection, plan)
        more = _starved_inputs(graph, plan) or (_round_up(graph, plan, round_channels) if round_channels > 1 else [])
        if not more:
            if gather_below > 0:
                plan.gathers = _gathers(graph, selection, plan, gather_below, round_channels)
            return plan
        assert not must_stay[more].all(), "channel plan did not progress"
        must_stay[more] = True


def _gathers(graph: ChannelGraph, selection: Selection, plan: Plan, fraction: float, multiple: int) -> dict:
    """Convs that read few of the channels their input keeps (the input has other readers, so those
    channels stay): `Gather(x, read, axis=1)` in front and a weight sliced to the read channels is exact
    (the others have zero kernels) and, measured in docs/benchmarks.md, faster once the conv reads at most
    ~3/4 of them. The read set is rounded up to a multiple of `multiple` with unread channels."""
    gathers = {}
    for layer in graph.layers:
        kept = plan.tensor_keep.get(layer.input)
        if layer.group != 1 or not layer.prunable or kept is None or layer.input in plan.private:
            continue
        read = selection.layer_mask(layer).any(axis=0) & kept
        n_kept, n_read = int(kept.sum()), int(read.sum())
        target = min(n_kept, -(-max(n_read, 1) // multiple) * multiple)
        if n_kept == 0 or target > fraction * n_kept:
            continue
        read[np.flatnonzero(kept & ~read)[:target - n_read]] = True
        gathers[layer.output] = read
    return gathers


def _round_up(graph: ChannelGraph, plan: Plan, multiple: int) -> list[int]:
    """Removed channels to keep so that each channel count a blocked kernel sees (conv inputs and outputs,
    Concat inputs, Split outputs: `graph.blocked_tensors`) becomes a multiple of `multiple` (or all).
    Tensors of a private Concat region are left alone: their conv reads what the Concat keeps."""
    more = []
    for tensor, nodes in graph.blocked_tensors.items():
        if tensor in plan.private:
            continue
        keep = plan.tensor_keep[tensor]
        kept = int(keep.sum())
        if 0 < kept < len(keep) and kept % multiple:
            missing = min(multiple - kept % multiple, len(keep) - kept)
            more += nodes[np.flatnonzero(~keep)[:missing]].tolist()
    return more


def _starved_inputs(graph: ChannelGraph, plan: Plan) -> list[int]:
    """A node that stays needs at least one channel in every channel input (Concat: in one of them);
    for each that has none, the first channel allowed there is kept (it reads zeros). A Split's output
    with no channel is dropped from the Split (rewriter.py `_split`): it needs one only where a reader that
    stays has to read it, and that reader asks for it here."""
    starved = []

    def first_node(tensor):
        allowed = np.flatnonzero(plan.private.get(tensor, np.ones(len(graph.tensor_nodes[tensor]), bool)))
        return int(graph.tensor_nodes[tensor][allowed[0] if allowed.size else 0])

    for node in graph.loaded.graph.node:
        outs = [plan.keep(t) for t in node.output if t]
        if outs and all(k is not None and not k.any() for k in outs) or node.output[0] in plan.bypass:
            continue  # the node goes, or passes its other operand on (plus a constant: bypass.py)
        ins = [t for t in node.input if plan.keep(t) is not None]
        empty = [t for t in ins if not plan.keep(t).any()]
        if node.op_type == "Concat":
            empty = empty[:1] if len(empty) == len(ins) else []
        starved += [first_node(t) for t in empty]
    return starved


def _couple(label: np.ndarray, node_keep: np.ndarray) -> np.ndarray:
    """A coupled group of channels (component `label`) stays if any one of them has to stay."""
    if label.max(initial=-1) + 1 == len(label):
        return node_keep
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
        if not graph.is_channel_concat(node):
            continue
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


def _linear_heads(graph: ChannelGraph, selection: Selection, fold_constants: bool, constants) -> list[HeadSlice]:
    """Linear heads (Flatten/Reshape -> Gemm/MatMul with constant weights) and the channels whose columns
    can go: dead channels that are a known constant there (0, or any constant a Gemm bias can absorb
    with --fold-constants). A channel that is not constant at the head stays (DESIGN.md section 2).
    `constants()`: the masked model's channel constants (constant_channels.py), computed once per plan."""
    if not graph.head_reads:
        return []
    values = constants()
    dead = ~selection.alive
    heads = []
    for read in graph.head_reads:
        found = head_layout(graph.loaded, read, len(graph.tensor_nodes[read.tensor]))
        if found is None:
            continue
        gemm, per_channel = found
        value = values[read.tensor]
        constant = np.isfinite(value) if fold_constants and gemm.op_type == "Gemm" else value == 0
        droppable = constant & dead[graph.tensor_nodes[read.tensor]]
        heads.append(HeadSlice(read, gemm.output[0], per_channel, value, droppable))
    return heads
