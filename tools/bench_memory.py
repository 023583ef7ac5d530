"""Peak resident memory of `lean-onnx IN OUT --keep 0.1` on a plain conv stack with ~500 MB of weights.

    python tools/bench_memory.py [--weights-mb 500] [--keep 0.1] [--write docs/benchmarks.md]

Builds a chain of 3x3 Convs (C -> C, Relu between them; float32, random weights, 1x64x8x8 input) with
about `--weights-mb` MB of weights in a temporary folder, runs the CLI in a child process under
`/usr/bin/time -v` (or, without it, reads `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`), and prints
the child's peak RSS and its ratio to the weight size. `--write` replaces (or appends) the "## Memory"
section of the given markdown file. The target (issue 6): peak <= 3x the weight size.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from mdsection import write_section  # noqa: E402  (tools/ is on sys.path for a script)
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
INPUT_CHANNELS, SIZE = 64, 8


def build_stack(weights_mb: float, path: str, channels: int = 1536, seed: int = 0, external: bool = False) -> int:
    """Write a Conv 3x3 stack with about `weights_mb` MB of float32 weights to `path`; returns weight bytes.
    `external`: the weights go to `path + ".data"` one layer at a time (models over 2 GiB need this)."""
    rng = np.random.default_rng(seed)
    per_layer = channels * channels * 9
    middle = max(1, round((weights_mb * 1e6 / 4 - 2 * INPUT_CHANNELS * channels * 9) / per_layer))
    shapes = [(channels, INPUT_CHANNELS)] + [(channels, channels)] * middle + [(INPUT_CHANNELS, channels)]
    nodes, inits, x = [], [], "input"
    data = open(path + ".data", "wb") if external else None
    for k, (c_out, c_in) in enumerate(shapes):
        w = (rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2 / (9 * c_in))))
        if data is None:
            inits.append(numpy_helper.from_array(w, f"w{k}"))
        else:
            tensor = TensorProto(name=f"w{k}", data_type=TensorProto.FLOAT, dims=w.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", os.path.basename(path) + ".data"), ("offset", str(data.tell())),
                               ("length", str(w.nbytes))):
                tensor.external_data.add(key=key, value=value)
            data.write(w.tobytes())
            inits.append(tensor)
        del w
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out, dtype=np.float32) * 0.1, f"b{k}"))
        nodes.append(helper.make_node("Conv", [x, f"w{k}", f"b{k}"], [f"conv{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"))
        x = f"conv{k}"
        if k < len(shapes) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"relu{k}"], name=f"relu{k}"))
            x = f"relu{k}"
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "conv_stack", [helper.make_tensor_value_info("input", f32, [1, INPUT_CHANNELS, SIZE, SIZE])],
                              [helper.make_tensor_value_info(x, f32, [1, INPUT_CHANNELS, SIZE, SIZE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in inits)
    if data is not None:
        data.close()
    onnx.save(model, path)
    return weight_bytes


def run_measured(cmd: list[str]) -> tuple[int, float, int, str]:
    """(return code, seconds, peak RSS in bytes, stderr) of `cmd` as a child process."""
    time_bin = shutil.which("time") if os.path.exists("/usr/bin/time") else None
    start = time.perf_counter()
    if time_bin:
        proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=ROOT)
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = int(match.group(1)) * 1024 if match else -1
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    return proc.returncode, time.perf_counter() - start, peak, proc.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights-mb", type=float, default=500)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--external", action="store_true",
                    help="write the input with external data (needed over 2 GiB; OUT then has external data too)")
    ap.add_argument("--write", metavar="MD", help="replace the '## Memory' section of this markdown file")
    ap.add_argument("--notes", default="", help="extra text for the written section")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="lean_onnx_mem_")
    try:
        src, out = os.path.join(folder, "stack.onnx"), os.path.join(folder, "pruned.onnx")
        weight_bytes = build_stack(args.weights_mb, src, external=args.external)
        cmd = [sys.executable, "-m", "lean_onnx", src, out, "--keep", str(args.keep), "-q"]
        code, seconds, peak, err = run_measured(cmd)
        if code != 0:
            print(err, file=sys.stderr)
            return code
        ratio = peak / weight_bytes
        data_files = [f for f in os.listdir(folder) if f.startswith("pruned.onnx.") and f.endswith(".data")]
        out_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in ["pruned.onnx"] + data_files) / 1e6
        if data_files:
            onnx.checker.check_model(out, full_check=True)
            print(f"OUT has external data: {data_files[0]}; onnx.checker (full, by path) passes")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    line = (f"weights {weight_bytes / 1e6:.0f} MB; peak RSS {peak / 1e6:.0f} MB = {ratio:.2f}x the weights "
            f"(target <= 3x); {seconds:.0f} s; pruned file {out_mb:.0f} MB")
    print(line)
    if args.write:
        tool = "/usr/bin/time -v" if os.path.exists("/usr/bin/time") else "getrusage(RUSAGE_CHILDREN)"
        text = (f"`python tools/bench_memory.py --weights-mb {args.weights_mb:g} --keep {args.keep:g} --write "
                f"{args.write}` builds a chain of 3x3 Convs (1536 channels, Relu between them, 1x64x8x8 input) "
                f"and runs `lean-onnx IN OUT --keep {args.keep:g} -q` under {tool} ({platform.machine()}, "
                f"Python {platform.python_version()}, onnx {onnx.__version__}):\n\n{line}.\n\n{args.notes}")
        write_section(args.write, "## Memory", "## Memory\n\n" + text.strip())
    return 0 if ratio <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
