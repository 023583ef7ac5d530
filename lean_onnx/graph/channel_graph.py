"""The channel graph's data: every channel is a node, every k x k kernel of a Conv/ConvTranspose an edge.

Node ids are assigned in topological order, and every edge into a node is created together with the
node, so the edge arrays come out in *in-CSR* order (edges into node v are `indptr[v]:indptr[v+1]`)
without a global sort. Inside a conv layer the edges are dst-major: edge `edge_start + j*c_in_g + i`
is kernel (output j, in-group input i).

Ops that do not mix channels *alias* their input nodes (Relu, MaxPool, Concat/Split/Slice on the
channel axis...). Ops that scale a channel (unfolded BatchNormalization, AveragePool, Mul by a
constant) and residual sums create new nodes reached by *skippable* edges (lean-spec 1.2).
`builder.py` creates them, the per-op rules in `handlers.py` / `routing.py` drive it, `build.py` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .load import LoadedModel


@dataclass
class ConvLayer:
    """One Conv or ConvTranspose; its kernels are the edges `edge_start : edge_start + num_kernels`."""

    index: int
    name: str
    op: str
    weight_name: str
    input: str
    output: str
    c_in: int
    c_out: int
    group: int
    kernel_shape: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    grid: tuple[int, int]
    in_nodes: np.ndarray
    out_nodes: np.ndarray
    edge_start: int
    prunable: bool = True
    frozen_reason: str | None = None
    bn_name: str | None = None
    bn_scale: np.ndarray | None = None
    norms: np.ndarray | None = None

    @property
    def c_in_g(self) -> int:
        return self.c_in // self.group

    @property
    def num_kernels(self) -> int:
        return self.c_out * self.c_in_g

    @property
    def edges(self) -> slice:
        return slice(self.edge_start, self.edge_start + self.num_kernels)

    def kernels(self, weight: np.ndarray) -> np.ndarray:
        """The weight as (c_out, c_in_g, kh, kw), kernel [j, i] = edge (j, i) of this layer."""
        if self.op == "ConvTranspose":  # ONNX layout (c_in, c_out/g, k...)
            g, cig, cog = self.group, self.c_in_g, self.c_out // self.group
            weight = weight.reshape((g, cig, cog) + weight.shape[2:]).swapaxes(1, 2)
            weight = weight.reshape((self.c_out, cig) + weight.shape[3:])
        if weight.ndim == 3:  # 1-D conv: a 1 x k kernel
            weight = weight[:, :, None, :]
        return weight


@dataclass
class HeadRead:
    """A linear head reads the channels of `tensor`: `reader` (Flatten, Reshape to rank 2, or the
    Gemm/MatMul itself) with output `reader_output`."""

    reader: str
    op: str
    reader_output: str
    tensor: str


@dataclass
class CouplingRecord:
    """Channels of `tensors` that must be removed together (or with offsets, for Concat/Split)."""

    reason: str
    node: str
    tensors: list[str]


@dataclass
class FrozenPart:
    """A part of the model whose channels (or kernels) lean-onnx will not change, and why."""

    node: str
    op: str
    reason: str
    tensors: list[str]
    channels: int


@dataclass
class ChannelGraph:
    """Arrays of the channel graph plus the layer, coupling and frozen bookkeeping."""

    num_nodes: int
    src: np.ndarray
    indptr: np.ndarray
    weight: np.ndarray
    skippable: np.ndarray
    edge_layer: np.ndarray
    is_source: np.ndarray
    is_terminal: np.ndarray
    is_frozen: np.ndarray
    layers: list[ConvLayer]
    tensor_nodes: dict[str, np.ndarray]
    coupling: list[CouplingRecord]
    coupling_pairs: np.ndarray
    frozen: list[FrozenPart]
    loaded: LoadedModel
    norm_grid: int | None = None
    weights_ready: bool = False
    head_reads: list[HeadRead] = field(default_factory=list)
    is_hard_terminal: np.ndarray | None = None  # terminals other than linear heads (those can drop columns)

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])

    @property
    def dst(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_nodes, dtype=np.int64), np.diff(self.indptr))

    @property
    def prunable_edges(self) -> np.ndarray:
        return (self.edge_layer >= 0) & ~self.skippable

    @property
    def input_nodes(self) -> np.ndarray:
        """Boolean mask of the channels of the graph inputs (those with a known shape)."""
        mask = np.zeros(self.num_nodes, dtype=bool)
        for name in self.loaded.input_shapes:
            if name in self.tensor_nodes:
                mask[self.tensor_nodes[name]] = True
        return mask

    @cached_property
    def coupling_components(self) -> np.ndarray:
        """Component id per channel node: the connected components of the coupling pairs (channels that
        leave together); computed once per graph."""
        return pair_components(self.num_nodes, self.coupling_pairs)

    def is_channel_concat(self, node) -> bool:
        """A Concat whose output's channels are its inputs' channels, one after the other (every input and the
        output tracked; an input of unknown channel count freezes the Concat and is not tracked)."""
        tracked = self.tensor_nodes
        return (node.op_type == "Concat" and node.output[0] in tracked and all(t in tracked for t in node.input)
                and len(tracked[node.output[0]]) == sum(len(tracked[t]) for t in node.input))

    @cached_property
    def blocked_tensors(self) -> dict[str, np.ndarray]:
        """Tensor -> channel nodes, for every tensor whose channel count a blocked kernel sees: the input and
        output of every conv, the inputs of a Concat and the outputs of a Split. ONNX Runtime's NCHWc convs
        (and TensorRT's tensor cores) run only when these counts are multiples of the block (8 or 16); a
        conv that reads a Split half of 31 channels ran 2x slower than with 32 (docs/budgets.md). A conv
        input that is a channel Concat is left out: its parts are in, so it is a multiple when they are,
        and rounding the sum as well would tie the parts' blocks together."""
        names, concats = [t for layer in self.layers for t in (layer.input, layer.output)], set()
        for node in self.loaded.graph.node:
            if node.op_type == "Concat":
                names += node.input
                if self.is_channel_concat(node):
                    concats.add(self.tensor_nodes[node.output[0]].tobytes())
            elif node.op_type == "Split":
                names += node.output
        return {t: self.tensor_nodes[t] for t in dict.fromkeys(names)
                if t in self.tensor_nodes and self.tensor_nodes[t].tobytes() not in concats}

    def layer_by_name(self, name: str) -> ConvLayer:
        return next(layer for layer in self.layers if layer.name == name)


def pair_components(num_nodes: int, pairs: np.ndarray) -> np.ndarray:
    """Component id per node of the undirected graph whose edges are `pairs` (k x 2)."""
    from scipy.sparse import coo_matrix  # lazily: `bench`/`eval` need no channel graph
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return np.arange(num_nodes)
    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(num_nodes, num_nodes))
    return connected_components(adj, directed=False)[1]


def node_name(node) -> str:
    if node is None:
        return "-"
    return node.name or (node.output[0] if node.output else node.op_type)
