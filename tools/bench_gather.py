"""Does a channel Gather in front of one consumer pay for itself? (issue 3, per-consumer input pruning)

When a tensor feeds several consumers, a channel can only leave it when no consumer reads it. A conv
that reads a subset S of such a tensor could instead read `Gather(x, S, axis=1)` and get a narrower
weight. This times, under ONNX Runtime CPU with fixed threads, the dense conv (zero kernels on the
unread channels) against Gather + the narrow conv, for typical shapes and read fractions.

    python tools/bench_gather.py --runs 200 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mdsection import write_section  # noqa: E402  (tools/ is on sys.path for a script)

from lean_onnx.runtime.bench import time_on_cpu  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: (channels in, height = width, channels out, kernel): ResNet-like stages
SHAPES = [(64, 56, 64, 3), (256, 56, 64, 1), (256, 28, 256, 3), (512, 14, 128, 1), (1024, 14, 256, 1)]
FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def conv_model(c_in: int, size: int, c_out: int, k: int, read: np.ndarray | None, rng) -> onnx.ModelProto:
    """x -> Conv (dense, all c_in channels) or x -> Gather(read) -> Conv (len(read) channels)."""
    width = c_in if read is None else len(read)
    weight = rng.standard_normal((c_out, width, k, k)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    nodes, conv_in = [], "x"
    if read is not None:
        inits.append(numpy_helper.from_array(read.astype(np.int64), "idx"))
        nodes.append(helper.make_node("Gather", ["x", "idx"], ["g"], axis=1))
        conv_in = "g"
    nodes.append(helper.make_node("Conv", [conv_in, "w"], ["y"], pads=[k // 2] * 4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def median_ms(model: onnx.ModelProto, feed: dict, runs: int, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return statistics.median(time_on_cpu(sess, feed, runs, warmup=10))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", metavar="MD", help="replace the section of this markdown file")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = ["| conv (C_in x HW -> C_out, k) | read fraction | dense conv ms | Gather + narrow conv ms | ratio |",
            "|---|---:|---:|---:|---:|"]
    for c_in, size, c_out, k in SHAPES:
        feed = {"x": rng.standard_normal((1, c_in, size, size)).astype(np.float32)}
        dense = median_ms(conv_model(c_in, size, c_out, k, None, rng), feed, args.runs, args.threads)
        for fraction in FRACTIONS:
            read = np.sort(rng.choice(c_in, int(round(fraction * c_in)), replace=False))
            gathered = median_ms(conv_model(c_in, size, c_out, k, read, rng), feed, args.runs, args.threads)
            rows.append(f"| {c_in}x{size}x{size} -> {c_out}, {k}x{k} | {fraction:.2f} | {dense:.3f} | "
                        f"{gathered:.3f} | {dense / gathered:.2f}x |")
            print(rows[-1], flush=True)
    section = "\n".join([
        "## Channel Gather in front of one consumer (issue 3)", "",
        f"Command: `python tools/bench_gather.py --runs {args.runs} --threads {args.threads}` (ONNX Runtime CPU, "
        f"{args.threads} intra-op threads, median of {args.runs} runs after 10 warm-up runs; ratio = dense / "
        "gathered, above 1 means the Gather pays).", "", *rows, ""])
    if args.write:
        write_section(args.write, "## Channel Gather", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
