"""`lean-onnx IN OUT --keep R` (= `lean-onnx prune ...`): prune, write OUT atomically, validate, report;
with `--steps` / `--finetune-data` the iterative schedule instead (cli/schedule.py)."""

from __future__ import annotations

import json
import os
import sys
import time

from ..errors import LeanOnnxError
from . import messages
from .messages import info, warn
from .options import (add_calibrate_method, calibration_inputs, calibration_line, check_calibration, check_outputs,
                      check_prune_options, check_selection, explain_selection, make_pruner, selection_args)
from .schedule import add_arguments as schedule_arguments
from .schedule import cmd_schedule, wants_schedule


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune IN to OUT (the default command: `lean-onnx IN OUT --keep R`)")
    p.add_argument("model", metavar="IN", help="input .onnx file (never modified)")
    p.add_argument("output", metavar="OUT", help="pruned .onnx file (written atomically; must differ from IN)")
    selection_args(p, budgets=True)
    g = p.add_argument_group("outputs")
    g.add_argument("--report", metavar="PATH", help="write the JSON report here")
    g.add_argument("--emit-masked", metavar="PATH",
                   help="also write the masked model (same shapes, pruned kernels zeroed): pruned(x) == masked(x)")
    g.add_argument("--round-channels", type=int, default=16, metavar="N",
                   help="keep every channel count a conv sees (its input and output, and the Concat inputs and "
                        "Split outputs around it) at multiples of N or unchanged (default 16: ONNX "
                        "Runtime's blocked CPU kernels and TensorRT want such counts); 1 removes every channel "
                        "that can go")
    g.add_argument("--plot", metavar="DIR", help="write PNG pictures: channels per layer before/after and the kept "
                   "chains (needs matplotlib: pip install 'lean-onnx[plot]')")
    g.add_argument("--gather-below", type=float, default=0.75, metavar="F",
                   help="a conv whose kept kernels read at most F of the channels its shared input keeps reads "
                        "them through a channel Gather with a narrower weight (default 0.75, measured to pay "
                        "for itself below that; 0 never)")
    g.add_argument("--fold-constants", action="store_true",
                   help="dead channels (no kept input kernel) keep their constant act(bias) instead of becoming "
                        "0, as in the reference's masked network; where such a constant reaches a Gemm head it "
                        "is folded into the Gemm bias and the channel is removed")
    g = p.add_argument_group("calibration (label-free: no training, no labels; needs torch)")
    g.add_argument("--calibrate-data", metavar="NPZ|DIR",
                   help="after pruning, bring the pruned model back towards the original on these inputs (an .npz "
                        "`inputs` array or a folder of images, resized and centre-cropped for the model's input) "
                        "as --calibrate-method says: what a pruned trained network loses (docs/finetune.md); the "
                        "pruned model still equals its masked model, now with the corrected weights; with --steps, "
                        "every step's model is calibrated against the step's input before its fine-tuning")
    add_calibrate_method(g, "the original's")
    g.add_argument("--calibrate-samples", type=int, default=64, metavar="N",
                   help="inputs used for the calibration, in one batch (default 64)")
    g.add_argument("--input-size", metavar="H,W", help="with an image folder: the input size (default: the model's)")
    g = p.add_argument_group("validation (exit 3 when a gate fails; OUT is still written)")
    g.add_argument("--validate", action="store_true",
                   help="compare pruned vs masked vs original under ONNX Runtime and time original vs pruned")
    g.add_argument("--max-error", type=float, metavar="E",
                   help="gate: max relative error of the pruned model vs the original (implies --validate)")
    g.add_argument("--min-speedup", type=float, metavar="S",
                   help="gate: median latency original / pruned at least S (implies --validate)")
    g.add_argument("--validate-data", metavar="NPZ", help="inputs for the fidelity check: the `inputs` array of "
                   "an .npz (default: random normal batches)")
    g.add_argument("--samples", type=int, default=4, help="batches compared (default 4)")
    g.add_argument("--provider", default="auto", choices=("auto", "cuda", "tensorrt", "cpu"),
                   help="ONNX Runtime provider for the timing (auto: CUDA when a session really gets it)")
    g.add_argument("--threads", type=int, default=2, help="intra-op threads, fixed so figures compare (default 2)")
    g.add_argument("--runs", type=int, default=20,
                   help="timed runs per model (default 20; in --target-latency's paired rounds a least number: "
                   "a fast model runs more, so that each block of its runs lasts 30 ms)")
    g.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    schedule_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="per-layer table")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from ..io.save import save_model_atomic, sha256
    from ..report import print_prune

    check_selection(args)
    check_prune_options(args)
    check_outputs(args)
    if args.calibrate_data:
        check_calibration(args)
    if wants_schedule(args):
        if args.target_latency is not None:
            raise LeanOnnxError("--steps / --finetune-data go with --keep or --target-macs; a latency target "
                                "is measured on the final model: prune to --target-macs in steps, then "
                                "--target-latency")
        return cmd_schedule(args, info, warn)
    if args.plot:
        from ..runtime.plots import require_matplotlib

        require_matplotlib()
    validation_inputs = None
    if args.validate_data:
        from ..runtime.validate import read_inputs

        validation_inputs = read_inputs(args.validate_data)
    pruner = make_pruner(args)
    validating = args.validate or args.max_error is not None or args.min_speedup is not None
    options = dict(masked=bool(args.emit_masked) or validating, round_channels=args.round_channels,
                   fold_constants=args.fold_constants, gather_below=args.gather_below)
    if args.target_latency is not None:
        from ..runtime.latency_budget import prune_to_latency

        result, budget = prune_to_latency(pruner, args.target_latency, method=args.method,
                                          min_channels=args.min_channels, allocate=args.allocate,
                                          drop_blocks=args.drop_blocks,
                                          provider=args.provider,
                                          threads=args.threads, runs=args.runs, warmup=args.warmup, log=info, **options)
        if not budget["met"]:
            warn(f"--target-latency {args.target_latency:g} was not met: the fastest budget measured "
                 f"{budget['latency_ratio']:.3f} of the original's latency (MACs {budget['achieved_macs_ratio']:.3f})")
    elif args.target_macs is not None:
        result = pruner.prune(target_macs=args.target_macs, method=args.method, min_channels=args.min_channels,
                              granularity=args.granularity, allocate=args.allocate, drop_blocks=args.drop_blocks,
                              **options)
    else:
        result = pruner.prune(args.keep, args.method, keep_connected=args.keep_connected, **options)
    if args.calibrate_data:
        result = _calibrate(pruner, result, args)
    if args.keep is not None:  # a budget's selection has no paths or fallback to explain
        explain_selection(result.selection)
    if not result.report["inputs_reach_outputs"]:
        warn("no chain of kept kernels leads from the inputs to the outputs any more (layer collapse: some layer "
             "kept no kernel): the pruned model computes a constant; use a larger --keep, --keep-connected, "
             "--exclude the collapsing layer, or prune in steps with fine-tuning")
    start = time.perf_counter()
    save_model_atomic(result.model_bytes, args.output)
    if args.emit_masked:
        save_model_atomic(result.masked, args.emit_masked)
    report = result.report
    report["timings_s"]["save"] = time.perf_counter() - start
    report["command"] = " ".join(["lean-onnx"] + sys.argv[1:])
    digest = sha256 if args.report else (lambda path: None)  # hashing 200 MB is not free: only for a report
    report["input"] = {"path": args.model, "sha256": digest(args.model), "bytes": os.path.getsize(args.model)}
    report["output"] = {"path": args.output, "sha256": digest(args.output), "bytes": os.path.getsize(args.output)}
    if args.emit_masked:
        report["masked"] = {"path": args.emit_masked, "sha256": digest(args.emit_masked)}
    if validating:
        from ..runtime.validate import validate

        start = time.perf_counter()
        report["validation"] = validate(pruner.loaded.original, result.model_bytes, result.masked,
                                        pruner.loaded.input_shapes, provider=args.provider, threads=args.threads,
                                        runs=args.runs, warmup=args.warmup, samples=args.samples,
                                        data=args.validate_data, max_error=args.max_error,
                                        min_speedup=args.min_speedup, inputs=validation_inputs)
        report["timings_s"]["validate"] = time.perf_counter() - start
        for w in report["validation"]["warnings"]:
            warn(w)
    if args.plot:
        from ..runtime.plots import plot_prune

        os.makedirs(args.plot, exist_ok=True)
        report["plots"] = plot_prune(result, args.plot)
    if args.report:
        save_model_atomic((json.dumps(report, indent=1) + "\n").encode(), args.report)
    if messages.VERBOSITY >= 1 or args.verbose:
        print_prune(report, verbose=args.verbose)
    if validating:
        from ..runtime.validate import print_validation

        if messages.VERBOSITY >= 1 or args.verbose:
            print_validation(report["validation"])
        failures = report["validation"]["failures"]
        print("PASSED" if not failures else "FAILED: " + "; ".join(failures))
        return 0 if not failures else 3
    return 0


def _calibrate(pruner, result, args):
    """`--calibrate-data`: train/reconstruct.py or train/calibrate.py on the inputs of options.calibration_inputs."""
    from ..train.calibrate import calibrate
    from ..train.reconstruct import reconstruct

    inputs = calibration_inputs(args, pruner.loaded.original)  # at most --calibrate-samples of them
    if args.calibrate_method == "reconstruct":
        calibrated, summary = reconstruct(pruner, result, inputs)
    else:
        calibrated, summary = calibrate(pruner, result, inputs, batch=len(inputs))
    info(calibration_line(summary, "the original's", "inputs"))
    return calibrated
