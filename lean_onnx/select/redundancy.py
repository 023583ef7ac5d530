"""Redundancy pruning (lean-spec 3.5) on the channel graph's arrays: `forward_alive` (a channel with no
conducting in-edge from a live channel is dead, the kernels reading it go) and `backward_used` (a channel
nothing kept reads is unused, the kernels writing it go).

The graph comes as flat arrays: nodes in topological order, edges in in-CSR order (`src`, `indptr`),
`skippable` edges that conduct but are never kept or pruned (see `lean_paths.py`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lean_paths import _as_graph

# ----------------------------------------------------------------------------------------------
# redundancy (lean-spec 3.5)
# ----------------------------------------------------------------------------------------------


@njit(cache=True)
def _forward_alive(src, indptr, keep, skippable, is_source):
    V = indptr.size - 1
    alive = np.zeros(V, np.bool_)
    out = np.zeros(src.size, np.bool_)
    for v in range(V):
        a = is_source[v]
        for e in range(indptr[v], indptr[v + 1]):
            if alive[src[e]]:
                if skippable[e]:
                    a = True
                elif keep[e]:
                    a = True
                    out[e] = True
        alive[v] = a
    return alive, out


@njit(cache=True)
def _backward_used(src, indptr, keep, skippable, is_terminal):
    V = indptr.size - 1
    used = np.zeros(V, np.bool_)
    out = np.zeros(src.size, np.bool_)
    for v in range(V - 1, -1, -1):
        # every successor of v has a larger id and has already pushed into used[v]
        if is_terminal[v]:
            used[v] = True
        if used[v]:
            for e in range(indptr[v], indptr[v + 1]):
                if skippable[e]:
                    used[src[e]] = True
                elif keep[e]:
                    used[src[e]] = True
                    out[e] = True
    return used, out


def _redundancy_args(src, indptr, edge_keep, skippable, node_flag, flag_name):
    src, indptr = _as_graph(src, indptr)
    E = src.size
    V = indptr.size - 1
    edge_keep = np.ascontiguousarray(edge_keep, dtype=np.bool_)
    skippable = np.ascontiguousarray(skippable, dtype=np.bool_)
    node_flag = np.ascontiguousarray(node_flag, dtype=np.bool_)
    if edge_keep.shape != (E,) or skippable.shape != (E,):
        raise ValueError(f"edge_keep and skippable must have shape ({E},)")
    if node_flag.shape != (V,):
        raise ValueError(f"{flag_name} must have shape ({V},)")
    return src, indptr, edge_keep, skippable, node_flag


def forward_alive(src, indptr, edge_keep, skippable, is_source):
    """Forward redundancy (lean-spec 3.5 rule 1).

    An edge conducts if it is skippable or kept.  A node is alive if ``is_source[v]`` or some conducting
    in-edge comes from an alive node.  Returns ``(alive, keep)``: ``keep`` drops the kept edges whose
    source is dead (deaths cascade forward in one pass); skippable entries are False.
    """
    args = _redundancy_args(src, indptr, edge_keep, skippable, is_source, "is_source")
    return _forward_alive(*args)


def backward_used(src, indptr, edge_keep, skippable, is_terminal):
    """Backward redundancy: a node is used if ``is_terminal[v]`` or some conducting out-edge goes to a
    used node.  Returns ``(used, keep)``: ``keep`` drops the kept edges whose destination is unused;
    skippable entries are False."""
    args = _redundancy_args(src, indptr, edge_keep, skippable, is_terminal, "is_terminal")
    return _backward_used(*args)
