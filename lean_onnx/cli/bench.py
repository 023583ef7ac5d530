"""`lean-onnx bench MODEL [MODEL ...]`: ONNX Runtime latency side by side (runtime/bench.py measures)."""

from __future__ import annotations

import json
import sys

import onnx

from ..runtime.bench import DEFAULT_RUNS, DEFAULT_THREADS, DEFAULT_WARMUP
from .options import common_args


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput of one or more models under ONNX Runtime",
                       description="Time each MODEL (warm-up runs, then timed runs) with random inputs and "
                                   "print the figures side by side, ratios against the first MODEL.")
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx file(s); the first is the reference")
    p.add_argument("--provider", default="auto", choices=("auto", "cuda", "tensorrt", "cpu"),
                   help="auto = CUDA when the session really gets it, else CPU (default); a GPU provider that "
                        "the session does not get falls back to CPU with a warning")
    p.add_argument("--strict", action="store_true", help="exit 2 instead of timing on CPU when the requested "
                                                        "provider is not what the session runs on")
    p.add_argument("--batch", type=int, metavar="N", help="set dim 0 of every input to N")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                   help="concrete shape for an input (repeatable); symbolic dims default to batch 1 and 224 "
                        "with a warning")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                   help=f"intra-op threads (default {DEFAULT_THREADS}, fixed so figures compare across machine "
                        "loads; 0 = ONNX Runtime's choice); inter-op threads are always 1")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, metavar="N",
                   help=f"timed runs (default {DEFAULT_RUNS})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, metavar="N",
                   help=f"untimed runs first (default {DEFAULT_WARMUP})")
    p.add_argument("--paired", action="store_true",
                   help="time the models together in paired rounds (the order reversed every other round, "
                        "blocks of at least 30 ms, so --runs is a least number), as --validate and "
                        "--target-latency do: ratios that a load change during the run does not decide")
    common_args(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from ..graph.load import parse_input_shapes
    from ..runtime.bench import SCHEMA_VERSION, add_ratios, benchmark, paired_benchmark, print_table

    shapes = parse_input_shapes(args.input_shape)
    timing = dict(provider=args.provider, input_shapes=shapes, batch=args.batch, threads=args.threads,
                  runs=args.runs, warmup=args.warmup, strict=args.strict)
    entries = paired_benchmark(args.models, **timing) if args.paired else \
        [benchmark(path, **timing) for path in args.models]
    for entry in entries:
        for w in entry.pop("warnings"):
            print(f"[W] {w}", file=sys.stderr)
        if not args.quiet:
            print(f"[I] {entry['path']}: {entry['provider']}, median {entry['latency_ms']['median']:.3f} ms"
                  + (" (paired rounds)" if args.paired else ""), file=sys.stderr)
    add_ratios(entries)
    if args.json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "tool": _versions(),
                          "provider_requested": args.provider, "models": entries}, indent=1))
    else:
        print_table(entries)
    return 0


def _versions() -> dict:
    import onnxruntime as ort

    from .. import __version__

    return {"lean-onnx": __version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
