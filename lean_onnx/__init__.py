"""lean-onnx: LEAN pruning (longest chains of operator norms) for any ONNX CNN."""

__version__ = "0.1.0"
