"""Where ONNX Runtime spends its time per conv: the fit behind select/unit_cost.py's KAPPA and KAPPA_EW.

    python tools/fit_conv_cost.py [--runs 60] [--networks mobilenet_v2,orientation,yolov8n,picodet,ocr_detector]

Profiles the trained third-party networks (tools/third_party.py) per node with ORT's profiler (CPU, 2
threads, batch 1, random input), maps each profiled conv node (ORT's op type Conv, FusedConv or
ConvTranspose) back to its conv (ORT names a fused node after the
last fused op's output or keeps the node's name; walk back through BN/activations to the Conv), and fits
`time = a x MACs + b x (input + output elements)` by least squares over all convs. Prints per conv
(groups, channels, MACs, elements, median us, us per million MACs) and the fit: KAPPA = b / a, in
MAC-equivalents per activation element, and the median relative error of the fit per conv.

Then KAPPA_EW: per network, the profiled time of every node that is not a conv (ORT's own element-wise
nodes and the NCHWc reorders they need) against the output elements of the nodes
`select/unit_cost.standalone_elementwise` counts, in the conv fit's MAC units: KAPPA_EW = (us per element) / a,
per network and pooled over all of them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import third_party  # noqa: E402

from lean_onnx.graph.cost import layer_macs  # noqa: E402
from lean_onnx.rewrite.pruner import Pruner  # noqa: E402
from lean_onnx.select.unit_cost import ELEMENTWISE, standalone_elementwise  # noqa: E402

NETWORKS = {"mobilenet_v2": (third_party.mobilenet_v2, (1, 3, 224, 224)),
            "orientation": (third_party.orientation_classifier, third_party.ORIENTATION_SHAPE),
            "yolov8n": (third_party.yolov8n, third_party.YOLO_SHAPE),
            "picodet": (third_party.layout_detector, third_party.LAYOUT_SHAPE),
            "ocr_detector": (third_party.ocr_detector, third_party.DETECTOR_SHAPE)}
#: ops ORT fuses into the conv before it (walked back from a profiled node's name to the Conv)
FUSED = {"Clip", "Relu", "BatchNormalization", "HardSigmoid", "Mul", "Add", "Sigmoid", "HardSwish", "LeakyRelu",
         "Identity"}


#: ORT's profiled op types of a conv (NCHWc or not, with fused activations)
CONV_OPS = {"Conv", "FusedConv", "ConvTranspose"}
#: ORT's own element-wise ops (fusions, and the NCHWc layout reorders around ops that run in NCHW)
ORT_ELEMENTWISE = {"QuickGelu", "ReorderInput", "ReorderOutput", "BiasGelu", "FastGelu", "Gelu"}


def node_times(model: str, shape: tuple, runs: int) -> dict[str, tuple[float, str]]:
    """(median microseconds over `runs` runs, op type) per profiled node (ORT's name)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(runs):
        session.run(None, feed)
    path = session.end_profiling()
    times, ops = collections.defaultdict(list), {}
    for event in json.loads(pathlib.Path(path).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][:-len("_kernel_time")]
            times[name].append(event["dur"])
            ops[name] = event.get("args", {}).get("op_name", "")
    os.remove(path)
    return {name: (float(np.median(v)), ops[name]) for name, v in times.items()}


def conv_output(graph: onnx.GraphProto, key: str) -> str | None:
    """The output of the Conv an ORT node name stands for (a node name or a fused op's output tensor)."""
    producer = {o: n for n in graph.node for o in n.output}
    by_name = {n.name: n for n in graph.node}
    node = by_name.get(key) or producer.get(key)
    for _ in range(4):
        if node is None:
            return None
        if node.op_type in ("Conv", "ConvTranspose"):
            return node.output[0]
        if node.op_type not in FUSED:
            return None
        node = producer.get(node.input[0])
    return None


def conv_rows(name: str, runs: int) -> tuple[list[tuple], tuple | None]:
    """The conv rows of one network and its (name, time of the other nodes in us, standalone element-wise
    output elements in millions)."""
    fetch, shape = NETWORKS[name]
    path = fetch()
    if path is None:
        print(f"{name}: not available offline, skipped", file=sys.stderr)
        return [], None
    model = onnx.load(str(path))
    pruner = Pruner(model, input_shapes={model.graph.input[0].name: shape})
    loaded, layers = pruner.loaded, {layer.output: layer for layer in pruner.graph.layers}
    rows, other_us = [], 0.0
    for key, (us, op) in node_times(str(path), shape, runs).items():
        if op not in CONV_OPS:
            other_us += us if op in ELEMENTWISE or op in ORT_ELEMENTWISE else 0.0
            continue
        layer = layers.get(conv_output(loaded.graph, key[:-len("_nchwc")] if key.endswith("_nchwc") else key))
        if layer is None:
            continue
        elements = float(np.prod(loaded.shape(layer.input)) + np.prod(loaded.shape(layer.output)))
        rows.append((name, layer.name, layer.group, layer.c_in, layer.c_out, layer_macs(layer, loaded) / 1e6,
                     elements / 1e6, us))
    standalone = sum(float(np.prod(loaded.shape(t))) for t in standalone_elementwise(pruner.graph)
                     if loaded.shape(t) and None not in loaded.shape(t))
    return rows, (name, other_us, standalone / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    args = parser.parse_args()
    results = [conv_rows(name, args.runs) for name in args.networks.split(",")]
    rows = [row for network_rows, _ in results for row in network_rows]
    others = [other for _, other in results if other]
    if not rows:
        raise SystemExit("no network available")
    for net, conv, group, c_in, c_out, macs, elements, us in rows:
        print(f"{net:13s} {conv[-36:]:36s} g{group:<4d} {c_in:4d}->{c_out:<5d} MACs {macs:7.2f}M "
              f"elements {elements:6.3f}M {us:7.0f} us {us / max(macs, 1e-9):6.1f} us/MMAC")
    features = np.array([[r[5], r[6]] for r in rows])
    times = np.array([r[7] for r in rows])
    (a, b), *_ = np.linalg.lstsq(features, times, rcond=None)
    error = np.median(np.abs(features @ np.array([a, b]) - times) / times)
    print(f"\n{len(rows)} convs: time = {a:.2f} us/MMAC x MACs + {b:.1f} us/M x elements; KAPPA = {b / a:.1f} "
          f"MAC-equivalents per element; median relative error per conv {error:.1%}")
    for name, other_us, elements in others:
        if not elements:
            print(f"{name:13s} other nodes {other_us:8.0f} us, no standalone element-wise node")
            continue
        print(f"{name:13s} other nodes {other_us:8.0f} us, standalone element-wise outputs {elements:7.2f}M "
              f"elements: KAPPA_EW = {other_us / max(elements, 1e-9) / a:.1f}")
    total_us, total_elements = sum(o[1] for o in others), sum(o[2] for o in others)
    print(f"pooled: KAPPA_EW = {total_us / max(total_elements, 1e-9) / a:.1f} MAC-equivalents per element of a "
          "standalone element-wise node's output")


if __name__ == "__main__":
    main()
