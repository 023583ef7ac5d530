"""The channel graph: every channel is a node, every k x k kernel of a Conv/ConvTranspose an edge.

Node ids are assigned in topological order, and every edge into a node is created together with the
node, so the edge arrays come out in *in-CSR* order (edges into node v are `indptr[v]:indptr[v+1]`)
without a global sort. Inside a conv layer the edges are dst-major: edge `edge_start + j*c_in_g + i`
is kernel (output j, in-group input i).

Ops that do not mix channels *alias* their input nodes (Relu, MaxPool, Concat/Split/Slice on the
channel axis...). Ops that scale a channel (unfolded BatchNormalization, AveragePool, Mul by a
constant) and residual sums create new nodes reached by *skippable* edges (lean-spec 1.2).
The per-op rules live in `handlers.py`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from .errors import LeanOnnxError, NothingToPrune
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

    def layer_by_name(self, name: str) -> ConvLayer:
        return next(layer for layer in self.layers if layer.name == name)


class GraphBuilder:
    """Creates nodes and their incoming edges in topological order; used by the op handlers."""

    def __init__(self, loaded: LoadedModel, exclude: list[str], norm_grid: int | None):
        self.loaded = loaded
        self.exclude = list(exclude)
        self.norm_grid = norm_grid
        self.num_nodes = 0
        self.tensor_nodes: dict[str, np.ndarray] = {}
        self.blocks: list[tuple[int, int, np.ndarray, np.ndarray, bool, int]] = []
        self.num_edges = 0
        self.sources: list[np.ndarray] = []
        self.terminals: list[np.ndarray] = []
        self.head_reads: list[HeadRead] = []
        self.head_terminals: list[np.ndarray] = []
        self.frozen_nodes: list[np.ndarray] = []
        self.layers: list[ConvLayer] = []
        self.coupling: list[CouplingRecord] = []
        self.pairs: list[np.ndarray] = []
        self.frozen: list[FrozenPart] = []
        self.folded_bn: set[str] = set()
        self.split_nodes: dict[str, np.ndarray] = {}  # channel axis split in several (channel shuffle)

    # -- nodes and edges ---------------------------------------------------------------------
    def new_nodes(self, count, src=None, weight=None, skippable=True, layer=-1) -> np.ndarray:
        """Create `count` nodes; `src` (count, degree) gives each node's incoming edges (dst-major)."""
        first = self.num_nodes
        self.num_nodes += count
        if src is not None and src.size:
            src = np.asarray(src, dtype=np.int64).reshape(count, -1)
            w = np.ones(src.shape) if weight is None else np.broadcast_to(weight, src.shape)
            self.blocks.append((first, src.shape[1], src.ravel(), np.asarray(w, np.float64).ravel(), skippable, layer))
            self.num_edges += src.size
        return np.arange(first, first + count, dtype=np.int64)

    def new_sources(self, count, frozen=True) -> np.ndarray:
        nodes = self.new_nodes(count)
        self.sources.append(nodes)
        if frozen:
            self.frozen_nodes.append(nodes)
        return nodes

    def nodes(self, tensor: str) -> np.ndarray | None:
        """Channel nodes of a tensor; tensors from unknown ops get fresh (frozen) source nodes."""
        if tensor in self.tensor_nodes:
            return self.tensor_nodes[tensor]
        if tensor in self.loaded.initializers or not tensor:
            return None
        shape = self.loaded.shape(tensor)
        is_input = any(i.name == tensor for i in self.loaded.graph.input)
        # (N, C, spatial...) feature maps only: a Gemm's (N, features) output carries no conv channels
        if not shape or len(shape) < (2 if is_input else 3) or shape[1] is None:
            return None
        nodes = self.new_sources(shape[1])
        self.tensor_nodes[tensor] = nodes
        return nodes

    def set_nodes(self, tensor: str, nodes: np.ndarray) -> None:
        self.tensor_nodes[tensor] = nodes

    def couple(self, reason: str, node, tensors: list[str], a=None, b=None) -> None:
        self.coupling.append(CouplingRecord(reason, node_name(node), [t for t in tensors if t]))
        if a is not None:
            self.pairs.append(np.stack(np.broadcast_arrays(np.asarray(a), np.asarray(b)), axis=-1).reshape(-1, 2))

    def terminal(self, tensors, frozen_reason: str | None = None, node=None) -> None:
        """Channels read by something that is not a kernel (a head, a graph output, an unknown op)."""
        frozen_tensors, channels = [], 0
        for t in tensors:
            nodes = self.tensor_nodes.get(t)
            if nodes is None:
                continue
            self.terminals.append(nodes)
            if frozen_reason:
                self.frozen_nodes.append(nodes)
                frozen_tensors.append(t)
                channels += len(nodes)
        if frozen_reason and frozen_tensors:
            self.frozen.append(FrozenPart(node_name(node), node.op_type if node is not None else "-",
                                          frozen_reason, frozen_tensors, channels))

    def linear_head(self, node, tensor: str) -> None:
        """`node` (Flatten/Reshape to rank 2, Gemm, MatMul) feeds the channels of `tensor` to a linear head;
        the plan may drop the columns of channels that are constant there (constants.py)."""
        nodes = self.tensor_nodes.get(tensor)
        if nodes is not None:
            self.head_reads.append(HeadRead(node_name(node), node.op_type, node.output[0], tensor))
            self.head_terminals.append(nodes)

    def excluded_by(self, node, weight_name: str) -> str | None:
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(node_name(node), pattern) or fnmatch.fnmatchcase(weight_name, pattern):
                return pattern
        return None

    # -- finish ------------------------------------------------------------------------------
    def finish(self) -> ChannelGraph:
        degree = np.zeros(self.num_nodes, dtype=np.int64)
        for first, deg, src, _, _, _ in self.blocks:
            degree[first:first + src.size // deg] = deg
        indptr = np.zeros(self.num_nodes + 1, dtype=np.int64)
        np.cumsum(degree, out=indptr[1:])
        cat = (lambda arrays, dtype: np.concatenate(arrays).astype(dtype, copy=False)
               if arrays else np.zeros(0, dtype))
        src = cat([b[2] for b in self.blocks], np.int64)
        weight = cat([b[3] for b in self.blocks], np.float64)
        skippable = cat([np.full(b[2].size, b[4]) for b in self.blocks], bool)
        edge_layer = cat([np.full(b[2].size, b[5], np.int32) for b in self.blocks], np.int32)
        flags = []
        for arrays in (self.sources, self.terminals + self.head_terminals, self.frozen_nodes, self.terminals):
            mask = np.zeros(self.num_nodes, dtype=bool)
            for nodes in arrays:
                mask[nodes] = True
            flags.append(mask)
        pairs = np.concatenate(self.pairs) if self.pairs else np.zeros((0, 2), np.int64)
        return ChannelGraph(self.num_nodes, src, indptr, weight, skippable, edge_layer, *flags[:3],
                            self.layers, self.tensor_nodes, self.coupling, pairs, self.frozen, self.loaded,
                            self.norm_grid, head_reads=self.head_reads, is_hard_terminal=flags[3])


def node_name(node) -> str:
    if node is None:
        return "-"
    return node.name or (node.output[0] if node.output else node.op_type)


def build_channel_graph(loaded: LoadedModel, exclude: list[str] | None = None,
                        norm_grid: int | None = None) -> ChannelGraph:
    """Build the channel graph of a loaded model (see module docstring). Raises NothingToPrune."""
    from .registry import handle_node  # handlers import this module

    b = GraphBuilder(loaded, exclude or [], norm_grid)
    graph = loaded.graph
    inits = set(loaded.initializers)
    for inp in graph.input:
        if inp.name not in inits:
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


class _OutputNode:
    """Stands in for a node in FrozenPart records of graph outputs."""

    def __init__(self, name: str):
        self.name, self.output, self.op_type = f"output:{name}", [name], "GraphOutput"


def check_keep(keep: float) -> float:
    if not 0 < keep <= 1:
        hint = f"; did you mean {keep / 100:g}?" if 1 < keep <= 100 else ""
        raise LeanOnnxError(f"--keep is the kept fraction of kernels, in (0, 1]; got {keep:g}{hint}")
    return keep
