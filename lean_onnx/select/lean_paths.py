"""LEAN path extraction on the channel graph (lean-spec 3.1/3.2), in numba.

Everything here works on a channel graph given as flat arrays (built elsewhere):

* nodes ``0..V-1`` numbered in topological order;
* ``E`` edges in *in-CSR* order: the edges into node ``v`` are ``e in range(indptr[v], indptr[v+1])``,
  ``src[e] < v`` is the source, ``weight[e] >= 0`` the operator norm of the kernel (0 allowed: it is
  ``log = -inf`` and never lies on a path), ``skippable[e]`` marks unprunable edges (residual, pooling,
  BN, excluded layers): paths may use them, they are never kept or pruned (their keep entry is False);
* parallel edges (same ``src`` and ``dst``) may occur.

Path extraction (lean-spec 3.1/3.2)
-----------------------------------
``L(v) = max over remaining in-edges e=(u->v) of  max(L(u), 0) + log w_e``, kept only when ``>= 0``
(product >= 1); an undefined ``L(u)`` counts as 0 (product 1: "restart here").  Undefined nodes have
no best in-edge.  Repeatedly: take the node with the largest defined ``L`` (ties: highest node id, as
the reference's ``argmax`` with ``<=``), walk back through the best in-edges, keep and remove the
path's non-skippable edges (skippable ones stay and may be reused), and recompute the affected nodes
incrementally with a min-heap of node ids (reset, recompute from the remaining in-edges, push the
successors whose best in-edge comes from the recomputed node).  Stop when ``num_keep`` edges are kept,
when no node is defined, or when a path marks no edge (only skippable edges).  The whole path is always
kept, so the result can exceed ``num_keep`` by (path length - 1), as in the reference.  Then the
fallback keeps unmarked non-skippable edges by weight, descending, equal weights in edge order (a
stable sort), until ``num_keep`` is reached.

Tie rule (deterministic, used by the initial pass *and* every recompute): among the in-edges of a node
with equal candidate value ``max(L(u),0) + log w_e``, the edge with the highest ``(src[e], e)`` wins.
This is what the reference's initial pass does (edges sorted by (from, to), the later edge wins with
``cand >= current``); the reference's recompute instead follows Rust ``HashSet`` order (random per
process).  Among nodes with equal ``L`` the highest node id is the path end.

Implementation notes (none of them changes the result, which equals a full recompute of the DP after
every path with the tie rule above; the tests check this against a plain-Python version):

* argmax over nodes: a max-segment-tree, O(log V) per changed node instead of O(V) per path;
* "the successors whose best in-edge came from this node": kept as explicit children lists of the
  best-in-edge forest (O(1) to update), instead of scanning all out-edges, so no out-CSR is needed;
  successors are only pushed when the node's value actually changed (if it did not, they would
  recompute to the same value and best edge);
* the min-heap of node ids is a 64-ary bitset queue (pushes are always larger than the last pop);
* recompute of a node: each node remembers its TOPK best in-edges (as of its last full scan) and an
  upper bound on the candidates of all its other in-edges (candidates only ever decrease: edges are
  removed and L values drop).  When the best remembered candidate, evaluated with the current L values,
  beats that bound, it is the exact maximum; only otherwise are all in-edges scanned again;
* removed edges get log weight -inf in a private copy of the log weights (like zero-weight edges);
* the fallback picks the same edges as a stable descending sort, with an O(E) partition.

Deviations from the reference (all documented in lean-spec 3.2 as non-essential): float64 sums of
logs instead of float32 products (products that are exactly 1 in float32 may land a few ulps on
either side of 0 in log space, and the other way round), deterministic ties as above; "edge order" for
equal weights in the fallback is this module's edge index (in-CSR order), not the reference's
(from, to) order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .path_kernels import TOPK, _initial_dp, _mark_paths

__all__ = ["PathStats", "lean_keep_mask", "first_path"]


@dataclass
class PathStats:
    """What the path phase of `lean_keep_mask` did.

    num_paths: paths that kept at least one edge.
    from_paths: edges kept by paths.
    from_fallback: edges kept by the weight-ordered fallback.
    longest_path_edges: the largest number of non-skippable edges in one kept path (0 if none).
    longest_path_product: the weight product of that path (skippable edges included; the first such
        path found, which is also the one with the largest product among equally long ones); 0.0 if
        no path was kept.
    """

    num_paths: int
    from_paths: int
    from_fallback: int
    longest_path_edges: int
    longest_path_product: float
    path_edges: np.ndarray | None = field(default=None, repr=False, compare=False)  # bool[E]: kept by a path


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _as_graph(src, indptr):
    src = np.ascontiguousarray(src, dtype=np.int64)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    if src.ndim != 1 or indptr.ndim != 1 or indptr.size < 1:
        raise ValueError("src and indptr must be 1-D, indptr of length V+1 >= 1")
    E = src.size
    if indptr[0] != 0 or indptr[-1] != E:
        raise ValueError(f"indptr must start at 0 and end at len(src)={E}")
    if indptr.size > 1 and np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must be non-decreasing")
    V = indptr.size - 1
    if V >= 2**31 - 1:
        raise ValueError("too many nodes")
    bad = _first_bad_edge(src, indptr)
    if bad >= 0:
        raise ValueError(
            f"edge {bad}: src {src[bad]} is not a node before its destination "
            "(nodes must be numbered in topological order)"
        )
    return src, indptr


@njit(cache=True)
def _first_bad_edge(src, indptr):
    V = indptr.size - 1
    for v in range(V):
        for e in range(indptr[v], indptr[v + 1]):
            u = src[e]
            if u < 0 or u >= v:
                return e
    return -1


# ----------------------------------------------------------------------------------------------
# path extraction kernels
# ----------------------------------------------------------------------------------------------


@njit(cache=True)
def _log_weights(weight):
    out = np.empty(weight.size, np.float64)
    for e in range(weight.size):
        w = weight[e]
        out[e] = np.log(w) if w > 0.0 else -np.inf
    return out


@njit(cache=True)
def _gather_candidates(keep, weight, skippable, out):
    n = 0
    for e in range(keep.size):
        if not keep[e] and not skippable[e]:
            out[n] = weight[e]
            n += 1
    return n


@njit(cache=True)
def _mark_at_least(keep, weight, skippable, threshold, need):
    """Keep unmarked candidates with weight > threshold, then those equal to it in edge order."""
    kept = 0
    for e in range(keep.size):
        if not keep[e] and not skippable[e] and weight[e] > threshold:
            keep[e] = True
            kept += 1
    for e in range(keep.size):
        if kept >= need:
            break
        if not keep[e] and not skippable[e] and weight[e] == threshold:
            keep[e] = True
            kept += 1
    return kept


def _fallback(keep, weight, skippable, need):
    """Keep `need` more unmarked non-skippable edges, largest weight first, equal weights in edge order.

    Same set as a stable descending sort, in O(E) with an in-place partition of one candidate buffer
    (13 M edges: large temporaries cost more in page faults than the arithmetic)."""
    if need <= 0:
        return 0
    buf = np.empty(keep.size, np.float64)
    n = _gather_candidates(keep, weight, skippable, buf)
    if n <= need:
        keep[~keep & ~skippable] = True
        return int(n)
    cand = buf[:n]
    cand.partition(n - need)
    return int(_mark_at_least(keep, weight, skippable, cand[n - need], need))


def lean_keep_mask(src, indptr, weight, skippable, num_keep):
    """LEAN selection (lean-spec 3.2): which kernels to keep.

    Returns ``(keep, stats)``: ``keep`` is a bool array over the edges (skippable edges are never True)
    with at least ``min(num_keep, #non-skippable)`` entries set (paths may overshoot ``num_keep`` by
    their length - 1); ``stats`` is a `PathStats`.
    """
    src, indptr = _as_graph(src, indptr)
    E = src.size
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    skippable = np.ascontiguousarray(skippable, dtype=np.bool_)
    if weight.shape != (E,) or skippable.shape != (E,):
        raise ValueError(f"weight and skippable must have shape ({E},)")
    if E and not (np.all(np.isfinite(weight)) and weight.min() >= 0.0):
        raise ValueError("weights must be finite and >= 0")
    num_keep = int(num_keep)
    logw = _log_weights(weight)  # a private copy: removed edges get -inf
    src32 = src.astype(np.int32)  # less memory traffic in the scans
    keep, marked, num_paths, longest_edges, longest_log = _mark_paths(src32, indptr, logw, skippable, num_keep, TOPK)
    path_edges = keep.copy()
    from_fallback = _fallback(keep, weight, skippable, num_keep - int(marked))
    with np.errstate(over="ignore"):
        product = float(np.exp(longest_log)) if longest_edges > 0 else 0.0  # may be inf
    stats = PathStats(
        num_paths=int(num_paths),
        from_paths=int(marked),
        from_fallback=int(from_fallback),
        longest_path_edges=int(longest_edges),
        longest_path_product=product,
        path_edges=path_edges,
    )
    return keep, stats


def first_path(src, indptr, weight):
    """The first path the solver takes on the full graph: ``(edge ids from start to end, product)``.

    Empty array and product 0.0 when no node has a product >= 1.  (Skippable edges do not change the
    path, only whether its edges are kept.)"""
    src, indptr = _as_graph(src, indptr)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    if weight.shape != src.shape:
        raise ValueError("weight must have the shape of src")
    logw = _log_weights(weight)
    L, _, bpar, bslot, _, top_e = _initial_dp(src.astype(np.int32), indptr, logw, 1)
    defined = np.flatnonzero(bpar >= 0)
    if defined.size == 0:
        return np.empty(0, np.int64), 0.0
    vals = L[defined]
    vstar = int(defined[np.flatnonzero(vals == vals.max())[-1]])
    edges = []
    x = vstar
    while bpar[x] >= 0:
        edges.append(int(top_e[x, bslot[x]]))
        x = int(bpar[x])
    with np.errstate(over="ignore"):
        return np.array(edges[::-1], dtype=np.int64), float(np.exp(L[vstar]))
