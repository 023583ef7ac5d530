"""Scale-invariant chain values per channel: LEAN's idea at channel granularity (docs/budgets.md).

LEAN keeps the chains of kernels whose products of operator norms are largest. On trained networks the
raw products are not comparable between layers (BatchNormalization folded in, weight decay, layers of
different widths make some layers' norms all small, others all large), so the reference's ">= 1" rule
finds few or no chains there. Here every edge weight is divided by the *median* positive weight of its
layer (kernel edges) or of its op's channels (per-channel scale edges): a typical kernel of every layer
has weight 1, and what ranks a chain is how much stronger than typical its kernels are, layer by layer.

In log space (float64), with sources = graph inputs (and unknown ops' outputs), terminals = graph outputs
and linear heads:

    F(v) = max over in-edges e = (u -> v) of F(u) + log w'(e)      (best chain from a source to v)
    B(u) = max over out-edges e = (u -> v) of log w'(e) + B(v)     (best chain from u to a terminal)

F(v) + B(v) is the log-product of the best input-to-output chain through v. Every channel of the best
chain has the maximum value, so sorting channels by it keeps whole chains, best first; a channel shared by
chains counts with the best of them. Zero kernels (log -inf) carry nothing; a channel on no complete chain
gets -inf.

What the budget ranks is the chain value less the median chain value of the channel's layer
(`centred_chain_values`): how much better the best chain through a channel is than the typical channel's
of the same layer. Without it a chain gains about one log unit per layer it crosses (a layer's best kernel
is well above its median), so the layers on the longest routes outrank the rest whole (YOLOv8n: the best
chain through the P3 head is 66.7, through P5 86.6, and lean left the P3/P4 heads at their floor;
docs/budgets.md). The l1/sv baselines are centred the same way (their log score is 0 at the layer's median).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..graph.channel_graph import ChannelGraph


def normalised_log_weights(graph: ChannelGraph) -> np.ndarray:
    """log(w / median positive w of the edge's group): groups are conv layers for kernel edges (each layer's
    edges are one contiguous run) and the destination tensor for the other edges (per-channel scales;
    residual sums have weight 1 = log 0)."""
    logw = np.full(graph.num_edges, -np.inf)
    positive = graph.weight > 0
    np.log(graph.weight, out=logw, where=positive)
    for layer in graph.layers:
        run = logw[layer.edges]
        finite = run[np.isfinite(run)]
        if finite.size:
            run -= np.median(finite)
    other = np.flatnonzero(graph.edge_layer < 0)
    if other.size:
        node_tensor = np.full(graph.num_nodes, -1, np.int64)
        for k, nodes in enumerate(graph.tensor_nodes.values()):
            node_tensor[nodes] = np.where(node_tensor[nodes] < 0, k, node_tensor[nodes])
        dst = np.searchsorted(graph.indptr, other, side="right") - 1
        group = node_tensor[dst]
        for g in np.unique(group[group >= 0]):
            edges = other[(group == g) & np.isfinite(logw[other])]
            if edges.size:
                logw[edges] -= np.median(logw[edges])
    return logw


@njit(cache=True)
def _forward(src, indptr, logw, is_source):
    n = indptr.size - 1
    f = np.full(n, -np.inf)
    for v in range(n):
        best = 0.0 if is_source[v] else -np.inf
        for e in range(indptr[v], indptr[v + 1]):
            cand = f[src[e]] + logw[e]
            if cand > best:
                best = cand
        f[v] = best
    return f


@njit(cache=True)
def _backward(src, indptr, logw, is_terminal):
    n = indptr.size - 1
    b = np.full(n, -np.inf)
    for v in range(n):
        if is_terminal[v]:
            b[v] = 0.0
    for v in range(n - 1, -1, -1):
        if b[v] == -np.inf:
            continue
        for e in range(indptr[v], indptr[v + 1]):
            cand = logw[e] + b[v]
            if cand > b[src[e]]:
                b[src[e]] = cand
    return b


def chain_values(graph: ChannelGraph, logw: np.ndarray | None = None) -> np.ndarray:
    """F(v) + B(v) for every channel node v (module docstring); -inf where no complete chain passes."""
    if logw is None:
        logw = normalised_log_weights(graph)
    forward = _forward(graph.src, graph.indptr, logw, graph.is_source)
    backward = _backward(graph.src, graph.indptr, logw, graph.is_terminal)
    return forward + backward


def centred_chain_values(graph: ChannelGraph, values: np.ndarray | None = None) -> np.ndarray:
    """The chain value of every conv output channel less the median of its layer's finite chain values
    (module docstring); -inf for channels that are no conv output and for those on no complete chain."""
    if values is None:
        values = chain_values(graph)
    centred = np.full(graph.num_nodes, -np.inf)
    for layer in graph.layers:
        own = values[layer.out_nodes]
        finite = np.isfinite(own)
        if finite.any():
            centred[layer.out_nodes] = own - np.median(own[finite])
    return centred


def magnitude_scores(graph: ChannelGraph, kernel_scores: np.ndarray, squared: bool) -> np.ndarray:
    """Per-channel baseline scores: the norm of each conv output channel's kernels (`squared`: the l2 norm
    of the kernels' scores, as `sv`; otherwise their sum, as `l1`), divided by the layer's median channel
    score so that layers compare (the same per-layer normalisation as the chain values). 0 for channels
    that are no conv output."""
    scores = np.zeros(graph.num_nodes)
    for layer in graph.layers:
        per_kernel = kernel_scores[layer.edges].reshape(layer.c_out, layer.c_in_g)
        channel = np.sqrt((per_kernel ** 2).sum(1)) if squared else per_kernel.sum(1)
        typical = np.median(channel[channel > 0]) if (channel > 0).any() else 1.0
        scores[layer.out_nodes] = channel / typical
    return scores
