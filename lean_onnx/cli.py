"""Command line: `lean-onnx IN OUT --keep R` (= `prune`), `inspect MODEL`, `select MODEL --keep R`.

cli.py only parses, dispatches and prints; every failure is one `[E]` line and an exit code
(DESIGN.md section 6): 2 bad usage or input, 4 nothing to prune.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings

from . import __version__
from .errors import LeanOnnxError

VERBOSITY = 1


def info(msg: str) -> None:
    if VERBOSITY >= 1:
        print(f"[I] {msg}", file=sys.stderr)


def warn(msg: str) -> None:
    if VERBOSITY >= 0:
        print(f"[W] {msg}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message by default)
        raise LeanOnnxError(f"{self.prog}: {message} (see --help)")


def _model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    g = p.add_argument_group("model")
    if positional:
        g.add_argument("model", help="input .onnx file (never modified)")
    g.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                   help="concrete shape for an input with symbolic dims (repeatable); default: batch 1, other "
                        "symbolic dims 224, with a warning")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep the kernels of convs whose node or weight name matches GLOB (repeatable)")
    g.add_argument("--norm-grid", default="auto", metavar="auto|N",
                   help="grid of the periodic operator norm: 'auto' = each layer's real input size, dilation "
                        "exact (default); N = reference mode: an N x N grid, dilation ignored as the reference "
                        "does (it uses 128 for MS-D, 16 for U-Net/ResNet)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lean-onnx", description="LEAN pruning (longest chains of operator norms) for ONNX CNNs.")
    parser.add_argument("--version", action="version", version=f"lean-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    p = sub.add_parser("prune", help="prune IN to OUT (the default command: `lean-onnx IN OUT --keep R`)")
    p.add_argument("model", metavar="IN", help="input .onnx file (never modified)")
    p.add_argument("output", metavar="OUT", help="pruned .onnx file (written atomically; must differ from IN)")
    _selection_args(p)
    g = p.add_argument_group("outputs")
    g.add_argument("--report", metavar="PATH", help="write the JSON report here")
    g.add_argument("--emit-masked", metavar="PATH",
                   help="also write the masked model (same shapes, pruned kernels zeroed): pruned(x) == masked(x)")
    g.add_argument("--round-channels", type=int, default=16, metavar="N",
                   help="keep conv output channel counts at multiples of N or unchanged (default 16: ONNX "
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
    g.add_argument("--runs", type=int, default=20, help="timed runs per model (default 20)")
    g.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    from .schedule import add_arguments as schedule_arguments

    schedule_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="per-layer table")
    p = sub.add_parser("inspect", help="channel graph, prunable kernels, coupling groups, frozen parts, FLOPs")
    _model_args(p)
    _common(p)
    p = sub.add_parser("select", help="run LEAN (or a baseline) and report which kernels it keeps")
    _model_args(p)
    _selection_args(p, model=False)
    _common(p)
    for name in EXTENSIONS:  # modules that add their own subcommands: register(sub) sets `func`
        if importlib.util.find_spec(f"{__package__}.{name}") is not None:
            importlib.import_module(f".{name}", __package__).register(sub)
    return parser


def _selection_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        _model_args(p, positional=False)
    g = p.add_argument_group("selection")
    g.add_argument("--keep", type=float, required=True, help="fraction of prunable kernels to keep, in (0, 1]")
    g.add_argument("--method", default="lean", choices=("lean", "sv", "l1"),
                   help="lean: longest chains (default); sv / l1: individual operator-norm / L1 ranking")
    g.add_argument("--keep-connected", action="store_true",
                   help="if the selection cuts every chain from the inputs to the outputs (layer collapse), also "
                        "keep the kernels of the input-to-output chain with the largest product of norms")
    if not model:  # `select` only: the masked model of `prune` is defined with redundancy (DESIGN.md 2)
        g.add_argument("--no-redundancy", action="store_true", help="skip redundancy pruning (lean-spec 3.5)")


def _norm_grid(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        grid = int(value)
    except ValueError:
        grid = 0
    if grid < 1:
        raise LeanOnnxError(f"--norm-grid {value!r}: expected 'auto' or a positive integer")
    return grid


def _pruner(args, norms: bool = True):
    """Load, build the graph (and the norms) with the shared model options; warnings go to stderr."""
    from .load import parse_input_shapes
    from .prune import Pruner

    pruner = Pruner(args.model, exclude=args.exclude, input_shapes=parse_input_shapes(args.input_shape),
                    norm_grid=_norm_grid(args.norm_grid), norms=norms)
    for w in pruner.loaded.warnings:
        warn(w)
    return pruner


def _emit(result: dict, args, printer) -> int:
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        printer(result, verbose=args.verbose)
    return 0


def cmd_inspect(args) -> int:
    from .analysis import inspect_summary
    from .report import print_inspect

    pruner = _pruner(args, norms=False)
    summary = inspect_summary(pruner.graph)
    summary["timings_s"] = pruner.timings
    return _emit(summary, args, print_inspect)


def cmd_select(args) -> int:
    from .graph import check_keep
    from .report import print_selection
    from .selection import select_kernels

    check_keep(args.keep)
    pruner = _pruner(args)
    graph, timings = pruner.graph, pruner.timings
    start = time.perf_counter()
    selection = select_kernels(graph, args.keep, args.method, redundancy=not args.no_redundancy,
                               keep_connected=args.keep_connected)
    timings["select"] = time.perf_counter() - start
    _explain(selection)
    layers = [{"name": layer.name, "kernels": layer.num_kernels, "kept": int(selection.layer_mask(layer).sum()),
               "prunable": layer.prunable} for layer in graph.layers]
    result = {"model": args.model, "method": args.method, "kernels": selection.stats(), "layers": layers,
              "timings_s": timings}
    return _emit(result, args, print_selection)


def cmd_prune(args) -> int:
    from .graph import check_keep
    from .prune import save_model_atomic, sha256
    from .report import print_prune

    check_keep(args.keep)
    check_prune_options(args)
    _check_outputs(args)
    from .schedule import cmd_schedule, wants_schedule

    if wants_schedule(args):
        return cmd_schedule(args, info, warn)
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    validation_inputs = None
    if args.validate_data:
        from .validate import read_inputs

        validation_inputs = read_inputs(args.validate_data)
    pruner = _pruner(args)
    validating = args.validate or args.max_error is not None or args.min_speedup is not None
    result = pruner.prune(args.keep, args.method, masked=bool(args.emit_masked) or validating,
                          round_channels=args.round_channels,
                          fold_constants=args.fold_constants, gather_below=args.gather_below,
                          keep_connected=args.keep_connected)
    _explain(result.selection)
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
        from .validate import validate

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
        from .plots import plot_prune

        os.makedirs(args.plot, exist_ok=True)
        report["plots"] = plot_prune(result, args.plot)
    if args.report:
        save_model_atomic((json.dumps(report, indent=1) + "\n").encode(), args.report)
    if VERBOSITY >= 1 or args.verbose:
        print_prune(report, verbose=args.verbose)
    if validating:
        from .validate import print_validation

        if VERBOSITY >= 1 or args.verbose:
            print_validation(report["validation"])
        failures = report["validation"]["failures"]
        print("PASSED" if not failures else "FAILED: " + "; ".join(failures))
        return 0 if not failures else 3
    return 0


def check_prune_options(args) -> None:
    """Numbers shared by `prune` and `sweep`, refused before any work."""
    if args.round_channels < 1:
        raise LeanOnnxError(f"--round-channels {args.round_channels}: expected a positive integer")
    if args.samples < 1 or args.runs < 1 or args.warmup < 0 or args.threads < 0:
        raise LeanOnnxError("--samples and --runs must be >= 1, --warmup and --threads >= 0")
    if not 0 <= args.gather_below <= 1:
        raise LeanOnnxError(f"--gather-below {args.gather_below:g}: expected a fraction in [0, 1]")


def _check_outputs(args) -> None:
    """Refuse before any work: an output (OUT, --emit-masked, --report) that is the input file (also through
    a symlink, a hard link or a relative path) or one of its external data files, two outputs that are the
    same file, an output that is a directory, a missing folder, or a folder where no file can be created."""
    source = os.path.realpath(args.model)
    from .ondisk import external_locations

    in_folder = os.path.dirname(source)
    input_data = {os.path.realpath(os.path.join(in_folder, loc)) for loc in external_locations(source)}
    seen: dict[str, str] = {}
    for flag, path in (("OUT", args.output), ("--emit-masked", args.emit_masked), ("--report", args.report)):
        if not path:
            continue
        real = os.path.realpath(path)
        if real == source or (os.path.exists(path) and os.path.exists(args.model)
                              and os.path.samefile(path, args.model)):
            raise LeanOnnxError(f"{path}: {flag} is the input file; lean-onnx never overwrites its input")
        if real in input_data:
            raise LeanOnnxError(f"{path}: {flag} is an external data file of the input; lean-onnx never "
                                "overwrites its input")
        if real in seen:
            raise LeanOnnxError(f"{path}: {flag} and {seen[real]} are the same file")
        seen[real] = flag
        if os.path.isdir(path):
            raise LeanOnnxError(f"{path}: {flag} is a directory; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise LeanOnnxError(f"{path}: output folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise LeanOnnxError(f"{path}: output folder {folder} is not writable")
        try:  # root passes os.access everywhere; read-only file systems and sysfs refuse the file itself
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise LeanOnnxError(f"{path}: cannot create files in the output folder {folder} "
                                f"({exc.strerror or exc})") from None


def _explain(selection) -> None:
    """Say why the achieved keep is far below the request, or why LEAN found no chains."""
    if selection.method == "lean" and selection.num_paths == 0 and selection.selected:
        warn("no chain has a norm product >= 1: every kernel came from the individual-norm fallback "
             "(LEAN equals the sv baseline here, lean-spec 3.2)")
    removed = selection.removed_forward + selection.removed_backward
    if removed > selection.selected / 2:
        warn(f"redundancy pruning removed {removed:,} of the {selection.selected:,} selected kernels "
             f"({selection.removed_forward:,} read channels with no kept input, {selection.removed_backward:,} "
             f"fed channels nothing reads); kept {100 * selection.keep_achieved:.2f} %")


def _one_line(text: str) -> str:
    """Messages go out as one line: a pipeline reads the first line of stderr."""
    return " ".join(str(text).split())[:2000]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings from the libraries (numpy, onnx) become one `[W]` line each, never a stack."""
    warn(_one_line(f"{category.__name__}: {message}"))


def main(argv: list[str] | None = None) -> int:
    global VERBOSITY
    if not os.environ.get("LEAN_ONNX_DEBUG"):
        warnings.showwarning = _show_warning
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] not in COMMANDS and argv[0] not in EXTENSION_COMMANDS and not argv[0].startswith("-"):
            argv.insert(0, "prune")  # `lean-onnx IN OUT --keep R`
        args = build_parser().parse_args(argv)
        VERBOSITY = 0 if args.quiet else (2 if args.verbose else 1)
        command = COMMANDS.get(args.command) or args.func
        return command(args)
    except LeanOnnxError as exc:
        print(f"[E] {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("[E] interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("[E] out of memory", file=sys.stderr)
        return 1
    except OSError as exc:  # a file that cannot be read or written (disk full, permissions): exit 2
        if os.environ.get("LEAN_ONNX_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"[E] {_one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line, traceback only on request
        if os.environ.get("LEAN_ONNX_DEBUG"):
            raise
        where = exc.__traceback__
        while where and where.tb_next:
            where = where.tb_next
        loc = f" at {os.path.basename(where.tb_frame.f_code.co_filename)}:{where.tb_lineno}" if where else ""
        print(_one_line(f"[E] internal error: {type(exc).__name__}: {exc}{loc} (set LEAN_ONNX_DEBUG=1 for a "
                        "traceback)"), file=sys.stderr)
        return 1


COMMANDS = {"prune": cmd_prune, "inspect": cmd_inspect, "select": cmd_select}
#: modules with a `register(subparsers)` that adds subcommands (each sets `func` on its parser)
EXTENSIONS = ("bench", "evaluate", "finetune", "sweep")
EXTENSION_COMMANDS = {"bench", "eval", "sweep", "finetune"}

if __name__ == "__main__":
    sys.exit(main())
