"""Should lean-onnx depend on networkx or onnx-graphsurgeon? Time what each would replace (issue 16).

    pip install networkx onnx-graphsurgeon   # for this measurement only: neither is a dependency
    python tools/bench_deps.py [--model resnet50] [--repeats 5]

1. networkx for the coupling groups: `graph/summary.py` joins the coupling pairs (residual operands, depthwise
   in/out, per-channel scales) into components with scipy's `connected_components` on a sparse matrix. The
   networkx version builds an `nx.Graph` from the same pairs and asks `nx.connected_components`. Both must
   give the same partition (checked), each is timed (median of --repeats).
2. onnx-graphsurgeon for the graph edits: the rewrite edits the normalised ModelProto in place (initializers,
   attributes, node inputs). With graphsurgeon it would import the graph (`gs.import_onnx`), edit, and export
   it (`gs.export_onnx`): the round trip alone, with no edit, is timed against our whole rewrite stage of a
   prune (`timings_s["rewrite"]`: plan, pruned and masked model) on the same model.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lean_onnx.rewrite.pruner import Pruner  # noqa: E402
from models.zoo import cached_export  # noqa: E402


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scipy_components(num_nodes: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(num_nodes, num_nodes))
    return connected_components(adj, directed=False)[1]


def networkx_components(num_nodes: int, pairs: np.ndarray) -> np.ndarray:
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(num_nodes))
    g.add_edges_from(map(tuple, pairs.tolist()))
    label = np.empty(num_nodes, np.int64)
    for k, comp in enumerate(nx.connected_components(g)):
        label[list(comp)] = k
    return label


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labellings describe the same partition when each label of one maps to exactly one of the other."""
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="zoo model (models/zoo.py), BN folded")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import onnx
    import onnx_graphsurgeon as gs

    path = str(cached_export(args.model, fold_bn=True))
    pruner = Pruner(path)
    graph = pruner.graph
    pairs = graph.coupling_pairs
    print(f"{args.model}: {graph.num_nodes:,} channel nodes, {graph.num_edges:,} edges, {len(pairs):,} coupling pairs")
    sc = scipy_components(graph.num_nodes, pairs)
    nxc = networkx_components(graph.num_nodes, pairs)
    print(f"same partition: {same_partition(sc, nxc)} ({len(np.unique(sc)):,} components)")
    t_scipy = median_s(lambda: scipy_components(graph.num_nodes, pairs), args.repeats)
    t_nx = median_s(lambda: networkx_components(graph.num_nodes, pairs), args.repeats)
    print(f"components: scipy {1e3 * t_scipy:.2f} ms, networkx {1e3 * t_nx:.2f} ms ({t_nx / t_scipy:.1f}x)")

    model = onnx.load(path)
    t_gs = median_s(lambda: gs.export_onnx(gs.import_onnx(model)), args.repeats)
    rewrites = [pruner.prune(0.5).report["timings_s"]["rewrite"] for _ in range(args.repeats)]
    t_rewrite = statistics.median(rewrites)
    print(f"graph edits: onnx-graphsurgeon import+export round trip {1e3 * t_gs:.1f} ms; lean-onnx's whole "
          f"rewrite stage (plan + pruned + masked model) {1e3 * t_rewrite:.1f} ms ({t_gs / t_rewrite:.2f}x)")


if __name__ == "__main__":
    main()
