"""`[I]` / `[W]` lines on stderr at the verbosity the command asked for (`-q` 0, default 1, `-v` 2)."""

from __future__ import annotations

import sys

VERBOSITY = 1


def info(msg: str) -> None:
    if VERBOSITY >= 1:
        print(f"[I] {msg}", file=sys.stderr)


def warn(msg: str) -> None:
    if VERBOSITY >= 0:
        print(f"[W] {msg}", file=sys.stderr)


def one_line(text: str) -> str:
    """Messages go out as one line: a pipeline reads the first line of stderr."""
    return " ".join(str(text).split())[:2000]


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings from the libraries (numpy, onnx) become one `[W]` line each, never a stack."""
    warn(one_line(f"{category.__name__}: {message}"))
