"""Kernel selection arrays: the magnitude baselines (lean-spec 6) and redundancy (lean-spec 3.5);
LEAN's path extraction lives in `paths.py` and is re-exported here.

The channel graph comes as flat arrays (see `paths.py`): nodes in topological order, edges in
in-CSR order (`src`, `indptr`), `skippable` edges that conduct but are never kept or pruned.

Public API: `lean_keep_mask`, `first_path`, `PathStats` (from paths.py), `threshold_keep_mask`,
`forward_alive`, `backward_used`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .paths import PathStats, _as_graph, first_path, lean_keep_mask

__all__ = ["PathStats", "lean_keep_mask", "first_path", "threshold_keep_mask", "forward_alive", "backward_used"]


# ----------------------------------------------------------------------------------------------
# baselines (lean-spec 6)
# ----------------------------------------------------------------------------------------------


def threshold_keep_mask(scores, candidates, num_keep):
    """IndivSV / IndivL1 global magnitude selection (lean-spec 6).

    Among candidate edges with score > 0 (0 = already pruned, excluded), with ``n`` of them:
    ``perc = 1 - num_keep / n``, ``theta = np.percentile(scores, 100*perc)`` (linear interpolation),
    keep the candidates with ``score >= theta`` (ties at theta are all kept, so the count may exceed
    ``num_keep``).  ``num_keep >= n`` keeps all of them; ``num_keep <= 0`` keeps none (the reference's
    formula would keep the maximum-score kernels).
    """
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.bool_)
    if scores.shape != candidates.shape or scores.ndim != 1:
        raise ValueError("scores and candidates must be 1-D arrays of the same length")
    live = candidates & (scores > 0)
    n = int(np.count_nonzero(live))
    num_keep = int(num_keep)
    if num_keep >= n:
        return live
    if num_keep <= 0:
        return np.zeros_like(live)
    perc = 1.0 - num_keep / n
    theta = np.percentile(scores[live], 100.0 * perc)
    return live & (scores >= theta)


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
