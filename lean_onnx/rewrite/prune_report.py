"""The JSON report of a prune (DESIGN.md section 5); input/output paths are added by the caller."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph.channel_graph import ChannelGraph
from ..report import tool_versions
from ..select.selection import Selection, inputs_reach_outputs
from .plan import Plan

SCHEMA_VERSION = 1


def pruned_kernels(model: onnx.ModelProto) -> int:
    """Kernels (c_out x c_in/group) of every Conv/ConvTranspose in a model."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.input[1] in shapes:
            dims = shapes[node.input[1]]
            total += int(dims[0]) * int(dims[1])
    return total


def build_report(graph: ChannelGraph, sel: Selection, plan: Plan, pruned, before: dict, after: dict,
                 timings: dict) -> dict:
    """The JSON report of DESIGN.md section 5 (input/output paths are added by the caller)."""
    init = graph.loaded.initializers
    layers, dead_nonzero = [], 0
    for layer in graph.layers:
        kept_rows = plan.node_keep[layer.out_nodes]
        out_keep = plan.keep(layer.output)
        after_channels = int(out_keep.sum()) if out_keep is not None else layer.c_out
        producer = graph.loaded.producer.get(layer.output)
        bias_name = producer.input[2] if producer is not None and len(producer.input) > 2 and producer.input[2] \
            else None
        if bias_name is not None:
            dead = plan.dead[layer.out_nodes] & kept_rows
            dead_nonzero += int(np.count_nonzero(init[bias_name][dead]))
        layers.append({"name": layer.name, "op": layer.op, "channels": {"before": layer.c_out, "after": after_channels},
                       "kernels": {"total": layer.num_kernels, "kept": int(sel.layer_mask(layer).sum())},
                       "prunable": layer.prunable})
    stats = sel.stats()
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_versions(),
        "method": sel.method,
        "keep_requested": sel.keep_requested,
        "input_shapes": {k: list(v) for k, v in graph.loaded.input_shapes.items()},
        "kernels": {
            "total": stats["total"], "requested": stats["requested"], "selected": stats["selected"],
            "kept": stats["kept"], "keep_achieved": stats["keep_achieved"],
            "from_paths": stats["from_paths"], "from_fallback": stats["from_fallback"],
            "in_pruned_model": pruned_kernels(pruned), "in_original_model": sum(x.num_kernels for x in graph.layers),
            "removed_by_redundancy": stats["removed_by_redundancy"], "paths": stats["paths"],
        },
        "channels": {"before": sum(x["channels"]["before"] for x in layers),
                     "after": sum(x["channels"]["after"] for x in layers),
                     "dead_kept": int(np.count_nonzero(plan.dead & plan.node_keep)),
                     "dead_nonzero_bias": dead_nonzero},
        "params": {"before": before["params"], "after": after["params"]},
        "flops": {"before": before["macs"], "after": after["macs"], "unit": "MACs",
                  "at_input_shapes": {k: list(v) for k, v in graph.loaded.input_shapes.items()}},
        "concat_inputs_dropped": sum(len(v) for v in plan.concat_drop.values()),
        "head_channels_dropped": sum(int((~plan.keep(h.read.tensor)).sum()) for h in plan.heads),
        "fold_constants": not plan.zero_dead,
        "gathers_inserted": len(plan.gathers),
        "residual_sums_bypassed": sorted(plan.bypass),  # their branch was removed whole (rewrite/bypass.py)
        "inputs_reach_outputs": inputs_reach_outputs(graph, sel.edge_keep),
        "layers": layers,
        "frozen": [{"node": f.node, "op": f.op, "reason": f.reason, "channels": f.channels} for f in graph.frozen],
        "timings_s": timings,
    }
