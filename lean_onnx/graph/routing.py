"""Channel-flow rules for ops that route or reshape channels: Concat, Split, Slice, Pad, Resize,
Transpose, (Un)Squeeze, Flatten/Reshape (the registry is in handlers.py)."""

from __future__ import annotations

import numpy as np

from .builder import GraphBuilder
from .handlers import _axes, attr, const, elementwise, freeze, linear_head, rank, same_channels, unknown

# -- channel routing -------------------------------------------------------------------------

def concat(node, b: GraphBuilder) -> None:
    r = rank(b, node.output[0])
    axis = int(attr(node, "axis", 1)) % r if r else 1
    inputs = [t for t in node.input if t]
    if axis != 1:
        nodes = [b.nodes(t) for t in inputs]
        live = [(t, n) for t, n in zip(inputs, nodes) if n is not None]
        if live and all(len(n) == len(live[0][1]) and np.array_equal(n, live[0][1]) for _, n in live):
            return b.set_nodes(node.output[0], live[0][1])
        return elementwise(node, b)
    parts = []
    for t in inputs:
        nodes = b.nodes(t)
        if nodes is None:  # a constant slice of channels: fresh, frozen channels
            shape = b.loaded.shape(t)
            if not shape or len(shape) < 2 or shape[1] is None:
                return unknown(node, b, f"channel count of input {t!r} is unknown")
            nodes = b.new_sources(shape[1])
        parts.append(nodes)
    b.set_nodes(node.output[0], np.concatenate(parts))
    b.couple("Concat on the channel axis (offsets)", node, inputs + [node.output[0]])


def split(node, b: GraphBuilder) -> None:
    nodes = b.nodes(node.input[0])
    if nodes is None:
        return
    r = rank(b, node.input[0])
    axis = int(attr(node, "axis", 0)) % r if r else 0
    outputs = list(node.output)
    if axis != 1:
        for t in outputs:
            b.set_nodes(t, nodes)
        return
    sizes = attr(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        value = const(b, node, 1)
        if value is None:
            return unknown(node, b, "split sizes are computed at run time")
        sizes = value.ravel().tolist()
    if sizes is None:
        n = len(outputs)
        chunk = -(-len(nodes) // n)
        sizes = [min(chunk, len(nodes) - k * chunk) for k in range(n)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    for t, start, stop in zip(outputs, offsets[:-1], offsets[1:]):
        b.set_nodes(t, nodes[start:stop])
    b.couple("Split on the channel axis (offsets)", node, [node.input[0]] + outputs)


def slice_(node, b: GraphBuilder) -> None:
    nodes = b.nodes(node.input[0])
    if nodes is None:
        return
    r = rank(b, node.input[0]) or 4
    if len(node.input) > 1:
        values = [const(b, node, k) for k in range(1, len(node.input))]
        if any(v is None and node.input[k + 1] for k, v in enumerate(values)):
            return unknown(node, b, "slice bounds are computed at run time")
        starts, ends = values[0].ravel(), values[1].ravel()
        axes = values[2].ravel() if len(values) > 2 and values[2] is not None else np.arange(len(starts))
        steps = values[3].ravel() if len(values) > 3 and values[3] is not None else np.ones(len(starts), int)
    else:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes = attr(node, "axes", list(range(len(starts))))
        steps = [1] * len(starts)
    picked = np.arange(len(nodes))
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if int(axis) % r == 0:
            return unknown(node, b, "slices the batch axis")
        if int(axis) % r == 1:
            clip = lambda v: int(max(min(int(v), 2**62), -(2**62)))  # noqa: E731 (INT64 sentinels)
            picked = picked[slice(clip(start), clip(end), int(step))]
            b.couple("Slice on the channel axis (offsets)", node, [node.input[0], node.output[0]])
            if int(step) != 1:
                freeze(b, node, [node.input[0]], "Slice with a step on the channel axis")
    b.set_nodes(node.output[0], nodes[picked])


# -- shape ops -------------------------------------------------------------------------------

def pad(node, b: GraphBuilder) -> None:
    pads = attr(node, "pads")
    if pads is None:
        value = const(b, node, 1)
        if value is None:
            return unknown(node, b, "pads are computed at run time")
        pads = value.ravel().tolist()
    r = len(pads) // 2
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 3 and node.input[3]:
        axes = const(b, node, 3)
    axes = list(range(r)) if axes is None else [int(a) % (rank(b, node.input[0]) or 4) for a in np.ravel(axes)]
    if any(a in (0, 1) and (pads[k] or pads[k + r]) for k, a in enumerate(axes)):
        return unknown(node, b, "pads the batch or channel axis")
    same_channels(node, b)


def resize(node, b: GraphBuilder) -> None:
    shape_in, shape_out = b.loaded.shape(node.input[0]), b.loaded.shape(node.output[0])
    if shape_in and shape_out and len(shape_in) > 1 and shape_in[1] != shape_out[1]:
        return unknown(node, b, "resizes the channel axis")
    same_channels(node, b)


def transpose(node, b: GraphBuilder) -> None:
    """Keeps axis 1 (alias), or permutes the split channel axes of a channel shuffle."""
    perm = list(attr(node, "perm") or [])
    split_nodes = b.split_nodes.get(node.input[0])
    if split_nodes is not None:
        k = split_nodes.ndim
        if perm[:1] == [0] and sorted(perm[1:k + 1]) == list(range(1, k + 1)) and perm[k + 1:] == list(
                range(k + 1, len(perm))):
            b.split_nodes[node.output[0]] = split_nodes.transpose([p - 1 for p in perm[1:k + 1]])
            return
    elif len(perm) >= 2 and perm[0] == 0 and perm[1] == 1:
        return same_channels(node, b)
    elif perm == [0, 3, 1, 2] and b.channel_axis.get(node.input[0]) == 3:  # an NHWC graph input to NCHW
        return same_channels(node, b)
    elif perm == [0, 2, 3, 1] and node.output[0] in {o.name for o in b.loaded.graph.output}:  # NCHW to an NHWC output
        return same_channels(node, b)
    unknown(node, b, "Transpose moves the channel axis")


def squeeze(node, b: GraphBuilder) -> None:
    r = rank(b, node.output[0] if node.op_type == "Unsqueeze" else node.input[0])
    axes = _axes(b, node, r)
    if axes is None and node.op_type == "Squeeze":
        shape = b.loaded.shape(node.input[0]) or ()
        axes = [k for k, d in enumerate(shape) if d == 1] if shape else None
    if axes is not None and 0 not in axes and 1 not in axes:
        return same_channels(node, b)
    unknown(node, b, f"{node.op_type} moves the channel axis")


def reshape(node, b: GraphBuilder) -> None:
    """Flatten/Reshape to rank 2 in front of a Gemm/MatMul head reads the channels. A Reshape that splits
    the channel axis into several (and one that merges them back) is tracked, so a channel shuffle
    (Reshape -> Transpose -> Reshape) routes channels; any other Reshape freezes them."""
    shape_in, shape_out = b.loaded.shape(node.input[0]), b.loaded.shape(node.output[0])
    split_nodes = b.split_nodes.get(node.input[0])
    if node.op_type == "Reshape" and shape_in and shape_out and None not in shape_in + shape_out:
        if split_nodes is not None:  # merge the split channel axes back into one
            k = split_nodes.ndim
            if shape_out[0] == shape_in[0] and shape_out[2:] == shape_in[k + 1:] and shape_out[1] == split_nodes.size:
                b.set_nodes(node.output[0], split_nodes.ravel())
                b.couple("channel shuffle (Reshape/Transpose)", node, [node.output[0]])
                return
        elif b.nodes(node.input[0]) is not None and len(shape_out) > len(shape_in) >= 3:
            k = len(shape_out) - len(shape_in) + 1
            if (shape_out[0] == shape_in[0] and shape_out[k + 1:] == shape_in[2:]
                    and int(np.prod(shape_out[1:k + 1])) == shape_in[1]):
                b.split_nodes[node.output[0]] = b.nodes(node.input[0]).reshape(shape_out[1:k + 1])
                freeze(b, node, [node.input[0]], "channel shuffle: its Reshape fixes the channel count")
                return
    if split_nodes is not None:
        b.set_nodes(node.input[0], split_nodes.ravel())
    elif node.op_type == "Flatten" and int(attr(node, "axis", 1)) == 1 or (shape_out and len(shape_out) == 2):
        return linear_head(node, b)
    unknown(node, b, f"{node.op_type} to rank {len(shape_out) if shape_out else '?'} changes the channel layout")
