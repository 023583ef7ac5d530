"""Residual branches: the part of a network that a residual sum adds to its identity skip.

In `y = x + f(x)` (ResNet, MobileNetV2/V3 inverted residuals, YOLO bottlenecks) the ops of `f` that only
feed this sum form a *branch*. When every channel inside the branch is removed, the branch's operand of
the sum is exactly zero in the masked model, `y = x`, and the whole branch can leave the pruned model
(rewrite/plan.py bypasses the sum): fewer ops, not only thinner ones. The budget's `--drop-blocks`
(select/blocks.py) chooses branches to remove this way; the output still depends on the input through
the skip.

A sum qualifies when it adds two channel tensors of the same shape as its output, one of them (the skip)
reaches it through no conv or linear layer that the other does not share (an identity shortcut; a
projection shortcut is not bypassed), every op of the other operand's own ancestry (the branch) feeds
only the branch or the sum, and the branch reads channels from outside only through its layers (so that
with the layers' channels gone nothing reaches the operand: `x * se(x)` is no branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .channel_graph import ChannelGraph, node_name

#: ops that mix channels or positions with weights: their presence marks a branch (and a projection skip)
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class ResidualBranch:
    """`add` (node name) computes `output` = `skip` + `branch`; `layers` are the indices of the conv
    layers inside the branch, `nodes` the channel nodes of the tensors the branch computes (the branch
    operand included), `tensors` those tensors' names."""

    add: str
    output: str
    skip: str
    branch: str
    layers: tuple[int, ...]
    nodes: np.ndarray
    tensors: tuple[str, ...]


def same_shape_sum(graph: ChannelGraph, node) -> tuple[str, str] | None:
    """The two operands of `node` when it is an Add/Sum of two channel tensors whose (known) shape is its
    output's, so that one operand being zero makes the sum the other operand exactly; else None."""
    if node.op_type not in ("Add", "Sum") or len(node.input) != 2 or node.output[0] not in graph.tensor_nodes:
        return None
    shape = graph.loaded.shape(node.output[0])
    if not shape or None in shape or any(t not in graph.tensor_nodes or graph.loaded.shape(t) != shape
                                         for t in node.input):
        return None
    return node.input[0], node.input[1]


def residual_branches(graph: ChannelGraph) -> list[ResidualBranch]:
    """Every residual branch of the graph (see the module docstring), in node order."""
    loaded = graph.loaded
    nodes = list(loaded.graph.node)
    producer = {t: k for k, node in enumerate(nodes) for t in node.output if t}
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(nodes):
        for t in node.input:
            readers.setdefault(t, []).append(k)
    outputs = {o.name for o in loaded.graph.output}
    layer_of = {layer.output: layer.index for layer in graph.layers}
    memo: dict[str, frozenset[int]] = {}

    def ancestors(tensor: str) -> frozenset[int]:
        if tensor in memo:
            return memo[tensor]
        found, stack = set(), [tensor]
        while stack:
            k = producer.get(stack.pop())
            if k is None or k in found:
                continue
            found.add(k)
            stack.extend(t for t in nodes[k].input if t)
        memo[tensor] = frozenset(found)
        return memo[tensor]

    found = []
    for k, node in enumerate(nodes):
        operands = same_shape_sum(graph, node)
        if operands is None:
            continue
        a, b = operands
        for skip, branch in ((a, b), (b, a)):
            own = ancestors(branch) - ancestors(skip)
            if any(nodes[j].op_type in _WEIGHTED for j in ancestors(skip) - ancestors(branch)):
                continue  # a projection shortcut (or no shortcut at all)
            if not any(nodes[j].op_type in _WEIGHTED for j in own):
                continue
            if any(t in graph.tensor_nodes and producer.get(t) not in own and nodes[j].op_type not in _WEIGHTED
                   for j in own for t in nodes[j].input):
                continue  # the skip's channels reach the operand not through a layer (x * se(x)): it stays
            made = [t for j in own for t in nodes[j].output if t]
            if any(t in outputs or any(r not in own and r != k for r in readers.get(t, ())) for t in made):
                continue  # something outside reads the branch: it cannot go
            tensors = tuple(t for t in made if t in graph.tensor_nodes)
            layers = tuple(sorted(layer_of[t] for t in made if t in layer_of))
            channel_nodes = np.unique(np.concatenate([graph.tensor_nodes[t] for t in tensors]))
            outside = np.concatenate([graph.tensor_nodes[t] for t in (skip, node.output[0])])
            if np.isin(channel_nodes, outside).any() or not layers:
                continue
            found.append(ResidualBranch(node_name(node), node.output[0], skip, branch, layers, channel_nodes,
                                        tensors))
            break
    return found
