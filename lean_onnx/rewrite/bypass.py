"""Residual sums with an operand that is a known constant in the masked model: `y = x + 0` becomes `y = x`,
and `y = x + c` (c not zero, e.g. with `--fold-constants`) becomes `y = x + c` with `c` an initializer.

When the selection removes every channel inside a residual branch (graph/branches.py; `--drop-blocks`
chooses such branches, and `--keep` can empty one too), the branch's operand of the sum is 0 in the masked
model (DESIGN.md section 2: channels with no kept kernel are zero). The sum then equals its other operand
exactly, so the pruned model replaces it by an Identity of that operand, and nothing reads the branch any
more: its channels are unused and every op of the branch leaves the model, where without the bypass a
one-channel stub of each op would stay to feed zeros into the sum.

With `--fold-constants` the masked model keeps the biases of dead channels, so the emptied branch's
operand is not zero but its last layer's constant act(bias), channel by channel (constant_channels.py):
then the sum adds that constant, as an initializer, to the other operand, and the branch goes just the
same (before, one-channel stubs of the branch's ops stayed to compute the constant). The same holds for any
other non-zero constant an emptied operand can be (a dead channel through a Sigmoid is 0.5).

For the plan (plan.py) a bypassed sum no longer reads the constant operand: the operand's channels are
uncoupled from the sum and the other operand, and the sum's conducting edges from them no longer make
them used.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..graph.branches import same_shape_sum
from ..graph.channel_graph import ChannelGraph, pair_components
from ..select.redundancy import backward_used
from ..select.selection import Selection


class Bypass(NamedTuple):
    """A bypassed sum: `other` stays, `operand` (a constant) is no longer read; `bias` is None when the
    constant is 0 in every channel (the sum becomes an Identity), else its value per channel of the sum."""

    other: str
    operand: str
    bias: np.ndarray | None = None


def bypassed_sums(graph: ChannelGraph, selection: Selection, constants) -> dict[str, Bypass]:
    """{sum output: Bypass} for every two-operand Add/Sum whose operands and output have one shape
    (`graph.branches.same_shape_sum`) and one of whose operands has no live channel and is a known constant
    in every channel of the masked model: exactly zero (the other operand not), or a non-zero constant
    (act(bias) with `--fold-constants`; the other operand not wholly constant); `constants()` gives the
    masked model's channel constants (constant_channels.py), asked for only when an operand has no live
    channel."""
    tracked, alive = graph.tensor_nodes, selection.alive
    candidates = []
    for node in graph.loaded.graph.node:
        operands = same_shape_sum(graph, node)
        if operands is None:
            continue
        for operand, other in ((operands[1], operands[0]), operands):
            if not alive[tracked[operand]].any():  # cheap first test: a constant operand has no live channel
                candidates.append((node.output[0], other, operand))
                break
    if not candidates:
        return {}
    values, found = constants(), {}
    for out, other, operand in candidates:
        value = values[operand]
        if (value == 0).all():
            if not (values[other] == 0).all():
                found[out] = Bypass(other, operand)
        elif np.isfinite(value).all() and not np.isfinite(values[other]).all():
            found[out] = Bypass(other, operand, value)
    return found


def cut_sums(graph: ChannelGraph, bypass: dict[str, Bypass]) -> tuple[np.ndarray, np.ndarray]:
    """(edge mask, coupling-pair mask) of what the bypassed sums no longer do: the edges from each constant
    operand's channels into the sum's, and the coupling pairs between that operand and the sum or the
    other operand. Only the edges into the sums' channels are looked at (a few per channel)."""
    tracked, indptr = graph.tensor_nodes, graph.indptr
    edges = np.zeros(graph.num_edges, dtype=bool)
    pairs_cut = np.zeros(len(graph.coupling_pairs), dtype=bool)
    for out, (other, operand, _) in bypass.items():
        gone, sums = tracked[operand], tracked[out]
        into = np.concatenate([np.arange(indptr[v], indptr[v + 1]) for v in sums])
        edges[into[np.isin(graph.src[into], gone)]] = True
        if len(graph.coupling_pairs):
            near = np.concatenate([sums, tracked[other]])
            a, b = graph.coupling_pairs[:, 0], graph.coupling_pairs[:, 1]
            pairs_cut |= (np.isin(a, gone) & np.isin(b, near)) | (np.isin(b, gone) & np.isin(a, near))
    return edges, pairs_cut


def used_without(graph: ChannelGraph, selection: Selection, terminal: np.ndarray,
                 cut: np.ndarray | None = None) -> np.ndarray:
    """Channels used (read by a kept kernel, or through conducting edges by something used, up to
    `terminal`) once the edges `cut` (if any) conduct no more."""
    keep, conducting = selection.edge_keep, ~graph.prunable_edges
    if cut is not None:
        keep, conducting = keep & ~cut, conducting & ~cut
    used, _ = backward_used(graph.src, graph.indptr, keep, conducting, terminal)
    return used


def components_without(graph: ChannelGraph, pairs_cut: np.ndarray) -> np.ndarray:
    """Coupling components (channels that leave together) without the pairs `pairs_cut`."""
    return pair_components(graph.num_nodes, graph.coupling_pairs[~pairs_cut])
