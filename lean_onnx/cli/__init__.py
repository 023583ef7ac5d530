"""The command line (top of the pipeline): argument parsing, `[I]/[W]/[E]` messages, exit codes, and one
module per subcommand that wires the stages below (graph, select, rewrite, runtime, train)."""

from .main import main, run

__all__ = ["main", "run"]
