"""Edge weights (DESIGN.md 1): each kernel's operator norm times the BatchNormalization scale folded into
its conv; and the L1 scores of the `l1` baseline."""

from __future__ import annotations

import numpy as np

from ..errors import LeanOnnxError
from ..graph.channel_graph import ChannelGraph
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
