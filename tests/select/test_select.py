"""Tests for lean_onnx.select (lean_paths, baselines, redundancy): LEAN path extraction (lean-spec 3), baselines (6), redundancy (3.5).

The spec's vectors are edge lists ``(from, to, w[, skippable])`` in *list order*; `to_csr` turns them
into the in-CSR arrays the module takes and `lean_list` maps the keep array back to list order.
The spec's "additive" variant (NormGroup::Additive) is not part of lean-onnx and is not tested.
"""

from __future__ import annotations

import math
import random

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lean_onnx.select import lean_paths as paths
from lean_onnx.select.baselines import threshold_keep_mask
from lean_onnx.select.lean_paths import PathStats, first_path, lean_keep_mask
from lean_onnx.select.redundancy import backward_used, forward_alive

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def to_csr(edges, num_nodes=None):
    """Edge list [(from, to, w[, skippable]), ...] -> (src, indptr, weight, skippable, order).

    The arrays are in in-CSR order (stable sort by destination, so parallel edges keep their list
    order); ``order[e]`` is the list index of CSR edge ``e``, so ``x_list[order] = x_csr``."""
    n = num_nodes if num_nodes is not None else 1 + max((max(a, b) for a, b, *_ in edges), default=-1)
    dst = np.array([b for _, b, *_ in edges], dtype=np.int64)
    order = np.argsort(dst, kind="stable")
    src = np.array([edges[i][0] for i in order], dtype=np.int64)
    weight = np.array([edges[i][2] for i in order], dtype=np.float64)
    skip = np.array([bool(edges[i][3]) if len(edges[i]) > 3 else False for i in order], dtype=bool)
    counts = np.bincount(dst, minlength=n) if len(edges) else np.zeros(n, np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return src, indptr, weight, skip, order


def to_list(arr_csr, order):
    out = np.zeros(len(order), dtype=np.asarray(arr_csr).dtype)
    out[order] = arr_csr
    return out


def lean_list(edges, num_keep):
    src, indptr, w, sk, order = to_csr(edges)
    keep, stats = lean_keep_mask(src, indptr, w, sk, num_keep)
    assert keep.dtype == bool and keep.shape == (len(edges),)
    assert not np.any(keep & sk)
    return to_list(keep, order).astype(int).tolist(), stats


MULT = [(0, 1, 1), (0, 1, 2), (0, 1, 3), (0, 2, 7), (1, 2, 3)]


# ------------------------------------------------------------------------------------------------
# lean-spec 3.3 vectors (multiplicative)
# ------------------------------------------------------------------------------------------------


def test_mult_k1():
    assert lean_list(MULT, 1)[0] == [0, 0, 1, 0, 1]


def test_mult_k2():
    assert lean_list(MULT, 2)[0] == [0, 0, 1, 0, 1]


def test_mult_k3():
    assert lean_list(MULT, 3)[0] == [0, 0, 1, 1, 1]


def test_mult_k4():
    assert lean_list(MULT, 4)[0] == [0, 1, 1, 1, 1]


def test_mult_k5():
    keep, stats = lean_list(MULT, 5)
    assert keep == [1, 1, 1, 1, 1]
    assert stats == PathStats(
        num_paths=4, from_paths=5, from_fallback=0, longest_path_edges=2, longest_path_product=pytest.approx(9.0)
    )


def test_chain_low_middle_edge_is_kept_as_one_path():
    # 5 * 0.5 * 5 = 12.5 beats 5: the whole chain is one path (and overshoots K=1 by 2)
    keep, stats = lean_list([(0, 1, 5), (1, 2, 0.5), (2, 3, 5)], 1)
    assert keep == [1, 1, 1]
    assert stats.num_paths == 1 and stats.from_paths == 3 and stats.from_fallback == 0
    assert stats.longest_path_edges == 3
    assert stats.longest_path_product == pytest.approx(12.5)


CHAIN2 = [(0, 1, 2), (1, 2, 0.5), (2, 3, 1.5)]


def test_chain2_k1():
    assert lean_list(CHAIN2, 1)[0] == [1, 0, 0]


def test_chain2_k2():
    assert lean_list(CHAIN2, 2)[0] == [1, 0, 1]


def test_chain2_k3_last_edge_from_fallback():
    keep, stats = lean_list(CHAIN2, 3)
    assert keep == [1, 1, 1]
    assert stats == PathStats(
        num_paths=2, from_paths=2, from_fallback=1, longest_path_edges=1, longest_path_product=pytest.approx(2.0)
    )


def test_skippable_best_path_stops_paths():
    # the best "path" is the skippable edge alone: it marks nothing, so paths stop; fallback keeps 1.2
    keep, stats = lean_list([(0, 1, 1.1, False), (0, 1, 1.2, False), (0, 1, 1.3, True)], 1)
    assert keep == [0, 1, 0]
    assert stats.from_paths == 0 and stats.from_fallback == 1 and stats.num_paths == 0


def test_single_edge_below_one_is_no_path():
    keep, stats = lean_list([(0, 1, 0.5)], 1)
    assert keep == [1]
    assert stats == PathStats(
        num_paths=0, from_paths=0, from_fallback=1, longest_path_edges=0, longest_path_product=0.0
    )


# ------------------------------------------------------------------------------------------------
# more hand-made cases: ties, fallback order, skippable reuse, zero weights, edge cases
# ------------------------------------------------------------------------------------------------


def test_tie_between_nodes_highest_id_wins():
    assert lean_list([(0, 1, 2), (2, 3, 2)], 1)[0] == [0, 1]


def test_tie_between_parallel_edges_later_edge_wins():
    assert lean_list([(0, 1, 2), (0, 1, 2)], 1)[0] == [0, 1]


def test_tie_between_in_edges_higher_source_wins_before_edge_index():
    # CSR order keeps the list order: e0 = (1->2), e1 = (0->2); equal candidates -> src 1 beats src 0
    assert lean_list([(1, 2, 2), (0, 2, 2)], 1)[0] == [1, 0]


def test_fallback_is_stable_in_csr_edge_order():
    # all weights < 1: fallback only.  CSR order: (0,1) e0, (0,2) e1, (1,2) e2 -> e0 first on ties
    edges = [(0, 2, 0.5), (0, 1, 0.5), (1, 2, 0.5)]
    keep, stats = lean_list(edges, 1)
    assert keep == [0, 1, 0]
    assert stats.from_fallback == 1
    assert lean_list(edges, 2)[0] == [1, 1, 0]


def test_fallback_by_weight_descending():
    edges = [(0, 1, 0.3), (0, 2, 0.9), (1, 2, 0.1), (1, 3, 0.6), (2, 3, 0.9)]
    assert lean_list(edges, 3)[0] == [0, 1, 0, 1, 1]


def test_skippable_edge_reused_by_two_paths():
    # 0 -1.5-> 1 (two parallel edges), 1 =skip 4.0=> 2, 2 -1.2-> 3: both paths go through the skip edge
    edges = [(0, 1, 1.5), (0, 1, 1.4), (1, 2, 4.0, True), (2, 3, 1.2)]
    keep, stats = lean_list(edges, 3)
    # path 1: e0, skip, (2,3) -> 2 kept; path 2: e1, skip -> 1 kept
    assert keep == [1, 1, 0, 1]
    assert stats.num_paths == 2 and stats.from_paths == 3
    assert stats.longest_path_edges == 2
    assert stats.longest_path_product == pytest.approx(1.5 * 4.0 * 1.2)


def test_zero_weight_never_on_a_path():
    edges = [(0, 1, 0.0), (1, 2, 3.0), (0, 2, 1.5)]
    keep, stats = lean_list(edges, 2)
    assert keep == [0, 1, 1]
    assert stats.from_paths == 2
    keep, stats = lean_list(edges, 3)
    assert keep == [1, 1, 1] and stats.from_fallback == 1


def test_num_keep_zero_keeps_nothing():
    keep, stats = lean_list(MULT, 0)
    assert keep == [0, 0, 0, 0, 0]
    assert stats == PathStats(0, 0, 0, 0, 0.0)


def test_num_keep_above_edge_count_keeps_all_non_skippable():
    edges = [(0, 1, 2.0), (1, 2, 0.1, True), (0, 2, 0.3)]
    keep, stats = lean_list(edges, 10)
    assert keep == [1, 0, 1]
    assert stats.from_paths + stats.from_fallback == 2


def test_empty_graph():
    keep, stats = lean_keep_mask(
        np.zeros(0, np.int64), np.zeros(4, np.int64), np.zeros(0), np.zeros(0, bool), 5
    )
    assert keep.shape == (0,)
    assert stats == PathStats(0, 0, 0, 0, 0.0)


def test_rejects_backward_edge():
    src = np.array([1], np.int64)
    indptr = np.array([0, 1, 1], np.int64)  # the edge into node 0 comes from node 1
    with pytest.raises(ValueError):
        lean_keep_mask(src, indptr, np.array([2.0]), np.array([False]), 1)


def test_rejects_negative_weight():
    src, indptr, w, sk, _ = to_csr([(0, 1, -1.0)])
    with pytest.raises(ValueError):
        lean_keep_mask(src, indptr, w, sk, 1)


def test_first_path_on_mult():
    src, indptr, w, sk, order = to_csr(MULT)
    path, product = first_path(src, indptr, w)
    assert [int(order[e]) for e in path] == [2, 4]
    assert product == pytest.approx(9.0)


def test_first_path_none():
    src, indptr, w, sk, order = to_csr([(0, 1, 0.5), (1, 2, 0.9)])
    path, product = first_path(src, indptr, w)
    assert path.size == 0 and product == 0.0


# ------------------------------------------------------------------------------------------------
# brute force: the first path is the maximum-product path among sub-paths with prefix products >= 1
# ------------------------------------------------------------------------------------------------


def brute_force_best_log(edges):
    """Max over all paths (any start) whose every prefix log-sum, from the start, is >= 0.

    Log sums are accumulated left to right, as the DP does, so the values compare exactly."""
    out_edges = {}
    for i, (a, b, w, *_) in enumerate(edges):
        out_edges.setdefault(a, []).append(i)
    best = None

    def walk(node, s):
        nonlocal best
        for i in out_edges.get(node, []):
            w = edges[i][2]
            t = s + (math.log(w) if w > 0 else -math.inf)
            if t >= 0.0:
                best = t if best is None else max(best, t)
                walk(edges[i][1], t)

    for start in {a for a, *_ in edges}:
        walk(start, 0.0)
    return best


@st.composite
def small_dags(draw, min_w=0.2, max_w=5.0):
    n = draw(st.integers(2, 7))
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    m = draw(st.integers(1, 12))
    chosen = draw(st.lists(st.sampled_from(pairs), min_size=m, max_size=m))  # repeats = parallel edges
    weights = draw(
        st.lists(
            st.floats(min_w, max_w, allow_nan=False, allow_infinity=False), min_size=m, max_size=m
        )
    )
    return [(a, b, w) for (a, b), w in zip(chosen, weights)]


def _check_first_path(edges):
    src, indptr, w, sk, order = to_csr(edges)
    path, product = first_path(src, indptr, w)
    expected = brute_force_best_log(edges)
    if expected is None:
        assert path.size == 0
        keep, stats = lean_keep_mask(src, indptr, w, sk, 1)
        assert stats.from_paths == 0 and stats.from_fallback == 1
        return
    # the path is a chain from its start to its end, with every prefix product >= 1
    assert path.size >= 1
    s = 0.0
    for j, e in enumerate(path):
        if j:
            assert src[e] == np.searchsorted(indptr, path[j - 1], side="right") - 1
        s = s + math.log(w[e])
        assert s >= 0.0
    assert s == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert math.log(product) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # lean_keep_mask with K=1 keeps exactly that path
    keep, stats = lean_keep_mask(src, indptr, w, sk, 1)
    assert sorted(np.flatnonzero(keep).tolist()) == sorted(path.tolist())
    assert stats.num_paths == 1 and stats.longest_path_edges == path.size
    assert stats.longest_path_product == pytest.approx(product)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_dags())
def test_first_path_is_brute_force_maximum(edges):
    _check_first_path(edges)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_dags(min_w=1.0, max_w=5.0))
def test_first_path_matches_networkx_for_weights_at_least_one(edges):
    _check_first_path(edges)
    src, indptr, w, sk, order = to_csr(edges)
    g = nx.DiGraph()
    for a, b, wt in edges:  # parallel edges: only the heaviest matters for the longest path
        lw = math.log(wt)
        if not g.has_edge(a, b) or g[a][b]["lw"] < lw:
            g.add_edge(a, b, lw=lw)
    path, product = first_path(src, indptr, w)
    assert math.log(product) == pytest.approx(nx.dag_longest_path_length(g, weight="lw"), abs=1e-9)


# ------------------------------------------------------------------------------------------------
# incremental recompute == naive full recompute after every path
# ------------------------------------------------------------------------------------------------


def naive_keep(src, indptr, weight, skippable, num_keep):
    """Plain-Python lean-spec 3.2 that recomputes the whole DP after every path (same tie rules)."""
    V = len(indptr) - 1
    E = len(src)
    lw = [math.log(x) if x > 0 else -math.inf for x in weight]
    removed = [False] * E
    keep = [False] * E
    marked = 0
    while marked < num_keep:
        L = [0.0] * V
        best = [-1] * V
        for v in range(V):
            bc, be = 0.0, -1
            for e in range(indptr[v], indptr[v + 1]):
                if removed[e]:
                    continue
                c = L[src[e]] + lw[e]
                if c >= 0.0 and (be < 0 or (c, src[e], e) > (bc, src[be], be)):
                    bc, be = c, e
            if be >= 0:
                L[v], best[v] = bc, be
        defined = [v for v in range(V) if best[v] >= 0]
        if not defined:
            break
        x = max(defined, key=lambda v: (L[v], v))
        nm = 0
        while best[x] >= 0:
            e = best[x]
            if not skippable[e]:
                keep[e] = removed[e] = True
                nm += 1
            x = src[e]
        if nm == 0:
            break
        marked += nm
    rest = sorted((e for e in range(E) if not keep[e] and not skippable[e]), key=lambda e: -weight[e])
    for e in rest:
        if marked >= num_keep:
            break
        keep[e] = True
        marked += 1
    return np.array(keep, dtype=bool)


def random_dag(rng, n, m, skip_frac=0.0, parallel_frac=0.1, weights="lognormal", max_back=None):
    edges = []
    for _ in range(m):
        b = rng.randrange(1, n)
        lo = 0 if max_back is None else max(0, b - max_back)
        a = rng.randrange(lo, b)
        if weights == "lognormal":
            w = rng.lognormvariate(math.log(0.8), 0.6)
        elif weights == "discrete":  # many exact ties
            w = rng.choice([0.0, 0.5, 1.0, 2.0, 4.0])
        else:
            w = rng.uniform(0.2, 5.0)
        sk = rng.random() < skip_frac
        if sk:
            w = 1.0
        edges.append((a, b, w, sk))
        if rng.random() < parallel_frac:
            edges.append((a, b, w if rng.random() < 0.5 else w * rng.uniform(0.5, 1.5), sk))
    return edges


@pytest.mark.parametrize("topk", [1, 2, 8])
@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_full_recompute(seed, topk, monkeypatch):
    monkeypatch.setattr(paths, "TOPK", topk)
    rng = random.Random(seed)
    weights = ["lognormal", "discrete", "uniform"][seed % 3]
    edges = random_dag(rng, n=40, m=400, skip_frac=0.1 if seed % 2 else 0.0, weights=weights)
    src, indptr, w, sk, order = to_csr(edges)
    n_prunable = int((~sk).sum())
    for num_keep in (1, 5, 20, 60, 150, n_prunable):
        keep, stats = lean_keep_mask(src, indptr, w, sk, num_keep)
        expected = naive_keep(src.tolist(), indptr.tolist(), w.tolist(), sk.tolist(), num_keep)
        np.testing.assert_array_equal(keep, expected, err_msg=f"K={num_keep}")
        assert stats.from_paths + stats.from_fallback == int(keep.sum())


def test_incremental_equals_full_recompute_long_chains():
    # sparse, deep graph with weights mostly >= 1: long paths and deep cascades
    rng = random.Random(123)
    edges = random_dag(rng, n=120, m=600, skip_frac=0.05, weights="uniform", max_back=6)
    src, indptr, w, sk, order = to_csr(edges)
    for num_keep in (1, 30, 200, 500):
        keep, _ = lean_keep_mask(src, indptr, w, sk, num_keep)
        expected = naive_keep(src.tolist(), indptr.tolist(), w.tolist(), sk.tolist(), num_keep)
        np.testing.assert_array_equal(keep, expected, err_msg=f"K={num_keep}")


# ------------------------------------------------------------------------------------------------
# achieved count within the overshoot bound (spec 3.3 python tests)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_frac", [0.0, 0.1])
def test_kept_count_within_overshoot_bound(skip_frac):
    np_rng = np.random.default_rng(7)
    for seed in range(10):
        rng = random.Random(seed)
        edges = random_dag(rng, n=60, m=900, skip_frac=skip_frac, weights="lognormal")
        src, indptr, w, sk, order = to_csr(edges)
        n_prunable = int((~sk).sum())
        for num_keep in np_rng.integers(1, n_prunable, size=5).tolist() + [n_prunable]:
            keep, stats = lean_keep_mask(src, indptr, w, sk, num_keep)
            kept = int(keep.sum())
            assert not np.any(keep & sk)
            assert kept == stats.from_paths + stats.from_fallback
            assert num_keep <= kept <= num_keep + max(stats.longest_path_edges - 1, 0)


# ------------------------------------------------------------------------------------------------
# threshold_keep_mask (lean-spec 6)
# ------------------------------------------------------------------------------------------------


SCORES = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


def test_threshold_keep_two_of_five():
    # live scores 1..5, perc = 1 - 2/5 = 0.6, theta = percentile(60) = 3.4
    keep = threshold_keep_mask(SCORES, np.ones(6, bool), 2)
    assert keep.tolist() == [False, False, False, False, True, True]


def test_threshold_keep_three_of_five():
    # perc = 0.4, theta = 2.6
    keep = threshold_keep_mask(SCORES, np.ones(6, bool), 3)
    assert keep.tolist() == [False, False, False, True, True, True]


def test_threshold_respects_candidates():
    # live = {1, 3, 4, 5}, perc = 0.75, theta = 4.25
    cand = np.array([True, True, False, True, True, True])
    keep = threshold_keep_mask(SCORES, cand, 1)
    assert keep.tolist() == [False, False, False, False, False, True]


def test_threshold_ties_at_theta_are_all_kept():
    # sorted [1,2,2,2,3], perc = 0.6, theta = 2 -> the three 2s and the 3 are kept
    keep = threshold_keep_mask(np.array([1.0, 2.0, 2.0, 2.0, 3.0]), np.ones(5, bool), 2)
    assert keep.tolist() == [False, True, True, True, True]


def test_threshold_keep_all_when_quota_covers_everything():
    keep = threshold_keep_mask(SCORES, np.ones(6, bool), 5)
    assert keep.tolist() == [False, True, True, True, True, True]
    keep = threshold_keep_mask(SCORES, np.ones(6, bool), 50)
    assert keep.tolist() == [False, True, True, True, True, True]


def test_threshold_keep_none():
    assert not threshold_keep_mask(SCORES, np.ones(6, bool), 0).any()


def test_threshold_non_candidates_never_kept():
    cand = np.array([False, False, True, False, False, False])
    assert threshold_keep_mask(SCORES, cand, 3).tolist() == [False, False, True, False, False, False]


# ------------------------------------------------------------------------------------------------
# redundancy: forward_alive / backward_used
# ------------------------------------------------------------------------------------------------


def redundancy_case(edges, num_nodes):
    """edges: (from, to, state) with state 'k' kept, 'p' pruned, 's' skippable."""
    src, indptr, _, _, order = to_csr([(a, b, 1.0) for a, b, _ in edges], num_nodes)
    state = np.array([edges[i][2] for i in order])
    return src, indptr, state == "k", state == "s", order


def test_forward_dead_channel_cascades():
    edges = [
        (0, 1, "k"),
        (0, 2, "p"),  # node 2 loses its only input
        (1, 3, "k"),
        (2, 3, "k"),  # reads dead 2 -> dropped
        (2, 4, "k"),  # reads dead 2 -> dropped, so 4 dies too
        (3, 5, "s"),
        (4, 5, "k"),  # reads dead 4 -> dropped
    ]
    src, indptr, keep, skip, order = redundancy_case(edges, 6)
    is_source = np.array([True, False, False, False, False, False])
    alive, keep_out = forward_alive(src, indptr, keep, skip, is_source)
    assert alive.tolist() == [True, True, False, True, False, True]
    assert to_list(keep_out, order).tolist() == [True, False, True, False, False, False, False]


def test_forward_skippable_edge_carries_life_but_is_never_kept():
    edges = [(0, 1, "s"), (1, 2, "k"), (0, 2, "p")]
    src, indptr, keep, skip, order = redundancy_case(edges, 3)
    alive, keep_out = forward_alive(src, indptr, keep, skip, np.array([True, False, False]))
    assert alive.tolist() == [True, True, True]
    assert to_list(keep_out, order).tolist() == [False, True, False]


def test_forward_skippable_from_dead_node_does_not_revive():
    edges = [(0, 1, "p"), (1, 2, "s"), (2, 3, "k")]
    src, indptr, keep, skip, order = redundancy_case(edges, 4)
    alive, keep_out = forward_alive(src, indptr, keep, skip, np.array([True, False, False, False]))
    assert alive.tolist() == [True, False, False, False]
    assert to_list(keep_out, order).tolist() == [False, False, False]


def test_forward_non_source_without_inputs_is_dead():
    # node 1 has no in-edges and is not a source (e.g. a constant channel): its kept out-edge goes
    edges = [(0, 2, "k"), (1, 2, "k"), (1, 3, "k")]
    src, indptr, keep, skip, order = redundancy_case(edges, 4)
    alive, keep_out = forward_alive(src, indptr, keep, skip, np.array([True, False, False, False]))
    assert alive.tolist() == [True, False, True, False]
    assert to_list(keep_out, order).tolist() == [True, False, False]


def test_forward_two_sources():
    edges = [(0, 2, "p"), (1, 2, "k"), (2, 3, "k")]
    src, indptr, keep, skip, order = redundancy_case(edges, 4)
    alive, keep_out = forward_alive(src, indptr, keep, skip, np.array([True, True, False, False]))
    assert alive.tolist() == [True, True, True, True]
    assert to_list(keep_out, order).tolist() == [False, True, True]


def test_backward_unused_channel_cascades():
    edges = [
        (0, 1, "k"),
        (1, 2, "k"),
        (1, 3, "k"),  # 3 only feeds 4, which reaches no terminal -> dropped
        (3, 4, "k"),  # 4 is not terminal and has no outputs -> dropped
        (2, 5, "s"),  # skippable path to the terminal makes 2 used
        (0, 5, "p"),
    ]
    src, indptr, keep, skip, order = redundancy_case(edges, 6)
    is_terminal = np.array([False, False, False, False, False, True])
    used, keep_out = backward_used(src, indptr, keep, skip, is_terminal)
    assert used.tolist() == [True, True, True, False, False, True]
    assert to_list(keep_out, order).tolist() == [True, True, False, False, False, False]


def test_backward_pruned_edge_does_not_make_source_used():
    edges = [(0, 1, "p"), (1, 2, "k"), (0, 3, "k")]
    src, indptr, keep, skip, order = redundancy_case(edges, 4)
    used, keep_out = backward_used(src, indptr, keep, skip, np.array([False, False, True, False]))
    assert used.tolist() == [False, True, True, False]
    assert to_list(keep_out, order).tolist() == [False, True, False]


def test_backward_multiple_terminals():
    edges = [(0, 1, "k"), (0, 2, "k"), (1, 3, "k"), (2, 3, "p")]
    src, indptr, keep, skip, order = redundancy_case(edges, 4)
    used, keep_out = backward_used(src, indptr, keep, skip, np.array([False, False, True, True]))
    assert used.tolist() == [True, True, True, True]
    assert to_list(keep_out, order).tolist() == [True, True, True, False]


def test_redundancy_rejects_bad_shapes():
    src, indptr, keep, skip, _ = redundancy_case([(0, 1, "k")], 2)
    with pytest.raises(ValueError):
        forward_alive(src, indptr, keep, skip, np.array([True]))
    with pytest.raises(ValueError):
        backward_used(src, indptr, keep[:0], skip, np.array([True, True]))
