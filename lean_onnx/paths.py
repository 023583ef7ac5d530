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


TOPK = 8  # in-edge candidates remembered per node (see _scan / _evaluate)


@njit(cache=True)
def _scan(v, src, indptr, logw, L, bound, bpar, bslot, rec, top_e, tc, tu, te, tw):
    """Full recompute of node v from its in-edges (tc/tu/te/tw: scratch of length k).

    Removed edges have logw = -inf (like zero-weight edges: never usable).  Sets L[v] (0.0 if
    undefined) and its best in-edge: source bpar[v] and slot bslot[v] (both -1 if undefined), with the
    edge id in top_e[v, bslot[v]].  Remembers the (up to k) best in-edges with a candidate >= 0, best
    first: log weight rec[v, i] (-inf for an empty slot), source rec[v, k + i] (as a float), edge
    top_e[v, i]; and in bound[v] the largest candidate among the other in-edges (-1.0 if none is >= 0).
    Candidates only ever decrease (edges are removed, L values drop), so bound[v] stays an upper bound
    for every in-edge not remembered, and an in-edge whose candidate is < 0 can never be used again."""
    k = tc.size
    n = 0
    b = -1.0
    lim = 0.0  # candidates below lim can neither be remembered nor be used
    for e in range(indptr[v], indptr[v + 1]):
        lw = logw[e]
        u = src[e]
        c = L[u] + lw
        if c < lim:
            b = max(b, c)
            continue
        if n == k:
            # c >= the weakest remembered candidate: does (c, src, edge) beat it?
            if c == lim and (u < tu[k - 1] or (u == tu[k - 1] and e < te[k - 1])):
                b = c
                continue
            b = max(b, lim)  # the weakest one is evicted
            i = k - 1
        else:
            i = n
            n += 1
        # insertion: move weaker entries down
        while i > 0:
            pc = tc[i - 1]
            if c > pc or (c == pc and (u > tu[i - 1] or (u == tu[i - 1] and e > te[i - 1]))):
                tc[i] = pc
                tu[i] = tu[i - 1]
                te[i] = te[i - 1]
                tw[i] = tw[i - 1]
                i -= 1
            else:
                break
        tc[i] = c
        tu[i] = u
        te[i] = e
        tw[i] = lw
        if n == k:
            lim = tc[k - 1]
    for i in range(n):
        rec[v, i] = tw[i]
        rec[v, k + i] = tu[i]
        top_e[v, i] = te[i]
    for i in range(n, k):
        rec[v, i] = -np.inf
        rec[v, k + i] = 0.0
        top_e[v, i] = -1
    bound[v] = b if b >= 0.0 else -1.0
    if n > 0:
        L[v] = tc[0]
        bpar[v] = tu[0]
        bslot[v] = 0
    else:
        L[v] = 0.0
        bpar[v] = -1
        bslot[v] = -1


@njit(cache=True, inline="always")
def _evaluate(v, src, indptr, logw, L, bound, bpar, bslot, rec, top_e, tc, tu, te, tw):
    """Recompute node v (its predecessors are final): from the remembered in-edges when that is
    provably exact (their best current candidate beats the bound of all the others), else by _scan.
    Gives exactly what a full recompute gives (same value, same best edge).  Removed remembered edges
    have a log weight of -inf."""
    k = tc.size
    best = 0.0
    bu = -1
    bi = -1
    for i in range(k):
        lw = rec[v, i]
        if lw == -np.inf:
            continue
        u = np.int64(rec[v, k + i])
        c = L[u] + lw
        if c >= 0.0:
            if bi < 0 or c > best or (c == best and (u > bu or (u == bu and top_e[v, i] > top_e[v, bi]))):
                best = c
                bu = u
                bi = i
    if bi >= 0 and best > bound[v]:
        L[v] = best
        bpar[v] = bu
        bslot[v] = bi
    elif bi < 0 and bound[v] < 0.0:
        L[v] = 0.0
        bpar[v] = -1
        bslot[v] = -1
    else:
        _scan(v, src, indptr, logw, L, bound, bpar, bslot, rec, top_e, tc, tu, te, tw)


@njit(cache=True)
def _initial_dp(src, indptr, logw, k):
    """The initial pass (lean-spec 3.2 step 1), pull-style in node order, with the per-node memory
    used by the incremental recomputes.  Returns L, bound, bpar, bslot, rec, top_e."""
    V = indptr.size - 1
    L = np.zeros(V, np.float64)
    bound = np.full(V, -1.0, np.float64)
    bpar = np.full(V, -1, np.int64)
    bslot = np.full(V, -1, np.int64)
    rec = np.empty((V, 2 * k), np.float64)
    top_e = np.empty((V, k), np.int64)
    tc = np.empty(k, np.float64)
    tu = np.empty(k, np.int64)
    te = np.empty(k, np.int64)
    tw = np.empty(k, np.float64)
    for v in range(V):
        _scan(v, src, indptr, logw, L, bound, bpar, bslot, rec, top_e, tc, tu, te, tw)
    return L, bound, bpar, bslot, rec, top_e


@njit(cache=True, inline="always")
def _better(a, b, L):
    """The better of two segment-tree entries (node ids, -1 = empty): larger L, then larger id."""
    if a < 0:
        return b
    if b < 0:
        return a
    la = L[a]
    lb = L[b]
    if la > lb:
        return a
    if lb > la:
        return b
    return a if a > b else b


@njit(cache=True, inline="always")
def _tree_set(tree, P, v, defined, L):
    i = P + v
    tree[i] = v if defined else -1
    i >>= 1
    while i >= 1:
        nb = _better(tree[2 * i], tree[2 * i + 1], L)
        if tree[i] == nb and nb != v:
            # the winner here neither was nor is v, and its value did not change: nothing above changes
            break
        tree[i] = nb
        i >>= 1


# A monotone priority queue of node ids: a 64-ary bitset tree (level 0 = one bit per node, each
# higher level one bit per non-empty word below; the top level is one word).  push and pop-min are
# O(log64 V) word operations.
_DEBRUIJN64 = 0x03F79D71B4CB0A89
_CTZ_TABLE = np.zeros(64, np.int64)
for _i in range(64):
    _CTZ_TABLE[((1 << _i) * _DEBRUIJN64 % (1 << 64)) >> 58] = _i
del _i


@njit(cache=True, inline="always")
def _ctz(x, tab):
    low = x & (~x + np.uint64(1))
    return tab[(low * np.uint64(_DEBRUIJN64)) >> np.uint64(58)]


@njit(cache=True)
def _bits_new(n):
    """Level offsets (levels + 1 entries) and zeroed words of a bitset queue for ids 0..n-1."""
    nlev = 1
    m = (max(n, 1) + 63) // 64
    while m > 1:
        m = (m + 63) // 64
        nlev += 1
    off = np.zeros(nlev + 1, np.int64)
    m = max(n, 1)
    for lev in range(nlev):
        m = (m + 63) // 64
        off[lev + 1] = off[lev] + m
    return off, np.zeros(off[nlev], np.uint64)


@njit(cache=True, inline="always")
def _bits_push(bits, off, i):
    for lev in range(off.size - 1):
        w = off[lev] + (i >> 6)
        old = bits[w]
        bits[w] = old | (np.uint64(1) << np.uint64(i & 63))
        if old != 0:
            break
        i = i >> 6


@njit(cache=True, inline="always")
def _bits_empty(bits, off):
    return bits[off[off.size - 2]] == 0


@njit(cache=True, inline="always")
def _bits_pop(bits, off, tab):
    nlev = off.size - 1
    i = 0
    for lev in range(nlev - 1, -1, -1):
        i = i * 64 + _ctz(bits[off[lev] + i], tab)
    j = i
    for lev in range(nlev):
        w = off[lev] + (j >> 6)
        nw = bits[w] & ~(np.uint64(1) << np.uint64(j & 63))
        bits[w] = nw
        if nw != 0:
            break
        j = j >> 6
    return i


@njit(cache=True, inline="always")
def _link(w, u, head, nxt, prv):
    nxt[w] = head[u]
    prv[w] = -1
    if head[u] >= 0:
        prv[head[u]] = w
    head[u] = w


@njit(cache=True, inline="always")
def _unlink(w, u, head, nxt, prv):
    if prv[w] >= 0:
        nxt[prv[w]] = nxt[w]
    else:
        head[u] = nxt[w]
    if nxt[w] >= 0:
        prv[nxt[w]] = prv[w]


@njit(cache=True)
def _mark_paths(src, indptr, logw, skippable, num_keep, k):
    """Path phase of lean-spec 3.2. Returns keep, marked, num_paths, longest_edges, longest_log."""
    V = indptr.size - 1
    E = src.size
    keep = np.zeros(E, np.bool_)
    marked = 0
    num_paths = 0
    longest_edges = 0
    longest_log = -np.inf
    if num_keep <= 0 or V == 0:
        return keep, marked, num_paths, longest_edges, longest_log

    L, bound, bpar, bslot, rec, top_e = _initial_dp(src, indptr, logw, k)
    tc = np.empty(k, np.float64)
    tu = np.empty(k, np.int64)
    te = np.empty(k, np.int64)
    tw = np.empty(k, np.float64)

    # children lists of the best-in-edge forest: the nodes w whose best in-edge comes from u are
    # head[u], nxt[head[u]], ...  (this replaces the reference's scan over all out-edges of u)
    head = np.full(V, -1, np.int32)
    nxt = np.full(V, -1, np.int32)
    prv = np.full(V, -1, np.int32)
    for w in range(V):
        if bpar[w] >= 0:
            _link(w, bpar[w], head, nxt, prv)

    # max-segment-tree over nodes: tree[1] is the defined node with the largest L (ties: highest id)
    P = 1
    while P < V:
        P *= 2
    tree = np.full(2 * P, -1, np.int32)
    for v in range(V):
        if bpar[v] >= 0:
            tree[P + v] = v
    for i in range(P - 1, 0, -1):
        tree[i] = _better(tree[2 * i], tree[2 * i + 1], L)

    path_e = np.empty(V, np.int64)
    path_v = np.empty(V, np.int64)
    qoff, qbits = _bits_new(V)
    tab = _CTZ_TABLE

    while marked < num_keep:
        vstar = np.int64(tree[1])
        if vstar < 0:
            break
        # walk back through the best in-edges
        plen = 0
        x = vstar
        while bpar[x] >= 0:
            path_e[plen] = top_e[x, bslot[x]]
            path_v[plen] = x
            plen += 1
            x = bpar[x]
        nm = 0
        for i in range(plen):
            e = path_e[i]
            if not skippable[e]:
                keep[e] = True
                logw[e] = -np.inf  # removed from the graph
                x = path_v[i]
                rec[x, bslot[x]] = -np.inf
                nm += 1
        if nm == 0:
            break
        marked += nm
        num_paths += 1
        if nm > longest_edges:
            longest_edges = nm
            longest_log = L[vstar]
        # incremental recompute, smallest node id first (edges point forward, so every popped node's
        # predecessors are final): the path's destinations, then every node whose best in-edge comes
        # from a node whose value changed
        for i in range(plen):
            _bits_push(qbits, qoff, path_v[i])
        while not _bits_empty(qbits, qoff):
            w = _bits_pop(qbits, qoff, tab)
            old_L = L[w]
            old_p = bpar[w]
            _evaluate(w, src, indptr, logw, L, bound, bpar, bslot, rec, top_e, tc, tu, te, tw)
            new_p = bpar[w]
            if L[w] != old_L or (old_p >= 0) != (new_p >= 0):
                _tree_set(tree, P, w, new_p >= 0, L)
            if L[w] != old_L:
                y = head[w]
                while y >= 0:
                    _bits_push(qbits, qoff, y)
                    y = nxt[y]
            if old_p != new_p:
                if old_p >= 0:
                    _unlink(w, old_p, head, nxt, prv)
                if new_p >= 0:
                    _link(w, new_p, head, nxt, prv)
    return keep, marked, num_paths, longest_edges, longest_log


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
