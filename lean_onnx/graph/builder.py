"""GraphBuilder: creates channel nodes and their incoming edges in topological order, for the op handlers."""

from __future__ import annotations

import fnmatch

import numpy as np

from .channel_graph import ChannelGraph, ConvLayer, CouplingRecord, FrozenPart, HeadRead, node_name
from .load import LoadedModel


class GraphBuilder:
    """Creates nodes and their incoming edges in topological order; used by the op handlers."""

    def __init__(self, loaded: LoadedModel, exclude: list[str], norm_grid: int | None):
        self.loaded = loaded
        self.exclude = list(exclude)
        #: graph inputs whose channels are not on axis 1: an NHWC input read only through
        #: Transpose([0,3,1,2]) (TensorFlow models) has them on axis 3
        self.channel_axis: dict[str, int] = {}
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
        axis = self.channel_axis.get(tensor, 1)
        if not shape or len(shape) < (2 if is_input else 3) or shape[axis] is None:
            return None
        nodes = self.new_sources(shape[axis])
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
