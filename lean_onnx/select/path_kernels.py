"""The numba kernels of LEAN's path solver (lean_paths.py says what they compute and why they are exact).

* `_scan` / `_evaluate` / `_initial_dp`: the longest-chain DP per node, with TOPK remembered in-edges;
* `_tree_set` / `_better`: the max-segment-tree over node values (argmax in O(log V));
* `_bits_*`: the 64-ary bitset queue of node ids to recompute;
* `_link` / `_unlink`: children lists of the best-in-edge forest;
* `_mark_paths`: the extraction loop (take the best path, keep its edges, recompute incrementally).
"""

from __future__ import annotations

import numpy as np
from numba import njit

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
