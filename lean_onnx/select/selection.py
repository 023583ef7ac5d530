"""Choose the kernels to keep on a ChannelGraph: LEAN or a baseline, then redundancy pruning.

The array algorithms (path solver, thresholds, alive/used passes) live in `select.py`; this module
feeds them a ChannelGraph and turns the result into per-layer kernel keep masks and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LeanOnnxError
from ..graph.channel_graph import ChannelGraph, ConvLayer
from .baselines import threshold_keep_mask
from .lean_paths import lean_keep_mask
from .redundancy import backward_used, forward_alive
from .weights import compute_edge_weights, l1_scores

METHODS = ("lean", "sv", "l1")


@dataclass
class Selection:
    """Which kernels stay. `edge_keep` is over all edges of the graph (False for non-kernel edges)."""

    method: str
    keep_requested: float
    total: int
    num_keep: int
    selected: int
    edge_keep: np.ndarray
    from_path_edges: np.ndarray
    num_paths: int
    longest_path_edges: int
    longest_path_product: float
    removed_forward: int
    removed_backward: int
    alive: np.ndarray
    used: np.ndarray

    @property
    def kept(self) -> int:
        return int(self.edge_keep.sum())

    @property
    def keep_achieved(self) -> float:
        return self.kept / self.total if self.total else 0.0

    @property
    def from_paths(self) -> int:
        return int((self.edge_keep & self.from_path_edges).sum())

    @property
    def from_fallback(self) -> int:
        return self.kept - self.from_paths

    def layer_mask(self, layer: ConvLayer) -> np.ndarray:
        """Keep mask (c_out, c_in_g) of one layer; layers that are not prunable keep every kernel."""
        if not layer.prunable:
            return np.ones((layer.c_out, layer.c_in_g), dtype=bool)
        return self.edge_keep[layer.edges].reshape(layer.c_out, layer.c_in_g)

    def stats(self) -> dict:
        return {
            "total": self.total, "requested": self.num_keep, "selected": self.selected, "kept": self.kept,
            "keep_requested": self.keep_requested, "keep_achieved": self.keep_achieved,
            "from_paths": self.from_paths, "from_fallback": self.from_fallback,
            "removed_by_redundancy": {"forward": self.removed_forward, "backward": self.removed_backward},
            "paths": {"count": self.num_paths, "longest_edges": self.longest_path_edges,
                      "longest_product": self.longest_path_product},
        }


def select_kernels(graph: ChannelGraph, keep: float, method: str = "lean", redundancy: bool = True,
                   zeros_are_pruned: bool = False, keep_connected: bool = False) -> Selection:
    """Keep `int(keep * prunable kernels)` kernels by `method` (lean | sv | l1), then prune redundancy.

    Redundancy (lean-spec 3.5, both directions): a channel with no kept incoming kernel is dead and
    the kernels reading it go; a channel that no kept kernel, head or graph output reads is unused and
    the kernels writing it go. So the achieved keep can fall below the request, as in the reference.
    `zeros_are_pruned`: kernels that are exactly zero count as pruned already (the reference's iterative
    schedule excludes them): they are never kept, and at most the non-zero ones are requested.
    `keep_connected`: when no chain of kept kernels links a graph input to an output any more (layer
    collapse), the kernels of the input-to-output chain with the largest product of edge weights are
    added (a few kernels more than requested), so the pruned model still depends on its input.
    """
    check_keep(keep)
    if method not in METHODS:
        raise LeanOnnxError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not graph.weights_ready:
        compute_edge_weights(graph)
    prunable = graph.prunable_edges
    total = int(prunable.sum())
    num_keep = int(keep * total)
    if keep >= 1.0:
        num_keep = total
    nonzero = None
    if zeros_are_pruned:
        scores = graph.weight if method != "l1" else l1_scores(graph)
        nonzero = prunable & (scores > 0)
        num_keep = min(num_keep, int(nonzero.sum()))
    from_paths = np.zeros(graph.num_edges, dtype=bool)
    num_paths = longest = 0
    longest_product = 0.0
    if method == "lean":
        edge_keep, stats = lean_keep_mask(graph.src, graph.indptr, graph.weight, ~prunable, num_keep)
        from_paths = stats.path_edges
        num_paths, longest, longest_product = stats.num_paths, stats.longest_path_edges, stats.longest_path_product
    else:
        scores = graph.weight if method == "sv" else l1_scores(graph)
        edge_keep = threshold_keep_mask(scores, prunable, num_keep)
    edge_keep &= prunable if nonzero is None else nonzero
    if keep_connected:
        edge_keep |= _rescue_chain(graph, edge_keep, prunable)
    selected = int(edge_keep.sum())
    alive = np.ones(graph.num_nodes, dtype=bool)
    used = np.ones(graph.num_nodes, dtype=bool)
    removed_fwd = removed_bwd = 0
    if redundancy:
        edge_keep, alive, used, removed_fwd, removed_bwd = prune_redundancy(graph, edge_keep)
    return Selection(method, keep, total, num_keep, selected, edge_keep, from_paths, num_paths, longest,
                     longest_product, removed_fwd, removed_bwd, alive, used)


def prune_redundancy(graph: ChannelGraph, edge_keep: np.ndarray):
    """Redundancy pruning in both directions (lean-spec 3.5): returns (edge_keep, alive, used, kernels removed
    forward, kernels removed backward)."""
    skippable = ~graph.prunable_edges
    selected = int(edge_keep.sum())
    alive, edge_keep = forward_alive(graph.src, graph.indptr, edge_keep, skippable, graph.is_source)
    removed_fwd = selected - int(edge_keep.sum())
    used, edge_keep = backward_used(graph.src, graph.indptr, edge_keep, skippable, graph.is_terminal)
    return edge_keep, alive, used, removed_fwd, selected - removed_fwd - int(edge_keep.sum())


def inputs_reach_outputs(graph: ChannelGraph, edge_keep: np.ndarray) -> bool:
    """Whether some chain of kept kernels (and skippable edges) still leads from a graph input to what
    the outputs read. False means layer collapse: the pruned model computes a constant."""
    sources = graph.input_nodes
    reached, _ = forward_alive(graph.src, graph.indptr, edge_keep.copy(), ~graph.prunable_edges, sources)
    return bool((reached & graph.is_terminal & ~sources).any())


def _rescue_chain(graph: ChannelGraph, edge_keep: np.ndarray, prunable: np.ndarray) -> np.ndarray:
    """The prunable edges of the best input-to-output chain when the kept edges link no input to an
    output (else nothing). Best = largest sum of log edge weights; node ids are topological, so one
    pass in id order is the longest-path DP."""
    sources = graph.input_nodes
    rescue = np.zeros(graph.num_edges, dtype=bool)
    if not sources.any() or inputs_reach_outputs(graph, edge_keep):
        return rescue
    with np.errstate(divide="ignore"):
        logw = np.log(np.where(graph.weight > 0, graph.weight, 0.0))
    best = np.where(sources, 0.0, -np.inf)
    parent_edge = np.full(graph.num_nodes, -1, dtype=np.int64)
    src, indptr = graph.src, graph.indptr
    for v in np.flatnonzero(np.diff(indptr) > 0):
        lo, hi = indptr[v], indptr[v + 1]
        cand = best[src[lo:hi]] + logw[lo:hi]
        k = int(np.argmax(cand))
        if cand[k] > best[v]:
            best[v], parent_edge[v] = cand[k], lo + k
    sinks = np.flatnonzero(graph.is_terminal & ~sources & np.isfinite(best))
    if not sinks.size:
        return rescue
    v = int(sinks[np.argmax(best[sinks])])
    while parent_edge[v] >= 0:
        rescue[parent_edge[v]] = prunable[parent_edge[v]]
        v = int(src[parent_edge[v]])
    return rescue


def check_keep(keep: float) -> float:
    if not 0 < keep <= 1:
        hint = f"; did you mean {keep / 100:g}?" if 1 < keep <= 100 else ""
        raise LeanOnnxError(f"--keep is the kept fraction of kernels, in (0, 1]; got {keep:g}{hint}")
    return keep
