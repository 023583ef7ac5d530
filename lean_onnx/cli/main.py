"""Command line: `lean-onnx IN OUT --keep R` (= `prune`), `inspect`, `select`, `sweep`, `bench`, `eval`,
`finetune`. This module parses and dispatches; each subcommand's module registers its parser and runs it.
Every failure is one `[E]` line and an exit code (DESIGN.md section 6): 2 bad usage or input, 3 a
validation gate failed, 4 nothing to prune, 1 an internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .. import __version__
from ..errors import LeanOnnxError
from . import bench, evaluate, finetune, inspect_select, messages, prune, sweep
from .messages import one_line, show_warning

#: subcommand name -> the module whose `register(subparsers)` adds it (and sets `func` on its parser)
COMMANDS = {"prune": prune, "inspect": inspect_select, "select": inspect_select, "sweep": sweep, "bench": bench,
            "eval": evaluate, "finetune": finetune}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message by default)
        raise LeanOnnxError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lean-onnx", description="LEAN pruning (longest chains of operator norms) for ONNX CNNs.")
    parser.add_argument("--version", action="version", version=f"lean-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    for module in dict.fromkeys(COMMANDS.values()):
        module.register(sub)
    return parser


def _check_world(args) -> None:
    """Under torchrun (WORLD_SIZE > 1) only fine-tuning runs data-parallel: `finetune` and the prune
    schedule with --finetune-data; anything else would do the same work N times. Ranks other than 0 print
    errors only (rank 0 shows progress and warnings)."""
    from ..train.distributed import World

    world = World.from_env()
    if not world.parallel:
        return
    if not (args.command == "finetune" or (args.command == "prune" and getattr(args, "finetune_data", None))):
        raise LeanOnnxError(f"{args.command}: runs in one process; under torchrun (WORLD_SIZE {world.size}) only "
                            "`finetune` and the prune schedule with --finetune-data run data-parallel")
    if not world.main:
        messages.VERBOSITY = -1
        warnings.simplefilter("ignore")


def _world():
    """The torchrun world of this process, or None when torchrun's variables are unreadable (the error that
    main() reports)."""
    from ..train.distributed import World

    try:
        return World.from_env()
    except LeanOnnxError:
        return None


def _rank() -> str:
    """"rank R/N: " before an error under torchrun (every rank prints its own), else nothing (also when
    torchrun's variables are unreadable: that is the error being printed)."""
    world = _world()
    return f"rank {world.rank}/{world.size}: " if world is not None and world.parallel else ""


def run() -> None:
    """The `lean-onnx` and `python -m lean_onnx` entry point: `main()`, then exit with its code. A process of a
    torchrun run (WORLD_SIZE > 1) leaves with os._exit once its output is flushed: its files are written
    (atomically) and its process group destroyed by then, and the interpreter's own teardown raced a C++
    thread left by torch/gloo: in about 1 of 10 runs on a loaded 2-core machine a rank that had finished
    ended with "terminate called without an active exception" (SIGABRT), and torchrun failed the run."""
    code = main()
    world = _world()
    if world is not None and world.parallel:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    if not os.environ.get("LEAN_ONNX_DEBUG"):
        warnings.showwarning = show_warning
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
            argv.insert(0, "prune")  # `lean-onnx IN OUT --keep R`
        args = build_parser().parse_args(argv)
        messages.VERBOSITY = 0 if args.quiet else (2 if args.verbose else 1)
        _check_world(args)
        return args.func(args)
    except LeanOnnxError as exc:
        print(f"[E] {_rank()}{one_line(exc)}", file=sys.stderr)
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
        print(f"[E] {one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line, traceback only on request
        if os.environ.get("LEAN_ONNX_DEBUG"):
            raise
        where = exc.__traceback__
        while where and where.tb_next:
            where = where.tb_next
        loc = f" at {os.path.basename(where.tb_frame.f_code.co_filename)}:{where.tb_lineno}" if where else ""
        print(one_line(f"[E] {_rank()}internal error: {type(exc).__name__}: {exc}{loc} (set LEAN_ONNX_DEBUG=1 for a "
                        "traceback)"), file=sys.stderr)
        return 1
