"""What a model costs: parameters (float constant elements) and multiply-accumulates of
Conv/ConvTranspose/Gemm/MatMul at the analysis input shape."""

from __future__ import annotations

import numpy as np
import onnx

from .channel_graph import ConvLayer
from .load import LoadedModel


def layer_macs(layer: ConvLayer, loaded: LoadedModel) -> int | None:
    """Multiply-accumulates of one conv at the analysis input shape (None when shapes are unknown)."""
    shape = loaded.shape(layer.input if layer.op == "ConvTranspose" else layer.output)
    if not shape or any(d is None for d in shape):
        return None
    per_position = int(np.prod(layer.kernel_shape)) * (layer.c_out // layer.group if layer.op == "ConvTranspose"
                                                        else layer.c_in_g)
    return int(np.prod(shape)) * per_position


def float_params(model) -> int:
    """Elements of the floating-point constants of a ModelProto (its parameters): initializers and
    Constant nodes alike, so a model and its normalised copy count the same."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in tensors
               if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), np.floating))


def pruned_macs(model, loaded: LoadedModel) -> int:
    """MACs of a pruned model from its weight shapes and the original's batch/spatial sizes (pruning
    changes channels only), without loading it again."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.input[1] in dims:
            w = dims[node.input[1]]
            shape = loaded.shape(node.input[0] if node.op_type == "ConvTranspose" else node.output[0])
            original = loaded.producer.get(node.output[0])  # count what model_cost counted, no more
            if shape and None not in shape and original is not None and _node_macs(original, loaded) is not None:
                total += int(np.prod([shape[0]] + list(shape[2:]))) * int(np.prod(w))
        elif node.op_type in ("Gemm", "MatMul"):
            total += _node_macs(node, loaded) or 0
    return total


def model_cost(loaded: LoadedModel) -> dict:
    """Parameters (float initializer elements) and MACs of Conv/ConvTranspose/Gemm/MatMul."""
    params = float_params(loaded.skeleton if loaded.skeleton is not None else loaded.original)
    macs, unknown = 0, []
    for node in loaded.graph.node:
        value = _node_macs(node, loaded)
        if value is None and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            unknown.append(node.name or node.output[0])
        macs += value or 0
    return {"params": params, "macs": macs, "macs_unknown_nodes": unknown}


def _node_macs(node, loaded: LoadedModel) -> int | None:
    op = node.op_type
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return 0
    shapes = [loaded.shape(t) for t in list(node.input[:2]) + [node.output[0]]]
    if any(s is None or any(d is None for d in s) for s in shapes):
        return None
    (x, w, y) = shapes
    if op == "Conv":
        return int(np.prod(y)) * int(np.prod(w[1:]))
    if op == "ConvTranspose":
        return int(np.prod(x)) * int(np.prod(w[1:]))
    return int(np.prod(y)) * int(x[-1])  # Gemm (transA ignored: A is (M, K) in every exporter seen) / MatMul
