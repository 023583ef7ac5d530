"""Argument groups and checks the subcommands share (the model options, selection, outputs), and the
Pruner they all start from."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from ..errors import LeanOnnxError
from .messages import warn


def model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
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


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")


def selection_args(p: argparse.ArgumentParser, model: bool = True, budgets: bool = False) -> None:
    if model:
        model_args(p, positional=False)
    g = p.add_argument_group("selection" + (" (exactly one of --keep, --target-macs, --target-latency)"
                                            if budgets else ""))
    g.add_argument("--keep", type=float, required=not budgets,
                   help="fraction of prunable kernels to keep, in (0, 1] (kernel granularity, the reference's mode)")
    if budgets:
        g.add_argument("--target-macs", type=float, metavar="F",
                       help="the pruned model's MACs are F of the original's (within 0.03), channel granularity")
        g.add_argument("--target-latency", type=float, metavar="F",
                       help="the pruned model's measured median latency is at most F of the original's (a search "
                            "over MACs budgets with ONNX Runtime timings: --provider, --threads, --runs, --warmup)")
        g.add_argument("--granularity", choices=("kernel", "channel"),
                       help="unit kept or removed: kernel (the default with --keep) or channel, with its coupled "
                            "channels (the default, and the only one, with a --target-*)")
        g.add_argument("--min-channels", type=float, default=0.1, metavar="F",
                       help="with a --target-*: every prunable layer keeps at least F of its channels and one "
                            "rounding block, so the network never collapses (default 0.1)")
        allocate_arg(g, "a --target-*")
        drop_blocks_arg(g)
    g.add_argument("--method", default="lean", choices=("lean", "sv", "l1"),
                   help="lean: longest chains (default); sv / l1: individual operator-norm / L1 ranking")
    g.add_argument("--keep-connected", action="store_true",
                   help="if the selection cuts every chain from the inputs to the outputs (layer collapse), also "
                        "keep the kernels of the input-to-output chain with the largest product of norms")
    if not model:  # `select` only: the masked model of `prune` is defined with redundancy (DESIGN.md 2)
        g.add_argument("--no-redundancy", action="store_true", help="skip redundancy pruning (lean-spec 3.5)")


def allocate_arg(g, given: str) -> None:
    """`--allocate` (select/budget.py), for `prune` (`given` "a --target-*") and `sweep` ("--target-macs")."""
    from ..select.budget import ALLOCATIONS, DEFAULT_ALLOCATE

    g.add_argument("--allocate", choices=ALLOCATIONS, default=DEFAULT_ALLOCATE,
                   help=f"with {given}: rank channel units by value per estimated time per MAC (time, the default: "
                        "the budget is taken where ONNX Runtime spends its time, e.g. depthwise convs on large "
                        "maps) or by value alone (macs)")


def drop_blocks_arg(g) -> None:
    """`--drop-blocks` (select/blocks.py), for `prune` and `sweep`."""
    g.add_argument("--drop-blocks", type=float, metavar="F",
                   help="with a --target-*: up to F of the residual branches (y = x + f(x)) may be removed whole, "
                        "lowest gain first, while the channels left can carry the budget; the rest of the budget "
                        "is met with channels (default 1; 0: channels only)")


def norm_grid(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        grid = int(value)
    except ValueError:
        grid = 0
    if grid < 1:
        raise LeanOnnxError(f"--norm-grid {value!r}: expected 'auto' or a positive integer")
    return grid


def make_pruner(args, norms: bool = True):
    """Load, build the graph (and the norms) with the shared model options; warnings go to stderr."""
    from ..graph.load import parse_input_shapes
    from ..rewrite.pruner import Pruner

    pruner = Pruner(args.model, exclude=args.exclude, input_shapes=parse_input_shapes(args.input_shape),
                    norm_grid=norm_grid(args.norm_grid), norms=norms)
    for w in pruner.loaded.warnings:
        warn(w)
    return pruner


def emit(result: dict, args, printer) -> int:
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        printer(result, verbose=args.verbose)
    return 0


def check_selection(args) -> None:
    """Exactly one of --keep / --target-macs / --target-latency, each a fraction in (0, 1], and the options
    that go with it (select/budget.py `check_budget`), refused before any work."""
    from ..select.budget import check_budget

    given = [(flag, value) for flag, value in (("--keep", args.keep), ("--target-macs", args.target_macs),
                                               ("--target-latency", args.target_latency)) if value is not None]
    if len(given) != 1:
        raise LeanOnnxError("give exactly one of --keep, --target-macs or --target-latency"
                            + (f" (got {' and '.join(flag for flag, _ in given)})" if given else ""))
    flag, value = given[0]
    check_budget(value if flag == "--keep" else None, None if flag == "--keep" else value, args.granularity,
                 args.min_channels, target_flag=flag, drop_blocks=getattr(args, "drop_blocks", None))


def check_prune_options(args) -> None:
    """Numbers shared by `prune` and `sweep`, refused before any work."""
    if args.round_channels < 1:
        raise LeanOnnxError(f"--round-channels {args.round_channels}: expected a positive integer")
    if args.samples < 1 or args.runs < 1 or args.warmup < 0 or args.threads < 0:
        raise LeanOnnxError("--samples and --runs must be >= 1, --warmup and --threads >= 0")
    if not 0 <= args.gather_below <= 1:
        raise LeanOnnxError(f"--gather-below {args.gather_below:g}: expected a fraction in [0, 1]")


def check_outputs(args) -> None:
    """Refuse before any work: an output (OUT, --emit-masked, --report) that is the input file (also through
    a symlink, a hard link or a relative path) or one of its external data files, two outputs that are the
    same file, an output that is a directory, a missing folder, or a folder where no file can be created."""
    source = os.path.realpath(args.model)
    from ..io.ondisk import external_locations
    from ..train.distributed import World

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
        if not World.from_env().main:  # under torchrun rank 0 alone writes (and probes) the outputs
            continue
        try:  # root passes os.access everywhere; read-only file systems and sysfs refuse the file itself
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise LeanOnnxError(f"{path}: cannot create files in the output folder {folder} "
                                f"({exc.strerror or exc})") from None


def explain_selection(selection) -> None:
    """Say why the achieved keep is far below the request, or why LEAN found no chains."""
    if selection.method == "lean" and selection.num_paths == 0 and selection.selected:
        warn("no chain has a norm product >= 1: every kernel came from the individual-norm fallback "
             "(LEAN equals the sv baseline here, lean-spec 3.2)")
    removed = selection.removed_forward + selection.removed_backward
    if removed > selection.selected / 2:
        warn(f"redundancy pruning removed {removed:,} of the {selection.selected:,} selected kernels "
             f"({selection.removed_forward:,} read channels with no kept input, {selection.removed_backward:,} "
             f"fed channels nothing reads); kept {100 * selection.keep_achieved:.2f} %")


def check_distill_options(args) -> None:
    """`--lr` / `--temperature` / `--alpha` of `finetune` and of the schedule: the learning rate's default
    (1e-4 with `--teacher`, 1e-3 without: train/distill.py), a positive temperature, an alpha in [0, 1]
    that only goes with a teacher. Sets `args.lr`; one LeanOnnxError otherwise."""
    from ..train.distill import DEFAULT_LR, DISTILL_LR

    if args.lr is None:
        args.lr = DISTILL_LR if args.teacher else DEFAULT_LR
    if not args.temperature > 0:
        raise LeanOnnxError(f"--temperature {args.temperature:g}: expected a positive number (default 1)")
    if args.alpha is not None:
        if not args.teacher:
            raise LeanOnnxError("--alpha mixes the labelled and the distillation loss: it needs --teacher")
        if not 0 <= args.alpha <= 1:
            raise LeanOnnxError(f"--alpha {args.alpha:g}: expected a weight in [0, 1]")


def add_calibrate_method(group, reference: str) -> None:
    """`--calibrate-method` of `finetune --teacher` and of `--calibrate-data` (`reference`: "the teacher's" or
    "the original's")."""
    group.add_argument("--calibrate-method", choices=("reconstruct", "statistics"), default="reconstruct",
                       help=f"reconstruct (default): refit every conv's and Gemm's kept kernels and bias by ridge "
                            f"least squares to {reference} output of the same channels, layer by layer "
                            f"(train/reconstruct.py); statistics: only match each kept channel's mean and spread to "
                            f"{reference}")


def calibration_line(summary: dict, reference: str, inputs: str) -> str:
    """The one [I] line of a reconstruction's or a statistics calibration's summary (`summary["method"]`)."""
    where = f"on {summary['samples']} {inputs} ({summary['seconds']:.1f} s;"
    if summary["method"] == "reconstruct":
        return (f"reconstructed {summary['convs']} convs/Gemms to {reference} outputs {where} median relative "
                f"squared error of their outputs {summary['error_before_median']:.3f} -> "
                f"{summary['error_after_median']:.3f}; {summary['left']} left as they are)")
    return (f"calibrated {summary['channels']} channels of {summary['tensors']} convs to {reference} statistics "
            f"{where} median scale {summary['scale_median']:.3f}, {summary['scale_capped']} capped)")


def check_calibration(args) -> None:
    """Refused before any work: a missing calibration source, too few samples, no torch."""
    if not os.path.exists(args.calibrate_data):
        raise LeanOnnxError(f"{args.calibrate_data}: --calibrate-data: no such file or folder")
    if args.calibrate_samples < 2:
        raise LeanOnnxError(f"--calibrate-samples {args.calibrate_samples}: expected at least 2")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise LeanOnnxError("--calibrate-data needs torch (pip install 'lean-onnx[train]')") from None


def calibration_inputs(args, model):
    """`--calibrate-data`'s inputs for `model` (the original): an .npz's `inputs`, or images of a folder
    resized and centre-cropped as `finetune --val-data` does; at most `--calibrate-samples` of them."""
    path = args.calibrate_data
    if os.path.isdir(path):
        from ..train.images import load_image_folder, parse_size

        size = parse_size(args.input_size) if args.input_size else None
        folder = load_image_folder(path, model, args.model, "--calibrate-data", input_size=size)
        for name, why in folder.skipped[:5]:
            warn(f"{os.path.join(path, name)}: {why}; skipped")
        inputs, _ = folder.batch(range(min(args.calibrate_samples, len(folder.images))), None)
        return inputs
    from ..runtime.validate import read_inputs

    return read_inputs(path)[:args.calibrate_samples]
