"""`lean-onnx sweep IN --keep R1,R2,... --out-dir D`: one graph build, many keeps, a Pareto table
(runtime/sweep.py does the work)."""

from __future__ import annotations

import json
import os
import sys

from ..errors import LeanOnnxError
from ..select.budget import check_drop_blocks
from ..runtime.sweep import DEFAULT_KEEPS
from .options import allocate_arg, check_prune_options, common_args, drop_blocks_arg, make_pruner, model_args


def register(sub) -> None:
    p = sub.add_parser("sweep", help="prune to several keeps (graph and norms built once) and compare latency "
                                     "and error on a Pareto table",
                       description="Prune IN to every --keep, write D/<stem>_keep<keep>.onnx, check each "
                                   "against its masked model, time it and measure its error vs the original.")
    model_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--keep", metavar="R1,R2,...",
                   help=f"kept fractions of prunable kernels, each in (0, 1] (default {DEFAULT_KEEPS})")
    g.add_argument("--target-macs", metavar="F1,F2,...",
                   help="instead of --keep: MACs budgets (fractions of the original's), channel granularity; "
                        "writes D/<stem>_macs<F>.onnx")
    g.add_argument("--min-channels", type=float, default=0.1, metavar="F",
                   help="with --target-macs: every prunable layer keeps at least F of its channels (default 0.1)")
    allocate_arg(g, "--target-macs")
    drop_blocks_arg(g)
    g.add_argument("--out-dir", required=True, metavar="D", help="folder for the pruned models (created if missing)")
    g.add_argument("--method", default="lean", choices=("lean", "sv", "l1"), help="selection method (default lean)")
    g.add_argument("--round-channels", type=int, default=16, metavar="N",
                   help="channel counts a conv sees stay multiples of N or unchanged (default 16, as `prune`)")
    g.add_argument("--gather-below", type=float, default=0.75, metavar="F",
                   help="convs reading at most F of a shared input's channels read them through a Gather "
                        "(default 0.75, as `prune`; 0 never)")
    g.add_argument("--fold-constants", action="store_true", help="as `prune --fold-constants`")
    g = p.add_argument_group("measuring")
    g.add_argument("--provider", default="auto", choices=("auto", "cuda", "tensorrt", "cpu"),
                   help="ONNX Runtime provider for the timing (default auto)")
    g.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    g.add_argument("--runs", type=int, default=20, help="timed runs per model (default 20)")
    g.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    g.add_argument("--no-bench", action="store_true", help="skip timing: the Pareto front uses MACs instead")
    g.add_argument("--samples", type=int, default=4, help="batches for the error measurement (default 4)")
    g.add_argument("--validate-data", metavar="NPZ", help="inputs for the error: the `inputs` array of an .npz")
    g = p.add_argument_group("outputs")
    g.add_argument("--report", metavar="PATH", help="write the JSON report here (atomically)")
    g.add_argument("--plot", metavar="DIR", help="write PNG pictures here: latency and error vs keep, channels "
                                                 "per layer and kept chains per keep (needs matplotlib)")
    common_args(p)
    p.set_defaults(func=cmd_sweep)


def _check_options(args) -> None:
    check_prune_options(args)
    source = os.path.realpath(args.model)
    if args.report and os.path.realpath(args.report) == source:
        raise LeanOnnxError(f"{args.report}: --report is the input file; lean-onnx never overwrites its input")


def cmd_sweep(args) -> int:
    from ..io.save import save_model_atomic, sha256
    from ..runtime.sweep import (
        ContractBroken,
        TimingOptions,
        make_folder,
        output_paths,
        parse_keeps,
        print_sweep,
        run_sweep,
    )

    if args.keep is not None and args.target_macs is not None:
        raise LeanOnnxError("sweep: give --keep or --target-macs, not both")
    budget = args.target_macs is not None
    if args.drop_blocks is not None:
        if not budget:
            raise LeanOnnxError("sweep: --drop-blocks goes with --target-macs, not --keep")
        check_drop_blocks(args.drop_blocks)
    keeps = parse_keeps(args.target_macs, "--target-macs") if budget else parse_keeps(DEFAULT_KEEPS if args.keep is None else args.keep)
    _check_options(args)
    output_paths(args.model, keeps, args.out_dir, "macs" if budget else "keep")  # refuse before any work
    if args.plot:
        from ..runtime.plots import require_matplotlib

        require_matplotlib()

    def log(level: str, msg: str) -> None:
        if level == "W" or not args.quiet:
            print(f"[{level}] {msg}", file=sys.stderr)

    pruner = make_pruner(args)
    if args.plot:
        make_folder(args.plot, "--plot")
    timing = None if args.no_bench else TimingOptions(args.provider, args.threads, args.runs, args.warmup)
    report = run_sweep(pruner, keeps, args.out_dir, method=args.method, round_channels=args.round_channels,
                       target_macs=budget, min_channels=args.min_channels, allocate=args.allocate,
                       drop_blocks=args.drop_blocks,
                       fold_constants=args.fold_constants, gather_below=args.gather_below, timing=timing,
                       samples=args.samples, data=args.validate_data, plot_dir=args.plot, log=log).report
    report["command"] = " ".join(["lean-onnx"] + sys.argv[1:])
    report["input"].update(sha256=sha256(args.model) if args.report else None, bytes=os.path.getsize(args.model))
    if args.report:
        save_model_atomic((json.dumps(report, indent=1) + "\n").encode(), args.report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_sweep(report)
    if report["failures"]:
        raise ContractBroken("; ".join(report["failures"]) + f"; the models are in {args.out_dir}")
    return 0
