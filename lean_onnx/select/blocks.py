"""`--drop-blocks F`: meet a budget partly by removing whole residual branches (depth), not only channels.

A residual branch (graph/branches.py) adds `f(x)` to an identity skip `x`. Its *gain* is LEAN's quantity
at block level: the largest product of operator norms (BN folded, raw: not normalised) along a chain of
kernels from the branch's input to its output. The skip is a chain of product 1, so unlike the raw
products of whole input-to-output chains (which the scale-invariant chain values replace, chain_values.py)
a branch's gain is measured against a fixed reference: a branch of small gain adds little to what the
skip carries, and is the first to go.

Why at all: on a CPU a pruned model's time does not fall with its MACs alone. Every op has a fixed cost,
and the element-wise ops around convs shrink no faster than their channels; removing a whole branch
removes its ops. Measured on the trained PP-OCR direction classifier (docs/budgets.md): removing every
residual branch leaves 0.28 of the MACs and runs 2.9x faster (0.81 x the MACs ratio), where channel
pruning to 0.26 of the MACs runs 2.2x faster (0.57 x).

For a target ratio, the branches are taken in order of increasing gain, at most `F` of them, each while
the model without the branches dropped so far and this one still has at least the target's MACs with all
its other channels: the rest of the budget is met with channels, as without `--drop-blocks`.
"""

from __future__ import annotations

import numpy as np

from ..graph.branches import ResidualBranch, residual_branches
from ..graph.channel_graph import ChannelGraph
from .chain_values import _forward


def branch_gains(graph: ChannelGraph, branches: list[ResidualBranch]) -> np.ndarray:
    """log of each branch's gain: the best raw chain product from the channels the branch reads to its
    operand of the sum (one forward pass over the edges into the branches' channels)."""
    if not branches:
        return np.zeros(0)
    inside = np.zeros(graph.num_nodes, dtype=bool)
    for branch in branches:
        inside[branch.nodes] = True
    into = inside[graph.dst]
    logw = np.full(graph.num_edges, -np.inf)
    np.log(graph.weight, out=logw, where=into & (graph.weight > 0))
    is_source = np.zeros(graph.num_nodes, dtype=bool)
    is_source[graph.src[into & ~inside[graph.src]]] = True
    forward = _forward(graph.src, graph.indptr, logw, is_source)
    return np.array([forward[graph.tensor_nodes[b.branch]].max() for b in branches])


class BlockDrops:
    """The droppable branches of a channel budget: their units, gains and MACs (see the module docstring)."""

    def __init__(self, graph: ChannelGraph, unit: np.ndarray, removable: np.ndarray, layer_macs: np.ndarray,
                 fraction: float):
        self.fraction = fraction
        self.branches, self.units = [], []
        for branch in residual_branches(graph) if fraction > 0 else []:
            outside = np.concatenate([graph.tensor_nodes[t] for t in (branch.skip, branch.output, branch.branch)])
            units = np.setdiff1d(unit[branch.nodes], unit[outside])
            if units.size and removable[units].all():
                self.branches.append(branch)
                self.units.append(units)
        self.gain = branch_gains(graph, self.branches)
        self.macs = np.array([float(layer_macs[list(b.layers)].sum()) for b in self.branches])
        self.order = np.argsort(self.gain, kind="stable")
        self.limit = int(round(fraction * len(self.branches)))

    def for_target(self, full_macs: float, target_macs: float) -> list[int]:
        """Indices of the branches to drop so that `full_macs` (every channel kept) less theirs stays at or
        above `target_macs`: the lowest-gain first, at most `fraction` of them."""
        chosen, left = [], full_macs
        for k in self.order[:self.limit]:
            if left - self.macs[k] >= target_macs:
                chosen.append(int(k))
                left -= self.macs[k]
        return chosen

    def unit_mask(self, chosen: list[int], num_units: int) -> np.ndarray:
        mask = np.zeros(num_units, dtype=bool)
        for k in chosen:
            mask[self.units[k]] = True
        return mask
