"""Time and peak memory of each analysis stage (load, graph, norms, select) on big graphs.

    python tools/bench_pruner.py [--repeats 3] [--keep 0.01] [--write docs/benchmarks.md]

Models: torchvision ResNet-50 (random weights, BN folded, 1x3x224x224; exported into .cache/zoo) and a
synthetic CNN with >= 10 M kernels written directly with onnx (12 residual 3x3 convs, 1024 channels,
BN kept, 1x1024x14x14). Each repeat runs in a fresh process, so numba's JIT cache load and imports are
counted the way a user meets them; the medians are reported. Peak memory: the largest stage's traced
numpy/Python allocations (tracemalloc peak, from one extra traced run: tracing slows allocation) and the
process's peak resident set (ru_maxrss, median of the timed runs).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".cache" / "bench"


def synthetic_model(path: pathlib.Path, channels=1024, layers=12, size=14) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = x_res = "input"
    for k in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2 / (9 * channels))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        for p, v in (("g", rng.uniform(0.5, 1.5, channels)), ("b", rng.normal(0, 0.1, channels)),
                     ("m", rng.normal(0, 0.1, channels)), ("v", rng.uniform(0.5, 2, channels))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{k}"))
        nodes.append(helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{k}", f"g{k}", f"b{k}", f"m{k}", f"v{k}"], [f"n{k}"]))
        y = f"n{k}"
        if k % 2 == 1:
            nodes.append(helper.make_node("Add", [y, x_res], [f"s{k}"]))
            y = f"s{k}"
        nodes.append(helper.make_node("Relu", [y], [f"r{k}"]))
        if k % 2 == 0:
            x_res = x
        x = f"r{k}"
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  [1, channels, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


def model_paths() -> dict[str, pathlib.Path]:
    from models.zoo import cached_export

    CACHE.mkdir(parents=True, exist_ok=True)
    synthetic = CACHE / "synthetic_12x1024c3x3.onnx"
    if not synthetic.exists():
        synthetic_model(synthetic)
    return {"resnet50": cached_export("resnet50", fold_bn=True), "synthetic-12.6M": synthetic}


def one_run(path: str, keep: float, method: str, trace: bool) -> dict:
    """Runs in a child process: every stage timed, or (trace) every stage's tracemalloc peak."""
    import resource
    import tracemalloc

    from lean_onnx.graph.build import build_channel_graph
    from lean_onnx.graph.load import load_model
    from lean_onnx.select.selection import select_kernels
    from lean_onnx.select.weights import compute_edge_weights

    result = {}
    if trace:  # tracing slows allocations down: memory and time come from separate runs
        tracemalloc.start()

    def stage(name, fn):
        if trace:
            tracemalloc.reset_peak()
        t = time.perf_counter()
        value = fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else 0.0
        result[name] = {"s": time.perf_counter() - t, "peak_mb": peak}
        return value

    loaded = stage("load", lambda: load_model(path))
    graph = stage("graph", lambda: build_channel_graph(loaded))
    stage("norms", lambda: compute_edge_weights(graph))
    sel = stage("select", lambda: select_kernels(graph, keep, method))
    result["total_s"] = sum(v["s"] for v in result.values() if isinstance(v, dict))
    result["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["kernels"] = sel.total
    result["edges"] = graph.num_edges
    result["kept"] = sel.kept
    result["paths"] = sel.num_paths
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=float, default=0.01)
    parser.add_argument("--method", default="lean")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", help="append/replace the section in this markdown file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.keep, args.method, args.trace)))
        return
    lines = [
        "## Analysis stages (`tools/bench_pruner.py`)",
        "",
        f"Command: `python tools/bench_pruner.py --repeats {args.repeats} --keep {args.keep} --write docs/benchmarks.md`",
        f"(method {args.method}; each repeat a fresh process; medians; 2-core shared machine).",
        "",
        "| model | kernels | edges | load s | graph s | norms s | select s | total s | peak traced MB (stage) | peak RSS MB | kept | paths |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, path in model_paths().items():
        def child(*extra):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), "--keep", str(args.keep),
                                  "--method", args.method, *extra], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, json.dumps(result), file=sys.stderr)
            return result

        runs = [child() for _ in range(args.repeats)]
        traced = child("--trace")
        med = lambda key, sub=None: statistics.median(r[key][sub] if sub else r[key] for r in runs)  # noqa: E731
        peaks = {s: traced[s]["peak_mb"] for s in ("load", "graph", "norms", "select")}
        worst = max(peaks, key=peaks.get)
        lines.append(
            f"| {name} | {runs[0]['kernels']:,} | {runs[0]['edges']:,} | {med('load', 's'):.2f} | {med('graph', 's'):.2f} | "
            f"{med('norms', 's'):.2f} | {med('select', 's'):.2f} | **{med('total_s'):.2f}** | "
            f"{peaks[worst]:.0f} ({worst}) | {med('rss_peak_mb'):.0f} | {runs[0]['kept']:,} | {runs[0]['paths']:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        target = pathlib.Path(args.write)
        old = target.read_text() if target.exists() else "# Benchmarks\n\n"
        start = old.find(lines[0])
        if start >= 0:
            end = old.find("\n## ", start + 1)
            old = old[:start] + old[end + 1:] if end >= 0 else old[:start]
        target.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
