"""lean-onnx: LEAN pruning (longest chains of operator norms) for any ONNX CNN.

    >>> from lean_onnx import load_model, build_channel_graph, select_kernels   # doctest: +SKIP
    >>> graph = build_channel_graph(load_model("model.onnx"))
    >>> selection = select_kernels(graph, keep=0.05, method="lean")
    >>> selection.stats()["kept"], selection.layer_mask(graph.layers[0]).shape

Importing the package loads nothing heavy; the names below are imported on first use. The stages are
subpackages, imported one way (docs/architecture.md): io <- graph <- select <- rewrite <- runtime <- train
<- cli; `errors` and `report` are leaves every stage may use.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "graph.load",
    "build_channel_graph": "graph.build",
    "inspect_summary": "graph.summary",
    "compute_edge_weights": "select.weights",
    "select_kernels": "select.selection",
    "prune": "rewrite.pruner",
    "Pruner": "rewrite.pruner",
    "PruneResult": "rewrite.pruner",
    "benchmark": "runtime.bench",
    "validate": "runtime.validate",
    "evaluate": "runtime.evaluate",
    "sweep": "runtime.sweep",
    "LeanOnnxError": "errors",
    "NothingToPrune": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lean_onnx' has no attribute {name!r}")
