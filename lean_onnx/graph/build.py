"""build_channel_graph: run every node of a loaded model through its op handler (registry.py)."""

from __future__ import annotations

from ..errors import NothingToPrune
from .builder import GraphBuilder
from .channel_graph import ChannelGraph, FrozenPart
from .handlers import attr
from .load import LoadedModel
from .registry import handle_node


def build_channel_graph(loaded: LoadedModel, exclude: list[str] | None = None,
                        norm_grid: int | None = None) -> ChannelGraph:
    """Build the channel graph of a loaded model (see module docstring). Raises NothingToPrune."""
    b = GraphBuilder(loaded, exclude or [], norm_grid)
    graph = loaded.graph
    inits = set(loaded.initializers)
    for inp in graph.input:
        if inp.name not in inits:
            if _nhwc_input(graph, inp):
                b.channel_axis[inp.name] = 3
            b.nodes(inp.name)
    for node in graph.node:
        handle_node(node, b)
    for tensor, shape_node in loaded.shape_reads.items():
        nodes = b.tensor_nodes.get(tensor)
        if nodes is not None:
            b.frozen_nodes.append(nodes)
            b.frozen.append(FrozenPart(shape_node, "Shape", "the channel count is read at run time", [tensor],
                                       len(nodes)))
    outputs = [o.name for o in graph.output]
    for name in outputs:
        b.terminal([name], "graph output keeps its channels", _OutputNode(name))
    result = b.finish()
    if not result.layers:
        raise NothingToPrune(f"{loaded.path}: nothing to prune: the model has no Conv or ConvTranspose")
    if not any(layer.prunable for layer in result.layers):
        reasons = sorted({layer.frozen_reason or "" for layer in result.layers})
        raise NothingToPrune(f"{loaded.path}: nothing to prune: every conv layer is frozen ({'; '.join(reasons)})")
    return result


def _nhwc_input(graph, inp) -> bool:
    """A rank-4 graph input that every reader transposes to NCHW (perm [0,3,1,2]): its channels are axis 3."""
    readers = [node for node in graph.node if inp.name in node.input]
    return len(inp.type.tensor_type.shape.dim) == 4 and bool(readers) and all(
        node.op_type == "Transpose" and attr(node, "perm") == [0, 3, 1, 2] for node in readers)


class _OutputNode:
    """Stands in for a node in FrozenPart records of graph outputs."""

    def __init__(self, name: str):
        self.name, self.output, self.op_type = f"output:{name}", [name], "GraphOutput"
