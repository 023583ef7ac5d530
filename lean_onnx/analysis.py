"""Edge weights, model costs (parameters, MACs), coupling groups and the `inspect` summary."""

from __future__ import annotations

import numpy as np
import onnx
from .errors import LeanOnnxError
from .graph import ChannelGraph, ConvLayer
from .load import LoadedModel
from .norms import kernel_operator_norms


def compute_edge_weights(graph: ChannelGraph, reference_mode: bool | None = None) -> None:
    """Fill the kernel edges with operator norm x folded BN scale (DESIGN.md section 1).

    In reference mode (`--norm-grid N`, the default when a fixed grid was asked for) dilation is ignored,
    as the reference does (lean-spec 1.2, 2.4); otherwise the dilated kernel is exact on the grid.
    """
    init = graph.loaded.initializers
    if reference_mode is None:
        reference_mode = graph.norm_grid is not None
    for layer in graph.layers:
        kernels = layer.kernels(init[layer.weight_name]).astype(np.float32, copy=False)
        if not np.isfinite(kernels).all():
            raise LeanOnnxError(f"{graph.loaded.path}: node {layer.name!r} ({layer.op}): weight {layer.weight_name!r} "
                                "has NaN or infinite values: not a usable model")
        dilation = (1, 1) if reference_mode else layer.dilation
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught below, as a refusal
            layer.norms = kernel_operator_norms(kernels, stride=layer.stride, dilation=dilation, grid=layer.grid)
            weight = layer.norms if layer.bn_scale is None else layer.norms * layer.bn_scale[:, None]
        graph.weight[layer.edges] = weight.ravel()
    _check_edge_weights(graph)
    graph.weights_ready = True


def _check_edge_weights(graph: ChannelGraph) -> None:
    """Edge weights must be finite and >= 0: NaN/inf weights, BatchNormalization variances below -eps, or
    weights so large that their norms overflow make a model LEAN cannot rank (exit 2, naming the layer)."""
    bad = ~(np.isfinite(graph.weight) & (graph.weight >= 0))
    if not bad.any():
        return
    edge = int(np.flatnonzero(bad)[0])
    layer_index = int(graph.edge_layer[edge])
    if layer_index >= 0:
        layer = graph.layers[layer_index]
        what = f"node {layer.name!r} ({layer.op})" + (f" with BatchNormalization {layer.bn_name!r}" if layer.bn_name else "")
    else:
        what = "a per-channel scale (BatchNormalization, pooling or Mul/Div by a constant)"
    raise LeanOnnxError(f"{graph.loaded.path}: {what}: the operator norms are NaN, infinite or negative (NaN or "
                        "huge weights, or a negative variance): not a usable model")


def l1_scores(graph: ChannelGraph) -> np.ndarray:
    """IndivL1 scores (lean-spec 6): sum of |w| of each kernel, no BN folding; 0 for non-kernel edges."""
    scores = np.zeros(graph.num_edges)
    for layer in graph.layers:
        kernels = layer.kernels(graph.loaded.initializers[layer.weight_name])
        scores[layer.edges] = np.abs(kernels.astype(np.float64)).sum(axis=(2, 3)).ravel()
    return scores


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


def coupling_groups(graph: ChannelGraph) -> list[dict]:
    """Tensor-level groups of coupled channels: records that share a channel component are merged."""
    n = graph.num_nodes
    pairs = graph.coupling_pairs
    from scipy.sparse import coo_matrix  # lazily: `bench`/`eval` run on machines without scipy
    from scipy.sparse.csgraph import connected_components

    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else \
        coo_matrix((n, n))
    _, label = connected_components(adj, directed=False)
    records = [r for r in graph.coupling if any(t in graph.tensor_nodes for t in r.tensors)]
    parent = list(range(len(records)))

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[int, int] = {}
    for k, rec in enumerate(records):
        for comp in np.unique(np.concatenate([label[graph.tensor_nodes[t]] for t in rec.tensors
                                              if t in graph.tensor_nodes])):
            if comp in owner:
                parent[find(k)] = find(owner[comp])
            else:
                owner[comp] = k
    merged: dict[int, list] = {}
    for k, rec in enumerate(records):
        merged.setdefault(find(k), []).append(rec)
    groups = []
    for recs in merged.values():
        tensors = list(dict.fromkeys(t for r in recs for t in r.tensors if t in graph.tensor_nodes))
        comps = np.unique(np.concatenate([label[graph.tensor_nodes[t]] for t in tensors]))
        groups.append({
            "reasons": sorted({r.reason.split(":")[0].split(" (")[0] for r in recs}),
            "nodes": [r.node for r in recs],
            "tensors": tensors,
            "channels": int(len(comps)),
        })
    return groups


def inspect_summary(graph: ChannelGraph) -> dict:
    """Everything `lean-onnx inspect` prints (DESIGN.md section 5)."""
    loaded = graph.loaded
    total = sum(layer.num_kernels for layer in graph.layers)
    prunable = sum(layer.num_kernels for layer in graph.layers if layer.prunable)
    cost = model_cost(loaded)
    layers = [{
        "name": layer.name, "op": layer.op, "weight": layer.weight_name,
        "c_in": layer.c_in, "c_out": layer.c_out, "group": layer.group,
        "kernel_shape": list(layer.kernel_shape), "stride": list(layer.stride), "dilation": list(layer.dilation),
        "kernels": layer.num_kernels, "prunable": layer.prunable, "frozen_reason": layer.frozen_reason,
        "bn_folded": layer.bn_name, "norm_grid": list(layer.grid), "macs": layer_macs(layer, loaded),
    } for layer in graph.layers]
    return {
        "model": loaded.path,
        "input_shapes": {k: list(v) for k, v in loaded.input_shapes.items()},
        "input_shape_assumed": loaded.assumed_shape,
        "kernels": {"total": total, "prunable": prunable},
        "coverage": prunable / total if total else 0.0,
        "channels": int(sum(layer.c_out for layer in graph.layers)),
        "graph": {"nodes": graph.num_nodes, "edges": graph.num_edges,
                  "frozen_channels": int(graph.is_frozen.sum())},
        "params": cost["params"],
        "flops": {"macs": cost["macs"], "at_input_shapes": {k: list(v) for k, v in loaded.input_shapes.items()},
                  "nodes_without_shape": cost["macs_unknown_nodes"]},
        "layers": layers,
        "coupling_groups": coupling_groups(graph),
        "frozen": [{"node": f.node, "op": f.op, "reason": f.reason, "tensors": f.tensors, "channels": f.channels}
                   for f in graph.frozen],
        "warnings": loaded.warnings,
    }
