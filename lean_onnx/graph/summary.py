"""What `lean-onnx inspect` reports about a channel graph: layers, coupling groups, frozen parts, cost."""

from __future__ import annotations

import numpy as np

from .channel_graph import ChannelGraph
from .cost import layer_macs, model_cost


def coupling_groups(graph: ChannelGraph) -> list[dict]:
    """Tensor-level groups of coupled channels: records that share a channel component are merged."""
    label = graph.coupling_components
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
                  "frozen_channels": int(graph.is_frozen.sum()),
                  "frozen_share": float(graph.is_frozen.sum() / graph.num_nodes) if graph.num_nodes else 0.0},
        "params": cost["params"],
        "flops": {"macs": cost["macs"], "at_input_shapes": {k: list(v) for k, v in loaded.input_shapes.items()},
                  "nodes_without_shape": cost["macs_unknown_nodes"]},
        "layers": layers,
        "coupling_groups": coupling_groups(graph),
        "frozen": [{"node": f.node, "op": f.op, "reason": f.reason, "tensors": f.tensors, "channels": f.channels}
                   for f in graph.frozen],
        "warnings": loaded.warnings,
    }
