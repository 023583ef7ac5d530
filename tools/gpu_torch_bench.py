"""Time ONNX models on a GPU through torch (the lean-onnx bridge), for when ONNX Runtime's CUDA provider
cannot be had on the machine (tools/gpu_check.sh falls back to this; results are labelled as torch).

    python tools/gpu_torch_bench.py .cache/gpu_models --device cuda --json OUT.json

Each `<folder>/<model>/*.onnx` is turned into a torch module (lean_onnx.train.bridge), moved to the device
and timed at batch 1 after warm-up (each run synchronised); the first output is compared with ONNX
Runtime CPU on the same input (max relative error), so a wrong conversion cannot pass for a speed-up.
Needs only torch, onnx, numpy and onnxruntime (CPU build).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def input_shape(model) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.dim_value > 0 else (1 if k == 0 else 224) for k, d in enumerate(dims))


def time_model(path: pathlib.Path, device: str, runs: int, warmup: int) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    from lean_onnx.train.bridge import to_torch

    model = onnx.load(str(path))
    x = np.random.default_rng(0).standard_normal(input_shape(model)).astype(np.float32)
    module = to_torch(model, str(path)).to(device).eval()
    xt = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            module(xt)
        sync()
        times = []
        for _ in range(runs):
            start = time.perf_counter_ns()
            out = module(xt)
            sync()
            times.append((time.perf_counter_ns() - start) / 1e6)
    first = out[0] if isinstance(out, (list, tuple)) else out
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {model.graph.input[0].name: x})[0]
    err = float(np.abs(first.float().cpu().numpy() - reference).max() / max(np.abs(reference).max(), 1e-30))
    return {"model": str(path), "runtime": f"torch {torch.__version__} via lean_onnx.train.bridge", "device": device,
            "input_shape": list(x.shape), "latency_ms": {"median": statistics.median(times),
                                                         "p90": float(np.percentile(times, 90)), "min": min(times)},
            "max_rel_err_vs_ort_cpu": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="folder of model folders, each with original.onnx and keep*.onnx")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    rows = []
    for folder in sorted(p for p in pathlib.Path(args.folder).iterdir() if p.is_dir()):
        paths = [folder / "original.onnx"] + sorted(folder.glob("keep*.onnx"), key=lambda p: -float(p.stem[4:]))
        base_ms = None
        for path in paths:
            row = time_model(path, args.device, args.runs, args.warmup)
            base_ms = base_ms or row["latency_ms"]["median"]
            row["speedup_vs_original"] = base_ms / row["latency_ms"]["median"]
            rows.append(row)
            print(f"{folder.name:<14} {path.stem:<10} {row['latency_ms']['median']:8.3f} ms  "
                  f"x{row['speedup_vs_original']:.2f}  err {row['max_rel_err_vs_ort_cpu']:.1e}", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"label": "torch on the GPU (not ONNX Runtime)",
                                                       "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
