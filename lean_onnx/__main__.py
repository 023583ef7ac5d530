"""`python -m lean_onnx ...` is the `lean-onnx` command."""

from .cli import run

run()
